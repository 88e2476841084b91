//! The dataset registry: `whet datasets push PATH` turns a file, or a directory with an optional
//! `dataset.yaml`, into an immutable `name@version` whose files are sha256-pinned blobs.
//!
//! Every row of every file is parsed at push time, so a published version is known to be
//! well-formed; a job reads the files back from the home (hard links to the blobs, checked
//! against their sha256 before use), never from where they were pushed.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use whet_data::{Format, Row};

use crate::home::{sha256_bytes, sha256_file, Home};
use crate::store::{Pushed, Store};
use crate::{check_name, check_version, JobError};

/// Registry kind of datasets.
const KIND: &str = "dataset";

/// `dataset.yaml`: the platform's dataset card. Every field is optional; unknown ones are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetCard {
    /// The dataset's name (`^[a-z0-9][a-z0-9-]*$`).
    pub name: Option<String>,
    /// Its semver version.
    pub version: Option<String>,
    /// One line.
    pub summary: Option<String>,
    /// Longer text.
    pub description: Option<String>,
    /// The rows' kind (default: detected per row).
    pub format: Option<Format>,
    /// Column → type, as documentation.
    pub data_schema: Option<BTreeMap<String, String>>,
    /// Expected number of rows over all splits (checked when given).
    pub row_count: Option<usize>,
    /// Split → file (relative to the directory).
    pub splits: Option<BTreeMap<String, String>>,
    /// Files of the dataset (default: those of the splits).
    pub files: Option<Vec<String>>,
}

/// What to push.
#[derive(Debug, Clone, Default)]
pub struct PushRequest {
    /// A data file, or a directory with data files and an optional `dataset.yaml`.
    pub path: PathBuf,
    /// Overrides the card's name (default: the card's, else the file or directory name).
    pub name: Option<String>,
    /// Overrides the card's version (default: the card's, else the next patch version).
    pub version: Option<String>,
    /// Overrides the card's format.
    pub format: Option<Format>,
}

/// A dataset split resolved for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// `name@version`.
    pub reference: String,
    /// The split used.
    pub split: String,
    /// The file in the home, checked against its sha256.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// The dataset's declared format.
    pub format: Format,
}

const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "ndjson", "json", "csv"];

fn is_data_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DATA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A name made from a file or directory name: lowercase, other characters as `-`.
fn name_from(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("dataset");
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches('-').to_string();
    if name.is_empty() {
        name = "dataset".into();
    }
    name
}

