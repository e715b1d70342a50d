//! `roundtable worktest`, the distributed-testing example, at a size for the test suite:
//! worker processes on one shared queue with no coordinator, one of them SIGKILLed
//! mid-test, and nothing lost or done twice.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use roundtable_nats::testing::NatsServer;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    for var in ["ROUNDTABLE_DIR", "ROUNDTABLE_NATS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS"] {
        c.env_remove(var);
    }
    c
}

fn report(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn check_whole(r: &serde_json::Value, tests: u64) {
    assert_eq!(r["lost"], 0, "no test lost: {r:#}");
    assert_eq!(r["completed_twice"], 0, "no test completed twice: {r:#}");
    let resolved = ["passed", "failed", "skipped"].iter().map(|k| r[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(resolved, tests, "{r:#}");
}

#[test]
fn workers_killed_mid_test_lose_nothing_and_repeat_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "worktest",
        "--tests",
        "200",
        "--workers",
        "4",
        "--duration-ms",
        "20",
        "--fail-rate",
        "0.05",
        "--dep-rate",
        "0.3",
        "--lease-ms",
        "1500",
        "--absent-after-ms",
        "1000",
        "--json",
    ];
    // One worker killed and not restarted, then one killed and restarted.
    for (extra, restarted) in [(vec!["--kill", "1"], 0), (vec!["--kill", "1", "--restart-after-ms", "300"], 1)] {
        let o = bin()
            .args(args)
            .args(&extra)
            .args(["--nats", &server.url(), "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("the binary runs");
        assert!(
            o.status.success(),
            "exit {:?}: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let r = report(&o);
        check_whole(&r, 200);
        assert_eq!((r["killed"].as_u64(), r["restarted"].as_u64()), (Some(1), Some(restarted)), "{r:#}");
        assert!(r["failed"].as_u64().unwrap() > 0, "some tests fail at a 5% rate: {r:#}");
    }
}

#[test]
fn workers_started_elsewhere_join_a_run_by_its_session() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let run = bin()
        .args(["worktest", "--tests", "60", "--workers", "3", "--spawn", "2", "--duration-ms", "10"])
        .args(["--session", "ci-1", "--json", "--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // The third worker, as it would be started on another machine.
    let mut other = bin()
        .args(["worktest", "--worker", "w02", "--session", "ci-1", "--nats", &server.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let o = run.wait_with_output().expect("output");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_whole(&report(&o), 60);
    let start = Instant::now();
    while other.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "the third worker did not stop with the run");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(other.wait().unwrap().success());
}

#[test]
fn without_a_server_the_example_says_how_to_get_one() {
    let o = bin()
        .args(["worktest", "--tests", "1"])
        .env("ROUNDTABLE_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("apt-get install nats-server") && err.contains("--nats"), "{err}");
    let o = bin().args(["worktest", "--fail-rate", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

// ---- Suites of real commands ----

/// The session's envelopes, read back from the server (`roundtable export`).
fn export(server: &NatsServer, session: &str) -> Vec<serde_json::Value> {
    let o = bin().args(["export", session, "--nats", &server.url()]).output().expect("the binary runs");
    assert!(o.status.success(), "export: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v.get("env").cloned().unwrap_or(v)
        })
        .collect()
}

fn op<'a>(e: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let json = &e["body"]["json"];
    (json["op"] == name).then_some(json)
}

/// What the log says of each test: its results and its claimers (in log order).
struct LogCount {
    results: std::collections::HashMap<String, Vec<serde_json::Value>>,
    claims: std::collections::HashMap<String, Vec<String>>,
    absent: std::collections::HashSet<String>,
    /// (test, worker) the coordinator took back.
    reassigned: Vec<(String, String)>,
}

fn count(log: &[serde_json::Value]) -> LogCount {
    let mut c = LogCount {
        results: Default::default(),
        claims: Default::default(),
        absent: Default::default(),
        reassigned: Vec::new(),
    };
    for e in log {
        if let Some(j) = op(e, "result") {
            let mut j = j.clone();
            if j.get("worker").is_none() {
                j["worker"] = e["from"].clone();
            }
            c.results.entry(j["task"].as_str().unwrap().to_owned()).or_default().push(j);
        }
        if let Some(j) = op(e, "reassign") {
            c.reassigned.push((j["task"].as_str().unwrap().to_owned(), j["worker"].as_str().unwrap().to_owned()));
        }
        if let Some(j) = op(e, "claim") {
            let who = j["worker"].as_str().or(e["from"].as_str()).unwrap().to_owned();
            c.claims.entry(j["task"].as_str().unwrap().to_owned()).or_default().push(who);
        }
        if e["kind"] == "absent" {
            c.absent.insert(e["body"]["json"]["peer"].as_str().unwrap().to_owned());
        }
    }
    c
}

/// Every test of `ids` has exactly one result on the log.
fn none_lost_none_twice(c: &LogCount, ids: &[String]) {
    for id in ids {
        let n = c.results.get(id).map_or(0, Vec::len);
        assert_eq!(n, 1, "test {id} has {n} results on the log");
    }
}

fn line(id: &str, cmd: &[&str], area: &str, extra: &str) -> String {
    format!("{{\"id\":{id:?},\"cmd\":{},\"area\":{area:?}{extra}}}\n", serde_json::to_string(cmd).unwrap())
}

#[test]
fn a_suite_of_real_commands_reports_hangs_floods_and_missing_programs() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut suite = String::new();
    suite += &line("fails", &["sh", "-c", "echo boom; exit 3"], "b", "");
    suite += &line("hangs", &["sleep", "30"], "c", ",\"timeout_secs\":1");
    suite += &line("floods", &["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo END"], "c", "");
    suite += &line("missing", &["/nonexistent/no-such-program"], "c", "");
    suite += &line("after_fail", &["true"], "d", ",\"depends_on\":[\"fails\"]");
    for k in 0..8 {
        suite += &line(&format!("ok{k}"), &["sh", "-c", "echo fine"], "a", "");
    }
    let path = dir.path().join("suite.jsonl");
    std::fs::write(&path, &suite).unwrap();
    let ids: Vec<String> = suite
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    for mode in ["peers", "coordinator"] {
        let session = format!("real-{mode}");
        let mut cmd = bin();
        cmd.args(["worktest", "--suite"]).arg(&path).args(["--workers", "3", "--session", &session, "--json"]);
        if mode == "coordinator" {
            cmd.arg("--coordinator");
        }
        let o = cmd.args(["--nats", &server.url(), "--data-dir"]).arg(dir.path()).output().unwrap();
        assert!(o.status.success(), "{mode}: exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
        let r = report(&o);
        assert_eq!(r["mode"], mode);
        check_whole(&r, ids.len() as u64);
        let c = count(&export(&server, &session));
        none_lost_none_twice(&c, &ids);
        let res = |id: &str| c.results[id][0].clone();
        assert_eq!((res("fails")["outcome"].as_str(), res("fails")["status"].as_str()), (Some("fail"), Some("failed")));
        assert!(res("fails")["output"].as_str().unwrap().contains("boom"), "{mode}: {}", res("fails"));
        assert_eq!(res("hangs")["status"], "timed_out", "{mode}: {}", res("hangs"));
        assert!(res("hangs")["duration_ms"].as_u64().unwrap() < 20_000, "killed at its timeout, not after 30 s");
        let flood = res("floods");
        let out = flood["output"].as_str().unwrap();
        assert!(out.len() < 20_000, "{mode}: the log keeps a capped output, not {} bytes", out.len());
        assert!(out.contains("bytes of output cut"), "{mode}: a marker says output was cut");
        assert_eq!(res("missing")["status"], "error", "{mode}: {}", res("missing"));
        assert!(res("missing")["output"].as_str().unwrap().contains("no-such-program"), "{mode}");
        assert_eq!(res("after_fail")["outcome"], "skip", "{mode}");
        assert_eq!(res("ok3")["outcome"], "pass", "{mode}");
        assert_eq!((r["timed_out"].as_u64(), r["errors"].as_u64()), (Some(1), Some(1)), "{r:#}");
    }
}

#[test]
fn bad_suite_files_exit_2_naming_the_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"id\":\"a\",\"cmd\":[\"true\"]}\n{\"id\":\"a\",\"cmd\":[\"true\"]}\n", ":2: key `id`", "duplicate"),
        (
            "{\"id\":\"a\",\"cmd\":[\"true\"],\"depends_on\":[\"b\"]}\n{\"id\":\"b\",\"cmd\":[\"true\"],\"depends_on\":[\"a\"]}\n",
            ":1: key `depends_on`",
            "cycle",
        ),
        ("{\"id\":\"a\",\"cmd\":[\"true\"],\"depends_on\":[\"nope\"]}\n", ":1: key `depends_on`", "unknown id"),
        ("{\"id\":\"a\",\"cmd\":[\"true\"]}\nnot json\n", ":2:", "not a JSON"),
        ("{\"id\":\"a\",\"cmd\":[\"true\"]}\n{\"id\":\"b\"}\n", ":2: key `cmd`", "missing"),
    ];
    for (k, (text, place, what)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{k}.jsonl"));
        std::fs::write(&path, text).unwrap();
        // Checked before any server is looked for or started.
        let o = bin()
            .args(["worktest", "--suite"])
            .arg(&path)
            .env("ROUNDTABLE_NATS_SERVER", "/nonexistent/nats-server")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&o.stderr);
        let expected = format!("bad{k}.jsonl{place}");
        assert!(err.contains(&expected) && err.contains(what), "{expected} / {what}: {err}");
    }
}

#[test]
fn a_worker_runs_only_its_own_copy_of_the_suite() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let suite = line("one", &["true"], "", "") + &line("two", &["true"], "", "");
    let (path, copy, other) =
        (dir.path().join("suite.jsonl"), dir.path().join("copy.jsonl"), dir.path().join("other.jsonl"));
    std::fs::write(&path, &suite).unwrap();
    std::fs::write(&copy, &suite).unwrap();
    // The same ids, other commands.
    std::fs::write(&other, line("one", &["rm", "-rf", "/tmp/x"], "", "") + &line("two", &["true"], "", "")).unwrap();
    let run = bin()
        .args(["worktest", "--suite"])
        .arg(&path)
        .args(["--workers", "1", "--spawn", "0", "--session", "own-copy", "--json", "--nats", &server.url()])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let worker = |file: Option<&std::path::Path>| {
        let mut c = bin();
        c.args(["worktest", "--worker", "w00", "--session", "own-copy", "--nats", &server.url()]);
        if let Some(f) = file {
            c.arg("--suite").arg(f);
        }
        c.output().unwrap()
    };
    let o = worker(Some(&other));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("digest") && err.contains("refusing"), "{err}");
    let o = worker(None);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--suite"), "{}", String::from_utf8_lossy(&o.stderr));
    // A copy with the same bytes runs the suite.
    let o = worker(Some(&copy));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_whole(&report(&o), 2);
}

#[test]
fn workers_killed_while_running_commands_leave_nothing_lost_or_twice_on_the_log() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut suite = String::new();
    for k in 0..24 {
        let extra = if k % 5 == 4 { format!(",\"depends_on\":[\"s{}\"]", k - 1) } else { String::new() };
        suite += &line(&format!("s{k}"), &["sleep", "0.4"], "a", &extra);
    }
    let path = dir.path().join("suite.jsonl");
    std::fs::write(&path, &suite).unwrap();
    let ids: Vec<String> = (0..24).map(|k| format!("s{k}")).collect();
    for mode in ["peers", "coordinator"] {
        let session = format!("kill-{mode}");
        let mut cmd = bin();
        cmd.args(["worktest", "--suite"]).arg(&path);
        cmd.args(["--workers", "4", "--kill", "2", "--lease-ms", "1500", "--absent-after-ms", "1000"]);
        cmd.args(["--session", &session, "--json", "--nats", &server.url(), "--data-dir"]).arg(dir.path());
        if mode == "coordinator" {
            cmd.arg("--coordinator");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{mode}: exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
        assert_eq!(report(&o)["killed"], 2);
        // From the log, not the report: one result each, and some test claimed by a
        // worker that never reported it (it was killed holding it) was finished by
        // another.
        let c = count(&export(&server, &session));
        none_lost_none_twice(&c, &ids);
        let reporter = |id: &str| c.results[id][0]["worker"].as_str().unwrap().to_owned();
        let taken_over: Vec<&String> = ids
            .iter()
            .filter(|id| match mode {
                // Claimed by a worker recorded absent, reported by another.
                "peers" => c.claims[*id].iter().any(|w| c.absent.contains(w) && *w != reporter(id)),
                // Taken back from a silent worker, reported by another.
                _ => c.reassigned.iter().any(|(t, w)| t == *id && *w != reporter(id)),
            })
            .collect();
        assert!(!taken_over.is_empty(), "{mode}: a killed worker held a test that another finished");
    }
}

#[test]
fn a_failure_moves_the_tests_of_its_area_up_the_queue() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // One worker, so the order is the queue's: the failure first, fillers, then the
    // tests of the failure's area at the very end of the file.
    let mut suite = line("f", &["false"], "x", "");
    for k in 0..6 {
        suite += &line(&format!("filler{k}"), &["true"], "y", "");
    }
    for k in 0..3 {
        suite += &line(&format!("x{k}"), &["true"], "x", "");
    }
    let path = dir.path().join("suite.jsonl");
    std::fs::write(&path, &suite).unwrap();
    for mode in ["peers", "coordinator"] {
        let session = format!("prio-{mode}");
        let mut cmd = bin();
        cmd.args(["worktest", "--suite"]).arg(&path).args(["--workers", "1", "--session", &session, "--json"]);
        if mode == "coordinator" {
            cmd.arg("--coordinator");
        }
        let o = cmd.args(["--nats", &server.url(), "--data-dir"]).arg(dir.path()).output().unwrap();
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        let log = export(&server, &session);
        let order: Vec<String> =
            log.iter().filter_map(|e| op(e, "result")).map(|j| j["task"].as_str().unwrap().to_owned()).collect();
        assert_eq!(order.len(), 10, "{mode}: {order:?}");
        assert_eq!(order[0], "f");
        let mut moved = order[1..4].to_vec();
        moved.sort();
        assert_eq!(moved, ["x0", "x1", "x2"], "{mode}: the area's tests ran right after the failure: {order:?}");
        let p = log.iter().find_map(|e| op(e, "prioritize")).expect("the prioritization is on the log");
        assert_eq!(p["failed"], "f");
        assert_eq!(report(&o)["prioritize_envelopes"], 1);
    }
}

#[test]
fn the_holder_of_a_likely_affected_test_is_told_and_only_one_copy_runs() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // One worker takes the slow test; the other takes the failing one of the same area
    // while the slow one runs.
    let suite = line("slow", &["sleep", "6"], "x", "") + &line("f", &["false"], "x", "");
    let path = dir.path().join("suite.jsonl");
    std::fs::write(&path, &suite).unwrap();
    let o = bin()
        .args(["worktest", "--suite"])
        .arg(&path)
        .args(["--workers", "2", "--session", "notice", "--json", "--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = export(&server, "notice");
    let c = count(&log);
    none_lost_none_twice(&c, &["slow".to_owned(), "f".to_owned()]);
    let holder = c.claims["slow"][0].clone();
    let notice = log.iter().find(|e| op(e, "affected").is_some()).expect("a notice of the likely affected test");
    assert_eq!(notice["to"]["id"], holder.as_str(), "the notice goes to the holder directly: {notice:#}");
    assert_eq!(notice["body"]["json"]["test"], "slow");
    // The priority copy of the slow test went to a worker, who gave way to the holder.
    let yielded = log.iter().filter_map(|e| op(e, "yield")).any(|j| j["task"] == "slow");
    assert!(yielded, "the priority copy was claimed and yielded");
    assert_eq!(c.results["slow"][0]["queue"], "main");
}

#[test]
fn synthetic_durations_spread_and_the_coordinator_baseline_survives_killed_workers() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["worktest", "--tests", "150", "--workers", "4", "--duration-ms", "20", "--spread", "0.8"])
        .args(["--coordinator", "--kill", "1", "--lease-ms", "1500", "--session", "coord-kill", "--json"])
        .args(["--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = report(&o);
    check_whole(&r, 150);
    assert_eq!((r["mode"].as_str(), r["killed"].as_u64()), (Some("coordinator"), Some(1)), "{r:#}");
    assert!(r["redeliveries"].as_u64().unwrap() >= 1, "the killed worker's test was reassigned: {r:#}");
    let log = export(&server, "coord-kill");
    let durations: std::collections::HashSet<u64> =
        log.iter().filter_map(|e| op(e, "result")).filter_map(|j| j["duration_ms"].as_u64()).collect();
    assert!(durations.len() > 20, "durations drawn from a distribution, not one constant: {durations:?}");
}

#[test]
fn a_killed_coordinator_stops_the_run_and_the_report_says_what_was_lost() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["worktest", "--tests", "200", "--workers", "4", "--duration-ms", "30"])
        .args(["--coordinator", "--kill-coordinator", "--lease-ms", "1000", "--session", "coord-dies", "--json"])
        .args(["--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "tests were lost: {}", String::from_utf8_lossy(&o.stderr));
    let r = report(&o);
    assert_eq!((r["coordinator_killed"].as_bool(), r["stopped_early"].as_bool()), (Some(true), Some(true)), "{r:#}");
    let lost = r["lost"].as_u64().unwrap();
    assert!(lost > 0 && lost < 200, "{r:#}");
    // The log agrees: no stop, and exactly `lost` tests without a result.
    let log = export(&server, "coord-dies");
    assert!(!log.iter().any(|e| e["kind"] == "stop"), "nobody stops a run whose coordinator died");
    let c = count(&log);
    assert_eq!(200 - c.results.len() as u64, lost);
}

#[test]
fn with_a_team_file_the_model_names_what_moves_up() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The area rule would move x0; the model names z1 instead.
    let mut suite = line("f", &["sh", "-c", "echo disk full; exit 1"], "x", "");
    for k in 0..5 {
        suite += &line(&format!("y{k}"), &["true"], "y", "");
    }
    suite += &line("x0", &["true"], "x", "");
    suite += &line("z1", &["true"], "z", "");
    let path = dir.path().join("suite.jsonl");
    std::fs::write(&path, &suite).unwrap();
    let team = dir.path().join("team.toml");
    std::fs::write(
        &team,
        r#"topic = "Which tests does a failure affect?"
[models.namer]
provider = "scripted"
replies = ['{"tests": ["z1"], "areas": []}']
[[peers]]
id = "qa"
model = "namer"
[protocol]
kind = "round_robin"
"#,
    )
    .unwrap();
    let o = bin()
        .args(["worktest", "--suite"])
        .arg(&path)
        .arg("--team")
        .arg(&team)
        .args(["--workers", "1", "--session", "model", "--json", "--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = export(&server, "model");
    let order: Vec<String> =
        log.iter().filter_map(|e| op(e, "result")).map(|j| j["task"].as_str().unwrap().to_owned()).collect();
    assert_eq!(order[..2], ["f", "z1"], "{order:?}");
    assert_eq!(order.last().map(String::as_str), Some("x0"), "the area rule did not apply: {order:?}");
    let p = log.iter().find_map(|e| op(e, "prioritize")).expect("the prioritization is on the log");
    assert_eq!(p["tests"], serde_json::json!(["z1"]));
    assert!(p["model"]["answer"].as_str().unwrap().contains("z1"), "the model's answer is on the log: {p:#}");
}

// ---- Suites collected from a test runner ----

/// Each collected test appends its name to `ran.txt` in the project, so a test can tell
/// which ran and how often (the log says what was reported; this says what ran).
fn ran_lines(project: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(project.join("ran.txt")).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Run `worktest --collect RUNNER` on `project` in both modes and check, from the log
/// and from what ran, that each of `expected` (id → name it marks) ran and was reported
/// exactly once, and that `failing` failed with `says` in its output.
fn collected_run(runner: &str, project: &std::path::Path, expected: &[(&str, &str)], failing: &str, says: &str) {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let ids: Vec<String> = expected.iter().map(|(id, _)| (*id).to_owned()).collect();
    for mode in ["peers", "coordinator"] {
        let _ = std::fs::remove_file(project.join("ran.txt"));
        let session = format!("collect-{runner}-{mode}");
        let mut cmd = bin();
        cmd.args(["worktest", "--collect", runner, "--collect-dir"]).arg(project);
        cmd.args(["--workers", "3", "--session", &session, "--json", "--nats", &server.url(), "--data-dir"]);
        cmd.arg(data.path()).env("CARGO_TARGET_DIR", project.join("target"));
        if mode == "coordinator" {
            cmd.arg("--coordinator");
        }
        let o = cmd.output().expect("the binary runs");
        assert!(o.status.success(), "{mode}: exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
        let r = report(&o);
        check_whole(&r, expected.len() as u64);
        assert_eq!((r["passed"].as_u64(), r["failed"].as_u64()), (Some(expected.len() as u64 - 1), Some(1)), "{r:#}");
        let c = count(&export(&server, &session));
        let mut reported: Vec<&String> = c.results.keys().collect();
        reported.sort();
        let mut want: Vec<&String> = ids.iter().collect();
        want.sort();
        assert_eq!(reported, want, "{mode}: the log reports exactly the listed tests");
        none_lost_none_twice(&c, &ids);
        for (id, _) in expected {
            let res = &c.results[*id][0];
            let outcome = if *id == failing { "fail" } else { "pass" };
            assert_eq!(res["outcome"], outcome, "{mode}: {id}: {res:#}");
        }
        let failed = &c.results[failing][0];
        assert_eq!(failed["status"], "failed", "{mode}: {failed:#}");
        assert!(
            failed["output"].as_str().unwrap().contains(says),
            "{mode}: the failure's output is on the log: {failed:#}"
        );
        let mut marks: Vec<String> = expected.iter().map(|(_, m)| (*m).to_owned()).collect();
        marks.sort();
        assert_eq!(ran_lines(project), marks, "{mode}: every test ran exactly once (not the whole suite per test)");
    }
}

#[test]
fn a_cargo_project_collected_runs_each_test_once_from_its_built_binary() {
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    std::fs::create_dir_all(p.join("src")).unwrap();
    std::fs::create_dir_all(p.join("tests")).unwrap();
    std::fs::write(
        p.join("Cargo.toml"),
        "[package]\nname = \"tiny\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n",
    )
    .unwrap();
    let mark = "pub fn mark(name: &str) {\n    use std::io::Write;\n    let path = concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/ran.txt\");\n    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();\n    f.write_all(format!(\"{name}\\n\").as_bytes()).unwrap();\n}\n";
    std::fs::write(
        p.join("src/lib.rs"),
        format!(
            "pub fn add(a: i32, b: i32) -> i32 {{ a + b }}\n\n{mark}\n#[cfg(test)]\nmod tests {{\n    use super::*;\n\n    #[test]\n    fn adds() {{ mark(\"lib adds\"); assert_eq!(add(2, 2), 4); }}\n\n    #[test]\n    fn fails_on_purpose() {{ mark(\"lib fails\"); panic!(\"the answer was {{}}\", add(40, 1)); }}\n\n    #[test]\n    fn runs_in_the_package_dir() {{ mark(\"lib cwd\"); assert!(std::path::Path::new(\"Cargo.toml\").is_file()); }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        p.join("tests/api.rs"),
        "#[test]\nfn adds() { tiny::mark(\"api adds\"); assert_eq!(tiny::add(1, 2), 3); }\n",
    )
    .unwrap();
    let expected = [
        ("tiny tests::adds", "lib adds"),
        ("tiny tests::fails_on_purpose", "lib fails"),
        ("tiny tests::runs_in_the_package_dir", "lib cwd"),
        ("tiny::api adds", "api adds"),
    ];
    collected_run("cargo", p, &expected, "tiny tests::fails_on_purpose", "the answer was 41");
}

#[test]
fn a_pytest_project_collected_runs_each_test_once() {
    let found = Command::new("pytest").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "this test needs pytest on PATH: `apt-get install python3-pytest` (scripts/test.sh installs it)");
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    std::fs::write(
        p.join("test_sample.py"),
        "import os\n\n\ndef mark(name):\n    with open(os.path.join(os.path.dirname(__file__), 'ran.txt'), 'a') as f:\n        f.write(name + '\\n')\n\n\ndef test_one():\n    mark('one')\n\n\ndef test_fails():\n    mark('fails')\n    assert 40 + 1 == 42, 'the answer was 41'\n\n\nclass TestGroup:\n    def test_member(self):\n        mark('member')\n",
    )
    .unwrap();
    let expected = [
        ("test_sample.py::test_one", "one"),
        ("test_sample.py::test_fails", "fails"),
        ("test_sample.py::TestGroup::test_member", "member"),
    ];
    collected_run("pytest", p, &expected, "test_sample.py::test_fails", "the answer was 41");
}
