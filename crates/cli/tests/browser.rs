//! The App in a real browser: Debian's `chromium`, headless, driven over the DevTools
//! protocol. A job submitted through the API is watched until its chart gains points; a second
//! job is cancelled with the page's own Cancel button and seen cancelled; a published model's
//! lineage is opened in the hub. A screenshot of each page goes to
//! `target/browser-screenshots/` (CI keeps them as artifacts).
//!
//! Without chromium (`.ci/run` installs Debian's) the test says so loudly and passes, unless
//! `WHET_REQUIRE_BROWSER` is set.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use serde_json::{json, Value};
use tungstenite::{stream::MaybeTlsStream, Message, WebSocket};

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A headless chromium with one page, and a DevTools connection to that page.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn open(binary: &Path, url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        // Its stderr is drained for good on a thread: a full pipe would stall chromium.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium prints its DevTools address");
        // The page's own endpoint, from the DevTools HTTP listing.
        let start = Instant::now();
        let page_ws = loop {
            let list = get(&format!("127.0.0.1:{port}"), "/json/list");
            if let Some(ws) = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
            }) {
                break ws;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no page in chromium"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("DevTools WebSocket");
        Self {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        }
    }

    /// One DevTools command; events that arrive meanwhile are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `js` in the page and returns its value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// Waits until `js` is truthy in the page; returns its value.
    fn wait_for(&mut self, js: &str, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(js);
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the page never showed {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    fn screenshot(&mut self, name: &str) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = decode_base64(r["data"].as_str().unwrap());
        let dir = common::root().join("target/browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

/// GET over plain HTTP/1.1 (the DevTools listing), as JSON.
fn get(addr: &str, path: &str) -> Value {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(addr) else {
        return Value::Null;
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Chromium keeps the connection open: read the head, then exactly Content-Length bytes.
    let mut r = BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return Value::Null;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    if r.read_exact(&mut body).is_err() {
        return Value::Null;
    }
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
    bytes
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | (v as u32) << (18 - 6 * i));
            let len = c.len() * 6 / 8;
            (0..len).map(move |i| (n >> (16 - 8 * i)) as u8)
        })
        .collect()
}

#[test]
fn the_app_shows_live_jobs_cancels_and_lineage_in_chromium() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var_os("WHET_REQUIRE_BROWSER").is_none(),
            "WHET_REQUIRE_BROWSER is set but there is no chromium"
        );
        eprintln!("SKIPPED the App's browser test: no chromium (apt-get install chromium)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let s = serve(&home, &[]);
    let key = "tml-browser";
    let dir = common::fixture("tiny-llama");
    let config = |name: &str, epochs: u64| {
        json!({"name": name, "shape": "sft", "model": dir.display().to_string(),
               "data": {"dataset": dir.join("datums.jsonl").display().to_string(), "format": "datums"},
               "lora": {"rank": 2}, "optimizer": {"learning_rate": 0.003},
               "schedule": {"epochs": epochs, "batch_size": 3, "eval_interval": 0}})
    };
    let (status, first) = post(
        &s,
        "/v1/jobs",
        key,
        json!({"config": config("watched", 4000)}),
    );
    assert_eq!(status, 200, "{first}");
    let first = first["id"].as_str().unwrap().to_string();
    let base = format!("http://{}", s.addr);

    // The chart of a running job gains points as its steps arrive.
    let mut b = Browser::open(&binary, &format!("{base}/#jobs/{first}"));
    b.eval(&format!(
        "localStorage.setItem('whet-key', '{key}'); document.getElementById('key').value = '{key}'; true"
    ));
    let before = b
        .wait_for("+(document.body.dataset.points || 0)", "chart points")
        .as_f64()
        .unwrap();
    let after = b
        .wait_for(
            &format!(
                "+(document.body.dataset.points || 0) > {before} && +document.body.dataset.points"
            ),
            "more chart points",
        )
        .as_f64()
        .unwrap();
    assert!(after > before, "{before} → {after}");
    b.wait_for(
        "document.querySelector('.row.sel') && document.getElementById('headline').textContent.startsWith('Training ')",
        "the job selected and its headline",
    );
    b.screenshot("job-live");
    b.wait_for(
        "document.getElementById('st').textContent === 'completed'",
        "the job completed",
    );
    // Every step is on the chart once the last frame is drawn.
    b.wait_for("+document.body.dataset.points === 4000", "all 4000 points");
    b.screenshot("job-completed");

    // A second job, cancelled with the page's own button.
    let (_, second) = post(
        &s,
        "/v1/jobs",
        key,
        json!({"config": config("to-cancel", 1_000_000)}),
    );
    let second = second["id"].as_str().unwrap().to_string();
    b.goto(&format!("{base}/#jobs/{second}"));
    b.wait_for(
        "document.getElementById('st') && document.getElementById('st').textContent === 'running'",
        "the second job running",
    );
    b.wait_for(
        "!document.getElementById('cancel').disabled",
        "an enabled Cancel button",
    );
    b.eval("document.getElementById('cancel').click(); true");
    b.wait_for(
        "document.getElementById('st').textContent === 'cancelled'",
        "the job cancelled",
    );
    assert_eq!(
        b.eval("document.getElementById('retry').disabled"),
        json!(false)
    );
    b.screenshot("job-cancelled");

    // A published model's lineage in the hub names the job it came from.
    common::ok(&[
        "models",
        "publish",
        &first,
        "--name",
        "browser-demo",
        "--version",
        "1.0.0",
        "--home",
        home.to_str().unwrap(),
    ]);
    b.goto(&format!("{base}/#hub"));
    b.wait_for(
        "document.querySelector('details.lineage summary')",
        "the hub's models",
    );
    b.eval("document.querySelector('details.lineage summary').click(); true");
    let lineage = b.wait_for(
        "document.querySelector('details.lineage').open && document.querySelector('details.lineage pre').textContent",
        "the lineage",
    );
    assert!(lineage.as_str().unwrap().contains(&first), "{lineage}");
    b.screenshot("hub-lineage");
    // The job list, searched.
    b.goto(&format!("{base}/#jobs"));
    b.wait_for(
        "document.querySelectorAll('.row').length === 2",
        "both jobs listed",
    );
    b.eval("const q = document.getElementById('q'); q.value = 'cancel'; q.dispatchEvent(new Event('input')); true");
    b.wait_for(
        "document.querySelectorAll('.row').length === 1",
        "the search narrowing the list",
    );
    b.screenshot("job-list");
}

