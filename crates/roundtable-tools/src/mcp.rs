//! The `mcp` tool kind: the tools of an MCP server, through the official SDK (`rmcp`).
//!
//! [`McpServer::start`] connects (a child process over stdin/stdout, or streamable
//! HTTP), initializes and lists the server's tools, each within the spec's timeout. The
//! list ([`McpServer::tools`], the allowed ones) is data the runtime records on the log;
//! [`McpServer::into_tools`] makes each a [`Tool`].
//!
//! - A server that cannot be started, does not answer `initialize` in time (it hangs,
//!   or prints something that is not MCP), or fails to list its tools is an
//!   [`McpError`] whose message says which and quotes what it printed.
//! - Calls have the spec's timeout and output cap. A result flagged `isError` and a
//!   JSON-RPC error are `error` outcomes.
//! - A server whose connection is found closed (it died) is restarted once, the next
//!   time it is called; a call whose request could not even be sent is then sent to
//!   the restarted server (it never reached the dead one). A call in flight when the
//!   server dies fails (its effect is unknown) and the restart happens on the next.
//!   After the one restart, calls fail as error results.
//! - A stdio server leads its own process group, which is killed with `SIGKILL` when
//!   the server is dropped (or restarted), so nothing it started outlives it.

use std::collections::HashMap;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{Peer, ServiceError, ServiceExt};
use roundtable_core::tool::{
    HeaderValue, McpSpec, McpTransport, Outcome, Tool, ToolContext, ToolDef, ToolOutput, ToolSpec,
};
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, Command};

use crate::command::{BASE_ENV, find_program};
use crate::{Problem, check_limits, duration_from_secs};

/// Bytes of a server's stdout and stderr kept to explain a failed start.
const EXCERPT_BYTES: usize = 600;

/// Why a server could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpError {
    kind: McpErrorKind,
    message: String,
}

/// What went wrong with a server, for callers that match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum McpErrorKind {
    /// The spec is wrong (found before anything ran).
    Config,
    /// The process could not be started or the URL not reached.
    Start,
    /// `initialize` failed: no answer in time, or an answer that is not MCP.
    Initialize,
    /// Listing the tools failed.
    ListTools,
}

impl McpError {
    fn new(kind: McpErrorKind, message: impl Into<String>) -> Self {
        McpError { kind, message: message.into() }
    }
    pub fn kind(&self) -> McpErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for McpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for McpError {}

/// Everything wrong with an MCP spec, each with the key it concerns. A stdio server's
/// program is looked up on `PATH`.
pub fn validate(spec: &McpSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    match &spec.transport {
        McpTransport::Stdio { command, env, cwd } => {
            match command.first() {
                None => problems.push(Problem::new("transport.command", "is empty: it needs the program to run")),
                Some(program) => {
                    if let Err(m) = find_program(program, cwd.as_deref()) {
                        problems.push(Problem::new("transport.command[0]", m));
                    }
                }
            }
            if command.iter().any(|c| c.contains('\0')) {
                problems.push(Problem::new("transport.command", "holds a NUL byte"));
            }
            if let Some(cwd) = cwd
                && !cwd.is_dir()
            {
                problems.push(Problem::new("transport.cwd", format!("{} is not a directory", cwd.display())));
            }
            for (i, name) in env.iter().enumerate() {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    problems
                        .push(Problem::new(format!("transport.env[{i}]"), format!("{name:?} is not a variable name")));
                }
            }
        }
        McpTransport::Http { url, headers } => {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => problems
                    .push(Problem::new("transport.url", format!("scheme {:?} is not http or https", u.scheme()))),
                Err(e) => problems.push(Problem::new("transport.url", format!("not a valid URL: {e}"))),
            }
            for (name, value) in headers {
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    problems.push(Problem::new(format!("transport.headers.{name}"), "is not a valid header name"));
                }
                if let HeaderValue::Env(var) = value
                    && (var.is_empty() || var.contains('='))
                {
                    problems.push(Problem::new(
                        format!("transport.headers.{name}"),
                        format!("{var:?} is not a variable name"),
                    ));
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, name) in spec.allow.iter().enumerate() {
        if !seen.insert(name) {
            problems.push(Problem::new(format!("allow[{i}]"), format!("{name:?} is listed twice")));
        }
    }
    check_limits(&mut problems, spec.timeout_secs, &[("max_output_bytes", spec.max_output_bytes)]);
    problems
}

/// A running MCP server and the tools it offers.
pub struct McpServer {
    name: String,
    spec: McpSpec,
    idempotent: bool,
    timeout: Duration,
    tools: Vec<ToolDef>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer").field("name", &self.name).field("tools", &self.tools).finish_non_exhaustive()
    }
}

