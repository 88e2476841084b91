//! Writing a merged model (base weights with an adapter folded in) as a GGUF v3 file that
//! llama.cpp loads: llama.cpp's metadata keys and tensor names, the tokenizer, and the weight
//! matrices in f16 or q8_0 (norms and biases stay f32, as llama.cpp's converter keeps them).
//!
//! The file is the inverse of what [`crate::loader`] reads: load it back with whet and the same
//! model comes out, up to the rounding of the chosen type.
//!
//! Traps, each handled below:
//! - GGUF lists dimensions innermost first: a `(rows, cols)` matrix is written `ne = [cols, rows]`.
//! - llama.cpp's `llama` graph rotates interleaved pairs, Hugging Face rotates two halves: the
//!   q and k rows of every head are permuted as llama.cpp's converter does (qwen2 and qwen3 use
//!   the halves layout and are not permuted).
//! - Llama 3.1's RoPE scaling is not a metadata key but a tensor, `rope_freqs.weight`.
//! - q8_0 blocks run along a row, so a matrix whose rows are not a multiple of 32 long cannot
//!   be q8_0; it is written f16 (what llama.cpp's converter falls back to as well).
//! - llama.cpp sizes the vocabulary from `tokenizer.ggml.tokens`, which must therefore have
//!   exactly one entry per embedding row (rows no token names get a `[PAD<id>]` filler
//!   entry, as llama.cpp's converter writes them).

use std::io::Write;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use whet_lora::LoraAdapter;

pub use candle_core::quantized::gguf_file::Value as GgufValue;
pub use tokenizer::tokenizer_metadata;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::loader::ModelSource;
use crate::model::Model;
use crate::EngineError;

mod tokenizer;

/// GGUF's default and whet's alignment of the tensor data (`general.alignment`).
pub const ALIGNMENT: usize = 32;
/// Values per q8_0 block.
const QK8_0: usize = 32;
/// GGML tensor types written (ggml's `ggml_type` numbers).
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;

/// How the weight matrices of an exported GGUF are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// IEEE half precision (`general.file_type` 1).
    F16,
    /// 8-bit blocks of 32 values with one f16 scale each (`general.file_type` 7); matrices
    /// whose rows are not a multiple of 32 long are written f16.
    Q8_0,
}

impl GgufType {
    /// llama.cpp's `llama_ftype` for a file mostly of this type (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }
}

