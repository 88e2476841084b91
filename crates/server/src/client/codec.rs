//! The client's half of the protobuf messages: datums out, outputs and samples in — the
//! mirror of [`crate::proto`], with the same byte conventions.

use std::collections::BTreeMap;

use prost::Message;
use whet_contract::{
    ContractError, Datum, ForwardBackwardOutput, LossFnConfig, SampleResponse, SampledSequence,
    StopReason, TensorData, TensorValues,
};

use crate::proto::generated::{self as pb, chunk, tensor, DType};

fn bad(message: impl Into<String>) -> ContractError {
    ContractError::Internal(format!(
        "the server's answer is malformed: {}",
        message.into()
    ))
}

fn tensor_pb(t: &TensorData) -> pb::Tensor {
    let (dtype, dense) = match &t.data {
        TensorValues::Int64(v) => (
            DType::DtypeInt64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorValues::Float32(v) => (
            DType::DtypeFloat32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    };
    let shape = t
        .shape
        .clone()
        .unwrap_or_else(|| vec![t.len()])
        .into_iter()
        .map(|d| d as i64)
        .collect();
    pb::Tensor {
        encoding: Some(tensor::Encoding::Dense(dense)),
        dtype: dtype as i32,
        shape,
    }
}

/// Encodes a `forward_backward` request (`forward_only` for `forward`).
pub fn encode_train_request(
    model_id: &str,
    seq_id: i64,
    data: &[Datum],
    loss_fn: &str,
    config: &LossFnConfig,
    forward_only: bool,
) -> Vec<u8> {
    let data = data
        .iter()
        .map(|d| pb::Datum {
            model_input: vec![pb::Chunk {
                chunk: Some(chunk::Chunk::EncodedText(pb::EncodedTextChunk {
                    tokens: d
                        .model_input
                        .to_ints()
                        .iter()
                        .flat_map(|&t| (t as i32).to_le_bytes())
                        .collect(),
                })),
            }],
            loss_fn_inputs: d
                .loss_fn_inputs
                .iter()
                .map(|(k, v)| (k.clone(), tensor_pb(v)))
                .collect(),
            ..Default::default()
        })
        .collect();
    pb::ForwardBackwardRequest {
        model_id: model_id.to_string(),
        seq_id: seq_id as i32,
        data,
        loss_fn: loss_fn.to_string(),
        loss_fn_config: config.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        forward_only,
        loss_fn_config_v2: config
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::LossConfigValue {
                        value: Some(pb::loss_config_value::Value::Number(*v)),
                    },
                )
            })
            .collect(),
    }
    .encode_to_vec()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn i32s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
        .collect()
}

/// Decodes a `ForwardBackwardOutput`: each record's batched fields split back into datums.
pub fn decode_train_output(bytes: &[u8]) -> Result<ForwardBackwardOutput, ContractError> {
    let out = pb::ForwardBackwardOutput::decode(bytes).map_err(|e| bad(e.to_string()))?;
    let mut per_datum: Vec<BTreeMap<String, TensorData>> = Vec::new();
    for record in &out.loss_fn_outputs {
        let n = record.num_datums.max(0) as usize;
        let first = per_datum.len();
        per_datum.resize(first + n, BTreeMap::new());
        for (name, field) in &record.fields {
            let offsets: Vec<usize> = field
                .offsets
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
                .collect();
            if offsets.len() != n + 1 || offsets.last() != Some(&field.data.len()) {
                return Err(bad(format!("field {name}: offsets do not cover its data")));
            }
            for i in 0..n {
                let slice = field
                    .data
                    .get(offsets[i]..offsets[i + 1])
                    .ok_or_else(|| bad(format!("field {name}: offsets out of order")))?;
                let values = match DType::try_from(field.dtype) {
                    Ok(DType::DtypeInt64) => TensorValues::Int64(
                        slice
                            .chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                            .collect(),
                    ),
                    Ok(DType::DtypeInt32) => TensorValues::Int64(i32s(slice)),
                    Ok(DType::DtypeFloat32) => TensorValues::Float32(f32s(slice)),
                    other => return Err(bad(format!("field {name}: dtype {other:?}"))),
                };
                let len = match &values {
                    TensorValues::Int64(v) => v.len(),
                    TensorValues::Float32(v) => v.len(),
                };
                let trailing: Vec<usize> =
                    field.trailing_shape.iter().map(|&d| d as usize).collect();
                let inner: usize = trailing.iter().product::<usize>().max(1);
                let mut shape = vec![len / inner];
                shape.extend(trailing);
                per_datum[first + i].insert(
                    name.clone(),
                    TensorData {
                        data: values,
                        shape: Some(shape),
                    },
                );
            }
        }
    }
    Ok(ForwardBackwardOutput {
        loss_fn_output_type: out
            .loss_fn_output_type
            .rsplit(':')
            .next()
            .unwrap_or("ArrayRecord")
            .to_string(),
        loss_fn_outputs: per_datum,
        metrics: out.metrics.into_iter().collect(),
    })
}

