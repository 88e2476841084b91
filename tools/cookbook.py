#!/usr/bin/env python3
"""Runs a tinker-cookbook recipe (`sl_loop`, `rl_loop`, ...) unmodified against `whet serve`,
on a machine without the Hugging Face Hub.

    .venv/cookbook/bin/python tools/cookbook.py [launcher options] RECIPE key=value ...

Launcher options (`--home`, `--tokenizer`, `--hf-cache`, `--online`) come before RECIPE.
RECIPE is `sl_loop`, `rl_loop` or any module under `tinker_cookbook.recipes`; the `key=value`
arguments go to the recipe's own chz command line as they are (`base_url=`, `model_name=`,
`batch_size=`, ...). `model_name=` is required: it must be the name `whet serve --model NAME=M`
serves and a model id the cookbook's `model_info` table knows (it picks the renderer), e.g.
`meta-llama/Llama-3.2-1B`. Before running the recipe's `__main__` (through `runpy`, exactly as
`python -m tinker_cookbook.recipes.RECIPE` would) this launcher:

1. Tokenizer: registers one for `model_name` with `tinker_cookbook.tokenizer_utils.
   register_tokenizer`, the cookbook's own hook, so `get_tokenizer(model_name)` loads it with
   `transformers.AutoTokenizer.from_pretrained(DIR)` instead of from the Hub. DIR is
   `--tokenizer DIR`, else the directory `whet serve` writes for the served name (and reports as
   `get_info`'s `tokenizer_id`): `HOME/tokenizers/<model_name, '/' and ':' -> '__'>`, HOME being
   `--home`, else $WHET_HOME, else ~/.whet.
2. Datasets: writes the rows of datasets/cookbook/ into a Hugging Face datasets cache
   (`--hf-cache`, default .venv/cookbook-hf/datasets) under the ids the recipes load —
   `HuggingFaceH4/no_robots` (config `default`, splits train/test) and `openai/gsm8k` (config
   `main`) — with the datasets library's own builder (`download_and_prepare`, the layout a real
   download leaves), sets HF_DATASETS_CACHE to it and HF_HUB_OFFLINE=1. The recipes'
   `datasets.load_dataset(...)` then finds no Hub and falls back to that cache, as `datasets`
   does for any offline machine ("Using the latest cached version of the dataset ..."). The
   cache is rebuilt only when the JSONL files change. `--online` skips this step and leaves the
   Hub reachable: the recipes then load the real datasets (the tokenizer stays the local one).
3. TINKER_API_KEY: set to `tml-local` when unset (a loopback `whet serve` accepts any `tml-` key).

Example (a server started with `whet serve --model meta-llama/Llama-3.2-1B=models/...gguf`):

    .venv/cookbook/bin/python tools/cookbook.py sl_loop base_url=http://127.0.0.1:8000 \\
        model_name=meta-llama/Llama-3.2-1B batch_size=8 max_steps=3 log_path=/tmp/sl
"""

import argparse
import functools
import hashlib
import json
import os
import runpy
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hub id -> (config name, directory of {split}.jsonl under datasets/cookbook/).
DATASETS = {
    "HuggingFaceH4/no_robots": ("default", "no_robots"),
    "openai/gsm8k": ("main", "gsm8k"),
}


def features_for(rows):
    """The Hub datasets' column types: strings, and `messages` as a list of {content, role}."""
    import datasets

    string = datasets.Value("string")
    cols = {}
    for key in rows[0]:
        if key == "messages":
            cols[key] = [{"content": string, "role": string}]
        else:
            cols[key] = string
    return datasets.Features(cols)


