//! Every job file shipped under `datasets/` parses and passes the job file's checks, and a live
//! RL job's world manifest is there and parses too: the README's commands and
//! `benches/rl_world.sh` hand these files to users as they are.

use std::path::{Path, PathBuf};

use whet_jobs::spec::JobSpec;

fn job_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            job_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().is_some_and(|n| n != "Cargo.toml")
        {
            out.push(path);
        }
    }
}

#[test]
fn shipped_job_files_parse_and_name_what_exists() {
    let datasets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    let mut files = Vec::new();
    job_files(&datasets, &mut files);
    assert!(files.len() >= 4, "job files found: {files:?}");
    for file in files {
        let spec = JobSpec::from_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if let Some(world) = &spec.data.world_manifest {
            whet_rl::world::Manifest::from_file(world).unwrap_or_else(|e| {
                panic!("{}: its world {}: {e}", file.display(), world.display())
            });
        }
    }
}
