//! A person at the table, end to end: `roundtable join` driven through a
//! pseudo-terminal (util-linux `script` gives the child a real terminal) answering
//! turns and a vote, with bad answers refused and asked again; a second person refused
//! the same seat; joins that make no sense refused with exit 2; an empty seat skipped on
//! the record; replay of a session with a person's answers; a seat taken from another
//! process over NATS; and a person approving and denying a tool call from the seat.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roundtable_nats::testing::NatsServer;

/// How long a test waits for something that must happen before calling it a failure
/// (a guard against hanging, not a timing assertion).
const DEADLINE: Duration = Duration::from_secs(120);

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    c.env_remove("ROUNDTABLE_DIR").env_remove("ROUNDTABLE_NATS").env("NO_COLOR", "1");
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
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

/// A child process whose output is collected as it comes.
struct Driven {
    child: Child,
    input: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    /// How much of `out` earlier expectations consumed.
    seen: usize,
    what: String,
}

impl Driven {
    fn collect(mut child: Child, what: &str) -> Driven {
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let input = child.stdin.take();
        Driven { child, input, out, seen: 0, what: what.into() }
    }

    /// Wait until `needle` appears after what earlier expectations consumed; returns
    /// the text up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out[self.seen..].find(needle) {
                    let upto = self.seen + i + needle.len();
                    let text = out[self.seen..upto].to_string();
                    self.seen = upto;
                    return text;
                }
            }
            if start.elapsed() > DEADLINE || self.child.try_wait().unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(200));
                let out = self.out.lock().unwrap();
                panic!("{}: never printed {needle:?}; it printed:\n{}", self.what, &out[self.seen..]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, line: &str) {
        let input = self.input.as_mut().expect("stdin");
        input.write_all(line.as_bytes()).unwrap();
        input.write_all(b"\n").unwrap();
        input.flush().unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("{} did not end; it printed:\n{}", self.what, self.out.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn all(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `roundtable ARGS` on a pseudo-terminal: `script` runs it with a terminal of its own
/// and relays our pipe to it, as a person's keyboard would type.
fn on_terminal(args: &[&str], data: &Path) -> Driven {
    let script = ["/usr/bin/script", "/bin/script"].into_iter().find(|p| Path::new(p).exists()).unwrap_or_else(|| {
        panic!("`script` (util-linux) is needed to give `roundtable join` a pseudo-terminal: apt-get install bsdutils")
    });
    let mut line = vec![env!("CARGO_BIN_EXE_roundtable").to_string()];
    line.extend(args.iter().map(|a| a.to_string()));
    line.push("--data-dir".into());
    line.push(data.display().to_string());
    let quoted: Vec<String> = line.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let child = Command::new(script)
        .args(["-q", "-f", "-e", "-c", &quoted.join(" "), "/dev/null"])
        .env_remove("ROUNDTABLE_DIR")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script runs");
    Driven::collect(child, &format!("roundtable {}", args.join(" ")))
}

/// `roundtable run TEAM` in the background; returns it and the session id it names.
fn start_run(team: &Path, data: &Path, extra: &[&str]) -> (Driven, String) {
    let child = bin()
        .arg("run")
        .arg(team)
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Driven::collect(child, "roundtable run");
    let line = run.expect(" --as ");
    let session = line.rsplit("roundtable join ").next().unwrap().split_whitespace().next().unwrap().to_string();
    (run, session)
}

fn team_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_person_takes_a_seat_answers_turns_bad_answers_are_refused_and_replay_agrees() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&examples().join("human-review.toml"), d, &[]);

    let mut person = on_terminal(&["join", &session, "--as", "reviewer"], d);
    person.expect("You hold seat reviewer");
    person.expect("── Your duty: turn/1");
    person.expect("» your answer:");

    // While the seat is held, nobody else gets it.
    let o = bin().args(["join", &session, "--as", "reviewer", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("seat `reviewer` is taken"), "{}", stderr(&o));

    person.send("   ");
    person.expect("refused: an empty answer is not an answer");
    person.send(&"x".repeat(4_001));
    person.expect("refused: the answer is 4001 characters; at most 4000");
    person.send("/nonsense");
    person.expect("unknown command /nonsense; valid:");
    person.send("/to nobody hello");
    person.expect("refused: no peer \"nobody\"; the peers are author, reviewer, eng");
    person.send("/say");
    person.expect("refused: an empty answer is not an answer");
    // Interjections, at any time: to everyone, and to one peer.
    person.send("/say Before anything: what do refunds look like on annual plans?");
    person.send("/to eng Can the flag be flipped per plan type?");
    // Both are on the log (rendered back with their recipients), and the turn still waits.
    person.expect("reviewer → eng");
    person.send("Annual plans were never tested: ship to 10% first and watch proration errors.");
    // The engineer's rollout tool waits for the reviewer's approval.
    person.expect("eng asks you to approve a call of `schedule_rollout` (turn/2/call/0)");
    person.expect("percent: \"10\"");
    person.expect("» approve?");
    person.send("/approve 10% is what we agreed");
    person.expect("(approved)");
    person.expect("── Your duty: turn/4");
    person.expect("» your answer:");
    person.send("Fine by me if the dashboard is up before Monday.");
    person.expect("The session is over.");
    assert!(person.wait().success(), "{}", person.all());
    assert!(run.wait().success(), "{}", run.all());
    // The result of the call the person approved is shown to them (it is addressed to
    // the caller; the question and the transcript are not ordered, so it is looked
    // for in everything the seat printed).
    assert!(person.all().contains("rollout scheduled for Monday, percent of customers: 10"), "{}", person.all());

    let s = json(&bin().args(["log", &session, "--json", "--data-dir"]).arg(d).output().unwrap());
    assert!(s["stop_reason"].as_str().unwrap().starts_with("completed: 2 rounds"), "{s}");
    assert_eq!(s["per_peer"]["reviewer"]["messages"], 4, "two turns and two interjections: {s}");
    assert_eq!(s["per_peer"]["reviewer"]["messages_from_calls"], 2, "two of them answered duties: {s}");
    assert_eq!(s["per_peer"]["reviewer"]["completion_tokens"], 0, "a person's answer costs no tokens: {s}");

    let export = stdout(&bin().args(["export", &session, "--data-dir"]).arg(d).output().unwrap());
    let mine: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["from"] == "reviewer")
        .collect();
    let steps: Vec<&str> = mine.iter().map(|e| e["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        ["say/0", "say/1", "turn/1", "turn/2/approve/0/answer", "turn/4"],
        "two interjections, two turns and an approval: {mine:?}"
    );
    let kinds: Vec<&str> = mine.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["message", "message", "message", "approval", "message"]);
    assert_eq!(mine[3]["body"]["json"], serde_json::json!({"approve": true, "reason": "10% is what we agreed"}));
    assert_eq!(mine[0]["to"], serde_json::json!({"type": "all"}), "{}", mine[0]);
    assert_eq!(mine[1]["to"], serde_json::json!({"type": "peer", "id": "eng"}), "{}", mine[1]);
    assert!(mine[2]["body"]["text"].as_str().unwrap().starts_with("Annual plans were never tested"));

    let o = bin().args(["replay", &session, "--json", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
    let o = bin().args(["trace", &session, "--data-dir"]).arg(d).output().unwrap();
    assert!(stdout(&o).contains("reviewer"), "the person's envelopes are in the trace:\n{}", stdout(&o));

    // A finished session, an unknown seat, a model's seat: exit 2 and why.
    let join = |seat: &str| bin().args(["join", &session, "--as", seat, "--data-dir"]).arg(d).output().unwrap();
    let o = join("reviewer");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is finished"), "{}", stderr(&o));
    let o = join("nobody");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("has no peer \"nobody\"; its human seats are: reviewer"), "{}", stderr(&o));
    let o = join("author");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is a model peer"), "{}", stderr(&o));
    let o = bin().args(["join", "no-such-session", "--as", "reviewer", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_person_votes_through_a_form_and_a_vote_in_the_wrong_form_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let team = team_file(
        dir.path(),
        "vote.toml",
        r#"
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
"#,
    );
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&team, d, &[]);
    let mut person = on_terminal(&["join", &session, "--as", "p"], d);
    person.expect("── Your duty: r1/answer (round 1)");
    person.expect("» answer:");
    person.send("");
    person.expect("refused: answer cannot be empty");
    person.send("EU");
    person.expect("» confidence (a number from 0 to 1):");
    person.send("very");
    person.expect("refused: confidence must be a number from 0 to 1");
    person.send("1.5");
    person.expect("refused: confidence must be a number from 0 to 1");
    person.send("0.9");
    person.expect("» reason (may be empty):");
    person.send("the compliance work is done");
    person.expect("The session is over.");
    assert!(person.wait().success());
    assert!(run.wait().success(), "{}", run.all());
    let s = json(&bin().args(["log", &session, "--json", "--data-dir"]).arg(d).output().unwrap());
    assert_eq!(s["final_answer"], "EU", "the person's vote counted: {s}");
    let export = stdout(&bin().args(["export", &session, "--data-dir"]).arg(d).output().unwrap());
    let vote = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["from"] == "p")
        .expect("the person's answer is on the log");
    assert_eq!(vote["body"]["json"]["answer"], "EU");
    assert_eq!(vote["body"]["json"]["confidence"], 0.9);
    let o = bin().args(["replay", &session, "--json", "--data-dir"]).arg(d).output().unwrap();
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
}

#[test]
fn an_empty_seat_with_a_time_limit_is_skipped_and_the_run_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(examples().join("human-review.toml")).unwrap();
    assert!(src.contains("answer_within_secs = 120"));
    let team =
        team_file(dir.path(), "empty.toml", &src.replace("answer_within_secs = 120", "answer_within_secs = 0.3"));
    let data = tempfile::tempdir().unwrap();
    let o = bin().arg("run").arg(&team).arg("--json").arg("--data-dir").arg(data.path()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert!(s["stopped"].as_bool().unwrap(), "{s}");
    let session = s["session"].as_str().unwrap();
    let o = bin().args(["log", session, "--data-dir"]).arg(data.path()).output().unwrap();
    assert!(
        stdout(&o).contains("reviewer did not answer turn/1 within 0.3 s"),
        "the transcript says why the seat was skipped:\n{}",
        stdout(&o)
    );
    let o = bin().args(["replay", session, "--json", "--data-dir"]).arg(data.path()).output().unwrap();
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
}

#[test]
fn a_person_on_another_process_takes_a_seat_over_nats() {
    let server = NatsServer::start();
    let url = server.url();
    let run_data = tempfile::tempdir().unwrap();
    let person_data = tempfile::tempdir().unwrap();
    let (mut run, session) = start_run(&examples().join("human-review.toml"), run_data.path(), &["--nats", &url]);
    let mut person = on_terminal(&["join", &session, "--as", "reviewer", "--nats", &url], person_data.path());
    person.expect("── Your duty: turn/1");
    person.expect("» your answer:");
    let o = bin().args(["join", &session, "--as", "reviewer", "--nats", &url]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is taken"), "{}", stderr(&o));
    person.send("Ship to 10% first.");
    person.expect("eng asks you to approve a call of `schedule_rollout`");
    person.expect("» approve?");
    person.send("yes");
    person.expect("» reason (may be empty):");
    person.send("");
    person.expect("(approved)");
    person.expect("── Your duty: turn/4");
    person.expect("» your answer:");
    person.send("Agreed.");
    person.expect("The session is over.");
    assert!(person.wait().success(), "{}", person.all());
    assert!(run.wait().success(), "{}", run.all());
    let o = bin().args(["log", &session, "--json", "--nats", &url]).output().unwrap();
    let s = json(&o);
    assert_eq!(s["per_peer"]["reviewer"]["messages"], 2, "{s}");
    let o = bin().args(["export", &session, "--nats", &url]).output().unwrap();
    let approved = stdout(&o).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|e| {
        e["kind"] == "tool_result"
            && e["body"]["json"]["outcome"] == "ok"
            && e["body"]["json"]["tool"] == "schedule_rollout"
    });
    assert!(approved, "approved from another machine, the tool ran:\n{}", stdout(&o));
    assert!(!person_data.path().join("roundtable.db").exists(), "nothing written locally by the person");
}

/// The human-approver fixture, copied next to a fresh directory: its tool leaves
/// `rollout-10.scheduled` there when it runs.
fn seat_approval_team(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seat-approval.toml");
    team_file(dir, "seat-approval.toml", &std::fs::read_to_string(src).unwrap())
}

/// Every envelope of a session, from `export` (the last line is the seal).
fn exported(session: &str, data: &Path) -> Vec<serde_json::Value> {
    let o = bin().args(["export", session, "--data-dir"]).arg(data).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e.get("kind").is_some())
        .collect()
}

/// The person's seat shows who asks, which tool and the arguments, and asks approve or deny.
fn expect_the_request(person: &mut Driven) {
    person.expect("eng asks you to approve a call of `schedule_rollout` (turn/0/call/0)");
    // One line per argument (in key order).
    person.expect("note: \"billing page, behind the flag\"");
    person.expect("percent: \"10\"");
    person.expect("» approve? (yes or no; or /approve [REASON], /deny REASON):");
}

#[test]
fn a_person_approves_a_tool_call_from_join_and_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let team = seat_approval_team(dir.path());
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&team, d, &[]);
    let mut person = on_terminal(&["join", &session, "--as", "reviewer"], d);
    expect_the_request(&mut person);
    person.send("perhaps");
    person.expect("refused: approve: answer yes or no, not \"perhaps\"");
    person.expect("» approve?");
    person.send("yes");
    person.expect("» reason (may be empty):");
    person.send("10% is the plan we agreed on");
    person.expect("(approved)");
    // The tool ran; then the person's own turn.
    person.expect("── Your duty: turn/1");
    person.expect("» your answer:");
    person.send("Rollout is scheduled; watch proration errors on annual plans.");
    person.expect("The session is over.");
    assert!(person.wait().success(), "{}", person.all());
    assert!(run.wait().success(), "{}", run.all());

    assert!(dir.path().join("rollout-10.scheduled").exists(), "the approved command ran");
    let log = exported(&session, d);
    let answer = log
        .iter()
        .find(|e| e["kind"] == "approval" && e["step"] == "turn/0/approve/0/answer")
        .expect("the person's answer is on the log");
    assert_eq!(answer["from"], "reviewer", "{answer}");
    assert_eq!(answer["to"], serde_json::json!({"type": "peer", "id": "eng"}), "{answer}");
    assert_eq!(answer["body"]["json"]["approve"], true, "{answer}");
    assert_eq!(answer["body"]["json"]["reason"], "10% is the plan we agreed on", "{answer}");
    assert_eq!(answer["usage"]["model"], "human");
    assert_eq!(answer["usage"]["calls"], 0, "a person's answer is no model call: {answer}");
    let result = log.iter().find(|e| e["kind"] == "tool_result").expect("the call has a result");
    let r = &result["body"]["json"];
    assert_eq!((r["outcome"].as_str(), r["exit_status"].as_i64()), (Some("ok"), Some(0)), "{r}");
    // The approval came before the run.
    let at = |e: &serde_json::Value| log.iter().position(|x| x == e).unwrap();
    assert!(at(answer) < at(result));

    let s = json(&bin().args(["log", &session, "--json", "--data-dir"]).arg(d).output().unwrap());
    assert!(s["stop_reason"].as_str().unwrap().starts_with("completed: 1 round"), "{s}");
    assert_eq!(s["per_peer"]["reviewer"]["calls"], 0, "{s}");
    let o = bin().args(["trace", &session, "--data-dir"]).arg(d).output().unwrap();
    let trace = stdout(&o);
    assert!(
        trace.lines().any(|l| l.contains("reviewer → eng (approval)") && l.contains("10% is the plan we agreed on")),
        "the person's approval is in the trace:\n{trace}"
    );
    let o = bin().args(["replay", &session, "--json", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
}

#[test]
fn a_person_denies_a_tool_call_with_a_reason_and_an_empty_reason_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let team = seat_approval_team(dir.path());
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&team, d, &[]);
    let mut person = on_terminal(&["join", &session, "--as", "reviewer"], d);
    expect_the_request(&mut person);
    person.send("/deny");
    person.expect("refused: a denial needs a reason");
    person.send("no");
    person.expect("» reason (eng is told why; a denial needs one):");
    person.send("   ");
    person.expect("refused: a denial needs a reason");
    person.expect("» reason (eng is told why; a denial needs one):");
    person.send("Not before proration is tested on annual plans.");
    person.expect("(denied)");
    person.expect("── Your duty: turn/1");
    person.expect("» your answer:");
    person.send("/approve looks fine");
    person.expect("refused: no tool call waits for your approval now");
    person.send("Hold the rollout until annual plans are tested.");
    person.expect("The session is over.");
    assert!(person.wait().success(), "{}", person.all());
    assert!(run.wait().success(), "{}", run.all());

    assert!(!dir.path().join("rollout-10.scheduled").exists(), "a denied command never runs");
    let log = exported(&session, d);
    let answers: Vec<&serde_json::Value> =
        log.iter().filter(|e| e["kind"] == "approval" && e["from"] == "reviewer").collect();
    assert_eq!(answers.len(), 1, "one answer; the refused ones were never recorded: {answers:?}");
    assert_eq!(answers[0]["body"]["json"]["approve"], false);
    let result = log.iter().find(|e| e["kind"] == "tool_result").expect("the denial is the call's result");
    let r = &result["body"]["json"];
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["output"], "denied by reviewer: Not before proration is tested on annual plans.", "{r}");
    assert!(r.get("exit_status").is_none(), "the command never ran: {r}");
    // What eng's model is given as the tool's result, and it was called again after it.
    assert_eq!(result["body"]["text"], "[denied] denied by reviewer: Not before proration is tested on annual plans.");
    let after =
        log.iter().skip_while(|e| e["kind"] != "tool_result").find(|e| e["from"] == "eng" && e["step"] == "turn/0");
    let after = after.expect("eng's turn went on after the denial");
    assert!(after["body"]["text"].as_str().unwrap().starts_with("I asked for a 10% rollout"), "{after}");
    let o = bin().args(["replay", &session, "--json", "--data-dir"]).arg(d).output().unwrap();
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
}

