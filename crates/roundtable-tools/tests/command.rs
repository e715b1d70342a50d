//! The `command` tool: argument injection, schema refusals, validation, timeouts that
//! kill the whole process group, output caps and the environment allow-list.

mod common;

use common::{ctx, fixture, wait_gone};
use roundtable_core::tool::{CommandSpec, Outcome, Tool, ToolKind, ToolOutput, ToolSpec};
use roundtable_tools::command::{CommandTool, validate};
use serde_json::{Value, json};

fn spec(argv: &[&str], parameters: Value) -> CommandSpec {
    CommandSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        parameters,
        cwd: None,
        env: Vec::new(),
        timeout_secs: 30.0,
        max_stdout_bytes: 1 << 20,
        max_stderr_bytes: 1 << 20,
    }
}

fn tool(spec: CommandSpec) -> CommandTool {
    let decl = ToolSpec {
        name: "t".into(),
        description: "a test tool".into(),
        idempotent: false,
        approve_by: None,
        kind: ToolKind::Command(spec.clone()),
    };
    match CommandTool::new(&decl, &spec) {
        Ok(t) => t,
        Err(problems) => panic!("spec refused: {problems:?}"),
    }
}

fn string_schema() -> Value {
    json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
}

fn print_argv() -> String {
    fixture("print-argv.sh").display().to_string()
}

/// The argv elements the fixture received (after its own name).
fn received(out: &ToolOutput) -> Vec<String> {
    assert_eq!(out.outcome, Outcome::Ok, "the command failed: {}", out.output);
    let mut parts: Vec<String> = out.output.split('\0').map(str::to_owned).collect();
    assert_eq!(parts.pop().as_deref(), Some(""), "output does not end with a NUL: {:?}", out.output);
    parts
}

async fn call(t: &CommandTool, args: Value) -> ToolOutput {
    t.call(&args, &ctx()).await
}

#[tokio::test]
async fn a_value_that_looks_like_a_flag_is_refused() {
    let t = tool(spec(&[&print_argv(), "{a}"], string_schema()));
    for flag in ["-rf", "--flag", "-", "--"] {
        let out = call(&t, json!({ "a": flag })).await;
        assert_eq!(out.outcome, Outcome::Refused, "{flag:?} was not refused: {}", out.output);
        assert!(out.output.contains("'-'"), "the reason does not say why: {}", out.output);
    }
}

#[tokio::test]
async fn after_a_literal_double_dash_a_dash_value_is_one_operand() {
    let t = tool(spec(&[&print_argv(), "--", "{a}"], string_schema()));
    let out = call(&t, json!({ "a": "-rf" })).await;
    assert_eq!(received(&out), vec!["--", "-rf"]);
}

#[tokio::test]
async fn inside_literal_text_a_dash_value_cannot_start_the_element() {
    let t = tool(spec(&[&print_argv(), "--name={a}"], string_schema()));
    let out = call(&t, json!({ "a": "-x" })).await;
    assert_eq!(received(&out), vec!["--name=-x"]);
}

#[tokio::test]
async fn shell_syntax_and_newlines_stay_one_argument_and_run_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(&[&print_argv(), "{a}"], string_schema());
    s.cwd = Some(dir.path().to_owned());
    let t = tool(s);
    for value in ["; rm -rf /", "$(touch x)", "`touch y`", "a\nb", "a b | touch z", "x && touch w"] {
        let out = call(&t, json!({ "a": value })).await;
        assert_eq!(received(&out), vec![value.to_owned()], "for {value:?}");
    }
    let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(created.is_empty(), "a value ran as a command: {created:?}");
}

#[tokio::test]
async fn a_nul_byte_is_refused() {
    let t = tool(spec(&[&print_argv(), "{a}"], string_schema()));
    let out = call(&t, json!({ "a": "ok\u{0}-rf" })).await;
    assert_eq!(out.outcome, Outcome::Refused);
    assert!(out.output.contains("NUL"), "{}", out.output);
}

