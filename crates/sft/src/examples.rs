//! Rows to training examples: conversations rendered with the model's chat template (loss on
//! the tokens `train_on` picks), datums as given; every row checked before any compute.

use std::collections::BTreeMap;
use std::path::Path;

use whet_contract::{Datum, ModelInput, TensorData};
use whet_data::{render_conversation, Overflow, Row, Scaffold, Tokenizer, TrainOn};

use crate::SftError;

/// One training sequence.
#[derive(Debug, Clone)]
pub struct Example {
    /// Position `i` of the input predicts `target_tokens[i]`, weighted by `weights[i]`.
    pub datum: Datum,
    /// Chat rows: the loss is the mean over the batch's trained tokens, so the weights are
    /// divided by the batch's total at each step. Datums keep their weights as given.
    pub normalize: bool,
    /// Σ weights (the trained tokens of a chat row).
    pub weight_sum: f64,
}

impl Example {
    /// Tokens the model reads.
    pub fn tokens(&self) -> usize {
        self.datum.model_input.length()
    }

    /// Target tokens with a positive weight (all of them when the datum has no weights).
    pub fn trained_tokens(&self) -> usize {
        self.datum
            .loss_fn_inputs
            .get("weights")
            .map(|w| w.to_f32_vec().iter().filter(|&&x| x > 0.0).count())
            .unwrap_or(self.tokens())
    }
}

/// How rows become examples.
#[derive(Debug, Clone)]
pub struct Rendering<'a> {
    /// The capability's system prompt and tools.
    pub scaffold: Scaffold<'a>,
    /// Which messages are trained.
    pub train_on: TrainOn,
    /// Longest sequence (tokens) a row may render to.
    pub max_length: usize,
    /// What to do with longer rows.
    pub overflow: Overflow,
}

/// What became of the rows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Prepared {
    /// Rows dropped for length (`file:line`).
    pub dropped: Vec<String>,
    /// Rows truncated to the maximum length (`file:line`).
    pub truncated: Vec<String>,
    /// Tokens of the kept rows.
    pub tokens: usize,
    /// Trained tokens of the kept rows.
    pub trained_tokens: usize,
}

/// What became of one row.
#[derive(Debug, Clone)]
pub enum RowOutcome {
    /// Kept, cut to the maximum length when `truncated`.
    Kept {
        /// The example.
        example: Example,
        /// It was longer than the maximum length and cut.
        truncated: bool,
    },
    /// Longer than the maximum length and left out (`overflow = "drop"`).
    Dropped,
}

/// One row as training takes it (what `whet data validate` reports and `prepare` trains on):
/// rendered (conversations need the tokenizer; datums do not), held to the maximum length,
/// refused when it trains on nothing. Errors name `at` (`file:line`).
pub fn prepare_row(
    row: &Row,
    at: &str,
    tokenizer: Option<&Tokenizer>,
    r: &Rendering<'_>,
) -> Result<RowOutcome, SftError> {
    let row_err = |message: String| SftError::Row {
        location: at.to_string(),
        message,
    };
    let (mut datum, normalize) = match row {
        Row::Datum(d) => (d.clone(), false),
        Row::Chat(conv) => {
            let tokenizer = tokenizer.ok_or_else(|| {
                row_err("a conversation needs the model's tokenizer to render".into())
            })?;
            let rendered = render_conversation(tokenizer, conv, &r.scaffold, r.train_on)
                .map_err(|e| row_err(e.to_string()))?;
            let n = rendered.tokens.len();
            if n < 2 {
                return Err(row_err("renders to fewer than 2 tokens".into()));
            }
            let ints: Vec<i64> = rendered.tokens.iter().map(|&t| t as i64).collect();
            let datum = Datum {
                model_input: ModelInput::from_ints(ints[..n - 1].to_vec()),
                loss_fn_inputs: [
                    (
                        "target_tokens".to_string(),
                        TensorData::from_i64(ints[1..].to_vec()),
                    ),
                    (
                        "weights".to_string(),
                        TensorData::from_f32(rendered.weights[1..].to_vec()),
                    ),
                ]
                .into_iter()
                .collect(),
            };
            (datum, true)
        }
    };
    let truncated = datum.model_input.length() > r.max_length;
    if truncated {
        match r.overflow {
            Overflow::Drop => return Ok(RowOutcome::Dropped),
            Overflow::Truncate => datum = truncate(&datum, r.max_length),
        }
    }
    let weight_sum: f64 = datum
        .loss_fn_inputs
        .get("weights")
        .map(|w| w.to_f32_vec().iter().map(|&x| x as f64).sum())
        .unwrap_or(datum.model_input.length() as f64);
    if weight_sum <= 0.0 {
        return Err(SftError::NothingTrained {
            location: at.to_string(),
        });
    }
    Ok(RowOutcome::Kept {
        example: Example {
            datum,
            normalize,
            weight_sum,
        },
        truncated,
    })
}

