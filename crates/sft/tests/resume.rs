//! The loop on the real engine (tiny Llama fixture): resuming from a checkpoint reproduces the
//! uninterrupted run bit for bit — data order, learning-rate schedule, AdamW moments and LoRA
//! dropout masks included — and a stop keeps the last checkpoint. Batches by row count and by
//! token budget alike.

use std::path::PathBuf;

use candle_core::Device;
use whet_contract::TrainingClient;
use whet_engine::{load_model, Precision, SamplerOptions, TrainingSession};
use whet_sft::{
    train, Checkpoint, Control, Example, LrSchedule, Observer, OptimizerConfig, Plan,
    ScheduleConfig, StepMetrics,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

#[derive(Default)]
struct Log {
    steps: Vec<StepMetrics>,
    checkpoints: Vec<Checkpoint>,
    stop_after: Option<usize>,
}

impl Observer for Log {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.steps.push(m.clone());
        match self.stop_after {
            Some(n) if m.step >= n => Control::Stop,
            _ => Control::Continue,
        }
    }

    fn on_checkpoint(&mut self, c: &Checkpoint) {
        self.checkpoints.push(c.clone());
    }
}

fn session(dir: &std::path::Path) -> TrainingSession {
    let (_, model) = load_model(fixture().to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let lora = whet_lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        seed: 7,
        ..Default::default()
    };
    TrainingSession::new(model, "tiny-llama", lora, dir, SamplerOptions::default()).unwrap()
}

fn examples() -> Vec<Example> {
    let rows =
        whet_data::read_rows(&fixture().join("datums.jsonl"), whet_data::Format::Datums).unwrap();
    rows.into_iter()
        .map(|(_, row)| match row {
            whet_data::Row::Datum(d) => Example {
                weight_sum: d.loss_fn_inputs["weights"]
                    .to_f32_vec()
                    .iter()
                    .map(|&w| w as f64)
                    .sum(),
                normalize: true,
                datum: d,
            },
            other => panic!("{other:?}"),
        })
        .collect()
}

fn config() -> (OptimizerConfig, ScheduleConfig) {
    let opt = OptimizerConfig {
        learning_rate: 1e-2,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        epochs: 3,
        batch_size: 2,
        shuffle: true,
        seed: 3,
        lr_schedule: LrSchedule::Cosine,
        warmup_steps: 1,
        checkpoint_interval: 2,
        eval_interval: 3,
        ..Default::default()
    };
    (opt, schedule)
}

fn adapter_bytes(c: &Checkpoint) -> Vec<u8> {
    std::fs::read(PathBuf::from(&c.adapter).join("adapter_model.safetensors")).unwrap()
}

