//! MCP servers: the reference server `@modelcontextprotocol/server-everything` over
//! stdio (installed by `scripts/test.sh` into `target/npm`), and fake servers that
//! print garbage, hang at initialize, or exit after their first call.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{ctx, fixture, wait_gone, wait_lines};
use roundtable_core::tool::{McpSpec, McpTransport, Outcome, Tool, ToolKind, ToolSpec};
use roundtable_tools::Registry;
use roundtable_tools::mcp::{McpErrorKind, McpServer};
use serde_json::json;

/// The npm packages the tests run, as pinned in `scripts/test.sh`.
fn npm_bin(name: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/npm/node_modules/.bin");
    let bin = root.join(name);
    assert!(
        bin.exists(),
        "{} is missing: the MCP tests need node, npm and the reference servers. Run scripts/test.sh, or \
         `npm install --prefix target/npm @modelcontextprotocol/server-everything@2026.8.31 \
         @modelcontextprotocol/server-filesystem@2026.8.31` from the repository root",
        bin.display()
    );
    bin.display().to_string()
}

fn decl(name: &str, command: Vec<String>, timeout_secs: f64) -> (ToolSpec, McpSpec) {
    let spec = McpSpec {
        transport: McpTransport::Stdio { command, env: Vec::new(), cwd: None },
        allow: Vec::new(),
        timeout_secs,
        max_output_bytes: 64 * 1024,
    };
    let tool = ToolSpec {
        name: name.into(),
        description: String::new(),
        idempotent: false,
        approve_by: None,
        kind: ToolKind::Mcp(spec.clone()),
    };
    (tool, spec)
}

fn everything() -> (ToolSpec, McpSpec) {
    decl("everything", vec![npm_bin("mcp-server-everything"), "stdio".into()], 30.0)
}

fn find(tools: &[Arc<dyn Tool>], name: &str) -> Arc<dyn Tool> {
    tools.iter().find(|t| t.def().name == name).cloned().unwrap_or_else(|| panic!("no tool {name}"))
}

#[tokio::test]
async fn the_reference_server_lists_its_tools_and_answers_calls() {
    let (tool, spec) = everything();
    let server = McpServer::start(&tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = server.tools().iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"echo") && names.contains(&"get-sum"), "{names:?}");
    let echo_def = server.tools().iter().find(|t| t.name == "echo").unwrap();
    assert_eq!(echo_def.parameters["properties"]["message"]["type"], "string");
    assert!(!echo_def.description.is_empty());

    let tools = server.into_tools();
    let out = find(&tools, "echo").call(&json!({"message": "hello; $(rm -rf /)"}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert_eq!(out.output, "Echo: hello; $(rm -rf /)");

    let sum = find(&tools, "get-sum");
    let out = sum.call(&json!({"a": 2, "b": 40}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert!(out.output.contains("42"), "{}", out.output);

    // The server flags bad arguments with an error result.
    let out = sum.call(&json!({"a": 2, "b": "forty"}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Error, "{}", out.output);
    assert!(out.output.contains("expected number"), "{}", out.output);

    // A tool the server does not have is an error too, never a panic.
    let out = server_call_unknown(&tool, &spec).await;
    assert_eq!(out, Outcome::Error);
}

async fn server_call_unknown(tool: &ToolSpec, spec: &McpSpec) -> Outcome {
    let mut spec = spec.clone();
    spec.allow = vec!["echo".into()];
    let server = McpServer::start(tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.tools().len(), 1, "allow keeps only echo");
    let echo = &server.into_tools()[0];
    // echo called without its required argument: the server answers with an error.
    echo.call(&json!({}), &ctx()).await.outcome
}

#[tokio::test]
async fn allow_naming_a_tool_the_server_lacks_is_a_clear_error() {
    let (tool, mut spec) = everything();
    spec.allow = vec!["echo".into(), "launch-missiles".into()];
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::ListTools);
    assert!(err.message().contains("launch-missiles") && err.message().contains("it offers: echo"), "{err}");
}

#[tokio::test]
async fn output_is_cut_at_the_cap() {
    let (tool, mut spec) = everything();
    spec.max_output_bytes = 10;
    let server = McpServer::start(&tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    let out = find(&server.into_tools(), "echo").call(&json!({"message": "abcdefghijklmnop"}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok);
    assert!(out.truncated);
    assert_eq!(out.output, "Echo: abcd\n[output cut at 10 bytes]");
}

#[tokio::test]
async fn a_server_that_prints_garbage_fails_to_start_saying_what_it_printed() {
    let (tool, spec) = decl("garbage", vec![fixture("garbage-server.sh").display().to_string()], 1.0);
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::Initialize);
    assert!(err.message().contains("no MCP answer to initialize within 1s"), "{err}");
    assert!(err.message().contains("hello, this is not MCP"), "{err}");
}

#[tokio::test]
async fn a_server_that_hangs_at_initialize_times_out_and_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let (tool, spec) = decl(
        "hangs",
        vec!["sh".into(), "-c".into(), format!("echo $$ > {}; exec sleep 1000", pid_file.display())],
        0.5,
    );
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::Initialize);
    assert!(err.message().starts_with("MCP server hangs: no MCP answer to initialize within 0.5s"), "{err}");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_gone(pid).await;
}

#[tokio::test]
async fn a_server_that_will_not_start_is_a_clear_error() {
    let (tool, spec) = decl("missing", vec!["/no/such/mcp-server".into()], 1.0);
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::Config);
    assert!(err.message().contains("/no/such/mcp-server is not an executable file"), "{err}");

    let (tool, spec) = decl("exits", vec!["sh".into(), "-c".into(), "echo broken >&2; exit 1".into()], 5.0);
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::Initialize);
    assert!(err.message().contains("broken"), "stderr is quoted: {err}");
    assert!(err.message().starts_with("MCP server exits: it "), "{err}");
}

