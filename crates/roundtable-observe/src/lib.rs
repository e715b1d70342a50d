//! Roundtable observability, read from the session log (the truth of a session):
//!
//! - [`trace`]: the causal trace — who said what to whom, which envelopes led to the
//!   decision that stopped the session, what each peer cost — as text, Mermaid, DOT or
//!   JSON.
//! - [`replay`]: re-execute a session from its recorded model outputs, with no model
//!   calls, and report the first decision that comes out differently.
//! - [`fork`]: a new session from a prefix of a recorded one, optionally with one
//!   message edited.
//! - [`telemetry`]: OpenTelemetry spans (GenAI semantic conventions) exported over OTLP,
//!   with trace context carried inside envelopes.
//! - [`metrics`]: Prometheus metrics folded from logs.
//! - [`ui`]: the live web view.

pub mod fork;
pub mod metrics;
pub mod replay;
pub mod telemetry;
pub mod trace;
pub mod ui;

use std::sync::Arc;

use roundtable_core::Kind;
use roundtable_core::log::{Entry, jsonl};

/// The entries of a session exported as JSON lines (`roundtable export`), checked line by
/// line: one session, no repeated ids, a task envelope first, and, when the file ends
/// with its seal, every envelope as sealed (see `roundtable_core::chain`).
pub fn entries_from_jsonl(file: &str, text: &str) -> Result<Vec<Entry>, String> {
    let (body, seal) = roundtable_core::chain::split_seal(text);
    let lines = jsonl::parse_lines(file, body).map_err(|e| e.to_string())?;
    if let Some((line, seal)) = seal {
        let seal = roundtable_core::chain::parse_seal(file, line, seal).map_err(|e| e.to_string())?;
        roundtable_core::chain::verify(file, &lines, line, &seal).map_err(|e| e.to_string())?;
    }
    let envs: Vec<_> = lines.into_iter().map(|(_, e)| e).collect();
    if envs.first().is_none_or(|e| e.kind != Kind::Task) {
        return Err(format!("{file}:1: the first envelope is not the session's task; not a session export"));
    }
    Ok(envs.into_iter().enumerate().map(|(i, env)| Entry { seq: i as u64 + 1, env: Arc::new(env) }).collect())
}