struct State {
    conn: Option<Arc<Connection>>,
    restarts_left: u32,
    /// Why the server cannot be used any more.
    gone: Option<String>,
}

/// One connection: the service loop and, for stdio, the child.
struct Connection {
    service: RunningService<RoleClient, ()>,
    child: Option<StdMutex<ChildGuard>>,
}

impl Connection {
    fn peer(&self) -> Peer<RoleClient> {
        self.service.peer().clone()
    }

    fn is_dead(&self) -> bool {
        if self.service.is_closed() || self.service.peer().is_transport_closed() {
            return true;
        }
        match &self.child {
            Some(child) => match child.lock() {
                Ok(mut c) => !matches!(c.child.try_wait(), Ok(None)),
                Err(_) => true,
            },
            None => false,
        }
    }
}

/// A child process that leads its own group; the group is killed when this is dropped.
struct ChildGuard {
    child: Child,
    pgid: Option<Pid>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }
}

/// Keeps the first bytes read through it, to quote a server that printed garbage.
struct Sniff<R> {
    inner: R,
    seen: Arc<StdMutex<Vec<u8>>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Sniff<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let new = &buf.filled()[before..];
            if let Ok(mut seen) = self.seen.lock() {
                let room = EXCERPT_BYTES.saturating_sub(seen.len());
                seen.extend_from_slice(&new[..new.len().min(room)]);
            }
        }
        poll
    }
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!("{text:?}") }
}

impl McpServer {
    /// Connects to the server of `tool` (whose kind is `mcp`), initializes it and lists
    /// its tools. Fails with a clear error, never hangs past the spec's timeout.
    pub async fn start(tool: &ToolSpec, spec: &McpSpec) -> Result<Arc<McpServer>, McpError> {
        let problems = validate(spec);
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(McpError::new(McpErrorKind::Config, format!("MCP server {}: {}", tool.name, list.join("; "))));
        }
        let timeout = duration_from_secs(spec.timeout_secs)
            .ok_or_else(|| McpError::new(McpErrorKind::Config, "timeout_secs must be a positive number"))?;
        let conn = connect(&tool.name, spec, timeout).await?;
        let listed = match tokio::time::timeout(timeout, conn.service.peer().list_all_tools()).await {
            Ok(Ok(tools)) => tools,
            Ok(Err(e)) => {
                return Err(McpError::new(
                    McpErrorKind::ListTools,
                    format!("MCP server {}: listing its tools failed: {e}", tool.name),
                ));
            }
            Err(_) => {
                return Err(McpError::new(
                    McpErrorKind::ListTools,
                    format!("MCP server {}: listing its tools took longer than {}s", tool.name, spec.timeout_secs),
                ));
            }
        };
        let mut tools = Vec::new();
        for t in &listed {
            if spec.allow.is_empty() || spec.allow.iter().any(|a| a == t.name.as_ref()) {
                tools.push(ToolDef {
                    name: t.name.to_string(),
                    description: t.description.as_deref().or(t.title.as_deref()).unwrap_or_default().to_owned(),
                    parameters: Value::Object((*t.input_schema).clone()),
                });
            }
        }
        let missing: Vec<&str> = spec
            .allow
            .iter()
            .filter(|a| !listed.iter().any(|t| t.name.as_ref() == a.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let offered: Vec<&str> = listed.iter().map(|t| t.name.as_ref()).collect();
            return Err(McpError::new(
                McpErrorKind::ListTools,
                format!(
                    "MCP server {}: allow names tools it does not offer: {} (it offers: {})",
                    tool.name,
                    missing.join(", "),
                    offered.join(", ")
                ),
            ));
        }
        Ok(Arc::new(McpServer {
            name: tool.name.clone(),
            spec: spec.clone(),
            idempotent: tool.idempotent,
            timeout,
            tools,
            state: tokio::sync::Mutex::new(State { conn: Some(Arc::new(conn)), restarts_left: 1, gone: None }),
        }))
    }

    /// The name the server was declared under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The allowed tools as listed when the server started.
    pub fn tools(&self) -> &[ToolDef] {
        &self.tools
    }

    /// Each allowed tool as a [`Tool`].
    pub fn into_tools(self: &Arc<Self>) -> Vec<Arc<dyn Tool>> {
        self.tools
            .iter()
            .map(|def| Arc::new(McpTool { server: Arc::clone(self), def: def.clone() }) as Arc<dyn Tool>)
            .collect()
    }

