//! Running a job: submitting it (its record in the home's database, its data pinned, its
//! capability resolved), then — in the foreground, or in a `whet worker` — checking every row
//! and loading the model before any compute, training from its last checkpoint (if any) to the
//! end, and leaving the final record. Whatever goes wrong after submission, the record says why.
//!
//! Training goes through a [`Backend`]: the engine in process (the `whet` binary's), or — the
//! same job, unchanged — a remote service speaking the Tinker contract.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde_json::{json, Value};
use whet_contract::TrainingClient;
use whet_data::{Format, Row, Scaffold, Tokenizer};
use whet_sft::Rendering;

use crate::recorder::{checkpoints_of, Display, Recorder};
use crate::{capabilities, datasets, Home, JobError, JobSpec, LoraSpec, Shape, Store};

/// The base model of a job, loaded.
pub struct BaseModel {
    /// Its tokenizer (loaded when the job has conversations to render).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Its context length: the default `max_length` of a row.
    pub context_length: usize,
}

/// What trains: the engine in process, or a remote Tinker-protocol service.
pub trait Backend {
    /// Points the backend where `spec` trains (`backend`, `[tinker]`); called first, at
    /// submission and at run time. The default serves local jobs only.
    fn select(&mut self, spec: &JobSpec) -> Result<(), JobError> {
        match spec.backend {
            crate::spec::BackendKind::Local => Ok(()),
            crate::spec::BackendKind::Tinker => Err(JobError::Invalid(
                "this runner trains in process only (`backend = \"local\"`)".into(),
            )),
        }
    }
    /// Checks that `model` can be loaded (cheaply: it exists, it is a supported kind), at
    /// submission, so a job naming a missing model fails before it is queued.
    fn check_model(&mut self, model: &str) -> Result<(), JobError>;
    /// Loads the base model in `precision` ("f32" or "bf16"), with its tokenizer if asked.
    fn load_model(
        &mut self,
        model: &str,
        precision: &str,
        with_tokenizer: bool,
    ) -> Result<BaseModel, JobError>;
    /// A training client on the loaded model: a new LoRA as `lora` says, or its
    /// `init_adapter`; checkpoints are saved under `checkpoints`.
    fn training_client(
        &mut self,
        lora: &LoraSpec,
        checkpoints: &Path,
    ) -> Result<Box<dyn TrainingClient>, JobError>;
}

/// Prompts for the preview: each conversation up to its last assistant message.
fn preview_prompts(rows: &[(usize, Row)], n: usize) -> Vec<Vec<Value>> {
    rows.iter()
        .filter_map(|(_, r)| match r {
            Row::Chat(c) => {
                let last = c.messages.iter().rposition(|m| m["role"] == "assistant")?;
                Some(c.messages[..last].to_vec())
            }
            Row::Datum(_) => None,
        })
        .take(n)
        .collect()
}

/// Greedy answers (up to 48 tokens) of the session's current weights.
fn answers(
    session: &mut dyn TrainingClient,
    tok: &Tokenizer,
    prompts: &[Vec<Value>],
    scaffold: &Scaffold<'_>,
) -> Result<Vec<String>, JobError> {
    use whet_contract::{ModelInput, SamplingParams};
    let sampler = session.sampling_client()?;
    let params = SamplingParams {
        max_tokens: Some(48),
        temperature: 0.0,
        ..SamplingParams::default()
    };
    prompts
        .iter()
        .map(|messages| {
            let mut messages = messages.clone();
            if let Some(system) = scaffold.system_prompt {
                if messages.first().is_none_or(|m| m["role"] != "system") {
                    messages.insert(0, json!({"role": "system", "content": system}));
                }
            }
            let tools = (!scaffold.tools.is_empty()).then_some(scaffold.tools);
            let ids = tok.apply_chat_template(&messages, tools, true)?;
            let input = ModelInput::from_ints(ids.iter().map(|&t| t as i64).collect());
            let out = sampler.sample(&input, 1, &params, false, 0)?;
            let tokens: Vec<u32> = out.sequences[0].tokens.iter().map(|&t| t as u32).collect();
            Ok(tok.decode(&tokens, true)?.trim().to_string())
        })
        .collect()
}

