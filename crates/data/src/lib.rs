//! Text in and out of whet: tokenizers (from a Hugging Face model directory or straight from a
//! `.gguf` file), chat templates rendered exactly as transformers' `apply_chat_template` renders
//! them, training rows of every kind people bring (chat, prompt/response, ATIF trajectories,
//! Tinker datums) and their rendering into tokens with loss weights.
//!
//! ```no_run
//! use std::path::Path;
//! use whet_data::Tokenizer;
//!
//! let tok = Tokenizer::from_model_path(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let messages = [serde_json::json!({"role": "user", "content": "Hi"})];
//! let ids = tok.apply_chat_template(&messages, None, true)?;
//! assert!(tok.decode(&ids, false)?.ends_with("<|im_start|>assistant\n"));
//! # Ok::<(), whet_data::DataError>(())
//! ```

#![warn(missing_docs)]

mod chat_template;
mod datum;
mod error;
pub mod files;
pub mod gguf;
mod gguf_tokenizer;
mod pyfmt;
pub mod render;
pub mod rows;
mod tokenizer;
mod tool_text;

pub use chat_template::ChatTemplate;
pub use datum::read_datums_jsonl;
pub use error::{DataError, Result};
pub use files::{read_rows, read_values, scan_rows};
pub use render::{render_conversation, Overflow, Rendered, Scaffold, TrainOn};
pub use rows::{parse_row, Conversation, Format, Row};
pub use tokenizer::Tokenizer;
