"""Shared helpers for whet's PyTorch-side CPU benchmarks (torch_sft.py, torch_sample.py, make_data.py)."""

import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = os.path.join(ROOT, "benches")
DATA = os.path.join(BENCHES, "data")
GGUF_DIR = os.path.join(ROOT, "models")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_CACHE = os.path.join(BENCHES, ".cache", "smollm2-hf")
THREADS = 2


def log(*args):
    """Progress goes to stderr; stdout carries only the JSON result line."""
    print(*args, file=sys.stderr, flush=True)


def peak_rss_bytes():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ensure_hf_cache():
    """Dequantize the GGUF once (transformers parses its metadata in pure Python: ~15 s) and keep an
    fp32 safetensors copy plus the tokenizer under benches/.cache/, so the benchmarks load in <1 s
    and never time the GGUF parse."""
    marker = os.path.join(HF_CACHE, ".complete")
    if os.path.exists(marker):
        return HF_CACHE
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.join(GGUF_DIR, GGUF_FILE)
    if not os.path.exists(gguf):
        raise SystemExit(f"{gguf} is missing: run tools/get-smollm2.sh first")
    log(f"caching an fp32 safetensors copy of {GGUF_FILE} in {HF_CACHE} (once)")
    t = time.time()
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    os.makedirs(HF_CACHE, exist_ok=True)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): the weights are already
    # plain fp32, so move them into a model built from the same config and save that one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(HF_CACHE)
    tok.save_pretrained(HF_CACHE)
    with open(marker, "w") as f:
        f.write(GGUF_FILE + "\n")
    log(f"cached in {time.time() - t:.1f} s")
    return HF_CACHE


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_hf_cache())


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ensure_hf_cache(), dtype=torch.float32)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def emit(result):
    print(json.dumps(result), flush=True)
