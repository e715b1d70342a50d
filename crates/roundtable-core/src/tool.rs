//! Tools: what a peer can do besides talking, and the record of what it did.
//!
//! A model sees a tool as a [`ToolDef`] (name, description, JSON Schema of its
//! arguments) and asks for it with a [`ToolCall`]. The peer records the call as a
//! `tool_call` envelope ([`ToolCallBody`]) *before* the tool runs and its result as a
//! `tool_result` envelope ([`ToolResultBody`]) after, so the log says what was done,
//! by whom, and whether it finished:
//!
//! - resume and replay never run a call whose result is on the log;
//! - a call with no result after a crash runs again only if its tool is idempotent;
//!   otherwise the peer records [`Outcome::Unknown`] and its model decides.
//!
//! An MCP server's tools are whatever the server lists when it starts, so the list is
//! recorded too: a `tool_list` envelope ([`ToolListBody`], [`record_listing`]) per
//! server, before any peer runs, saying what the models were offered (or why the server
//! could not be started).
//!
//! What a tool needs to run (a command, a URL, a secret) comes from the peer's own team
//! file ([`ToolSpec`]), never from the log or the wire. Tools that do I/O are
//! implemented outside this crate (`roundtable-tools`) behind the [`Tool`] trait.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient};
use crate::log::{LogError, SessionLog};

/// A tool as a model sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments (an object schema).
    pub parameters: serde_json::Value,
}

/// Whether and which tools the model may call in this request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides (the default when tools are offered).
    #[default]
    Auto,
    /// No tool call: text only.
    None,
    /// At least one tool call.
    Required,
    /// This tool.
    Named(String),
}

/// A tool call the model asked for. Provider wire types never leave the provider: this
/// is what they become.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call (echoed back with its result). Offline models
    /// make one up.
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them: JSON text, possibly invalid (the runtime
    /// parses and validates them; an invalid one goes back to the model as an error).
    pub arguments: String,
}

/// The body (`json`) of a `tool_call` envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallBody {
    pub tool: String,
    /// The provider's call id.
    pub call_id: String,
    /// The arguments as written by the model (JSON text).
    pub arguments: String,
    /// What the model said along with its calls, on the first call of that answer
    /// (empty: nothing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub said: String,
}

/// How a tool call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The tool ran and reported success.
    Ok,
    /// The tool ran and reported failure (a non-zero exit, an HTTP error, an MCP error
    /// result), or could not be started, or timed out.
    Error,
    /// The call was refused before anything ran: a tool the peer was not granted,
    /// arguments that do not match the schema, a limit reached.
    Refused,
    /// The approving peer denied the call.
    Denied,
    /// The call was recorded but its result never was (the process died while it ran)
    /// and the tool is not idempotent: it may or may not have taken effect.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::Denied => "denied",
            Outcome::Unknown => "outcome unknown",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body (`json`) of a `tool_result` envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResultBody {
    pub tool: String,
    pub call_id: String,
    pub outcome: Outcome,
    /// What the model is told: the tool's output, or why there is none.
    pub output: String,
    /// A command's exit status (`None` when killed by a signal or not a command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The signal that ended a command (a timeout kills with `SIGKILL`, 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub duration_ms: u64,
    /// Whether output was cut at the tool's cap.
    #[serde(default)]
    pub truncated: bool,
}

impl ToolResultBody {
    /// How the call ended, for people: `ok · exit 0 · 12 ms`, `error · signal 9 ·
    /// 10000 ms · output cut`, `outcome unknown`.
    pub fn status(&self) -> String {
        let mut parts = vec![self.outcome.as_str().to_owned()];
        if let Some(code) = self.exit_status {
            parts.push(format!("exit {code}"));
        }
        if let Some(sig) = self.signal {
            parts.push(format!("signal {sig}"));
        }
        if self.outcome != Outcome::Unknown {
            parts.push(format!("{} ms", self.duration_ms));
        }
        if self.truncated {
            parts.push("output cut".to_owned());
        }
        parts.join(" · ")
    }
}

