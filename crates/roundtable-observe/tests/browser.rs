//! The web view in a real browser: headless Chromium, driven over the DevTools protocol,
//! loads the page against a session that is still running, watches it update live, and
//! checks what a person would see. Screenshots are kept (their paths are printed).
//!
//! Needs Chromium: `apt-get install -y chromium` on Debian (or set ROUNDTABLE_CHROMIUM to
//! a Chrome or Chromium binary). Without it this test fails and says so.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use common::*;
use futures::{SinkExt, StreamExt};
use roundtable_core::log::{LogStore, MemStore, SessionLog};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use roundtable_core::peer::PeerExtras;
use roundtable_core::runner::{open_session, run_peers, run_peers_with};
use roundtable_core::session::{SessionSummary, new_session_id};
use roundtable_core::tool::{Outcome, Tool, ToolBox, ToolContext, ToolDef, ToolListBody, ToolOutput, record_listing};
use roundtable_core::{Kind, PeerId};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// A consensus session decided by votes in its second round (scripted replies).
const CONSENSUS: &str = r#"
name = "db-choice"
[models.m]
provider = "scripted"
cycle = true
replies = ["(no script)"]
[models.m.per_peer]
lead = ["Use Postgres for the order store. Answer: postgres", "Use Postgres with a read replica for reporting. Answer: postgres"]
a = ['{"approve": true, "answer": "postgres", "reason": "Fits our relational data."}', '{"approve": true, "answer": "postgres", "reason": "The replica settles reporting."}']
b = ['{"approve": false, "answer": "mysql", "reason": "We know MySQL."}', '{"approve": true, "answer": "postgres", "reason": "With a replica, yes."}']
[[peers]]
id = "lead"
model = "m"
[[peers]]
id = "a"
model = "m"
[[peers]]
id = "b"
model = "m"
[protocol]
kind = "consensus"
proposer = "lead"
threshold = 0.6
"#;

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("ROUNDTABLE_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the web view's browser test needs Chromium and found none on PATH.\n\
         Install it with `apt-get update && apt-get install -y chromium` (Debian/Ubuntu),\n\
         or set ROUNDTABLE_CHROMIUM to the path of a Chrome or Chromium binary."
    );
}

/// Headless Chromium, killed when dropped.
struct Browser {
    child: Child,
    ws: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch() -> Browser {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start Chromium ({}): {e}", chromium().display()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("ws://") {
                let _ = tx.send(line[i..].trim().to_string());
            }
        }
    });
    let ws = rx.recv_timeout(Duration::from_secs(60)).expect("Chromium printed its DevTools address");
    Browser { child, ws, _profile: profile }
}

