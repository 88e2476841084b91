"""Drives a Tinker-protocol server with the official `tinker` Python SDK and writes what came back.

The conformance test of `whet serve` runs this script with the real SDK, once per supported
version (0.38.0 and 0.34.0, installed by tools/get-tinker-sdk.sh), against a live server, and then
asserts on the JSON report: that every SDK call the cookbook relies on works unchanged, and that
the numbers agree with whet's own engine. What the report lets the test check:

- a. LoRA creation (`rank`, `seed`, `train_unembed` travel in `lora_config`) and `get_info`;
- b. `forward` with each built-in loss and its config (per-datum logprobs, metrics);
- b2. on a second LoRA client, `forward_backward` + `optim_step` with each loss in turn (each
  step's gradient shows in its `grad_norm` and in the next call's logprobs);
- c. two accumulated `forward_backward` calls and an `optim_step`, submitted back to back
  before any result is read (the SDK pipelines them: the server must order them by seq id);
- d. `save_state` / `save_weights_for_sampler` paths;
- e./f. one more step on the original client and on a client resumed with
  `create_training_client_from_state_with_optimizer` (must be equal: optimizer state restored)
  and with `create_training_client_from_state` (weights only: a fresh optimizer, so different);
- g./h. sampling from an ephemeral sampler, a named sampler checkpoint and the base model
  (greedy and seeded samples, `compute_logprobs`, prompt logprobs and their top-k);
- i. the REST listing of checkpoints and training runs;
- j. `tinker checkpoint download` (the SDK's own CLI, as a subprocess);
- k. errors for bad input (unknown model, out-of-vocabulary token, missing checkpoint).

Every value is recorded in the report (floats as JSON numbers, NaN as null). An unexpected
failure in a–j stops the run: the report then holds what was gathered plus `fatal` (the
traceback) and `fatal_step`, and the script exits 1. Errors in k are expected and recorded.

Run it by hand against a `whet serve`:

    tools/get-tinker-sdk.sh                       # once: .venv/tinker-0.38.0, .venv/tinker-0.34.0
    whet serve --port 8000 ...                    # in another shell
    TINKER_API_KEY=tml-test TINKER_TELEMETRY=0 .venv/tinker-0.38.0/bin/python \
        crates/cli/tests/tinker_sdk/drive.py --base-url http://127.0.0.1:8000 \
        --model <model name the server serves> \
        --datums tests/fixtures/tiny-llama/datums.jsonl \
        --out /tmp/report.json --work /tmp/drive-work

The same command with .venv/tinker-0.34.0/bin/python drives the older SDK.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tinker
from tinker import types

SDK_VERSION = tinker.__version__
TIMEOUT = 120.0  # seconds for any one SDK call (--timeout); the driver must never hang
DOWNLOAD_TIMEOUT = 300.0  # for the whole `tinker checkpoint download` subprocess

# Config of each loss for step b (None: no config).
LOSS_CONFIGS: dict[str, dict[str, float] | None] = {
    "cross_entropy": None,
    "importance_sampling": None,
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
}
# The loss_fn_inputs each kind of loss is given (the server refuses unknown or missing ones).
CE_INPUTS = ("target_tokens", "weights")
RL_INPUTS = ("target_tokens", "logprobs", "advantages")
LEARNING_RATE = 1e-2


# ---------------------------------------------------------------------------------------------
# Helpers: waiting with a timeout, the 0.34/0.38 difference, JSON conversion.


def call_with_timeout(fn: Callable[[], Any], timeout: float | None = None) -> Any:
    """Runs fn() in a daemon thread and returns its value; TimeoutError if it takes longer.

    For SDK calls that block without a timeout argument (0.34's create_* methods)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    timeout = TIMEOUT if timeout is None else timeout
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait(future: Any, timeout: float | None = None) -> Any:
    """The result of an SDK future (APIFuture or concurrent Future), waiting at most `timeout`."""
    timeout = TIMEOUT if timeout is None else timeout
    try:
        return future.result(timeout=timeout)
    except TimeoutError as e:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
        raise TimeoutError(f"no result within {timeout:.0f} s") from e


def new_client(make: Callable[[], Any], timeout: float | None = None) -> Any:
    """Calls a client-creating SDK method and returns the client, in either SDK version.

    0.38's `create_*` and `save_weights_and_get_sampling_client` return a future of the client
    (a BackcompatClientFuture, which is also an instance of the client class, so isinstance
    cannot tell them apart: look for `result`); 0.34's block and return the client itself."""

    def run() -> Any:
        made = make()
        if callable(getattr(type(made), "result", None)):
            return wait(made, timeout)
        return made

    return call_with_timeout(run, timeout)


def jsonable(value: Any) -> Any:
    """Plain JSON data from SDK values: pydantic models, dataclasses, numpy, tuples; NaN → None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, types.TensorData):
        return jsonable(value.data)
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(mode="json"))
    return repr(value)


def error_record(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error_type": type(e).__name__, "message": str(e)[:500]}


def text_tail(text: str | bytes | None, n: int = 2000) -> str:
    """The last n characters of a subprocess's output (bytes after a timeout, else str)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-n:]


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Writes the report atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Data


def tensor(spec: dict[str, Any]) -> types.TensorData:
    """A TensorData from its JSON form, keeping the dtype the file gives."""
    return types.TensorData(data=spec["data"], dtype=spec["dtype"], shape=spec.get("shape"))


def prompt_tokens(row: dict[str, Any]) -> list[int]:
    tokens: list[int] = []
    for chunk in row["model_input"]["chunks"]:
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise ValueError(f"only encoded_text chunks are supported, got {chunk.get('type')}")
        tokens.extend(int(t) for t in chunk["tokens"])
    return tokens


def make_datum(row: dict[str, Any], keys: tuple[str, ...]) -> types.Datum:
    inputs = row["loss_fn_inputs"]
    missing = [k for k in keys if k not in inputs]
    if missing:
        raise ValueError(f"datum lacks loss_fn_inputs {missing}")
    return types.Datum(
        model_input=types.ModelInput.from_ints(prompt_tokens(row)),
        loss_fn_inputs={k: tensor(inputs[k]) for k in keys},
    )


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no datums")
    return rows


# ---------------------------------------------------------------------------------------------
# Records


def fb_record(out: Any) -> dict[str, Any]:
    """A ForwardBackwardOutput: per-datum logprobs and the metrics."""
    return {
        "logprobs": [o["logprobs"].data for o in out.loss_fn_outputs],
        "metrics": dict(out.metrics),
        "loss_fn_output_type": out.loss_fn_output_type,
    }


def sample_record(resp: Any) -> dict[str, Any]:
    return {
        "sequences": [
            {
                "tokens": list(s.tokens),
                "logprobs": s.logprobs,
                "stop_reason": str(s.stop_reason),
                "sequence_id": s.sequence_id,
            }
            for s in resp.sequences
        ],
        "prompt_logprobs": resp.prompt_logprobs,
        "topk_prompt_logprobs": resp.topk_prompt_logprobs,
    }


# ---------------------------------------------------------------------------------------------
# The steps, in order. Each reads and writes the shared state `s` and the report `r`.


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        rows = load_rows(Path(args.datums))
        self.rows = rows
        self.ce = [make_datum(row, CE_INPUTS) for row in rows]
        self.rl = [make_datum(row, RL_INPUTS) for row in rows]
        self.prompt = types.ModelInput.from_ints(prompt_tokens(rows[0]))
        self.sc: Any = None
        self.tc: Any = None
        self.state_path = ""
        self.sampler_path = ""


def train_step(tc: Any, s: State) -> dict[str, Any]:
    """forward_backward(ce) + optim_step, then a forward(ce) on the new weights."""
    fb = tc.forward_backward(s.ce, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
    out = {"fb": fb_record(wait(fb)), "optim": wait(opt).metrics}
    out["after"] = fb_record(wait(tc.forward(s.ce, "cross_entropy")))
    return out


def step_a_create(s: State, r: dict[str, Any]) -> None:
    s.sc = tinker.ServiceClient(base_url=s.args.base_url)
    s.tc = new_client(
        lambda: s.sc.create_lora_training_client(
            base_model=s.args.model, rank=4, seed=7, train_unembed=False
        )
    )
    r["tc_model_id"] = s.tc.model_id
    r["info"] = call_with_timeout(s.tc.get_info)  # 0.34 asks the server; 0.38 has it cached


def step_b_forward_losses(s: State, r: dict[str, Any]) -> None:
    r["forward"] = {}
    for loss, config in LOSS_CONFIGS.items():
        data = s.ce if loss == "cross_entropy" else s.rl
        r["forward"][loss] = fb_record(wait(s.tc.forward(data, loss, config)))


def step_b2_train_every_loss(s: State, r: dict[str, Any]) -> None:
    tc = new_client(
        lambda: s.sc.create_lora_training_client(
            base_model=s.args.model, rank=4, seed=7, train_unembed=False
        )
    )
    r["every_loss"] = {}
    for loss, config in LOSS_CONFIGS.items():
        data = s.ce if loss == "cross_entropy" else s.rl
        fb = fb_record(wait(tc.forward_backward(data, loss, config)))
        optim = wait(tc.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))).metrics
        r["every_loss"][loss] = {"fb": fb, "optim": optim}


