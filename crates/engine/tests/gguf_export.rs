//! GGUF export: the tiny models with their adapters merged and written as f16 and q8_0 GGUF
//! come back through whet's own GGUF loader as the merged f32 model, up to the rounding of the
//! type; the file is laid out as llama.cpp's converter lays it out (checked against the
//! fixtures `tools/make_fixtures.py` wrote with gguf-py); tokenizers are built or refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use whet_engine::config::ModelConfig;
use whet_engine::gguf_export::{
    self, permute_rows, q8_0_bytes, tokenizer_metadata, write_gguf, GgufType, GgufValue,
};
use whet_engine::loader::{self, ModelSource};
use whet_engine::model::Layout;
use whet_engine::{load_adapter, load_model, merge, Model, Precision};

const MODELS: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_gguf(path: &Path) -> (Content, File) {
    let mut f = File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (c, f)
}

/// Logprobs of a few fixed sequences (packed, each from position 0) under `model`.
fn logprobs(model: &Model) -> Vec<f32> {
    let v = model.config.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = (0..3u32)
        .map(|s| (0..9 + 5 * s).map(|i| (i * 37 + s * 11 + 5) % v).collect())
        .collect();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
    let tokens: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s[..s.len() - 1].to_vec())
        .collect();
    let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
    let h = model
        .forward_hidden(&tokens, Layout::Packed(&lens), None, None)
        .unwrap();
    model
        .target_logprobs(&h, &targets)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every weight the GGUF loader reads back is the merged weight up to the type's rounding:
/// f16 to half an f16 ulp (2⁻¹¹ relative), q8_0 to half a step of its block (max|x|/254) plus
/// the f16 rounding of the block's scale (|q| ≤ 127 steps of a scale off by 2⁻¹¹ relative).
fn check_weights(
    name: &str,
    merged: &[(String, Tensor)],
    back: &loader::LoadedWeights,
    ty: GgufType,
) {
    for (hf, want) in merged {
        let got = back
            .tensors
            .get(hf)
            .unwrap_or_else(|| panic!("{name} {ty}: {hf} did not come back"));
        assert_eq!(got.dims(), want.dims(), "{name} {ty} {hf}");
        let (w, g) = (values(want), values(got));
        let row = *want.dims().last().unwrap();
        let quantized = ty == GgufType::Q8_0 && want.rank() == 2 && row % 32 == 0;
        for (bi, (wb, gb)) in w.chunks(32).zip(g.chunks(32)).enumerate() {
            let amax = wb.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in wb.iter().zip(gb) {
                let tol = match (want.rank(), quantized) {
                    (1, _) => 0.0,
                    (_, true) => amax / 254.0 + amax * 2f32.powi(-11) + 1e-7,
                    (_, false) => x.abs() * 2f32.powi(-11) + 6e-8,
                };
                assert!(
                    (x - y).abs() <= tol,
                    "{name} {ty} {hf} block {bi}: {x} came back as {y} (tolerance {tol})"
                );
            }
        }
    }
    assert_eq!(
        back.tensors.len(),
        merged.len(),
        "{name} {ty}: extra tensors"
    );
}

