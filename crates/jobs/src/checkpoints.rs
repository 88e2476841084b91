//! Tinker checkpoints in the home, shared by `whet serve`, the CLI and jobs.
//!
//! A checkpoint is named by a `tinker://{run_id}/{segment}/{name}` path: `weights` (a training
//! state: adapter, optimizer moments and step), `sampler_weights` (a PEFT adapter for sampling)
//! or `external_weights` (a PEFT adapter exported for download). On disk:
//!
//! ```text
//! HOME/tinker/<run_id>/run.json                       the training run (base model, LoRA, owner)
//! HOME/tinker/<run_id>/<segment>/<name>/              the checkpoint's files
//! HOME/tinker/<run_id>/meta/<segment>/<name>.json     its record (time, owner, expiry, size)
//! ```
//!
//! Records sit apart from the files because a state directory is replaced whole when saved
//! again. Every write is atomic (temp file + rename). Run ids contain `:` (`{session}:train:{n}`)
//! and names cannot contain `/` (the path has exactly three parts).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Home, JobError};

/// The kind of a checkpoint, from its path's middle segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// `weights/`: adapter + optimizer state, to continue training.
    Training,
    /// `sampler_weights/`: a PEFT adapter, to sample from.
    Sampler,
    /// `external_weights/`: a PEFT adapter exported for download.
    External,
}

impl CheckpointKind {
    /// All kinds, in listing order.
    pub const ALL: [CheckpointKind; 3] = [Self::Training, Self::Sampler, Self::External];

    /// The path segment (`weights`, `sampler_weights`, `external_weights`).
    pub fn segment(self) -> &'static str {
        match self {
            Self::Training => "weights",
            Self::Sampler => "sampler_weights",
            Self::External => "external_weights",
        }
    }

    /// Tinker's `checkpoint_type` (`training`, `sampler`, `external`).
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Sampler => "sampler",
            Self::External => "external",
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.segment() == s)
    }
}

/// A parsed `tinker://{run_id}/{segment}/{name}` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinkerPath {
    /// The training run (`{session}:train:{n}`, or `import-…` for imported adapters).
    pub run_id: String,
    /// What the checkpoint holds.
    pub kind: CheckpointKind,
    /// The checkpoint's name.
    pub name: String,
}

/// Checks a run id or checkpoint name: non-empty, no `/`, no `..`, printable.
pub fn check_name(what: &str, name: &str) -> Result<(), JobError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(JobError::Invalid(format!(
            "{what} {name:?}: must be 1-200 printable characters, without '/' and not starting with '.'"
        )))
    }
}

