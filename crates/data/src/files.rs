//! Reading dataset files: `.jsonl` (one row per line), `.json` (an array of rows) and `.csv`
//! (one row per record; `messages` and `tools` columns hold JSON text), each row with its line
//! so that every error names file, line and field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::rows::{parse_row, Format, Row};

/// Reads every row of a `.jsonl`, `.json` or `.csv` file, each with its 1-based line (or, for
/// `.json`, array index + 1; for `.csv`, record number + 1 counting the header). The first
/// malformed row stops the read with an error naming file, line and field.
pub fn read_rows(path: &Path, format: Format) -> Result<Vec<(usize, Row)>> {
    scan_rows(path, format)?
        .into_iter()
        .map(|(line, row)| row.map(|r| (line, r)))
        .collect()
}

/// Every row of a file with its line, malformed ones as errors naming file, line and field —
/// for reporting them all at once. The outer error is the file's own (unreadable, not a JSON
/// array, an unknown extension).
pub fn scan_rows(path: &Path, format: Format) -> Result<Vec<(usize, Result<Row>)>> {
    Ok(read_values(path)?
        .into_iter()
        .map(|(line, v)| {
            let row = v.and_then(|v| {
                parse_row(&v, format).map_err(|e| DataError::Json {
                    location: format!("{}:{line}", path.display()),
                    field: e.field,
                    message: e.message,
                })
            });
            (line, row)
        })
        .collect())
}

/// Every row of a `.jsonl`, `.json` or `.csv` file as JSON, with its line, before any reading
/// of its fields (RL recipes see the row as it is). Rows that are not JSON are errors naming
/// file and line; the outer error is the file's own.
pub fn read_values(path: &Path) -> Result<Vec<(usize, Result<Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let at = |line: usize, field: String, message: String| DataError::Json {
        location: format!("{}:{line}", path.display()),
        field,
        message,
    };
    Ok(match ext.as_str() {
        "jsonl" | "ndjson" => text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let v = serde_json::from_str(line)
                    .map_err(|e| at(i + 1, ".".into(), format!("not JSON: {e}")));
                (i + 1, v)
            })
            .collect(),
        "json" => match serde_json::from_str(&text) {
            Ok(Value::Array(rows)) => rows
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, Ok(v)))
                .collect(),
            Ok(_) => return Err(DataError::json(path, ".", "expected a JSON array of rows")),
            Err(e) => return Err(DataError::json(path, ".", format!("not JSON: {e}"))),
        },
        "csv" => csv_rows(path, &text)?,
        other => {
            return Err(DataError::Unsupported {
                path: path.display().to_string(),
                key: "extension".into(),
                value: other.into(),
                message: "datasets are .jsonl, .json or .csv files".into(),
            })
        }
    })
}

/// CSV records as JSON objects of strings; `messages` and `tools` columns are JSON text.
fn csv_rows(path: &Path, text: &str) -> Result<Vec<(usize, Result<Value>)>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| DataError::json(path, ".", format!("CSV header: {e}")))?
        .clone();
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let at = |field: &str, message: String| DataError::Json {
            location: format!("{}:{line}", path.display()),
            field: field.into(),
            message,
        };
        let row = record
            .map_err(|e| at(".", format!("CSV: {e}")))
            .and_then(|record| {
                let mut obj = Map::new();
                for (name, cell) in headers.iter().zip(record.iter()) {
                    let value = if name == "messages" || name == "tools" {
                        serde_json::from_str(cell)
                            .map_err(|e| at(name, format!("a {name} cell must hold JSON: {e}")))?
                    } else {
                        Value::String(cell.to_string())
                    };
                    obj.insert(name.to_string(), value);
                }
                Ok(Value::Object(obj))
            });
        out.push((line, row));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_report_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(
            &jsonl,
            "{\"prompt\": \"a\", \"answer\": \"b\"}\n\n{\"prompt\": \"c\"}\n",
        )
        .unwrap();
        let e = read_rows(&jsonl, Format::Auto).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl:3") && e.contains("expected_output"),
            "{e}"
        );
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "question,answer\n\"2+2, exactly?\",4\nx,y\n").unwrap();
        let rows = read_rows(&csv, Format::Auto).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].0, 3);
        let Row::Chat(c) = rows[0].1.clone() else {
            panic!("expected a chat")
        };
        assert_eq!(c.messages[0]["content"], "2+2, exactly?");
        let json = dir.path().join("d.json");
        std::fs::write(&json, r#"[{"messages": [{"role": "user"}]}]"#).unwrap();
        let e = read_rows(&json, Format::Auto).unwrap_err().to_string();
        assert!(
            e.contains("d.json:1") && e.contains("messages[0].content"),
            "{e}"
        );
        // scan_rows reports every malformed row, not only the first.
        std::fs::write(
            &jsonl,
            "{\"prompt\": 1}\nnot json\n{\"prompt\": \"a\", \"answer\": \"b\"}\n",
        )
        .unwrap();
        let scanned = scan_rows(&jsonl, Format::Auto).unwrap();
        let bad: Vec<usize> = scanned
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(l, _)| *l)
            .collect();
        assert_eq!(bad, vec![1, 2]);
        let txt = dir.path().join("d.txt");
        std::fs::write(&txt, "").unwrap();
        assert!(read_rows(&txt, Format::Auto)
            .unwrap_err()
            .to_string()
            .contains("txt"));
    }
}