/// A new job id: the name's slug and the submission time in microseconds (hex).
fn new_id(name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{slug}-{micros:x}")
}

/// Marks a job failed with `error` (record and log), keeping everything it had.
pub fn fail(store: &mut Store, record: &mut Value, error: &str) -> Result<(), JobError> {
    record["status"] = json!("failed");
    record["error"] = json!(error);
    record["completed_at"] = json!(crate::now_rfc3339());
    store.save_job(record)?;
    let id = record["id"].as_str().unwrap_or_default().to_string();
    let data = json!({"event": "training_error"});
    store.log(&id, &crate::now_rfc3339(), "error", error, &data)
}

/// Pins the job's data and resolves its capability: `dataset`, `eval_dataset` and
/// `trajectory_datasets` become `name@version:split` of the registry (plain files are published
/// first, pinned by hash). Returns the resolved spec and the record's reference fields.
fn resolve_refs(
    home: &Home,
    store: &mut Store,
    backend: &mut dyn Backend,
    spec: &JobSpec,
) -> Result<(JobSpec, Value), JobError> {
    backend.select(spec)?;
    backend.check_model(&spec.model)?;
    let mut out = spec.clone();
    let format = spec.data.format;
    let pin = |store: &mut Store, what: &str, s: &str, f: Format| -> Result<String, JobError> {
        let r = datasets::resolve_or_pin(home, store, what, s, f)?;
        Ok(format!("{}:{}", r.reference, r.split))
    };
    let mut refs = json!({"dataset_ref": null, "eval_dataset_ref": null,
                          "trajectory_dataset_refs": [], "prompt_dataset_ref": null,
                          "world_manifest_id": null, "capability": null});
    if let Some(w) = &spec.data.world_manifest {
        let m =
            whet_rl::world::Manifest::from_file(w).map_err(|e| JobError::Invalid(e.to_string()))?;
        refs["world_manifest_id"] = json!(format!("{}@{}", m.name, m.version));
    }
    if spec.shape == Shape::Rl && !spec.data.prompt_dataset.is_empty() {
        out.data.prompt_dataset = pin(
            store,
            "data.prompt_dataset",
            &spec.data.prompt_dataset,
            Format::Auto,
        )?;
        refs["prompt_dataset_ref"] = json!(out.data.prompt_dataset);
    }
    if !spec.data.dataset.is_empty() {
        out.data.dataset = pin(store, "data.dataset", &spec.data.dataset, format)?;
        refs["dataset_ref"] = json!(out.data.dataset);
    }
    if let Some(e) = &spec.data.eval_dataset {
        let r = pin(store, "data.eval_dataset", e, format)?;
        refs["eval_dataset_ref"] = json!(r);
        out.data.eval_dataset = Some(r);
    }
    out.data.trajectory_datasets = spec
        .data
        .trajectory_datasets
        .iter()
        .map(|t| pin(store, "data.trajectory_datasets", t, Format::Trajectories))
        .collect::<Result<_, _>>()?;
    refs["trajectory_dataset_refs"] = json!(out.data.trajectory_datasets);
    if let Some(c) = &spec.capability {
        let (cap, digest) = capabilities::get(store, c)?;
        refs["capability"] = json!({"name": cap.name, "version": cap.version, "digest": digest});
    }
    Ok((out, refs))
}