#[tokio::test]
async fn arrays_expand_only_as_whole_elements_and_scalars_are_json() {
    let schema = json!({"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string"}},
        "n": {"type": "integer"}, "verbose": {"type": "boolean"}, "opt": {"type": "string"}
    }});
    let t = tool(spec(&[&print_argv(), "--count={n}", "{verbose}", "--opt={opt}", "--", "{files}"], schema.clone()));
    let out = call(&t, json!({ "files": ["a b", "-c", "d"], "n": 3, "verbose": true })).await;
    // `--opt={opt}` is left out: the call gave no `opt`.
    assert_eq!(received(&out), vec!["--count=3", "true", "--", "a b", "-c", "d"]);

    let t = tool(spec(&[&print_argv(), "{files}"], schema.clone()));
    let out = call(&t, json!({ "files": ["a", "-c"] })).await;
    assert_eq!(out.outcome, Outcome::Refused, "an array item became a flag: {}", out.output);

    let t = tool(spec(&[&print_argv(), "--f={files}"], schema));
    let out = call(&t, json!({ "files": ["a"] })).await;
    assert_eq!(out.outcome, Outcome::Refused);
    assert!(out.output.contains("array"), "{}", out.output);
}

#[tokio::test]
async fn arguments_that_do_not_match_the_schema_are_refused_with_the_reason() {
    let schema = json!({"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 1}
    }, "required": ["a"], "additionalProperties": false});
    let t = tool(spec(&[&print_argv(), "{a}"], schema));
    let cases = [
        (json!({}), "\"a\" is a required property"),
        (json!({ "a": 7 }), "is not of type \"string\""),
        (json!({ "a": "far too long" }), "longer than 5"),
        (json!({ "a": "x", "n": 0 }), "minimum"),
        (json!({ "a": "x", "extra": 1 }), "extra"),
    ];
    for (args, reason) in cases {
        let out = call(&t, args.clone()).await;
        assert_eq!(out.outcome, Outcome::Refused, "{args} ran: {}", out.output);
        assert!(out.output.contains("schema"), "{}", out.output);
        assert!(out.output.contains(reason), "for {args}: {:?} does not contain {reason:?}", out.output);
    }
}

#[test]
fn validation_finds_every_problem_with_its_key() {
    let mut s = spec(&["no-such-program-roundtable", "{a}", "{b}"], string_schema());
    s.cwd = Some("/no/such/dir/roundtable".into());
    s.timeout_secs = 0.0;
    let problems = validate(&s);
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, vec!["argv[0]", "argv[2]", "cwd", "timeout_secs"], "{problems:?}");
    assert!(problems[0].message.contains("not found on PATH"), "{}", problems[0]);
    assert!(problems[1].message.contains("{b}") && problems[1].message.contains("declared: a"), "{}", problems[1]);

    let problems = validate(&spec(&["sh"], json!({"type": "array"})));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "parameters");

    let problems = validate(&spec(&["sh"], json!({"type": "object", "properties": {"a": {"type": "nonsense"}}})));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].message.contains("not a valid JSON Schema"), "{}", problems[0]);

    let problems = validate(&spec(&["{a}"], string_schema()));
    assert_eq!(problems[0].key, "argv[0]");
    assert!(problems[0].message.contains("literal"));

    let problems = validate(&spec(&["./print-argv.sh"], string_schema()));
    assert_eq!(problems[0].key, "argv[0]", "a relative path is not looked up on PATH");
    let mut s = spec(&["./print-argv.sh"], string_schema());
    s.cwd = Some(fixture(""));
    assert!(validate(&s).is_empty(), "{:?}", validate(&s));
    assert!(validate(&spec(&["sh", "-c", "true"], json!({"type": "object"}))).is_empty());
}

#[tokio::test]
async fn a_missing_program_is_an_error_result_not_a_panic() {
    let decl_spec = spec(&["sh"], json!({"type": "object"}));
    let t = tool(decl_spec);
    // The program exists at build time; a tool whose program vanished later fails at run.
    let mut s = spec(&["/no/such/program"], json!({"type": "object"}));
    assert_eq!(validate(&s)[0].key, "argv[0]");
    s.argv = vec!["sh".into(), "-c".into(), "exit 3".into()];
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.exit_status, Some(3));
    assert!(out.output.contains("[exit status 3]"), "{}", out.output);
    let out = call(&t, json!({})).await;
    assert_eq!(out.outcome, Outcome::Ok, "sh with no input exits 0: {}", out.output);
}

