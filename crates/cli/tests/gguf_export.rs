//! End to end: a model trained on SmolLM2 and published, exported as GGUF (`whet models export
//! --format gguf`, f16 and q8_0) and through `whet adapter merge --format gguf` from a Hugging
//! Face directory, scores what the merged f32 model scores, carries llama.cpp's metadata and
//! tensors, and tokenizes as the source does.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use common::*;
use serde_json::{json, Value};
use whet_data::gguf::{read_gguf_metadata, GgufValue};
use whet_data::Tokenizer;

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `whet logprobs` of the datums under a model (and adapter), flattened.
fn logprobs(model: &Path, adapter: Option<&Path>, data: &Path) -> Vec<f32> {
    let mut args = vec!["logprobs", "--model", s(model), "--data", s(data)];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    ok(&args)
        .lines()
        .flat_map(|l| serde_json::from_value::<Vec<f32>>(json(l)["logprobs"].clone()).unwrap())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn keys(path: &Path, prefix: &str) -> BTreeMap<String, GgufValue> {
    read_gguf_metadata(path)
        .unwrap()
        .entries
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

fn tensors(path: &Path) -> BTreeMap<String, (GgmlDType, Vec<usize>)> {
    let content = Content::read(&mut File::open(path).unwrap()).unwrap();
    content
        .tensor_infos
        .into_iter()
        .map(|(k, t)| (k, (t.ggml_dtype, t.shape.dims().to_vec())))
        .collect()
}

fn export(home: &str, format: &[&str], out: &Path) -> Value {
    let mut args = vec!["models", "export", "smol@1.0.0", "--out", s(out)];
    args.extend(format);
    args.extend(["--home", home, "--json"]);
    json(&ok(&args))
}

/// Logprob bounds, measured on these 30 tokens and then given margin (training is seeded, so
/// they are repeatable). f16 keeps 11 significant bits: max |Δ| 5.5e-3, mean 1.5e-3 against the
/// merged f32 model; held to 1e-2 and 4e-3. q8_0 (8 bits per weight, one f16 scale per block of
/// 32) moved them by max 0.17, mean 0.05; held to 0.4 and 0.12. That is q8_0's own error on
/// SmolLM2-135M, not the export's: PyTorch scoring gguf-py's own q8_0 of the merged weights
/// gives exactly what it gives on this file's weights (max 0.35, mean 0.07 on a similar text),
/// and the file's q8_0 blocks are byte for byte gguf-py's (tools/check_gguf.py). The adapter
/// itself moves the logprobs by over 3 nats (one step at a high learning rate), asserted over
/// 1, so an export that lost it, or a tensor permuted or scaled wrongly, fails.
#[test]
fn published_smollm2_exports_as_gguf_that_scores_like_the_merged_model() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = s(&home);
    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"question\": \"2+2?\", \"answer\": \"#### 4\"}\n{\"question\": \"3+5?\", \"answer\": \"#### 8\"}\n",
    )
    .unwrap();
    let job = json(&ok(&[
        "train",
        "sft",
        "--model",
        s(&model),
        "--dataset",
        s(&rows),
        "--steps",
        "1",
        "--lora-rank",
        "4",
        "--learning-rate",
        "5e-3",
        "--home",
        h,
        "--json",
    ]));
    let id = job["id"].as_str().unwrap();
    ok(&[
        "models",
        "publish",
        id,
        "--name",
        "smol",
        "--version",
        "1.0.0",
        "--home",
        h,
    ]);

    let merged = tmp.path().join("merged");
    export(h, &["--format", "merged"], &merged);
    let adapter = tmp.path().join("peft");
    export(h, &["--format", "peft"], &adapter);
    let f16_dir = tmp.path().join("f16");
    let doc = export(h, &["--format", "gguf"], &f16_dir);
    assert_eq!(doc["gguf_type"], "f16");
    let f16 = f16_dir.join("model-f16.gguf");
    assert_eq!(doc["file"], json!(f16));
    let q8_dir = tmp.path().join("q8");
    let doc = export(h, &["--format", "gguf", "--gguf-type", "q8_0"], &q8_dir);
    let q8 = PathBuf::from(doc["file"].as_str().unwrap());
    assert_eq!(q8, q8_dir.join("model-q8_0.gguf"));
    // Nothing but the file; a second export into the same directory is refused.
    assert_eq!(std::fs::read_dir(&q8_dir).unwrap().count(), 1);
    let e = fails(&[
        "models",
        "export",
        "smol@1.0.0",
        "--format",
        "gguf",
        "--out",
        s(&q8_dir),
        "--home",
        h,
    ]);
    assert!(e.contains("already exists"), "{e}");
    let e = fails(&[
        "models",
        "export",
        "smol@1.0.0",
        "--format",
        "peft",
        "--gguf-type",
        "q8_0",
        "--out",
        s(&tmp.path().join("x")),
        "--home",
        h,
    ]);
    assert!(e.contains("--format gguf only"), "{e}");

    // Metadata: llama.cpp's keys, and the source's tokenizer copied verbatim.
    let general = keys(&f16, "");
    let num = |k: &str| general[k].as_u64().unwrap();
    assert_eq!(general["general.architecture"].as_str(), Some("llama"));
    assert_eq!(general["general.name"].as_str(), Some("smol@1.0.0"));
    assert_eq!(num("general.file_type"), 1);
    assert_eq!(
        keys(&q8, "general.file_type")["general.file_type"].as_u64(),
        Some(7)
    );
    assert_eq!(num("general.alignment"), 32);
    for (k, v) in [
        ("llama.block_count", 30),
        ("llama.embedding_length", 576),
        ("llama.feed_forward_length", 1536),
        ("llama.attention.head_count", 9),
        ("llama.attention.head_count_kv", 3),
        ("llama.context_length", 8192),
        ("llama.rope.dimension_count", 64),
        ("llama.vocab_size", 49152),
    ] {
        assert_eq!(num(k), v, "{k}");
    }
    assert_eq!(general["llama.rope.freq_base"], GgufValue::F32(100000.0));
    let source_tok = keys(&model, "tokenizer.");
    assert_eq!(keys(&f16, "tokenizer."), source_tok);
    assert_eq!(keys(&q8, "tokenizer."), source_tok);

    // Tensors: the source's names and dims (SmolLM2 ties its embeddings: no output.weight);
    // norms f32, every matrix f16 or q8_0 (all of SmolLM2's rows are multiples of 32).
    let source = tensors(&model);
    for (file, matrix) in [(&f16, GgmlDType::F16), (&q8, GgmlDType::Q8_0)] {
        let got = tensors(file);
        assert_eq!(got.len(), 272);
        assert!(!got.contains_key("output.weight"));
        for (name, (ty, dims)) in &got {
            assert_eq!(&source[name].1, dims, "{name}");
            let want = if dims.len() == 1 {
                GgmlDType::F32
            } else {
                matrix
            };
            assert_eq!(*ty, want, "{name}");
        }
    }

    // Scores: the merged f32 model's, up to rounding.
    let tok = Tokenizer::from_model_path(&model).unwrap();
    let data = tmp.path().join("datums.jsonl");
    let mut lines = String::new();
    for text in [
        "What is 2+2? #### 4. The capital of France is Paris.",
        "Once upon a time, a small robot learned to count to seventeen.",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let n = ids.len() - 1;
        lines.push_str(&format!(
            "{}\n",
            json!({"model_input": {"chunks": [{"type": "encoded_text", "tokens": &ids[..n]}]},
                   "loss_fn_inputs": {"target_tokens": {"data": &ids[1..], "dtype": "int64", "shape": [n]},
                                      "weights": {"data": vec![1.0; n], "dtype": "float32", "shape": [n]}}})
        ));
    }
    std::fs::write(&data, lines).unwrap();
    let want = logprobs(&merged, None, &data);
    let adapter_effect = max_abs_diff(&logprobs(&model, None, &data), &want);
    let (lp16, lp8) = (logprobs(&f16, None, &data), logprobs(&q8, None, &data));
    let (d16, d8) = (max_abs_diff(&lp16, &want), max_abs_diff(&lp8, &want));
    let (m16, m8) = (mean_abs_diff(&lp16, &want), mean_abs_diff(&lp8, &want));
    eprintln!(
        "SmolLM2 ({} tokens): |Δ logprob| vs merged f32: adapter itself max {adapter_effect:.3e}; \
         f16 max {d16:.3e} mean {m16:.3e}; q8_0 max {d8:.3e} mean {m8:.3e}",
        want.len()
    );
    assert!(
        d16 < 1e-2 && m16 < 4e-3,
        "f16: |Δ logprob| max {d16}, mean {m16}"
    );
    assert!(
        d8 < 0.4 && m8 < 0.12,
        "q8_0: |Δ logprob| max {d8}, mean {m8}"
    );
    assert!(
        adapter_effect > 1.0,
        "the adapter should matter: {adapter_effect}"
    );

    // The exported file is a complete model for whet: its tokenizer and chat template are the
    // source's.
    let back = Tokenizer::from_model_path(&q8).unwrap();
    for text in [
        "Hello, world! 12345",
        "  <|im_start|>user\nÉté 2024?<|im_end|>",
    ] {
        assert_eq!(
            back.encode(text, false).unwrap(),
            tok.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(
        back.chat_template().map(|t| t.source().to_string()),
        tok.chat_template().map(|t| t.source().to_string())
    );

    // From a Hugging Face directory (the merged export: safetensors and the tokenizer.json
    // whet built), with an adapter on top: the tokenizer is rebuilt from tokenizer.json as
    // llama.cpp's converter would, and the GGUF scores what the directory with the adapter does.
    let from_hf = tmp.path().join("from-hf");
    let doc = json(&ok(&[
        "adapter",
        "merge",
        "--model",
        s(&merged),
        "--adapter",
        s(&adapter),
        "--out",
        s(&from_hf),
        "--format",
        "gguf",
        "--json",
    ]));
    let file = PathBuf::from(doc["file"].as_str().unwrap());
    assert_eq!(file, from_hf.join("model-f16.gguf"));
    let built = keys(&file, "tokenizer.");
    assert_eq!(built["tokenizer.ggml.model"].as_str(), Some("gpt2"));
    assert_eq!(built["tokenizer.ggml.pre"].as_str(), Some("smollm"));
    for k in [
        "tokens",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "add_bos_token",
    ] {
        let k = format!("tokenizer.ggml.{k}");
        assert_eq!(built.get(&k), source_tok.get(&k), "{k}");
    }
    assert_eq!(
        built["tokenizer.chat_template"],
        source_tok["tokenizer.chat_template"]
    );
    let want = logprobs(&merged, Some(&adapter), &data);
    let d = max_abs_diff(&logprobs(&file, None, &data), &want);
    assert!(d < 1e-2, "from a directory, f16: max |Δ logprob| {d}");
    let e = fails(&[
        "adapter",
        "merge",
        "--model",
        s(&merged),
        "--adapter",
        s(&adapter),
        "--out",
        s(&from_hf),
        "--format",
        "gguf",
    ]);
    assert!(e.contains("already exists"), "{e}");
}

/// A model whose tokenizer llama.cpp could not use is refused before any weight is read, and
/// nothing is left behind.
#[test]
fn gguf_export_without_a_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let fixture = fixture("tiny-llama");
    let e = fails(&[
        "adapter",
        "merge",
        "--model",
        s(&fixture.join("model.gguf")),
        "--adapter",
        s(&fixture.join("adapter")),
        "--out",
        s(&out),
        "--format",
        "gguf",
    ]);
    assert!(e.contains("no tokenizer"), "{e}");
    let e = fails(&[
        "adapter",
        "merge",
        "--model",
        s(&fixture),
        "--adapter",
        s(&fixture.join("adapter")),
        "--out",
        s(&out),
        "--format",
        "gguf",
        "--gguf-type",
        "q8_0",
    ]);
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    let e = fails(&[
        "adapter",
        "merge",
        "--model",
        s(&fixture),
        "--adapter",
        s(&fixture.join("adapter")),
        "--out",
        s(&out),
        "--format",
        "onnx",
    ]);
    assert!(e.contains("expected hf, gguf"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
