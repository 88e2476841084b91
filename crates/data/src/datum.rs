//! Tinker datums from JSONL files, checked against the contract before any training sees them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use whet_contract::{Datum, ModelInputChunk, TensorData, TensorDtype, TensorValues};

use crate::error::{DataError, Result};

/// The per-token loss inputs whose length must equal the number of input tokens.
const PER_TOKEN_INPUTS: [&str; 3] = ["weights", "logprobs", "advantages"];

/// Reads Tinker datums, one JSON object per line (blank lines skipped); errors name file:line and the field (serde_json path); also validates per datum: exactly one int64 target_tokens per input token, weights/logprobs/advantages lengths equal too.
pub fn read_datums_jsonl(path: &Path) -> Result<Vec<Datum>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut datums = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?
            == 0
        {
            break;
        }
        line_no += 1;
        // Decoded per line (not with `lines()`), so that bad UTF-8 is reported with its line.
        let text = std::str::from_utf8(&buf).map_err(|e| DataError::Json {
            location: format!("{}:{line_no}", path.display()),
            field: ".".into(),
            message: format!("not UTF-8: {e}"),
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let datum: Datum = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // A syntax error has no field: serde_path_to_error says `?`; we say the line.
            let field = match e.path().to_string() {
                p if p == "?" => ".".to_string(),
                p => p,
            };
            DataError::Json {
                location: format!("{}:{line_no}", path.display()),
                field,
                message: e.into_inner().to_string(),
            }
        })?;
        validate_datum(&datum).map_err(|(field, message)| DataError::InvalidDatum {
            path: path.display().to_string(),
            line: line_no,
            field,
            message,
        })?;
        datums.push(datum);
    }
    Ok(datums)
}

/// Checks one datum; on failure returns `(field, message)`.
pub(crate) fn validate_datum(d: &Datum) -> std::result::Result<(), (String, String)> {
    for (c, chunk) in d.model_input.chunks.iter().enumerate() {
        let ModelInputChunk::EncodedText { tokens } = chunk;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t < 0) {
            return Err((
                format!("model_input.chunks[{c}].tokens[{i}]"),
                format!("token id {t} is negative"),
            ));
        }
    }
    let n = d.model_input.length();
    if n == 0 {
        return Err(("model_input".into(), "has no tokens".into()));
    }
    let field = |name: &str| format!("loss_fn_inputs.{name}");
    let targets = d.loss_fn_inputs.get("target_tokens").ok_or_else(|| {
        (
            field("target_tokens"),
            format!("missing: one target token per input token ({n}) is required"),
        )
    })?;
    if targets.dtype() != TensorDtype::Int64 {
        return Err((field("target_tokens"), "dtype must be int64".into()));
    }
    check_len(targets, n, &field("target_tokens"))?;
    if let TensorValues::Int64(v) = &targets.data {
        if let Some((i, t)) = v.iter().enumerate().find(|(_, t)| **t < 0) {
            return Err((
                format!("loss_fn_inputs.target_tokens.data[{i}]"),
                format!("token id {t} is negative"),
            ));
        }
    }
    for name in PER_TOKEN_INPUTS {
        let Some(t) = d.loss_fn_inputs.get(name) else {
            continue;
        };
        check_len(t, n, &field(name))?;
        if let TensorValues::Float32(v) = &t.data {
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err((
                    format!("loss_fn_inputs.{name}.data[{i}]"),
                    format!("value {x} is not a finite number"),
                ));
            }
        }
    }
    Ok(())
}

