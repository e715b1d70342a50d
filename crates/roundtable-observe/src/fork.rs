//! Fork: a new session from a prefix of a recorded one, optionally with one envelope's
//! text edited ("what if the critic had said this"), to be continued with live models.
//!
//! The prefix is copied into the new session with ids derived again from the new
//! session id (so it is a session of its own, idempotent like any other) and causal
//! parents mapped to the new ids. The task envelope records where the fork came from in
//! its JSON (`forked_from`: session, sequence number, and the edit), and its clock starts
//! at the fork, so time limits count from there.

use std::collections::HashMap;

use roundtable_core::log::Entry;
use roundtable_core::peer::parse_json_answer;
use roundtable_core::{Envelope, EnvelopeId, Kind, PeerId, SessionId};

/// Why a fork cannot be made. Every case is bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForkError {
    #[error("--at must be at least 1 (the task envelope)")]
    AtZero,
    #[error("--at {at} is past the end of session {session}, which has {len} envelopes")]
    PastEnd { session: String, at: u64, len: u64 },
    #[error(
        "--at {at} includes the stop of session {session} (envelope {stop}); fork at {} or earlier to continue it",
        stop - 1
    )]
    IncludesStop { session: String, at: u64, stop: u64 },
    #[error("the log of session {0} does not start with a task envelope")]
    NoTask(String),
    #[error(
        "--edit {0}: no envelope with that id in session {1} (ids are shown by `roundtable trace --format json`; `#SEQ` names one by sequence)"
    )]
    UnknownEnvelope(String, String),
    #[error("--edit {0}: the id prefix matches {1} envelopes; give more of it")]
    Ambiguous(String, usize),
    #[error("--edit {id}: that envelope is #{seq}, after the fork point {at}")]
    EditAfterFork { id: String, seq: u64, at: u64 },
    #[error(
        "--edit {id}: #{seq} is a {kind} envelope, which records a fact rather than something said; edit a task, message, proposal, vote or verdict"
    )]
    NotEditable { id: String, seq: u64, kind: String },
    #[error("--edit needs ENVELOPE_ID=TEXT, got {0:?}")]
    BadEdit(String),
}

/// One edit: which envelope (full id, a unique id prefix of 6+ characters, or `#SEQ`)
/// and its new text.
#[derive(Clone, Debug, PartialEq)]
pub struct Edit {
    pub target: String,
    pub text: String,
}

impl std::str::FromStr for Edit {
    type Err = ForkError;
    fn from_str(s: &str) -> Result<Self, ForkError> {
        match s.split_once('=') {
            Some((t, text)) if !t.trim().is_empty() => {
                Ok(Edit { target: t.trim().to_string(), text: text.to_string() })
            }
            _ => Err(ForkError::BadEdit(s.to_string())),
        }
    }
}

fn find_target(entries: &[Entry], session: &SessionId, target: &str) -> Result<usize, ForkError> {
    let unknown = || ForkError::UnknownEnvelope(target.to_string(), session.to_string());
    if let Some(n) = target.strip_prefix('#') {
        let seq: u64 = n.parse().map_err(|_| unknown())?;
        return entries.iter().position(|e| e.seq == seq).ok_or_else(unknown);
    }
    if let Some(i) = entries.iter().position(|e| e.env.id.as_str() == target) {
        return Ok(i);
    }
    if target.len() >= 6 {
        let hits: Vec<usize> =
            entries.iter().enumerate().filter(|(_, e)| e.env.id.as_str().starts_with(target)).map(|(i, _)| i).collect();
        match hits.len() {
            0 => {}
            1 => return Ok(hits[0]),
            n => return Err(ForkError::Ambiguous(target.to_string(), n)),
        }
    }
    Err(unknown())
}

/// The envelopes of a new session `new_session` made of `entries[..at]` of a recorded
/// session, with `edit` applied. Checks everything before anything is written.
pub fn fork_envelopes(
    entries: &[Entry],
    new_session: &SessionId,
    at: u64,
    edit: Option<&Edit>,
) -> Result<Vec<Envelope>, ForkError> {
    let task = entries.first().filter(|e| e.env.kind == Kind::Task);
    let old_session = match task {
        Some(t) => t.env.session.clone(),
        None => {
            return Err(ForkError::NoTask(entries.first().map_or_else(String::new, |e| e.env.session.to_string())));
        }
    };
    if at == 0 {
        return Err(ForkError::AtZero);
    }
    let len = entries.len() as u64;
    if at > len {
        return Err(ForkError::PastEnd { session: old_session.to_string(), at, len });
    }
    if let Some(stop) = entries.iter().find(|e| e.env.kind == Kind::Stop)
        && stop.seq <= at
    {
        return Err(ForkError::IncludesStop { session: old_session.to_string(), at, stop: stop.seq });
    }
    let edit_at = match edit {
        None => None,
        Some(ed) => {
            let i = find_target(entries, &old_session, &ed.target)?;
            let e = &entries[i];
            if e.seq > at {
                return Err(ForkError::EditAfterFork { id: ed.target.clone(), seq: e.seq, at });
            }
            if matches!(e.env.kind, Kind::Stop | Kind::Absent | Kind::Join | Kind::Failure | Kind::ToolList) {
                return Err(ForkError::NotEditable { id: ed.target.clone(), seq: e.seq, kind: e.env.kind.to_string() });
            }
            Some(i)
        }
    };

    let star = PeerId::from("*");
    let mut ids: HashMap<EnvelopeId, EnvelopeId> = HashMap::new();
    let mut out = Vec::with_capacity(at as usize);
    for (i, e) in entries.iter().take(at as usize).enumerate() {
        let mut env = (*e.env).clone();
        let collective = env.id == EnvelopeId::derive(&old_session, &star, &env.step);
        let new_id = EnvelopeId::derive(new_session, if collective { &star } else { &env.from }, &env.step);
        ids.insert(env.id.clone(), new_id.clone());
        env.id = new_id;
        env.session = new_session.clone();
        env.parents = env.parents.iter().filter_map(|p| ids.get(p).cloned()).collect();
        if Some(i) == edit_at {
            let text = edit.map(|ed| ed.text.as_str()).unwrap_or_default();
            if env.kind != Kind::Task && env.body.json.is_some() {
                env.body.json = parse_json_answer(text);
            }
            env.body.text = text.into();
        }
        if env.kind == Kind::Task {
            env.time_ms = roundtable_core::envelope::now_ms();
            let mut origin = serde_json::json!({ "session": old_session.as_str(), "at": at });
            if let (Some(i), Some(ed)) = (edit_at, edit) {
                let orig = &entries[i].env;
                origin["edited"] = serde_json::json!({
                    "seq": entries[i].seq,
                    "id": orig.id.as_str(),
                    "from": orig.from.as_str(),
                    "original_text": &*orig.body.text,
                    "text": ed.text,
                });
            }
            match env.body.json.as_mut() {
                Some(serde_json::Value::Object(m)) => {
                    m.insert("forked_from".into(), origin);
                }
                _ => env.body.json = Some(serde_json::json!({ "forked_from": origin })),
            }
        }
        out.push(env);
    }
    Ok(out)
}
