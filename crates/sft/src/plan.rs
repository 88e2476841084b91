//! Which rows each optimizer step trains on: epoch after epoch, each epoch a seeded
//! permutation of the rows cut into batches — of `batch_size` rows, or of as many rows as fit
//! `batch_tokens`. A pure function of the rows' token counts and the schedule, so a resumed run
//! knows its data position from the step number alone.

use crate::config::ScheduleConfig;
use crate::examples::Example;
use crate::SftError;

/// The batches of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    rows: usize,
    shuffle: bool,
    seed: u64,
    cut: Cut,
    total: usize,
}

/// How each epoch's order is cut into batches.
#[derive(Debug, Clone)]
enum Cut {
    /// Every batch `size` rows (an epoch's last may be short): the same steps every epoch, so
    /// a closed form needs nothing stored.
    Rows { size: usize, per_epoch: usize },
    /// Rows up to a token budget. Where the batches fall depends on each epoch's permutation,
    /// so they are found once, at construction, for every epoch the run reaches.
    Tokens {
        /// Per epoch, where each batch starts in that epoch's order.
        starts: Vec<Vec<usize>>,
        /// Per epoch, the step its first batch trains at.
        first_step: Vec<usize>,
    },
}

impl Plan {
    /// The plan for `rows` training rows in batches of `batch_size` rows; errors name the
    /// schedule field at fault. A token budget needs the rows' lengths: a schedule with
    /// `batch_tokens` is refused here (use [`Plan::for_examples`] or [`Plan::for_lengths`]),
    /// rather than silently batching by rows.
    pub fn new(rows: usize, s: &ScheduleConfig) -> Result<Self, SftError> {
        if s.batch_tokens.is_some() {
            return Err(SftError::Config(
                "schedule.batch_tokens needs the rows' token counts (Plan::for_examples)".into(),
            ));
        }
        Self::for_lengths(&vec![0; rows], s)
    }

    /// The plan for `examples`, batched by `batch_size` rows or `batch_tokens` tokens (the
    /// tokens each example's model input holds). What [`crate::train`] runs.
    pub fn for_examples(examples: &[Example], s: &ScheduleConfig) -> Result<Self, SftError> {
        let lengths: Vec<usize> = examples.iter().map(Example::tokens).collect();
        Self::for_lengths(&lengths, s)
    }

    /// The plan for rows of `lengths` tokens (row `i` has `lengths[i]`; only a token budget
    /// reads them). Errors name the schedule field at fault.
    pub fn for_lengths(lengths: &[usize], s: &ScheduleConfig) -> Result<Self, SftError> {
        let rows = lengths.len();
        let config = |m: String| Err(SftError::Config(m));
        if rows == 0 {
            return config("the training set has no usable rows".into());
        }
        if s.epochs == 0 {
            return config("schedule.epochs must be at least 1".into());
        }
        if s.steps == Some(0) {
            return config("schedule.steps must be at least 1".into());
        }
        let cap = s.steps.unwrap_or(usize::MAX);
        let (cut, total) = match s.batch_tokens {
            None => {
                if s.batch_size == 0 {
                    return config("schedule.batch_size must be at least 1".into());
                }
                if s.gradient_accumulation_steps == 0
                    || s.gradient_accumulation_steps > s.batch_size
                {
                    return config(format!(
                        "schedule.gradient_accumulation_steps must be between 1 and batch_size ({})",
                        s.batch_size
                    ));
                }
                let per_epoch = rows.div_ceil(s.batch_size);
                let cut = Cut::Rows {
                    size: s.batch_size,
                    per_epoch,
                };
                (cut, per_epoch.saturating_mul(s.epochs).min(cap))
            }
            Some(budget) => {
                if budget == 0 {
                    return config("schedule.batch_tokens must be at least 1".into());
                }
                let default_size = ScheduleConfig::default().batch_size;
                if s.batch_size != default_size {
                    return config(format!(
                        "schedule.batch_tokens ({budget}) and schedule.batch_size ({}) both set \
                         the batch: keep one (batch_size is rows per step, batch_tokens tokens)",
                        s.batch_size
                    ));
                }
                // Rows, not batch_size, bound the parts here: a step too short for them runs
                // one part per row (see `train`).
                if s.gradient_accumulation_steps == 0 {
                    return config(
                        "schedule.gradient_accumulation_steps must be at least 1".into(),
                    );
                }
                let (mut starts, mut first_step, mut steps) = (Vec::new(), Vec::new(), 0usize);
                // Only the epochs the run reaches: a steps cap can end it long before `epochs`.
                for epoch in 0..s.epochs {
                    if steps >= cap {
                        break;
                    }
                    let order = order(rows, s.shuffle, s.seed, epoch as u64);
                    let epoch_starts = token_batches(&order, lengths, budget);
                    first_step.push(steps);
                    steps += epoch_starts.len();
                    starts.push(epoch_starts);
                }
                (Cut::Tokens { starts, first_step }, steps.min(cap))
            }
        };
        Ok(Self {
            rows,
            shuffle: s.shuffle,
            seed: s.seed,
            cut,
            total,
        })
    }