/// Turns rows (with their line numbers in `file`) into examples, row by row as
/// [`prepare_row`]. A row that fails to render or trains on nothing is an error naming
/// `file:line` — a dataset never trains silently on less than it says.
pub fn prepare(
    rows: &[(usize, Row)],
    file: &Path,
    tokenizer: Option<&Tokenizer>,
    r: &Rendering<'_>,
) -> Result<(Vec<Example>, Prepared), SftError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut report = Prepared::default();
    for (line, row) in rows {
        let at = format!("{}:{line}", file.display());
        match prepare_row(row, &at, tokenizer, r)? {
            RowOutcome::Dropped => report.dropped.push(at),
            RowOutcome::Kept { example, truncated } => {
                if truncated {
                    report.truncated.push(at);
                }
                report.tokens += example.tokens();
                report.trained_tokens += example.trained_tokens();
                out.push(example);
            }
        }
    }
    Ok((out, report))
}

/// The first `len` positions of a datum (inputs and every per-position loss input).
fn truncate(d: &Datum, len: usize) -> Datum {
    let ints = d.model_input.to_ints();
    let mut inputs = BTreeMap::new();
    for (k, t) in &d.loss_fn_inputs {
        let cut = match t.to_i64_vec() {
            Ok(v) if k == "target_tokens" => TensorData::from_i64(v[..len.min(v.len())].to_vec()),
            _ => {
                let v = t.to_f32_vec();
                TensorData::from_f32(v[..len.min(v.len())].to_vec())
            }
        };
        inputs.insert(k.clone(), cut);
    }
    Datum {
        model_input: ModelInput::from_ints(ints[..len.min(ints.len())].to_vec()),
        loss_fn_inputs: inputs,
    }
}

/// Copies of `batch` with the chat rows' weights divided by their total, so the summed loss
/// is the mean over the batch's trained tokens; datums unchanged.
pub fn normalized(batch: &[&Example]) -> Vec<Datum> {
    let total: f64 = batch
        .iter()
        .filter(|e| e.normalize)
        .map(|e| e.weight_sum)
        .sum();
    batch
        .iter()
        .map(|e| {
            let mut d = e.datum.clone();
            if e.normalize && total > 0.0 {
                if let Some(w) = d.loss_fn_inputs.get_mut("weights") {
                    let scaled = w
                        .to_f32_vec()
                        .iter()
                        .map(|&x| (x as f64 / total) as f32)
                        .collect();
                    *w = TensorData::from_f32(scaled);
                }
            }
            d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(weights: Vec<f32>, normalize: bool) -> Example {
        let n = weights.len();
        Example {
            weight_sum: weights.iter().map(|&w| w as f64).sum(),
            datum: Datum {
                model_input: ModelInput::from_ints(vec![1; n]),
                loss_fn_inputs: [
                    (
                        "target_tokens".to_string(),
                        TensorData::from_i64(vec![2; n]),
                    ),
                    ("weights".to_string(), TensorData::from_f32(weights)),
                ]
                .into_iter()
                .collect(),
            },
            normalize,
        }
    }

    #[test]
    fn chat_weights_become_a_mean_over_the_batch_whatever_its_shape() {
        // A batch however formed (a token budget's rows of unequal lengths, or a lone long
        // row): the chat rows' weights sum to 1 over the whole batch; datums stay as given.
        let (a, b) = (
            example(vec![0.0, 1.0, 1.0], true),
            example(vec![1.0; 7], true),
        );
        let d = example(vec![0.5, 0.5], false);
        let weights = |batch: &[&Example]| -> Vec<Vec<f32>> {
            normalized(batch)
                .iter()
                .map(|d| d.loss_fn_inputs["weights"].to_f32_vec())
                .collect()
        };
        let w = weights(&[&a, &b, &d]);
        let chat: f32 = w[..2].iter().flatten().sum();
        assert!((chat - 1.0).abs() < 1e-6, "{chat}");
        assert_eq!(w[0][0], 0.0);
        assert!((w[0][1] - 1.0 / 9.0).abs() < 1e-7);
        assert_eq!(w[2], vec![0.5, 0.5]);
        let alone = weights(&[&b]);
        assert!((alone[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