/// Records a new job (`queued`) and pins its inputs. A job whose inputs cannot be resolved is
/// recorded as failed, with the reason, and this returns the error (naming the job).
pub fn submit(
    home: &Home,
    store: &mut Store,
    backend: &mut dyn Backend,
    spec: &JobSpec,
    precision: &str,
    preview: usize,
    retry_of: Option<&str>,
) -> Result<Value, JobError> {
    // Paths in the record are absolute: a worker may run the job from anywhere.
    let mut spec = spec.clone();
    // A published model (`name@version`, `name@alias`): its base, continuing its adapter.
    let mut model_ref = None;
    if let Some(r) = crate::models::resolve(home, store, &spec.model)? {
        if spec.lora.init_adapter.is_some() {
            return Err(JobError::Invalid(format!(
                "model = {:?} brings its own adapter; leave out lora.init_adapter",
                spec.model
            )));
        }
        spec.model = r.base_model;
        spec.lora.init_adapter = Some(r.adapter);
        model_ref = Some(r.reference);
    }
    if let Ok(abs) = std::fs::canonicalize(&spec.model) {
        spec.model = abs.display().to_string();
    }
    if let Some(a) = &spec.lora.init_adapter {
        if let Ok(abs) = std::fs::canonicalize(a) {
            spec.lora.init_adapter = Some(abs);
        }
    }
    if let Some(w) = &spec.data.world_manifest {
        if let Ok(abs) = std::fs::canonicalize(w) {
            spec.data.world_manifest = Some(abs);
        }
    }
    let id = new_id(&spec.name);
    let dir = home.run_dir(&id);
    let mut record = json!({
        "id": id,
        "status": "queued",
        "name": spec.name,
        "backend": spec.backend,
        "trainer_type": spec.shape,
        "algorithm": spec.rl.as_ref().map(|r| json!(r.algorithm))
            .or_else(|| (spec.shape == Shape::Rl).then(|| json!(whet_rl::Algorithm::default()))),
        "model": spec.model,
        "prompt_dataset_ref": null,
        "world_manifest_id": null,
        "model_ref": model_ref,
        "precision": precision,
        "preview_prompts": preview,
        "config": spec,
        "tags": spec.tags,
        "metrics": null,
        "artifacts": {"run_dir": dir.display().to_string(), "checkpoints": [], "final_adapter": null},
        "error": null,
        "retry_of": retry_of,
        "created_at": crate::now_rfc3339(),
        "started_at": null,
        "completed_at": null,
    });
    store.create_job(&record, crate::now_unix())?;
    match resolve_refs(home, store, backend, &spec) {
        Ok((resolved, refs)) => {
            if let (Some(r), Some(refs)) = (record.as_object_mut(), refs.as_object()) {
                r.extend(refs.clone());
            }
            record["config"] = json!(resolved);
            store.save_job(&record)?;
            std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
            Ok(record)
        }
        Err(e) => {
            let msg = e.to_string();
            fail(store, &mut record, &msg)?;
            Err(JobError::Invalid(format!("job {id} failed: {msg}")))
        }
    }
}

/// Everything a run needs, checked and loaded before any compute.
struct Prepared {
    spec: JobSpec,
    preview_rows: Vec<(usize, Row)>,
    examples: Vec<whet_sft::Example>,
    eval: Vec<whet_sft::Example>,
    report: whet_sft::Prepared,
    plan: whet_sft::Plan,
    tokenizer: Option<Arc<Tokenizer>>,
    system_prompt: Option<String>,
    tools: Vec<Value>,
}