    /// Optimizer steps in the run.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// Batches of epoch `epoch` (0-based) in full — the steps cap may end the run inside it —
    /// or 0 for an epoch the run does not reach. With a token budget epochs differ, as each
    /// epoch's order packs differently.
    pub fn steps_in_epoch(&self, epoch: usize) -> usize {
        match &self.cut {
            Cut::Rows { per_epoch, .. } if epoch.saturating_mul(*per_epoch) < self.total => {
                *per_epoch
            }
            Cut::Rows { .. } => 0,
            Cut::Tokens { starts, .. } => starts.get(epoch).map_or(0, Vec::len),
        }
    }

    /// Row indices of step `step` (0-based); empty past the last step.
    pub fn batch(&self, step: usize) -> Vec<usize> {
        if step >= self.total {
            return Vec::new();
        }
        let (epoch, from, to) = match &self.cut {
            Cut::Rows { size, per_epoch } => {
                let (epoch, i) = (step / per_epoch, step % per_epoch);
                (epoch, i * size, ((i + 1) * size).min(self.rows))
            }
            Cut::Tokens { starts, first_step } => {
                // The last epoch starting at or before `step` (epoch 0 starts at step 0).
                let epoch = first_step.partition_point(|&f| f <= step) - 1;
                let (starts, i) = (&starts[epoch], step - first_step[epoch]);
                (
                    epoch,
                    starts[i],
                    starts.get(i + 1).copied().unwrap_or(self.rows),
                )
            }
        };
        order(self.rows, self.shuffle, self.seed, epoch as u64)[from..to].to_vec()
    }
}

/// Where batches start in `order` when each takes rows while their tokens fit `budget`: the
/// next row opens a new batch when it would overflow the current one, so a row longer than
/// the budget always trains alone (it cannot be split: a row is one sequence).
fn token_batches(order: &[usize], lengths: &[usize], budget: usize) -> Vec<usize> {
    let (mut starts, mut used) = (Vec::new(), 0usize);
    for (pos, &row) in order.iter().enumerate() {
        let len = lengths[row];
        if pos == 0 || used.saturating_add(len) > budget {
            starts.push(pos);
            used = 0;
        }
        used = used.saturating_add(len);
    }
    starts
}