/// The tiny models with their PEFT adapters merged: written as GGUF, read back with whet's
/// GGUF loader, the weights and logprobs of the merged f32 model come out.
///
/// The weights are held to the types' own rounding bounds ([`check_weights`]). The logprob
/// bounds are measured, then given margin: f16 came out under 2.3e-3 and is held to 1e-2;
/// q8_0 came out under 0.11 (tiny-qwen3; the others under 0.052) and is held to 0.25. The
/// adapter alone moves these logprobs by about 2 nats (asserted over 1, 4× the q8_0 bound), so
/// an export that lost the adapter, or permuted or scaled a tensor wrongly, fails. SmolLM2's
/// bounds are in the CLI test (crates/cli/tests/gguf_export.rs).
#[test]
fn merged_tiny_models_round_trip_through_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let dir = fixtures().join(name);
        let (source, model) =
            load_model(dir.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
        let adapter = load_adapter(&model, &dir.join("adapter")).unwrap();
        let merged_dir = tmp.path().join(format!("{name}-merged"));
        merge::write_merged(&model, Some(&adapter), &source, &[], &merged_dir).unwrap();
        let (_, reference) =
            load_model(merged_dir.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
        let want = logprobs(&reference);
        let adapter_effect = max_abs_diff(&logprobs(&model), &want);
        eprintln!("{name}: max |Δ logprob| of the adapter itself = {adapter_effect:.2e}");
        assert!(adapter_effect > 1.0, "{name}: the adapter should matter");
        let merged = merge::merged_tensors(&model, Some(&adapter)).unwrap();
        for (ty, bound) in [(GgufType::F16, 1e-2), (GgufType::Q8_0, 0.25)] {
            let out = tmp.path().join(format!("{name}-{ty}.gguf"));
            // The tiny models have no tokenizer (whet's loader needs none).
            let summary = write_gguf(&model, Some(&adapter), &[], name, ty, &out).unwrap();
            assert_eq!(summary.bytes, std::fs::metadata(&out).unwrap().len());

            let (content, _) = read_gguf(&out);
            let arch = if name == "tiny-qwen2" || name == "tiny-qwen3" {
                &name[5..]
            } else {
                "llama"
            };
            let md = &content.metadata;
            assert_eq!(md["general.architecture"].to_string().unwrap(), arch);
            assert_eq!(md["general.file_type"].to_u32().unwrap(), ty.file_type());
            assert_eq!(md["general.alignment"].to_u32().unwrap(), 32);
            assert_eq!(md["general.name"].to_string().unwrap(), name);
            let c = &model.config;
            for (k, v) in [
                ("block_count", c.num_layers),
                ("embedding_length", c.hidden_size),
                ("feed_forward_length", c.intermediate_size),
                ("attention.head_count", c.num_heads),
                ("attention.head_count_kv", c.num_kv_heads),
                ("attention.key_length", c.head_dim),
                ("context_length", c.max_position_embeddings),
                ("vocab_size", c.vocab_size),
            ] {
                assert_eq!(
                    md[&format!("{arch}.{k}")].to_u32().unwrap() as usize,
                    v,
                    "{name} {k}"
                );
            }
            // Types: 1-D stays f32; matrices f16, or q8_0 where a row is a whole number of
            // blocks (the tiny MLP width, 112, is not: ffn_down falls back to f16).
            for (tname, info) in &content.tensor_infos {
                let dims = info.shape.dims();
                let expected = match (dims.len(), ty) {
                    (1, _) => GgmlDType::F32,
                    (_, GgufType::Q8_0) if dims[dims.len() - 1] % 32 == 0 => GgmlDType::Q8_0,
                    _ => GgmlDType::F16,
                };
                assert_eq!(info.ggml_dtype, expected, "{name} {ty} {tname} {dims:?}");
            }
            if ty == GgufType::Q8_0 {
                assert_eq!(
                    content.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
                    GgmlDType::F16
                );
                assert_eq!(
                    content.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
                    GgmlDType::Q8_0
                );
            }
            assert_eq!(
                content.tensor_infos.contains_key("output.weight"),
                !c.tie_word_embeddings
            );

            let back = loader::load(&ModelSource::Gguf(out.clone()), &Device::Cpu).unwrap();
            check_weights(name, &merged, &back, ty);
            let mut back_config = back.config.clone();
            assert_eq!(back_config.rope_inv_freq().len(), c.rope_inv_freq().len());
            let d = max_abs_diff(&back_config.rope_inv_freq(), &c.rope_inv_freq());
            assert!(d < 1e-6, "{name}: RoPE frequencies differ by {d}");
            back_config.architecture = c.architecture;
            back_config.rope_scaling = c.rope_scaling.clone();
            back_config.eos_token_ids = c.eos_token_ids.clone();
            // Stored as f32, as llama.cpp reads it.
            assert!((back_config.rms_norm_eps / c.rms_norm_eps - 1.0).abs() < 1e-6);
            back_config.rms_norm_eps = c.rms_norm_eps;
            assert_eq!(&back_config, c, "{name}: the config does not round-trip");

            let (_, loaded) =
                load_model(out.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
            let d = max_abs_diff(&logprobs(&loaded), &want);
            eprintln!("{name} {ty}: max |Δ logprob| vs merged f32 = {d:.2e}");
            assert!(
                d < bound,
                "{name} {ty}: max |Δ logprob| = {d} (bound {bound})"
            );
        }
    }
}

/// Exported without an adapter at f16, the tiny Llama and Qwen3 are the f32 GGUF files gguf-py
/// wrote for them the way llama.cpp's converter does (tools/make_fixtures.py), rounded to f16:
/// the same tensor names and dims, permuted q/k rows bit for bit, the same rope_freqs, and
/// every metadata key the converter wrote, with the same value.
#[test]
fn layout_matches_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-llama", "tiny-qwen3"] {
        let dir = fixtures().join(name);
        let (_, model) = load_model(dir.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
        let out = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&model, None, &[], name, GgufType::F16, &out).unwrap();
        let (ours, mut fo) = read_gguf(&out);
        let (theirs, mut ft) = read_gguf(&dir.join("model.gguf"));
        let names = |c: &Content| c.tensor_infos.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(names(&ours), names(&theirs), "{name}");
        for (t, info) in &theirs.tensor_infos {
            assert_eq!(ours.tensor_infos[t].shape, info.shape, "{name} {t}");
            let want = theirs
                .tensor(&mut ft, t, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let got = ours
                .tensor(&mut fo, t, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let want = if info.shape.rank() == 2 {
                want.to_dtype(candle_core::DType::F16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            } else {
                want
            };
            let d = max_abs_diff(&values(&got), &values(&want));
            let tol = if t == "rope_freqs.weight" { 1e-6 } else { 0.0 };
            assert!(d <= tol, "{name} {t}: differs from the converter's by {d}");
        }
        for (k, v) in &theirs.metadata {
            if k == "general.file_type" {
                continue;
            }
            let mine = ours
                .metadata
                .get(k)
                .unwrap_or_else(|| panic!("{name}: key {k} missing"));
            assert_eq!(format!("{mine:?}"), format!("{v:?}"), "{name} {k}");
        }
    }
}

#[test]
fn q8_0_is_ggml_reference_quantization() {
    // One block: d = 2.54/127 = 0.02; each value rounds to the nearest step, halves away
    // from zero; a zero block has scale 0 and zero codes.
    let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.01).collect();
    x[31] = 2.54;
    x.extend([0f32; 32]);
    let b = q8_0_bytes(&x).unwrap();
    assert_eq!(b.len(), 68);
    let d = Tensor::new(&[2.54f32 / 127.0], &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F16)
        .unwrap();
    let d_bits = candle_core::quantized::QTensor::quantize(
        &d.to_dtype(candle_core::DType::F32).unwrap(),
        GgmlDType::F16,
    )
    .unwrap()
    .data()
    .unwrap()
    .into_owned();
    assert_eq!(&b[..2], &d_bits[..]);
    let id = 127.0 / 2.54f32;
    for (i, &q) in b[2..34].iter().enumerate() {
        assert_eq!(q as i8, (x[i] * id).round() as i8, "value {i}");
    }
    assert_eq!(b[2 + 31] as i8, 127);
    assert_eq!(b[2] as i8, -(0.16f32 * id).round() as i8);
    assert!(b[34..].iter().all(|&v| v == 0));
    assert!(q8_0_bytes(&x[..33]).is_err());
}

#[test]
fn permutation_is_the_loaders_inverse() {
    // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in): with 2 heads
    // of 4 rows, rows (0 1 2 3)(4 5 6 7) become (0 2 1 3)(4 6 5 7).
    let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 1))
        .unwrap();
    let p = permute_rows(&w, 2).unwrap();
    assert_eq!(values(&p), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
}