#[tokio::test]
async fn a_timeout_kills_the_whole_group_grandchildren_included() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let mut s = spec(
        &[&fixture("spawn-grandchild.sh").display().to_string(), &pid_file.display().to_string(), "hang"],
        json!({"type": "object"}),
    );
    s.timeout_secs = 0.5;
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.exit_status, None);
    assert_eq!(out.signal, Some(9), "killed with SIGKILL");
    assert!(out.output.contains("timed out"), "{}", out.output);
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_gone(pid).await;
}

#[tokio::test]
async fn a_background_grandchild_does_not_outlive_a_command_that_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let s = spec(
        &[&fixture("spawn-grandchild.sh").display().to_string(), &pid_file.display().to_string(), "exit"],
        json!({"type": "object"}),
    );
    // The grandchild holds stdout open; the call must still end when the script does.
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert_eq!(out.exit_status, Some(0));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_gone(pid).await;
}

#[tokio::test]
async fn output_past_the_cap_is_drained_and_dropped() {
    // 64 MiB through a 1000-byte cap: the call ends when the program does, with the
    // cap kept and the rest read and dropped.
    let mut s = spec(&["head", "-c", "67108864", "/dev/zero"], json!({"type": "object"}));
    s.max_stdout_bytes = 1000;
    let out = call(&tool(s), json!({})).await;
    assert_eq!(
        out.outcome,
        Outcome::Ok,
        "the writer was not drained: {}",
        &out.output[out.output.len().saturating_sub(200)..]
    );
    assert!(out.truncated);
    let kept = out.output.split("\n[").next().unwrap();
    assert_eq!(kept.len(), 1000);
    assert!(out.output.ends_with("[stdout cut at 1000 bytes]"), "{:?}", &out.output[1000..]);
}

#[tokio::test]
async fn a_tool_printing_forever_is_cut_at_the_cap_and_killed_at_its_timeout() {
    let mut s = spec(&["yes", "roundtable"], json!({"type": "object"}));
    s.max_stdout_bytes = 4096;
    s.max_stderr_bytes = 10;
    s.timeout_secs = 0.5;
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert!(out.truncated);
    assert_eq!(out.signal, Some(9));
    assert!(out.output.len() < 4096 + 200, "kept {} bytes", out.output.len());
    assert!(out.output.starts_with("roundtable\nroundtable\n"));
    assert!(out.output.contains("[stdout cut at 4096 bytes]"));
    assert!(out.output.contains("timed out after 0.5s"));
}

#[tokio::test]
async fn stderr_follows_stdout_labelled() {
    let s = spec(&["sh", "-c", "echo out; echo err >&2; exit 1"], json!({"type": "object"}));
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.output, "out\n[stderr]\nerr\n[exit status 1]");
    assert!(out.duration_ms.is_some());
}

#[tokio::test]
async fn the_environment_is_cleared_but_the_base_and_the_allow_list() {
    // Cargo sets CARGO_PKG_NAME and CARGO_MANIFEST_DIR for the test process.
    assert!(std::env::var("CARGO_PKG_NAME").is_ok() && std::env::var("CARGO_MANIFEST_DIR").is_ok());
    let mut s = spec(&["env"], json!({"type": "object"}));
    s.env = vec!["CARGO_PKG_NAME".into(), "ROUNDTABLE_SURELY_UNSET_VARIABLE".into()];
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    let names: Vec<&str> = out.output.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    assert!(names.contains(&"CARGO_PKG_NAME"), "{names:?}");
    assert!(names.contains(&"PATH"), "{names:?}");
    assert!(!names.contains(&"CARGO_MANIFEST_DIR"), "a variable not on the list passed: {names:?}");
    assert!(!names.contains(&"ROUNDTABLE_SURELY_UNSET_VARIABLE"));
    let allowed = ["PATH", "HOME", "LANG", "TZ", "CARGO_PKG_NAME"];
    for n in &names {
        assert!(allowed.contains(n) || *n == "PWD" || *n == "SHLVL" || *n == "_", "unexpected variable {n}");
    }
}

#[tokio::test]
async fn stdin_is_null() {
    let s = spec(&["cat"], json!({"type": "object"}));
    let out = call(&tool(s), json!({})).await;
    assert_eq!(out.outcome, Outcome::Ok);
    assert_eq!(out.output, "");
}
