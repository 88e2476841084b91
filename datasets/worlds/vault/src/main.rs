//! `whet-world-vault`: a multi-turn, tool-using world for whet (datasets/worlds/README.md).
//! The policy explores a small seeded file tree with `ls` and `cat` and must `submit` the
//! 4-digit access code hidden in one file. It speaks JSON lines on stdin/stdout; see
//! datasets/worlds/vault/README.md.

mod episode;
mod tree;
mod world;

use std::io::{self, BufRead, Write};
use std::process::ExitCode;

use world::{Reply, World};

const USAGE: &str = "usage: whet-world-vault [--files N]\n\
    Speaks whet's world protocol (JSON lines) on stdin/stdout.\n\
    --files N   files per tree (1-8) unless the task says otherwise; default: 2-4 by seed";

fn main() -> ExitCode {
    let default_files = match parse_args(std::env::args().skip(1)) {
        Ok(Some(files)) => files,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("whet-world-vault: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut world = World::new(default_files);
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            // EOF: whet is done with us.
            Ok(0) => return ExitCode::SUCCESS,
            Ok(_) => {}
            Err(e) => {
                eprintln!("whet-world-vault: reading stdin: {e}");
                return ExitCode::FAILURE;
            }
        }
        let (response, close) = match world.handle(&line) {
            Reply::Send(v) => (v, false),
            Reply::Close(v) => (v, true),
            Reply::Skip => continue,
        };
        let written = writeln!(output, "{response}").and_then(|()| output.flush());
        if close {
            // The reader may already be gone after `close`; that is fine.
            return ExitCode::SUCCESS;
        }
        if let Err(e) = written {
            eprintln!("whet-world-vault: writing stdout: {e}");
            return ExitCode::FAILURE;
        }
    }
}

/// `Ok(None)` for `--help`; otherwise the `--files` default (if given).
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Option<usize>>, String> {
    let mut files = None;
    let mut args = args;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--files" => {
                let value = args.next().ok_or("--files needs a value")?;
                match value.parse::<usize>() {
                    Ok(n) if (1..=tree::MAX_FILES).contains(&n) => files = Some(n),
                    _ => {
                        return Err(format!(
                            "--files must be from 1 to {}, got {value:?}",
                            tree::MAX_FILES
                        ))
                    }
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(files))
}
