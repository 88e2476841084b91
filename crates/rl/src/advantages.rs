//! Group-relative advantages (GRPO): each rollout's reward minus its group's mean, optionally
//! divided by the group's standard deviation.

/// How a group's rewards came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Every rollout scored the same, above 0.
    AllGood,
    /// Every rollout scored the same, 0 or below.
    AllBad,
    /// Rewards differ: the group teaches something.
    Mixed,
}

/// Classifies a group by its rewards.
pub fn group_kind(rewards: &[f64]) -> GroupKind {
    let first = rewards.first().copied().unwrap_or(0.0);
    if rewards.iter().any(|&r| (r - first).abs() > 1e-12) {
        GroupKind::Mixed
    } else if first > 0.0 {
        GroupKind::AllGood
    } else {
        GroupKind::AllBad
    }
}

/// `A_i = r_i − mean(r)`, divided by `std(r) + 1e-6` when `normalize` (population std).
pub fn group_advantages(rewards: &[f64], normalize: bool) -> Vec<f64> {
    if rewards.is_empty() {
        return vec![];
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let centered: Vec<f64> = rewards.iter().map(|r| r - mean).collect();
    if !normalize {
        return centered;
    }
    let std = (centered.iter().map(|a| a * a).sum::<f64>() / n).sqrt();
    centered.iter().map(|a| a / (std + 1e-6)).collect()
}

/// Reward-to-go of a multi-turn episode: turn `t` gets the sum of the rewards from `t` on.
pub fn reward_to_go(per_turn: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; per_turn.len()];
    let mut acc = 0.0;
    for (i, r) in per_turn.iter().enumerate().rev() {
        acc += r;
        out[i] = acc;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_centered_and_optionally_scaled() {
        assert_eq!(
            group_advantages(&[1.0, 0.0, 0.0, 1.0], false),
            vec![0.5, -0.5, -0.5, 0.5]
        );
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], true);
        assert!((a[0] - 1.0).abs() < 1e-5 && (a[1] + 1.0).abs() < 1e-5);
        assert_eq!(group_advantages(&[0.3, 0.3], true), vec![0.0, 0.0]);
        assert!(group_advantages(&[], false).is_empty());
    }

    #[test]
    fn groups_are_classified() {
        assert_eq!(group_kind(&[1.0, 1.0]), GroupKind::AllGood);
        assert_eq!(group_kind(&[0.0, 0.0]), GroupKind::AllBad);
        assert_eq!(group_kind(&[0.0, 1.0]), GroupKind::Mixed);
    }

    #[test]
    fn reward_to_go_sums_the_future() {
        assert_eq!(reward_to_go(&[0.1, 0.0, 1.0]), vec![1.1, 1.0, 1.0]);
    }
}