    /// A live connection: the current one, or a restarted one when it died and the
    /// restart is still unused.
    async fn live(&self) -> Result<Arc<Connection>, String> {
        let mut state = self.state.lock().await;
        if let Some(why) = &state.gone {
            return Err(why.clone());
        }
        if let Some(conn) = &state.conn
            && !conn.is_dead()
        {
            return Ok(Arc::clone(conn));
        }
        state.conn = None;
        if state.restarts_left == 0 {
            let why =
                format!("MCP server {} died and was restarted once already; its calls fail from now on", self.name);
            state.gone = Some(why.clone());
            return Err(why);
        }
        state.restarts_left -= 1;
        tracing::warn!(server = %self.name, "MCP server died; restarting it (once)");
        match connect(&self.name, &self.spec, self.timeout).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                state.conn = Some(Arc::clone(&conn));
                Ok(conn)
            }
            Err(e) => {
                let why = format!("MCP server {} died and could not be restarted: {}", self.name, e.message());
                state.gone = Some(why.clone());
                Err(why)
            }
        }
    }

    async fn mark_dead(&self, conn: &Arc<Connection>) {
        let mut state = self.state.lock().await;
        if state.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            state.conn = None;
        }
    }

    async fn call(&self, tool: &str, arguments: &Value) -> ToolOutput {
        let start = Instant::now();
        let arguments = match arguments {
            Value::Object(map) => Some(map.clone()),
            Value::Null => None,
            _ => return ToolOutput::refused("arguments must be a JSON object"),
        };
        let mut out = self.call_once(tool, arguments, start).await;
        out.duration_ms = Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        out
    }

    async fn call_once(
        &self,
        tool: &str,
        arguments: Option<serde_json::Map<String, Value>>,
        start: Instant,
    ) -> ToolOutput {
        let mut resent = false;
        loop {
            let conn = match self.live().await {
                Ok(c) => c,
                Err(why) => return ToolOutput::error(why),
            };
            let mut params = CallToolRequestParams::new(tool.to_owned());
            params.arguments = arguments.clone();
            let left = self.timeout.saturating_sub(start.elapsed());
            let result = tokio::time::timeout(left, conn.peer().call_tool(params)).await;
            match result {
                Err(_) => {
                    return ToolOutput::error(format!(
                        "MCP server {}: {tool} did not answer within {}s",
                        self.name, self.spec.timeout_secs
                    ));
                }
                Ok(Ok(result)) => return self.output(result),
                Ok(Err(ServiceError::McpError(e))) => {
                    return ToolOutput::error(self.cap(format!("MCP error {}: {}", e.code.0, e.message)).0);
                }
                Ok(Err(ServiceError::TransportSend(_))) if !resent => {
                    // Never delivered: the server was already gone. Try the restarted one.
                    self.mark_dead(&conn).await;
                    resent = true;
                }
                Ok(Err(e @ (ServiceError::TransportSend(_) | ServiceError::TransportClosed))) => {
                    self.mark_dead(&conn).await;
                    return ToolOutput::error(format!(
                        "MCP server {} closed the connection during the call ({e}); whether {tool} took effect is unknown",
                        self.name
                    ));
                }
                Ok(Err(e)) => return ToolOutput::error(format!("MCP server {}: {tool} failed: {e}", self.name)),
            }
        }
    }

    /// Text of a result, cut at the cap.
    fn output(&self, result: CallToolResult) -> ToolOutput {
        let mut parts = Vec::new();
        for block in &result.content {
            match block {
                ContentBlock::Text(t) => parts.push(t.text.clone()),
                other => {
                    parts.push(serde_json::to_string(other).unwrap_or_else(|_| "(unprintable content)".to_owned()))
                }
            }
        }
        if parts.is_empty()
            && let Some(structured) = &result.structured_content
        {
            parts.push(structured.to_string());
        }
        let (text, truncated) = self.cap(parts.join("\n"));
        let outcome = if result.is_error == Some(true) { Outcome::Error } else { Outcome::Ok };
        ToolOutput { outcome, output: text, exit_status: None, signal: None, duration_ms: None, truncated }
    }

    fn cap(&self, mut text: String) -> (String, bool) {
        let cap = usize::try_from(self.spec.max_output_bytes).unwrap_or(usize::MAX);
        if text.len() <= cap {
            return (text, false);
        }
        let mut cut = cap;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("\n[output cut at {cap} bytes]"));
        (text, true)
    }
}