#[test]
fn resuming_from_a_checkpoint_is_bitwise_the_uninterrupted_run() {
    let (opt, schedule) = config();
    let data = examples();
    let eval = data[..1].to_vec();

    let dir = tempfile::tempdir().unwrap();
    let mut straight = Log::default();
    let whole = train(
        &mut session(dir.path()),
        &data,
        &eval,
        &opt,
        &schedule,
        0,
        &mut straight,
    )
    .unwrap();
    assert_eq!(
        (whole.steps, whole.total_steps, whole.stopped),
        (6, 6, false)
    );
    assert_eq!(straight.checkpoints.len(), 3); // step-2, step-4, final
    assert!(straight
        .steps
        .iter()
        .all(|m| m.loss.is_finite() && m.grad_norm > 0.0));
    assert!(straight.steps[2].eval_loss.is_some() && straight.steps[5].eval_loss.is_some());
    assert!(straight.steps[1].eval_loss.is_none());
    // Warmup then cosine: the first step at the peak / 1, the last below it.
    assert_eq!(straight.steps[0].learning_rate, 1e-2);
    assert!(straight.steps[5].learning_rate < 1e-2 * 0.1);

    // A run stopped after step 3 keeps its step-2 checkpoint and saves nothing more.
    let dir2 = tempfile::tempdir().unwrap();
    let mut stopped = Log {
        stop_after: Some(3),
        ..Default::default()
    };
    let out = train(
        &mut session(dir2.path()),
        &data,
        &eval,
        &opt,
        &schedule,
        0,
        &mut stopped,
    )
    .unwrap();
    assert!(out.stopped && out.last.is_none());
    assert_eq!(stopped.checkpoints.len(), 1);
    let resume_from = stopped.checkpoints[0].clone();
    assert_eq!(resume_from.step, 2);

    // A fresh session resumes from it and ends where the straight run ended, bit for bit.
    let mut resumed_session = session(dir2.path());
    resumed_session
        .load_state_with_optimizer(&resume_from.state)
        .unwrap();
    let mut resumed = Log::default();
    let end = train(
        &mut resumed_session,
        &data,
        &eval,
        &opt,
        &schedule,
        resume_from.step,
        &mut resumed,
    )
    .unwrap();
    assert_eq!(end.steps, 6);
    let losses = |l: &Log| {
        l.steps
            .iter()
            .map(|m| (m.step, m.loss.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&resumed), losses(&straight)[2..].to_vec());
    assert_eq!(
        adapter_bytes(end.last.as_ref().unwrap()),
        adapter_bytes(whole.last.as_ref().unwrap())
    );
}

#[test]
fn a_token_budget_run_trains_and_resumes_bitwise() {
    let (opt, rows_schedule) = config();
    let data = examples(); // 5, 11 and 17 tokens
    let lengths: Vec<usize> = data.iter().map(Example::tokens).collect();
    // 20 tokens a step: 2 or 3 steps an epoch by the order; 2 accumulation parts, so steps of
    // a single row run one part.
    let schedule = ScheduleConfig {
        batch_tokens: Some(20),
        batch_size: ScheduleConfig::default().batch_size, // a budget replaces it
        gradient_accumulation_steps: 2,
        seed: 4, // epochs of 2, 3 and 3 steps
        ..rows_schedule
    };
    let plan = Plan::for_examples(&data, &schedule).unwrap();
    let per_epoch: Vec<usize> = (0..3).map(|e| plan.steps_in_epoch(e)).collect();
    assert!(
        per_epoch.contains(&2) && per_epoch.contains(&3),
        "the seed gives epochs of different lengths: {per_epoch:?}"
    );
    let total = plan.total_steps();
    assert_eq!(total, per_epoch.iter().sum::<usize>());
    for step in 0..total {
        let tokens: usize = plan.batch(step).iter().map(|&r| lengths[r]).sum();
        assert!(tokens <= 20, "step {step}: {tokens} tokens");
    }
    let eval = data[..1].to_vec();

    let dir = tempfile::tempdir().unwrap();
    let mut straight = Log::default();
    let whole = train(
        &mut session(dir.path()),
        &data,
        &eval,
        &opt,
        &schedule,
        0,
        &mut straight,
    )
    .unwrap();
    assert_eq!((whole.steps, whole.total_steps), (total, total));
    assert!(straight
        .steps
        .iter()
        .all(|m| m.loss.is_finite() && m.grad_norm > 0.0 && m.num_tokens <= 20));

    // Stopped after step 5 (checkpoints at 2 and 4), resumed from step 4 — inside the second
    // epoch, whose batches differ from the first's — in a fresh session: the same run.
    let dir2 = tempfile::tempdir().unwrap();
    let mut stopped = Log {
        stop_after: Some(5),
        ..Default::default()
    };
    train(
        &mut session(dir2.path()),
        &data,
        &eval,
        &opt,
        &schedule,
        0,
        &mut stopped,
    )
    .unwrap();
    let resume_from = stopped.checkpoints.last().unwrap().clone();
    assert_eq!(resume_from.step, 4);
    let mut resumed_session = session(dir2.path());
    resumed_session
        .load_state_with_optimizer(&resume_from.state)
        .unwrap();
    let mut resumed = Log::default();
    let end = train(
        &mut resumed_session,
        &data,
        &eval,
        &opt,
        &schedule,
        resume_from.step,
        &mut resumed,
    )
    .unwrap();
    assert_eq!(end.steps, total);
    let losses = |l: &Log| {
        l.steps
            .iter()
            .map(|m| (m.step, m.loss.to_bits(), m.num_tokens))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&resumed), losses(&straight)[4..].to_vec());
    assert_eq!(
        adapter_bytes(end.last.as_ref().unwrap()),
        adapter_bytes(whole.last.as_ref().unwrap())
    );
}