def step_c_pipelined_step(s: State, r: dict[str, Any]) -> None:
    # All three are submitted before any result is read: the server has them queued at once
    # (and may receive them out of order) and must run them in seq-id order.
    fb_ce = s.tc.forward_backward(s.ce, "cross_entropy")
    fb_ppo = s.tc.forward_backward(s.rl, "ppo", LOSS_CONFIGS["ppo"])
    optim = s.tc.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
    r["step1"] = {
        "fb_ce": fb_record(wait(fb_ce)),
        "fb_ppo": fb_record(wait(fb_ppo)),
        "optim": wait(optim).metrics,
    }
    r["after_step1"] = fb_record(wait(s.tc.forward(s.ce, "cross_entropy")))


def step_d_save(s: State, r: dict[str, Any]) -> None:
    s.state_path = wait(s.tc.save_state("s1")).path
    s.sampler_path = wait(s.tc.save_weights_for_sampler("w1")).path
    r["state_path"] = s.state_path
    r["sampler_path"] = s.sampler_path


def step_e_second_step(s: State, r: dict[str, Any]) -> None:
    r["tc_step2"] = train_step(s.tc, s)


def step_f_resume(s: State, r: dict[str, Any]) -> None:
    tc2 = new_client(lambda: s.sc.create_training_client_from_state_with_optimizer(s.state_path))
    r["tc2_model_id"] = tc2.model_id
    r["tc2_step2"] = train_step(tc2, s)
    tc3 = new_client(lambda: s.sc.create_training_client_from_state(s.state_path))
    r["tc3_model_id"] = tc3.model_id
    r["tc3_step2"] = train_step(tc3, s)


