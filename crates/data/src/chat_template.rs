//! Chat templates rendered the way transformers' `apply_chat_template` renders them.
//!
//! transformers runs the template in jinja2 with `trim_blocks` and `lstrip_blocks`, its own
//! `tojson` (Python's `json.dumps`, no HTML escaping), the globals `raise_exception` and
//! `strftime_now`, and the `{% generation %}` tag. We run it in minijinja configured the same
//! way, with minijinja-contrib's Python methods (`.strip()`, `.items()`, ...). The traps:
//! - jinja2 prints `None`/`True`/lists as Python does (`None`, `True`, `['a']`); minijinja would
//!   print `none`, `true`, `["a"]`. A custom formatter and `string` filter restore Python's
//!   spelling. jinja2's `sequence` test is true for strings and dicts; ours too.
//! - Known remaining differences: tuples print as lists (`(1, 2)` → `[1, 2]`; minijinja has no
//!   tuples), and Python's `%` string formatting (`'%s' % x`) is an error. No template we test
//!   uses either; tests/fixtures/chat/templates.json pins the rest.
//! - transformers always passes `tools` and `documents`, as `None` when absent, so
//!   `tools is defined` is true even without tools. We do the same.
//! - transformers drops message keys whose value is `None`, and copies a message's reasoning
//!   (`reasoning_content`, `thinking` or `reasoning`) to both `thinking` and
//!   `reasoning_content`. We do the same, in the same key order.
//! - `{% generation %}` is not minijinja syntax: it is rewritten to `{% with %}`, which renders
//!   its body in its own scope, as jinja2's call block does. The assistant-token tracking it
//!   exists for is not implemented.
//! - Templates with no place for tools or tool calls get them as text (see [`crate::tool_text`]);
//!   this is where whet departs from transformers, which would drop them.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Rest, Serde, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};

use crate::error::{DataError, Result};
use crate::pyfmt::{self, DateTime, JsonOptions};
use crate::tool_text::{self, ToolSupport};

