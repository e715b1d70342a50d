//! Regression tests for issue 12, part 5: bad input that got through. Each test names
//! what used to happen; each fails on the implementation that let it through.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use roundtable_core::{EnvelopeId, PeerId, SessionId};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    c.env_remove("ROUNDTABLE_DIR").env_remove("ROUNDTABLE_NATS").env("NO_COLOR", "1");
    c
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

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A bad-input exit: code 2, no panic, the message containing each of `want`.
fn refused(o: &Output, want: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stdout: {}\nstderr: {err}", stdout(o));
    assert!(!err.contains("panicked"), "{err}");
    for w in want {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
}

const DUO: &str = "topic = \"t\"\n[models.s]\nprovider = \"scripted\"\nreplies = [\"ok\"]\n[[peers]]\nid = \"a\"\nmodel = \"s\"\n[[peers]]\nid = \"b\"\nmodel = \"s\"\n[protocol]\nkind = \"round_robin\"\nrounds = 1\n";

#[test]
fn issue_12_values_that_crashed_or_never_ended_a_run_exit_2_in_validate_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    // (the line added after `provider`, or a table; the key and range the message names)
    let cases = [
        ("max_concurrency = 18446744073709551615", "models.s.max_concurrency", "1 to 1024", 4),
        ("price = { prompt_per_mtok = 0.0, completion_per_mtok = nan }", "completion_per_mtok", "0 to 100000", 4),
        ("timeout_secs = -1.0", "models.s.timeout_secs", "0.001 to 604800", 4),
    ];
    for (line, key, range, lineno) in cases {
        let team = write(
            d,
            "t.toml",
            &DUO.replace("provider = \"scripted\"\n", &format!("provider = \"scripted\"\n{line}\n")),
        );
        let at = format!("t.toml:{lineno}:");
        for cmd in ["validate", "run"] {
            let o = run(&[cmd, team.to_str().unwrap()], &data);
            refused(&o, &[&at, key, range]);
        }
    }
    let team = write(d, "t.toml", &DUO.replace("rounds = 1", "rounds = 4294967295"));
    refused(&run(&["run", team.to_str().unwrap()], &data), &["t.toml:13:", "protocol.rounds", "1 to 10000"]);
    assert!(!data.exists(), "bad input writes nothing");
}

#[test]
fn issue_12_validate_refuses_a_team_without_a_topic_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let team = write(d, "t.toml", &DUO.replace("topic = \"t\"\n", ""));
    for cmd in ["validate", "run"] {
        refused(&run(&[cmd, team.to_str().unwrap()], &d.join("data")), &["no topic"]);
    }
    let o = run(&["validate", team.to_str().unwrap(), "--topic", "x"], &d.join("data"));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn issue_12_a_malformed_nats_url_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["nats://localhost:notaport", "http://localhost:4222", "nats://"] {
        let o = run(&["sessions", "--nats", url], dir.path());
        refused(&o, &["--nats", "nats://HOST:PORT"]);
    }
}

#[test]
fn issue_12_a_team_file_reads_only_files_under_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let team_dir = d.join("team");
    std::fs::create_dir(&team_dir).unwrap();
    write(d, "secret.txt", "the secret\n");
    write(&team_dir, "replies.txt", "from the file\n");
    std::os::unix::fs::symlink(d.join("secret.txt"), team_dir.join("link.txt")).unwrap();
    let with = |file: &str| {
        let src = DUO.replace("replies = [\"ok\"]", &format!("replies_file = {file:?}"));
        write(&team_dir, "t.toml", &src)
    };
    let secret = d.join("secret.txt");
    for file in ["../secret.txt", "../../../../etc/shadow", secret.to_str().unwrap(), "link.txt"] {
        let o = run(&["validate", with(file).to_str().unwrap(), "--json"], &d.join("data"));
        refused(&o, &["models.s.replies_file", "outside the team file's directory"]);
        assert!(!stdout(&o).contains("the secret") && !stderr(&o).contains("the secret"));
    }
    let o = run(&["validate", with("replies.txt").to_str().unwrap(), "--json"], &d.join("data"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("from the file"), "{}", stdout(&o));
}

#[test]
fn issue_12_log_to_a_full_disk_exits_1_with_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let team = examples().join("api-design.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["session"].as_str().unwrap().to_string();
    for json in [false, true] {
        let full = File::options().write(true).open("/dev/full").expect("/dev/full (Linux)");
        let mut args = vec!["log", id.as_str()];
        if json {
            args.push("--json");
        }
        let o = bin().args(&args).arg("--data-dir").arg(d).stdout(Stdio::from(full)).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked") && err.contains("No space left"), "{err}");
    }
}