impl std::str::FromStr for GgufType {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, EngineError> {
        match s {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(EngineError::Invalid {
                field: "gguf type".into(),
                message: format!("{other:?}: expected f16 or q8_0"),
            }),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        })
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    /// Tensors written, with their GGML type (0 f32, 1 f16, 8 q8_0) and GGUF dims
    /// (innermost first).
    pub tensors: Vec<(String, u32, Vec<usize>)>,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// llama.cpp's architecture name for a family (Mistral is a Llama to llama.cpp).
pub fn gguf_architecture(a: Architecture) -> &'static str {
    match a {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

/// A string value.
pub(crate) fn s(v: &str) -> GgufValue {
    GgufValue::String(v.to_string())
}

/// An I/O error naming the file.
pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The general and `<arch>.*` hyperparameter keys of `c`.
fn model_metadata(c: &ModelConfig, name: &str, ty: GgufType) -> Vec<(String, GgufValue)> {
    let arch = gguf_architecture(c.architecture);
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut kv = vec![
        ("general.architecture".to_string(), s(arch)),
        ("general.type".to_string(), s("model")),
        ("general.name".to_string(), s(name)),
        (
            "general.file_type".to_string(),
            GgufValue::U32(ty.file_type()),
        ),
        (
            "general.quantization_version".to_string(),
            GgufValue::U32(2),
        ),
        ("general.alignment".to_string(), u(ALIGNMENT)),
    ];
    let hyper = [
        ("context_length", u(c.max_position_embeddings)),
        ("embedding_length", u(c.hidden_size)),
        ("block_count", u(c.num_layers)),
        ("feed_forward_length", u(c.intermediate_size)),
        ("attention.head_count", u(c.num_heads)),
        ("attention.head_count_kv", u(c.num_kv_heads)),
        ("attention.key_length", u(c.head_dim)),
        ("attention.value_length", u(c.head_dim)),
        (
            "attention.layer_norm_rms_epsilon",
            GgufValue::F32(c.rms_norm_eps as f32),
        ),
        ("rope.freq_base", GgufValue::F32(c.rope_theta as f32)),
        ("rope.dimension_count", u(c.head_dim)),
        ("vocab_size", u(c.vocab_size)),
    ];
    kv.extend(hyper.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        kv.push((format!("{arch}.rope.scaling.type"), s("linear")));
        kv.push((
            format!("{arch}.rope.scaling.factor"),
            GgufValue::F32(factor as f32),
        ));
    }
    if let Some(w) = c.sliding_window {
        // Read back by whet. llama.cpp's `llama` graph does not read it and attends to the
        // whole context, which differs only for sequences longer than the window.
        if w < c.max_position_embeddings {
            tracing::warn!(
                "the model attends over a sliding window of {w} tokens, which llama.cpp's \
                 llama graph ignores: sequences longer than that score differently there"
            );
        }
        kv.push((format!("{arch}.attention.sliding_window"), u(w)));
    }
    kv
}

/// Llama 3.1's RoPE scaling as llama.cpp's per-frequency divisors (`rope_freqs.weight`),
/// computed as its converter does; `None` when the model needs none.
fn rope_freqs(c: &ModelConfig) -> Result<Option<Vec<f32>>, EngineError> {
    let factors = match &c.rope_scaling {
        RopeScaling::Default | RopeScaling::Linear { .. } => return Ok(None),
        RopeScaling::FreqFactors { factors } => factors.clone(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position_embeddings: old,
        } => {
            let d = c.head_dim;
            (0..d / 2)
                .map(|i| {
                    let f = 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / d as f32);
                    let wavelen = 2.0 * std::f64::consts::PI / f64::from(f);
                    if wavelen < old / hi {
                        1.0
                    } else if wavelen > old / lo {
                        *factor as f32
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                })
                .collect()
        }
    };
    if gguf_architecture(c.architecture) != "llama" {
        // llama.cpp's qwen2/qwen3 graphs have no rope_freqs tensor; writing one would make
        // the file unloadable there.
        return Err(EngineError::Unsupported(format!(
            "{:?} with {:?} RoPE scaling cannot be written as GGUF",
            c.architecture, c.rope_scaling
        )));
    }
    Ok(Some(factors))
}

/// The Hugging Face name of a merged tensor → llama.cpp's name (the loader's mapping
/// inverted).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's converter's row permutation for `llama` q/k projections: each head's rows
/// `(half, i)` become `(i, half)`, turning Hugging Face's two-halves RoPE layout into the
/// interleaved pairs llama.cpp rotates. The inverse of the loader's `unpermute_rows`.
pub fn permute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor, EngineError> {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    let hd = dims.first().copied().unwrap_or(0) / n_heads.max(1);
    Ok(t.reshape((n_heads, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// One tensor to write: its GGUF name, type, dims (innermost first) and values (row-major).
struct Planned {
    name: String,
    ggml: u32,
    ne: Vec<usize>,
    t: Tensor,
}

impl Planned {
    fn bytes(&self) -> usize {
        let n: usize = self.ne.iter().product();
        match self.ggml {
            GGML_F32 => 4 * n,
            GGML_F16 => 2 * n,
            _ => n / QK8_0 * (2 + QK8_0),
        }
    }

    /// The tensor's data as the file stores it.
    fn encode(&self) -> Result<Vec<u8>, EngineError> {
        let values: Vec<f32> = self.t.flatten_all()?.to_vec1()?;
        let at = |i: usize| EngineError::Invalid {
            field: format!("tensor {}", self.name),
            message: format!(
                "value {} at index {i} cannot be stored as {}",
                values[i],
                if self.ggml == GGML_F32 { "f32" } else { "f16" }
            ),
        };
        match self.ggml {
            GGML_F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            GGML_F16 => {
                // f16 tops out at 65504: a larger weight would silently become infinity.
                if let Some(i) = values
                    .iter()
                    .position(|v| !v.is_finite() || v.abs() > 65504.0)
                {
                    return Err(at(i));
                }
                f16_bytes(&values)
            }
            _ => {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(at(i));
                }
                Ok(q8_0_bytes(&values)?)
            }
        }
    }
}

/// f32 → IEEE half, round to nearest even (candle's conversion; little-endian bytes).
fn f16_bytes(values: &[f32]) -> Result<Vec<u8>, EngineError> {
    let t = Tensor::from_slice(values, values.len(), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, GgmlDType::F16)?.data()?.into_owned())
}

/// ggml's reference q8_0 (`quantize_row_q8_0_ref`): per block of 32, `d = max|x| / 127` stored
/// as f16, and `q = round(x · (1/d))` with the unrounded f32 `d` (halves away from zero, as C's
/// `roundf`). `values.len()` must be a multiple of 32.
pub fn q8_0_bytes(values: &[f32]) -> Result<Vec<u8>, EngineError> {
    if !values.len().is_multiple_of(QK8_0) {
        return Err(EngineError::Internal(format!(
            "q8_0 needs a multiple of {QK8_0} values, got {}",
            values.len()
        )));
    }
    let blocks: Vec<&[f32]> = values.chunks(QK8_0).collect();
    let scales: Vec<f32> = blocks
        .iter()
        .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0)
        .collect();
    let d16 = f16_bytes(&scales)?;
    let mut out = Vec::with_capacity(blocks.len() * (2 + QK8_0));
    for (k, (block, &d)) in blocks.iter().zip(&scales).enumerate() {
        out.extend_from_slice(&d16[2 * k..2 * k + 2]);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // |x·id| ≤ 127 up to rounding; the cast saturates, so nothing wraps.
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
    Ok(out)
}

fn plan(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    ty: GgufType,
) -> Result<Vec<Planned>, EngineError> {
    let c = &model.config;
    let permuted = gguf_architecture(c.architecture) == "llama";
    let mut out = Vec::new();
    if let Some(f) = rope_freqs(c)? {
        let n = f.len();
        out.push(Planned {
            name: "rope_freqs.weight".into(),
            ggml: GGML_F32,
            ne: vec![n],
            t: Tensor::from_vec(f, n, &Device::Cpu)?,
        });
    }
    for (hf, t) in crate::merge::merged_tensors(model, adapter)? {
        let name = gguf_name(&hf)
            .ok_or_else(|| EngineError::Internal(format!("no GGUF name for merged tensor {hf}")))?;
        let t = match (permuted, name.as_str()) {
            (true, n) if n.contains(".attn_q.") => permute_rows(&t, c.num_heads)?,
            (true, n) if n.contains(".attn_k.") => permute_rows(&t, c.num_kv_heads)?,
            _ => t,
        };
        let ne: Vec<usize> = t.dims().iter().rev().copied().collect();
        let ggml = match (ne.len(), ty) {
            (1, _) => GGML_F32,
            (_, GgufType::Q8_0) if ne[0].is_multiple_of(QK8_0) => GGML_Q8_0,
            _ => GGML_F16,
        };
        out.push(Planned { name, ggml, ne, t });
    }
    Ok(out)
}

fn put_str(buf: &mut Vec<u8>, v: &str) {
    buf.extend((v.len() as u64).to_le_bytes());
    buf.extend(v.as_bytes());
}

/// GGUF's value type number.
fn value_type(v: &GgufValue) -> u32 {
    use GgufValue as V;
    match v {
        V::U8(_) => 0,
        V::I8(_) => 1,
        V::U16(_) => 2,
        V::I16(_) => 3,
        V::U32(_) => 4,
        V::I32(_) => 5,
        V::F32(_) => 6,
        V::Bool(_) => 7,
        V::String(_) => 8,
        V::Array(_) => 9,
        V::U64(_) => 10,
        V::I64(_) => 11,
        V::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<(), EngineError> {
    use GgufValue as V;
    match v {
        V::U8(x) => buf.push(*x),
        V::I8(x) => buf.extend(x.to_le_bytes()),
        V::U16(x) => buf.extend(x.to_le_bytes()),
        V::I16(x) => buf.extend(x.to_le_bytes()),
        V::U32(x) => buf.extend(x.to_le_bytes()),
        V::I32(x) => buf.extend(x.to_le_bytes()),
        V::F32(x) => buf.extend(x.to_le_bytes()),
        V::Bool(x) => buf.push(u8::from(*x)),
        V::String(x) => put_str(buf, x),
        V::U64(x) => buf.extend(x.to_le_bytes()),
        V::I64(x) => buf.extend(x.to_le_bytes()),
        V::F64(x) => buf.extend(x.to_le_bytes()),
        V::Array(a) => {
            // An empty array's element type is lost on reading; string is what llama.cpp
            // expects of every array key it reads but token_type and scores.
            let t = a.first().map_or(8, value_type);
            if a.iter().any(|e| value_type(e) != t) {
                return Err(EngineError::Invalid {
                    field: format!("metadata {key}"),
                    message: "array elements of different types".into(),
                });
            }
            buf.extend(t.to_le_bytes());
            buf.extend((a.len() as u64).to_le_bytes());
            for e in a {
                put_value(buf, key, e)?;
            }
        }
    }
    Ok(())
}

fn pad_to(len: usize) -> usize {
    len.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes `model` with `adapter` merged in to the GGUF file `out` (which must not exist), with
/// the given `tokenizer.*` keys (see [`tokenizer_metadata`]; llama.cpp needs them, whet's
/// loader does not) and `general.name = name`. Written to a temp file and renamed: all or
/// nothing.
pub fn write_gguf(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    tokenizer: &[(String, GgufValue)],
    name: &str,
    ty: GgufType,
    out: &Path,
) -> Result<GgufSummary, EngineError> {
    if out.exists() {
        return Err(io_err(out, "already exists; choose a new output file"));
    }
    let tensors = plan(model, adapter, ty)?;
    let mut kv = model_metadata(&model.config, name, ty);
    kv.extend(tokenizer.iter().cloned());
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in &kv {
        put_str(&mut header, k);
        header.extend(value_type(v).to_le_bytes());
        put_value(&mut header, k, v)?;
    }
    // Tensor offsets are relative to the (aligned) start of the data, each one aligned.
    let mut offset = 0usize;
    for t in &tensors {
        put_str(&mut header, &t.name);
        header.extend((t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend(t.ggml.to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset += pad_to(t.bytes());
    }
    header.resize(pad_to(header.len()), 0);

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = out
        .file_name()
        .map_or_else(|| "model.gguf".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<u64, EngineError> {
        let file = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        let wr = |w: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| {
            w.write_all(b).map_err(|e| io_err(&tmp, e))
        };
        wr(&mut w, &header)?;
        let mut written = header.len();
        for t in &tensors {
            let data = t.encode()?;
            if data.len() != t.bytes() {
                return Err(EngineError::Internal(format!(
                    "tensor {}: encoded {} bytes, planned {}",
                    t.name,
                    data.len(),
                    t.bytes()
                )));
            }
            wr(&mut w, &data)?;
            wr(&mut w, &vec![0u8; pad_to(data.len()) - data.len()])?;
            written += pad_to(data.len());
        }
        let file = w.into_inner().map_err(|e| io_err(&tmp, e.error()))?;
        file.sync_all().map_err(|e| io_err(&tmp, e))?;
        Ok(written as u64)
    })();
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
    Ok(GgufSummary {
        tensors: tensors
            .into_iter()
            .map(|t| (t.name, t.ggml, t.ne))
            .collect(),
        bytes,
    })
}

/// [`tokenizer_metadata`] of `source` then [`write_gguf`]: the GGUF export of a merged model.
pub fn export_gguf(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    source: &ModelSource,
    name: &str,
    ty: GgufType,
    out: &Path,
) -> Result<GgufSummary, EngineError> {
    let tokenizer = tokenizer_metadata(source, &model.config)?;
    write_gguf(model, adapter, &tokenizer, name, ty, out)
}
