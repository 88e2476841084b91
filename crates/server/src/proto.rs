//! The protobuf half of the protocol: `ForwardBackwardRequest` in, `ForwardBackwardOutput` and
//! `SampleResponse` out, converted to and from the contract's types.
//!
//! Byte conventions (the SDK's numpy `.tobytes()`): token ids in text chunks are int32
//! little-endian, `loss_fn_inputs` are int64 or float32 little-endian, dense or sparse CSR (a 2-D
//! tensor whose unlisted cells are 0). Output fields are batched: the datums' arrays
//! concatenated, with `num_datums + 1` int64 *byte* offsets.

#[allow(missing_docs, clippy::all)]
pub(crate) mod generated {
    include!("proto/tinker_public.rs");
}

use std::collections::BTreeMap;

use prost::Message;
use whet_contract::{
    Datum, ForwardBackwardOutput, LossFnConfig, ModelInput, SampleResponse, StopReason, TensorData,
    TensorValues,
};

pub use generated::ForwardBackwardRequest;
use generated::{chunk, loss_config_value, tensor, DType};

use crate::error::ApiError;

fn le_chunks<const N: usize>(bytes: &[u8], field: &str) -> Result<Vec<[u8; N]>, ApiError> {
    if !bytes.len().is_multiple_of(N) {
        return Err(ApiError::bad(
            field,
            format!(
                "{} bytes is not a whole number of {N}-byte values",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| c.try_into().unwrap_or([0; N]))
        .collect())
}

fn i32s(bytes: &[u8], field: &str) -> Result<Vec<i64>, ApiError> {
    Ok(le_chunks::<4>(bytes, field)?
        .into_iter()
        .map(|b| i32::from_le_bytes(b) as i64)
        .collect())
}

fn i64s(bytes: &[u8], field: &str) -> Result<Vec<i64>, ApiError> {
    Ok(le_chunks::<8>(bytes, field)?
        .into_iter()
        .map(i64::from_le_bytes)
        .collect())
}

fn f32s(bytes: &[u8], field: &str) -> Result<Vec<f32>, ApiError> {
    Ok(le_chunks::<4>(bytes, field)?
        .into_iter()
        .map(f32::from_le_bytes)
        .collect())
}

/// A wire tensor as the contract's [`TensorData`] (sparse CSR made dense, pad 0).
fn tensor_data(t: &generated::Tensor, field: &str) -> Result<TensorData, ApiError> {
    let dtype = DType::try_from(t.dtype).unwrap_or(DType::DtypeUnspecified);
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| ApiError::bad(field, format!("shape {d} < 0"))))
        .collect::<Result<_, _>>()?;
    let values = |bytes: &[u8], f: &str| -> Result<TensorValues, ApiError> {
        match dtype {
            DType::DtypeInt64 => Ok(TensorValues::Int64(i64s(bytes, f)?)),
            DType::DtypeInt32 => Ok(TensorValues::Int64(i32s(bytes, f)?)),
            DType::DtypeFloat32 => Ok(TensorValues::Float32(f32s(bytes, f)?)),
            other => Err(ApiError::bad(
                field,
                format!("dtype {other:?} (expected int64 or float32)"),
            )),
        }
    };
    let data = match &t.encoding {
        Some(tensor::Encoding::Dense(bytes)) => values(bytes, field)?,
        Some(tensor::Encoding::SparseCsr(csr)) => {
            let [rows, cols] = shape[..] else {
                return Err(ApiError::bad(
                    field,
                    format!("a sparse tensor must be 2-D, its shape is {shape:?}"),
                ));
            };
            let crow = i64s(&csr.crow_indices, &format!("{field}.crow_indices"))?;
            let col = i64s(&csr.col_indices, &format!("{field}.col_indices"))?;
            let vals = values(&csr.values, &format!("{field}.values"))?;
            let nnz = match &vals {
                TensorValues::Int64(v) => v.len(),
                TensorValues::Float32(v) => v.len(),
            };
            let ok = crow.len() == rows + 1
                && col.len() == nnz
                && crow.first() == Some(&0)
                && crow.last() == Some(&(nnz as i64))
                && crow.windows(2).all(|w| w[0] <= w[1])
                && col.iter().all(|&c| c >= 0 && (c as usize) < cols);
            if !ok {
                return Err(ApiError::bad(field, "inconsistent sparse CSR indices"));
            }
            let cell = |k: usize| -> usize {
                let row = crow.partition_point(|&p| p as usize <= k) - 1;
                row * cols + col[k] as usize
            };
            match vals {
                TensorValues::Int64(v) => {
                    let mut dense = vec![0i64; rows * cols];
                    for (k, x) in v.into_iter().enumerate() {
                        dense[cell(k)] = x;
                    }
                    TensorValues::Int64(dense)
                }
                TensorValues::Float32(v) => {
                    let mut dense = vec![0f32; rows * cols];
                    for (k, x) in v.into_iter().enumerate() {
                        dense[cell(k)] = x;
                    }
                    TensorValues::Float32(dense)
                }
            }
        }
        None => values(&[], field)?,
    };
    let n = match &data {
        TensorValues::Int64(v) => v.len(),
        TensorValues::Float32(v) => v.len(),
    };
    if !shape.is_empty() && shape.iter().product::<usize>() != n {
        return Err(ApiError::bad(
            field,
            format!("shape {shape:?} does not hold {n} values"),
        ));
    }
    Ok(TensorData {
        data,
        shape: (!shape.is_empty()).then_some(shape),
    })
}

