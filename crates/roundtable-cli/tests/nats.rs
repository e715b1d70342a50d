//! The `roundtable` binary on NATS JetStream, with peers as separate OS processes: a
//! session run by peer processes agrees with one run in one process; peers killed with
//! SIGKILL are recorded absent and skipped, and their claimed tasks are done by others,
//! once; a restarted peer catches up from the log; a server restart costs nothing that
//! was acknowledged; garbage on the session's subjects is rejected on the record; and
//! credentials never show. Each test starts a nats-server of its own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roundtable_core::bus::Backend;
use roundtable_core::envelope::{Envelope, Kind, SessionId};
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// How long a test waits for something that must happen, before calling it a failure.
const DEADLINE: Duration = Duration::from_secs(90);

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    for var in ["ROUNDTABLE_DIR", "ROUNDTABLE_NATS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS"] {
        c.env_remove(var);
    }
    c.env("NO_COLOR", "1").env("RT_TEST_KEY", "k");
    c
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// Peer processes, killed (SIGKILL) if the test ends before they do. Their output goes
/// to files, so that a chatty process never blocks on a full pipe.
struct Peers {
    out: tempfile::TempDir,
    children: Vec<(String, Child, PathBuf)>,
}

impl Peers {
    fn new() -> Self {
        Peers { out: tempfile::tempdir().unwrap(), children: Vec::new() }
    }

    /// Start `roundtable peer TEAM --id ID --nats URL --session S --json`.
    fn start(&mut self, team: &Path, id: &str, url: &str, session: &str, data: &Path) {
        let base = self.out.path().join(format!("{id}-{}", self.children.len()));
        let file = |ext: &str| std::fs::File::create(base.with_extension(ext)).unwrap();
        let child = bin()
            .args(["peer", team.to_str().unwrap(), "--id", id, "--nats", url, "--session", session, "--json"])
            .arg("--data-dir")
            .arg(data)
            .stdout(file("out"))
            .stderr(file("err"))
            .spawn()
            .expect("the binary runs");
        self.children.push((id.to_owned(), child, base));
    }

