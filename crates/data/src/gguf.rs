//! A small, self-contained reader of GGUF *metadata* (the key/value header of a llama.cpp model
//! file). It stops before the tensor infos, so reading the tokenizer of a multi-gigabyte model
//! touches only its first few megabytes.
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, version `u32`, tensor count `u64`,
//! key/value count `u64`, then per pair a string key (`u64` length + UTF-8 bytes), a value type
//! `u32` and the value. Arrays are an element type `u32`, a count `u64` and the elements.
//! Version 1 used 32-bit lengths and is refused; big-endian files (their version reads as a huge
//! number) are refused with a message that says so.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{DataError, Result};

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: elements of one type (nested arrays are allowed by the format).
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

/// The metadata of a GGUF file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMetadata {
    /// Format version (2 or 3).
    pub version: u32,
    /// Number of tensors the file declares (their infos are not read).
    pub tensor_count: u64,
    /// The key/value pairs, in file order.
    pub entries: Vec<(String, GgufValue)>,
}

impl GgufMetadata {
    /// The value of `key`, if present (the last one wins if a key is repeated).
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Reads the metadata of the GGUF file at `path`.
pub fn read_gguf_metadata(path: &Path) -> Result<GgufMetadata> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut reader = Reader {
        inner: BufReader::with_capacity(1 << 16, file),
        offset: 0,
        len,
        path,
    };
    reader.read_header()
}

/// Parses GGUF metadata from bytes already in memory (tests, embedded files). `name` only
/// appears in error messages.
pub fn parse_gguf_metadata(bytes: &[u8], name: &Path) -> Result<GgufMetadata> {
    let mut reader = Reader {
        inner: bytes,
        offset: 0,
        len: bytes.len() as u64,
        path: name,
    };
    reader.read_header()
}

/// Nested arrays deeper than this are refused: real files use depth 1, and a hostile file could
/// otherwise recurse until the stack overflows.
const MAX_ARRAY_DEPTH: usize = 8;

struct Reader<'p, R> {
    inner: R,
    offset: u64,
    len: u64,
    path: &'p Path,
}

