//! The one error type of this crate.
//!
//! Every variant names where the problem is — a file (and line), a JSON field, a GGUF key or a
//! token — so that a user can fix their input without reading our source.

use std::path::Path;

/// Errors of tokenizer loading, chat rendering and datum reading.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file (or one JSONL line) is not what we expect: `field` is the path inside the
    /// JSON document (`loss_fn_inputs.weights.data[3]`, `chat_template`, ...).
    #[error("{location}: field `{field}`: {message}")]
    Json {
        /// `file` or `file:line`.
        location: String,
        /// The JSON path of the offending value (`.` for the whole document).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A datum parsed but breaks the contract (e.g. fewer target tokens than input tokens).
    #[error("{path}:{line}: datum field `{field}`: {message}")]
    InvalidDatum {
        /// The JSONL file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending field (`loss_fn_inputs.target_tokens`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is malformed (bad magic, truncated, unknown value type...).
    #[error("{path}: malformed GGUF: {message}")]
    Gguf {
        /// The GGUF file.
        path: String,
        /// What is wrong, with the byte offset or key where known.
        message: String,
    },
    /// A GGUF metadata key is missing or has the wrong type or value.
    #[error("{path}: GGUF key `{key}`: {message}")]
    GgufKey {
        /// The GGUF file.
        path: String,
        /// The metadata key (`tokenizer.ggml.tokens`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The input is valid but asks for something this crate does not implement yet.
    #[error("{path}: {key} = {value:?} is not supported yet: {message}")]
    Unsupported {
        /// The file.
        path: String,
        /// The key or field that selects the unsupported feature.
        key: String,
        /// Its value.
        value: String,
        /// What is supported instead.
        message: String,
    },
    /// The Hugging Face `tokenizers` library refused to build or load the tokenizer.
    #[error("{path}: cannot build tokenizer: {message}")]
    Tokenizer {
        /// The model file or directory.
        path: String,
        /// The library's message.
        message: String,
    },
    /// Encoding text failed.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding ids failed (an id outside the vocabulary, ...).
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// A chat template failed to compile or render; the message carries the template line.
    #[error("chat template: {0}")]
    Template(String),
    /// `apply_chat_template` on a model that ships no chat template.
    #[error("{path}: the model has no chat template (looked for chat_template.jinja, chat_template.json, tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`)")]
    NoChatTemplate {
        /// The model file or directory.
        path: String,
    },
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// A [`DataError::Json`] for a whole file.
    pub(crate) fn json(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Json {
            location: path.display().to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A [`DataError::GgufKey`].
    pub(crate) fn gguf_key(path: &Path, key: &str, message: impl Into<String>) -> Self {
        DataError::GgufKey {
            path: path.display().to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A [`DataError::Tokenizer`].
    pub(crate) fn tokenizer(path: &Path, message: impl std::fmt::Display) -> Self {
        DataError::Tokenizer {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