/// By hand, on a home with many jobs and a long one (the scale check of the App):
/// `WHET_APP_URL=http://127.0.0.1:8300 WHET_APP_JOB=<id> cargo test -p whet --test browser -- --ignored --nocapture`
/// prints how long the page took to draw the job list and the job's charts.
#[test]
#[ignore]
fn the_app_at_scale() {
    let (Some(binary), Ok(url), Ok(job)) = (
        chromium(),
        std::env::var("WHET_APP_URL"),
        std::env::var("WHET_APP_JOB"),
    ) else {
        eprintln!("needs chromium, WHET_APP_URL and WHET_APP_JOB");
        return;
    };
    let start = Instant::now();
    let mut b = Browser::open(&binary, &format!("{url}/#jobs/{job}"));
    let rows = b.wait_for("+(document.body.dataset.listRows || 0)", "the list");
    let points = b.wait_for("+(document.body.dataset.points || 0)", "the charts");
    let loaded = start.elapsed();
    let list_ms = b.eval("document.body.dataset.listMs");
    let chart_ms = b.eval("document.body.dataset.chartMs");
    // A redraw of every chart with all points, as a live update triggers it.
    let redraw = b.eval("(() => { const t = performance.now(); for (let i = 0; i < 10; i++) drawCharts(); return (performance.now() - t) / 10; })()");
    eprintln!(
        "{rows} jobs listed in {list_ms} ms; {points} points charted in {chart_ms} ms; a full redraw {redraw:.1} ms; page ready {:.1} s after chromium started",
        loaded.as_secs_f64(),
        redraw = redraw.as_f64().unwrap_or(f64::NAN)
    );
}