fn session_export(d: &Path) -> (String, Vec<serde_json::Value>) {
    let team = examples().join("api-design.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["session"].as_str().unwrap().to_string();
    let o = run(&["export", &id], d);
    assert!(o.status.success(), "{}", stderr(&o));
    // Without its seal: these files are edited as a forger who drops the seal would.
    let text = stdout(&o);
    let lines = roundtable_core::chain::split_seal(&text).0.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (id, lines)
}

fn rekey(e: &mut serde_json::Value) {
    let id = EnvelopeId::derive(
        &SessionId::from(e["session"].as_str().unwrap()),
        &PeerId::from(e["from"].as_str().unwrap()),
        e["step"].as_str().unwrap(),
    );
    e["id"] = serde_json::json!(id.as_str());
}

#[test]
fn issue_12_import_refuses_forged_and_inconsistent_files_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, lines) = session_export(d);
    let other = d.join("other");
    let first_message = lines.iter().position(|e| e["kind"] == "message").unwrap();
    let stop = lines.iter().position(|e| e["kind"] == "stop").unwrap();
    assert_eq!(stop, lines.len() - 1);
    let try_import = |name: &str, lines: &[serde_json::Value]| -> Output {
        let text: String = lines.iter().map(|e| format!("{e}\n")).collect();
        let f = write(d, name, &text);
        run(&["import", f.to_str().unwrap()], &other)
    };
    // The unaltered export imports (into another data directory).
    let o = try_import("ok.jsonl", &lines);
    assert!(o.status.success(), "{}", stderr(&o));
    let other = d.join("other2");
    let try_import = |name: &str, lines: &[serde_json::Value]| -> Output {
        let text: String = lines.iter().map(|e| format!("{e}\n")).collect();
        let f = write(d, name, &text);
        run(&["import", f.to_str().unwrap()], &other)
    };
    let line = |i: usize| format!(":{}:", i + 1);

    // A changed author: the id no longer follows from (session, from, step).
    let mut v = lines.clone();
    v[first_message]["from"] = serde_json::json!("backend");
    refused(&try_import("from.jsonl", &v), &[&line(first_message), "field `id`", "altered"]);
    // An outsider, with an id derived for it.
    let mut v = lines.clone();
    v[first_message]["from"] = serde_json::json!("mallory");
    rekey(&mut v[first_message]);
    refused(&try_import("outsider.jsonl", &v), &[&line(first_message), "`mallory` is not a peer"]);
    // An invented id.
    let mut v = lines.clone();
    v[first_message]["id"] = serde_json::json!("0123456789abcdef0123456789abcdef");
    refused(&try_import("id.jsonl", &v), &[&line(first_message), "field `id`"]);
    // The stop placed first.
    let mut v = lines.clone();
    let s = v.remove(stop);
    v.insert(0, s);
    refused(&try_import("stop-first.jsonl", &v), &[":1:", "must be the session's task"]);
    // The stop placed early: more than any peer's one in-flight duty follows it.
    let mut v = lines.clone();
    let s = v.remove(stop);
    v.insert(first_message, s);
    refused(&try_import("stop-early.jsonl", &v), &[&line(first_message), "field `parents`"]);
    // A stop without parents placed early: more than each peer's one duty in flight follows.
    let mut v = lines.clone();
    let mut s = v.remove(stop);
    s.as_object_mut().unwrap().remove("parents");
    v.insert(first_message, s);
    refused(&try_import("stop-early2.jsonl", &v), &["after the stop"]);
    // A missing, then a garbage plan.
    let mut v = lines.clone();
    v[0]["body"]["json"].as_object_mut().unwrap().remove("plan");
    refused(&try_import("no-plan.jsonl", &v), &[":1:", "no plan"]);
    let mut v = lines.clone();
    v[0]["body"]["json"]["plan"] = serde_json::json!({"peers": "garbage"});
    refused(&try_import("bad-plan.jsonl", &v), &[":1:", "unreadable"]);
    // Session ids that are paths, empty, huge, or hold a NUL.
    for (name, sid) in [
        ("path", "../../etc/passwd".to_string()),
        ("empty", String::new()),
        ("long", "x".repeat(100_000)),
        ("nul", "a\u{0}b".to_string()),
    ] {
        let mut v = lines.clone();
        for e in &mut v {
            e["session"] = serde_json::json!(sid);
            rekey(e);
        }
        refused(&try_import(&format!("{name}.jsonl"), &v), &[":1:", "field `session`"]);
    }
    // Nothing was imported by any of them.
    let o = run(&["sessions", "--json"], &other);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "[]");
}

#[test]
fn issue_12_export_replaces_only_regular_files_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (id, lines) = session_export(d);
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let listing = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    // A FIFO, a symlink, a directory and a device are refused and left as they were.
    let fifo = out.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success(), "mkfifo");
    let target = write(d, "target.txt", "keep me");
    let link = out.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let sub = out.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let before = listing(&out);
    for (path, what) in [(&fifo, "a FIFO"), (&link, "a symbolic link"), (&sub, "a directory")] {
        refused(&run(&["export", &id, "-o", path.to_str().unwrap()], d), &[what]);
    }
    refused(&run(&["export", &id, "-o", "/dev/null"], d), &["a device"]);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata("/dev/null").unwrap().file_type().is_char_device());
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    assert_eq!(listing(&out), before, "no partial file left behind");
    assert!(listing(&sub).is_empty());
    // A regular file is replaced whole.
    let file = write(&out, "s.jsonl", "old");
    let o = run(&["export", &id, "-o", file.to_str().unwrap()], d);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), lines.len() + 1, "the envelopes and the seal");
    assert_eq!(listing(&out), before.iter().cloned().chain(["s.jsonl".to_string()]).collect::<Vec<_>>().tap_sort());
}

trait TapSort {
    fn tap_sort(self) -> Self;
}
impl TapSort for Vec<String> {
    fn tap_sort(mut self) -> Self {
        self.sort();
        self
    }
}

#[test]
fn issue_12_eval_against_an_unreachable_endpoint_counts_errors_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let team = write(
        d,
        "t.toml",
        &format!(
            "topic = \"t\"\n[models.m]\nprovider = \"openai\"\nmodel = \"x\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmax_retries = 0\n[[peers]]\nid = \"a\"\nmodel = \"m\"\n[protocol]\nkind = \"debate\"\nrounds = 1\n"
        ),
    );
    let o = bin()
        .args(["eval", "--team", team.to_str().unwrap(), "--model", "m", "--pattern", "debate", "--n", "2"])
        .args(["--agents", "2", "--rounds", "1", "--json"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("sessions failed"), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the report is still printed");
    for r in report["results"].as_array().unwrap() {
        assert_eq!(r["errors"], r["questions"], "{r}");
        assert!(r["questions"].as_u64().unwrap() > 0);
    }
}