/// A DevTools protocol connection attached to one page.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next: u64,
    session: Option<String>,
    events: Vec<Value>,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("DevTools websocket");
        Cdp { ws, next: 0, session: None, events: Vec::new() }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("websocket open")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true })).await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    async fn text(&mut self, selector: &str) -> String {
        let expr = format!("(document.querySelector({}) || {{innerText: ''}}).innerText", json!(selector));
        self.eval(&expr).await.as_str().unwrap_or_default().to_string()
    }

    /// Evaluate `expr` until it is true.
    async fn wait_for(&mut self, what: &str, expr: &str) {
        let start = Instant::now();
        loop {
            if self.eval(expr).await == json!(true) {
                return;
            }
            if start.elapsed() > Duration::from_secs(90) {
                let body = self.text("body").await;
                panic!("the page never showed {what}; it shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let height = self.eval("document.documentElement.scrollHeight").await.as_u64().unwrap_or(1000).clamp(600, 8000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, &png).unwrap();
        println!("screenshot of the web view: {}", path.display());
        path
    }
}

/// An offline model that answers only when the test lets it (one permit per call), so
/// the session is still running while the page is open.
struct Gated {
    inner: Arc<dyn ChatModel>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl ChatModel for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.gate.acquire().await.unwrap().forget();
        self.inner.chat(req).await
    }
}

/// Whether the page's text shows `needle` (headings are styled in capitals, which
/// `innerText` reflects).
fn shows(text: &str, needle: &str) -> bool {
    text.to_lowercase().contains(&needle.to_lowercase())
}

/// `5142` as `5,142`, as the page writes numbers.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn wait_log(log: &Arc<dyn SessionLog>, n: u64) {
    let start = Instant::now();
    while log.last_seq().await.unwrap() < n {
        assert!(start.elapsed() < Duration::from_secs(30), "the session never reached {n} envelopes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_running_session_live_and_explains_how_it_ended() {
    let browser = launch();

    // A store with a session that is about to run, and the view over it.
    let store = MemStore::new();
    let shared: Arc<dyn LogStore> = Arc::new(store.clone());
    let addr = roundtable_observe::ui::serve("127.0.0.1:0".parse().unwrap(), shared).await.unwrap();
    let plan = example("product-debate.toml");
    let session = new_session_id();
    let log = store.open(&session, true).await.unwrap();
    open_session(log.as_ref(), &plan, plan.topic.as_deref().unwrap()).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let models: HashMap<PeerId, Arc<dyn ChatModel>> = offline_models(&plan)
        .into_iter()
        .map(|(p, m)| (p, Arc::new(Gated { inner: m, gate: gate.clone() }) as Arc<dyn ChatModel>))
        .collect();
    let running = tokio::spawn({
        let (log, plan) = (log.clone(), plan.clone());
        async move { run_peers(log, &plan, models, None, None).await.unwrap() }
    });
    gate.add_permits(4);
    wait_log(&log, 5).await;

    // Open the page on the session while it runs.
    let mut cdp = Cdp::connect(&browser.ws).await;
    let target = cdp.call("Target.createTarget", json!({ "url": "about:blank" })).await;
    let attached = cdp.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    for domain in ["Page.enable", "Runtime.enable", "Network.enable"] {
        cdp.call(domain, json!({})).await;
    }
    let base = format!("http://{addr}");
    cdp.call("Page.navigate", json!({ "url": format!("{base}/#/s/{session}") })).await;

    let cards = "document.querySelectorAll('[data-role=transcript] article.card').length";
    cdp.wait_for("the first four turns", &format!("{cards} === 5")).await;
    let decision = cdp.text("[data-role=decision]").await;
    assert!(decision.contains("In progress: round 2, 4 messages so far"), "{decision}");
    assert!(cdp.text("header").await.contains("live"), "the stream is connected");
    assert!(cdp.text(".head").await.contains("in progress"));
    cdp.screenshot("roundtable-web-view-live.png").await;

    // The rest of the session arrives while the page is open.
    gate.add_permits(100);
    let summary = running.await.unwrap();
    cdp.wait_for(
        "the stop",
        &format!("{cards} === 12 && document.body.innerText.toLowerCase().includes('why it stopped')"),
    )
    .await;

    // What a person sees.
    let head = cdp.text(".head").await;
    assert!(head.contains("product-debate") && head.contains("stopped") && head.contains("round_robin"), "{head}");
    assert!(head.contains("Should we build an offline mode"), "the task is shown: {head}");

    let decision = cdp.text("[data-role=decision]").await;
    for needle in [
        "Why it stopped",
        "completed: 3 rounds, then facilitator's summary",
        "Final answer",
        "Recommendation: a staged plan",
        "Decided by:",
        "#11 facilitator (message, round 4)",
        "The messages that led to it (10): #2 pm, #3 eng, #4 cfo",
    ] {
        assert!(shows(&decision, needle), "the decision panel lacks {needle:?}:\n{decision}");
    }

    let transcript = cdp.text("[data-role=transcript]").await;
    for needle in [
        "Round 1",
        "Round 2",
        "Round 3",
        "Round 4",
        "Stop",
        "pm",
        "→ all",
        "answers #2 pm",
        "Offline mode is the top request",
    ] {
        assert!(shows(&transcript, needle), "the transcript lacks {needle:?}");
    }
    let order = cdp
        .eval("[...document.querySelectorAll('[data-role=transcript] article.card')].map(c => Number(c.dataset.seq))")
        .await;
    assert_eq!(order, json!((1..=12).collect::<Vec<u64>>()), "every envelope once, in log order");
    let stars = cdp.eval("document.querySelectorAll('[data-role=transcript] .star').length").await;
    assert_eq!(stars, json!(10), "the ten messages that led to the decision are marked");

    // Who answered whom: four peers, four arrows (eng→pm, cfo→eng, pm→cfo, facilitator→cfo).
    assert_eq!(cdp.eval("document.querySelectorAll('#graph g.node').length").await, json!(4));
    assert_eq!(cdp.eval("document.querySelectorAll('#graph line.edge').length").await, json!(4));
    let titles =
        cdp.eval("[...document.querySelectorAll('#graph line.edge title')].map(t => t.textContent).sort()").await;
    assert_eq!(
        titles,
        json!(["cfo answered eng 3×", "eng answered pm 3×", "facilitator answered cfo 1×", "pm answered cfo 2×"])
    );

    // Tokens and cost per peer, with the session's totals.
    let cost = cdp.text("[data-role=cost]").await;
    for p in ["pm", "eng", "cfo", "facilitator", "total"] {
        assert!(cost.contains(p), "the cost table lacks {p}");
    }
    let total = cdp.eval("document.querySelector('[data-role=cost] tr.total').children[6].textContent").await;
    assert_eq!(total, json!(thousands(summary.tokens)), "the total tokens are the session's");
    let per_peer = cdp
        .eval("Object.fromEntries([...document.querySelectorAll('[data-role=cost] tbody tr[data-peer]')].map(r => [r.dataset.peer, Number(r.children[2].textContent)]))")
        .await;
    for (peer, tally) in &summary.per_peer {
        if tally.calls > 0 {
            assert_eq!(per_peer[peer.as_str()], json!(tally.calls), "{peer}'s calls");
        }
    }
    assert_eq!(cdp.eval("document.querySelectorAll('[data-chart=tokens] polyline').length").await, json!(4));
    assert!(cost.contains("no prices configured"), "{cost}");
    let votes = cdp.text("[data-role=votes]").await;
    assert!(votes.contains("No votes, proposals or verdicts in this session (protocol round_robin)"), "{votes}");

    // The sessions list shows it stopped.
    cdp.wait_for(
        "the list updated",
        "document.querySelector('#session-list').innerText.includes('stopped: completed')",
    )
    .await;

    // Nothing but this server was asked for anything, and the page threw no errors.
    cdp.eval("1").await;
    let mut hosts = Vec::new();
    for ev in &cdp.events {
        if ev["method"] == "Network.requestWillBeSent" {
            let url = ev["params"]["request"]["url"].as_str().unwrap_or_default().to_string();
            if !url.starts_with(&base) && !url.starts_with("about:") && !url.starts_with("data:") {
                hosts.push(url);
            }
        }
        assert_ne!(ev["method"], "Runtime.exceptionThrown", "the page threw: {}", ev["params"]);
    }
    assert!(hosts.is_empty(), "the page fetched from elsewhere: {hosts:?}");

    let shot = cdp.screenshot("roundtable-web-view.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 20_000, "a real page, not a blank one");

    // A session decided by votes: the page shows each ballot and the consensus.
    let consensus = plan_from(CONSENSUS);
    let voted = new_session_id();
    let vlog = store.open(&voted, true).await.unwrap();
    open_session(vlog.as_ref(), &consensus, "Which database for the order store?").await.unwrap();
    let vs = run_peers(vlog.clone(), &consensus, offline_models(&consensus), None, None).await.unwrap();
    let reason = vs.stop_reason.clone().unwrap();
    cdp.call("Page.navigate", json!({ "url": format!("{base}/#/s/{voted}") })).await;
    cdp.wait_for("the voted session", "document.body.innerText.includes('Which database')").await;
    cdp.wait_for("its stop", "document.body.innerText.toLowerCase().includes('why it stopped')").await;
    let votes = cdp.text("[data-role=votes]").await;
    for needle in ["✗ rejects · answer: mysql · reason: We know MySQL.", "✓ approves · answer: postgres", "proposal"]
    {
        assert!(shows(&votes, needle), "the votes panel lacks {needle:?}:\n{votes}");
    }
    let rows = cdp.eval("document.querySelectorAll('[data-role=votes] tbody tr').length").await;
    assert_eq!(rows, json!(6), "two proposals and four ballots");
    let decision = cdp.text("[data-role=decision]").await;
    assert!(shows(&decision, &reason), "{decision}");
    assert!(shows(&decision, "Ballots on it:"), "the votes behind the decision are named: {decision}");
    assert!(
        shows(&decision, " a (vote): ✓ approves · answer: postgres · reason: The replica settles reporting."),
        "{decision}"
    );
    let titles =
        cdp.eval("[...document.querySelectorAll('#graph line.edge title')].map(t => t.textContent).sort()").await;
    assert_eq!(titles, json!(["a answered lead 2×", "b answered lead 2×"]));
    cdp.screenshot("roundtable-web-view-votes.png").await;

    let s = SessionSummary::from_entries(&session, &log.read_all().await.unwrap()).unwrap();
    assert!(s.stopped);
    assert!(log.read_all().await.unwrap().iter().any(|e| e.env.kind == Kind::Stop));
}

#[test]
fn the_page_loads_nothing_from_other_hosts() {
    for (name, text) in [
        ("index.html", include_str!("../assets/index.html")),
        ("app.js", include_str!("../assets/app.js")),
        ("app.css", include_str!("../assets/app.css")),
    ] {
        for (i, _) in text.match_indices("//") {
            let before = &text[..i];
            let scheme = before.ends_with("http:")
                || before.ends_with("https:")
                || before.ends_with('"')
                || before.ends_with('\'')
                || before.ends_with('(');
            if scheme {
                assert!(
                    text[i..].starts_with("//www.w3.org/2000/svg"),
                    "{name} refers to another host: {}",
                    &text[i.saturating_sub(8)..(i + 40).min(text.len())]
                );
            }
        }
    }
}

/// A conversation whose tester runs a check that fails (exit 3), then finishes.
const CHECKS: &str = r#"
name = "checks"
topic = "Check POST /users before it ships."
[tools.check]
kind = "command"
description = "Run the contract checks on an endpoint."
argv = ["sh", "check.sh", "{spec}"]
parameters = { type = "object", properties = { spec = { type = "string" } }, required = ["spec"] }
[models.m]
provider = "scripted"
[models.m.per_peer]
tester = ['!tool check {"spec": "POST /users 201 409"}', '!tool finish {"answer": "The checks fail: 409 is missing."}']
[[peers]]
id = "tester"
model = "m"
tools = ["check"]
[protocol]
kind = "conversation"
start = ["tester"]
finish = "tester"
max_turns = 2
"#;

/// The `check` tool, standing in for the command: it reports a failing check.
struct FailingCheck(ToolDef);

#[async_trait]
impl Tool for FailingCheck {
    fn def(&self) -> &ToolDef {
        &self.0
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, _: &Value, _: &ToolContext) -> ToolOutput {
        ToolOutput {
            outcome: Outcome::Error,
            output: "1 passed, 1 failed: 409 is never returned".into(),
            exit_status: Some(3),
            signal: None,
            duration_ms: Some(7),
            truncated: false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_each_tool_call_who_asked_and_how_it_ended() {
    let browser = launch();
    let store = MemStore::new();
    let shared: Arc<dyn LogStore> = Arc::new(store.clone());
    let addr = roundtable_observe::ui::serve("127.0.0.1:0".parse().unwrap(), shared).await.unwrap();
    let plan = plan_from(CHECKS);
    let session = new_session_id();
    let log = store.open(&session, true).await.unwrap();
    open_session(log.as_ref(), &plan, plan.topic.as_deref().unwrap()).await.unwrap();
    // What an MCP server listed at the start, as `run` records it.
    let def = |name: &str| ToolDef {
        name: name.into(),
        description: format!("{name}."),
        parameters: json!({"type": "object"}),
    };
    let listing =
        ToolListBody { server: "docs".into(), tools: vec![def("read_text_file"), def("list_directory")], error: None };
    record_listing(log.as_ref(), &PeerId::from("tester"), &listing).await.unwrap();
    let mut tools = ToolBox::new();
    let check = ToolDef {
        name: "check".into(),
        description: "Run the contract checks.".into(),
        parameters: json!({"type": "object"}),
    };
    tools.insert("check", Arc::new(FailingCheck(check)) as Arc<dyn Tool>);
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..PeerExtras::default() };
    let summary = run_peers_with(log.clone(), &plan, offline_models(&plan), None, None, extras).await.unwrap();
    assert_eq!(summary.final_answer.as_deref(), Some("The checks fail: 409 is missing."));
    // Written after the stop (as a late seat's answer would be): shown, but no decision.
    let entries = log.read_all().await.unwrap();
    let call = entries.iter().find(|e| e.env.kind == Kind::ToolCall).unwrap().env.clone();
    let mut late = roundtable_core::Envelope::new(
        &session,
        &PeerId::from("tester"),
        "late/approval",
        Kind::Approval,
        roundtable_core::Recipient::All,
        roundtable_core::Body::text("LATE: approved after the stop")
            .with_json(json!({"approve": true, "reason": "late", "timeout": false})),
    );
    late.parents = vec![call.id.clone()];
    let late_seq = log.append(late).await.unwrap().seq;

    let mut cdp = Cdp::connect(&browser.ws).await;
    let target = cdp.call("Target.createTarget", json!({ "url": "about:blank" })).await;
    let attached = cdp.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    for domain in ["Page.enable", "Runtime.enable"] {
        cdp.call(domain, json!({})).await;
    }
    cdp.call("Page.navigate", json!({ "url": format!("http://{addr}/#/s/{session}") })).await;
    cdp.wait_for("the stop", "!!document.body && document.body.innerText.toLowerCase().includes('why it stopped')")
        .await;

    let card = |kind: &str| format!("[data-role=transcript] article.card[data-kind={kind}]");
    let note = |kind: &str| format!("{} [data-role=tool]", card(kind));
    assert_eq!(cdp.text(&note("tool_list")).await, "MCP server docs: read_text_file, list_directory");
    assert_eq!(cdp.text(&note("tool_call")).await, "tester calls check");
    let call = cdp.text(&card("tool_call")).await;
    assert!(call.contains(r#"check({"spec": "POST /users 201 409"})"#), "the arguments are shown: {call}");
    let result_note = cdp.text(&note("tool_result")).await;
    assert!(result_note.starts_with("check · error · exit 3 · ") && result_note.ends_with(" ms"), "{result_note}");
    let result = cdp.text(&card("tool_result")).await;
    assert!(result.contains("1 passed, 1 failed: 409 is never returned"), "{result}");
    let call_seq = cdp.eval(&format!("Number(document.querySelector({:?}).dataset.seq)", card("tool_call"))).await;
    assert!(result.contains(&format!("answers #{call_seq} tester")), "the result answers its call: {result}");
    // Tool calls and results are what a peer did, not votes or decisions.
    let kinds = cdp
        .eval("[...document.querySelectorAll('[data-role=votes] tbody tr')].map(r => r.children[3].textContent)")
        .await;
    assert!(!kinds.as_array().unwrap().iter().any(|k| k.as_str().unwrap().starts_with("tool")), "{kinds}");
    // The envelope after the stop is marked so, and is not among the decisions.
    let late = format!("[data-role=transcript] article.card[data-seq=\"{late_seq}\"]");
    assert_eq!(cdp.text(&format!("{late} [data-role=late]")).await, "after the stop: decides nothing");
    assert!(cdp.text(&late).await.contains("LATE: approved after the stop"));
    assert_eq!(cdp.text(&format!("{} [data-role=late]", card("tool_call"))).await, "", "before the stop: unmarked");
    let rows = cdp
        .eval("[...document.querySelectorAll('[data-role=votes] tbody tr')].map(r => r.children[0].textContent)")
        .await;
    let rows: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(!rows.is_empty(), "the finish is a decision");
    assert!(!rows.contains(&format!("#{late_seq}").as_str()), "{rows:?}");
    cdp.screenshot("roundtable-web-view-tools.png").await;
    cdp.eval("1").await;
    for ev in &cdp.events {
        assert_ne!(ev["method"], "Runtime.exceptionThrown", "the page threw: {}", ev["params"]);
    }
}

/// A debate whose one round is a vote (answer and confidence), with a person voting.
const VOTE: &str = r#"
name = "vote"
topic = "Which region do we launch in first?"
[models.s]
provider = "scripted"
[models.s.per_peer]
a = ['{"answer": "EU", "confidence": 0.8, "reason": "GDPR work is done"}']
b = ['{"answer": "US", "confidence": 0.6, "reason": "bigger market"}']
[[peers]]
id = "a"
model = "s"
[[peers]]
id = "p"
kind = "human"
[[peers]]
id = "b"
model = "s"
[protocol]
kind = "debate"
rounds = 1
json = true
"#;

/// A consensus where a person approves or denies each proposal, with a reason.
const APPROVE: &str = r#"
name = "approve"
topic = "Which database for the order store?"
[models.m]
provider = "scripted"
[models.m.per_peer]
lead = ["Use MySQL for the order store. Answer: mysql", "Use Postgres with a read replica. Answer: postgres"]
a = ['{"approve": true, "reason": "Fine."}', '{"approve": true, "reason": "Better."}']
[[peers]]
id = "lead"
model = "m"
[[peers]]
id = "a"
model = "m"
[[peers]]
id = "ops"
kind = "human"
[protocol]
kind = "consensus"
proposer = "lead"
threshold = 0.6
"#;

const SEAT_TOKEN: &str = "browser-seat-token";

/// A new page attached to the browser.
async fn page(browser: &Browser) -> Cdp {
    let mut cdp = Cdp::connect(&browser.ws).await;
    let target = cdp.call("Target.createTarget", json!({ "url": "about:blank" })).await;
    let attached = cdp.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    for domain in ["Page.enable", "Runtime.enable", "Network.enable"] {
        cdp.call(domain, json!({})).await;
    }
    cdp
}

/// Start `plan` on `store` with its model peers running (its human seats empty).
async fn start_session(
    store: &MemStore,
    plan: &roundtable_core::team::TeamPlan,
) -> (roundtable_core::SessionId, tokio::task::JoinHandle<()>) {
    let session = new_session_id();
    let log = store.open(&session, true).await.unwrap();
    open_session(log.as_ref(), plan, plan.topic.as_deref().unwrap()).await.unwrap();
    let plan = plan.clone();
    let running = tokio::spawn(async move {
        run_peers(log, &plan, offline_models(&plan), None, None).await.unwrap();
    });
    (session, running)
}

/// Set a form control's value as typing would.
fn type_into(selector: &str, value: &str) -> String {
    format!(
        "(() => {{ const el = document.querySelector({}); el.value = {}; el.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
        json!(selector),
        json!(value)
    )
}

fn click(selector: &str) -> String {
    format!("(() => {{ document.querySelector({}).click(); return true; }})()", json!(selector))
}

/// What `peer` answered or said in `session` (not the stop).
async fn mine(store: &MemStore, session: &roundtable_core::SessionId, peer: &str) -> Vec<roundtable_core::Envelope> {
    let log = store.open(session, false).await.unwrap();
    // (Whoever sees the end first records the stop: a seat's peer may be the one.)
    log.read_all()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.env.from.as_str() == peer && e.env.kind != Kind::Stop)
        .map(|e| (*e.env).clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_in_the_browser_answers_a_turn_votes_approves_and_interjects() {
    let browser = launch();
    let store = MemStore::new();
    let seats = Arc::new(MemSeats::new(store.clone()));
    let acting = roundtable_observe::ui::Acting::new(seats.clone(), Arc::from(SEAT_TOKEN));
    let addr = roundtable_observe::ui::serve_acting(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(store.clone()),
        roundtable_observe::ui::Access::Open,
        Some(acting),
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");

    // A turn, with a bad answer refused and two interjections.
    let mut review = example("human-review.toml");
    review.peers.iter_mut().for_each(|p| p.answer_within_ms = None);
    let (session, running) = start_session(&store, &review).await;
    let mut cdp = page(&browser).await;
    // Opened without the token, the page reads but says how to act.
    cdp.call("Page.navigate", json!({ "url": format!("{base}/#/s/{session}") })).await;
    cdp.wait_for(
        "how to take the seat",
        "document.querySelector('[data-role=seat]')?.innerText.includes('roundtable ui --act') === true",
    )
    .await;
    assert_eq!(cdp.eval("document.querySelectorAll('[data-take]').length").await, json!(0));
    // Opened with the URL the command printed, it can act.
    cdp.call("Page.navigate", json!({ "url": format!("{base}/?token={SEAT_TOKEN}#/s/{session}") })).await;
    cdp.wait_for("the take button", "document.querySelector('[data-take=reviewer]') !== null").await;
    cdp.eval(&click("[data-take=reviewer]")).await;
    cdp.wait_for(
        "the first duty",
        "document.querySelector('[data-role=question]')?.innerText.includes('Your duty: turn/1') === true",
    )
    .await;
    let question = cdp.text("[data-role=question]").await;
    assert!(question.contains("What you see under the context policy"), "{question}");
    let context = cdp.eval("document.querySelector('[data-role=seat-context]').textContent").await;
    assert!(context.as_str().unwrap().contains("I propose shipping the new billing page"), "{context}");

    cdp.eval(&type_into("[data-role=answer-form] textarea[name=answer]", "   ")).await;
    cdp.eval(&click("[data-role=submit]")).await;
    cdp.wait_for("the refusal", "document.querySelector('[data-role=seat-error]').innerText.includes('refused: an empty answer is not an answer')").await;

    cdp.eval(&type_into("[data-role=say-text]", "What do refunds look like on annual plans?")).await;
    cdp.eval(&click("[data-role=say-send]")).await;
    cdp.wait_for("the interjection sent", "document.querySelector('[data-role=say-text]').value === ''").await;
    cdp.eval(&type_into("[data-role=say-to]", "eng")).await;
    cdp.eval(&type_into("[data-role=say-text]", "Can the flag be flipped per plan type?")).await;
    cdp.eval(&click("[data-role=say-send]")).await;
    // Both show up in the transcript, from the person, before the turn is answered.
    cdp.wait_for(
        "the interjections in the transcript",
        "[...document.querySelectorAll('[data-role=transcript] article.card')].filter(c => c.innerText.includes('reviewer') && c.innerText.includes('say/')).length === 2",
    )
    .await;
    cdp.screenshot("roundtable-web-view-seat.png").await;

    cdp.eval(&type_into(
        "[data-role=answer-form] textarea[name=answer]",
        "Annual plans were never tested: ship to 10% first.",
    ))
    .await;
    cdp.eval(&click("[data-role=submit]")).await;
    cdp.wait_for(
        "the second duty",
        "document.querySelector('[data-role=question]')?.innerText.includes('Your duty: turn/4') === true",
    )
    .await;
    cdp.eval(&type_into(
        "[data-role=answer-form] textarea[name=answer]",
        "Fine by me if the dashboard is up before Monday.",
    ))
    .await;
    cdp.eval(&click("[data-role=submit]")).await;
    running.await.unwrap();
    cdp.wait_for("the end", "document.querySelector('[data-role=seat-over]') !== null").await;
    let envs = mine(&store, &session, "reviewer").await;
    let steps: Vec<&str> = envs.iter().map(|e| &*e.step).collect();
    assert_eq!(steps, ["say/0", "say/1", "turn/1", "turn/4"], "{envs:?}");
    assert_eq!(serde_json::to_value(&envs[1].to).unwrap(), json!({"type": "peer", "id": "eng"}));
    assert_eq!(&*envs[2].body.text, "Annual plans were never tested: ship to 10% first.");
    cdp.eval(&click("[data-role=leave]")).await;
    cdp.wait_for("the seat left", "document.querySelector('[data-role=seat]') === null || !document.querySelector('[data-role=seat]').innerText.includes('You hold seat')").await;

    // A vote: answer and confidence, a bad confidence refused.
    let vote = plan_from(VOTE);
    let (voted, running) = start_session(&store, &vote).await;
    cdp.call("Page.navigate", json!({ "url": format!("{base}/#/s/{voted}") })).await;
    cdp.wait_for("the take button", "document.querySelector('[data-take=p]') !== null").await;
    cdp.eval(&click("[data-take=p]")).await;
    cdp.wait_for("the vote", "document.querySelector('[data-role=answer-form] [name=confidence]') !== null").await;
    // Rounds are counted from 1 wherever a person reads them (the log says `r0/answer`).
    let duty = cdp.text("[data-role=question]").await;
    assert!(duty.contains("Your duty: r1/answer (round 1)"), "{duty}");
    cdp.eval(&type_into("[data-role=answer-form] [name=answer]", "EU")).await;
    cdp.eval(&type_into("[data-role=answer-form] [name=confidence]", "very")).await;
    cdp.eval(&click("[data-role=submit]")).await;
    cdp.wait_for("the refusal", "document.querySelector('[data-role=seat-error]').innerText.includes('confidence must be a number from 0 to 1')").await;
    cdp.eval(&type_into("[data-role=answer-form] [name=confidence]", "0.9")).await;
    cdp.eval(&type_into("[data-role=answer-form] [name=reason]", "the compliance work is done")).await;
    cdp.eval(&click("[data-role=submit]")).await;
    running.await.unwrap();
    cdp.wait_for("the end", "document.querySelector('[data-role=seat-over]') !== null").await;
    let envs = mine(&store, &voted, "p").await;
    assert_eq!(envs.len(), 1, "{envs:?}");
    assert_eq!(&*envs[0].step, "r0/answer", "the log keeps its own names");
    let shown = "[...document.querySelectorAll('[data-role=transcript] [data-role=step]')].map(c => c.innerText)";
    cdp.wait_for("the stop in the transcript", &format!("{shown}.includes('stop')")).await;
    let steps = cdp
        .eval("[...document.querySelectorAll('[data-role=transcript] [data-role=step]')].map(c => c.innerText)")
        .await;
    let steps: Vec<&str> = steps.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(steps.iter().filter(|s| **s == "r1/answer").count(), 3, "the three answers of round 1: {steps:?}");
    assert!(!steps.iter().any(|s| s.starts_with("r0/")), "no step shown from 0: {steps:?}");
    let j = envs[0].body.json.clone().unwrap();
    assert_eq!((j["answer"].clone(), j["confidence"].clone()), (json!("EU"), json!(0.9)), "{j}");
    cdp.eval(&click("[data-role=leave]")).await;

    // Approve or deny, with a reason: denied first, approved when the proposal changes.
    let approve = plan_from(APPROVE);
    let (decided, running) = start_session(&store, &approve).await;
    cdp.call("Page.navigate", json!({ "url": format!("{base}/#/s/{decided}") })).await;
    cdp.wait_for("the take button", "document.querySelector('[data-take=ops]') !== null").await;
    cdp.eval(&click("[data-take=ops]")).await;
    cdp.wait_for("the ballot", "document.querySelector('[data-field=approve]') !== null").await;
    let labels = cdp.text("[data-field=approve]").await;
    assert!(labels.contains("Approve") && labels.contains("Deny"), "{labels}");
    cdp.eval(&click("[data-role=submit]")).await;
    cdp.wait_for(
        "the refusal",
        "document.querySelector('[data-role=seat-error]').innerText.includes('approve: answer yes or no')",
    )
    .await;
    let first = cdp.eval("document.querySelector('[data-role=question] h3').innerText").await;
    cdp.eval(&click("[data-field=approve] input[value=no]")).await;
    cdp.eval(&type_into("[data-role=answer-form] [name=reason]", "We run Postgres everywhere else.")).await;
    cdp.eval(&click("[data-role=submit]")).await;
    cdp.wait_for(
        "the second proposal",
        &format!("document.querySelector('[data-field=approve]') !== null && document.querySelector('[data-role=question] h3').innerText !== {first}"),
    )
    .await;
    cdp.eval(&click("[data-field=approve] input[value=yes]")).await;
    cdp.eval(&click("[data-role=submit]")).await;
    running.await.unwrap();
    cdp.wait_for("the end", "document.querySelector('[data-role=seat-over]') !== null").await;
    let envs = mine(&store, &decided, "ops").await;
    let ballots: Vec<Value> = envs.iter().filter_map(|e| e.body.json.clone()).collect();
    assert_eq!(ballots.len(), 2, "{envs:?}");
    assert_eq!(ballots[0]["approve"], json!(false));
    assert_eq!(ballots[0]["reason"], json!("We run Postgres everywhere else."));
    assert_eq!(ballots[1]["approve"], json!(true));
    assert!(envs.iter().all(|e| e.from.as_str() == "ops"));

    // The page threw nothing.
    cdp.eval("1").await;
    for ev in &cdp.events {
        assert_ne!(ev["method"], "Runtime.exceptionThrown", "the page threw: {}", ev["params"]);
    }
}
