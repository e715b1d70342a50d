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
