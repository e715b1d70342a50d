//! What a tool call adds beyond the tool's own time: two peers of a conversation pass
//! a note back and forth for `TURNS` turns, once replying with text (one model call, one
//! envelope a turn) and once calling a no-op tool first (a tool_call and a tool_result
//! envelope, and a second model call that sees the result). Instant models, in memory;
//! the difference per turn is the runtime's cost of one tool call.
//!
//!     cargo run --release -p roundtable-bench --example tool_overhead

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use roundtable_core::envelope::{PeerId, SessionId};
use roundtable_core::log::{MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use roundtable_core::peer::PeerExtras;
use roundtable_core::runner::{open_session, run_peers_with};
use roundtable_core::team::{NoEnv, parse_team};
use roundtable_core::tool::{Tool, ToolBox, ToolCall, ToolContext, ToolDef, ToolOutput};

const TURNS: u32 = 2000;
const RUNS: usize = 11;

/// Replies to its mail; with `tool`, first calls `noop` once a turn.
struct Mock {
    tool: bool,
}

#[async_trait]
impl ChatModel for Mock {
    fn name(&self) -> &str {
        "mock"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let calls = if self.tool && req.tool_turns.is_empty() {
            vec![ToolCall { id: format!("c{}", req.ordinal), name: "noop".into(), arguments: "{}".into() }]
        } else {
            Vec::new()
        };
        let text = if calls.is_empty() { format!("note {}", req.ordinal) } else { String::new() };
        Ok(ChatResponse {
            text,
            model: "mock".into(),
            prompt_tokens: 10,
            completion_tokens: 3,
            finish_reason: None,
            tool_calls: calls,
        })
    }
}

struct Noop(ToolDef);

#[async_trait]
impl Tool for Noop {
    fn def(&self) -> &ToolDef {
        &self.0
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, _: &serde_json::Value, _: &ToolContext) -> ToolOutput {
        ToolOutput::ok("ok")
    }
}

async fn once(tool: bool) -> f64 {
    let grant = if tool { "tools = [\"noop\"]\n" } else { "" };
    let src = format!(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"-\"]\n[[peers]]\nid = \"a\"\nmodel = \"m\"\n{grant}[[peers]]\nid = \"b\"\nmodel = \"m\"\n{grant}[tools.noop]\nkind = \"command\"\nargv = [\"true\"]\n[protocol]\nkind = \"conversation\"\nstart = [\"a\"]\nmax_turns = {}\n[presence]\nheartbeat_secs = 3600\n",
        TURNS / 2
    );
    let plan = parse_team("bench.toml", &src, &NoEnv).expect("valid");
    let model: Arc<dyn ChatModel> = Arc::new(Mock { tool });
    let models: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), model.clone())).collect();
    let mut tools = ToolBox::new();
    tools.insert(
        "noop",
        Arc::new(Noop(ToolDef {
            name: "noop".into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object"}),
        })),
    );
    let log: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from("bench")))));
    open_session(log.as_ref(), &plan, "pass the note").await.unwrap();
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let t0 = Instant::now();
    let s = run_peers_with(log.clone(), &plan, models, None, None, extras).await.unwrap();
    let us = t0.elapsed().as_secs_f64() * 1e6 / f64::from(TURNS);
    assert!(s.stop_reason.unwrap().contains("used all"), "every turn was taken");
    us
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = (once(false).await, once(true).await); // warm-up
    let mut plain = Vec::new();
    let mut with = Vec::new();
    for _ in 0..RUNS {
        plain.push(once(false).await);
        with.push(once(true).await);
    }
    let (p, w) = (median(plain), median(with));
    println!("turns per run: {TURNS}, runs: {RUNS} (interleaved), medians");
    println!("µs per turn, text reply:            {p:.1}");
    println!("µs per turn, no-op tool call first: {w:.1}");
    println!("a tool call adds:                   {:.1} µs", w - p);
}