    /// SIGKILL the running process of peer `id`.
    fn kill(&mut self, id: &str) {
        let i = self.children.iter().position(|(p, ..)| p == id).unwrap_or_else(|| panic!("no peer {id}"));
        let (_, mut child, _) = self.children.remove(i);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// Wait for every process to exit; their outputs, by peer.
    fn wait_all(&mut self) -> Vec<(String, Output)> {
        let start = Instant::now();
        let mut out = Vec::new();
        while let Some((id, mut child, base)) = self.children.pop() {
            let status = loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                if start.elapsed() > DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = std::fs::read_to_string(base.with_extension("err")).unwrap_or_default();
                    panic!("peer {id} did not finish within {DEADLINE:?}; stderr:\n{err}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let read = |ext: &str| std::fs::read(base.with_extension(ext)).unwrap_or_default();
            if let Some(keep) = std::env::var_os("RT_TEST_KEEP") {
                let _ = std::fs::write(Path::new(&keep).join(format!("{id}.err")), read("err"));
            }
            out.push((id, Output { status, stdout: read("out"), stderr: read("err") }));
        }
        out
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        // A test that failed while peers ran shows what each of them said.
        let failing = std::thread::panicking();
        for (id, c, base) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
            if failing {
                let err = std::fs::read_to_string(base.with_extension("err")).unwrap_or_default();
                eprintln!("--- peer {id} stderr ---\n{err}");
            }
        }
    }
}

/// Every envelope of a session, read from the server.
fn read_log(rt: &tokio::runtime::Runtime, url: &str, session: &str) -> Vec<Arc<Envelope>> {
    rt.block_on(async {
        let backend = NatsBackend::connect(url).await.expect("connect");
        match backend.logs().open(&SessionId::from(session), false).await {
            Ok(log) => log.read_all().await.expect("read").into_iter().map(|e| e.env).collect(),
            Err(_) => Vec::new(),
        }
    })
}

/// Poll the session's log until `cond` holds for it.
fn wait_for_log(
    rt: &tokio::runtime::Runtime,
    url: &str,
    session: &str,
    what: &str,
    cond: impl Fn(&[Arc<Envelope>]) -> bool,
) -> Vec<Arc<Envelope>> {
    let start = Instant::now();
    loop {
        let log = read_log(rt, url, session);
        if cond(&log) {
            return log;
        }
        assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}; the log: {:#?}", steps(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn steps(log: &[Arc<Envelope>]) -> Vec<String> {
    log.iter().map(|e| format!("{} {} {}", e.kind, e.from, e.step)).collect()
}

fn by(log: &[Arc<Envelope>], kind: Kind, from: &str) -> usize {
    log.iter().filter(|e| e.kind == kind && e.from.as_str() == from).count()
}

fn sse() -> ResponseTemplate {
    let body = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_stream.sse"))
        .expect("fixture");
    ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(body)
}

/// A model endpoint that answers every call after `delay`, so sessions last long enough
/// to be disturbed.
fn slow_model(rt: &tokio::runtime::Runtime, delay: Duration) -> MockServer {
    let server = rt.block_on(MockServer::start());
    rt.block_on(Mock::given(method("POST")).respond_with(sse().set_delay(delay)).mount(&server));
    server
}

/// A model endpoint that answers the first `passes` calls after `delay`, then holds every
/// later call until [`Gate::open`]: a session cannot end while the test is doing
/// something (restarting a peer) that must happen before its end, however slowly.
struct Gate {
    uri: String,
    open: tokio::sync::watch::Sender<bool>,
    _server: tokio::task::JoinHandle<()>,
}

impl Gate {
    fn start(rt: &tokio::runtime::Runtime, delay: Duration, passes: usize) -> Gate {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (open, opened) = tokio::sync::watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        let body =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_stream.sse"))
                .expect("fixture");
        let app = axum::Router::new().fallback(move || {
            let (calls, mut opened, body) = (calls.clone(), opened.clone(), body.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) >= passes {
                    let _ = opened.wait_for(|o| *o).await;
                }
                tokio::time::sleep(delay).await;
                ([("content-type", "text/event-stream")], body)
            }
        });
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let _server = rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Gate { uri, open, _server }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

const MODEL: &str = r#"
[models.g]
provider = "openai"
model = "gpt-4o-mini"
base_url = "{base}/v1"
api_key_env = "RT_TEST_KEY"
max_retries = 1
timeout_secs = 30
"#;

/// Quick absence detection, with room for a machine busy running many tests at once.
const PRESENCE: &str = "[presence]\nheartbeat_secs = 0.25\nabsent_after_secs = 3\n";

/// Three peers taking `rounds` turns each in a ring, on the slow model.
fn relay_team(dir: &Path, base: &str, rounds: u32) -> PathBuf {
    let peers: String = ["a", "b", "c"].iter().map(|p| format!("[[peers]]\nid = \"{p}\"\nmodel = \"g\"\n")).collect();
    let text = format!(
        "name = \"relay\"\ntopic = \"Pick a name\"\n{}{peers}[protocol]\nkind = \"round_robin\"\nrounds = {rounds}\n{PRESENCE}",
        MODEL.replace("{base}", base)
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn peer_processes_run_a_session_as_one_process_does_and_it_reads_back_from_nats() {
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let team = examples().join("product-debate.toml");
    let team = team.to_str().unwrap();

    // The reference: the whole team in one process, locally.
    let local = bin().args(["run", team, "--json", "--data-dir"]).arg(dir.path().join("local")).output().unwrap();
    assert!(local.status.success(), "{}", stderr(&local));
    let local = json(&local);

    // The same team as four processes, all started at once with one session id: each
    // may post the task; one does.
    let mut peers = Peers::new();
    for id in ["pm", "eng", "cfo", "facilitator"] {
        peers.start(Path::new(team), id, &url, "debate-1", &dir.path().join(id));
    }
    let outs = peers.wait_all();
    for (id, o) in &outs {
        assert!(o.status.success(), "peer {id}: {}", stderr(o));
        let s = json(o);
        for field in ["stop_reason", "final_answer", "messages", "calls", "rounds", "envelopes"] {
            assert_eq!(s[field], local[field], "peer {id} disagrees with the one-process run on {field}");
        }
    }
    let rt = rt();
    let log = read_log(&rt, &url, "debate-1");
    assert_eq!(log.iter().filter(|e| e.kind == Kind::Task).count(), 1, "one task: {:#?}", steps(&log));

    // sessions, log and export read it from the server.
    let o = bin().args(["sessions", "--json", "--nats", &url]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let list = json(&o);
    assert_eq!(list[0]["id"], "debate-1");
    assert_eq!(list[0]["team"], "product-debate");
    assert!(list[0]["stop"].as_str().unwrap().starts_with("completed"), "{list}");
    let o = bin().args(["log", "debate-1", "--nats", &url]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in ["pm → all", "facilitator → all", "Stopped: completed"] {
        assert!(stdout(&o).contains(needle), "transcript lacks {needle:?}:\n{}", stdout(&o));
    }
    let o = bin().args(["export", "debate-1", "--nats", &url]).output().unwrap();
    assert_eq!(stdout(&o).lines().count(), log.len() + 1, "every envelope, then the seal");
    let o = bin().args(["log", "no-such-session", "--nats", &url]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "an unknown session is bad input: {}", stderr(&o));
}

#[test]
fn run_on_nats_runs_the_whole_team_in_one_process() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let team = examples().join("api-design.toml");
    let o = bin()
        .args(["run", team.to_str().unwrap(), "--json", "--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert!(s["stopped"].as_bool().unwrap(), "{s}");
    assert!(!dir.path().join("roundtable.db").exists(), "nothing written locally");
    let log = read_log(&rt(), &server.url(), s["session"].as_str().unwrap());
    assert_eq!(log.len() as u64, s["envelopes"].as_u64().unwrap());
    let o = bin().args(["resume", s["session"].as_str().unwrap(), "--json", "--nats", &server.url()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["envelopes"], s["envelopes"], "resuming a closed session adds nothing");
}

#[test]
fn a_killed_peer_is_recorded_absent_its_turns_are_skipped_and_its_restart_catches_up() {
    let rt = rt();
    // Turns in a ring a, b, c over 5 rounds: 15 slots. b is killed after its first turn
    // (slot 1), and its slots come due while it is away (4, 7, …). Eight calls pass (b may
    // have one in flight when killed); the ninth waits until b is back, so the session
    // still has b's later slots whenever the restarted process gets going.
    let model = Gate::start(&rt, Duration::from_millis(300), 8);
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let team = relay_team(dir.path(), &model.uri, 5);
    // A held call must not time out while the test restarts b.
    std::fs::write(&team, std::fs::read_to_string(&team).unwrap().replace("timeout_secs = 30", "timeout_secs = 600"))
        .unwrap();
    let mut peers = Peers::new();
    for id in ["a", "b", "c"] {
        peers.start(&team, id, &url, "relay-1", &dir.path().join(id));
    }
    // Kill b (SIGKILL) once it has taken its first turn.
    wait_for_log(&rt, &url, "relay-1", "b's first turn", |log| by(log, Kind::Message, "b") >= 1);
    peers.kill("b");
    // The others notice, record it once, and skip b's turns.
    let log = wait_for_log(&rt, &url, "relay-1", "b recorded absent, then a turn past b's", |log| {
        let Some(absent) = log.iter().position(|e| e.kind == Kind::Absent) else { return false };
        log[absent..].iter().filter(|e| e.kind == Kind::Message).count() >= 2
    });
    let absent = log.iter().filter(|e| e.kind == Kind::Absent && e.body.json.as_ref().unwrap()["peer"] == "b");
    assert_eq!(absent.count(), 1, "one notice, whoever noticed first: {:#?}", steps(&log));
    let b_before = by(&log, Kind::Message, "b");

    // b comes back (a restart): it catches up from the log, says so, and takes its turns.
    peers.start(&team, "b", &url, "relay-1", &dir.path().join("b"));
    wait_for_log(&rt, &url, "relay-1", "b's join after its absence", |log| {
        let absent = log.iter().position(|e| e.kind == Kind::Absent).expect("recorded above");
        by(&log[absent..], Kind::Join, "b") >= 1
    });
    model.open();
    let outs = peers.wait_all();
    let log = read_log(&rt, &url, "relay-1");
    for (id, o) in &outs {
        assert!(o.status.success(), "peer {id}: {}", stderr(o));
        let s = json(o);
        assert_eq!(s["envelopes"].as_u64(), Some(log.len() as u64), "peer {id} saw the whole log");
        assert_eq!(s["stop_reason"], "completed: 5 rounds", "peer {id}: {s}");
    }
    let join = log.iter().position(|e| e.kind == Kind::Join && e.from.as_str() == "b").expect("b's join");
    assert!(log.iter().position(|e| e.kind == Kind::Absent).unwrap() < join);
    assert!(by(&log[join..], Kind::Message, "b") >= 1, "b took turns after its restart: {:#?}", steps(&log));
    let turns = by(&log, Kind::Message, "a") + by(&log, Kind::Message, "b") + by(&log, Kind::Message, "c");
    assert!(turns < 15, "b's turns while it was away were skipped: {:#?}", steps(&log));
    assert!(by(&log, Kind::Message, "b") > b_before);
    // Consistent: no turn was taken twice, whoever took it.
    let mut taken: Vec<&str> = log.iter().filter(|e| e.kind == Kind::Message).map(|e| &*e.step).collect();
    let n = taken.len();
    taken.sort_unstable();
    taken.dedup();
    assert_eq!(taken.len(), n, "a turn taken twice: {:#?}", steps(&log));
}

#[test]
fn the_server_restarts_mid_session_and_the_peers_carry_on_from_the_stream() {
    let rt = rt();
    let model = slow_model(&rt, Duration::from_millis(250));
    let mut server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let team = relay_team(dir.path(), &model.uri(), 4);
    let mut peers = Peers::new();
    for id in ["a", "b", "c"] {
        peers.start(&team, id, &url, "relay-2", &dir.path().join(id));
    }
    let before = wait_for_log(&rt, &url, "relay-2", "three turns", |log| {
        log.iter().filter(|e| e.kind == Kind::Message).count() >= 3
    });
    // Down for longer than the absence timeout (3 s): nobody may be called absent for a
    // silence the server caused.
    server.stop();
    std::thread::sleep(Duration::from_millis(4000));
    server.start_again();
    let outs = peers.wait_all();
    let log = read_log(&rt, &url, "relay-2");
    for (id, o) in &outs {
        assert!(o.status.success(), "peer {id}: {}", stderr(o));
        assert_eq!(json(o)["stop_reason"], "completed: 4 rounds");
    }
    // Nothing acknowledged before the stop is lost, and the session is whole.
    for (old, new) in before.iter().zip(&log) {
        assert_eq!(old.id, new.id);
    }
    let turns: Vec<&str> = log.iter().filter(|e| e.kind == Kind::Message).map(|e| &*e.step).collect();
    assert_eq!(turns, (0..12).map(|t| format!("turn/{t}")).collect::<Vec<_>>(), "{:#?}", steps(&log));
    assert_eq!(log.iter().filter(|e| e.kind == Kind::Absent).count(), 0, "{:#?}", steps(&log));
}

#[test]
fn a_killed_worker_s_claimed_task_is_done_by_another_exactly_once() {
    let rt = rt();
    let model = slow_model(&rt, Duration::from_millis(400));
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let tasks: String = (1..=8)
        .map(|i| {
            let deps = if i > 4 { format!("depends_on = [\"t{}\"]\n", i - 4) } else { String::new() };
            format!("[[protocol.tasks]]\nid = \"t{i}\"\ndescription = \"Check part {i}.\"\n{deps}")
        })
        .collect();
    let peers_toml: String =
        ["w1", "w2", "w3"].iter().map(|p| format!("[[peers]]\nid = \"{p}\"\nmodel = \"g\"\n")).collect();
    let team = dir.path().join("work.toml");
    std::fs::write(
        &team,
        format!(
            "name = \"checks\"\ntopic = \"Run the checks\"\n{}{peers_toml}[protocol]\nkind = \"work_queue\"\n{tasks}{PRESENCE}",
            MODEL.replace("{base}", &model.uri())
        ),
    )
    .unwrap();
    let mut peers = Peers::new();
    for id in ["w1", "w2", "w3"] {
        peers.start(&team, id, &url, "work-1", &dir.path().join(id));
    }
    // Kill w2 while it holds a task: claimed on the log, no result yet.
    let claimed = |log: &[Arc<Envelope>], who: &str| -> Option<String> {
        log.iter()
            .filter(|e| e.from.as_str() == who && e.body.json.as_ref().is_some_and(|j| j["op"] == "claim"))
            .map(|e| e.body.json.as_ref().unwrap()["task"].as_str().unwrap().to_owned())
            .find(|t| !log.iter().any(|e| *e.step == format!("work/{t}/result")))
    };
    let log = wait_for_log(&rt, &url, "work-1", "w2 holding a task", |log| claimed(log, "w2").is_some());
    peers.kill("w2");
    let held = claimed(&log, "w2").unwrap();
    let outs = peers.wait_all();
    for (id, o) in &outs {
        assert!(o.status.success(), "peer {id}: {}", stderr(o));
        assert_eq!(json(o)["stop_reason"], "all 8 tasks resolved: 8 done, 0 failed, 0 skipped");
    }
    let log = read_log(&rt, &url, "work-1");
    for t in 1..=8 {
        let results = log.iter().filter(|e| *e.step == format!("work/t{t}/result")).count();
        assert_eq!(results, 1, "task t{t} completed once: {:#?}", steps(&log));
    }
    let result = log.iter().find(|e| *e.step == format!("work/{held}/result")).unwrap();
    assert_ne!(result.from.as_str(), "w2", "the killed worker's task was done by another");
    assert!(log.iter().any(|e| e.kind == Kind::Absent && e.body.json.as_ref().unwrap()["peer"] == "w2"));
}

#[test]
fn garbage_on_the_session_subjects_is_rejected_on_the_record_and_the_session_goes_on() {
    let rt = rt();
    let model = slow_model(&rt, Duration::from_millis(200));
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "max_payload: 4194304\n").unwrap();
    let server = NatsServer::start_with(&["-c", conf.path().to_str().unwrap()]);
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let team = relay_team(dir.path(), &model.uri(), 2);
    let mut peers = Peers::new();
    for id in ["a", "b", "c"] {
        peers.start(&team, id, &url, "relay-3", &dir.path().join(id));
    }
    wait_for_log(&rt, &url, "relay-3", "a first turn", |log| log.iter().any(|e| e.kind == Kind::Message));
    let valid = read_log(&rt, &url, "relay-3")[1].to_json();
    rt.block_on(async {
        let nats = NatsBackend::connect(&url).await.unwrap();
        let subject = |s: &str| format!("rt.relay-3.log.{s}");
        let big = format!("{{\"v\":1,\"pad\":\"{}\"}}", "x".repeat(2 << 20));
        for (subject, payload) in [
            (subject("junk"), b"{not json".to_vec()),
            (subject("v9"), valid.replacen("\"v\":1", "\"v\":9", 1).into_bytes()),
            (subject("big"), big.into_bytes()),
            (subject("copy"), valid.clone().into_bytes()),
        ] {
            nats.jetstream().publish(subject, payload.into()).await.unwrap().await.unwrap();
        }
    });
    let outs = peers.wait_all();
    for (id, o) in &outs {
        assert!(o.status.success(), "peer {id}: {}", stderr(o));
        assert_eq!(json(o)["stop_reason"], "completed: 2 rounds");
    }
    let log = read_log(&rt, &url, "relay-3");
    let rejected: Vec<_> = log.iter().filter(|e| e.kind == Kind::Failure && e.from.as_str() == "nats").collect();
    assert_eq!(rejected.len(), 4, "{:#?}", steps(&log));
    let turns: Vec<&str> = log.iter().filter(|e| e.kind == Kind::Message).map(|e| &*e.step).collect();
    assert_eq!(turns, (0..6).map(|t| format!("turn/{t}")).collect::<Vec<_>>(), "the copy is not a turn");
    let o = bin().args(["log", "relay-3", "--nats", &url]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for reason in ["malformed envelope", "version 9", "over the", "not on its own subject"] {
        assert!(stdout(&o).contains(reason), "the transcript records {reason:?}:\n{}", stdout(&o));
    }
}

#[test]
fn credentials_reach_the_server_and_never_the_output() {
    let server = NatsServer::start_with(&["--user", "ops", "--pass", "s3cret-DO-NOT-LEAK"]);
    let port = server.port();
    let ok = bin()
        .args(["sessions", "--json", "--nats", &server.url(), "--nats-user", "ops"])
        .env("NATS_PASSWORD", "s3cret-DO-NOT-LEAK")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(json(&ok), serde_json::json!([]));
    for o in [
        bin()
            .args(["sessions", "--nats", &server.url(), "--nats-user", "ops"])
            .env("NATS_PASSWORD", "wrong-DO-NOT-LEAK")
            .output()
            .unwrap(),
        bin().args(["sessions", "--nats", &format!("nats://ops:wrong-DO-NOT-LEAK@127.0.0.1:{port}")]).output().unwrap(),
    ] {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("authorization"), "says why: {}", stderr(&o));
        assert!(!stderr(&o).contains("DO-NOT-LEAK") && !stdout(&o).contains("DO-NOT-LEAK"), "{}", stderr(&o));
    }
    let url_login = bin()
        .args(["sessions", "--nats", &format!("nats://ops:s3cret-DO-NOT-LEAK@127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(url_login.status.success(), "{}", stderr(&url_login));

    let token = NatsServer::start_with(&["--auth", "tok-DO-NOT-LEAK"]);
    let o = bin().args(["sessions", "--nats", &token.url()]).env("NATS_TOKEN", "tok-DO-NOT-LEAK").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bin().args(["sessions", "--nats", &token.url()]).env("NATS_TOKEN", "bad-DO-NOT-LEAK").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!stderr(&o).contains("DO-NOT-LEAK"), "{}", stderr(&o));
}

#[test]
fn peer_input_errors_exit_2_and_name_the_choices() {
    let team = examples().join("product-debate.toml");
    let team = team.to_str().unwrap();
    let o = bin().args(["peer", team, "--id", "pm"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--nats"), "{}", stderr(&o));
    let server = NatsServer::start();
    let o = bin().args(["peer", team, "--id", "nobody", "--nats", &server.url()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pm, eng, cfo, facilitator"), "{}", stderr(&o));
    let o = bin().args(["peer", team, "--id", "pm", "--nats", &server.url(), "--nats-cert", "/nonexistent"]).output();
    assert_eq!(o.unwrap().status.code(), Some(2), "a client certificate needs its key");
    let o = bin()
        .args(["peer", team, "--id", "pm", "--nats", &server.url(), "--nats-ca", "/nonexistent/ca.pem"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/ca.pem"), "{}", stderr(&o));
}

#[test]
fn a_peer_started_without_a_session_starts_one_and_says_how_to_join_it() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let team = examples().join("product-debate.toml");
    let team = team.to_str().unwrap();
    let mut first = bin()
        .args(["peer", team, "--id", "pm", "--nats", &server.url(), "--json", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The session id is on the first line of stderr's hint.
    let mut err = first.stderr.take().unwrap();
    let mut text = String::new();
    let start = Instant::now();
    let session = loop {
        let mut buf = [0u8; 256];
        let n = err.read(&mut buf).unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        // The announcement, then the complete hint line that names the session.
        let lines: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
        if let Some(line) = lines.iter().find(|l| l.starts_with("Started session "))
            && lines.iter().any(|l| l.contains("--session "))
        {
            let id = line.trim_start_matches("Started session ").split_whitespace().next().unwrap_or_default();
            break id.trim_end_matches('.').to_owned();
        }
        assert!(n > 0 && start.elapsed() < DEADLINE, "no session announced: {text}");
    };
    assert!(text.contains(&format!("--session {session}")), "{text}");
    let mut peers = Peers::new();
    for id in ["eng", "cfo", "facilitator"] {
        peers.start(Path::new(team), id, &server.url(), &session, &dir.path().join(id));
    }
    for (id, o) in peers.wait_all() {
        assert!(o.status.success(), "peer {id}: {}", stderr(&o));
    }
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(json(&o)["stop_reason"].as_str().unwrap().starts_with("completed"));
}

/// Make a CA, a server certificate for 127.0.0.1 and a client certificate with openssl.
fn certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl makes the test certificates: install it with `apt-get install openssl`");
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=rt-test-ca"],
        ]
        .concat(),
    );
    for (name, cn, ext) in
        [("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1"), ("client", "rt-peer", "extendedKeyUsage=clientAuth")]
    {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}"), "-addext", ext]]
                .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-copy_extensions",
            "copy",
        ]);
    }
}

#[test]
fn tls_with_a_private_ca_and_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let file = |f: &str| certs.path().join(f).to_str().unwrap().to_owned();
    let server = NatsServer::start_with(&[
        "--tlsverify",
        "--tlscert",
        &file("server.pem"),
        "--tlskey",
        &file("server.key"),
        "--tlscacert",
        &file("ca.pem"),
    ]);
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mutual = ["--nats-ca", &file("ca.pem"), "--nats-cert", &file("client.pem"), "--nats-key", &file("client.key")];
    let o = bin().args(["sessions", "--json", "--nats", &url]).args(mutual).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o), serde_json::json!([]));
    // Without the client certificate, or without the CA that signed the server's, no.
    let o = bin().args(["sessions", "--nats", &url, "--nats-ca", &file("ca.pem")]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = bin().args(["sessions", "--nats", &url]).args(&mutual[2..]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn a_peer_that_starts_late_catches_up_from_the_log_and_the_outcome_is_the_same() {
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let team = examples().join("product-debate.toml");
    let local =
        bin().args(["run", team.to_str().unwrap(), "--json", "--data-dir"]).arg(dir.path().join("local")).output();
    let local = json(&local.unwrap());
    let rt = rt();
    let mut peers = Peers::new();
    for id in ["pm", "cfo", "facilitator"] {
        peers.start(&team, id, &url, "late-1", &dir.path().join(id));
    }
    // The engineer speaks second: the session waits at its turn until it starts.
    wait_for_log(&rt, &url, "late-1", "the first turn", |log| by(log, Kind::Message, "pm") >= 1);
    peers.start(&team, "eng", &url, "late-1", &dir.path().join("eng"));
    for (id, o) in peers.wait_all() {
        assert!(o.status.success(), "peer {id}: {}", stderr(&o));
        let s = json(&o);
        for field in ["stop_reason", "final_answer", "messages", "envelopes"] {
            assert_eq!(s[field], local[field], "peer {id} disagrees with the one-process run on {field}");
        }
    }
    let log = read_log(&rt, &url, "late-1");
    assert!(log.iter().all(|e| e.kind != Kind::Absent), "started within the absence timeout: {:#?}", steps(&log));
}

#[test]
fn protocols_with_shared_state_run_with_one_process_per_peer() {
    // The blackboard (compare-and-set across processes), commit-reveal voting (each
    // process seals with its own secret), the work queue and contract-net.
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let teams: [(&str, &[&str]); 4] = [
        ("blackboard.toml", &["planner", "writer", "reviewer", "editor"]),
        ("jury.toml", &["juror-1", "juror-2", "juror-3", "juror-4", "juror-5"]),
        ("work-queue.toml", &["w1", "w2", "w3"]),
        ("contract-net.toml", &["ana", "bo", "cy"]),
    ];
    for (file, ids) in teams {
        let team = examples().join(file);
        let local =
            bin().args(["run", team.to_str().unwrap(), "--json", "--data-dir"]).arg(dir.path().join(file)).output();
        let local = json(&local.unwrap());
        let mut peers = Peers::new();
        for id in ids {
            peers.start(&team, id, &server.url(), file.trim_end_matches(".toml"), &dir.path().join(id));
        }
        let outs = peers.wait_all();
        let (reasons, answers): (Vec<String>, Vec<String>) = outs
            .iter()
            .map(|(id, o)| {
                assert!(o.status.success(), "{file}, peer {id}: {}", stderr(o));
                let s = json(o);
                let answer = s["final_answer"].as_str().unwrap_or_else(|| panic!("{file}, {id}: no answer: {s}"));
                (s["stop_reason"].as_str().unwrap().to_owned(), answer.to_owned())
            })
            .unzip();
        assert!(reasons.iter().all(|r| *r == reasons[0]), "{file}: the peers agree: {reasons:?}");
        assert!(answers.iter().all(|a| *a == answers[0]), "{file}: the peers agree on the answer: {answers:?}");
        let kind = |r: &str| r.split(':').next().unwrap_or_default().to_owned();
        assert_eq!(kind(&reasons[0]), kind(local["stop_reason"].as_str().unwrap()), "{file}: as in one process");
        // Scripted replies make the decision the same however the work was spread.
        assert_eq!(Some(answers[0].as_str()), local["final_answer"].as_str(), "{file}: the answer of one process");
        assert!(!reasons[0].starts_with("failures") && !reasons[0].starts_with("absent"), "{file}: {}", reasons[0]);
    }
}

#[test]
fn an_nkey_seed_file_logs_in_and_a_wrong_one_is_refused_at_once() {
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n", user.public_key())).unwrap();
    let server = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let o = bin().args(["sessions", "--json", "--nats", &server.url(), "--nats-nkey", seed.to_str().unwrap()]).output();
    let o = o.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let other = dir.path().join("other.nk");
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    std::fs::write(&other, &stranger).unwrap();
    let o = bin().args(["sessions", "--nats", &server.url(), "--nats-nkey", other.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("authorization"), "{}", stderr(&o));
    // At once: the server was asked once, not again and again until a deadline.
    let log = server.log();
    assert_eq!(log.matches("authentication error").count(), 1, "{log}");
    assert!(!stderr(&o).contains(&stranger), "the seed is never printed");
}