/// A decoded `forward_backward` request.
pub struct TrainRequest {
    /// `{session}:train:{n}`.
    pub model_id: String,
    /// The model's sequence number of this request.
    pub seq_id: i64,
    /// The datums.
    pub data: Vec<Datum>,
    /// The loss's wire name.
    pub loss_fn: String,
    /// Numeric config (`loss_fn_config_v2` when set, else the legacy map).
    pub loss_fn_config: LossFnConfig,
    /// `forward` (no gradients) rather than `forward_backward`.
    pub forward_only: bool,
}

/// Decodes a `ForwardBackwardRequest` body (already decompressed).
pub fn decode_train_request(body: &[u8]) -> Result<TrainRequest, ApiError> {
    let req = ForwardBackwardRequest::decode(body).map_err(|e| {
        ApiError::bad(
            "body",
            format!("not a ForwardBackwardRequest protobuf message: {e}"),
        )
    })?;
    let mut data = Vec::with_capacity(req.data.len());
    for (i, d) in req.data.iter().enumerate() {
        let mut tokens = Vec::new();
        for (j, c) in d.model_input.iter().enumerate() {
            let field = format!("data[{i}].model_input.chunks[{j}]");
            match &c.chunk {
                Some(chunk::Chunk::EncodedText(t)) => tokens.extend(i32s(&t.tokens, &field)?),
                Some(chunk::Chunk::Image(_)) => {
                    return Err(ApiError::bad(
                        &field,
                        "image chunks are not supported (whet serves text-only models)",
                    ))
                }
                Some(chunk::Chunk::Dmel(_)) => {
                    return Err(ApiError::bad(
                        &field,
                        "audio (dmel) chunks are not supported (whet serves text-only models)",
                    ))
                }
                None => return Err(ApiError::bad(&field, "empty chunk")),
            }
        }
        if !d.model_input_spans.is_empty() || !d.loss_fn_input_spans.is_empty() {
            return Err(ApiError::bad(
                &format!("data[{i}].model_input_spans"),
                "provenance spans (stable_reinforce) are not supported; use importance_sampling, ppo, cispo or dro",
            ));
        }
        let mut inputs = BTreeMap::new();
        for (name, t) in &d.loss_fn_inputs {
            let field = format!("data[{i}].loss_fn_inputs.{name}");
            inputs.insert(name.clone(), tensor_data(t, &field)?);
        }
        data.push(Datum {
            model_input: ModelInput::from_ints(tokens),
            loss_fn_inputs: inputs,
        });
    }
    let mut config = LossFnConfig::new();
    if req.loss_fn_config_v2.is_empty() {
        config.extend(req.loss_fn_config.iter().map(|(k, v)| (k.clone(), *v)));
    } else {
        for (k, v) in &req.loss_fn_config_v2 {
            match &v.value {
                Some(loss_config_value::Value::Number(x)) => {
                    config.insert(k.clone(), *x);
                }
                Some(loss_config_value::Value::Text(t)) => {
                    return Err(ApiError::bad(
                        &format!("loss_fn_config.{k}"),
                        format!("text value {t:?}: whet's losses take numbers only"),
                    ))
                }
                None => {}
            }
        }
    }
    Ok(TrainRequest {
        model_id: req.model_id,
        seq_id: req.seq_id as i64,
        data,
        loss_fn: req.loss_fn,
        loss_fn_config: config,
        forward_only: req.forward_only,
    })
}