def step_g_ephemeral_sampler(s: State, r: dict[str, Any]) -> None:
    sampler = new_client(lambda: s.tc.save_weights_and_get_sampling_client())
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, seed=1)
    seeded = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    out: dict[str, Any] = {}
    out["greedy"] = sample_record(
        wait(sampler.sample(prompt=s.prompt, num_samples=2, sampling_params=greedy))
    )
    out["seeded"] = sample_record(
        wait(sampler.sample(prompt=s.prompt, num_samples=2, sampling_params=seeded))
    )
    out["compute_logprobs"] = wait(sampler.compute_logprobs(s.prompt))
    out["prompt_logprobs"] = sample_record(
        wait(
            sampler.sample(
                prompt=s.prompt,
                num_samples=1,
                sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0, seed=1),
                include_prompt_logprobs=True,
                topk_prompt_logprobs=3,
            )
        )
    )
    r["ephemeral_sampler"] = out


def step_h_named_and_base_samplers(s: State, r: dict[str, Any]) -> None:
    named = new_client(lambda: s.sc.create_sampling_client(model_path=s.sampler_path))
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, seed=1)
    r["named_sampler"] = {
        "greedy": sample_record(
            wait(named.sample(prompt=s.prompt, num_samples=2, sampling_params=greedy))
        ),
        "compute_logprobs": wait(named.compute_logprobs(s.prompt)),
    }
    base = new_client(lambda: s.sc.create_sampling_client(base_model=s.args.model))
    r["base_sampler"] = {"compute_logprobs": wait(base.compute_logprobs(s.prompt))}


def step_i_rest(s: State, r: dict[str, Any]) -> None:
    # 0.38 deprecates ServiceClient.create_rest_client() for tinker.RestClient(base_url=...);
    # 0.34 has only the former.
    if hasattr(tinker, "RestClient"):
        rc = tinker.RestClient(base_url=s.args.base_url)
    else:
        rc = s.sc.create_rest_client()
    run_id = s.tc.model_id

    def checkpoints(resp: Any) -> list[dict[str, Any]]:
        return [
            {
                "checkpoint_id": c.checkpoint_id,
                "checkpoint_type": c.checkpoint_type,
                "tinker_path": c.tinker_path,
            }
            for c in resp.checkpoints
        ]

    r["rest"] = {
        "list_checkpoints": checkpoints(wait(rc.list_checkpoints(run_id))),
        "list_user_checkpoints": checkpoints(wait(rc.list_user_checkpoints())),
        "training_run": wait(rc.get_training_run(run_id)),
        "training_run_by_path": wait(rc.get_training_run_by_tinker_path(s.state_path)),
        "weights_info": wait(rc.get_weights_info_by_tinker_path(s.state_path)),
    }


