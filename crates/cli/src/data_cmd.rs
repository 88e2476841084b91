//! `whet data`: see what a dataset becomes for a model before training on it.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use whet_data::{render_conversation, Format, Overflow, Row, Scaffold, Tokenizer, TrainOn};
use whet_engine::ModelSource;

use crate::common;

/// `whet data` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Render a dataset with a model's chat template: the tokens of each row and which of them
    /// are trained. Text output marks trained tokens in green on a terminal, between ⟦ and ⟧
    /// otherwise; `--json` prints `{"line", "tokens", "weights"}` per row.
    Render(RenderArgs),
    /// Check a dataset against a model before any compute: every malformed row (file:line and
    /// field), rows that train on nothing, rows over the maximum length, and counts of rows,
    /// tokens and trained tokens. Exits with status 1 when a row is unusable.
    Validate(ValidateArgs),
}

/// How rows are read and rendered (shared by `render` and `validate`).
#[derive(clap::Args)]
pub struct RowArgs {
    /// The model whose tokenizer and chat template render the rows (only its tokenizer is read).
    #[arg(long)]
    model: String,
    /// The dataset: a .jsonl, .json or .csv file of chat, prompt/response, ATIF trajectory or
    /// Tinker datum rows, or a published `name@version[:split]`.
    file: PathBuf,
    /// The rows' kind: auto, chat, prompt_response, trajectories or datums.
    #[arg(long, default_value = "auto")]
    format: Format,
    /// Which messages are trained: all_assistant_messages, last_assistant_message or
    /// all_messages.
    #[arg(long, default_value = "all_assistant_messages")]
    train_on: TrainOn,
    /// A system prompt put first in every conversation (what a capability's prompt does).
    #[arg(long, conflicts_with = "capability")]
    system_prompt: Option<String>,
    /// A published capability `name@version`: its system prompt and tools, as training uses
    /// them.
    #[arg(long)]
    capability: Option<String>,
    /// whet's home, for `--capability` and dataset references (default: $WHET_HOME, else
    /// ~/.whet).
    #[arg(long, env = "WHET_HOME")]
    home: Option<PathBuf>,
    /// The capability's tools.
    #[arg(skip)]
    tools: Vec<serde_json::Value>,
}

impl RowArgs {
    /// Reads what the flags name from the home: a dataset reference becomes its pinned file,
    /// a capability its system prompt and tools.
    fn resolve(mut self) -> Result<Self> {
        let is_ref = !self.file.exists() && self.file.to_string_lossy().contains('@');
        if !is_ref && self.capability.is_none() {
            return Ok(self);
        }
        let home = whet_jobs::Home::resolve(self.home.clone())?;
        let store = whet_jobs::Store::open(&home.db())?;
        if is_ref {
            let r = whet_jobs::datasets::resolve(&home, &store, &self.file.to_string_lossy())?;
            self.file = r.path;
        }
        if let Some(c) = &self.capability {
            let (cap, _) = whet_jobs::capabilities::get(&store, c)?;
            self.system_prompt = cap.system_prompt;
            self.tools = cap.tools;
        }
        Ok(self)
    }
}

/// Arguments of `whet data render`.
#[derive(clap::Args)]
pub struct RenderArgs {
    #[command(flatten)]
    rows: RowArgs,
    /// Render only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON line per row.
    #[arg(long)]
    json: bool,
    /// Write the output here (atomically) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs a `whet data` subcommand.
pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Render(mut a) => {
            a.rows = a.rows.resolve()?;
            render(a)
        }
        Command::Validate(mut a) => {
            a.rows = a.rows.resolve()?;
            validate(a)
        }
    }
}

/// Arguments of `whet data validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    rows: RowArgs,
    /// Maximum tokens per row (default: the model's context length).
    #[arg(long)]
    max_length: Option<usize>,
    /// What training would do with a longer row.
    #[arg(long, default_value = "truncate")]
    overflow: Overflow,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn tokenizer_of(model: &str) -> Result<(ModelSource, Tokenizer)> {
    let source = ModelSource::resolve(model)?;
    let tok = Tokenizer::from_model_path(source.tokenizer_path())
        .with_context(|| format!("loading the tokenizer of {model}"))?;
    Ok((source, tok))
}

