//! Round robin: peers take turns in a ring; each builds on or challenges what came
//! before. After the configured rounds an optional summarizer writes the final answer.
//!
//! - **Steps.** Turn `t` belongs to `order[t % n]` and is recorded with step `turn/{t}`
//!   (round `t / n`); then, with a summarizer, step `final`.
//! - **Duties.** The holder of the current turn speaks with its visible history under
//!   the team's context policy; everyone else waits. After the last round the
//!   summarizer writes the final answer.
//! - **Decision.** The summarizer's answer, or without a summarizer the last
//!   contribution. When the summarizer cannot answer, no one else's message stands in
//!   for it (a limit or budget that stops the ring early ends with the best so far).
//! - **Failures.** A failure envelope for a turn consumes it, so one failing peer
//!   cannot stall the ring; a failed final step ends the session as failed (the stop
//!   reason begins with [`crate::session::FAILED_PREFIX`]) with no final answer.
//! - **Absent peers.** Their turns are skipped; an absent summarizer ends the session
//!   with no final answer.
//!
//! Team-file keys: `rounds` (3), `order` (every peer but the summarizer), `summarizer`,
//! `instruction` (`{round}`, `{rounds}`, `{peer}` are filled in), `summary_instruction`.

use std::sync::Arc;

use super::{Action, Due, Duty, Facts, Finish, Reducer, View};
use crate::envelope::{EnvelopeId, Kind, PeerId, Recipient};
use crate::log::Entry;
use crate::team::RoundRobinSpec;
use crate::termination::Signals;

pub struct RoundRobin {
    spec: RoundRobinSpec,
    /// The next turn to be taken.
    turn: u64,
    /// The last contribution (its text and id: the envelope, shared with the log).
    last: Option<Arc<crate::envelope::Envelope>>,
    final_answer: Option<Arc<crate::envelope::Envelope>>,
    /// The summarizer's final step failed (the failure's id): finish with no answer.
    final_failed: Option<EnvelopeId>,
}

const FINAL_STEP: &str = "final";

impl RoundRobin {
    pub fn new(spec: RoundRobinSpec) -> Self {
        RoundRobin { spec, turn: 0, last: None, final_answer: None, final_failed: None }
    }

    fn n(&self) -> u64 {
        self.spec.order.len() as u64
    }

    fn total_turns(&self) -> u64 {
        u64::from(self.spec.rounds) * self.n()
    }

    fn holder(&self, turn: u64) -> &PeerId {
        &self.spec.order[(turn % self.n()) as usize]
    }

    /// Skip turns of absent peers (all of them absent: the ring runs out).
    fn skip_absent(&mut self, facts: &Facts<'_>) {
        while self.turn < self.total_turns() && facts.absent.contains(self.holder(self.turn)) {
            self.turn += 1;
        }
    }

    fn rounds_done(&self) -> bool {
        self.turn >= self.total_turns()
    }
}

impl Reducer for RoundRobin {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        self.take(entry.clone(), facts);
    }

    fn take(&mut self, entry: Entry, facts: &Facts<'_>) {
        let env = entry.env;
        if !self.rounds_done()
            && env.step.strip_prefix("turn/").and_then(|t| t.parse::<u64>().ok()) == Some(self.turn)
            && &env.from == self.holder(self.turn)
        {
            if env.kind == Kind::Message {
                self.last = Some(env);
            }
            self.turn += 1;
        } else if env.step.as_ref() == FINAL_STEP && Some(&env.from) == self.spec.summarizer.as_ref() {
            if env.kind == Kind::Message {
                self.final_answer = Some(env);
            } else {
                self.final_failed = Some(env.id.clone());
            }
        }
        self.skip_absent(facts);
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        if !self.rounds_done() {
            if self.holder(self.turn) != me {
                return Vec::new();
            }
            let round = (self.turn / self.n()) as u32;
            let instruction = self.spec.instruction.as_ref().map(|i| {
                Arc::from(
                    i.replace("{round}", &(round + 1).to_string())
                        .replace("{rounds}", &self.spec.rounds.to_string())
                        .replace("{peer}", me.as_str()),
                )
            });
            return vec![Duty {
                step: Arc::from(format!("turn/{}", self.turn)),
                kind: Kind::Message,
                to: Recipient::All,
                round,
                parents: self.last.iter().map(|e| e.id.clone()).collect(),
                action: Action::Speak { instruction, json: false, view: View::History },
                collective: false,
            }];
        }
        match &self.spec.summarizer {
            Some(s)
                if s == me
                    && self.final_answer.is_none()
                    && self.final_failed.is_none()
                    && !facts.absent.contains(me) =>
            {
                let instruction = self.spec.summary_instruction.clone().unwrap_or_else(|| {
                    "The discussion is over. Summarize the trade-offs raised and give the team's recommendation.".into()
                });
                vec![Duty {
                    step: Arc::from(FINAL_STEP),
                    kind: Kind::Message,
                    to: Recipient::All,
                    round: self.spec.rounds,
                    parents: self.last.iter().map(|e| e.id.clone()).collect(),
                    action: Action::Speak {
                        instruction: Some(Arc::from(instruction)),
                        json: false,
                        view: View::History,
                    },
                    collective: false,
                }]
            }
            _ => Vec::new(),
        }
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        if !self.rounds_done() {
            return None;
        }
        let rounds = self.spec.rounds;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        match (&self.spec.summarizer, &self.final_answer) {
            (Some(s), Some(e)) => Some(Finish {
                reason: format!("completed: {n_rounds}, then {s}'s summary"),
                answer: Some(e.body.text.clone()),
                decided_by: vec![e.id.clone()],
            }),
            (Some(s), None) if self.final_failed.is_some() => Some(Finish {
                reason: format!(
                    "{} {n_rounds}, then the summarizer {s}'s final answer failed: no final answer",
                    crate::session::FAILED_PREFIX
                ),
                answer: None,
                decided_by: self.final_failed.iter().cloned().collect(),
            }),
            (Some(s), None) if facts.absent.contains(s) => Some(Finish {
                reason: format!("no answer: {n_rounds}, and the summarizer {s} is absent"),
                answer: None,
                decided_by: Vec::new(),
            }),
            (Some(_), None) => None,
            (None, _) => Some(Finish {
                reason: format!("completed: {n_rounds}"),
                answer: self.last.as_ref().map(|e| e.body.text.clone()),
                decided_by: self.last.iter().map(|e| e.id.clone()).collect(),
            }),
        }
    }

    fn signals(&self) -> Signals {
        Signals { round: (self.turn / self.n().max(1)) as u32, ..Default::default() }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        self.final_answer.as_ref().or(self.last.as_ref()).map(|e| (e.body.text.clone(), e.id.clone()))
    }

    /// Only the holder of the turn has a duty (the summarizer once the rounds are done).
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if !self.rounds_done() {
            return Due::Peers(vec![self.holder(self.turn).clone()]);
        }
        Due::Peers(self.spec.summarizer.iter().cloned().collect())
    }
}
