//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! whet writes exactly what `peft.PeftModel.save_pretrained` writes for a LoRA on a causal LM,
//! so PEFT and vLLM load whet's adapters as they are, and whet continues training PEFT's.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::io::{read_safetensors, write_json_atomic, write_safetensors_atomic};
use crate::{LoraAdapter, LoraConfig, LoraError, SiteShape, Target};

/// The file names of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Reads `adapter_config.json` into a [`LoraConfig`], refusing what whet cannot honour
/// (another PEFT method, biases, `fan_in_fan_out`, extra saved modules, regex targets).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, LoraError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| LoraError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| LoraError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let bad = |field: &str, message: String| LoraError::Parse {
        path: path.display().to_string(),
        message: format!("field '{field}': {message}"),
    };
    let str_field = |k: &str| v.get(k).and_then(Value::as_str);
    if let Some(t) = str_field("peft_type") {
        if t != "LORA" {
            return Err(bad("peft_type", format!("'{t}' is not LORA")));
        }
    }
    if let Some(b) = str_field("bias") {
        if b != "none" {
            return Err(bad(
                "bias",
                format!("'{b}' is not supported (only \"none\")"),
            ));
        }
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad("fan_in_fan_out", "true is not supported".into()));
    }
    if let Some(m) = v.get("modules_to_save") {
        if !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(bad(
                "modules_to_save",
                "extra trained modules are not supported".into(),
            ));
        }
    }
    for flag in ["use_dora", "use_qalora"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(flag, "true is not supported".into()));
        }
    }
    if let Some(l) = v.get("layers_to_transform") {
        if !l.is_null() {
            return Err(bad("layers_to_transform", "is not supported".into()));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r", "missing or not an integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                let name = t
                    .as_str()
                    .ok_or_else(|| bad("target_modules", format!("{t} is not a string")))?;
                Target::parse(name).map_err(|e| bad("target_modules", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
        Some(other) => {
            return Err(bad(
                "target_modules",
                format!("{other} is not supported: give a list of module names"),
            ))
        }
        None => return Err(bad("target_modules", "missing".into())),
    };
    let mut cfg = LoraConfig {
        rank,
        alpha,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        ..LoraConfig::default()
    };
    if let Some(Value::Object(m)) = v.get("rank_pattern") {
        for (k, r) in m {
            let r = r
                .as_u64()
                .ok_or_else(|| bad("rank_pattern", format!("'{k}' is not an integer")))?;
            cfg.rank_pattern.insert(k.clone(), r as usize);
        }
    }
    if let Some(Value::Object(m)) = v.get("alpha_pattern") {
        for (k, a) in m {
            let a = a
                .as_f64()
                .ok_or_else(|| bad("alpha_pattern", format!("'{k}' is not a number")))?;
            cfg.alpha_pattern.insert(k.clone(), a);
        }
    }
    cfg.validate().map_err(|e| bad("adapter", e.to_string()))?;
    Ok(cfg)
}

/// Maps the key spellings found in the wild onto PEFT's saved form
/// (`base_model.model.model.layers.N.<parent>.<proj>.lora_A.weight`): the in-memory adapter
/// name (`.lora_A.default.weight`) is dropped.
fn normalise_key(key: &str) -> String {
    key.replace(".lora_A.default.weight", ".lora_A.weight")
        .replace(".lora_B.default.weight", ".lora_B.weight")
}

/// Loads a PEFT adapter directory for a model whose adaptable projections are `shapes`.
/// Shapes that do not fit the model are refused naming the tensor.
pub fn load_peft_adapter(
    dir: &Path,
    shapes: &[SiteShape],
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    if !dir.is_dir() {
        return Err(LoraError::Io {
            path: dir.display().to_string(),
            message: "not a directory (a PEFT adapter is a directory with adapter_config.json and adapter_model.safetensors)".into(),
        });
    }
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors: BTreeMap<String, Tensor> = read_safetensors(&path, device)?
        .into_iter()
        .map(|(k, v)| (normalise_key(&k), v))
        .collect();
    LoraAdapter::from_tensors(cfg, shapes, tensors, device).map_err(|e| e.in_file(&path))
}

/// The `adapter_config.json` PEFT writes for this adapter.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": cfg.target_modules.iter().map(|t| t.module_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "use_dora": false,
        "revision": null,
    })
}

/// Writes the adapter as a PEFT directory (created if needed; each file written atomically).
pub fn save_peft_adapter(
    adapter: &LoraAdapter,
    base_model: &str,
    dir: &Path,
) -> Result<(), LoraError> {
    std::fs::create_dir_all(dir).map_err(|e| LoraError::io(dir, e))?;
    let mut tensors = Vec::new();
    for (key, var) in adapter.named_vars() {
        tensors.push((key, var.as_tensor().to_dtype(DType::F32)?));
    }
    write_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    write_json_atomic(
        &dir.join(ADAPTER_CONFIG),
        &adapter_config_json(adapter.config(), base_model),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Site;

    #[test]
    fn save_then_load_roundtrips() {
        let shapes: Vec<SiteShape> = (0..2)
            .flat_map(|layer| {
                Target::ALL.iter().map(move |&target| SiteShape {
                    site: Site { layer, target },
                    in_features: 8,
                    out_features: if target == Target::K { 4 } else { 8 },
                })
            })
            .collect();
        let cfg = LoraConfig {
            rank: 3,
            alpha: 6.0,
            seed: 1,
            ..LoraConfig::default()
        };
        let a = LoraAdapter::init(cfg, &shapes, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_peft_adapter(&a, "tiny", dir.path()).unwrap();
        let b = load_peft_adapter(dir.path(), &shapes, &Device::Cpu).unwrap();
        // PEFT's file has no seed: everything else comes back.
        assert_eq!(
            &LoraConfig {
                seed: 0,
                ..a.config().clone()
            },
            b.config()
        );
        for ((ka, va), (kb, vb)) in a.named_vars().iter().zip(b.named_vars()) {
            assert_eq!(ka, &kb);
            let x: Vec<f32> = va.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = vb.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y);
        }
        // A model with other shapes refuses it, naming the tensor.
        let other: Vec<SiteShape> = shapes
            .iter()
            .map(|s| SiteShape {
                in_features: 16,
                ..*s
            })
            .collect();
        let err = load_peft_adapter(dir.path(), &other, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("lora_A.weight"), "{err}");
    }
}