#[tokio::test]
async fn a_server_that_dies_is_restarted_once_then_its_calls_fail() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let (tool, spec) = decl(
        "fragile",
        vec!["node".into(), fixture("dies-after-first-call.js").display().to_string(), starts.display().to_string()],
        10.0,
    );
    let server = McpServer::start(&tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    let once = find(&server.into_tools(), "once");

    let first = wait_lines(&starts, 1).await;
    let out = once.call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert_eq!(out.output, format!("answered by {}", first[0]));
    wait_gone(first[0].parse().unwrap()).await;

    // Dead: restarted (the one restart), and the call goes to the new process.
    let out = once.call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    let both = wait_lines(&starts, 2).await;
    assert_eq!(out.output, format!("answered by {}", both[1]));
    wait_gone(both[1].parse().unwrap()).await;

    // Dead again: no second restart.
    for _ in 0..2 {
        let out = once.call(&json!({}), &ctx()).await;
        assert_eq!(out.outcome, Outcome::Error, "{}", out.output);
        assert!(out.output.contains("restarted once already"), "{}", out.output);
    }
    assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 2, "started more than twice");
}

#[tokio::test]
async fn dropping_the_server_kills_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let (tool, spec) = decl(
        "dropped",
        vec!["node".into(), fixture("dies-after-first-call.js").display().to_string(), starts.display().to_string()],
        10.0,
    );
    let server = McpServer::start(&tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    let pid: i32 = wait_lines(&starts, 1).await[0].parse().unwrap();
    assert!(!common::process_gone(pid));
    drop(server);
    wait_gone(pid).await;
}

