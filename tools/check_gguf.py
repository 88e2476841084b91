#!/usr/bin/env python3
"""Check a GGUF file written by `whet models export --format gguf` (or `whet adapter merge
--format gguf`) with llama.cpp's own reader, the `gguf` package from PyPI.

    pip install gguf safetensors numpy
    whet models export NAME@VERSION --format merged --out merged/
    whet models export NAME@VERSION --format gguf --gguf-type q8_0 --out gguf/
    python3 tools/check_gguf.py gguf/model-q8_0.gguf merged/

It opens the file with `gguf.GGUFReader`, lists its tensors and types, and checks:
- metadata: general.architecture / file_type / alignment, the `<arch>.*` hyperparameters
  against the merged directory's config.json, the tokenizer keys llama.cpp needs
  (one token per embedding row);
- tensors: llama.cpp's names, GGUF dims (innermost first), types (1-D f32; 2-D f16, or q8_0
  where a row is a whole number of 32-value blocks);
- values: every tensor dequantized with gguf-py and compared with the merged safetensors, after
  undoing llama.cpp's q/k row permutation (`llama` only). f16 must be exactly numpy's f16 of the
  merged value, f32 exact, q8_0 within its rounding bound (half a step of the block, plus the
  f16 rounding of the block's scale); q8_0 blocks are also compared byte for byte with gguf-py's
  own quantizer (the reference implementation in numpy).

Exit status 0 when every check passes, 1 otherwise. Not run by CI (it needs PyPI).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
    from safetensors.numpy import load_file
except ImportError as e:  # pragma: no cover
    sys.exit(f"{e}: pip install gguf safetensors numpy")

F32, F16, Q8_0 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                  gguf.GGMLQuantizationType.Q8_0)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

failures = []


def check(ok, message):
    if not ok:
        failures.append(message)
        print(f"  FAIL {message}")
    return ok


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def hf_name(name):
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"


def unpermute(w, n_heads):
    """Undo llama.cpp's converter permutation: rows (head, i, half) -> (head, half, i)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_merged(d: Path):
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