/// Starts (stdio) or reaches (HTTP) the server and initializes it.
async fn connect(name: &str, spec: &McpSpec, timeout: Duration) -> Result<Connection, McpError> {
    match &spec.transport {
        McpTransport::Stdio { command, env, cwd } => {
            let Some(program) = command.first() else {
                return Err(McpError::new(McpErrorKind::Config, format!("MCP server {name}: command is empty")));
            };
            let mut cmd = Command::new(program);
            cmd.args(&command[1..]).env_clear();
            for var in BASE_ENV.iter().copied().chain(env.iter().map(String::as_str)) {
                if let Some(value) = std::env::var_os(var) {
                    cmd.env(var, value);
                }
            }
            if let Some(cwd) = cwd {
                cmd.current_dir(cwd);
            }
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.process_group(0).kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| {
                McpError::new(McpErrorKind::Start, format!("MCP server {name}: cannot start {program:?}: {e}"))
            })?;
            let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(McpError::new(McpErrorKind::Start, format!("MCP server {name}: its pipes are missing")));
            };
            let mut guard = ChildGuard { child, pgid };
            let seen_out = Arc::new(StdMutex::new(Vec::new()));
            let seen_err = Arc::new(StdMutex::new(Vec::new()));
            // stderr is drained for as long as the server runs, keeping its start.
            let stderr_task = {
                let seen_err = Arc::clone(&seen_err);
                tokio::spawn(async move {
                    let mut sniff = Sniff { inner: stderr, seen: seen_err };
                    let _ = tokio::io::copy(&mut sniff, &mut tokio::io::sink()).await;
                })
            };
            let read = Sniff { inner: stdout, seen: Arc::clone(&seen_out) };
            let served = tokio::time::timeout(timeout, ().serve((read, stdin))).await;
            let what = match served {
                Ok(Ok(service)) => return Ok(Connection { service, child: Some(StdMutex::new(guard)) }),
                Ok(Err(
                    rmcp::service::ClientInitializeError::ConnectionClosed(_)
                    | rmcp::service::ClientInitializeError::TransportError { .. },
                )) => match guard.child.try_wait() {
                    Ok(Some(status)) => format!("it exited ({status}) before answering initialize"),
                    _ => "it closed its connection before answering initialize".to_owned(),
                },
                Ok(Err(e)) => format!("initialize failed: {}", init_error(&e)),
                Err(_) => format!("no MCP answer to initialize within {}s", spec.timeout_secs),
            };
            drop(guard);
            // The group is dead, so stderr ends: let its reader finish to quote it.
            let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
            let out = seen_out.lock().map(|s| excerpt(&s)).unwrap_or_default();
            let err = seen_err.lock().map(|s| excerpt(&s)).unwrap_or_default();
            let mut msg = format!("MCP server {name}: {what}");
            if !out.is_empty() {
                msg.push_str(&format!("; it printed {out}"));
            }
            if !err.is_empty() {
                msg.push_str(&format!("; its stderr: {err}"));
            }
            Err(McpError::new(McpErrorKind::Initialize, msg))
        }
        McpTransport::Http { url, headers } => {
            let client = crate::http::http_client().map_err(|m| McpError::new(McpErrorKind::Start, m))?;
            let mut custom = HashMap::new();
            for (header, value) in headers {
                let text = match value {
                    HeaderValue::Value(v) => v.clone(),
                    HeaderValue::Env(var) => std::env::var(var).map_err(|_| {
                        McpError::new(
                            McpErrorKind::Config,
                            format!("MCP server {name}: header {header}: environment variable {var} is not set"),
                        )
                    })?,
                };
                let hn = reqwest::header::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                    McpError::new(McpErrorKind::Config, format!("MCP server {name}: {header:?} is not a header name"))
                })?;
                let mut hv = reqwest::header::HeaderValue::from_str(&text).map_err(|_| {
                    McpError::new(
                        McpErrorKind::Config,
                        format!("MCP server {name}: header {header} has characters a header cannot carry"),
                    )
                })?;
                if matches!(value, HeaderValue::Env(_)) {
                    hv.set_sensitive(true);
                }
                custom.insert(hn, hv);
            }
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(custom);
            let transport = StreamableHttpClientTransport::with_client(client, config);
            match tokio::time::timeout(timeout, ().serve(transport)).await {
                Ok(Ok(service)) => Ok(Connection { service, child: None }),
                Ok(Err(e)) => Err(McpError::new(
                    McpErrorKind::Initialize,
                    format!("MCP server {name}: initialize failed: {}", init_error(&e)),
                )),
                Err(_) => Err(McpError::new(
                    McpErrorKind::Initialize,
                    format!("MCP server {name}: no MCP answer to initialize within {}s", spec.timeout_secs),
                )),
            }
        }
    }
}

/// Why `initialize` failed, without the transport's type names.
fn init_error(e: &rmcp::service::ClientInitializeError) -> String {
    match e {
        rmcp::service::ClientInitializeError::TransportError { error, .. } => chain(error.error.as_ref()),
        other => other.to_string(),
    }
}

/// An error and its sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// One tool of an MCP server.
struct McpTool {
    server: Arc<McpServer>,
    def: ToolDef,
}

#[async_trait]
impl Tool for McpTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn idempotent(&self) -> bool {
        self.server.idempotent
    }

    async fn call(&self, arguments: &Value, _ctx: &ToolContext) -> ToolOutput {
        self.server.call(&self.def.name, arguments).await
    }
}
