//! Chat templates of other model families rendered by us and by transformers
//! (tests/fixtures/chat/templates.json, written by tools/make_chat_fixtures.py).

use std::path::Path;

use serde_json::Value;
use whet_data::ChatTemplate;

fn fixture() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/templates.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

#[test]
fn templates_render_exactly_as_transformers() {
    let fx = fixture();
    let mut checked = 0;
    let mut failures = Vec::new();
    for tpl in fx["templates"].as_array().unwrap() {
        let name = tpl["name"].as_str().unwrap();
        let specials = tpl["special_tokens"].as_object().unwrap();
        let text = |k: &str| specials.get(k).and_then(Value::as_str).map(String::from);
        let mut t = ChatTemplate::new(
            tpl["source"].as_str().unwrap(),
            text("bos_token"),
            text("eos_token"),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (k, v) in specials {
            t = t.with_special_token(k, v.as_str().unwrap());
        }
        for case in tpl["cases"].as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let messages = case["messages"].as_array().unwrap();
            let tools = case["tools"].as_array().map(Vec::as_slice);
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = t.render(messages, tools, agp, case["extra"].as_object());
            match (case["expected"].as_str(), got) {
                (Some(want), Ok(got)) if got == want => {}
                (None, Err(_)) => {} // the template refuses this input in both
                (want, got) => failures.push(format!(
                    "{name} / {case_name}:\n  want {want:?}\n  got  {got:?}"
                )),
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 40, "only {checked} cases");
}

#[test]
fn snippets_render_exactly_as_jinja2() {
    let fx = fixture();
    let sn = &fx["snippets"];
    let messages = sn["messages"].as_array().unwrap();
    let mut failures = Vec::new();
    let cases = sn["cases"].as_array().unwrap();
    for case in cases {
        let src = case["source"].as_str().unwrap();
        let want = case["expected"].as_str().unwrap();
        let got = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()))
            .and_then(|t| t.render(messages, None, false, None));
        match got {
            Ok(got) if got == want => {}
            Err(_) if want.starts_with("error: ") => {}
            got => failures.push(format!("{src:?}:\n  want {want:?}\n  got  {got:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} snippets differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
