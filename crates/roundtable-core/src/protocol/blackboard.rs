//! Blackboard collaboration: no direct messages; peers read and write the shared
//! [`crate::blackboard::Blackboard`], each contributing when its trigger matches what
//! is on the board.
//!
//! - **Sources.** Each `[[protocol.sources]]` entry is a knowledge source: a peer, the
//!   keys it `reads`, and the one key it `writes`. `task` is a read-only key holding
//!   the topic.
//! - **Trigger.** A source is triggered when every key it reads has a value and one of
//!   those values was written by another peer after the source's last contribution
//!   (or it has not contributed yet); its own writes never trigger it. What a contribution saw is its envelope's causal parents:
//!   the writes of its read keys, so the trigger is a pure function of the log.
//! - **Duties.** A triggered source calls its model with the board's current values
//!   of its read keys, then writes the answer to its key with compare-and-set against
//!   the write the log knows last for that key. The write is recorded on the log as a
//!   `board` envelope (step `board/{source}/{n}`, `op = put`, with the board
//!   revision). When another peer wrote the key first, the CAS fails and the lost race
//!   is recorded (`op = conflict`, with the call's usage) — the source is triggered
//!   again only if what it reads changes.
//! - **Decision.** The session ends when a write contains `done_phrase`, when the
//!   board is quiescent (no present source is triggered), or after `max_writes`
//!   contributions (written or lost). The answer is the value of `answer_key`.
//! - **Failures.** A failed contribution (model or board error) is recorded and
//!   counts as the source's contribution for what it saw.
//! - **Absent peers.** Their sources are not triggered; the others go on.
//! - **Crash after a board write.** The value on the board names the peer and step
//!   that wrote it; the peer, restarted, finds it and records it without calling its
//!   model again (see [`crate::peer`]).
//!
//! Team-file keys: `[[protocol.sources]]` (`peer`, `reads`, `writes`), `answer_key`
//! (the key of the last source), `done_phrase`, `max_writes` (20), `instruction`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Action, BoardMark, Duty, Facts, Finish, Reducer};
use crate::envelope::{EnvelopeId, Kind, PeerId, Recipient};
use crate::log::Entry;
use crate::team::BlackboardSpec;
use crate::termination::Signals;

/// An accepted write, as recorded on the log.
#[derive(Clone, Debug)]
struct Write {
    text: Arc<str>,
    by: PeerId,
    step: Arc<str>,
    id: EnvelopeId,
}

pub struct BlackboardProtocol {
    spec: BlackboardSpec,
    /// The latest accepted write of each key.
    board: BTreeMap<String, Write>,
    /// Per source: contributions so far, and the parents of the last one.
    attempts: Vec<u32>,
    last_saw: Vec<Option<BTreeSet<EnvelopeId>>>,
    total: u32,
    writes: u32,
    done: Option<(PeerId, String, EnvelopeId)>,
    task_id: Option<EnvelopeId>,
}

impl BlackboardProtocol {
    pub fn new(spec: BlackboardSpec) -> Self {
        let n = spec.sources.len();
        BlackboardProtocol {
            spec,
            board: BTreeMap::new(),
            attempts: vec![0; n],
            last_saw: vec![None; n],
            total: 0,
            writes: 0,
            done: None,
            task_id: None,
        }
    }

    fn step(i: usize, n: u32) -> String {
        format!("board/{i}/{n}")
    }

    /// The writes a source's read keys hold now; `None` when one of them is empty.
    fn reads_now(&self, i: usize) -> Option<Vec<&Write>> {
        self.spec.sources[i].reads.iter().filter(|k| *k != "task").map(|k| self.board.get(k)).collect()
    }

    fn triggered(&self, i: usize, facts: &Facts<'_>) -> bool {
        let src = &self.spec.sources[i];
        if facts.is_absent(&src.peer) {
            return false;
        }
        let Some(reads) = self.reads_now(i) else {
            return false;
        };
        match &self.last_saw[i] {
            None => true,
            // A value another peer wrote that this source has not seen.
            Some(saw) => reads.iter().any(|w| w.by != src.peer && !saw.contains(&w.id)),
        }
    }

    fn answer(&self) -> Option<&Write> {
        self.board.get(&self.spec.answer_key)
    }
}