#[tokio::test]
async fn the_registry_starts_a_server_once_and_shares_it() {
    let (everything_tool, mut everything_spec) = everything();
    everything_spec.allow = vec!["echo".into(), "get-sum".into()];
    let everything_tool = ToolSpec { kind: ToolKind::Mcp(everything_spec), ..everything_tool };
    let fs_root = tempfile::tempdir().unwrap();
    std::fs::write(fs_root.path().join("note.txt"), "the fact").unwrap();
    let (fs_tool, mut fs_spec) =
        decl("files", vec![npm_bin("mcp-server-filesystem"), fs_root.path().display().to_string()], 30.0);
    fs_spec.allow = vec!["read_text_file".into()];
    let fs_tool = ToolSpec { kind: ToolKind::Mcp(fs_spec), ..fs_tool };
    let command = ToolSpec {
        name: "say".into(),
        description: "prints".into(),
        idempotent: true,
        approve_by: None,
        kind: ToolKind::Command(roundtable_core::tool::CommandSpec {
            argv: vec!["echo".into(), "{word}".into()],
            parameters: json!({"type": "object", "properties": {"word": {"type": "string"}}}),
            cwd: None,
            env: Vec::new(),
            timeout_secs: 5.0,
            max_stdout_bytes: 100,
            max_stderr_bytes: 100,
        }),
    };
    let registry = Registry::build(&[everything_tool, fs_tool, command]).await.unwrap_or_else(|e| panic!("{e}"));
    let granted: Vec<&str> = registry.granted("everything").iter().map(|t| t.def().name.as_str()).collect();
    assert_eq!(granted, vec!["echo", "get-sum"]);
    assert_eq!(registry.granted("say").len(), 1);
    assert!(registry.granted("say")[0].idempotent());
    assert!(registry.granted("nothing").is_empty());
    let tool_box = registry.tool_box();
    let boxed: Vec<&str> = tool_box.get("everything").iter().map(|t| t.def().name.as_str()).collect();
    assert_eq!(boxed, vec!["echo", "get-sum"]);
    assert_eq!(tool_box.grants().collect::<Vec<_>>(), vec!["everything", "files", "say"]);
    let listings = registry.mcp_listings();
    assert_eq!(listings.len(), 2);
    assert_eq!(listings[1].0, "files");
    let path = fs_root.path().join("note.txt").display().to_string();
    let read = registry.get("read_text_file").expect("read_text_file");
    let out = read.call(&json!({"path": path}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert_eq!(out.output, "the fact");
    let out = registry.get("say").unwrap().call(&json!({"word": "hi"}), &ctx()).await;
    assert_eq!(out.output, "hi\n");
}

#[tokio::test]
async fn two_tools_of_the_same_name_are_refused() {
    let (a, mut spec) = everything();
    spec.allow = vec!["echo".into()];
    let a = ToolSpec { kind: ToolKind::Mcp(spec.clone()), ..a };
    let b = ToolSpec { name: "again".into(), ..a.clone() };
    let err = Registry::build(&[a, b]).await.unwrap_err();
    assert_eq!(err.to_string(), "tools.everything and tools.again both offer a tool named \"echo\"");
}

#[tokio::test]
async fn the_reference_server_over_streamable_http() {
    use tokio::io::AsyncBufReadExt;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(npm_bin("mcp-server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mcp-server-everything");
    // Ready when it says it listens (it prints nothing else first that matters).
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        match lines.next_line().await.unwrap() {
            Some(line) if line.contains("listening on port") => break,
            Some(_) => {}
            None => panic!("mcp-server-everything exited before listening"),
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let spec = McpSpec {
        transport: McpTransport::Http { url: format!("http://127.0.0.1:{port}/mcp"), headers: Default::default() },
        allow: vec!["echo".into()],
        timeout_secs: 30.0,
        max_output_bytes: 1024,
    };
    let tool = ToolSpec {
        name: "remote".into(),
        description: String::new(),
        idempotent: false,
        approve_by: None,
        kind: ToolKind::Mcp(spec.clone()),
    };
    let server = McpServer::start(&tool, &spec).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.tools().len(), 1);
    let out = server.into_tools()[0].call(&json!({"message": "over http"}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    assert_eq!(out.output, "Echo: over http");
    drop(server);
    let _ = child.kill().await;
}

#[tokio::test]
async fn an_http_server_that_is_not_there_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = McpSpec {
        transport: McpTransport::Http { url: format!("http://127.0.0.1:{port}/mcp"), headers: Default::default() },
        allow: Vec::new(),
        timeout_secs: 5.0,
        max_output_bytes: 1024,
    };
    let tool = ToolSpec {
        name: "nowhere".into(),
        description: String::new(),
        idempotent: false,
        approve_by: None,
        kind: ToolKind::Mcp(spec.clone()),
    };
    let err = McpServer::start(&tool, &spec).await.unwrap_err();
    assert_eq!(err.kind(), McpErrorKind::Initialize);
    assert!(err.message().starts_with("MCP server nowhere: initialize failed"), "{err}");
    assert!(err.message().contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.message().contains("rmcp::"), "no type names: {err}");
}
