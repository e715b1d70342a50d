//! Peers that act, end to end through the binary: a command tool in the conversation
//! example, a program peer reporting to the peers a failure concerns, and a SIGKILL in
//! the middle of a non-idempotent command, then `resume`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    c.env_remove("ROUNDTABLE_DIR").env("NO_COLOR", "1");
    c
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn run(args: &[&str], data: &Path) -> Output {
    bin().args(args).arg("--data-dir").arg(data).output().expect("the binary runs")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    })
}

/// Every envelope of a session, from `export`.
fn envelopes(id: &str, data: &Path) -> Vec<serde_json::Value> {
    let o = run(&["export", id], data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The last line is the export's seal, not an envelope.
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, seal) = roundtable_core::chain::split_seal(&text);
    assert!(seal.is_some(), "an export is sealed");
    body.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn of_kind<'a>(log: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|e| e["kind"] == kind).collect()
}

#[test]
fn the_conversation_example_runs_its_command_tool_and_replays_without_running_it() {
    let data = tempfile::tempdir().unwrap();
    let team = examples().join("conversation.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], data.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o);
    assert_eq!(s["stop_reason"], "finished: architect proposed the answer");
    let id = s["session"].as_str().unwrap();
    let log = envelopes(id, data.path());
    let results = of_kind(&log, "tool_result");
    let checks: Vec<&&serde_json::Value> =
        results.iter().filter(|r| r["body"]["json"]["tool"] == "run_checks").collect();
    assert_eq!(checks.len(), 1);
    let r = &checks[0]["body"]["json"];
    assert_eq!((r["outcome"].as_str(), r["exit_status"].as_i64()), (Some("ok"), Some(0)), "{r}");
    assert!(r["output"].as_str().unwrap().contains("5 passed, 0 failed"), "{r}");
    // The tester's report went to the backend by name.
    let report = log
        .iter()
        .find(|e| e["from"] == "tester" && e["kind"] == "message" && e["to"]["id"] == "backend")
        .expect("a direct message from the tester to the backend");
    assert!(report["body"]["text"].as_str().unwrap().contains("5 passed"));

    let o = run(&["replay", id], data.path());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let o = run(&["trace", id], data.path());
    let trace = String::from_utf8_lossy(&o.stdout);
    assert!(trace.contains("run_checks({\"spec\": \"POST /users 201 409 422\"})"), "{trace}");
}

#[test]
fn the_simulated_model_calls_the_command_tool_its_task_names_and_answers_with_the_result() {
    let data = tempfile::tempdir().unwrap();
    let team = examples().join("simulated-tools.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], data.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o);
    assert!(s["stop_reason"].as_str().unwrap().starts_with("finished: "), "{s}");
    assert_eq!(s["final_answer"], "5 passed, 0 failed", "{s}");
    let id = s["session"].as_str().unwrap();
    let log = envelopes(id, data.path());
    // Each peer ran the checks once, with the arguments the task gives.
    let calls = of_kind(&log, "tool_call");
    let mut callers: Vec<&str> = calls
        .iter()
        .filter(|c| c["body"]["json"]["tool"] == "run_checks")
        .map(|c| c["from"].as_str().unwrap())
        .collect();
    callers.sort();
    assert_eq!(callers, ["reviewer", "tester"]);
    for c in calls.iter().filter(|c| c["body"]["json"]["tool"] == "run_checks") {
        let args: serde_json::Value = serde_json::from_str(c["body"]["json"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, serde_json::json!({"spec": "POST /users 201 409 422"}));
    }
    let results = of_kind(&log, "tool_result");
    let checks: Vec<&&serde_json::Value> =
        results.iter().filter(|r| r["body"]["json"]["tool"] == "run_checks").collect();
    assert_eq!(checks.len(), 2);
    for r in &checks {
        let r = &r["body"]["json"];
        assert_eq!((r["outcome"].as_str(), r["exit_status"].as_i64()), (Some("ok"), Some(0)), "{r}");
    }
    // The result fed what each peer told the other.
    let said: Vec<&str> = of_kind(&log, "message")
        .iter()
        .filter_map(|m| m["body"]["text"].as_str())
        .filter(|t| t.starts_with("I ran `run_checks`"))
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said.iter().all(|t| t.ends_with("Answer: 5 passed, 0 failed")), "{said:?}");

    let o = run(&["replay", id], data.path());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_program_peer_reports_a_failing_check_to_the_two_peers_it_concerns() {
    let data = tempfile::tempdir().unwrap();
    let team = examples().join("failing-check.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], data.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o);
    assert_eq!(s["stop_reason"], "finished: backend proposed the answer");
    let log = envelopes(s["session"].as_str().unwrap(), data.path());
    let mut told: Vec<&str> = log
        .iter()
        .filter(|e| {
            e["from"] == "ci"
                && e["kind"] == "message"
                && e["body"]["text"].as_str().unwrap_or("").contains("contract check failed")
        })
        .map(|e| e["to"]["id"].as_str().unwrap())
        .collect();
    told.sort();
    assert_eq!(told, ["backend", "frontend"], "directly to the two peers, nobody else");
    assert!(of_kind(&log, "failure").is_empty());
}

fn effect_team(dir: &Path, idempotent: bool) -> PathBuf {
    std::fs::write(
        dir.join("deploy.sh"),
        "#!/bin/sh\n# Records the effect, then takes its time.\necho \"$1\" >> effects.txt\nsleep 20\n",
    )
    .unwrap();
    let team = dir.join("team.toml");
    std::fs::write(
        &team,
        format!(
            r#"topic = "Ship v2"
[models.m]
provider = "scripted"
[models.m.per_peer]
ops = ['!tool deploy {{"version": "v2"}}', '!tool finish {{"answer": "v2 checked and out"}}']
[[peers]]
id = "ops"
model = "m"
tools = ["deploy"]
[tools.deploy]
kind = "command"
argv = ["sh", "deploy.sh", "{{version}}"]
parameters = {{ type = "object", properties = {{ version = {{ type = "string" }} }}, required = ["version"] }}
cwd = "."
timeout_secs = 60
idempotent = {idempotent}
[protocol]
kind = "conversation"
"#
        ),
    )
    .unwrap();
    team
}

/// Run the team until its deploy has recorded its effect, SIGKILL the process while the
/// deploy sleeps, and return the session's id.
fn kill_once_deployed(team: &Path, data: &Path, effects: &Path) -> String {
    let mut child = bin()
        .args(["run", team.to_str().unwrap(), "--json", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(effects).is_ok_and(|s| s.lines().count() == 1) {
        assert!(Instant::now() < deadline, "the deploy never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    json(&run(&["sessions", "--json"], data))[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn sigkill_in_the_middle_of_a_non_idempotent_command_then_resume_runs_it_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let team = effect_team(dir.path(), false);
    let data = dir.path().join("d");
    let effects = dir.path().join("effects.txt");
    let id = kill_once_deployed(&team, &data, &effects);
    let before = envelopes(&id, &data);
    assert_eq!(of_kind(&before, "tool_call").len(), 1, "the call was recorded before it ran");
    assert!(of_kind(&before, "tool_result").is_empty(), "and killed before its result");

    let o = bin().args(["resume", &id, "--json", "--data-dir"]).arg(&data).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["final_answer"], "v2 checked and out");
    assert_eq!(std::fs::read_to_string(&effects).unwrap().lines().count(), 1, "the deploy ran once, not twice");
    let after = envelopes(&id, &data);
    let results = of_kind(&after, "tool_result");
    let deploy: Vec<_> = results.iter().filter(|r| r["body"]["json"]["tool"] == "deploy").collect();
    assert_eq!(deploy.len(), 1);
    assert_eq!(deploy[0]["body"]["json"]["outcome"], "unknown");
    assert!(deploy[0]["body"]["text"].as_str().unwrap().contains("outcome unknown"));
    // What was acknowledged before the kill is intact, in place.
    assert_eq!(&after[..before.len()], &before[..]);
}

#[test]
fn an_idempotent_command_interrupted_by_sigkill_runs_again_once_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let team = effect_team(dir.path(), true);
    let data = dir.path().join("d");
    let effects = dir.path().join("effects.txt");
    let id = kill_once_deployed(&team, &data, &effects);
    // Quick on the second run: the effect is recorded, then the script returns.
    std::fs::write(dir.path().join("deploy.sh"), "#!/bin/sh\necho \"$1\" >> effects.txt\n").unwrap();
    let o = bin().args(["resume", &id, "--json", "--data-dir"]).arg(&data).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&effects).unwrap().lines().count(), 2, "run again, once");
    let after = envelopes(&id, &data);
    let r = of_kind(&after, "tool_result");
    assert_eq!(r.len(), 2, "the deploy and the finish");
    assert_eq!(r[0]["body"]["json"]["outcome"], "ok");
}

/// The reference MCP filesystem server, as `scripts/test.sh` installs it.
fn filesystem_server() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/npm/node_modules/.bin/mcp-server-filesystem");
    assert!(
        bin.exists(),
        "the fact-check test needs the MCP filesystem server: run ./scripts/test.sh, or `npm install --prefix target/npm @modelcontextprotocol/server-filesystem@2026.8.31` from the repository root"
    );
    bin.canonicalize().unwrap()
}

#[test]
fn the_fact_check_example_reads_documents_through_the_mcp_filesystem_server() {
    let server = filesystem_server();
    let dir = tempfile::tempdir().unwrap();
    // The example as it is, but with the server already installed (no download).
    let src = std::fs::read_to_string(examples().join("fact-check.toml")).unwrap();
    let npx = "\"npx\", \"-y\", \"@modelcontextprotocol/server-filesystem@2026.8.31\"";
    assert!(src.contains(npx), "the example starts the server with npx");
    let team = dir.path().join("fact-check.toml");
    let here = examples().canonicalize().unwrap();
    let src = src.replace(npx, &format!("{:?}", server.display().to_string()));
    std::fs::write(&team, src.replace("cwd = \".\"", &format!("cwd = {:?}", here.display().to_string()))).unwrap();
    let o = run(&["run", team.to_str().unwrap(), "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o);
    assert!(s["final_answer"].as_str().unwrap().starts_with("False on both counts"), "{s}");
    let log = envelopes(s["session"].as_str().unwrap(), dir.path());
    let read = log
        .iter()
        .find(|e| e["kind"] == "tool_result" && e["body"]["json"]["tool"] == "read_text_file")
        .expect("the reader read a file");
    assert_eq!(read["body"]["json"]["outcome"], "ok", "{read}");
    assert!(read["body"]["json"]["output"].as_str().unwrap().contains("Launch date: Tuesday 14 April"));
    let listed =
        log.iter().find(|e| e["kind"] == "tool_result" && e["body"]["json"]["tool"] == "list_directory").unwrap();
    assert!(listed["body"]["text"].as_str().unwrap().contains("launch-notes.md"));
}

#[test]
fn an_approval_nobody_gives_in_time_is_a_recorded_denial_and_the_session_replays() {
    let data = tempfile::tempdir().unwrap();
    let team = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/approval.toml");
    let o = run(&["run", team.to_str().unwrap(), "--json"], data.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = json(&o)["session"].as_str().unwrap().to_string();
    let log = envelopes(&id, data.path());
    let approvals = of_kind(&log, "approval");
    assert_eq!(approvals.len(), 2, "a request and its answer: {approvals:?}");
    let (req, answer) = (&approvals[0], &approvals[1]);
    assert_eq!((req["from"].as_str(), req["to"]["id"].as_str()), (Some("eng"), Some("reviewer")), "{req}");
    assert_eq!(req["body"]["json"]["tool"], "schedule_rollout");
    assert_eq!(answer["body"]["json"]["approve"], false);
    assert_eq!(answer["body"]["json"]["timeout"], true);
    let results = of_kind(&log, "tool_result");
    assert_eq!(results.len(), 1);
    let r = &results[0]["body"]["json"];
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["output"], "denied: reviewer did not answer within 1 s", "{r}");
    assert!(r.get("exit_status").is_none(), "the command never ran: {r}");

    let o = run(&["replay", &id], data.path());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("No divergence"), "{out}");
}

/// The reference MCP server `server-everything`, as `scripts/test.sh` installs it.
fn everything_server() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/npm/node_modules/.bin/mcp-server-everything");
    assert!(
        bin.exists(),
        "the MCP listing test needs the reference server: run ./scripts/test.sh, or `npm install --prefix target/npm @modelcontextprotocol/server-everything@2026.8.31` from the repository root"
    );
    bin.canonicalize().unwrap()
}

/// A one-peer conversation whose peer is granted the MCP server `command` starts: it
/// echoes a word through it, then finishes.
fn mcp_team(dir: &Path, command: &[String]) -> PathBuf {
    let src = format!(
        r#"name = "mcp-listing"
topic = "Echo a word through the server."
[tools.everything]
kind = "mcp"
description = "The reference MCP server."
command = {command:?}
timeout_secs = 30
[models.m]
provider = "scripted"
[models.m.per_peer]
echoer = ['!tool echo {{"message": "hello"}}', '!tool finish {{"answer": "The server echoed hello."}}']
[[peers]]
id = "echoer"
model = "m"
tools = ["everything"]
[protocol]
kind = "conversation"
start = ["echoer"]
finish = "echoer"
max_turns = 2
"#
    );
    let team = dir.join("team.toml");
    std::fs::write(&team, src).unwrap();
    team
}

#[test]
fn an_mcp_servers_tools_are_listed_on_the_log_when_the_session_starts() {
    let server = everything_server();
    let dir = tempfile::tempdir().unwrap();
    let team = mcp_team(dir.path(), &[server.display().to_string(), "stdio".into()]);
    let o = run(&["run", team.to_str().unwrap(), "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o);
    assert_eq!(s["final_answer"], "The server echoed hello.", "{s}");
    let id = s["session"].as_str().unwrap().to_string();
    let log = envelopes(&id, dir.path());

    let lists = of_kind(&log, "tool_list");
    assert_eq!(lists.len(), 1, "one listing for the one server: {lists:?}");
    let list = lists[0];
    assert_eq!(list["step"], "tools/everything/1");
    assert_eq!(list["from"], "echoer", "recorded by the peer granted the server");
    let body = &list["body"]["json"];
    assert_eq!(body["server"], "everything");
    assert!(body.get("error").is_none(), "{body}");
    let tools = body["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"echo") && names.contains(&"get-sum"), "the server's own names: {names:?}");
    let echo = tools.iter().find(|t| t["name"] == "echo").unwrap();
    assert!(!echo["description"].as_str().unwrap().is_empty(), "{echo}");
    assert_eq!(echo["parameters"]["properties"]["message"]["type"], "string", "{echo}");
    // Before any peer acted: right after the task.
    let pos = |kind: &str| log.iter().position(|e| e["kind"] == kind).unwrap();
    assert_eq!(pos("tool_list"), 1);
    assert!(pos("tool_list") < pos("tool_call"));
    let result = of_kind(&log, "tool_result")
        .into_iter()
        .find(|r| r["body"]["json"]["tool"] == "echo")
        .expect("the echo call's result");
    assert_eq!(result["body"]["json"]["output"], "Echo: hello", "{result}");

    // `log` and `trace` show the listing; replay reads it and starts no server.
    let o = run(&["log", &id], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("MCP server everything listed") && text.contains("get-sum"), "{text}");
    let o = run(&["trace", &id], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("echoer recorded the tools: MCP server everything listed"), "{text}");
    let o = run(&["replay", &id], dir.path());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("No divergence"), "{out}\n{}", String::from_utf8_lossy(&o.stderr));

    // A resume finds the same listing on the log and records nothing new.
    let o = run(&["resume", &id, "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(of_kind(&envelopes(&id, dir.path()), "tool_list").len(), 1);
}

#[test]
fn an_mcp_server_that_cannot_start_is_recorded_on_the_log_and_the_run_fails() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = ["sh".to_string(), "-c".into(), "echo this is not MCP; sleep 60".into()];
    let team = mcp_team(dir.path(), &garbage);
    let src = std::fs::read_to_string(&team).unwrap().replace("timeout_secs = 30", "timeout_secs = 2");
    std::fs::write(&team, src).unwrap();
    let o = run(&["run", team.to_str().unwrap(), "--json"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the team's tools could not be started"), "{err}");
    let o = run(&["sessions", "--json"], dir.path());
    let sessions: serde_json::Value = json(&o);
    let id = sessions[0]["id"].as_str().unwrap_or_else(|| panic!("{sessions}")).to_string();
    let log = envelopes(&id, dir.path());
    let lists = of_kind(&log, "tool_list");
    assert_eq!(lists.len(), 1, "{log:?}");
    let body = &lists[0]["body"]["json"];
    assert_eq!(body["server"], "everything");
    assert_eq!(body["tools"], serde_json::json!([]));
    assert!(body["error"].as_str().unwrap().contains("this is not MCP"), "the failure quotes what it printed: {body}");
    assert!(of_kind(&log, "tool_call").is_empty(), "no peer ran");
    let o = run(&["log", &id], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("MCP server everything could not be started"), "{text}");
}

#[test]
fn trace_and_log_name_each_tool_call_its_caller_arguments_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(300);
    let src = format!(
        r#"name = "checks"
topic = "Check POST /users."
[tools.check]
kind = "command"
description = "Run the contract checks."
argv = ["sh", "-c", "echo \"1 of 2 checks failed: no 409\"; exit 3", "check", "{{spec}}"]
parameters = {{ type = "object", properties = {{ spec = {{ type = "string" }} }}, required = ["spec"] }}
timeout_secs = 30
[models.m]
provider = "scripted"
[models.m.per_peer]
tester = ['!tool check {{"spec": "POST /users 201 {long}"}}', '!tool finish {{"answer": "The check failed."}}']
[[peers]]
id = "tester"
model = "m"
tools = ["check"]
[protocol]
kind = "conversation"
start = ["tester"]
finish = "tester"
max_turns = 2
"#
    );
    let team = dir.path().join("team.toml");
    std::fs::write(&team, src).unwrap();
    let o = run(&["run", team.to_str().unwrap(), "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = json(&o)["session"].as_str().unwrap().to_string();
    let log = envelopes(&id, dir.path());
    let call_seq = log.iter().position(|e| e["kind"] == "tool_call").unwrap() + 1;

    let o = run(&["trace", &id], dir.path());
    let trace = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{trace}");
    let line =
        |needle: &str| trace.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?}:\n{trace}"));
    // The caller, the tool and its arguments, cut short.
    let call = line("tester called check(");
    assert!(call.contains(r#"check({"spec": "POST /users 201 xxx"#) && call.contains('…'), "{call}");
    assert!(!call.contains(&long), "the arguments are truncated: {call}");
    // The result: its tool, whom it answers, the outcome and exit status, the output.
    let result = line("check → tester (error · exit 3 · ");
    assert!(result.contains(" ms): \"1 of 2 checks failed: no 409"), "{result}");
    assert!(trace.contains(&format!("⤷ answers #{call_seq} tester")), "{trace}");
    let decisions = trace.split("Votes and decisions").nth(1).unwrap_or("");
    assert!(!decisions.contains("tool_"), "tool envelopes are not decisions: {decisions}");

    let o = run(&["log", &id], dir.path());
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{text}");
    assert!(text.contains("tester calls check (tool_call)"), "{text}");
    assert!(text.contains(r#"check({"spec": "POST /users 201 xxx"#) && !text.contains(&long), "{text}");
    assert!(text.contains("check → tester (tool_result: error · exit 3 · "), "{text}");
    assert!(text.contains("\n  [error] 1 of 2 checks failed: no 409"), "the output under it: {text}");
}