/// Decodes a `SampleResponse` (NaN prompt logprobs read as "not computed").
pub fn decode_sample_response(bytes: &[u8]) -> Result<SampleResponse, ContractError> {
    let r = pb::SampleResponse::decode(bytes).map_err(|e| bad(e.to_string()))?;
    let sequences = r
        .sequences
        .iter()
        .map(|s| SampledSequence {
            stop_reason: if s.stop_reason == pb::StopReason::Length as i32 {
                StopReason::Length
            } else {
                StopReason::Stop
            },
            tokens: i32s(&s.tokens),
            logprobs: s.logprobs.as_deref().map(f32s).unwrap_or_default(),
        })
        .collect();
    let prompt_logprobs = r.prompt_logprobs.as_deref().map(|b| {
        f32s(b)
            .into_iter()
            .map(|x| (!x.is_nan()).then_some(x))
            .collect()
    });
    let topk_prompt_logprobs = r.topk_prompt_logprobs.as_ref().map(|t| {
        let (ids, lps, k) = (i32s(&t.token_ids), f32s(&t.logprobs), t.k as usize);
        (0..t.length as usize)
            .map(|i| {
                let row: Vec<(i64, f32)> = (0..k)
                    .filter_map(|j| {
                        let (id, lp) = (*ids.get(i * k + j)?, *lps.get(i * k + j)?);
                        (lp > -99999.0).then_some((id, lp))
                    })
                    .collect();
                (!row.is_empty()).then_some(row)
            })
            .collect()
    });
    Ok(SampleResponse {
        sequences,
        prompt_logprobs,
        topk_prompt_logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_outputs_round_trip_through_the_server_codec() {
        let datum = Datum {
            model_input: whet_contract::ModelInput::from_ints(vec![3, 4, 5]),
            loss_fn_inputs: [
                (
                    "target_tokens".to_string(),
                    TensorData::from_i64(vec![4, 5, 6]),
                ),
                (
                    "weights".to_string(),
                    TensorData::from_f32(vec![0.0, 1.0, 0.5]),
                ),
            ]
            .into(),
        };
        let config: LossFnConfig = [("beta".to_string(), 0.1)].into();
        let bytes = encode_train_request(
            "s:train:0",
            7,
            std::slice::from_ref(&datum),
            "dro",
            &config,
            false,
        );
        let req = crate::proto::decode_train_request(&bytes).unwrap();
        assert_eq!((req.seq_id, req.loss_fn.as_str()), (7, "dro"));
        assert_eq!(req.data[0].model_input.to_ints(), vec![3, 4, 5]);
        assert_eq!(req.data[0].loss_fn_inputs, datum.loss_fn_inputs);
        assert_eq!(req.loss_fn_config, config);

        let out = ForwardBackwardOutput {
            loss_fn_output_type: "ArrayRecord".into(),
            loss_fn_outputs: vec![
                [(
                    "logprobs".to_string(),
                    TensorData::from_f32(vec![-1.0, -2.5]),
                )]
                .into(),
                [("logprobs".to_string(), TensorData::from_f32(vec![-0.5]))].into(),
            ],
            metrics: [("loss:sum".to_string(), 4.0)].into(),
        };
        let back = decode_train_output(&crate::proto::encode_train_output(&out)).unwrap();
        assert_eq!(back, out);

        let sample = SampleResponse {
            sequences: vec![SampledSequence {
                stop_reason: StopReason::Length,
                tokens: vec![9, 8],
                logprobs: vec![-0.25, -1.5],
            }],
            prompt_logprobs: Some(vec![None, Some(-2.0)]),
            topk_prompt_logprobs: Some(vec![None, Some(vec![(3, -0.5), (4, -1.0)])]),
        };
        let back =
            decode_sample_response(&crate::proto::encode_sample_response(&sample, 2)).unwrap();
        assert_eq!(back, sample);
    }
}