impl Reducer for BlackboardProtocol {
    fn apply(&mut self, entry: &Entry, _facts: &Facts<'_>) {
        let env = &entry.env;
        if env.kind == Kind::Task && self.task_id.is_none() {
            self.task_id = Some(env.id.clone());
            return;
        }
        if self.done.is_some() {
            return;
        }
        for (i, src) in self.spec.sources.iter().enumerate() {
            if env.from != src.peer || env.step.as_ref() != Self::step(i, self.attempts[i]) {
                continue;
            }
            if !matches!(env.kind, Kind::Board | Kind::Failure) {
                continue;
            }
            self.attempts[i] += 1;
            self.total += 1;
            self.last_saw[i] = Some(env.parents.iter().cloned().collect());
            let j = env.body.json.as_ref();
            let op = j.and_then(|j| j.get("op")).and_then(|v| v.as_str());
            let key = j.and_then(|j| j.get("key")).and_then(|v| v.as_str());
            if env.kind == Kind::Board && op == Some("put") && key == Some(src.writes.as_str()) {
                let w = Write {
                    text: env.body.text.clone(),
                    by: env.from.clone(),
                    step: env.step.clone(),
                    id: env.id.clone(),
                };
                self.board.insert(src.writes.clone(), w);
                self.writes += 1;
                if let Some(phrase) = &self.spec.done_phrase
                    && env.body.text.contains(phrase.as_str())
                {
                    self.done = Some((env.from.clone(), src.writes.clone(), env.id.clone()));
                }
            }
            break;
        }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        if self.done.is_some() || self.total >= self.spec.max_writes {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (i, src) in self.spec.sources.iter().enumerate() {
            if src.peer != *me || !self.triggered(i, facts) {
                continue;
            }
            let reads = self.reads_now(i).unwrap_or_default();
            let mut board = String::new();
            for k in &src.reads {
                if k == "task" {
                    continue;
                }
                if let Some(w) = self.board.get(k) {
                    board.push_str(&format!("[{k}] (written by {}):\n{}\n\n", w.by, w.text));
                }
            }
            let own = self.board.get(&src.writes);
            if let Some(w) = own
                && !src.reads.contains(&src.writes)
            {
                board.push_str(&format!("[{}] now holds (written by {}):\n{}\n\n", src.writes, w.by, w.text));
            }
            let ask = self.spec.instruction.clone().unwrap_or_else(|| {
                "You contribute to a shared blackboard. Using what the board holds, write the new content of the key `{key}`. \
                 Write only that content."
                    .into()
            });
            let ask = super::fill(&ask, &[("key", &src.writes), ("peer", me.as_str())]);
            let instruction = if board.is_empty() { ask } else { format!("The blackboard holds:\n\n{board}{ask}") };
            let mut parents: Vec<EnvelopeId> = reads.iter().map(|w| w.id.clone()).collect();
            if src.reads.iter().any(|k| k == "task") {
                parents.extend(self.task_id.iter().cloned());
            }
            out.push(Duty {
                step: Arc::from(Self::step(i, self.attempts[i])),
                kind: Kind::Board,
                to: Recipient::All,
                round: self.writes,
                parents,
                action: Action::BoardWrite {
                    instruction: Some(Arc::from(instruction)),
                    key: Arc::from(src.writes.as_str()),
                    after: own.map(|w| BoardMark { by: w.by.clone(), step: w.step.clone(), text: w.text.clone() }),
                },
                collective: false,
            });
        }
        out
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        let answer = || self.answer().map(|w| w.text.clone());
        let decided_by = || self.answer().map(|w| vec![w.id.clone()]).unwrap_or_default();
        if let Some((by, key, id)) = &self.done {
            let phrase = self.spec.done_phrase.as_deref().unwrap_or("");
            return Some(Finish {
                reason: format!("done: {by} wrote {phrase:?} to `{key}`"),
                answer: answer(),
                decided_by: if decided_by().is_empty() { vec![id.clone()] } else { decided_by() },
            });
        }
        if self.total >= self.spec.max_writes {
            return Some(Finish {
                reason: format!("max_writes: {} contributions ({} written)", self.total, self.writes),
                answer: answer(),
                decided_by: decided_by(),
            });
        }
        let busy = (0..self.spec.sources.len()).any(|i| self.triggered(i, facts));
        (!busy).then(|| Finish {
            reason: format!("quiescent: no source has anything to add after {} writes", self.writes),
            answer: answer(),
            decided_by: decided_by(),
        })
    }

    fn signals(&self) -> Signals {
        Signals { round: self.writes, consensus: self.done.is_some(), ..Default::default() }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        self.answer().map(|w| (w.text.clone(), w.id.clone()))
    }
}