/// The body (`json`) of a `tool_list` envelope: what one MCP server offered when a
/// process started it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolListBody {
    /// The name the server is declared under (`[tools.NAME]`): the grant peers hold.
    pub server: String,
    /// The tools it listed that the team allows (all of them without `allow`), as the
    /// models are offered them. Empty when it could not be started.
    pub tools: Vec<ToolDef>,
    /// Why the server could not be started or listed; the process that tried stops
    /// without running its peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ToolListBody {
    /// One line for people: `docs listed read_text_file, list_directory`.
    pub fn describe(&self) -> String {
        match &self.error {
            Some(e) => format!("MCP server {} could not be started: {e}", self.server),
            None if self.tools.is_empty() => format!("MCP server {} listed no tools", self.server),
            None => {
                let names: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
                format!("MCP server {} listed {} tools: {}", self.server, names.len(), names.join(", "))
            }
        }
    }
}

/// The step of the `n`-th listing (from 1) of `server` on a log.
pub fn listing_step(server: &str, n: usize) -> String {
    format!("tools/{server}/{n}")
}

/// Record what an MCP server listed (or why it could not start) as a `tool_list`
/// envelope from `from`, unless the latest listing of that server on the log says the
/// same. The step is `tools/{server}/{n}` with `n` one more than the listings already
/// recorded, and the id is collective: processes starting the same session at once
/// (over NATS each builds the team's tools) record one listing, and a `resume` records
/// a new one only when the server now offers something else, so the log shows when the
/// tools the models were offered changed. Returns the listing's sequence number, or
/// `None` when nothing new was recorded.
pub async fn record_listing(
    log: &dyn SessionLog,
    from: &PeerId,
    listing: &ToolListBody,
) -> Result<Option<u64>, LogError> {
    let entries = log.read_all().await?;
    let earlier: Vec<ToolListBody> = entries
        .iter()
        .filter(|e| e.env.kind == Kind::ToolList)
        .filter_map(|e| serde_json::from_value::<ToolListBody>(e.env.body.json.clone()?).ok())
        .filter(|b| b.server == listing.server)
        .collect();
    if earlier.last() == Some(listing) {
        return Ok(None);
    }
    let step = listing_step(&listing.server, earlier.len() + 1);
    let id = EnvelopeId::derive(log.session(), &PeerId::from("*"), &step);
    let body = Body::text(listing.describe()).with_json(serde_json::to_value(listing).expect("a listing serializes"));
    let mut env = Envelope::with_id(id, log.session(), from, Arc::from(step), Kind::ToolList, Recipient::All, body);
    env.lamport = entries.iter().map(|e| e.env.lamport).max().unwrap_or(0) + 1;
    let appended = log.append(env).await?;
    Ok((!appended.duplicate).then_some(appended.seq))
}

/// Why a `tool_list` envelope is not one the team's processes could have recorded, if
/// it is not: its body is not a listing, it lists a server the plan declares no MCP
/// server under, its author is not granted that server (a process records a listing in
/// the name of a peer it runs that is granted the server; only a server no peer is
/// granted may be recorded by any peer of the team), or its step and id are not
/// the collective `tools/{server}/{n}` ones. Readers that take envelopes from others (a
/// NATS log) reject such a listing at its place, and replay ignores it, so a listing
/// forged by a peer that does not hold the server (or by anyone, in an unsigned
/// session) is never taken as what the models were offered. It never changes what a
/// peer can call in any case: the tools a process runs are built from its own plan.
pub fn listing_rejected(plan: &crate::team::TeamPlan, env: &Envelope) -> Option<String> {
    if env.kind != Kind::ToolList {
        return None;
    }
    let Some(body) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolListBody>(j).ok()) else {
        return Some(format!("tool_list {} from {} has no listing in its body", env.step, env.from));
    };
    let server = &body.server;
    if !plan.tools.get(server).is_some_and(|t| matches!(t.kind, ToolKind::Mcp(_))) {
        return Some(format!(
            "tool_list {} from {} lists `{server}`, which is no MCP server of the team",
            env.step, env.from
        ));
    }
    let granted = |p: &crate::team::PeerSpec| p.tools.iter().any(|t| t == server);
    // A server no peer is granted is recorded by any peer of the team that started it.
    let held = plan.peers.iter().any(granted);
    if !plan.peer(&env.from).is_some_and(|p| granted(p) || !held) {
        return Some(format!(
            "tool_list {} from {}: {} is not granted the MCP server `{server}`, so no process records its listing in {}'s name",
            env.step, env.from, env.from, env.from
        ));
    }
    let numbered = env
        .step
        .strip_prefix("tools/")
        .and_then(|r| r.strip_prefix(server.as_str()))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n >= 1 && *env.step == *listing_step(server, n));
    if !numbered || env.id != EnvelopeId::derive(&env.session, &PeerId::from("*"), &env.step) {
        return Some(format!(
            "tool_list {} from {} is not at a listing step of `{server}` with the collective id",
            env.step, env.from
        ));
    }
    None
}