impl TinkerPath {
    /// Parses a `tinker://` path.
    pub fn parse(path: &str) -> Result<Self, JobError> {
        let bad = |why: &str| {
            JobError::Invalid(format!(
                "{path:?} is not a checkpoint path ({why}; expected tinker://RUN_ID/weights|sampler_weights|external_weights/NAME)"
            ))
        };
        let rest = path
            .strip_prefix("tinker://")
            .ok_or_else(|| bad("no tinker:// prefix"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [run_id, segment, name] = parts[..] else {
            return Err(bad("it must have exactly three parts"));
        };
        let kind = CheckpointKind::from_segment(segment).ok_or_else(|| bad("unknown segment"))?;
        check_name("run id", run_id)?;
        check_name("checkpoint name", name)?;
        Ok(Self {
            run_id: run_id.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    /// The path as text.
    pub fn to_uri(&self) -> String {
        format!(
            "tinker://{}/{}/{}",
            self.run_id,
            self.kind.segment(),
            self.name
        )
    }

    /// Tinker's checkpoint id within the run (`weights/000020`).
    pub fn checkpoint_id(&self) -> String {
        format!("{}/{}", self.kind.segment(), self.name)
    }
}

/// A training run: what its checkpoints were trained from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `{session}:train:{n}` (or `import-…`).
    pub training_run_id: String,
    /// The base model's served name.
    pub base_model: String,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA on q/k/v/o.
    pub train_attn: bool,
    /// LoRA on gate/up/down.
    pub train_mlp: bool,
    /// LoRA on the unembedding (always false for whet).
    pub train_unembed: bool,
    /// Who owns it: a key's fingerprint, or `None` for the home's own (CLI, jobs).
    pub owner: Option<String>,
    /// When the run was created (RFC 3339).
    pub created_at: String,
    /// The client's metadata (the cookbook keeps `renderer_name` there).
    #[serde(default)]
    pub user_metadata: Option<Value>,
}

/// One checkpoint's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The checkpoint's `tinker://` path.
    pub tinker_path: String,
    /// When it was saved (RFC 3339).
    pub time: String,
    /// Unix time of the save.
    pub time_unix: u64,
    /// Total bytes of its files.
    pub size_bytes: u64,
    /// Who owns it (as [`RunRecord::owner`]).
    pub owner: Option<String>,
    /// Unix time after which it is gone; `None` = kept.
    pub expires_unix: Option<u64>,
    /// The client's metadata.
    #[serde(default)]
    pub user_metadata: Option<Value>,
}

impl CheckpointRecord {
    /// The parsed path.
    pub fn path(&self) -> Result<TinkerPath, JobError> {
        TinkerPath::parse(&self.tinker_path)
    }

    /// True once its expiry has passed.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_unix.is_some_and(|t| t <= now)
    }
}

/// The home's Tinker checkpoints.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), JobError> {
    let dir = path
        .parent()
        .ok_or_else(|| JobError::Invalid(format!("{}: no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| JobError::io(dir, e))?;
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record")
    ));
    std::fs::write(&tmp, text).map_err(|e| JobError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| JobError::io(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, JobError> {
    let text = std::fs::read(path).map_err(|e| JobError::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))
}

/// Total size of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

impl Checkpoints {
    /// The checkpoints of `home` (`HOME/tinker`).
    pub fn new(home: &Home) -> Self {
        Self {
            root: home.root().join("tinker"),
        }
    }

    /// The directory of run `run_id` (a training client writes its checkpoints under it).
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.root.join(run_id)
    }

    /// The directory holding checkpoint `path`'s files.
    pub fn dir(&self, path: &TinkerPath) -> PathBuf {
        self.run_dir(&path.run_id)
            .join(path.kind.segment())
            .join(&path.name)
    }

    fn record_file(&self, path: &TinkerPath) -> PathBuf {
        self.run_dir(&path.run_id)
            .join("meta")
            .join(path.kind.segment())
            .join(format!("{}.json", path.name))
    }

    /// Writes (or replaces) a run's record.
    pub fn write_run(&self, run: &RunRecord) -> Result<(), JobError> {
        check_name("run id", &run.training_run_id)?;
        write_json(&self.run_dir(&run.training_run_id).join("run.json"), run)
    }

    /// The record of run `run_id`.
    pub fn run(&self, run_id: &str) -> Result<RunRecord, JobError> {
        check_name("run id", run_id)?;
        let file = self.run_dir(run_id).join("run.json");
        if !file.exists() {
            return Err(JobError::NotFound(format!("no training run {run_id:?}")));
        }
        read_json(&file)
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Vec<RunRecord> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut runs: Vec<RunRecord> = entries
            .flatten()
            .filter_map(|e| read_json(&e.path().join("run.json")).ok())
            .collect();
        runs.sort_by(|a, b| {
            (&a.created_at, &a.training_run_id).cmp(&(&b.created_at, &b.training_run_id))
        });
        runs
    }

    /// Records checkpoint `path`, whose files are in place; `ttl_seconds` sets an expiry.
    pub fn record(
        &self,
        path: &TinkerPath,
        owner: Option<&str>,
        ttl_seconds: Option<u64>,
        user_metadata: Option<Value>,
    ) -> Result<CheckpointRecord, JobError> {
        let now = crate::now_unix();
        let record = CheckpointRecord {
            tinker_path: path.to_uri(),
            time: crate::rfc3339(now),
            time_unix: now,
            size_bytes: dir_size(&self.dir(path)),
            owner: owner.map(str::to_string),
            expires_unix: ttl_seconds.map(|t| now + t),
            user_metadata,
        };
        write_json(&self.record_file(path), &record)?;
        Ok(record)
    }

    /// The record of checkpoint `path` (not found once deleted or expired).
    pub fn get(&self, path: &TinkerPath) -> Result<CheckpointRecord, JobError> {
        let file = self.record_file(path);
        let missing = || JobError::NotFound(format!("no checkpoint {}", path.to_uri()));
        if !file.exists() || !self.dir(path).exists() {
            return Err(missing());
        }
        let record: CheckpointRecord = read_json(&file)?;
        if record.expired(crate::now_unix()) {
            return Err(missing());
        }
        Ok(record)
    }

    /// The live checkpoints of run `run_id`, oldest first.
    pub fn list(&self, run_id: &str) -> Vec<CheckpointRecord> {
        let now = crate::now_unix();
        let mut out = Vec::new();
        for kind in CheckpointKind::ALL {
            let dir = self.run_dir(run_id).join("meta").join(kind.segment());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(r) = read_json::<CheckpointRecord>(&e.path()) else {
                    continue;
                };
                let live = r
                    .path()
                    .is_ok_and(|p| self.dir(&p).exists() && !r.expired(now));
                if live {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| (a.time_unix, &a.tinker_path).cmp(&(b.time_unix, &b.tinker_path)));
        out
    }

    /// Every live checkpoint, oldest first.
    pub fn list_all(&self) -> Vec<CheckpointRecord> {
        let mut out: Vec<CheckpointRecord> = self
            .runs()
            .iter()
            .flat_map(|r| self.list(&r.training_run_id))
            .collect();
        out.sort_by(|a, b| (a.time_unix, &a.tinker_path).cmp(&(b.time_unix, &b.tinker_path)));
        out
    }

    /// Deletes checkpoint `path` (its files, then its record).
    pub fn delete(&self, path: &TinkerPath) -> Result<(), JobError> {
        self.get(path)?;
        let dir = self.dir(path);
        // Renamed aside first, so a crash never leaves a half-deleted checkpoint under its name.
        let trash = dir.with_file_name(format!(".deleting-{}", path.name));
        std::fs::rename(&dir, &trash).map_err(|e| JobError::io(&dir, e))?;
        let file = self.record_file(path);
        std::fs::remove_file(&file).map_err(|e| JobError::io(&file, e))?;
        std::fs::remove_dir_all(&trash).map_err(|e| JobError::io(&trash, e))
    }

    /// Sets (or with `None` removes) checkpoint `path`'s expiry, counted from now.
    pub fn set_ttl(&self, path: &TinkerPath, ttl_seconds: Option<u64>) -> Result<(), JobError> {
        let mut record = self.get(path)?;
        record.expires_unix = ttl_seconds.map(|t| crate::now_unix() + t);
        write_json(&self.record_file(path), &record)
    }

    /// Removes the files of expired checkpoints; returns how many went.
    pub fn sweep_expired(&self) -> usize {
        let now = crate::now_unix();
        let mut n = 0;
        for run in self.runs() {
            for kind in CheckpointKind::ALL {
                let dir = self
                    .run_dir(&run.training_run_id)
                    .join("meta")
                    .join(kind.segment());
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let Ok(r) = read_json::<CheckpointRecord>(&e.path()) else {
                        continue;
                    };
                    if let (true, Ok(p)) = (r.expired(now), r.path()) {
                        let _ = std::fs::remove_dir_all(self.dir(&p));
                        let _ = std::fs::remove_file(e.path());
                        n += 1;
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_with_exactly_three_parts() {
        let p = TinkerPath::parse("tinker://s1:train:0/weights/000020").unwrap();
        assert_eq!(p.run_id, "s1:train:0");
        assert_eq!(p.kind, CheckpointKind::Training);
        assert_eq!(p.checkpoint_id(), "weights/000020");
        assert_eq!(p.to_uri(), "tinker://s1:train:0/weights/000020");
        for bad in [
            "s1:train:0/weights/x",
            "tinker://s1/weights",
            "tinker://s1/weights/a/b",
            "tinker://s1/checkpoints/x",
            "tinker://s1/weights/..",
            "tinker:///weights/x",
        ] {
            assert!(TinkerPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn records_list_expire_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path()).unwrap();
        let store = Checkpoints::new(&home);
        let run = RunRecord {
            training_run_id: "s:train:0".into(),
            base_model: "m".into(),
            lora_rank: 4,
            train_attn: true,
            train_mlp: true,
            train_unembed: false,
            owner: Some("k1".into()),
            created_at: crate::now_rfc3339(),
            user_metadata: None,
        };
        store.write_run(&run).unwrap();
        assert_eq!(store.run("s:train:0").unwrap(), run);
        let a = TinkerPath::parse("tinker://s:train:0/weights/a").unwrap();
        let b = TinkerPath::parse("tinker://s:train:0/sampler_weights/b").unwrap();
        for p in [&a, &b] {
            std::fs::create_dir_all(store.dir(p)).unwrap();
            std::fs::write(store.dir(p).join("f"), b"12345").unwrap();
        }
        store.record(&a, Some("k1"), None, None).unwrap();
        store.record(&b, Some("k1"), Some(3600), None).unwrap();
        let listed: Vec<String> = store
            .list("s:train:0")
            .into_iter()
            .map(|r| r.tinker_path)
            .collect();
        assert_eq!(listed.len(), 2);
        assert_eq!(store.get(&a).unwrap().size_bytes, 5);
        store.set_ttl(&b, Some(0)).unwrap();
        assert!(matches!(store.get(&b), Err(JobError::NotFound(_))));
        assert_eq!(store.sweep_expired(), 1);
        assert!(!store.dir(&b).exists());
        store.delete(&a).unwrap();
        assert!(store.list("s:train:0").is_empty());
        assert!(matches!(store.delete(&a), Err(JobError::NotFound(_))));
    }
}
