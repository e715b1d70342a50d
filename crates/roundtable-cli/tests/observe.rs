//! `roundtable trace | replay | fork | ui`, `run --metrics` and OTLP export, through the
//! built binary.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    c.env_remove("ROUNDTABLE_DIR").env("NO_COLOR", "1");
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn run(args: &[&str], data: &Path) -> Output {
    bin().args(args).arg("--data-dir").arg(data).output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

/// Run a team file offline; the new session's id.
fn run_session(team: &Path, data: &Path) -> String {
    let o = run(&["run", team.to_str().unwrap(), "--json"], data);
    assert!(o.status.success(), "{}", stderr(&o));
    json(&o)["session"].as_str().unwrap().to_string()
}

fn session_count(data: &Path) -> usize {
    let o = run(&["sessions", "--json"], data);
    assert!(o.status.success(), "{}", stderr(&o));
    json(&o).as_array().unwrap().len()
}

/// `src` with the number after each `key` replaced by `value`.
fn regex_lite_replace(src: &str, key: &str, value: &str) -> String {
    src.lines()
        .map(|l| match l.find(key) {
            Some(i) => format!("{}{key}{value}", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn example_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_session_traces_and_replays_with_no_divergence() {
    let files = example_files();
    assert!(files.len() >= 2);
    for team in files {
        let data = tempfile::tempdir().unwrap();
        let d = data.path();
        let name = team.file_name().unwrap().to_string_lossy().into_owned();
        // Nobody takes a human seat here: a copy whose seats wait a moment, then are
        // skipped on the record (tests/human.rs has people in them).
        let src = std::fs::read_to_string(&team).unwrap();
        let team = if src.contains("kind = \"human\"") {
            let short = regex_lite_replace(&src, "answer_within_secs = ", "0.2");
            assert_ne!(short, src, "{name}: a human seat in an example has answer_within_secs");
            let copy = d.join(&name);
            std::fs::write(&copy, short).unwrap();
            copy
        } else {
            team
        };
        let id = run_session(&team, d);

        let o = run(&["replay", &id, "--json"], d);
        assert_eq!(o.status.code(), Some(0), "{name}: {}{}", stdout(&o), stderr(&o));
        let r = json(&o);
        assert!(r["divergence"].is_null(), "{name}: {r}");
        // Envelopes that landed after the stop (a conversation peer's turn that was
        // under way) are stragglers: on the record, not part of the decision.
        let stragglers = r["stragglers"].as_array().unwrap().len() as u64;
        assert_eq!(r["matched"].as_u64().unwrap() + stragglers, r["recorded"].as_u64().unwrap(), "{name}: {r}");
        let o = run(&["replay", &id], d);
        assert!(stdout(&o).contains("No divergence"), "{name}: {}", stdout(&o));

        let o = run(&["trace", &id], d);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let t = stdout(&o);
        let summary = json(&run(&["log", &id, "--json"], d));
        let reason = summary["stop_reason"].as_str().unwrap();
        assert!(
            t.contains("decided by #") || t.contains("the last round before it: #"),
            "{name}: the trace names what the stop was decided from:\n{t}"
        );
        for needle in ["Why it stopped", reason, "Who said what to whom", "⤷ answers ", "Cost per peer", "total"] {
            assert!(t.contains(needle), "{name}: the trace lacks {needle:?}:\n{t}");
        }
        let tj = json(&run(&["trace", &id, "--format", "json"], d));
        assert_eq!(tj["stop"]["reason"], reason);
        assert_eq!(tj["total"]["tokens"], summary["tokens"], "{name}: per-peer costs add up");
        let named = |k: &str| tj["stop"][k].as_array().is_some_and(|a| !a.is_empty());
        assert!(named("led_by") || named("last_round"), "{name}: {}", tj["stop"]);
        assert!(stdout(&run(&["trace", &id, "--format", "mermaid"], d)).starts_with("flowchart TD"));
        assert!(stdout(&run(&["trace", &id, "--format", "dot"], d)).starts_with("digraph"));

        // No OTEL_* variables: no trace context in the envelopes.
        let export = stdout(&run(&["export", &id], d));
        assert!(!export.contains("\"trace\""), "{name}");
    }
}

#[test]
fn a_fork_continues_from_a_prefix_with_one_message_edited() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let id = run_session(&examples().join("product-debate.toml"), d);
    let edited = "CFO: fund offline mode in full, whatever it costs.";
    let o = run(&["fork", &id, "--at", "5", "--edit", &format!("#4={edited}"), "--json"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    let new = s["session"].as_str().unwrap().to_string();
    assert_ne!(new, id);
    assert!(s["stop_reason"].as_str().unwrap().starts_with("completed: 3 rounds"), "{s}");
    assert_eq!(session_count(d), 2);
    let lines: Vec<serde_json::Value> = roundtable_core::chain::split_seal(&stdout(&run(&["export", &new], d)))
        .0
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    assert_eq!(lines[3]["body"]["text"], edited);
    assert_eq!(lines[0]["body"]["json"]["forked_from"]["session"], id.as_str());
    assert_eq!(lines[0]["body"]["json"]["forked_from"]["at"], 5);
    let t = stdout(&run(&["trace", &new], d));
    assert!(t.contains(&format!("Forked from session {id} at #5, with envelope #4 edited")), "{t}");
    // A fork replays like any session.
    assert_eq!(run(&["replay", &new], d).status.code(), Some(0));
    // A fork may take a new budget: it is the new session's plan.
    let o = run(&["fork", &id, "--at", "5", "--max-calls", "5", "--json"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert!(s["stop_reason"].as_str().unwrap().starts_with("budget: 5 model calls made, limit 5"), "{s}");
    assert_eq!(s["answer_accepted"], false);
    let o = run(&["fork", &id, "--at", "5", "--max-calls", "0"], d);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A session stopped by its budget continues with a larger one (as a new session).
    let short = s["session"].as_str().unwrap().to_string();
    let o = run(&["resume", &short, "--extend", "--max-calls", "50", "--json"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert!(s["stop_reason"].as_str().unwrap().starts_with("completed: 3 rounds"), "{s}");
    assert_eq!(s["answer_accepted"], true);
    assert_ne!(s["session"].as_str().unwrap(), short);
    let o = run(&["resume", &short, "--extend"], d);
    assert_eq!(o.status.code(), Some(2), "--extend needs a limit: {}", stderr(&o));
    let o = run(&["resume", &short, "--max-calls", "9"], d);
    assert_eq!(o.status.code(), Some(2), "budget flags need --extend: {}", stderr(&o));
}

#[test]
fn bad_input_exits_2_with_a_clear_error_and_writes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let id = run_session(&examples().join("product-debate.toml"), d);
    let expect_2 = |args: &[&str], needle: &str| {
        let o = run(args, d);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: stderr lacks {needle:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?} printed {}", stdout(&o));
    };
    for cmd in ["trace", "replay"] {
        expect_2(&[cmd, "no-such-session"], "no session no-such-session");
    }
    expect_2(&["fork", "no-such-session", "--at", "2"], "no session no-such-session");
    expect_2(&["fork", &id, "--at", "99"], "--at 99 is past the end of session");
    expect_2(&["fork", &id, "--at", "0"], "--at must be at least 1");
    expect_2(&["fork", &id, "--at", "12"], "includes the stop");
    expect_2(
        &["fork", &id, "--at", "3", "--edit", "0123456789abcdef0123456789abcdef=hello"],
        "no envelope with that id",
    );
    expect_2(&["fork", &id, "--at", "3", "--edit", "#7=hello"], "after the fork point 3");
    expect_2(&["fork", &id, "--at", "3", "--edit", "missing-equals"], "ENVELOPE_ID=TEXT");
    assert_eq!(session_count(d), 1, "no failed fork wrote a session");

    // An export cut off mid-line, and one with a damaged line.
    let export = stdout(&run(&["export", &id], d));
    // Cut through its seal (the last line), then through its last envelope.
    let cut_seal = d.join("cut-seal.jsonl");
    std::fs::write(&cut_seal, &export[..export.len() - 40]).unwrap();
    expect_2(&["trace", cut_seal.to_str().unwrap()], "cut-seal.jsonl:13: not a seal");
    let body = roundtable_core::chain::split_seal(&export).0;
    let cut = d.join("cut.jsonl");
    std::fs::write(&cut, &body[..body.len() - 40]).unwrap();
    let cut_s = cut.to_str().unwrap();
    expect_2(&["trace", cut_s], "cut.jsonl:12:");
    expect_2(&["replay", cut_s], "cut.jsonl:12:");
    expect_2(&["fork", cut_s, "--at", "2"], "cut.jsonl:12:");
    let damaged = d.join("damaged.jsonl");
    let mut lines: Vec<&str> = export.lines().collect();
    lines[4] = "{\"v\":1,\"id\":";
    std::fs::write(&damaged, lines.join("\n")).unwrap();
    expect_2(&["trace", damaged.to_str().unwrap()], "damaged.jsonl:5:");
    // A whole export works the same as the stored session.
    let whole = d.join("whole.jsonl");
    std::fs::write(&whole, &export).unwrap();
    let o = run(&["trace", whole.to_str().unwrap()], d);
    assert!(o.status.success() && stdout(&o).contains("Why it stopped"), "{}", stderr(&o));
    assert_eq!(session_count(d), 1);

    // A damaged row in the database names the envelope.
    {
        let conn = rusqlite::Connection::open(d.join("roundtable.db")).unwrap();
        conn.execute("UPDATE envelopes SET json = '{\"v\":1,' WHERE session = ?1 AND seq = 5", [&id]).unwrap();
    }
    expect_2(&["trace", &id], "envelope 5");
    expect_2(&["replay", &id], "envelope 5");
    expect_2(&["fork", &id, "--at", "3"], "envelope 5");

    // A truncated database file.
    let db = d.join("roundtable.db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 2).unwrap();
    expect_2(&["trace", &id], "corrupt");
    expect_2(&["replay", &id], "corrupt");
    expect_2(&["fork", &id, "--at", "2"], "corrupt");
}

// ------------------------------------------------------------------------------------
// Servers the tests start: an OTLP/HTTP receiver and an OpenAI-compatible endpoint.

struct Server {
    addr: String,
    _rt: tokio::runtime::Runtime,
}

fn serve(router: axum::Router) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server { addr, _rt: rt }
}

/// An OTLP/HTTP receiver that decodes every export request.
fn otlp_receiver() -> (Server, Arc<Mutex<Vec<ExportTraceServiceRequest>>>) {
    let got: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
    let g = got.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                assert_eq!(headers.get("content-type").unwrap(), "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                g.lock().unwrap().push(req);
                axum::http::StatusCode::OK
            }
        }),
    );
    (serve(router), got)
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
}
fn attr_str<'a>(s: &'a Span, key: &str) -> &'a str {
    match attr(s, key) {
        Some(Value::StringValue(v)) => v,
        other => panic!("span {} attribute {key}: {other:?}", s.name),
    }
}
fn attr_int(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(Value::IntValue(v)) => *v,
        other => panic!("span {} attribute {key}: {other:?}", s.name),
    }
}

/// Span ids of a `traceparent` (trace id, span id), hex.
fn ids_of(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn otlp_export_carries_session_turn_and_model_call_spans_in_one_trace() {
    let (server, got) = otlp_receiver();
    let data = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["run", examples().join("api-design.toml").to_str().unwrap(), "--json", "--data-dir"])
        .arg(data.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", server.addr))
        .env("OTEL_SERVICE_NAME", "roundtable-under-test")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let session = json(&o)["session"].as_str().unwrap().to_string();

    let requests = got.lock().unwrap().clone();
    assert!(!requests.is_empty(), "the receiver got the spans before the process exited");
    let mut spans: Vec<Span> = Vec::new();
    for r in &requests {
        for rs in &r.resource_spans {
            let res = rs.resource.as_ref().unwrap();
            let service = res.attributes.iter().find(|a| a.key == "service.name").unwrap();
            assert_eq!(service.value.as_ref().unwrap().value, Some(Value::StringValue("roundtable-under-test".into())));
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let named = |prefix: &str| spans.iter().filter(|s| s.name.starts_with(prefix)).collect::<Vec<_>>();
    let sessions = named("session ");
    assert_eq!(sessions.len(), 1, "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let root = sessions[0];
    assert_eq!(root.name, format!("session {session}"));
    assert_eq!(attr_str(root, "gen_ai.conversation.id"), session);
    let turns = named("invoke_agent ");
    let chats = named("chat ");
    assert_eq!(turns.len(), 7, "six turns and the summary");
    assert_eq!(chats.len(), 7, "one model call per turn");
    for s in &spans {
        assert_eq!(s.trace_id, root.trace_id, "{} is in the session's trace", s.name);
    }
    for t in &turns {
        assert_eq!(t.parent_span_id, root.span_id, "{} is a child of the session", t.name);
        assert_eq!(attr_str(t, "gen_ai.operation.name"), "invoke_agent");
        assert_eq!(t.name, format!("invoke_agent {}", attr_str(t, "gen_ai.agent.name")));
        assert_eq!(attr_str(t, "gen_ai.conversation.id"), session);
    }
    let by_step: HashMap<&str, &Span> = turns.iter().map(|t| (attr_str(t, "roundtable.step"), *t)).collect();
    for c in &chats {
        let turn = turns.iter().find(|t| t.span_id == c.parent_span_id).expect("a chat span is inside a turn");
        assert_eq!(attr_str(c, "gen_ai.operation.name"), "chat");
        assert_eq!(attr_str(c, "gen_ai.request.model"), "scripted:designer");
        assert_eq!(c.name, "chat scripted:designer");
        assert_eq!(attr_str(c, "gen_ai.provider.name"), "scripted");
        assert_eq!(attr_str(c, "gen_ai.agent.name"), attr_str(turn, "gen_ai.agent.name"));
        assert!(attr_int(c, "gen_ai.usage.input_tokens") > 0);
        assert!(attr_int(c, "gen_ai.usage.output_tokens") > 0);
        assert!(attr_int(c, "roundtable.latency_ms") >= 0);
        assert_eq!(c.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32);
    }
    // Who answered whom, in the trace: backend's first turn links to frontend's.
    let t0 = by_step["turn/0"];
    let t1 = by_step["turn/1"];
    assert_eq!(attr_str(t0, "gen_ai.agent.name"), "frontend");
    assert_eq!(attr_str(t1, "gen_ai.agent.name"), "backend");
    assert!(t1.links.iter().any(|l| l.span_id == t0.span_id && l.trace_id == t0.trace_id), "turn/1 links to turn/0");
    assert!(t0.links.is_empty(), "the first turn answers no one");

    // The envelopes carry the context of the spans that produced them.
    let export = stdout(&run(&["export", &session], data.path()));
    let envs: Vec<serde_json::Value> = export.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (trace_id, span_id) = ids_of(envs[0]["trace"].as_str().expect("the task carries the session's context"));
    assert_eq!((trace_id.as_str(), span_id.as_str()), (hex(&root.trace_id).as_str(), hex(&root.span_id).as_str()));
    for env in envs.iter().filter(|e| e["kind"] == "message") {
        let step = env["step"].as_str().unwrap();
        let (_, span_id) = ids_of(env["trace"].as_str().unwrap());
        assert_eq!(span_id, hex(&by_step[step].span_id), "{step}");
        let chat = chats.iter().find(|c| c.parent_span_id == by_step[step].span_id).unwrap();
        assert_eq!(attr_int(chat, "gen_ai.usage.input_tokens"), env["usage"]["prompt_tokens"].as_i64().unwrap());
        assert_eq!(attr_int(chat, "gen_ai.usage.output_tokens"), env["usage"]["completion_tokens"].as_i64().unwrap());
    }
}

#[test]
fn an_unsupported_otlp_protocol_is_reported_and_export_stays_off() {
    let data = tempfile::tempdir().unwrap();
    // A collector that listens and is never answered: any connection the run makes stays
    // in its backlog, to be found after the process ended.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let o = bin()
        .args(["run", examples().join("api-design.toml").to_str().unwrap(), "--json", "--data-dir"])
        .arg(data.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported"), "{}", stderr(&o));
    collector.set_nonblocking(true).unwrap();
    match collector.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the run connected to the collector: {other:?}"),
    }
}

// ------------------------------------------------------------------------------------
// The web view's server and the metrics endpoints, over HTTP.

/// A GET over HTTP/1.0 (no chunking): status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// A server-sent events stream.
struct Sse(BufReader<TcpStream>);

impl Sse {
    fn open(addr: &str, path: &str, last_event_id: Option<u64>) -> Sse {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let last = last_event_id.map_or(String::new(), |n| format!("Last-Event-ID: {n}\r\n"));
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{last}\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l == "\r\n" || l == "\n" {
                break;
            }
        }
        Sse(r)
    }

    /// The next envelope event: (id, envelope JSON).
    fn next(&mut self) -> (u64, serde_json::Value) {
        let (mut id, mut data, mut event) = (None, String::new(), String::new());
        loop {
            let mut l = String::new();
            let n = self.0.read_line(&mut l).expect("an event within 20 s");
            assert!(n > 0, "the stream ended");
            let l = l.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if event == "envelope" {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                    return (id.unwrap(), v["env"].clone());
                }
                (id, data, event) = (None, String::new(), String::new());
            } else if let Some(v) = l.strip_prefix("id:") {
                id = Some(v.trim().parse().unwrap());
            } else if let Some(v) = l.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if let Some(v) = l.strip_prefix("event:") {
                event = v.trim().to_string();
            }
        }
    }
}

/// A child process killed when the test ends.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read lines from a child's stream until one contains `needle`; the URL in it.
fn url_from(lines: &mut dyn BufRead, needle: &str) -> String {
    let mut l = String::new();
    loop {
        l.clear();
        assert!(lines.read_line(&mut l).unwrap() > 0, "the process ended before printing {needle:?}");
        if l.contains(needle) {
            let start = l.find("http://").unwrap() + "http://".len();
            let rest = &l[start..];
            return rest[..rest.find('/').unwrap()].to_string();
        }
    }
}

/// The value of one series in a Prometheus exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An OpenAI-compatible endpoint: the first call fails with a 500 (so it is retried);
/// the others wait until the test opens the gate, then stream a recorded answer.
fn gated_openai() -> (Server, tokio::sync::watch::Sender<bool>, Arc<Mutex<u32>>) {
    let (gate, rx) = tokio::sync::watch::channel(false);
    let calls: Arc<Mutex<u32>> = Arc::default();
    let c = calls.clone();
    let answer =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_stream.sse"))
            .unwrap();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let (c, mut rx, answer) = (c.clone(), rx.clone(), answer.clone());
            async move {
                let n = {
                    let mut n = c.lock().unwrap();
                    *n += 1;
                    *n
                };
                if n == 1 {
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [("content-type", "application/json")],
                        "{\"error\":{\"message\":\"try again\"}}".to_string(),
                    );
                }
                let _ = rx.wait_for(|open| *open).await;
                (axum::http::StatusCode::OK, [("content-type", "text/event-stream")], answer)
            }
        }),
    );
    (serve(router), gate, calls)
}

#[test]
fn the_web_view_follows_a_session_run_by_another_process_and_both_serve_metrics() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();

    // The view starts before any session exists.
    let mut ui = bin()
        .args(["ui", "--addr", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--data-dir"])
        .arg(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ui_out = BufReader::new(ui.stdout.take().unwrap());
    let _ui = Running(ui);
    let view = url_from(&mut ui_out, "web view");
    let ui_metrics = url_from(&mut ui_out, "Prometheus metrics");
    assert!(view.starts_with("127.0.0.1:"), "loopback by default: {view}");
    let (status, body) = get(&view, "/api/sessions");
    assert_eq!((status, body.as_str()), (200, "[]"));
    let (status, page) = get(&view, "/");
    assert_eq!(status, 200);
    assert!(page.contains("/assets/app.js") && page.contains("Roundtable"));
    assert_eq!(get(&view, "/assets/app.js").0, 200);
    assert_eq!(get(&view, "/api/sessions/nope/events").0, 404);

    // A session against a live-model endpoint that holds its answers back.
    let (openai, gate, calls) = gated_openai();
    let team = d.join("live.toml");
    std::fs::write(
        &team,
        format!(
            "name = \"live\"\ntopic = \"Pick a name\"\n[models.g]\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\nbase_url = \"http://{}/v1\"\napi_key_env = \"RT_TEST_KEY\"\nmax_retries = 2\ntimeout_secs = 60\nprice = {{ prompt_per_mtok = 1.0, completion_per_mtok = 2.0 }}\n[[peers]]\nid = \"a\"\nmodel = \"g\"\n[[peers]]\nid = \"b\"\nmodel = \"g\"\n[protocol]\nkind = \"round_robin\"\nrounds = 1\n",
            openai.addr
        ),
    )
    .unwrap();
    let mut runner = bin()
        .args(["run", team.to_str().unwrap(), "--json", "--metrics", "127.0.0.1:0", "--data-dir"])
        .arg(d)
        .env("RT_TEST_KEY", "sk-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run_err = BufReader::new(runner.stderr.take().unwrap());
    let run_metrics = url_from(&mut run_err, "Prometheus metrics");

    // The view sees the new session (its task) while the peers wait for the model.
    let mut session = String::new();
    wait_until("the session in the list", || {
        let (_, body) = get(&view, "/api/sessions");
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        match list.as_array().unwrap().first() {
            Some(s) => {
                session = s["id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let mut live = Sse::open(&view, &format!("/api/sessions/{session}/events"), None);
    let (id, task) = live.next();
    assert_eq!((id, task["kind"].as_str()), (1, Some("task")));

    // The run's own endpoint counts the retry of the failed call while it waits.
    wait_until("the retry on the run's metrics", || {
        let (_, text) = get(&run_metrics, "/metrics");
        metric(&text, "roundtable_model_retries_total{peer=\"a\",error=\"provider error\"}") == Some(1.0)
    });
    let (_, text) = get(&run_metrics, "/metrics");
    assert_eq!(metric(&text, "roundtable_envelopes_total{team=\"live\",kind=\"task\"}"), Some(1.0));
    assert_eq!(metric(&text, "roundtable_sessions{team=\"live\",state=\"open\"}"), Some(1.0));
    assert!(text.contains("# TYPE roundtable_model_latency_seconds histogram"));
    wait_until("the retried call at the gate", || *calls.lock().unwrap() == 2);

    // Open the gate: the rest arrives live, across processes.
    gate.send_replace(true);
    let mut kinds = Vec::new();
    loop {
        let (id, env) = live.next();
        assert_eq!(id, kinds.len() as u64 + 2, "in order, none skipped");
        kinds.push(env["kind"].as_str().unwrap().to_string());
        if env["kind"] == "stop" {
            break;
        }
    }
    assert_eq!(kinds, ["message", "message", "stop"]);
    let mut out = String::new();
    runner.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(runner.wait().unwrap().success());
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();

    // Reconnecting with Last-Event-ID resumes right after it.
    let mut again = Sse::open(&view, &format!("/api/sessions/{session}/events"), Some(2));
    assert_eq!(again.next().0, 3);
    assert_eq!(again.next().0, 4);

    // The view's endpoint counts every session of the store, from the logs.
    let (status, text) = get(&ui_metrics, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "roundtable_messages_total{team=\"live\",peer=\"a\"}"), Some(1.0));
    assert_eq!(metric(&text, "roundtable_messages_total{team=\"live\",peer=\"b\"}"), Some(1.0));
    let series = |peer: &str, kind: &str| {
        format!(
            "roundtable_tokens_total{{team=\"live\",peer=\"{peer}\",model=\"gpt-4o-mini-2024-07-18\",type=\"{kind}\"}}"
        )
    };
    let input = metric(&text, &series("a", "input")).unwrap() + metric(&text, &series("b", "input")).unwrap();
    assert_eq!(input, summary["prompt_tokens"].as_f64().unwrap());
    let output = metric(&text, &series("a", "output")).unwrap() + metric(&text, &series("b", "output")).unwrap();
    assert_eq!(output, summary["completion_tokens"].as_f64().unwrap());
    assert_eq!(
        metric(
            &text,
            "roundtable_model_latency_seconds_count{team=\"live\",peer=\"a\",model=\"gpt-4o-mini-2024-07-18\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric(&text, "roundtable_cost_usd_total{team=\"live\",peer=\"a\",model=\"gpt-4o-mini-2024-07-18\"}").unwrap()
            > 0.0
    );
    assert_eq!(metric(&text, "roundtable_stops_total{team=\"live\",reason=\"completed\"}"), Some(1.0));
    assert_eq!(metric(&text, "roundtable_sessions{team=\"live\",state=\"stopped\"}"), Some(1.0));
    // Scraping again counts nothing twice.
    let (_, again) = get(&ui_metrics, "/metrics");
    assert_eq!(metric(&again, "roundtable_messages_total{team=\"live\",peer=\"a\"}"), Some(1.0));
}

#[test]
fn replay_exits_1_at_a_divergence_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let id = run_session(&examples().join("api-design.toml"), d);
    let o = run(&["export", &id], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let (body, seal) = roundtable_core::chain::split_seal(&text);
    let seal = seal.expect("a sealed export").1.to_owned();
    let mut lines: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The faithful recording replays with exit 0.
    let faithful = d.join("faithful.jsonl");
    std::fs::write(&faithful, lines.iter().map(|e| format!("{e}\n")).collect::<String>()).unwrap();
    let o = run(&["replay", faithful.to_str().unwrap()], d);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    // A stop whose reason the log does not support: the replay decides otherwise.
    let stop = lines.iter_mut().find(|e| e["kind"] == "stop").unwrap();
    stop["body"]["json"]["reason"] = serde_json::json!("completed: 99 rounds");
    // With its seal, the altered file is refused before anything is replayed.
    let sealed = d.join("altered-sealed.jsonl");
    std::fs::write(&sealed, lines.iter().map(|e| format!("{e}\n")).collect::<String>() + &seal + "\n").unwrap();
    let o = run(&["replay", sealed.to_str().unwrap()], d);
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("not the one sealed at its place"), "{}", stderr(&o));
    // Without it (as a forger would leave it), the replay finds the stop does not follow.
    let altered = d.join("altered.jsonl");
    std::fs::write(&altered, lines.iter().map(|e| format!("{e}\n")).collect::<String>()).unwrap();
    let o = run(&["replay", altered.to_str().unwrap()], d);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("DIVERGENCE") && stdout(&o).contains("99 rounds"), "{}", stdout(&o));
    let o = run(&["replay", altered.to_str().unwrap(), "--json"], d);
    assert_eq!(o.status.code(), Some(1));
    assert!(!json(&o)["divergence"].is_null(), "{}", stdout(&o));
}
