//! LoRA hyper-parameters, with PEFT's names and semantics.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::LoraError;

/// A projection of a Llama-family decoder layer that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    /// Attention query projection.
    #[serde(rename = "q_proj")]
    Q,
    /// Attention key projection.
    #[serde(rename = "k_proj")]
    K,
    /// Attention value projection.
    #[serde(rename = "v_proj")]
    V,
    /// Attention output projection.
    #[serde(rename = "o_proj")]
    O,
    /// MLP gate projection.
    #[serde(rename = "gate_proj")]
    Gate,
    /// MLP up projection.
    #[serde(rename = "up_proj")]
    Up,
    /// MLP down projection.
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    /// All seven projections, in layer order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
    /// The attention projections (Tinker's `train_attn`).
    pub const ATTN: [Target; 4] = [Target::Q, Target::K, Target::V, Target::O];
    /// The MLP projections (Tinker's `train_mlp`).
    pub const MLP: [Target; 3] = [Target::Gate, Target::Up, Target::Down];

    /// PEFT's module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The submodule of the decoder layer holding it (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// Parses a module name: PEFT's (`q_proj`) or the short form (`q`).
    pub fn parse(name: &str) -> Result<Self, LoraError> {
        Ok(match name {
            "q_proj" | "q" => Target::Q,
            "k_proj" | "k" => Target::K,
            "v_proj" | "v" => Target::V,
            "o_proj" | "o" => Target::O,
            "gate_proj" | "gate" => Target::Gate,
            "up_proj" | "up" => Target::Up,
            "down_proj" | "down" => Target::Down,
            other => {
                return Err(LoraError::Config(format!(
                    "unknown target module '{other}' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)"
                )))
            }
        })
    }

    /// The module path inside the Hugging Face model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.parent(),
            self.module_name()
        )
    }
}

/// One adapted projection: a layer and a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    /// Decoder layer index.
    pub layer: usize,
    /// Projection.
    pub target: Target,
}

impl Site {
    /// PEFT's saved key of this site's `lora_A` (`A`) or `lora_B` (`B`) weight.
    pub fn peft_key(self, which: char) -> String {
        format!(
            "base_model.model.{}.lora_{which}.weight",
            self.target.module_path(self.layer)
        )
    }
}

/// LoRA hyper-parameters. One struct serves the API, the job file and the saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`; the scaling is `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// rsLoRA scaling (`use_rslora`).
    pub use_rslora: bool,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Adapted projections.
    pub target_modules: Vec<Target>,
    /// Seed of the initialisation and of the dropout stream.
    pub seed: u64,
    /// Per-module rank overrides (PEFT's `rank_pattern`): module-path suffix → rank.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (PEFT's `alpha_pattern`): module-path suffix → alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            alpha: 32.0,
            use_rslora: false,
            dropout: 0.0,
            target_modules: Target::ALL.to_vec(),
            seed: 0,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// True when `pattern` names `module_path` the way PEFT's patterns do: the whole path or a
/// suffix of it starting at a `.` boundary (`q_proj`, `layers.0.self_attn.q_proj`).
fn pattern_matches(pattern: &str, module_path: &str) -> bool {
    module_path == pattern
        || module_path
            .strip_suffix(pattern)
            .is_some_and(|head| head.ends_with('.'))
}

impl LoraConfig {
    /// Tinker's constructor: rank, attention and/or MLP targets, seed; alpha = 32 as Tinker's.
    pub fn from_tinker(c: &whet_contract::LoraConfig) -> Result<Self, LoraError> {
        if c.train_unembed {
            return Err(LoraError::Config(
                "train_unembed: LoRA on the unembedding is not supported (vLLM and most serving stacks cannot load it); set train_unembed = false".into(),
            ));
        }
        let mut targets = Vec::new();
        if c.train_attn {
            targets.extend(Target::ATTN);
        }
        if c.train_mlp {
            targets.extend(Target::MLP);
        }
        let cfg = Self {
            rank: c.rank,
            alpha: 32.0,
            target_modules: targets,
            seed: c.seed.unwrap_or(0),
            ..Self::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and emptiness.
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::Config("rank must be at least 1".into()));
        }
        if self.target_modules.is_empty() {
            return Err(LoraError::Config(
                "target_modules is empty: train_attn and train_mlp cannot both be false".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config(format!(
                "dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(LoraError::Config(format!(
                "alpha {} must be positive",
                self.alpha
            )));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(LoraError::Config(format!("rank_pattern['{k}'] is 0")));
        }
        Ok(())
    }

    /// Whether a site is adapted.
    pub fn targets(&self, target: Target) -> bool {
        self.target_modules.contains(&target)
    }

    /// The rank of a site (the first matching `rank_pattern` entry, else `rank`).
    pub fn rank_of(&self, site: Site) -> usize {
        let path = site.target.module_path(site.layer);
        self.rank_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, &path))
            .map(|(_, &r)| r)
            .unwrap_or(self.rank)
    }

    /// The output scaling of a site: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling_of(&self, site: Site) -> f64 {
        let path = site.target.module_path(site.layer);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, &path))
            .map(|(_, &a)| a)
            .unwrap_or(self.alpha);
        let r = self.rank_of(site) as f64;
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_and_patterns() {
        let mut c = LoraConfig {
            rank: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        };
        let s = Site {
            layer: 3,
            target: Target::Q,
        };
        assert_eq!(c.scaling_of(s), 2.0);
        c.use_rslora = true;
        assert!((c.scaling_of(s) - 16.0 / 8f64.sqrt()).abs() < 1e-12);
        c.rank_pattern.insert("layers.3.self_attn.q_proj".into(), 4);
        assert_eq!(c.rank_of(s), 4);
        assert_eq!(c.rank_of(Site { layer: 13, ..s }), 8);
        assert_eq!(
            c.rank_of(Site {
                layer: 3,
                target: Target::K
            }),
            8
        );
    }

    #[test]
    fn tinker_flags_choose_targets() {
        let c = LoraConfig::from_tinker(&whet_contract::LoraConfig {
            rank: 4,
            train_attn: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.target_modules, Target::MLP.to_vec());
        assert!(LoraConfig::from_tinker(&whet_contract::LoraConfig {
            rank: 4,
            train_unembed: true,
            ..Default::default()
        })
        .is_err());
    }
}
