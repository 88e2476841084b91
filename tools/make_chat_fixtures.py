#!/usr/bin/env python3
"""Records what transformers does, for whet-data's parity tests.

Writes two fixtures (run from anywhere; needs transformers, tokenizers, gguf and jinja2):

* tests/fixtures/chat/smollm2.json -- SmolLM2-135M-Instruct's tokenizer as transformers builds it
  from the GGUF file (models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched by tools/get-smollm2.sh):
  vocabulary size and special tokens, encodings and decodings of tricky strings, and
  apply_chat_template ids and text for a few conversations.

  transformers has no `smollm` pre-tokenizer: for that GGUF it cuts words with GPT-2's regex
  only, while llama.cpp (and SmolLM2's own tokenizer.json) first make every numeric character
  its own piece. The two differ on a space followed by a non-ASCII digit ("x ²"). Strings where
  they differ go to `divergences`, with both encodings; the reference for `smollm` is rebuilt
  here from the same vocabulary with `Digits(individual_digits=True)` before the byte-level
  step, which is the pipeline of SmolLM2's tokenizer.json. Chats whose ids differ the same way
  carry `ids_smollm_pre_tokenizer` too.

* tests/fixtures/chat/templates.json -- other families' chat templates rendered exactly as
  `apply_chat_template(..., tokenize=False)` renders them (transformers' own
  `render_jinja_template`, after its message normalization, with the model's special tokens as
  variables). The template sources are copies of the models' `chat_template` from
  tests/fixtures/chat/templates/*.jinja; those files come from llama.cpp's models/templates
  (taken from the llama-cpp-python 0.3.36 sdist on PyPI), which llama.cpp fetches verbatim from
  each model's tokenizer_config.json.
"""

import json
import os
import sys

from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer, __version__ as transformers_version
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

STRINGS = [
    "Hello, world!",
    "12345",
    "3.14159",
    "1,000,000.50 and 2024-07-26T12:34:56Z",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces\tand\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows",
    "héllo wörld ñ — 中文 日本語 한국어 Привет",
    "emoji 😀👍🏽 🇫🇷 ❤️",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <|endoftext|> inside and <repo_name>",
    "def square(x):\n    return x ** 2  # comment\n",
    "I'm sure they'll say WE'RE fine, can't they?",
    "x² + y³ = ½ and ¹²³",
    "",
    " ",
    "\n",
]

CONVERSATIONS = [
    ("user_only", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "with_system",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi!"},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."},
            {"role": "user", "content": "And 3 + 3?"},
        ],
    ),
    (
        "assistant_last",
        [
            {"role": "user", "content": "Say hello in French."},
            {"role": "assistant", "content": "Bonjour !"},
        ],
    ),
    (
        "special_strings_in_content",
        [
            {"role": "user", "content": "Is <|im_end|> a token?\n  Indented  line "},
            {"role": "assistant", "content": "Yes: 😀 ① 12345"},
        ],
    ),
]