fn validate(a: ValidateArgs) -> Result<()> {
    let r = &a.rows;
    let (source, tok) = tokenizer_of(&r.model)?;
    let max_length = match a.max_length {
        Some(n) => n,
        None => whet_engine::loader::load_config(&source)?.max_position_embeddings,
    };
    let rows = whet_data::scan_rows(&r.file, r.format)?;
    // Each row exactly as training would take it (whet_sft::prepare_row).
    let rendering = whet_sft::Rendering {
        scaffold: Scaffold {
            system_prompt: r.system_prompt.as_deref(),
            tools: &r.tools,
        },
        train_on: r.train_on,
        max_length,
        overflow: a.overflow,
    };
    let (mut malformed, mut empty, mut over) = (vec![], vec![], vec![]);
    let (mut usable, mut tokens, mut trained) = (0usize, 0usize, 0usize);
    for (line, row) in &rows {
        let at = format!("{}:{line}", r.file.display());
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                malformed.push(e.to_string());
                continue;
            }
        };
        match whet_sft::prepare_row(row, &at, Some(&tok), &rendering) {
            Err(e @ whet_sft::SftError::NothingTrained { .. }) => empty.push(e.to_string()),
            Err(e) => malformed.push(e.to_string()),
            Ok(whet_sft::RowOutcome::Dropped) => {
                over.push(format!("{at}: over {max_length} tokens (dropped)"))
            }
            Ok(whet_sft::RowOutcome::Kept { example, truncated }) => {
                if truncated {
                    over.push(format!("{at}: over {max_length} tokens (truncated)"));
                }
                usable += 1;
                tokens += example.tokens();
                trained += example.trained_tokens();
            }
        }
    }
    let report = json!({
        "file": r.file.display().to_string(),
        "rows": rows.len(),
        "usable_rows": usable,
        "tokens": tokens,
        "trained_tokens": trained,
        "max_length": max_length,
        "overflow": a.overflow,
        "malformed": malformed,
        "trains_on_nothing": empty,
        "over_max_length": over,
    });
    let text = if a.json {
        format!("{report}\n")
    } else {
        let mut t = format!(
            "{}: {} rows, {usable} usable; {tokens} tokens, {trained} trained\n",
            r.file.display(),
            rows.len()
        );
        for (what, list) in [
            ("malformed", &malformed),
            ("training on nothing", &empty),
            ("over the maximum length", &over),
        ] {
            if !list.is_empty() {
                t.push_str(&format!("{} {what}:\n", list.len()));
                for item in list {
                    t.push_str(&format!("  {item}\n"));
                }
            }
        }
        t
    };
    common::emit(None, &text)?;
    if !malformed.is_empty() || !empty.is_empty() || usable == 0 {
        anyhow::bail!(
            "{}: {} malformed rows, {} training on nothing, {usable} usable",
            r.file.display(),
            malformed.len(),
            empty.len()
        );
    }
    Ok(())
}

/// Tokens and per-token weights of one row: a datum's weights sit on its targets, so the
/// sequence is its first input token followed by the targets.
fn render_row(tok: &Tokenizer, row: &Row, a: &RowArgs) -> Result<(Vec<u32>, Vec<f32>)> {
    match row {
        Row::Chat(conv) => {
            let scaffold = Scaffold {
                system_prompt: a.system_prompt.as_deref(),
                tools: &a.tools,
            };
            let r = render_conversation(tok, conv, &scaffold, a.train_on)?;
            Ok((r.tokens, r.weights))
        }
        Row::Datum(d) => {
            let inputs = d.model_input.to_ints();
            let targets = d.loss_fn_inputs["target_tokens"]
                .to_i64_vec()
                .map_err(anyhow::Error::msg)?;
            let weights = d
                .loss_fn_inputs
                .get("weights")
                .map(|w| w.to_f32_vec())
                .unwrap_or_else(|| vec![1.0; targets.len()]);
            let mut tokens = Vec::with_capacity(targets.len() + 1);
            tokens.extend(inputs.first().map(|&t| t as u32));
            tokens.extend(targets.iter().map(|&t| t as u32));
            let mut w = vec![0.0];
            w.extend(weights);
            Ok((tokens, w))
        }
    }
}

fn render(a: RenderArgs) -> Result<()> {
    let (_, tok) = tokenizer_of(&a.rows.model)?;
    let rows = whet_data::read_rows(&a.rows.file, a.rows.format)?;
    let color = a.out.is_none() && std::io::stdout().is_terminal();
    let mut out = String::new();
    for (line, row) in rows.iter().take(a.limit.unwrap_or(usize::MAX)) {
        let at = || format!("{}:{line}", a.rows.file.display());
        let (tokens, weights) = render_row(&tok, row, &a.rows).with_context(at)?;
        if a.json {
            out.push_str(&json!({"line": line, "tokens": tokens, "weights": weights}).to_string());
            out.push('\n');
            continue;
        }
        let trained = weights.iter().filter(|&&w| w > 0.0).count();
        out.push_str(&format!(
            "── {} ({} tokens, {trained} trained)\n",
            at(),
            tokens.len()
        ));
        // Runs of equal weight, decoded together (a run boundary never splits a token).
        let mut start = 0;
        while start < tokens.len() {
            let on = weights[start] > 0.0;
            let mut end = start;
            while end < tokens.len() && (weights[end] > 0.0) == on {
                end += 1;
            }
            let text = tok.decode(&tokens[start..end], false)?;
            match (on, color) {
                (false, _) => out.push_str(&text),
                (true, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
                (true, false) => out.push_str(&format!("⟦{text}⟧")),
            }
            start = end;
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    common::emit(a.out.as_ref(), &out)
}