def expected_tensors(cfg, arch):
    names = {"token_embd.weight", "output_norm.weight"}
    if not cfg.get("tie_word_embeddings", True):
        names.add("output.weight")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if arch == "llama" and rope.get("rope_type", rope.get("type")) == "llama3":
        names.add("rope_freqs.weight")
    for i in range(cfg["num_hidden_layers"]):
        for m in ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_gate", "ffn_up", "ffn_down"]:
            names.add(f"blk.{i}.{m}.weight")
        if arch == "qwen2":
            names.update(f"blk.{i}.{m}.bias" for m in ["attn_q", "attn_k", "attn_v"])
        if arch == "qwen3":
            names.update(f"blk.{i}.{m}.weight" for m in ["attn_q_norm", "attn_k_norm"])
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, help="the exported .gguf file")
    ap.add_argument("merged", type=Path, help="the --format merged export of the same model")
    ap.add_argument("--quiet", action="store_true", help="do not list every tensor")
    a = ap.parse_args()

    reader = gguf.GGUFReader(str(a.gguf))
    cfg = json.loads((a.merged / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    print(f"{a.gguf}: GGUF v{field(reader, 'GGUF.version')}, {len(reader.tensors)} tensors, "
          f"{len(reader.fields)} fields")

    print("metadata:")
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        shown = f"[{len(v)} items]" if isinstance(v, list) else repr(v)
        print(f"  {k} = {shown[:90]}")
    check(field(reader, "general.architecture") == arch, f"general.architecture is not {arch}")
    file_type = field(reader, "general.file_type")
    check(file_type in (1, 7), f"general.file_type {file_type} is not 1 (f16) or 7 (q8_0)")
    check(field(reader, "general.alignment") in (None, 32), "general.alignment is not 32")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    for key, want in [
        ("block_count", cfg["num_hidden_layers"]),
        ("context_length", cfg["max_position_embeddings"]),
        ("embedding_length", cfg["hidden_size"]),
        ("feed_forward_length", cfg["intermediate_size"]),
        ("attention.head_count", cfg["num_attention_heads"]),
        ("attention.head_count_kv", cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        ("attention.key_length", head_dim),
        ("rope.dimension_count", head_dim),
        ("vocab_size", cfg["vocab_size"]),
    ]:
        got = field(reader, f"{arch}.{key}")
        check(got == want, f"{arch}.{key} = {got}, config.json says {want}")
    eps = field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    check(eps is not None and abs(eps / cfg["rms_norm_eps"] - 1) < 1e-6, f"rms epsilon {eps}")
    for key in ["model", "pre", "tokens", "token_type", "merges", "eos_token_id"]:
        check(field(reader, f"tokenizer.ggml.{key}") is not None, f"tokenizer.ggml.{key} is missing")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    check(len(tokens) == cfg["vocab_size"],
          f"{len(tokens)} tokens for {cfg['vocab_size']} embedding rows (llama.cpp needs one each)")
    check(len(field(reader, "tokenizer.ggml.token_type") or []) == len(tokens), "token_type length")
    if field(reader, "tokenizer.chat_template") is None:
        print("  note: no tokenizer.chat_template")

    print("tensors:")
    names = {t.name for t in reader.tensors}
    want_names = expected_tensors(cfg, arch)
    check(names == want_names, f"tensor names: missing {sorted(want_names - names)[:5]}, "
                               f"unexpected {sorted(names - want_names)[:5]}")
    merged = load_merged(a.merged)
    heads = {"attn_q": cfg["num_attention_heads"],
             "attn_k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    counts = {}
    worst = {}
    q8_blocks = q8_same = 0
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]
        ty = t.tensor_type
        counts[ty.name] = counts.get(ty.name, 0) + 1
        if not a.quiet:
            print(f"  {t.name:32s} {ty.name:5s} ne={ne}")
        want_ty = F32 if len(ne) == 1 else (Q8_0 if file_type == 7 and ne[0] % 32 == 0 else F16)
        check(ty == want_ty, f"{t.name}: type {ty.name}, expected {want_ty.name}")
        if t.name == "rope_freqs.weight":
            continue
        ref = merged.get(hf_name(t.name))
        if not check(ref is not None, f"{t.name}: no {hf_name(t.name)} in the merged model"):
            continue
        ref = ref.astype(np.float32)
        check(list(reversed(ne)) == list(ref.shape),
              f"{t.name}: ne {ne} is not the merged shape {list(ref.shape)} innermost first")
        got = gguf.quants.dequantize(t.data, ty).reshape(ref.shape)
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch == "llama" and part in heads:
            got = unpermute(got, heads[part])
        err = np.abs(got - ref)
        if ty == F32:
            ok = bool((got == ref).all())
        elif ty == F16:
            ok = bool((got == ref.astype(np.float16).astype(np.float32)).all())
        else:
            blocks = ref.reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            bound = amax / 254 + amax * 2.0 ** -11 + 1e-7
            ok = bool((err.reshape(-1, 32) <= bound).all())
            # Byte for byte against gguf-py's reference quantizer (on the permuted rows, as
            # the file holds them); a value exactly between two steps may round either way.
            stored = ref
            if arch == "llama" and part in heads:
                n = heads[part]
                stored = ref.reshape(n, 2, ref.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(ref.shape)
            mine = np.asarray(t.data).reshape(-1, 34)
            theirs = gguf.quants.quantize(stored, Q8_0).reshape(-1, 34)
            q8_blocks += mine.shape[0]
            q8_same += int((mine == theirs).all(axis=1).sum())
        check(ok, f"{t.name}: {ty.name} values off the merged weights by up to {err.max():.3g}")
        w = worst.get(ty.name, (0.0, ""))
        if err.max() >= w[0]:
            worst[ty.name] = (float(err.max()), t.name)

    print("summary:")
    print(f"  tensor types: {counts}")
    for ty, (e, name) in worst.items():
        print(f"  {ty}: max |dequantized - merged| = {e:.3g} ({name})")
    if q8_blocks:
        print(f"  q8_0 blocks identical to gguf-py's quantizer: {q8_same}/{q8_blocks} "
              f"({100 * q8_same / q8_blocks:.4f}%)")
        check(q8_same >= 0.999 * q8_blocks, "q8_0 blocks differ from gguf-py's quantizer")
    if failures:
        print(f"FAILED: {len(failures)} check(s)")
        return 1
    print("OK: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
