//! Which rows each optimizer step trains on: epoch after epoch, each epoch a seeded
//! permutation of the rows cut into batches. A pure function of the row count and the
//! schedule, so a resumed run knows its data position from the step number alone.

use crate::config::ScheduleConfig;
use crate::SftError;

/// The batches of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    rows: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    per_epoch: usize,
    total: usize,
}

impl Plan {
    /// The plan for `rows` training rows; errors name the schedule field at fault.
    pub fn new(rows: usize, s: &ScheduleConfig) -> Result<Self, SftError> {
        if rows == 0 {
            return Err(SftError::Config(
                "the training set has no usable rows".into(),
            ));
        }
        if s.batch_size == 0 {
            return Err(SftError::Config(
                "schedule.batch_size must be at least 1".into(),
            ));
        }
        if s.epochs == 0 {
            return Err(SftError::Config(
                "schedule.epochs must be at least 1".into(),
            ));
        }
        if s.steps == Some(0) {
            return Err(SftError::Config("schedule.steps must be at least 1".into()));
        }
        if s.gradient_accumulation_steps == 0 || s.gradient_accumulation_steps > s.batch_size {
            return Err(SftError::Config(format!(
                "schedule.gradient_accumulation_steps must be between 1 and batch_size ({})",
                s.batch_size
            )));
        }
        let per_epoch = rows.div_ceil(s.batch_size);
        let total = (per_epoch * s.epochs).min(s.steps.unwrap_or(usize::MAX));
        Ok(Self {
            rows,
            batch_size: s.batch_size,
            shuffle: s.shuffle,
            seed: s.seed,
            per_epoch,
            total,
        })
    }

    /// Optimizer steps in the run.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// Steps per epoch (the last batch of an epoch may be short).
    pub fn steps_per_epoch(&self) -> usize {
        self.per_epoch
    }

    /// Row indices of step `step` (0-based).
    pub fn batch(&self, step: usize) -> Vec<usize> {
        let (epoch, i) = (step / self.per_epoch, step % self.per_epoch);
        let order = self.order(epoch as u64);
        let end = ((i + 1) * self.batch_size).min(self.rows);
        order[i * self.batch_size..end].to_vec()
    }

    /// The row order of an epoch: Fisher–Yates driven by SplitMix64 (fixed here, so a run
    /// resumes identically whatever library versions change).
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows).collect();
        if !self.shuffle {
            return order;
        }
        let mut state = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for i in (1..order.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(
        epochs: usize,
        steps: Option<usize>,
        batch: usize,
        shuffle: bool,
    ) -> ScheduleConfig {
        ScheduleConfig {
            epochs,
            steps,
            batch_size: batch,
            shuffle,
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn epochs_and_step_cap_whichever_ends_first() {
        let p = Plan::new(10, &schedule(3, None, 4, false)).unwrap();
        assert_eq!((p.steps_per_epoch(), p.total_steps()), (3, 9));
        assert_eq!(p.batch(2), vec![8, 9]);
        assert_eq!(p.batch(3), vec![0, 1, 2, 3]);
        let p = Plan::new(10, &schedule(3, Some(4), 4, false)).unwrap();
        assert_eq!(p.total_steps(), 4);
    }

    #[test]
    fn each_epoch_is_a_seeded_permutation() {
        let p = Plan::new(7, &schedule(2, None, 3, true)).unwrap();
        let epoch = |e: usize| -> Vec<usize> { (0..3).flat_map(|i| p.batch(e * 3 + i)).collect() };
        let (a, b) = (epoch(0), epoch(1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        assert_ne!(a, b, "epochs are shuffled differently");
        let again = Plan::new(7, &schedule(2, None, 3, true)).unwrap();
        assert_eq!(again.batch(4), p.batch(4), "a pure function of the config");
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let e = Plan::new(5, &schedule(1, None, 0, true)).unwrap_err();
        assert!(e.to_string().contains("batch_size"));
        let e = Plan::new(0, &schedule(1, None, 2, true)).unwrap_err();
        assert!(e.to_string().contains("no usable rows"));
        let mut s = schedule(1, None, 2, true);
        s.gradient_accumulation_steps = 3;
        assert!(Plan::new(5, &s)
            .unwrap_err()
            .to_string()
            .contains("gradient_accumulation"));
    }
}