fn prepare(
    home: &Home,
    store: &mut Store,
    backend: &mut dyn Backend,
    spec: JobSpec,
    precision: &str,
) -> Result<Prepared, JobError> {
    let (system_prompt, tools) = match &spec.capability {
        Some(c) => {
            let (cap, _) = capabilities::get(store, c)?;
            (cap.system_prompt, cap.tools)
        }
        None => (None, vec![]),
    };
    // Every source's rows, read from the home (checked against their pinned sha256).
    let mut sources = Vec::new();
    if !spec.data.dataset.is_empty() {
        sources.push((spec.data.dataset.clone(), spec.data.format));
    }
    for t in &spec.data.trajectory_datasets {
        sources.push((t.clone(), Format::Trajectories));
    }
    let mut train = Vec::new();
    for (reference, format) in sources {
        let r = datasets::resolve_or_pin(home, store, "data", &reference, format)?;
        let rows = whet_data::read_rows(&r.path, format)?;
        train.push((r.path, rows));
    }
    let eval_src = match &spec.data.eval_dataset {
        Some(e) => {
            let r =
                datasets::resolve_or_pin(home, store, "data.eval_dataset", e, spec.data.format)?;
            let rows = whet_data::read_rows(&r.path, spec.data.format)?;
            Some((r.path, rows))
        }
        None => None,
    };
    // Conversations need the tokenizer; datums alone do not.
    let chats = train
        .iter()
        .chain(&eval_src)
        .flat_map(|(_, rows)| rows)
        .any(|(_, r)| matches!(r, Row::Chat(_)));
    let base = backend.load_model(&spec.model, precision, chats)?;
    let tok = base.tokenizer.as_deref();
    let rendering = Rendering {
        scaffold: Scaffold {
            system_prompt: system_prompt.as_deref(),
            tools: &tools,
        },
        train_on: spec.data.train_on,
        max_length: spec.data.max_length.unwrap_or(base.context_length),
        overflow: spec.data.overflow,
    };
    let mut examples = Vec::new();
    let mut report = whet_sft::Prepared::default();
    for (path, rows) in &train {
        let (ex, r) = whet_sft::prepare(rows, path, tok, &rendering)?;
        examples.extend(ex);
        report.dropped.extend(r.dropped);
        report.truncated.extend(r.truncated);
        report.tokens += r.tokens;
        report.trained_tokens += r.trained_tokens;
    }
    let eval = match &eval_src {
        Some((path, rows)) => whet_sft::prepare(rows, path, tok, &rendering)?.0,
        None => vec![],
    };
    let plan = whet_sft::Plan::for_examples(&examples, &spec.schedule)?;
    let preview_rows = match eval_src {
        Some((_, rows)) => rows,
        None => train.into_iter().flat_map(|(_, rows)| rows).collect(),
    };
    Ok(Prepared {
        spec,
        preview_rows,
        examples,
        eval,
        report,
        plan,
        tokenizer: base.tokenizer,
        system_prompt,
        tools,
    })
}

/// Holds `runs/<id>/lock` while a process runs the job; the lock dies with the process, so a
/// job marked `running` whose lock is free was killed.
pub fn lock(home: &Home, id: &str) -> Result<Option<std::fs::File>, JobError> {
    let dir = home.run_dir(id);
    std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
    let path = dir.join("lock");
    let file = std::fs::File::create(&path).map_err(|e| JobError::io(&path, e))?;
    // A `whet jobs list` checking liveness holds a shared lock for an instant: try a few times
    // before concluding that another runner has the job.
    for _ in 0..10 {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(JobError::io(&path, e)),
        }
    }
    Ok(None)
}

/// Whether some process is running job `id` now. Only reads: a job that never ran has no lock
/// file, and listing jobs must not create one.
pub fn runner_alive(home: &Home, id: &str) -> bool {
    let path = home.run_dir(id).join("lock");
    match std::fs::File::open(&path) {
        Ok(file) => matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        ),
        Err(_) => false,
    }
}

/// Runs job `id` (queued, or claimed as running) in this process, from its last checkpoint,
/// and returns its final record — completed, failed or cancelled. Errors only when the job
/// cannot be started at all (another process runs it, it already ended). `interrupted` (set
/// by Ctrl-C) stops it after the step in progress, as `whet jobs cancel` does.
pub fn run_job(
    home: &Home,
    backend: &mut dyn Backend,
    id: &str,
    display: &mut dyn Display,
    interrupted: &AtomicBool,
) -> Result<Value, JobError> {
    let mut store = Store::open(&home.db())?;
    let Some(_lock) = lock(home, id)? else {
        return Err(JobError::Invalid(format!(
            "job {id} is being run by another process"
        )));
    };
    if !store.transition(id, &["queued", "running"], "running")? {
        let status = store.job(id)?["status"].clone();
        return Err(JobError::Invalid(format!(
            "job {id} is {status}: nothing to run"
        )));
    }
    let mut record = store.job(id)?;
    if record["started_at"].is_null() {
        record["started_at"] = json!(crate::now_rfc3339());
    }
    record["error"] = Value::Null;
    record["runner"] = json!({"pid": std::process::id()});
    store.save_job(&record)?;
    let outcome = serde_json::from_value::<JobSpec>(record["config"].clone())
        .map_err(|e| JobError::Invalid(format!("job {id}: its stored config: {e}")))
        .and_then(|spec| backend.select(&spec).map(|()| spec))
        .and_then(|spec| match spec.shape {
            Shape::Rl => crate::rl_run::run(
                home,
                &mut store,
                backend,
                &mut record,
                &spec,
                display,
                interrupted,
            ),
            Shape::Sft => {
                let precision = record["precision"].as_str().unwrap_or("f32").to_string();
                let p = prepare(home, &mut store, backend, spec, &precision)?;
                train(
                    home,
                    &mut store,
                    backend,
                    &mut record,
                    &p,
                    display,
                    interrupted,
                )
            }
        });
    if let Err(e) = outcome {
        fail(&mut store, &mut record, &e.to_string())?;
    }
    store.job(id)
}