def build_cache(cache_dir, repo_id, config_name, src_dir):
    """Writes src_dir/{split}.jsonl as the cached dataset `repo_id` (config `config_name`):
    CACHE/<ns>___<name>/<config>/0.0.0/<hash>/, the directory `load_dataset` reads offline."""
    import datasets

    splits = sorted(f[: -len(".jsonl")] for f in os.listdir(src_dir) if f.endswith(".jsonl"))
    if not splits:
        sys.exit(f"cookbook.py: no *.jsonl in {src_dir}")
    digest = hashlib.sha256()
    for split in splits:
        with open(os.path.join(src_dir, f"{split}.jsonl"), "rb") as f:
            digest.update(split.encode() + b"\0" + f.read() + b"\0")
    hash_ = digest.hexdigest()[:16]
    namespace, name = repo_id.split("/")
    root = os.path.join(cache_dir, f"{namespace}___{name}")
    if os.path.isfile(os.path.join(root, config_name, "0.0.0", hash_, "dataset_info.json")):
        return  # up to date
    shutil.rmtree(root, ignore_errors=True)  # one version only: load_dataset takes the newest

    def read(split):
        with open(os.path.join(src_dir, f"{split}.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    features = features_for(read(splits[0]))

    class LocalRows(datasets.GeneratorBasedBuilder):
        VERSION = datasets.Version("0.0.0")
        BUILDER_CONFIGS = [datasets.BuilderConfig(name=config_name, version=VERSION)]

        def _info(self):
            return datasets.DatasetInfo(
                description=f"Offline stand-in for {repo_id}: {src_dir}", features=features
            )

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name=s, gen_kwargs={"split": s}) for s in splits]

        def _generate_examples(self, split):
            for i, row in enumerate(read(split)):
                yield i, row

    builder = LocalRows(
        cache_dir=cache_dir,
        dataset_name=name,
        repo_id=repo_id,
        config_name=config_name,
        hash=hash_,
    )
    builder.download_and_prepare()


def main():
    parser = argparse.ArgumentParser(
        description="Run a tinker-cookbook recipe unmodified against `whet serve`, offline.",
        epilog="Everything after RECIPE is passed to the recipe (key=value).",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: HOME/tokenizers/<name>)")
    parser.add_argument("--home", help="whet serve's home (default: $WHET_HOME, else ~/.whet)")
    parser.add_argument(
        "--hf-cache",
        default=os.path.join(ROOT, ".venv", "cookbook-hf", "datasets"),
        help="datasets cache to build and use (default: .venv/cookbook-hf/datasets)",
    )
    parser.add_argument(
        "--online", action="store_true", help="use the Hub's datasets (no local cache, no offline mode)"
    )
    parser.add_argument("recipe", help="sl_loop, rl_loop, or a module tinker_cookbook.recipes.X")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="key=value for the recipe")
    opts = parser.parse_args()
    opts.hf_cache = os.path.abspath(opts.hf_cache)

    try:
        import tinker_cookbook  # noqa: F401  (light: the package's __init__ only)
    except ImportError:
        sys.exit(
            "cookbook.py: tinker_cookbook is not importable: run tools/get-cookbook.sh and use "
            ".venv/cookbook/bin/python"
        )

    module = opts.recipe if "." in opts.recipe else f"tinker_cookbook.recipes.{opts.recipe}"
    kv = dict(a.split("=", 1) for a in opts.args if "=" in a)
    model_name = kv.get("model_name")
    if not model_name:
        sys.exit(
            "cookbook.py: pass model_name=NAME, the name whet serve serves (e.g. meta-llama/Llama-3.2-1B)"
        )

    tok_dir = opts.tokenizer
    if tok_dir is None:
        home = opts.home or os.environ.get("WHET_HOME") or os.path.expanduser("~/.whet")
        tok_dir = os.path.join(home, "tokenizers", model_name.replace("/", "__").replace(":", "__"))
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        sys.exit(
            f"cookbook.py: no tokenizer.json in {tok_dir}: start `whet serve --model {model_name}=M` "
            "with the same home (--home), or pass --tokenizer DIR"
        )

    # Before anything imports datasets / huggingface_hub (they read these at import).
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    if not opts.online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_CACHE"] = opts.hf_cache
        for repo_id, (config_name, sub) in DATASETS.items():
            build_cache(opts.hf_cache, repo_id, config_name, os.path.join(ROOT, "datasets", "cookbook", sub))

    from tinker_cookbook.tokenizer_utils import register_tokenizer

    @functools.cache
    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tok_dir)

    register_tokenizer(model_name, tokenizer)
    print(f"cookbook.py: {module} with tokenizer {tok_dir}", file=sys.stderr)

    sys.argv = [module, *opts.args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