fn tokenizer_keys(family: &str, vocab_size: usize) -> BTreeMap<String, GgufValue> {
    let dir = fixtures().join("chat/families").join(family);
    let mut config: ModelConfig =
        loader::load_config(&ModelSource::HfDir(fixtures().join("tiny-qwen2"))).unwrap();
    config.vocab_size = vocab_size;
    tokenizer_metadata(&ModelSource::HfDir(dir), &config)
        .unwrap()
        .into_iter()
        .collect()
}

fn strs(v: &GgufValue) -> Vec<String> {
    v.to_vec()
        .unwrap()
        .iter()
        .map(|x| x.to_string().unwrap().clone())
        .collect()
}

/// Hugging Face tokenizer.json → llama.cpp's keys, for Llama 3 and Qwen2.5 (the trimmed
/// tokenizers of the chat fixtures: real merges and special tokens, fewer normal tokens).
#[test]
fn tokenizers_from_tokenizer_json() {
    let k = tokenizer_keys("llama3", 128257);
    assert_eq!(k["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
    assert_eq!(k["tokenizer.ggml.pre"].to_string().unwrap(), "llama-bpe");
    let tokens = strs(&k["tokenizer.ggml.tokens"]);
    assert_eq!(tokens.len(), 128257);
    assert_eq!(tokens[128000], "<|begin_of_text|>");
    let types = k["tokenizer.ggml.token_type"].to_vec().unwrap();
    assert_eq!(
        types[128000].to_i32().unwrap(),
        3,
        "special tokens are control tokens"
    );
    assert_eq!(types[0].to_i32().unwrap(), 1);
    // The trimmed vocabulary leaves holes: `[PAD<id>]` filler entries, of type unused.
    assert_eq!(tokens[284], "[PAD284]");
    assert_eq!(types[284].to_i32().unwrap(), 5);
    assert_eq!(k["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 128000);
    assert_eq!(
        tokens[k["tokenizer.ggml.eos_token_id"].to_u32().unwrap() as usize],
        "<|eot_id|>"
    );
    // Llama 3's post-processor prepends <|begin_of_text|>.
    assert!(k["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
    assert!(k["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .contains("<|start_header_id|>"));
    let merges = strs(&k["tokenizer.ggml.merges"]);
    assert!(
        !merges.is_empty() && merges.iter().all(|m| m.split(' ').count() == 2),
        "{:?}",
        &merges[..3]
    );

    let k = tokenizer_keys("qwen2.5", 151665);
    assert_eq!(k["tokenizer.ggml.pre"].to_string().unwrap(), "qwen2");
    let tokens = strs(&k["tokenizer.ggml.tokens"]);
    assert_eq!(
        tokens[k["tokenizer.ggml.eos_token_id"].to_u32().unwrap() as usize],
        "<|im_end|>"
    );
    assert_eq!(
        tokens[k["tokenizer.ggml.padding_token_id"].to_u32().unwrap() as usize],
        "<|endoftext|>"
    );
    assert!(!k.contains_key("tokenizer.ggml.bos_token_id"));
    assert!(!k["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
    // Qwen's merges are [a, b] pairs in tokenizer.json; GGUF has "a b" strings.
    let merges = strs(&k["tokenizer.ggml.merges"]);
    assert!(
        merges.iter().all(|m| m.split(' ').count() == 2),
        "{:?}",
        &merges[..3]
    );
    let types = k["tokenizer.ggml.token_type"].to_vec().unwrap();
    let tool = tokens.iter().position(|t| t == "<tool_call>").unwrap();
    assert_eq!(
        types[tool].to_i32().unwrap(),
        4,
        "a non-special added token is user-defined"
    );
}

#[test]
fn tokenizers_that_cannot_be_written_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let config = loader::load_config(&ModelSource::HfDir(fixtures().join("tiny-qwen2"))).unwrap();
    // More tokens than embedding rows.
    let e = tokenizer_metadata(
        &ModelSource::HfDir(fixtures().join("chat/families/qwen2.5")),
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("128"), "{e}");
    // No tokenizer.json at all (the tiny fixtures), or no tokenizer in a GGUF.
    let e = tokenizer_metadata(&ModelSource::HfDir(fixtures().join("tiny-qwen2")), &config)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    let gguf = ModelSource::Gguf(fixtures().join("tiny-llama/model.gguf"));
    let e = tokenizer_metadata(&gguf, &config).unwrap_err().to_string();
    assert!(
        e.contains("model.gguf") && e.contains("no tokenizer"),
        "{e}"
    );
    // A SentencePiece-style (Unigram) tokenizer.json.
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"model": {"type": "Unigram", "vocab": []}, "pre_tokenizer": {"type": "Metaspace"}}"#,
    )
    .unwrap();
    let e = tokenizer_metadata(&ModelSource::HfDir(tmp.path().to_path_buf()), &config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Unigram") && e.contains("byte-level BPE"), "{e}");
    // An unknown pre-tokenizer regex.
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated"},
              {"type": "ByteLevel", "use_regex": false}]}}"#,
    )
    .unwrap();
    let e = tokenizer_metadata(&ModelSource::HfDir(tmp.path().to_path_buf()), &config)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pre_tokenizer") && e.contains("llama.cpp"),
        "{e}"
    );
    // And the output is never clobbered.
    let (_, model) = load_model(
        fixtures().join("tiny-qwen2").to_str().unwrap(),
        &Device::Cpu,
        Precision::F32,
    )
    .unwrap();
    let out = tmp.path().join("tokenizer.json");
    let e = write_gguf(&model, None, &[], "x", GgufType::F16, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        gguf_export::gguf_architecture(model.config.architecture),
        "qwen2"
    );
}

#[test]
fn gguf_type_parses_and_names() {
    assert_eq!("f16".parse::<GgufType>().unwrap(), GgufType::F16);
    assert_eq!("q8_0".parse::<GgufType>().unwrap().to_string(), "q8_0");
    let e = "q4_0".parse::<GgufType>().unwrap_err().to_string();
    assert!(e.contains("f16 or q8_0"), "{e}");
    assert_eq!(GgufType::F16.file_type(), 1);
    assert_eq!(GgufType::Q8_0.file_type(), 7);
}