/// The row order of an epoch: Fisher–Yates driven by SplitMix64 (fixed here, so a run resumes
/// identically whatever library versions change).
fn order(rows: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    if !shuffle {
        return order;
    }
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
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

    fn budget(epochs: usize, steps: Option<usize>, tokens: usize, seed: u64) -> ScheduleConfig {
        ScheduleConfig {
            epochs,
            steps,
            batch_tokens: Some(tokens),
            shuffle: true,
            seed,
            ..ScheduleConfig::default()
        }
    }

    /// Steps of each epoch of a token-budget plan, in order.
    fn epochs_of(p: &Plan) -> Vec<Vec<Vec<usize>>> {
        let mut step = 0;
        (0..)
            .map(|e| p.steps_in_epoch(e))
            .take_while(|&n| n > 0)
            .map(|n| {
                let batches = (step..step + n).map(|s| p.batch(s)).collect();
                step += n;
                batches
            })
            .collect()
    }

    #[test]
    fn epochs_and_step_cap_whichever_ends_first() {
        let p = Plan::new(10, &schedule(3, None, 4, false)).unwrap();
        assert_eq!((p.steps_in_epoch(0), p.total_steps()), (3, 9));
        assert_eq!(p.batch(2), vec![8, 9]);
        assert_eq!(p.batch(3), vec![0, 1, 2, 3]);
        assert_eq!(p.steps_in_epoch(3), 0);
        assert!(p.batch(9).is_empty(), "past the last step");
        let p = Plan::new(10, &schedule(3, Some(4), 4, false)).unwrap();
        assert_eq!(p.total_steps(), 4);
        assert_eq!((p.steps_in_epoch(1), p.steps_in_epoch(2)), (3, 0));
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
        // The lengths-taking constructors batch by rows the same way.
        let by_len = Plan::for_lengths(&[5; 7], &schedule(2, None, 3, true)).unwrap();
        assert_eq!((0..6).map(|s| by_len.batch(s)).collect::<Vec<_>>(), {
            (0..6).map(|s| p.batch(s)).collect::<Vec<_>>()
        });
    }

    #[test]
    fn token_batches_fill_the_budget_and_cover_every_row_once_per_epoch() {
        let lengths: Vec<usize> = (0..40).map(|i| 1 + (i * 7919) % 23).collect();
        let p = Plan::for_lengths(&lengths, &budget(4, None, 40, 9)).unwrap();
        let epochs = epochs_of(&p);
        assert_eq!(epochs.len(), 4);
        assert_eq!(epochs.iter().map(Vec::len).sum::<usize>(), p.total_steps());
        for batches in &epochs {
            let tokens = |b: &Vec<usize>| b.iter().map(|&r| lengths[r]).sum::<usize>();
            for (i, b) in batches.iter().enumerate() {
                assert!(!b.is_empty() && tokens(b) <= 40, "{b:?}");
                // Greedy: the next batch's first row would not have fit.
                if let Some(next) = batches.get(i + 1) {
                    assert!(tokens(b) + lengths[next[0]] > 40);
                }
            }
            let mut rows: Vec<usize> = batches.concat();
            rows.sort_unstable();
            assert_eq!(rows, (0..40).collect::<Vec<_>>(), "every row exactly once");
        }
        assert_ne!(epochs[0], epochs[1], "epochs are shuffled differently");
    }

    #[test]
    fn epochs_can_differ_in_steps_and_steps_follow_on() {
        // Rows of 5, 11 and 17 tokens in a budget of 20: two or three batches, by the order.
        let lengths = [5, 11, 17];
        let counts: Vec<Vec<usize>> = (0..20)
            .map(|seed| {
                let p = Plan::for_lengths(&lengths, &budget(3, None, 20, seed)).unwrap();
                let counts: Vec<usize> = (0..3).map(|e| p.steps_in_epoch(e)).collect();
                assert_eq!(counts.iter().sum::<usize>(), p.total_steps());
                counts
            })
            .collect();
        assert!(counts.iter().flatten().any(|&n| n == 2));
        assert!(counts.iter().flatten().any(|&n| n == 3));
    }

    #[test]
    fn a_row_over_the_budget_trains_alone() {
        let lengths = [3, 50, 4, 2, 60, 1];
        let s = ScheduleConfig {
            shuffle: false,
            ..budget(1, None, 10, 0)
        };
        let p = Plan::for_lengths(&lengths, &s).unwrap();
        let batches: Vec<Vec<usize>> = (0..p.total_steps()).map(|i| p.batch(i)).collect();
        assert_eq!(
            batches,
            vec![vec![0], vec![1], vec![2, 3], vec![4], vec![5]]
        );
    }

    #[test]
    fn token_plans_are_seeded_and_capped_by_steps() {
        let lengths: Vec<usize> = (0..30).map(|i| 2 + i % 9).collect();
        let a = Plan::for_lengths(&lengths, &budget(3, None, 25, 4)).unwrap();
        let b = Plan::for_lengths(&lengths, &budget(3, None, 25, 4)).unwrap();
        let c = Plan::for_lengths(&lengths, &budget(3, None, 25, 5)).unwrap();
        let all = |p: &Plan| (0..p.total_steps()).map(|s| p.batch(s)).collect::<Vec<_>>();
        assert_eq!(all(&a), all(&b), "a pure function of lengths and config");
        assert_ne!(all(&a), all(&c), "the seed picks the order");
        // A cap inside the second epoch: the same first steps, nothing after the cap.
        let cut = a.steps_in_epoch(0) + 1;
        let capped = Plan::for_lengths(&lengths, &budget(1000, Some(cut), 25, 4)).unwrap();
        assert_eq!(capped.total_steps(), cut);
        assert_eq!(all(&capped), all(&a)[..cut].to_vec());
        assert_eq!(
            capped.steps_in_epoch(2),
            0,
            "epochs past the cap are not planned"
        );
        assert!(capped.batch(cut).is_empty());
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let msg = |r: Result<Plan, SftError>| r.unwrap_err().to_string();
        assert!(msg(Plan::new(5, &schedule(1, None, 0, true))).contains("batch_size"));
        assert!(msg(Plan::new(0, &schedule(1, None, 2, true))).contains("no usable rows"));
        let mut s = schedule(1, None, 2, true);
        s.gradient_accumulation_steps = 3;
        assert!(msg(Plan::new(5, &s)).contains("gradient_accumulation"));
        assert!(msg(Plan::for_lengths(&[4; 5], &budget(1, None, 0, 0))).contains("batch_tokens"));
        assert!(msg(Plan::for_lengths(&[], &budget(1, None, 9, 0))).contains("no usable rows"));
        // Both ways of sizing a batch: refused, naming both.
        let both = ScheduleConfig {
            batch_size: 4,
            ..budget(1, None, 64, 0)
        };
        let e = msg(Plan::for_lengths(&[4; 5], &both));
        assert!(
            e.contains("batch_tokens") && e.contains("batch_size"),
            "{e}"
        );
        // A budget does not need the rows' count to bound the parts; 0 parts is still wrong.
        let many_parts = ScheduleConfig {
            gradient_accumulation_steps: 16,
            ..budget(1, None, 64, 0)
        };
        assert!(Plan::for_lengths(&[4; 5], &many_parts).is_ok());
        let no_parts = ScheduleConfig {
            gradient_accumulation_steps: 0,
            ..budget(1, None, 64, 0)
        };
        assert!(msg(Plan::for_lengths(&[4; 5], &no_parts)).contains("gradient_accumulation"));
        // The row-count constructor cannot honour a budget, so it says so.
        assert!(msg(Plan::new(5, &budget(1, None, 64, 0))).contains("batch_tokens"));
    }
}