/// The card and split files of a push: a file is the `train` split; a directory's splits come
/// from its `dataset.yaml`, else from its data files' names.
fn layout(path: &Path) -> Result<(DatasetCard, PathBuf, BTreeMap<String, String>), JobError> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(|| JobError::Invalid(format!("{}: not a file name", path.display())))?;
        let splits = BTreeMap::from([("train".to_string(), file.to_string())]);
        let card = DatasetCard {
            name: Some(name_from(path)),
            ..DatasetCard::default()
        };
        return Ok((card, dir, splits));
    }
    if !path.is_dir() {
        return Err(JobError::Invalid(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let card_path = path.join("dataset.yaml");
    let mut card = if card_path.is_file() {
        let text = std::fs::read_to_string(&card_path).map_err(|e| JobError::io(&card_path, e))?;
        serde_saphyr::from_str::<DatasetCard>(&text)
            .map_err(|e| JobError::Invalid(format!("{}: {e}", card_path.display())))?
    } else {
        DatasetCard::default()
    };
    if card.name.is_none() {
        card.name = Some(name_from(path));
    }
    let splits = match card.splits.clone() {
        Some(s) if s.is_empty() => {
            return Err(JobError::Invalid(format!(
                "{}: splits: empty",
                card_path.display()
            )))
        }
        Some(s) => s,
        None => {
            let mut s = BTreeMap::new();
            let entries = std::fs::read_dir(path).map_err(|e| JobError::io(path, e))?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() && is_data_file(&p) {
                    let file = e.file_name().to_string_lossy().to_string();
                    s.insert(name_from(&p), file);
                }
            }
            if s.is_empty() {
                return Err(JobError::Invalid(format!(
                    "{}: no .jsonl, .json or .csv files",
                    path.display()
                )));
            }
            if s.len() == 1 {
                let only = s.into_values().next().unwrap_or_default();
                s = BTreeMap::from([("train".to_string(), only)]);
            }
            s
        }
    };
    for (split, file) in &splits {
        let rel = Path::new(file);
        let escapes = rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes {
            return Err(JobError::Invalid(format!(
                "{}: splits.{split} = {file:?}: must be a path inside the directory",
                card_path.display()
            )));
        }
    }
    Ok((card, path.to_path_buf(), splits))
}

/// Parses every row of a file; all malformed rows are reported together (up to 20 shown).
fn check_rows(path: &Path, format: Format) -> Result<Value, JobError> {
    let rows = whet_data::scan_rows(path, format)?;
    let mut errors = Vec::new();
    let (mut chats, mut datums) = (0usize, 0usize);
    for (_, row) in &rows {
        match row {
            Ok(Row::Chat(_)) => chats += 1,
            Ok(Row::Datum(_)) => datums += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        let shown: Vec<&str> = errors.iter().take(20).map(String::as_str).collect();
        let more = errors.len().saturating_sub(shown.len());
        return Err(JobError::Invalid(format!(
            "{} malformed row(s); nothing was published:\n  {}{}",
            errors.len(),
            shown.join("\n  "),
            if more > 0 {
                format!("\n  … and {more} more")
            } else {
                String::new()
            }
        )));
    }
    if rows.is_empty() {
        return Err(JobError::Invalid(format!("{}: no rows", path.display())));
    }
    Ok(json!({"rows": rows.len(), "chat_rows": chats, "datum_rows": datums}))
}

/// The highest published version of `name`, if any.
fn latest(store: &Store, name: &str) -> Result<Option<semver::Version>, JobError> {
    Ok(store
        .registry_list(KIND, Some(name))?
        .iter()
        .filter_map(|d| d["version"].as_str()?.parse::<semver::Version>().ok())
        .max())
}

/// Publishes a dataset version. Returns its document and whether it was new.
pub fn push(
    home: &Home,
    store: &mut Store,
    req: &PushRequest,
) -> Result<(Value, Pushed), JobError> {
    let (card, dir, splits) = layout(&req.path)?;
    let name = req.name.clone().or(card.name.clone()).unwrap_or_default();
    check_name("dataset name", &name)?;
    let format = req.format.or(card.format).unwrap_or(Format::Auto);
    // Blobs and per-split checks first: the version is decided by the content.
    let mut split_docs = BTreeMap::new();
    let mut total_rows = 0;
    for (split, file) in &splits {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(JobError::Invalid(format!(
                "splits.{split}: {}: no such file",
                path.display()
            )));
        }
        let counts = check_rows(&path, format)?;
        total_rows += counts["rows"].as_u64().unwrap_or(0) as usize;
        let (sha, bytes) = home.put_blob(&path)?;
        let mut doc = json!({"path": file, "sha256": sha, "bytes": bytes});
        if let (Some(d), Some(c)) = (doc.as_object_mut(), counts.as_object()) {
            d.extend(c.clone());
        }
        split_docs.insert(split.clone(), doc);
    }
    if let Some(expected) = card.row_count {
        if expected != total_rows {
            return Err(JobError::Invalid(format!(
                "{}: row_count is {expected} but the splits hold {total_rows} rows",
                dir.join("dataset.yaml").display()
            )));
        }
    }
    // The digest covers what a job reads: the format and each split's bytes.
    let content = json!({"format": format, "splits": split_docs.iter()
        .map(|(s, d)| (s.clone(), d["sha256"].clone())).collect::<BTreeMap<_, _>>()});
    let digest = sha256_bytes(content.to_string().as_bytes());
    let version = match req.version.clone().or(card.version.clone()) {
        Some(v) => v,
        None => {
            let same = store
                .registry_list(KIND, Some(&name))?
                .into_iter()
                .find(|d| d["digest"] == digest.as_str());
            match (same, latest(store, &name)?) {
                (Some(d), _) => d["version"].as_str().unwrap_or("1.0.0").to_string(),
                (None, Some(v)) => semver::Version::new(v.major, v.minor, v.patch + 1).to_string(),
                (None, None) => "1.0.0".to_string(),
            }
        }
    };
    check_version("dataset version", &version)?;
    let document = json!({
        "name": name,
        "version": version,
        "digest": digest,
        "summary": card.summary,
        "description": card.description,
        "format": format,
        "data_schema": card.data_schema,
        "row_count": total_rows,
        "splits": split_docs,
        "created_at": crate::now_rfc3339(),
    });
    let pushed = store.push(
        KIND,
        &name,
        &version,
        &digest,
        &document,
        &crate::now_rfc3339(),
    )?;
    let document = store
        .registry_get(KIND, &name, &version)?
        .unwrap_or(document);
    materialize(home, &document)?;
    Ok((document, pushed))
}

/// Publishes a plain file a job names, pinned by its hash: `<stem>@0.0.0+<sha256[..12]>`.
pub fn pin_file(
    home: &Home,
    store: &mut Store,
    path: &Path,
    format: Format,
) -> Result<String, JobError> {
    let sha = sha256_file(path)?;
    // The same bytes read as another format are another dataset: the format is in the version.
    let version = match format {
        Format::Auto => format!("0.0.0+{}", &sha[..12]),
        f => format!(
            "0.0.0+{}.{}",
            &sha[..12],
            serde_json::to_value(f)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("")
                .replace('_', "-")
        ),
    };
    let req = PushRequest {
        path: path.to_path_buf(),
        name: None,
        version: Some(version),
        format: Some(format),
    };
    let (doc, _) = push(home, store, &req)?;
    Ok(format!(
        "{}@{}",
        doc["name"].as_str().unwrap_or_default(),
        doc["version"].as_str().unwrap_or_default()
    ))
}

/// Makes `datasets/<name>/<version>/<file>` exist (hard links to the blobs, else copies).
fn materialize(home: &Home, doc: &Value) -> Result<(), JobError> {
    let dir = home.dataset_dir(
        doc["name"].as_str().unwrap_or_default(),
        doc["version"].as_str().unwrap_or_default(),
    );
    for split in doc["splits"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        let (Some(file), Some(sha)) = (split["path"].as_str(), split["sha256"].as_str()) else {
            continue;
        };
        let dest = dir.join(file);
        if dest.is_file() && sha256_file(&dest)? == sha {
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| JobError::io(parent, e))?;
        }
        let blob = home.verify_blob(sha)?;
        let _ = std::fs::remove_file(&dest);
        if std::fs::hard_link(&blob, &dest).is_err() {
            std::fs::copy(&blob, &dest).map_err(|e| JobError::io(&dest, e))?;
        }
    }
    Ok(())
}

