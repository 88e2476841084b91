//! Python's spellings of values, which chat templates inherit from jinja2: `json.dumps` (the
//! `tojson` filter transformers installs), `str()` of `None`/`True`/lists (what `{{ x }}`
//! prints), `repr()` of floats, and `datetime.strftime` for `strftime_now`.

use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonOptions {
    pub(crate) ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: newline, then `s` repeated per depth.
    pub(crate) indent: Option<String>,
    /// `(item, key)` separators; default `(", ", ": ")`, or `(",", ": ")` with an indent.
    pub(crate) separators: Option<(String, String)>,
    pub(crate) sort_keys: bool,
}

/// `json.dumps(value, ...)` of a template value.
pub(crate) fn json_dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if opts.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut out = String::new();
    let ctx = JsonCtx {
        opts,
        item_sep,
        key_sep,
    };
    ctx.write(&mut out, value, 0)?;
    Ok(out)
}

struct JsonCtx<'a> {
    opts: &'a JsonOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl JsonCtx<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.opts.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        // Python's json refuses recursion past ~1000 levels; template data never nests deeply.
        if depth > 512 {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value nests too deeply",
            ));
        }
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => write_number(out, v, true),
            ValueKind::String => {
                write_json_str(out, v.as_str().unwrap_or_default(), self.opts.ensure_ascii)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                self.newline(out, depth + 1);
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                        self.newline(out, depth + 1);
                    }
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut pairs = Vec::new();
                for key in v.try_iter()? {
                    let val = v.get_item(&key)?;
                    pairs.push((json_key(&key)?, val));
                }
                if self.opts.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if pairs.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                self.newline(out, depth + 1);
                for (i, (key, val)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                        self.newline(out, depth + 1);
                    }
                    write_json_str(out, key, self.opts.ensure_ascii);
                    out.push_str(self.key_sep);
                    self.write(out, val, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Undefined => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: object of type Undefined is not JSON serializable",
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {other} value is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }
}

/// Python's json turns str, int, float, bool and None keys into strings; anything else fails.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key, true);
            s
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ))
        }
    })
}

/// A number as Python writes it: integers as digits, floats by `repr` (`1.0`, `1e+16`).
/// `json` spells non-finite floats `NaN`/`Infinity`; `str()` spells them `nan`/`inf`.
fn write_number(out: &mut String, v: &Value, json: bool) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    out.push_str(&py_float_repr(x, json));
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional notation for
/// exponents in [-4, 16), scientific (`1e+16`, `1.5e-05`) otherwise.
pub(crate) fn py_float_repr(x: f64, json: bool) -> String {
    if x.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if x.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if x < 0.0 { format!("-{s}") } else { s.into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: `d.ddde±x`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    }
}

/// A JSON string literal as Python's `json` writes it (no HTML escaping, `\uXXXX` for control
/// characters, and for non-ASCII too when `ensure_ascii`).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `str(value)`: what jinja2 prints for `{{ value }}`. Returns `None` for the values
/// whose minijinja spelling already matches (strings, integers, undefined, ...).
pub(crate) fn py_str(v: &Value) -> Option<String> {
    match v.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => Some(py_repr(v)),
        ValueKind::Number if !v.is_integer() => Some(py_repr(v)),
        _ => None,
    }
}

/// Python's `repr(value)` for JSON-like values (what `str()` of a list or dict shows).
fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    repr_into(&mut out, v, 0);
    out
}

fn repr_into(out: &mut String, v: &Value, depth: usize) {
    if depth > 512 {
        out.push_str("...");
        return;
    }
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_number(out, v, false),
        ValueKind::String => repr_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(out, &item, depth + 1);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_into(out, &key, depth + 1);
                out.push_str(": ");
                repr_into(out, &v.get_item(&key).unwrap_or_default(), depth + 1);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A civil date and time (UTC) from seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub(crate) year: i64,
    pub(crate) month: u32, // 1..=12
    pub(crate) day: u32,   // 1..=31
    pub(crate) hour: u32,
    pub(crate) minute: u32,
    pub(crate) second: u32,
    pub(crate) weekday: u32, // 0 = Monday
    pub(crate) yday: u32,    // 1..=366
}