impl<R: Read> Reader<'_, R> {
    fn err(&self, message: impl Into<String>) -> DataError {
        DataError::Gguf {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err(format!(
                    "file ends at byte {} inside the metadata",
                    self.len
                ))
            } else {
                DataError::io(self.path, e)
            }
        })?;
        self.offset += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count of items that each take at least `min_size` bytes: refused when the rest of the
    /// file cannot hold them, so that a corrupt length never triggers a huge allocation.
    fn count(&mut self, min_size: u64, what: &str) -> Result<usize> {
        let at = self.offset;
        let n = self.u64()?;
        let left = self.len.saturating_sub(self.offset);
        if n.saturating_mul(min_size) > left {
            return Err(self.err(format!(
                "{what} at byte {at} claims {n} items but only {left} bytes are left"
            )));
        }
        usize::try_from(n).map_err(|_| self.err(format!("{what} at byte {at} is too long")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.offset;
        let n = self.count(1, what)?;
        let mut buf = vec![0u8; n];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err(format!("file ends inside {what} at byte {at}"))
            } else {
                DataError::io(self.path, e)
            }
        })?;
        self.offset += n as u64;
        String::from_utf8(buf)
            .map_err(|e| self.err(format!("{what} at byte {at} is not UTF-8: {e}")))
    }

    fn read_header(&mut self) -> Result<GgufMetadata> {
        let magic: [u8; 4] = self.bytes()?;
        if &magic != b"GGUF" {
            return Err(self.err(format!(
                "bad magic {magic:?} (expected \"GGUF\"): not a GGUF file"
            )));
        }
        let version = self.u32()?;
        match version {
            2 | 3 => {}
            1 => return Err(self.err("version 1 files are not supported (re-convert the model)")),
            v if v != 0 && v.swap_bytes() <= 3 => {
                return Err(self.err("big-endian GGUF files are not supported"));
            }
            v => return Err(self.err(format!("unknown GGUF version {v}"))),
        }
        let tensor_count = self.u64()?;
        // A pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        let kv_count = self.count(13, "key/value count")?;
        let mut entries = Vec::with_capacity(kv_count.min(4096));
        for i in 0..kv_count {
            let key = self.string(&format!("key #{i}"))?;
            let ty = self.u32()?;
            let value = self.value(ty, &key, 0)?;
            entries.push((key, value));
        }
        Ok(GgufMetadata {
            version,
            tensor_count,
            entries,
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.bytes()?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.bytes()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes()?)),
            7 => {
                let [b] = self.bytes()?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => return Err(self.err(format!("key `{key}`: bool byte is {b}, not 0 or 1"))),
                }
            }
            8 => GgufValue::String(self.string(&format!("value of `{key}`"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("key `{key}`: arrays nested too deeply")));
                }
                let elem = self.u32()?;
                let min_size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("key `{key}`: unknown array type {t}"))),
                };
                let n = self.count(min_size, &format!("array `{key}`"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes()?)),
            t => return Err(self.err(format!("key `{key}`: unknown value type {t}"))),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds GGUF bytes for tests (also used by the tokenizer builder's tests).
    pub(crate) struct GgufWriter {
        pub(crate) buf: Vec<u8>,
        count: u64,
    }

    impl GgufWriter {
        pub(crate) fn new() -> Self {
            Self {
                buf: Vec::new(),
                count: 0,
            }
        }

        fn str_bytes(buf: &mut Vec<u8>, s: &str) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s.as_bytes());
        }

        fn key(&mut self, key: &str, ty: u32) {
            Self::str_bytes(&mut self.buf, key);
            self.buf.extend(ty.to_le_bytes());
            self.count += 1;
        }

        pub(crate) fn string(&mut self, key: &str, v: &str) -> &mut Self {
            self.key(key, 8);
            Self::str_bytes(&mut self.buf, v);
            self
        }

        pub(crate) fn u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.key(key, 4);
            self.buf.extend(v.to_le_bytes());
            self
        }

        pub(crate) fn bool(&mut self, key: &str, v: bool) -> &mut Self {
            self.key(key, 7);
            self.buf.push(v as u8);
            self
        }

        pub(crate) fn strings(&mut self, key: &str, v: &[&str]) -> &mut Self {
            self.key(key, 9);
            self.buf.extend(8u32.to_le_bytes());
            self.buf.extend((v.len() as u64).to_le_bytes());
            for s in v {
                Self::str_bytes(&mut self.buf, s);
            }
            self
        }

        pub(crate) fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
            self.key(key, 9);
            self.buf.extend(5u32.to_le_bytes());
            self.buf.extend((v.len() as u64).to_le_bytes());
            for x in v {
                self.buf.extend(x.to_le_bytes());
            }
            self
        }

        pub(crate) fn finish(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(7u64.to_le_bytes());
            out.extend(self.count.to_le_bytes());
            out.extend(&self.buf);
            out.extend([0xAB; 16]); // stands in for tensor infos, which must not be read
            out
        }
    }

    #[test]
    fn reads_scalars_strings_and_arrays() {
        let mut w = GgufWriter::new();
        w.string("general.architecture", "llama")
            .u32("llama.block_count", 30)
            .bool("tokenizer.ggml.add_bos_token", false)
            .strings("tokenizer.ggml.tokens", &["a", "b", "é"])
            .i32s("tokenizer.ggml.token_type", &[1, 3, -1]);
        let bytes = w.finish();
        let md = parse_gguf_metadata(&bytes, Path::new("t.gguf")).unwrap();
        assert_eq!(md.version, 3);
        assert_eq!(md.tensor_count, 7);
        assert_eq!(md.entries.len(), 5);
        assert_eq!(
            md.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(md.get("llama.block_count").unwrap().as_u64(), Some(30));
        assert_eq!(
            md.get("tokenizer.ggml.add_bos_token").unwrap().as_bool(),
            Some(false)
        );
        let toks = md.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks[2].as_str(), Some("é"));
        let types = md
            .get("tokenizer.ggml.token_type")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(types[2].as_i64(), Some(-1));
        assert_eq!(types[2].as_u64(), None);
    }

    #[test]
    fn refuses_bad_magic_truncation_and_huge_lengths() {
        let e = parse_gguf_metadata(b"GGML\x03\0\0\0", Path::new("x.gguf")).unwrap_err();
        assert!(
            e.to_string().contains("x.gguf: malformed GGUF: bad magic"),
            "{e}"
        );

        let mut w = GgufWriter::new();
        w.string("general.name", "abc");
        let bytes = w.finish();
        // Cut inside the value string.
        let cut = &bytes[..bytes.len() - 18];
        let e = parse_gguf_metadata(cut, Path::new("x.gguf")).unwrap_err();
        assert!(
            e.to_string()
                .contains("claims 3 items but only 1 bytes are left"),
            "{e}"
        );
        let e = parse_gguf_metadata(&bytes[..10], Path::new("x.gguf")).unwrap_err();
        assert!(e.to_string().contains("file ends"), "{e}");

        // A key count far beyond what the file can hold.
        let mut bad = b"GGUF".to_vec();
        bad.extend(3u32.to_le_bytes());
        bad.extend(0u64.to_le_bytes());
        bad.extend(u64::MAX.to_le_bytes());
        let e = parse_gguf_metadata(&bad, Path::new("x.gguf")).unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");

        let mut be = b"GGUF".to_vec();
        be.extend(3u32.to_be_bytes());
        let e = parse_gguf_metadata(&be, Path::new("x.gguf")).unwrap_err();
        assert!(e.to_string().contains("big-endian"), "{e}");
    }

    #[test]
    fn refuses_unknown_types() {
        let mut w = GgufWriter::new();
        w.key("weird", 42);
        let bytes = w.finish();
        let e = parse_gguf_metadata(&bytes, Path::new("x.gguf")).unwrap_err();
        assert!(
            e.to_string().contains("key `weird`: unknown value type 42"),
            "{e}"
        );
    }
}