/// Trains from the last checkpoint to the end; leaves the final record in the store.
fn train(
    home: &Home,
    store: &mut Store,
    backend: &mut dyn Backend,
    record: &mut Value,
    p: &Prepared,
    display: &mut dyn Display,
    interrupted: &AtomicBool,
) -> Result<(), JobError> {
    let id = record["id"].as_str().unwrap_or_default().to_string();
    let mut session =
        backend.training_client(&p.spec.lora, &home.run_dir(&id).join("checkpoints"))?;
    let start = match checkpoints_of(record).last() {
        Some(c) => {
            session
                .load_state_with_optimizer(&c.state)
                .map_err(|e| JobError::Invalid(format!("loading checkpoint {}: {e}", c.state)))?;
            c.step
        }
        None => 0,
    };
    // Metrics past the checkpoint are redone.
    store.truncate_metrics(&id, start)?;
    record["data"] = json!(p.report);
    let scaffold = Scaffold {
        system_prompt: p.system_prompt.as_deref(),
        tools: &p.tools,
    };
    let tok = p.tokenizer.as_deref();
    let n_preview = record["preview_prompts"].as_u64().unwrap_or(0) as usize;
    let prompts = match tok {
        Some(_) if n_preview > 0 => preview_prompts(&p.preview_rows, n_preview),
        _ => vec![],
    };
    let before = match tok {
        Some(t) if !prompts.is_empty() => answers(session.as_mut(), t, &prompts, &scaffold)?,
        _ => vec![],
    };
    let total = p.plan.total_steps();
    let mut recorder = Recorder::new(store, record.clone(), display, interrupted);
    recorder.display().start(total, start);
    recorder.save()?;
    let (message, data) = if start == 0 {
        (
            format!(
                "training {} on {} rows, {total} steps",
                p.spec.model,
                p.examples.len()
            ),
            json!({"event": "training_start", "rows": p.examples.len(), "tokens": p.report.tokens,
                   "trained_tokens": p.report.trained_tokens, "steps": total}),
        )
    } else {
        (
            format!("resumed at step {start}"),
            json!({"event": "training_start", "resumed_from_step": start}),
        )
    };
    recorder.log("info", message, data);
    let result = whet_sft::train(
        session.as_mut(),
        &p.examples,
        &p.eval,
        &p.spec.optimizer,
        &p.spec.schedule,
        start,
        &mut recorder,
    );
    recorder.display().finish();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            // Keep what the run reached: its checkpoints and eval loss.
            *record = recorder.record.clone();
            record["artifacts"]["checkpoints"] = json!(recorder.checkpoints);
            return Err(e.into());
        }
    };
    let cancelled = outcome.stopped;
    let after = match tok {
        Some(t) if !cancelled && !prompts.is_empty() => {
            answers(session.as_mut(), t, &prompts, &scaffold)?
        }
        _ => vec![],
    };
    let preview: Vec<Value> = prompts
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(p, (b, a))| {
            let question = p.last().map(|m| m["content"].clone()).unwrap_or_default();
            json!({"prompt": question, "before": b, "after": a})
        })
        .collect();
    recorder.record["preview"] = json!(preview);
    *record = recorder.finish(outcome.steps, cancelled)?;
    Ok(())
}