/// The body (`json`) of an `approval` envelope asking a peer to approve a tool call
/// (step `{duty}/approve/{k}`, addressed to the approver, written before the call runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub tool: String,
    pub arguments: String,
    /// The peer whose model asked for the call.
    pub caller: PeerId,
    /// The `tool_call` envelope's step.
    pub call_step: String,
}

/// The body (`json`) of an `approval` envelope answering a request (step
/// `{request}/answer`): by the approver, or by the caller when the approver's answer
/// limit passed (`timeout`). The first answer on the log decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalAnswer {
    pub approve: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timeout: bool,
}

/// What a tool returns when it ran (or could not run).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolOutput {
    pub outcome: Outcome,
    pub output: String,
    /// A command's exit status.
    pub exit_status: Option<i32>,
    /// The signal that ended a command.
    pub signal: Option<i32>,
    /// How long the tool itself ran, when it measured that (the runtime measures the
    /// call otherwise).
    pub duration_ms: Option<u64>,
    pub truncated: bool,
}

impl ToolOutput {
    fn with(outcome: Outcome, output: String) -> Self {
        ToolOutput { outcome, output, exit_status: None, signal: None, duration_ms: None, truncated: false }
    }
    pub fn ok(output: impl Into<String>) -> Self {
        ToolOutput::with(Outcome::Ok, output.into())
    }
    pub fn error(output: impl Into<String>) -> Self {
        ToolOutput::with(Outcome::Error, output.into())
    }
    pub fn refused(output: impl Into<String>) -> Self {
        ToolOutput::with(Outcome::Refused, output.into())
    }
}

/// Who is calling, for tools that act on the session (the built-ins) and for logs.
#[derive(Clone, Debug)]
pub struct ToolContext {
    pub peer: PeerId,
    /// The protocol step of the call (its envelope's step).
    pub step: Arc<str>,
}

/// A tool a peer can run. Implementations do the I/O; the peer records the call and
/// the result and enforces grants and budgets.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    fn def(&self) -> &ToolDef;
    /// Whether running a call twice is harmless (then a call interrupted by a crash is
    /// run again on resume; otherwise its outcome is recorded as unknown).
    fn idempotent(&self) -> bool;
    /// Run one call. `arguments` were validated against `def().parameters`. Never
    /// panics on bad input; every failure is a [`ToolOutput`] with an error outcome.
    async fn call(&self, arguments: &serde_json::Value, ctx: &ToolContext) -> ToolOutput;
}

/// A tool declared in a team file (`[tools.NAME]`): everything needed to run it comes
/// from here, never from the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// A call interrupted by a crash may be run again.
    #[serde(default)]
    pub idempotent: bool,
    /// A peer that must approve each call before it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approve_by: Option<PeerId>,
    #[serde(flatten)]
    pub kind: ToolKind,
}

/// What a declared tool is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToolKind {
    /// A program run without a shell, its argv filled from validated arguments.
    Command(CommandSpec),
    /// An HTTP request.
    Http(HttpSpec),
    /// The tools of an MCP server.
    Mcp(McpSpec),
    /// A peer-to-peer mechanism of the runtime itself.
    Builtin { builtin: Builtin },
}

/// A command tool: `argv` elements may contain `{arg}` placeholders filled from the
/// call's arguments (validated against `parameters` first). An element that is exactly
/// `{arg}` becomes exactly one argv element whatever the value; a value that would
/// start an element with `-` is refused unless the template puts `--` before it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    /// JSON Schema (an object) of the arguments.
    pub parameters: serde_json::Value,
    /// Working directory (resolved against the team file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<std::path::PathBuf>,
    /// Environment variables passed through from the runtime's environment; nothing
    /// else is (but `PATH`, `HOME`, `LANG` and `TZ`).
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout_secs: f64,
    /// Bytes of stdout kept (the rest is read and dropped; `truncated` is set).
    pub max_stdout_bytes: u64,
    pub max_stderr_bytes: u64,
}