/// One HTTP/1.1 request to the web view (headers chosen by the test); status and body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[test]
fn a_person_takes_a_seat_from_the_web_view_of_a_local_session_and_a_terminal_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&examples().join("human-review.toml"), d, &[]);
    let child = bin()
        .args(["ui", "--act", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ui = Driven::collect(child, "roundtable ui --act");
    let line = ui.expect("(sessions in");
    // The printed URL carries a generated token, even on loopback.
    let url = line.rsplit("http://").next().unwrap().split_whitespace().next().unwrap();
    let (addr, token) = url.split_once("/?token=").unwrap_or_else(|| panic!("no token in {line}"));
    assert!(token.len() >= 32, "{token}");
    let bearer = format!("Bearer {token}");
    let (status, _) = http(addr, "GET", "/api/sessions", &[], "");
    assert_eq!(status, 200, "reading stays open on loopback");
    let (status, _) = http(addr, "GET", "/api/act", &[], "");
    assert_eq!(status, 401, "acting is not");
    let (status, act) = http(addr, "GET", "/api/act", &[("Authorization", bearer.as_str())], "");
    assert_eq!(status, 200);
    let csrf = act["csrf"].as_str().unwrap().to_string();
    let w = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
        ("X-Roundtable-Csrf", csrf.as_str()),
    ];
    let take = serde_json::json!({ "session": session, "peer": "reviewer" }).to_string();
    let (status, _) = http(addr, "POST", "/api/seats", &w[1..], &take);
    assert_eq!(status, 401, "a write without the token");
    let (status, taken) = http(addr, "POST", "/api/seats", &w, &take);
    assert_eq!(status, 200, "{taken}");
    let seat = taken["seat"].as_str().unwrap().to_string();

    // The terminal is refused the seat the page holds.
    let o = bin().args(["join", &session, "--as", "reviewer", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("seat `reviewer` is taken"), "{}", stderr(&o));

    let asked = |step: &str| {
        let start = Instant::now();
        loop {
            let (status, v) =
                http(addr, "GET", &format!("/api/seats/{seat}"), &[("Authorization", bearer.as_str())], "");
            assert_eq!(status, 200, "{v}");
            if v["question"]["step"] == step {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "the page was never asked {step}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let answer = |step: &str, text: &str| {
        let body = serde_json::json!({ "step": step, "answer": text }).to_string();
        http(addr, "POST", &format!("/api/seats/{seat}/answer"), &w, &body)
    };
    asked("turn/1");
    let (status, v) = answer("turn/1", "");
    assert_eq!(status, 422, "{v}");
    assert_eq!(answer("turn/1", "Ship to 10% first; annual plans were never tested.").0, 200);
    // eng's rollout tool waits for the reviewer's approval: a denial with no reason is
    // refused, an approval is taken.
    let approval = "turn/2/approve/0/answer";
    asked(approval);
    let decide = |approve: bool, reason: &str| {
        let body = serde_json::json!({ "step": approval, "fields": { "approve": approve, "reason": reason } });
        http(addr, "POST", &format!("/api/seats/{seat}/answer"), &w, &body.to_string())
    };
    let (status, v) = decide(false, "");
    assert_eq!(status, 422, "a denial needs a reason: {v}");
    assert!(v.to_string().contains("a denial needs a reason"), "{v}");
    assert_eq!(decide(true, "10% is what we agreed").0, 200);
    asked("turn/4");
    assert_eq!(answer("turn/4", "Agreed.").0, 200);
    assert!(run.wait().success(), "{}", run.all());

    let s = json(&bin().args(["log", &session, "--json", "--data-dir"]).arg(d).output().unwrap());
    assert!(s["stop_reason"].as_str().unwrap().starts_with("completed: 2 rounds"), "{s}");
    assert_eq!(s["per_peer"]["reviewer"]["messages_from_calls"], 2, "the page's answers are the reviewer's: {s}");
    let o = bin().args(["replay", &session, "--json", "--data-dir"]).arg(d).output().unwrap();
    assert!(json(&o)["divergence"].is_null(), "{}", stdout(&o));
}

/// `roundtable ui --act` on `addr` over the sessions in `data`, with `extra` arguments;
/// returns it and the address it serves on.
fn start_ui(data: &Path, addr: &str, extra: &[&str]) -> (Driven, String) {
    let child = bin()
        .args(["ui", "--act", "--addr", addr])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ui = Driven::collect(child, "roundtable ui --act");
    let line = ui.expect("sessions in ").to_string();
    let bound = line.rsplit("http://").next().unwrap().split('/').next().unwrap().to_string();
    (ui, bound)
}

/// Regression (issue 14): what a page reloaded after the web view restarted could do
/// was untested. Seats end with the `ui` process, so the page's old seat is gone: it is
/// told that the server restarted (not that it left), and takes the seat again once the
/// dead holder's lease has lapsed; with `--token` the page's token still works. With a
/// generated token (new at every start) the page is told to open the new URL.
#[test]
fn a_page_reloaded_after_the_web_view_restarts_is_told_so_and_takes_its_seat_again() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let (mut run, session) = start_run(&examples().join("human-review.toml"), d, &[]);
    const TOKEN: &str = "kept-across-restarts-0123456789";
    let bearer = format!("Bearer {TOKEN}");
    let (mut ui, addr) = start_ui(d, "127.0.0.1:0", &["--token", TOKEN, "--seat-idle-secs", "600"]);
    let writes = |csrf: &str| -> Vec<(String, String)> {
        vec![
            ("Authorization".into(), bearer.clone()),
            ("Content-Type".into(), "application/json".into()),
            ("X-Roundtable-Csrf".into(), csrf.to_string()),
        ]
    };
    let post = |path: &str, csrf: &str, body: &str| {
        let h = writes(csrf);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        http(&addr, "POST", path, &h, body)
    };
    let csrf_now = || {
        let (status, act) = http(&addr, "GET", "/api/act", &[("Authorization", bearer.as_str())], "");
        assert_eq!(status, 200, "{act}");
        act["csrf"].as_str().unwrap().to_string()
    };
    let take = serde_json::json!({ "session": session, "peer": "reviewer" }).to_string();
    let asked = |seat: &str, step: &str| {
        let start = Instant::now();
        loop {
            let (status, v) =
                http(&addr, "GET", &format!("/api/seats/{seat}"), &[("Authorization", bearer.as_str())], "");
            assert_eq!(status, 200, "{v}");
            if v["question"]["step"] == step {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "the page was never asked {step}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let csrf = csrf_now();
    let (status, taken) = post("/api/seats", &csrf, &take);
    assert_eq!(status, 200, "{taken}");
    let old = taken["seat"].as_str().unwrap().to_string();
    asked(&old, "turn/1");

    // The web view dies (SIGKILL) and is started again on the same address and token.
    let _ = ui.child.kill();
    let _ = ui.child.wait();
    let (_ui, again) = start_ui(d, &addr, &["--token", TOKEN]);
    assert_eq!(again, addr);
    // The reloaded page polls its old seat: gone, and why.
    let (status, v) = http(&addr, "GET", &format!("/api/seats/{old}"), &[("Authorization", bearer.as_str())], "");
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("the web view was restarted since this page took the seat"), "{v}");
    // The same token acts; the seat is taken again once the dead holder's lease lapses
    // (refused as taken until then, saying it frees itself).
    let csrf = csrf_now();
    let start = Instant::now();
    let seat = loop {
        let (status, v) = post("/api/seats", &csrf, &take);
        if status == 200 {
            break v["seat"].as_str().unwrap().to_string();
        }
        assert_eq!(status, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("is taken"), "{v}");
        assert!(start.elapsed() < DEADLINE, "the seat was never free again: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    asked(&seat, "turn/1");
    let answer = |step: &str, text: &str| {
        let body = serde_json::json!({ "step": step, "answer": text }).to_string();
        post(&format!("/api/seats/{seat}/answer"), &csrf, &body).0
    };
    assert_eq!(answer("turn/1", "Back after a restart: ship to 10% first."), 200);
    let approval = "turn/2/approve/0/answer";
    asked(&seat, approval);
    let body = serde_json::json!({ "step": approval, "fields": { "approve": true, "reason": "10% as agreed" } });
    assert_eq!(post(&format!("/api/seats/{seat}/answer"), &csrf, &body.to_string()).0, 200);
    asked(&seat, "turn/4");
    assert_eq!(answer("turn/4", "Agreed."), 200);
    assert!(run.wait().success(), "{}", run.all());
    let s = json(&bin().args(["log", &session, "--json", "--data-dir"]).arg(d).output().unwrap());
    assert_eq!(s["per_peer"]["reviewer"]["messages_from_calls"], 2, "{s}");

    // Started without --token, the view makes a new one: the page's old one no longer
    // acts, and the refusal says which URL to open.
    drop(_ui);
    let (_ui, again) = start_ui(d, &addr, &[]);
    assert_eq!(again, addr);
    let (status, v) = http(&addr, "GET", "/api/act", &[("Authorization", bearer.as_str())], "");
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("open the URL `roundtable ui --act` printed"), "{v}");
}

#[test]
fn the_seat_idle_time_is_checked() {
    for (args, needle) in [
        (vec!["ui", "--act", "--seat-idle-secs", "2"], "2 is not in 5..=3600"),
        (vec!["ui", "--act", "--seat-idle-secs", "3601"], "3601 is not in 5..=3600"),
        (vec!["ui", "--seat-idle-secs", "60"], "--act"),
    ] {
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--seat-idle-secs"), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}