fn batched(arrays: &[&TensorData]) -> generated::BatchedTensor {
    let mut data = Vec::new();
    let mut offsets = vec![0u8; 8];
    let all_int = arrays
        .iter()
        .all(|t| matches!(t.data, TensorValues::Int64(_)));
    for t in arrays {
        match (&t.data, all_int) {
            (TensorValues::Int64(v), true) => v.iter().for_each(|x| data.extend(x.to_le_bytes())),
            _ => t
                .to_f32_vec()
                .iter()
                .for_each(|x| data.extend(x.to_le_bytes())),
        }
        offsets.extend((data.len() as i64).to_le_bytes());
    }
    // Per-datum arrays are 1-D (one value per target position); higher ranks keep their
    // trailing dims.
    let trailing_shape = arrays
        .first()
        .and_then(|t| t.shape.as_ref())
        .filter(|s| s.len() > 1)
        .map(|s| s[1..].iter().map(|&d| d as i64).collect())
        .unwrap_or_default();
    generated::BatchedTensor {
        data,
        offsets,
        dtype: if all_int {
            DType::DtypeInt64
        } else {
            DType::DtypeFloat32
        } as i32,
        trailing_shape,
    }
}

/// Encodes the result of one `forward` / `forward_backward` request.
pub fn encode_train_output(out: &ForwardBackwardOutput) -> Vec<u8> {
    let names: std::collections::BTreeSet<&String> =
        out.loss_fn_outputs.iter().flat_map(|o| o.keys()).collect();
    let mut fields = std::collections::HashMap::new();
    for name in names {
        // A field every datum has (logprobs always; others when the loss gives them).
        let arrays: Option<Vec<&TensorData>> =
            out.loss_fn_outputs.iter().map(|o| o.get(name)).collect();
        if let Some(arrays) = arrays {
            fields.insert(name.clone(), batched(&arrays));
        }
    }
    let record = generated::ArrayRecord {
        type_tag: "ArrayRecord".into(),
        fields,
        num_datums: out.loss_fn_outputs.len() as i64,
    };
    generated::ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: vec![record],
        metrics: out.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
    .encode_to_vec()
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn i32_bytes(values: impl IntoIterator<Item = i64>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|t| (t as i32).to_le_bytes())
        .collect()
}