/// An HTTP tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpSpec {
    /// GET, POST, PUT, PATCH or DELETE.
    pub method: String,
    /// `{arg}` placeholders are filled percent-encoded; the scheme and host must be
    /// literal (never filled from arguments).
    pub url: String,
    /// Headers: a literal value, or the name of an environment variable holding it.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValue>,
    pub parameters: serde_json::Value,
    /// Arguments not used in the URL are sent as a JSON body (POST, PUT, PATCH).
    pub timeout_secs: f64,
    pub max_response_bytes: u64,
}

/// A header's value: written in the file, or read from the environment when the call
/// is made (and never logged).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderValue {
    Value(String),
    Env(String),
}

/// An MCP server whose tools a peer may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McpSpec {
    pub transport: McpTransport,
    /// Only these of the server's tools (all when empty).
    #[serde(default)]
    pub allow: Vec<String>,
    pub timeout_secs: f64,
    pub max_output_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum McpTransport {
    /// A server started as a child process, speaking over stdin/stdout.
    Stdio {
        command: Vec<String>,
        #[serde(default)]
        env: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<std::path::PathBuf>,
    },
    /// A server reached over streamable HTTP.
    Http {
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, HeaderValue>,
    },
}

/// The runtime's own mechanisms, offered to models as tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    Send,
    Broadcast,
    BoardRead,
    BoardWrite,
    QueuePush,
    QueueClaim,
    QueueDone,
    Finish,
}

impl Builtin {
    pub const ALL: [Builtin; 8] = [
        Builtin::Send,
        Builtin::Broadcast,
        Builtin::BoardRead,
        Builtin::BoardWrite,
        Builtin::QueuePush,
        Builtin::QueueClaim,
        Builtin::QueueDone,
        Builtin::Finish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Builtin::Send => "send",
            Builtin::Broadcast => "broadcast",
            Builtin::BoardRead => "board_read",
            Builtin::BoardWrite => "board_write",
            Builtin::QueuePush => "queue_push",
            Builtin::QueueClaim => "queue_claim",
            Builtin::QueueDone => "queue_done",
            Builtin::Finish => "finish",
        }
    }

    pub fn parse(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.as_str() == name)
    }
}

/// The tools a process built from a plan's `[tools]`, by the name they are granted
/// under (an MCP server's table name grants every tool it lists).
#[derive(Clone, Default)]
pub struct ToolBox {
    grants: BTreeMap<String, Vec<Arc<dyn Tool>>>,
}

impl fmt::Debug for ToolBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.grants.iter().map(|(k, v)| (k, v.iter().map(|t| &t.def().name).collect::<Vec<_>>())))
            .finish()
    }
}

impl ToolBox {
    pub fn new() -> Self {
        ToolBox::default()
    }
    /// Add a tool under a grant name.
    pub fn insert(&mut self, grant: impl Into<String>, tool: Arc<dyn Tool>) {
        self.grants.entry(grant.into()).or_default().push(tool);
    }
    /// The tools a grant name gives (empty when this process has none under it).
    pub fn get(&self, grant: &str) -> &[Arc<dyn Tool>] {
        self.grants.get(grant).map_or(&[], Vec::as_slice)
    }
    pub fn grants(&self) -> impl Iterator<Item = &str> {
        self.grants.keys().map(String::as_str)
    }
}

