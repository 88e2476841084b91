//! API keys of `whet serve` (`HOME/keys.json`): what a server bound beyond loopback accepts.
//!
//! Only a fingerprint (sha256 prefix) of each key is stored; the key itself is shown once, when
//! it is made. Keys look like Tinker's (`tml-…`) because the SDK refuses others before sending.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Home, JobError};

/// A stored key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's fingerprint (first 8 bytes of its sha256, hex).
    pub fingerprint: String,
    /// A label.
    pub name: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

/// The fingerprint the server compares (and records as a checkpoint's owner).
pub fn fingerprint(key: &str) -> String {
    Sha256::digest(key.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file(home: &Home) -> std::path::PathBuf {
    home.root().join("keys.json")
}

/// The home's keys.
pub fn list(home: &Home) -> Result<Vec<KeyRecord>, JobError> {
    let path = file(home);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read(&path).map_err(|e| JobError::io(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))
}

fn save(home: &Home, keys: &[KeyRecord]) -> Result<(), JobError> {
    let path = file(home);
    let tmp = home.root().join(".keys.json.tmp");
    let text = serde_json::to_vec_pretty(keys)
        .map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(&tmp, text).map_err(|e| JobError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| JobError::io(&path, e))
}

/// Makes a key named `name`; returns the key (shown once) and its record.
pub fn create(home: &Home, name: &str) -> Result<(String, KeyRecord), JobError> {
    // 192 bits from the standard library's randomly keyed hashers (seeded by the OS).
    let secret: String = (0..3u8)
        .map(|i| {
            let h = RandomState::new().hash_one((i, std::time::SystemTime::now()));
            format!("{h:016x}")
        })
        .collect();
    let key = format!("tml-{secret}");
    let record = KeyRecord {
        fingerprint: fingerprint(&key),
        name: name.to_string(),
        created_at: crate::now_rfc3339(),
    };
    let mut keys = list(home)?;
    keys.push(record.clone());
    save(home, &keys)?;
    Ok((key, record))
}

/// Revokes the key with this fingerprint (or name); true when one went.
pub fn revoke(home: &Home, which: &str) -> Result<bool, JobError> {
    let mut keys = list(home)?;
    let before = keys.len();
    keys.retain(|k| k.fingerprint != which && k.name != which);
    save(home, &keys)?;
    Ok(keys.len() < before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_by_fingerprint_only() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path()).unwrap();
        let (key, rec) = create(&home, "ci").unwrap();
        assert!(key.starts_with("tml-") && key.len() == 52, "{key}");
        assert_eq!(rec.fingerprint, fingerprint(&key));
        let text = std::fs::read_to_string(home.root().join("keys.json")).unwrap();
        assert!(!text.contains(&key[4..]));
        let (other, _) = create(&home, "other").unwrap();
        assert_ne!(key, other);
        assert_eq!(list(&home).unwrap().len(), 2);
        assert!(revoke(&home, "ci").unwrap());
        assert_eq!(list(&home).unwrap().len(), 1);
    }
}
