//! whet's home (`WHET_HOME`, default `~/.whet`): one SQLite database (`whet.db`: jobs, events,
//! metrics, the registries), content-addressed blobs (`blobs/sha256/<hex>`, read-only), the
//! registries' browsable trees (`datasets/<name>/<version>/…`, hard links to the blobs) and one
//! directory per job run (`runs/<id>/`: checkpoints and adapters).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::JobError;

/// The home's layout.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `root` (created, with its subdirectories, if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, JobError> {
        let home = Self { root: root.into() };
        for dir in [home.root.clone(), home.blobs(), home.runs()] {
            std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
        }
        Ok(home)
    }

    /// `--home` if given, else `$WHET_HOME`, else `~/.whet`.
    pub fn resolve(arg: Option<PathBuf>) -> Result<Self, JobError> {
        let root = match arg.or_else(|| std::env::var_os("WHET_HOME").map(PathBuf::from)) {
            Some(r) => r,
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".whet"),
                None => {
                    return Err(JobError::Invalid(
                        "neither --home, WHET_HOME nor HOME is set".into(),
                    ))
                }
            },
        };
        Self::open(root)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The database file.
    pub fn db(&self) -> PathBuf {
        self.root.join("whet.db")
    }

    /// Where blobs live, named by their sha256.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// The blob with this sha256 (hex).
    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs().join(sha256)
    }

    /// Runs' directories.
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// The directory of job `id`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.runs().join(id)
    }

    /// The browsable tree of dataset `name@version`.
    pub fn dataset_dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("datasets").join(name).join(version)
    }

    /// Copies `src` into the blob store and returns its sha256. The copy is hashed as it is
    /// written to a temporary file in the store, then renamed into place: a crash leaves at most
    /// a stray temporary, never a blob whose name lies about its bytes.
    pub fn put_blob(&self, src: &Path) -> Result<(String, u64), JobError> {
        let mut input = std::fs::File::open(src).map_err(|e| JobError::io(src, e))?;
        let dir = self.blobs();
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| JobError::io(&dir, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(|e| JobError::io(src, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| JobError::io(tmp.path(), e))?;
            bytes += n as u64;
        }
        let sha = hex(&hasher.finalize());
        let dest = self.blob(&sha);
        if dest.exists() {
            return Ok((sha, bytes));
        }
        tmp.as_file()
            .sync_all()
            .map_err(|e| JobError::io(tmp.path(), e))?;
        let mut perms = tmp
            .as_file()
            .metadata()
            .map_err(|e| JobError::io(tmp.path(), e))?
            .permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(tmp.path(), perms).map_err(|e| JobError::io(tmp.path(), e))?;
        tmp.persist(&dest)
            .map_err(|e| JobError::io(&dest, e.error))?;
        Ok((sha, bytes))
    }

    /// Checks that blob `sha256` still holds the bytes it is named after.
    pub fn verify_blob(&self, sha256: &str) -> Result<PathBuf, JobError> {
        let path = self.blob(sha256);
        let got = sha256_file(&path)?;
        if got != sha256 {
            return Err(JobError::Invalid(format!(
                "{}: the blob is corrupt (its sha256 is now {got})",
                path.display()
            )));
        }
        Ok(path)
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 (hex) of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String, JobError> {
    let mut f = std::fs::File::open(path).map_err(|e| JobError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(|e| JobError::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// sha256 (hex) of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_their_sha256_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("home")).unwrap();
        let src = dir.path().join("a.txt");
        std::fs::write(&src, b"abc").unwrap();
        let (sha, bytes) = home.put_blob(&src).unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(bytes, 3);
        assert_eq!(std::fs::read(home.blob(&sha)).unwrap(), b"abc");
        assert_eq!(home.put_blob(&src).unwrap().0, sha);
        assert!(home.verify_blob(&sha).is_ok());
        // Only the blob is left in the store: no temporaries.
        assert_eq!(std::fs::read_dir(home.blobs()).unwrap().count(), 1);
    }
}