impl DateTime {
    /// Converts Unix seconds to a UTC date (Howard Hinnant's days-to-civil algorithm).
    pub(crate) fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = cum[(month - 1) as usize] + day + u32::from(leap && month > 2);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            yday,
        }
    }

    /// Python/glibc `strftime` for the common directives. `%-d` (glibc: no padding) is
    /// supported; unknown directives are copied as written, as glibc does.
    pub(crate) fn strftime(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let unpadded = chars.peek() == Some(&'-');
            if unpadded {
                chars.next();
            }
            let num = |out: &mut String, v: i64, width: usize| {
                if unpadded {
                    let _ = write!(out, "{v}");
                } else {
                    let _ = write!(out, "{v:0width$}");
                }
            };
            let hour12 = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            match chars.next() {
                Some('Y') => num(&mut out, self.year, 4),
                Some('y') => num(&mut out, self.year.rem_euclid(100), 2),
                Some('m') => num(&mut out, self.month.into(), 2),
                Some('d') => num(&mut out, self.day.into(), 2),
                Some('e') => {
                    let _ = write!(out, "{:2}", self.day);
                }
                Some('H') => num(&mut out, self.hour.into(), 2),
                Some('I') => num(&mut out, hour12.into(), 2),
                Some('M') => num(&mut out, self.minute.into(), 2),
                Some('S') => num(&mut out, self.second.into(), 2),
                Some('j') => num(&mut out, self.yday.into(), 3),
                Some('p') => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                Some('A') => out.push_str(DAYS[self.weekday as usize]),
                Some('a') => out.push_str(&DAYS[self.weekday as usize][..3]),
                Some('B') => out.push_str(MONTHS[(self.month - 1) as usize]),
                Some('b') | Some('h') => out.push_str(&MONTHS[(self.month - 1) as usize][..3]),
                Some('u') => num(&mut out, (self.weekday + 1).into(), 1),
                Some('w') => num(&mut out, ((self.weekday + 1) % 7).into(), 1),
                Some('F') => {
                    let _ = write!(out, "{:04}-{:02}-{:02}", self.year, self.month, self.day);
                }
                Some('T') => {
                    let _ = write!(
                        out,
                        "{:02}:{:02}:{:02}",
                        self.hour, self.minute, self.second
                    );
                }
                Some('Z') => out.push_str("UTC"),
                Some('z') => out.push_str("+0000"),
                Some('%') => out.push('%'),
                Some(other) => {
                    out.push('%');
                    if unpadded {
                        out.push('-');
                    }
                    out.push(other);
                }
                None => out.push('%'),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(json: &str) -> Value {
        Value::from(minijinja::value::Serde(
            serde_json::from_str::<serde_json::Value>(json).unwrap(),
        ))
    }

    #[test]
    fn json_dumps_matches_python() {
        let x = v(r#"{"b": [1, 2.5, true, null], "a": "é<>&\"\n\u0001", "c": {}}"#);
        let d = JsonOptions::default();
        assert_eq!(
            json_dumps(&x, &d).unwrap(),
            r#"{"b": [1, 2.5, true, null], "a": "é<>&\"\n\u0001", "c": {}}"#
        );
        let o = JsonOptions {
            indent: Some("  ".into()),
            sort_keys: true,
            ..d.clone()
        };
        assert_eq!(
            json_dumps(&x, &o).unwrap(),
            "{\n  \"a\": \"é<>&\\\"\\n\\u0001\",\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"c\": {}\n}"
        );
        let a = JsonOptions {
            ensure_ascii: true,
            ..d
        };
        assert_eq!(
            json_dumps(&v(r#""é😀""#), &a).unwrap(),
            r#""\u00e9\ud83d\ude00""#
        );
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (x, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (1e22, "1e+22"),
            (1.25e-7, "1.25e-07"),
        ] {
            assert_eq!(py_float_repr(x, true), s, "{x}");
        }
        assert_eq!(py_float_repr(f64::NEG_INFINITY, true), "-Infinity");
    }

    #[test]
    fn str_of_none_bool_and_containers_is_pythons() {
        assert_eq!(py_str(&Value::from(())).as_deref(), Some("None"));
        assert_eq!(py_str(&Value::from(true)).as_deref(), Some("True"));
        assert_eq!(
            py_str(&v(r#"["a", "it's", 1, null]"#)).as_deref(),
            Some(r#"['a', "it's", 1, None]"#)
        );
        assert_eq!(
            py_str(&v(r#"{"k": false}"#)).as_deref(),
            Some("{'k': False}")
        );
        assert_eq!(py_str(&Value::from("x")), None);
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 12:34:56 UTC was a Friday.
        let d = DateTime::from_unix(1_721_997_296);
        assert_eq!(d.strftime("%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            d.strftime("%A %B %-d, %H:%M:%S %j %I%p %%"),
            "Friday July 26, 12:34:56 208 12PM %"
        );
        let d = DateTime::from_unix(0);
        assert_eq!(d.strftime("%Y-%m-%d %a"), "1970-01-01 Thu");
        let d = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!(d.strftime("%F %j %y"), "2000-02-29 060 00");
    }
}