TOOLS = [
    {
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
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temperature": 21.5, "sky": "clear"}'},
]

THINKING_CONVERSATION = [
    {"role": "user", "content": "Is 7 prime?"},
    {"role": "assistant", "content": "Yes, 7 is prime.", "reasoning_content": "7 has no divisors but 1 and 7."},
    {"role": "user", "content": "And 9?"},
    {"role": "assistant", "content": "<think>\n9 = 3 * 3.\n</think>\n\nNo, 9 = 3 × 3.", "tool_calls": None},
]

# name -> (file, special tokens of the model's tokenizer_config.json, does it support tools, extra cases)
TEMPLATES = {
    "qwen2.5-instruct": (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        True,
        [],
    ),
    "qwen3": (
        "Qwen-Qwen3-0.6B.jinja",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        True,
        [
            ("thinking_history", THINKING_CONVERSATION, False, None),
            ("no_thinking", CONVERSATIONS[0][1], True, {"enable_thinking": False}),
        ],
    ),
    "llama-3.1-instruct": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        True,
        [("fixed_date", CONVERSATIONS[1][1], True, {"date_string": "01 Feb 2025"})],
    ),
    "llama-3.2-instruct": (
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        True,
        [],
    ),
    "lfm2.5": (
        "LFM2.5-8B-A1B.jinja",
        {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
        True,
        [("thinking_history", THINKING_CONVERSATION, False, None)],
    ),
}

# Llama 3.2 stamps today's date through strftime_now unless date_string is given.
FIXED_DATE = {"llama-3.2-instruct": {"date_string": "26 Jul 2024"}}


# Small templates probing the corners where jinja2 and minijinja could disagree (Python
# spellings, string methods, filters, whitespace control). Rendered with SNIPPET_MESSAGES.
SNIPPETS = [
    "{{ None is none }} {{ True }} {{ False }} {{ none }} {{ true }}",
    "{{ 'abc' is string }} {{ 'abc' is iterable }} {{ messages is sequence }} {{ {} is mapping }} {{ 3 is number }}",
    "{{ 'a,b,,c'.split(',') }} {{ '  a  b '.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'x'.upper() }} {{ 'Hello World'.title() }} {{ 'abc'.replace('b', 'B') }}",
    "{{ [3, 1, 2] | sort }} {{ [1, 2, 3] | sum }} {{ [1, 2, 3] | join('-') }} {{ 'abc' | length }} {{ [1, 2] | first }} {{ [1, 2] | last }}",
    "{{ 7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 7 % 3 }} {{ 1.0 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ -3 }} {{ 1.5e-7 }}",
    "{% for k, v in {'b': 1, 'a': 2}.items() %}{{ k }}={{ v }};{% endfor %}",
    "{{ 'abc'[::-1] }} {{ [1, 2, 3][1:] }} {{ 'hello'[1:3] }} {{ messages[-1].role }}",
    "{{ x | default('d') }}|{{ undefined_thing }}|{{ '' or 'empty' }}|{{ none | default('n', true) }}",
    "{{ 3 | string }} {{ 2.50 | string }} {{ none | string }} {{ [1, 'a'] | string }} {{ true | string }}",
    "{% set ns = namespace(a=1, items=[]) %}{% for m in messages %}{% set ns.a = ns.a + 1 %}{% set ns.items = ns.items + [m.role] %}{% endfor %}{{ ns.a }} {{ ns.items }}",
    "{{ 'a' in 'cat' }} {{ 'k' in {'k': 1} }} {{ 2 in [1, 2] }} {{ 'z' not in 'cat' }}",
    "{{ {'a': none, 'b': [true, 1.5], 'c': \"it's\", 'd': 'say \"hi\"'} }}",
    "{{ 'Hi THERE' | lower | capitalize }} {{ '  x ' | trim }}|{{ 'xxhixx'.strip('x') }} {{ 'abc'.lstrip('a') }} {{ 'abc'.rstrip('c') }}",
    "{{ [1, 2, 3] | reverse | list }} {{ [1, 2, 3] | map('string') | join(',') }} {{ {'a': 1}.get('b') }} {{ 'x'.join(['a', 'b']) }}",
    "{{ 'abc'.find('c') }} {{ 'a-b'.count('-') }} {{ 'ABC'.isupper() }} {{ '123'.isdigit() }} {{ 'abc'.endswith('bc') }} {{ 'abc'.startswith('b') }}",
    "{{ messages | length }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages | map(attribute='role') | join('/') }}",
    "{%- if true -%}\n  x  \n{%- endif -%}\n  {% if true %}\n    y\n  {% endif %}\nz",
    "line\n    {# comment #}\nnext {# inline #} end\n\t{% if true %}tab{% endif %}\n",
    "{% raw %}{{ x }} {% if %}{% endraw %} a  {%- if true %} b {% endif -%}  c",
    "{% macro f(x, y='d') %}[{{ x }}{{ y }}]{% endmacro %}{{ f(1) }}{{ f(2, y='e') }}",
    "{% for m in messages %}{% if loop.first %}F{% endif %}{{ loop.index }}/{{ loop.length }}{% if not loop.last %},{% endif %}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{{ m.role }}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "{{ messages[0] | tojson }} {{ messages[0] | tojson(indent=2) }} {{ [1, 'é', none] | tojson(separators=(',', ':')) }}",
    "{{ messages[0]['content'] if messages[0]['content'] is defined else 'none' }} {{ messages[0].missing is defined }}",
    "{{ x is sequence }} {{ {} is sequence }} {{ 1 is sequence }} {{ none is sequence }} {{ 'a' is sequence }}",
    "{{ 'a b  c '.rsplit() }} {{ 'a,b,c'.rsplit(',', 1) }} {{ 'a,b,c'.rsplit(',', maxsplit=1) }} {{ ',a,'.rsplit(',') }}",
    "{% generation %}{{ 'g' }}{% endgeneration %}{%- generation -%}\n  h\n{%- endgeneration -%}",
]

SNIPPET_MESSAGES = [
    {"role": "system", "content": "Sys"},
    {"role": "user", "content": "Hi é 😀"},
    {"role": "assistant", "content": "Hello", "meta": {"n": 1, "f": 0.5, "ok": True, "none": None}},
    {"role": "user", "content": " q "},
]


def render(source, specials, messages, tools, add_generation_prompt, extra):
    """apply_chat_template(tokenize=False), without needing a tokenizer object."""
    conversation = _normalize_chat_messages(messages)
    kwargs = {**specials, **(extra or {})}
    rendered, _ = render_jinja_template(
        conversations=[conversation],
        tools=tools,
        documents=None,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


def smollm2_fixture(models_dir):
    tok = AutoTokenizer.from_pretrained(models_dir, gguf_file=GGUF)
    backend = tok.backend_tokenizer
    # SmolLM2's own pipeline (llama.cpp's `smollm`): each numeric character alone, then GPT-2.
    reference = Tokenizer.from_str(backend.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    encodings, divergences = [], []
    for text in STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        ref = reference.encode(text, add_special_tokens=False).ids
        entry = {
            "text": text,
            "ids": ids,
            "ids_with_special_tokens": tok.encode(text, add_special_tokens=True),
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        }
        if ids == ref:
            encodings.append(entry)
        else:
            entry["ids_smollm_pre_tokenizer"] = ref
            divergences.append(entry)
    chats = []
    for name, messages in CONVERSATIONS:
        for agp in (False, True):
            if name == "assistant_last" and agp:
                continue
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp, return_dict=False)
            chat = {"name": name, "messages": messages, "add_generation_prompt": agp, "text": text, "ids": list(ids)}
            ref = reference.encode(text, add_special_tokens=False).ids
            if ref != chat["ids"]:
                chat["ids_smollm_pre_tokenizer"] = ref
            chats.append(chat)
    return {
        "generated_by": f"tools/make_chat_fixtures.py with transformers {transformers_version}",
        "model": f"models/{GGUF}",
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
        "chat_template": tok.chat_template,
        "encodings": encodings,
        "divergences": divergences,
        "chats": chats,
    }


def templates_fixture():
    out = {
        "generated_by": f"tools/make_chat_fixtures.py with transformers {transformers_version}",
        "note": "expected = apply_chat_template(messages, tools, add_generation_prompt, tokenize=False, **extra)",
        "templates": [],
    }
    for name, (file, specials, tools_ok, extra_cases) in TEMPLATES.items():
        with open(os.path.join(OUT, "templates", file), encoding="utf-8") as f:
            source = f.read()
        fixed = FIXED_DATE.get(name)
        cases = []
        plan = []
        for conv_name, messages in CONVERSATIONS:
            for agp in (False, True):
                plan.append((f"{conv_name}/agp={agp}", messages, None, agp, fixed))
        if tools_ok:
            plan.append(("tools", TOOL_CONVERSATION, TOOLS, True, fixed))
        for case_name, messages, agp, extra in extra_cases:
            plan.append((case_name, messages, None, agp, {**(fixed or {}), **(extra or {})}))
        for case_name, messages, tools, agp, extra in plan:
            try:
                expected = render(source, specials, messages, tools, agp, extra)
            except Exception as e:  # the template refuses this input: record the refusal
                expected, error = None, f"{type(e).__name__}: {e}"
            else:
                error = None
            case = {"name": case_name, "messages": messages, "tools": tools, "add_generation_prompt": agp}
            case["extra"] = extra
            case["expected"] = expected
            if error is not None:
                case["error"] = error
            cases.append(case)
        out["templates"].append(
            {"name": name, "file": f"templates/{file}", "source": source, "special_tokens": specials, "cases": cases}
        )
    snippets = []
    for source in SNIPPETS:
        try:
            expected = render(source, {"bos_token": "<s>", "eos_token": "</s>"}, SNIPPET_MESSAGES, None, False, None)
        except Exception as e:
            expected = f"error: {type(e).__name__}: {e}"
        snippets.append({"source": source, "expected": expected})
    out["snippets"] = {"messages": SNIPPET_MESSAGES, "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"}, "cases": snippets}
    return out


def write(name, data):
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


def main():
    models_dir = os.path.join(ROOT, "models")
    if not os.path.exists(os.path.join(models_dir, GGUF)):
        sys.exit(f"models/{GGUF} is missing: run tools/get-smollm2.sh first")
    os.makedirs(OUT, exist_ok=True)
    write("smollm2.json", smollm2_fixture(models_dir))
    write("templates.json", templates_fixture())


if __name__ == "__main__":
    main()