fn check_len(t: &TensorData, n: usize, field: &str) -> std::result::Result<(), (String, String)> {
    if let Some(shape) = &t.shape {
        if shape.len() != 1 {
            return Err((
                field.to_string(),
                format!("shape {shape:?} must be one-dimensional ([{n}])"),
            ));
        }
    }
    if t.len() != n {
        return Err((
            field.to_string(),
            format!(
                "has {} values but model_input has {n} tokens (position i predicts target i)",
                t.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const GOOD: &str = r#"{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, {"type": "encoded_text", "tokens": [3]}]}, "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"}, "weights": {"data": [0, 1, 1], "dtype": "float32", "shape": [3]}}}"#;

    #[test]
    fn reads_datums_and_skips_blank_lines() {
        let f = file(&format!("{GOOD}\n\n   \n{GOOD}\r\n"));
        let d = read_datums_jsonl(f.path()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].model_input.to_ints(), vec![1, 2, 3]);
        assert_eq!(
            d[0].loss_fn_inputs["weights"].to_f32_vec(),
            vec![0.0, 1.0, 1.0]
        );
        assert!(read_datums_jsonl(file("").path()).unwrap().is_empty());
        // No newline at the end of the last line.
        assert_eq!(read_datums_jsonl(file(GOOD).path()).unwrap().len(), 1);
    }

    fn err(text: &str) -> String {
        let f = file(text);
        let e = read_datums_jsonl(f.path()).unwrap_err().to_string();
        let name = f.path().display().to_string();
        assert!(e.starts_with(&name), "{e}");
        e[name.len()..].to_string()
    }

    #[test]
    fn parse_errors_name_line_and_field() {
        let bad = GOOD.replace("[0, 1, 1]", r#"[0, "x", 1]"#);
        let e = err(&format!("{GOOD}\n{bad}\n"));
        assert!(e.starts_with(":2: field `loss_fn_inputs.weights"), "{e}");
        let e = err(&GOOD.replace(
            "encoded_text\", \"tokens\": [3]",
            "image\", \"data\": \"x\"",
        ));
        assert!(e.starts_with(":1: field `model_input.chunks"), "{e}");
        let f = file("\n\n");
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend(b"\n\xff\n");
        std::fs::write(f.path(), bytes).unwrap();
        let e = read_datums_jsonl(f.path()).unwrap_err().to_string();
        assert!(e.contains(":2: field `.`: not UTF-8"), "{e}");
        let e = err("{not json\n");
        assert!(e.starts_with(":1: field `.`"), "{e}");
        let e = err(&GOOD.replace("\"weights\"", "\"weights\": 1, \"x\""));
        assert!(e.starts_with(":1: field `loss_fn_inputs.weights`"), "{e}");
    }

    #[test]
    fn contract_violations_name_the_field() {
        let cases = [
            (
                GOOD.replace("[2, 3, 4]", "[2, 3]"),
                "datum field `loss_fn_inputs.target_tokens`: has 2 values but model_input has 3",
            ),
            (
                GOOD.replace(
                    r#""target_tokens": {"data": [2, 3, 4], "dtype": "int64"}, "#,
                    "",
                ),
                "`loss_fn_inputs.target_tokens`: missing",
            ),
            (
                GOOD.replace(
                    r#"[2, 3, 4], "dtype": "int64""#,
                    r#"[2, 3, 4], "dtype": "float32""#,
                ),
                "must be int64",
            ),
            (
                GOOD.replace(r#""shape": [3]"#, r#""shape": [3, 1]"#),
                "one-dimensional",
            ),
            (
                GOOD.replace("[0, 1, 1]", "[0, 1]")
                    .replace(r#", "shape": [3]"#, ""),
                "`loss_fn_inputs.weights`: has 2 values",
            ),
            (
                GOOD.replace("[2, 3, 4]", "[2, -3, 4]"),
                "`loss_fn_inputs.target_tokens.data[1]`: token id -3",
            ),
            (
                GOOD.replace("[1, 2]", "[1, -2]"),
                "`model_input.chunks[0].tokens[1]`",
            ),
            (
                r#"{"model_input": {"chunks": []}, "loss_fn_inputs": {}}"#.to_string(),
                "`model_input`: has no tokens",
            ),
        ];
        for (text, want) in cases {
            let e = err(&format!("\n{text}"));
            assert!(e.starts_with(":2: "), "{e}");
            assert!(e.contains(want), "{e} does not contain {want}");
        }
        let adv = GOOD.replace(
            "\"weights\"",
            r#""advantages": {"data": [1, 2, 3, 4], "dtype": "float32"}, "weights""#,
        );
        assert!(err(&adv).contains("`loss_fn_inputs.advantages`: has 4 values"));
    }
}
