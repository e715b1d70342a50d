//! Helpers shared by the provider tests: recorded bodies, a multi-peer request, a token
//! collector and an address nobody listens on.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use roundtable_core::PeerId;
use roundtable_core::model::{ChatMessage, ChatRequest, Role, Transcript};
use wiremock::ResponseTemplate;

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(crate) fn sse(name: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(fixture(name), "text/event-stream")
}

pub(crate) fn json_body(status: u16, name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(name), "application/json")
}

/// Alice's view of a short debate: the task, Bob, herself, Carol, then the instruction.
pub(crate) fn debate_request() -> ChatRequest {
    let mut t = Transcript::default();
    let mut push =
        |role, name: Option<&str>, text: &str| t.push(ChatMessage::new(role, name.map(PeerId::from), Arc::from(text)));
    push(Role::User, None, "What is 6 x 7?");
    push(Role::User, Some("bob"), "I think 42.");
    push(Role::Assistant, Some("alice"), "Probably 42.");
    push(Role::User, Some("carol.v2"), "Agreed: 42.");
    let mut r = ChatRequest::simple("alice", "Give your final answer.");
    r.system = Some("You are Alice, a careful peer.".into());
    r.window = 0..t.len();
    r.history = Arc::new(t);
    r.temperature = Some(0.3);
    r.max_tokens = Some(256);
    r
}

/// A request whose streamed pieces are recorded, in order.
pub(crate) fn collecting(mut req: ChatRequest) -> (ChatRequest, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    req.on_token = Some(Arc::new(move |t: &str| sink.lock().unwrap().push(t.to_owned())));
    (req, got)
}

/// A local URL on which nothing listens (the port was free a moment ago).
pub(crate) fn dead_url(path: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}{path}")
}

/// Envelopes of one peer's tool use, as the peer runtime writes them.
pub(crate) mod tool_log {
    use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
    use roundtable_core::tool::{Outcome, ToolCallBody, ToolResultBody};

    fn env(peer: &str, step: &str, kind: Kind, text: &str, json: serde_json::Value) -> std::sync::Arc<Envelope> {
        let body = Body::text(text).with_json(json);
        std::sync::Arc::new(Envelope::new(&SessionId::from("s"), &PeerId::from(peer), step, kind, Recipient::All, body))
    }

    pub(crate) fn call(peer: &str, step: &str, id: &str, tool: &str, arguments: &str) -> std::sync::Arc<Envelope> {
        let body =
            ToolCallBody { tool: tool.into(), call_id: id.into(), arguments: arguments.into(), said: String::new() };
        env(peer, step, Kind::ToolCall, &format!("calls {tool}"), serde_json::to_value(body).unwrap())
    }

    pub(crate) fn result(
        peer: &str,
        step: &str,
        id: &str,
        tool: &str,
        outcome: Outcome,
        output: &str,
    ) -> std::sync::Arc<Envelope> {
        let body = ToolResultBody {
            tool: tool.into(),
            call_id: id.into(),
            outcome,
            output: output.into(),
            exit_status: None,
            signal: None,
            duration_ms: 3,
            truncated: false,
        };
        env(peer, step, Kind::ToolResult, output, serde_json::to_value(body).unwrap())
    }
}

/// Tools offered to a peer in the tool tests.
pub(crate) fn tool_defs() -> Arc<[roundtable_core::tool::ToolDef]> {
    use roundtable_core::tool::ToolDef;
    Arc::from([
        ToolDef {
            name: "run_tests".into(),
            description: "Run a test suite.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"suite": {"type": "string"}, "fail_fast": {"type": "boolean"}}, "required": ["suite"]}),
        },
        ToolDef {
            name: "read_file".into(),
            description: "Read a file of the project.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        },
    ])
}

/// QA's view after its last turn: the task, its two parallel calls (one envelope each),
/// a message from backend that landed before the results, the results (the second a
/// failure, the first's arguments not valid JSON), then the instruction; tools offered.
pub(crate) fn tool_request() -> ChatRequest {
    use roundtable_core::tool::Outcome;
    let mut t = Transcript::default();
    t.push(ChatMessage::new(Role::User, None, Arc::from("Check the API.")));
    t.push_envelope(tool_log::call("qa", "turn/1/call/0", "call_A", "run_tests", "{\"suite\": \"api\""));
    t.push_envelope(tool_log::call("qa", "turn/1/call/1", "call_B", "read_file", "{\"path\": \"docs/api.md\"}"));
    t.push(ChatMessage::new(Role::User, Some(PeerId::from("backend")), Arc::from("Pushed a fix.")));
    t.push_envelope(tool_log::result(
        "qa",
        "turn/1/result/0",
        "call_A",
        "run_tests",
        Outcome::Refused,
        "arguments are not valid JSON",
    ));
    t.push_envelope(tool_log::result("qa", "turn/1/result/1", "call_B", "read_file", Outcome::Ok, "# API\nGET /users"));
    let mut r = ChatRequest::simple("qa", "Your turn.");
    r.window = 0..t.len();
    r.history = Arc::new(t);
    r.tools = tool_defs();
    r
}
