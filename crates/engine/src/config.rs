//! Model hyper-parameters of the Llama family, read from a Hugging Face `config.json` or from
//! GGUF metadata, into one description the decoder follows.
//!
//! The architectures differ in small, named ways — that is all a "model file" would hold:
//! - Llama 3.x: llama3 RoPE scaling (frequency bands rescaled), untied or tied embeddings.
//! - SmolLM2: a Llama with tied embeddings.
//! - Mistral: a Llama with a sliding attention window.
//! - Qwen2/2.5: biases on q/k/v, tied embeddings on the small models.
//! - Qwen3: RMSNorm on every query and key head (`q_norm`/`k_norm`), and an explicit
//!   `head_dim` that need not equal `hidden_size / num_attention_heads`.

use serde_json::Value;

use crate::EngineError;

/// The supported decoder families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM, and other `LlamaForCausalLM` models.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's banded rescaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength band edge (low).
        low_freq_factor: f64,
        /// Wavelength band edge (high).
        high_freq_factor: f64,
        /// The pre-training context.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors given as a tensor (GGUF's `rope_freqs.weight`).
    FreqFactors {
        /// One divisor per frequency (`head_dim / 2` of them).
        factors: Vec<f32>,
    },
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Family.
    pub architecture: Architecture,
    /// Vocabulary rows of the embedding.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model takes.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Keys older than this many positions are not attended to (Mistral).
    pub sliding_window: Option<usize>,
    /// End-of-sequence ids from the model config (the tokenizer may add more).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the numbers fit together (before any weight is read).
    pub fn validate(&self, source: &str) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(format!("{source}: {m}")));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if let RopeScaling::FreqFactors { factors } = &self.rope_scaling {
            if factors.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs has {} factors, head_dim/2 is {}",
                    factors.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json` (transformers 4 and 5 layouts).
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Config(format!("{source}: {m}"));
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("field 'model_type' is missing".into()))?;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "{source}: model_type '{other}' is not supported (supported: llama, mistral, qwen2, qwen3)"
                )))
            }
        };
        let usize_field = |k: &str| -> Result<usize, EngineError> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("field '{k}' is missing or not an integer")))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => num_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| err("field 'head_dim' is not an integer".into()))?
                as usize,
            _ => hidden_size / num_heads.max(1),
        };
        // transformers 5 moved rope_theta and the scaling into `rope_parameters`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let rope_scaling = match scaling {
            None => RopeScaling::Default,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str| -> Result<f64, EngineError> {
                    s.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| err(format!("rope scaling field '{k}' is missing")))
                };
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(EngineError::Unsupported(format!(
                            "{source}: rope scaling '{other}' is not supported (supported: default, linear, llama3)"
                        )))
                    }
                }
            }
        };
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(EngineError::Unsupported(format!(
                "{source}: use_sliding_window = true is not supported for {model_type}"
            )));
        }
        let sliding_window = match architecture {
            Architecture::Mistral => v
                .get("sliding_window")
                .and_then(Value::as_u64)
                .map(|w| w as usize),
            _ => None,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                // transformers' default is True for Qwen2 and Llama configs alike.
                .unwrap_or(true),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            eos_token_ids,
        };
        cfg.validate(source)?;
        Ok(cfg)
    }

    /// Total parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let norms = 2 * h + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let bias = if self.architecture == Architecture::Qwen2 {
            q + 2 * kv
        } else {
            0
        };
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_layers * (attn + mlp + norms + bias) + embed + h
    }

    /// The `config.json` transformers would write for this model (used when merging a GGUF
    /// model into a plain Hugging Face directory).
    pub fn to_hf_json(&self) -> Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        match &self.rope_scaling {
            RopeScaling::Default | RopeScaling::FreqFactors { .. } => {}
            RopeScaling::Linear { factor } => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                v["rope_scaling"] = serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = w.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.into(),
        }
        v
    }

    /// The inverse RoPE frequencies (`head_dim / 2` of them), computed in f32 as transformers
    /// does (`1 / base^(2i/d)`), then rescaled.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::FreqFactors { factors } => {
                inv.iter().zip(factors).map(|(f, s)| f / s).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Wavelengths longer than the low band are divided by `factor`, shorter than
                // the high band kept, and the band between interpolated smoothly.
                let (factor, lo, hi, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_freq_wavelen = old / lo;
                let high_freq_wavelen = old / hi;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transformers5_rope_parameters_and_refuses_unknown() {
        let v = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 64, "tie_word_embeddings": false,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
        });
        let c = ModelConfig::from_hf_json(&v, "config.json").unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(c.head_dim, 16);
        let inv = c.rope_inv_freq();
        // Wavelength 2π sits between the bands (16/4 and 16/1): smoothed, not kept or divided.
        assert!(inv[0] > 1.0 / 8.0 && inv[0] < 1.0);
        let plain = 1.0 / 500000f32.powf(14.0 / 16.0);
        assert!((inv[7] - plain / 8.0).abs() < 1e-12);
        let mut bad = v.clone();
        bad["model_type"] = "gpt2".into();
        let e = ModelConfig::from_hf_json(&bad, "config.json").unwrap_err();
        assert!(e.to_string().contains("gpt2"), "{e}");
        let mut bad = v;
        bad["num_key_value_heads"] = 3.into();
        assert!(ModelConfig::from_hf_json(&bad, "config.json").is_err());
    }
}