/// The name the template is registered under; minijinja's errors cite it with the line.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template, plus the special-token variables it sees.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// `bos_token`, `eos_token`, `pad_token`, ... → text, in insertion order.
    special_tokens: Vec<(String, String)>,
    /// What the template does with tools, probed on first need.
    tool_support: OnceLock<ToolSupport>,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` become the template variables of those names.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| DataError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(python_methods);
        env.set_formatter(|out, state, value| match pyfmt::py_str(value) {
            Some(s) => out
                .write_str(&s)
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "formatting failed")),
            None => minijinja::escape_formatter(out, state, value),
        });
        env.add_filter("tojson", tojson);
        env.add_filter("string", py_string);
        env.add_test("sequence", is_sequence);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|e| DataError::Template(describe(&e)))?;
        let mut special_tokens = Vec::new();
        if let Some(b) = bos_token {
            special_tokens.push(("bos_token".to_string(), b));
        }
        if let Some(e) = eos_token {
            special_tokens.push(("eos_token".to_string(), e));
        }
        Ok(Self {
            env,
            source: source.to_string(),
            special_tokens,
            tool_support: OnceLock::new(),
        })
    }

    /// Adds (or replaces) a special-token variable such as `pad_token` or `unk_token`.
    pub fn with_special_token(mut self, name: &str, text: &str) -> Self {
        match self.special_tokens.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = text.to_string(),
            None => self
                .special_tokens
                .push((name.to_string(), text.to_string())),
        }
        self
    }

    /// The template source as given (before the `{% generation %}` rewrite).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special-token variables the template sees, as `(name, text)`.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Renders a conversation. `messages` are objects with at least `role`; `tools` are JSON
    /// schemas; `extra` adds template variables (`enable_thinking`, `date_string`, ...) and may
    /// override special tokens, but not `messages`, `tools`, `documents` or
    /// `add_generation_prompt`. Tools and tool calls the template has no place for are written
    /// as text ([`crate::tool_text`]).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String> {
        let has_calls = messages
            .iter()
            .any(|m| m.get("tool_calls").is_some_and(|c| !c.is_null()));
        let folded = if tools.is_some_and(|t| !t.is_empty()) || has_calls {
            tool_text::fold(messages, tools, self.tool_support())
        } else {
            None
        };
        let messages = folded.as_deref().unwrap_or(messages);
        self.render_as_is(messages, tools, add_generation_prompt, extra)
    }

    /// What the template does with tools and tool calls.
    fn tool_support(&self) -> ToolSupport {
        *self
            .tool_support
            .get_or_init(|| ToolSupport::probe(|m, t| self.render_as_is(m, t, false, None)))
    }

    /// Renders exactly what it is given, as transformers does.
    fn render_as_is(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (name, text) in &self.special_tokens {
            ctx.insert(name.clone(), Value::from(text.as_str()));
        }
        const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];
        for (k, v) in extra.into_iter().flatten() {
            if RESERVED.contains(&k.as_str()) {
                return Err(DataError::Template(format!(
                    "extra variable `{k}` would replace the argument of the same name"
                )));
            }
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        ctx.insert(
            "messages".into(),
            Value::from(Serde(normalize_messages(messages)?)),
        );
        ctx.insert(
            "tools".into(),
            tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
        );
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| DataError::Template(describe(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| DataError::Template(describe(&e)))
    }
}

/// An error with its cause chain (minijinja puts the template line in the message).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// What transformers does to messages before rendering: drop `None`-valued keys
/// (`_normalize_chat_messages`), then alias reasoning fields (`_alias_reasoning_fields`: the
/// new dict is `{"thinking": r, **message, "reasoning_content": r}`, whose key order we keep).
fn normalize_messages(messages: &[serde_json::Value]) -> Result<Vec<serde_json::Value>> {
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().ok_or_else(|| {
                DataError::Template(format!("messages[{i}] is not a JSON object"))
            })?;
            let mut kept: serde_json::Map<String, serde_json::Value> = obj
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let reasoning = REASONING.iter().find_map(|k| kept.get(*k).cloned());
            if let Some(r) = reasoning {
                let mut aliased = serde_json::Map::new();
                aliased.insert("thinking".into(), r.clone());
                // With serde_json's `preserve_order`, re-inserting a key keeps its position,
                // as a Python dict does.
                aliased.extend(std::mem::take(&mut kept));
                aliased.insert("reasoning_content".into(), r);
                kept = aliased;
            }
            Ok(serde_json::Value::Object(kept))
        })
        .collect()
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (any whitespace-control marks) to
/// `{% with %}` / `{% endwith %}`, leaving `{% raw %}` sections and comments alone. The marks
/// are kept, so `trim_blocks`/`lstrip_blocks` act on the new tags as on the old.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut in_raw = false;
    while let Some(start) = rest.find(['{']) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        if from.starts_with("{#") && !in_raw {
            let end = from.find("#}").map_or(from.len(), |e| e + 2);
            out.push_str(&from[..end]);
            rest = &from[end..];
            continue;
        }
        if !from.starts_with("{%") {
            out.push('{');
            rest = &from[1..];
            continue;
        }
        let Some(end) = from.find("%}") else {
            out.push_str(from);
            return out;
        };
        let tag = &from[..end + 2];
        let inner = &tag[2..tag.len() - 2];
        let word = inner
            .trim_start_matches(['-', '+'])
            .trim_start()
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .next()
            .unwrap_or("");
        let only_word = inner.trim_matches(['-', '+']).trim() == word;
        match word {
            "raw" => in_raw = true,
            "endraw" => in_raw = false,
            _ => {}
        }
        if !in_raw && only_word && (word == "generation" || word == "endgeneration") {
            let replacement = if word == "generation" {
                "with"
            } else {
                "endwith"
            };
            out.push_str(&tag.replacen(word, replacement, 1));
        } else {
            out.push_str(tag);
        }
        rest = &from[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut given: BTreeMap<&str, Value> =
        NAMES.iter().copied().zip(args.iter().cloned()).collect();
    for name in NAMES {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            given.insert(name, v);
        }
    }
    kwargs.assert_all_used()?;
    let set = |name: &str| {
        given
            .get(name)
            .filter(|v| !v.is_none() && !v.is_undefined())
    };
    let mut opts = JsonOptions {
        ensure_ascii: set("ensure_ascii").is_some_and(Value::is_true),
        sort_keys: set("sort_keys").is_some_and(Value::is_true),
        ..JsonOptions::default()
    };
    if let Some(ind) = set("indent") {
        opts.indent = Some(match (ind.as_i64(), ind.as_str()) {
            (Some(n), _) => " ".repeat(usize::try_from(n).unwrap_or(0)),
            (None, Some(s)) => s.to_string(),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        });
    }
    if let Some(sep) = set("separators") {
        let parts: Vec<Value> = sep.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                opts.separators = Some((a.to_string(), b.to_string()));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings",
                ))
            }
        }
    }
    pyfmt::json_dumps(value, &opts).map(Value::from)
}

/// Python's `str`/`dict`/`list` methods: minijinja-contrib's pycompat, plus `str.rsplit`,
/// which it lacks.
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    match (value.as_str(), method) {
        (Some(s), "rsplit") => {
            let (sep, maxsplit, kwargs): (Option<Value>, Option<i64>, Kwargs) = from_args(args)?;
            let sep = match kwargs.get::<Option<Value>>("sep")?.or(sep) {
                Some(v) if !v.is_none() => Some(v.as_str().map(String::from).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "rsplit: sep must be a string or None",
                    )
                })?),
                _ => None,
            };
            let maxsplit = kwargs
                .get::<Option<i64>>("maxsplit")?
                .or(maxsplit)
                .unwrap_or(-1);
            kwargs.assert_all_used()?;
            py_rsplit(s, sep.as_deref(), maxsplit)
                .map(|parts| parts.into_iter().map(Value::from).collect())
        }
        _ => minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
    }
}

/// Python's `str.rsplit(sep, maxsplit)`: at most `maxsplit` cuts (all if negative), from the
/// right; without `sep`, runs of whitespace separate and empty pieces are dropped.
fn py_rsplit(s: &str, sep: Option<&str>, maxsplit: i64) -> std::result::Result<Vec<String>, Error> {
    let limit = usize::try_from(maxsplit).unwrap_or(usize::MAX);
    let mut parts = Vec::new();
    match sep {
        Some("") => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "rsplit: empty separator",
            ))
        }
        Some(sep) => {
            let mut rest = s;
            while parts.len() < limit {
                let Some(at) = rest.rfind(sep) else { break };
                parts.push(rest[at + sep.len()..].to_string());
                rest = &rest[..at];
            }
            parts.push(rest.to_string());
        }
        None => {
            let mut rest = s.trim_end();
            while parts.len() < limit && !rest.is_empty() {
                match rest.rfind(char::is_whitespace) {
                    Some(at) => {
                        let ws_len = rest[at..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[at + ws_len..].to_string());
                        rest = rest[..at].trim_end();
                    }
                    None => break,
                }
            }
            if !rest.is_empty() {
                parts.push(rest.to_string());
            }
        }
    }
    parts.reverse();
    Ok(parts)
}

/// jinja2's `sequence` test is "has `len()` and `[]`": true for strings and dicts too (and,
/// through jinja2's `Undefined`, for undefined values).
fn is_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Undefined
    ) || value.len().is_some()
}

/// jinja2's `string` filter is Python's `str()`: `True`, `None`, `['a']`.
fn py_string(value: &Value) -> Value {
    match value.kind() {
        ValueKind::String => value.clone(),
        ValueKind::Undefined => Value::from(""),
        _ => Value::from(pyfmt::py_str(value).unwrap_or_else(|| value.to_string())),
    }
}

/// `raise_exception(message)`: the template refuses its input.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current time formatted. Python uses local time; we use UTC
/// (servers run in UTC, and std has no time zone database).
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    DateTime::from_unix(secs).strftime(&format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: serde_json::Value) -> Result<String> {
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()))?;
        t.render(messages.as_array().unwrap(), None, true, None)
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        // trim_blocks eats the newline after a block tag; lstrip_blocks the indent before it.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(
            src,
            json!([{"role": "user", "content": "hi"}, {"role": "x"}]),
        )
        .unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn python_spellings_and_globals() {
        let src = "{{ none }} {{ true }} {{ [1, 'a'] }} {{ 2.5|string }} {{ false|string }} {{ bos_token }}{{ eos_token }} {{ tools is defined }} {{ tools is none }}";
        assert_eq!(
            render(src, json!([])).unwrap(),
            "None True [1, 'a'] 2.5 False <s></s> True True"
        );
        let e = render("{{ raise_exception('no system role') }}", json!([])).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
        let year = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let msgs = json!([{"role": "user", "content": "<é>", "n": {"b": 1, "a": [1.0, null]}}]);
        let out = render("{{ messages[0] | tojson }}|{{ messages[0].n | tojson(indent=2, sort_keys=true) }}|{{ messages[0].content | tojson(true) }}", msgs).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"<é>\", \"n\": {\"b\": 1, \"a\": [1.0, null]}}|{\n  \"a\": [\n    1.0,\n    null\n  ],\n  \"b\": 1\n}|\"<\\u00e9>\""
        );
        let e = render("{{ 1 | tojson(bogus=1) }}", json!([])).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.strip().split('</think>')[-1].lstrip() }}|{% for k, v in messages[0].items() %}{{ k }}={{ v|length }};{% endfor %}|{{ messages[0].get('missing', 'd') }}|{{ 'ab'.startswith('a') }}";
        let out = render(src, json!([{"role": "a", "content": "  x</think> y "}])).unwrap();
        assert_eq!(out, "y|role=1;content=14;|d|True");
    }

    #[test]
    fn rsplit_matches_python() {
        let cases: [(&str, Option<&str>, i64, &[&str]); 6] = [
            (" a b  c ", None, -1, &["a", "b", "c"]),
            (" a b  c ", None, 1, &[" a b", "c"]),
            ("a,b,c", Some(","), 1, &["a,b", "c"]),
            (",a,", Some(","), -1, &["", "a", ""]),
            ("", None, -1, &[]),
            ("", Some(","), -1, &[""]),
        ];
        for (s, sep, n, want) in cases {
            assert_eq!(
                py_rsplit(s, sep, n).unwrap(),
                want,
                "{s:?}.rsplit({sep:?}, {n})"
            );
        }
        let out = render(
            "{{ 'a,b,c'.rsplit(',', maxsplit=1) }} {{ 'x' is sequence }} {{ 1 is sequence }}",
            json!([]),
        )
        .unwrap();
        assert_eq!(out, "['a,b', 'c'] True False");
    }

    #[test]
    fn generation_blocks_render_their_body_in_their_own_scope() {
        let src = "{% set x = 1 %}{% for m in messages %}{%- generation -%}\n  {% set x = 2 %}<{{ m.content }}:{{ x }}>\n{%- endgeneration %}{% endfor %}{{ x }}{% raw %}{% generation %}{% endraw %}";
        let out = render(src, json!([{"role": "assistant", "content": "a"}])).unwrap();
        assert_eq!(out, "<a:2>1{% generation %}");
        assert_eq!(
            rewrite_generation_tags(
                "{%- generation -%}{%+ endgeneration %}{# {% generation %} #}{% generation_x %}"
            ),
            "{%- with -%}{%+ endwith %}{# {% generation %} #}{% generation_x %}"
        );
    }

    #[test]
    fn messages_are_normalized_like_transformers() {
        let msgs =
            json!([{"role": "assistant", "content": "c", "tool_calls": null, "reasoning": "r"}]);
        let out = render("{{ messages[0] | tojson }}", msgs).unwrap();
        assert_eq!(
            out,
            r#"{"thinking": "r", "role": "assistant", "content": "c", "reasoning": "r", "reasoning_content": "r"}"#
        );
        let e = render("x", json!(["not an object"])).unwrap_err();
        assert!(e.to_string().contains("messages[0]"), "{e}");
    }

    #[test]
    fn errors_name_the_template_line() {
        let e = ChatTemplate::new("line one\n{% if %}", None, None).unwrap_err();
        assert!(e.to_string().contains("chat_template:2"), "{e}");
        let extra = json!({"messages": 1});
        let t = ChatTemplate::new("x", None, None).unwrap();
        let e = t.render(&[], None, false, extra.as_object()).unwrap_err();
        assert!(e.to_string().contains("`messages`"), "{e}");
    }

    #[test]
    fn extra_variables_and_special_tokens_reach_the_template() {
        let t = ChatTemplate::new(
            "{{ pad_token }}{{ bos_token }}{{ flag }}",
            Some("<s>".into()),
            None,
        )
        .unwrap()
        .with_special_token("pad_token", "<pad>");
        let extra = json!({"flag": false, "bos_token": "<B>"});
        assert_eq!(
            t.render(&[], None, false, extra.as_object()).unwrap(),
            "<pad><B>False"
        );
    }
}