impl Builtin {
    /// How a model sees this built-in.
    pub fn def(self) -> ToolDef {
        use serde_json::json;
        let (description, parameters) = match self {
            Builtin::Send => (
                "Send a message to one peer or to a group, by name. They will see it in their inbox.",
                json!({"type": "object", "properties": {
                    "to": {"type": "string", "description": "a peer id or a group name"},
                    "text": {"type": "string"}}, "required": ["to", "text"]}),
            ),
            Builtin::Broadcast => (
                "Send a message to every other peer.",
                json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
            ),
            Builtin::BoardRead => (
                "Read a key of the shared blackboard: its value and revision.",
                json!({"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}),
            ),
            Builtin::BoardWrite => (
                "Write a key of the shared blackboard. With expected_revision the write happens only if the key is still at that revision; without it only if the key has no value yet.",
                json!({"type": "object", "properties": {
                    "key": {"type": "string"}, "value": {"type": "string"},
                    "expected_revision": {"type": "integer", "minimum": 1}}, "required": ["key", "value"]}),
            ),
            Builtin::QueuePush => (
                "Add a task to the shared work queue (a task with the same id is added once).",
                json!({"type": "object", "properties": {
                    "id": {"type": "string"}, "task": {"type": "string"}}, "required": ["id", "task"]}),
            ),
            Builtin::QueueClaim => (
                "Take the next task from the shared work queue; nobody else gets it while you hold it.",
                json!({"type": "object", "properties": {}}),
            ),
            Builtin::QueueDone => (
                "Mark a task you claimed as done, with its result.",
                json!({"type": "object", "properties": {
                    "id": {"type": "string"}, "result": {"type": "string"}}, "required": ["id", "result"]}),
            ),
            Builtin::Finish => (
                "Propose the team's final answer. The session ends when the team's finishing rule holds.",
                json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}),
            ),
        };
        ToolDef { name: self.as_str().to_string(), description: description.to_string(), parameters }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SessionId;

    fn plan(grants: &str) -> crate::team::TeamPlan {
        let src = format!(
            "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n\
             [[peers]]\nid = \"a\"\nmodel = \"m\"\n{grants}\n[[peers]]\nid = \"b\"\nmodel = \"m\"\n\
             [protocol]\nkind = \"conversation\"\n\
             [tools.docs]\nkind = \"mcp\"\ncommand = [\"mcp-docs\"]\n\
             [tools.check]\nkind = \"command\"\nargv = [\"true\"]\n"
        );
        crate::team::parse_team("t.toml", &src, &crate::team::NoEnv).unwrap_or_else(|e| panic!("{e}"))
    }

    fn listing(from: &str, server: &str, step: &str) -> Envelope {
        let s = SessionId::from("s");
        let body = ToolListBody { server: server.into(), tools: Vec::new(), error: None };
        let id = EnvelopeId::derive(&s, &PeerId::from("*"), step);
        let body = Body::text(body.describe()).with_json(serde_json::to_value(&body).unwrap());
        Envelope::with_id(id, &s, &PeerId::from(from), Arc::from(step), Kind::ToolList, Recipient::All, body)
    }

    #[test]
    fn a_listing_counts_only_from_a_peer_that_holds_the_server_at_its_collective_step() {
        let held = plan("tools = [\"docs\"]");
        assert_eq!(listing_rejected(&held, &listing("a", "docs", "tools/docs/1")), None);
        assert_eq!(listing_rejected(&held, &listing("a", "docs", "tools/docs/3")), None);
        let why = |p: &crate::team::TeamPlan, e: Envelope| listing_rejected(p, &e).unwrap_or_default();
        assert!(why(&held, listing("b", "docs", "tools/docs/2")).contains("b is not granted the MCP server `docs`"));
        assert!(why(&held, listing("a", "check", "tools/check/1")).contains("no MCP server of the team"));
        assert!(why(&held, listing("a", "nope", "tools/nope/1")).contains("no MCP server of the team"));
        for step in ["tools/docs/0", "tools/docs/x", "tools/other/1", "docs/1", "tools/docs/01"] {
            assert!(why(&held, listing("a", "docs", step)).contains("not at a listing step"), "{step}");
        }
        // The right step, but an id of the author's own: not the collective listing.
        let mut own = listing("a", "docs", "tools/docs/1");
        own.id = EnvelopeId::derive(&own.session, &own.from, &own.step);
        assert!(why(&held, own).contains("collective id"));
        let mut empty = listing("a", "docs", "tools/docs/1");
        empty.body.json = None;
        assert!(why(&held, empty).contains("no listing in its body"));
        // A server no peer holds may be recorded by any peer that started it.
        let unheld = plan("");
        assert_eq!(listing_rejected(&unheld, &listing("b", "docs", "tools/docs/1")), None);
        // Other kinds are not listings.
        let mut message = listing("b", "docs", "tools/docs/1");
        message.kind = Kind::Message;
        assert_eq!(listing_rejected(&held, &message), None);
    }
}