def step_j_download(s: State, r: dict[str, Any]) -> None:
    """`tinker checkpoint download` as a subprocess: 0.38 exports the training checkpoint
    through save_weights_external + signed URLs, 0.34 fetches a tar through `archive`.
    A failure is recorded, not raised."""
    dest = Path(s.args.work) / "dl"
    if dest.exists():
        shutil.rmtree(dest)
    cmd = [sys.executable, "-m", "tinker.cli", "--format", "json"]
    cmd += ["checkpoint", "download", s.state_path, "--output", str(dest)]
    # The CLI builds its clients from the environment only.
    env = dict(os.environ, TINKER_BASE_URL=s.args.base_url)
    out: dict[str, Any] = {"cmd": cmd}
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT
        )
        out["returncode"] = proc.returncode
        try:  # --format json: {"checkpoint_path", "destination", "file_size_bytes"?}
            out["output"] = json.loads(proc.stdout)
        except ValueError:
            out["output"] = None
        if proc.returncode != 0:
            out["stdout_tail"] = text_tail(proc.stdout)
            out["stderr_tail"] = text_tail(proc.stderr)
    except subprocess.TimeoutExpired as e:
        out["returncode"] = None
        out["error"] = f"timed out after {DOWNLOAD_TIMEOUT:.0f} s"
        out["stderr_tail"] = text_tail(e.stderr)
    out["files"] = (
        sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
        if dest.exists()
        else []
    )
    r["download"] = out


def step_k_bad_input(s: State, r: dict[str, Any]) -> None:
    """Each call must fail; its error is recorded (or {"ok": true} if it wrongly succeeded)."""

    def expect_error(fn: Callable[[], Any]) -> dict[str, Any]:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded for the test
            return error_record(e)
        return {"ok": True, "value": repr(value)[:500]}

    tokens = prompt_tokens(s.rows[0])
    oov = types.Datum(
        model_input=types.ModelInput.from_ints([10**6] + tokens[1:]),
        loss_fn_inputs={k: tensor(s.rows[0]["loss_fn_inputs"][k]) for k in CE_INPUTS},
    )
    r["errors"] = {
        "unknown_model": expect_error(
            lambda: new_client(
                lambda: s.sc.create_lora_training_client(base_model="no/such-model", rank=4)
            )
        ),
        "out_of_vocab": expect_error(lambda: wait(s.tc.forward([oov], "cross_entropy"))),
        "missing_checkpoint": expect_error(
            lambda: new_client(
                lambda: s.sc.create_training_client_from_state(
                    "tinker://nonexistent:train:0/weights/nope"
                )
            )
        ),
    }


def close_session(sc: Any, status: str) -> bool:
    """ServiceClient.close(status) (finishes the server session); False if the SDK lacks it."""
    close = getattr(sc, "close", None)
    if close is None:
        return False
    done = close(status)
    if done is not None and callable(getattr(done, "result", None)):
        wait(done)
    return True


def step_l_close(s: State, r: dict[str, Any]) -> None:
    r["closed"] = close_session(s.sc, "success")


STEPS = [
    step_a_create,
    step_b_forward_losses,
    step_b2_train_every_loss,
    step_c_pipelined_step,
    step_d_save,
    step_e_second_step,
    step_f_resume,
    step_g_ephemeral_sampler,
    step_h_named_and_base_samplers,
    step_i_rest,
    step_j_download,
    step_k_bad_input,
    step_l_close,
]


def main() -> int:
    global TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True, help="base model name the server serves")
    ap.add_argument("--datums", required=True, help="JSONL of Tinker datums (JSON form)")
    ap.add_argument("--out", required=True, help="where to write the JSON report")
    ap.add_argument("--work", required=True, help="scratch directory (downloads)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds for one SDK call")
    args = ap.parse_args()
    TIMEOUT = args.timeout
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    report: dict[str, Any] = {"sdk_version": SDK_VERSION, "steps_done": []}
    code = 0
    step_name = "setup"
    s: State | None = None
    try:
        s = State(args)
        for step in STEPS:
            step_name = step.__name__
            step(s, report)
            report["steps_done"].append(step_name)
    except BaseException:  # noqa: BLE001 - anything unexpected ends the run, recorded
        report["fatal_step"] = step_name
        report["fatal"] = traceback.format_exc()
        print(report["fatal"], file=sys.stderr)
        code = 1
        if s is not None and s.sc is not None and step_name != "step_l_close":
            try:  # best effort: let the server end the session now
                close_session(s.sc, "errored")
            except Exception:  # noqa: BLE001
                pass
    write_report(out, report)
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK's background threads (heartbeats, a call that timed out) must not keep the
    # process alive once the report is written.
    os._exit(exit_code)
