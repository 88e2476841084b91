//! A plain ustar archive of a checkpoint directory's files — what SDK 0.34's
//! `tinker checkpoint download` fetches and unpacks (regular files only, no links, no paths).

use std::path::Path;

fn octal(field: &mut [u8], value: u64) {
    // Zero-padded octal digits, then NUL, filling the field.
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

fn header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field read as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

/// The regular files directly in `dir` (sorted by name) as a tar archive.
pub fn tar_dir(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.len() < 100 && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let data = std::fs::read(dir.join(&name))?;
        let mtime = std::fs::metadata(dir.join(&name))?
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        out.extend_from_slice(&header(&name, data.len() as u64, mtime));
        out.extend_from_slice(&data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    // Two zero blocks end the archive.
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_name_size_and_a_valid_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("adapter_config.json"), b"{}").unwrap();
        std::fs::write(tmp.path().join("checkpoint_complete"), b"").unwrap();
        let tar = tar_dir(tmp.path()).unwrap();
        assert_eq!(tar.len(), 512 + 512 + 512 + 1024);
        let h = &tar[..512];
        assert!(h.starts_with(b"adapter_config.json\0"));
        assert_eq!(&h[124..136], b"00000000002\0");
        let stored = u64::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut copy = h.to_vec();
        copy[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, copy.iter().map(|&b| b as u64).sum::<u64>());
        assert_eq!(&tar[512..514], b"{}");
        assert!(tar[1024..].starts_with(b"checkpoint_complete\0"));
    }
}