/// Encodes the result of one `asample` request; `topk` is the k the request asked for.
pub fn encode_sample_response(r: &SampleResponse, topk: usize) -> Vec<u8> {
    let sequences = r
        .sequences
        .iter()
        .map(|s| generated::SampledSequence {
            stop_reason: match s.stop_reason {
                StopReason::Stop => generated::StopReason::Stop,
                StopReason::Length => generated::StopReason::Length,
            } as i32,
            tokens: i32_bytes(s.tokens.iter().copied()),
            logprobs: Some(f32_bytes(s.logprobs.iter().copied())),
            topk_sampled_logprobs: None,
        })
        .collect();
    // The SDK reads NaN as "not computed" (position 0).
    let prompt_logprobs = r
        .prompt_logprobs
        .as_ref()
        .map(|lp| f32_bytes(lp.iter().map(|x| x.unwrap_or(f32::NAN))));
    let topk_prompt_logprobs = r
        .topk_prompt_logprobs
        .as_ref()
        .filter(|_| topk > 0)
        .map(|rows| {
            // Dense N x K; empty cells (position 0, or fewer than k candidates) are (0, -99999).
            let mut ids = Vec::with_capacity(rows.len() * topk);
            let mut lps = Vec::with_capacity(rows.len() * topk);
            for row in rows {
                let row = row.as_deref().unwrap_or(&[]);
                for j in 0..topk {
                    let (t, lp) = row.get(j).copied().unwrap_or((0, -99999.0));
                    ids.push(t);
                    lps.push(lp);
                }
            }
            generated::TopkLogprobs {
                token_ids: i32_bytes(ids),
                logprobs: f32_bytes(lps),
                k: topk as u32,
                length: rows.len() as u32,
            }
        });
    generated::SampleResponse {
        sequences,
        prompt_logprobs,
        topk_prompt_logprobs,
        prompt_cache_hit_tokens: 0,
        target_prompt_logprobs: None,
        prompt_alt_tokens: None,
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_f32(v: &[f32]) -> generated::Tensor {
        generated::Tensor {
            encoding: Some(tensor::Encoding::Dense(f32_bytes(v.iter().copied()))),
            dtype: DType::DtypeFloat32 as i32,
            shape: vec![v.len() as i64],
        }
    }

    #[test]
    fn requests_decode_with_dense_and_sparse_tensors() {
        let csr = generated::Tensor {
            encoding: Some(tensor::Encoding::SparseCsr(generated::SparseCsr {
                values: f32_bytes([1.0, 2.0]),
                crow_indices: [0i64, 1, 2].iter().flat_map(|x| x.to_le_bytes()).collect(),
                col_indices: [1i64, 0].iter().flat_map(|x| x.to_le_bytes()).collect(),
            })),
            dtype: DType::DtypeFloat32 as i32,
            shape: vec![2, 2],
        };
        let datum = generated::Datum {
            model_input: vec![generated::Chunk {
                chunk: Some(chunk::Chunk::EncodedText(generated::EncodedTextChunk {
                    tokens: i32_bytes([5, 6]),
                })),
            }],
            loss_fn_inputs: [
                ("weights".to_string(), dense_f32(&[0.0, 1.0])),
                ("advantages".to_string(), csr),
            ]
            .into(),
            ..Default::default()
        };
        let body = ForwardBackwardRequest {
            model_id: "s:train:0".into(),
            seq_id: 3,
            data: vec![datum],
            loss_fn: "ppo".into(),
            loss_fn_config: [("clip_low_threshold".to_string(), 0.5)].into(),
            forward_only: true,
            loss_fn_config_v2: Default::default(),
        }
        .encode_to_vec();
        let r = decode_train_request(&body).unwrap();
        assert_eq!(
            (r.model_id.as_str(), r.seq_id, r.forward_only),
            ("s:train:0", 3, true)
        );
        assert_eq!(r.data[0].model_input.to_ints(), vec![5, 6]);
        assert_eq!(
            r.data[0].loss_fn_inputs["weights"].to_f32_vec(),
            vec![0.0, 1.0]
        );
        assert_eq!(
            r.data[0].loss_fn_inputs["advantages"].to_f32_vec(),
            vec![0.0, 1.0, 2.0, 0.0]
        );
        assert_eq!(r.loss_fn_config["clip_low_threshold"], 0.5);
        let err = decode_train_request(b"\xff\xff\xff").err().unwrap();
        assert_eq!(err.status, 400);
        assert!(
            err.message.contains("ForwardBackwardRequest"),
            "{}",
            err.message
        );
    }

    #[test]
    fn outputs_batch_the_datums_arrays_with_byte_offsets() {
        let out = ForwardBackwardOutput {
            loss_fn_output_type: "ArrayRecord".into(),
            loss_fn_outputs: vec![
                [(
                    "logprobs".to_string(),
                    TensorData::from_f32(vec![-1.0, -2.0]),
                )]
                .into(),
                [("logprobs".to_string(), TensorData::from_f32(vec![-3.0]))].into(),
            ],
            metrics: [("loss:sum".to_string(), 6.0)].into(),
        };
        let bytes = encode_train_output(&out);
        let back = generated::ForwardBackwardOutput::decode(bytes.as_slice()).unwrap();
        let rec = &back.loss_fn_outputs[0];
        assert_eq!(rec.num_datums, 2);
        let lp = &rec.fields["logprobs"];
        assert_eq!(i64s(&lp.offsets, "o").unwrap(), vec![0, 8, 12]);
        assert_eq!(f32s(&lp.data, "d").unwrap(), vec![-1.0, -2.0, -3.0]);
        assert_eq!(back.metrics["loss:sum"], 6.0);
    }
}

#[cfg(test)]
mod schema_tests {
    use sha2::{Digest, Sha256};

    /// The committed Rust code was generated from the committed schema: editing the .proto
    /// without `tools/gen-proto.sh` fails here.
    #[test]
    fn generated_code_matches_the_schema() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let proto = std::fs::read(dir.join("proto/tinker_public.proto")).unwrap();
        let hex: String = Sha256::digest(&proto)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let generated = std::fs::read_to_string(dir.join("src/proto/tinker_public.rs")).unwrap();
        assert!(
            generated.contains(&format!("// proto sha256: {hex}")),
            "src/proto/tinker_public.rs is stale: run tools/gen-proto.sh"
        );
    }
}