/// Splits `name@version[:split]`.
pub fn parse_ref(reference: &str) -> Option<(&str, &str, Option<&str>)> {
    let (name, rest) = reference.split_once('@')?;
    let (version, split) = match rest.split_once(':') {
        Some((v, s)) => (v, Some(s)),
        None => (rest, None),
    };
    Some((name, version, split))
}

/// The document of a published dataset `name@version`.
pub fn get(store: &Store, name: &str, version: &str) -> Result<Value, JobError> {
    store.registry_require(KIND, name, version, "whet datasets push PATH")
}

/// Every published dataset version.
pub fn list(store: &Store) -> Result<Vec<Value>, JobError> {
    store.registry_list(KIND, None)
}

/// Resolves `name@version[:split]` (default split `train`, or the only one) to its checked file.
pub fn resolve(home: &Home, store: &Store, reference: &str) -> Result<Resolved, JobError> {
    let (name, version, split) = parse_ref(reference).ok_or_else(|| {
        JobError::Invalid(format!("{reference:?}: expected name@version[:split]"))
    })?;
    let doc = get(store, name, version)?;
    let splits = doc["splits"].as_object().cloned().unwrap_or_default();
    let split = match split {
        Some(s) => s.to_string(),
        None if splits.len() == 1 => splits.keys().next().cloned().unwrap_or_default(),
        None => "train".to_string(),
    };
    let entry = splits.get(&split).ok_or_else(|| {
        JobError::NotFound(format!(
            "dataset {name}@{version} has no split {split:?} (it has: {})",
            splits.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    materialize(home, &doc)?;
    let file = entry["path"].as_str().unwrap_or_default();
    let path = home.dataset_dir(name, version).join(file);
    let sha256 = entry["sha256"].as_str().unwrap_or_default().to_string();
    if sha256_file(&path)? != sha256 {
        return Err(JobError::Invalid(format!(
            "{}: does not match its pinned sha256 {sha256}",
            path.display()
        )));
    }
    let format = serde_json::from_value(doc["format"].clone()).unwrap_or(Format::Auto);
    Ok(Resolved {
        reference: format!("{name}@{version}"),
        split,
        path,
        sha256,
        format,
    })
}

/// A job's dataset: `name@version[:split]` from the registry, or a file path (published
/// first, pinned by hash). Returns the resolved split.
pub fn resolve_or_pin(
    home: &Home,
    store: &mut Store,
    what: &str,
    spec: &str,
    format: Format,
) -> Result<Resolved, JobError> {
    let path = Path::new(spec);
    if path.is_file() {
        let reference = pin_file(home, store, path, format)
            .map_err(|e| JobError::Invalid(format!("{what}: {e}")))?;
        return resolve(home, store, &reference);
    }
    if parse_ref(spec).is_some() {
        return resolve(home, store, spec).map_err(|e| JobError::Invalid(format!("{what}: {e}")));
    }
    Err(JobError::Invalid(format!(
        "{what} = {spec:?}: no such file, and not a name@version"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Home, Store) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        let store = Store::open(&home.db()).unwrap();
        (dir, home, store)
    }

    const ROW: &str = "{\"prompt\": \"2+2?\", \"answer\": \"4\"}\n";

    #[test]
    fn a_file_becomes_an_immutable_pinned_version() {
        let (dir, home, mut store) = setup();
        let f = dir.path().join("My Rows.jsonl");
        std::fs::write(&f, ROW.repeat(3)).unwrap();
        let req = PushRequest {
            path: f.clone(),
            ..PushRequest::default()
        };
        let (doc, pushed) = push(&home, &mut store, &req).unwrap();
        assert_eq!(pushed, Pushed::Created);
        assert_eq!(
            (doc["name"].as_str(), doc["version"].as_str()),
            (Some("my-rows"), Some("1.0.0"))
        );
        assert_eq!(doc["row_count"], 3);
        // Same bytes again: the same version. New bytes: the next patch version.
        assert_eq!(push(&home, &mut store, &req).unwrap().1, Pushed::Unchanged);
        std::fs::write(&f, ROW.repeat(4)).unwrap();
        let (doc2, _) = push(&home, &mut store, &req).unwrap();
        assert_eq!(doc2["version"], "1.0.1");
        // An explicit version that exists with other bytes is refused.
        let again = PushRequest {
            version: Some("1.0.0".into()),
            ..req.clone()
        };
        let e = push(&home, &mut store, &again).unwrap_err().to_string();
        assert!(e.contains("immutable"), "{e}");
        // The published rows are read from the home, not from the pushed file.
        std::fs::remove_file(&f).unwrap();
        let r = resolve(&home, &store, "my-rows@1.0.0").unwrap();
        assert_eq!(std::fs::read_to_string(&r.path).unwrap(), ROW.repeat(3));
        assert_eq!(r.split, "train");
    }

    #[test]
    fn a_directory_with_a_card_declares_name_version_and_splits() {
        let (dir, home, mut store) = setup();
        let d = dir.path().join("faq");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.jsonl"), ROW.repeat(2)).unwrap();
        std::fs::write(d.join("b.csv"), "question,answer\nx,y\n").unwrap();
        std::fs::write(
            d.join("dataset.yaml"),
            "name: faq\nversion: 2.1.0\nsummary: questions\nsplits:\n  train: a.jsonl\n  eval: b.csv\nrow_count: 3\n",
        )
        .unwrap();
        let req = PushRequest {
            path: d.clone(),
            ..PushRequest::default()
        };
        let (doc, _) = push(&home, &mut store, &req).unwrap();
        assert_eq!(doc["version"], "2.1.0");
        assert_eq!(
            resolve(&home, &store, "faq@2.1.0:eval").unwrap().split,
            "eval"
        );
        let e = resolve(&home, &store, "faq@2.1.0:test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no split \"test\""), "{e}");
        let e = resolve(&home, &store, "faq@9.9.9").unwrap_err().to_string();
        assert!(e.contains("published versions: 2.1.0"), "{e}");
        // A card with a typo names it.
        std::fs::write(d.join("dataset.yaml"), "name: faq\nversoin: 1.0.0\n").unwrap();
        let e = push(&home, &mut store, &req).unwrap_err().to_string();
        assert!(e.contains("versoin"), "{e}");
    }

    #[test]
    fn malformed_rows_are_all_reported_and_nothing_is_published() {
        let (dir, home, mut store) = setup();
        let f = dir.path().join("bad.jsonl");
        std::fs::write(&f, format!("{ROW}{{\"prompt\": 1}}\nnot json\n")).unwrap();
        let req = PushRequest {
            path: f.clone(),
            ..PushRequest::default()
        };
        let e = push(&home, &mut store, &req).unwrap_err().to_string();
        assert!(e.contains("2 malformed"), "{e}");
        assert!(
            e.contains("bad.jsonl:2") && e.contains("bad.jsonl:3"),
            "{e}"
        );
        assert!(list(&store).unwrap().is_empty());
    }

    #[test]
    fn a_plain_file_in_a_job_is_pinned_by_its_hash() {
        let (dir, home, mut store) = setup();
        let f = dir.path().join("rows.jsonl");
        std::fs::write(&f, ROW).unwrap();
        let f = f.display().to_string();
        let r = resolve_or_pin(&home, &mut store, "data.dataset", &f, Format::Auto).unwrap();
        assert!(r.reference.starts_with("rows@0.0.0+"), "{}", r.reference);
        let again = resolve_or_pin(&home, &mut store, "data.dataset", &f, Format::Auto).unwrap();
        assert_eq!(again, r);
        let e = resolve_or_pin(
            &home,
            &mut store,
            "data.dataset",
            "nope.jsonl",
            Format::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("data.dataset") && e.contains("no such file"),
            "{e}"
        );
    }
}
