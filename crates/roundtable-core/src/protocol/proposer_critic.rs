//! Proposer and critic: a proposer proposes, critics challenge, the proposer defends
//! or revises, until the critics are satisfied or the rounds run out; then the proposer
//! writes the final answer.
//!
//! - **Steps.** Round r: the proposer's `r{r}/propose` (a proposal), then every
//!   critic's `r{r}/critique` (a verdict); at the end the proposer's `final`.
//! - **Duties.** Proposer and critics speak with their visible history. A critic
//!   answers with JSON `{"satisfied": true|false, "critique": "..."}`.
//! - **Satisfaction.** The structured `satisfied` field decides; when a critic's reply
//!   has no such field (not JSON, or a model that ignores the format), the configured
//!   phrase (`satisfied_phrase`, default `SATISFIED`, any case) anywhere in the reply
//!   means satisfied. A round is satisfied when at least one critic gave a verdict and
//!   every verdict is satisfied.
//! - **Decision.** When satisfied, or after the last round, the proposer writes the
//!   final answer. Without one (it failed or is absent), the latest proposal is the
//!   answer.
//! - **Failures.** A failed proposal ends its round unsatisfied (nothing to critique);
//!   a failed critique is no verdict.
//! - **Absent peers.** An absent critic is not waited for; with no critic present the
//!   proposer writes the final answer. An absent proposer ends the session with its
//!   latest proposal.
//!
//! Team-file keys: `proposer` (the first peer), `critics` (the others), `rounds` (3),
//! `satisfied_phrase`, `instruction`, `critic_instruction`, `final_instruction`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Due, Duty, Facts, Finish, Reducer, View, is_round_step};
use crate::envelope::{Envelope, EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::ProposerCriticSpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Propose,
    Critique,
    Final,
    Done,
}

pub struct ProposerCritic {
    spec: ProposerCriticSpec,
    round: u32,
    phase: Phase,
    latest: Option<(Arc<str>, EnvelopeId)>,
    /// This round's verdicts: `Some(satisfied)`, or `None` for a failure.
    verdicts: BTreeMap<PeerId, Option<bool>>,
    satisfied: bool,
    why_final: String,
    final_answer: Option<(Arc<str>, EnvelopeId)>,
    /// Whether the last entry folded in moved the protocol (see [`Reducer::due`]).
    moved: bool,
}

/// Whether a critic's verdict says satisfied: the JSON field, else the phrase.
pub fn is_satisfied(env: &Envelope, phrase: &str) -> bool {
    let field = env.body.json.as_ref().and_then(|j| j.get("satisfied"));
    match field {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::String(s)) => {
            matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "yes")
        }
        _ => env.body.text.to_lowercase().contains(&phrase.to_lowercase()),
    }
}

impl ProposerCritic {
    pub fn new(spec: ProposerCriticSpec) -> Self {
        ProposerCritic {
            spec,
            round: 0,
            phase: Phase::Propose,
            latest: None,
            verdicts: BTreeMap::new(),
            satisfied: false,
            why_final: String::new(),
            final_answer: None,
            moved: false,
        }
    }

    fn next_round_or_final(&mut self, why_final: String) {
        if self.round + 1 < self.spec.rounds {
            self.round += 1;
            self.phase = Phase::Propose;
            self.verdicts.clear();
        } else {
            self.phase = Phase::Final;
            self.why_final = why_final;
        }
    }

    fn check_critiques(&mut self, facts: &Facts<'_>) {
        if self.phase != Phase::Critique {
            return;
        }
        let present: Vec<&PeerId> = self.spec.critics.iter().filter(|c| !facts.is_absent(c)).collect();
        if present.is_empty() {
            self.phase = Phase::Final;
            self.why_final = format!("no critic is present after round {}", self.round + 1);
            return;
        }
        if !present.iter().all(|c| self.verdicts.contains_key(*c)) {
            return;
        }
        let given: Vec<bool> = self.verdicts.values().flatten().copied().collect();
        if !given.is_empty() && given.iter().all(|s| *s) {
            self.satisfied = true;
            self.phase = Phase::Final;
            self.why_final = format!("the critics are satisfied in round {}", self.round + 1);
        } else {
            let rounds = self.spec.rounds;
            let n_rounds = crate::readable::count(rounds, "round", "rounds");
            self.next_round_or_final(format!("{n_rounds} without satisfying the critics"));
        }
    }

    /// What every member's duty follows (see [`Reducer::due`]).
    fn stage(&self) -> (u32, Phase, Option<EnvelopeId>) {
        (self.round, self.phase, self.latest.as_ref().map(|l| l.1.clone()))
    }

    /// Fold one entry in (see [`Reducer::apply`]).
    fn fold(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let step = env.step.as_ref();
        let r = self.round;
        if self.phase == Phase::Propose && env.from == self.spec.proposer && is_round_step(step, r, "propose") {
            if env.kind == Kind::Proposal {
                self.latest = Some((env.body.text.clone(), env.id.clone()));
                self.phase = Phase::Critique;
            } else if env.kind == Kind::Failure {
                let rounds = self.spec.rounds;
                let n_rounds = crate::readable::count(rounds, "round", "rounds");
                self.next_round_or_final(format!("{n_rounds}; the last proposal failed"));
            }
        } else if self.phase == Phase::Critique
            && self.spec.critics.contains(&env.from)
            && is_round_step(step, r, "critique")
            && !self.verdicts.contains_key(&env.from)
        {
            match env.kind {
                Kind::Verdict => {
                    self.verdicts.insert(env.from.clone(), Some(is_satisfied(env, &self.spec.satisfied_phrase)));
                }
                Kind::Failure => {
                    self.verdicts.insert(env.from.clone(), None);
                }
                _ => {}
            }
        } else if self.phase == Phase::Final && env.from == self.spec.proposer && step == "final" {
            if env.kind == Kind::Message {
                self.final_answer = Some((env.body.text.clone(), env.id.clone()));
            }
            self.phase = Phase::Done;
        }
        self.check_critiques(facts);
    }
}

impl Reducer for ProposerCritic {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let before = self.stage();
        self.fold(entry, facts);
        self.moved = before != self.stage();
    }

    /// The proposer's duty and each critic's follow the round, the phase and the latest
    /// proposal (a critic's own verdict ends only its own, and its author is woken for
    /// it); so another critic's verdict that closes no round changes no one else's duty.
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.moved { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        let r = self.round;
        let parents: Vec<EnvelopeId> = self.latest.iter().map(|l| l.1.clone()).collect();
        match self.phase {
            Phase::Propose if *me == self.spec.proposer => {
                let default = if r == 0 {
                    "Propose a solution to the task. Explain it briefly and end with a line 'Answer: <your proposal in one line>'."
                } else {
                    "Revise your proposal in light of the critique, or defend it where the critique is wrong. End with a line 'Answer: <your proposal in one line>'."
                };
                let instruction = self.spec.instruction.clone().unwrap_or_else(|| default.into());
                vec![
                    Duty::speak(
                        format!("r{r}/propose"),
                        Kind::Proposal,
                        r,
                        Some(Arc::from(instruction)),
                        false,
                        View::History,
                    )
                    .with_parents(parents),
                ]
            }
            Phase::Critique if self.spec.critics.contains(me) && !self.verdicts.contains_key(me) => {
                let phrase = &self.spec.satisfied_phrase;
                let instruction = self.spec.critic_instruction.clone().unwrap_or_else(|| {
                    format!(
                        "Critique the latest proposal. Reply with a JSON object {{\"satisfied\": true|false, \"critique\": \"<your objections, or why it holds>\"}}. \
                         Set \"satisfied\" to true only if no substantive objection is left. (If you cannot reply in JSON, write {phrase} when satisfied.)"
                    )
                });
                vec![
                    Duty::speak(
                        format!("r{r}/critique"),
                        Kind::Verdict,
                        r,
                        Some(Arc::from(instruction)),
                        true,
                        View::History,
                    )
                    .with_parents(parents),
                ]
            }
            Phase::Final if *me == self.spec.proposer && !facts.is_absent(me) => {
                let instruction = self.spec.final_instruction.clone().unwrap_or_else(|| {
                    "The review is over. Write the final answer, taking the critique into account. End with a line 'Answer: <the answer in one line>'.".into()
                });
                vec![
                    Duty::speak("final", Kind::Message, r, Some(Arc::from(instruction)), false, View::History)
                        .with_parents(parents),
                ]
            }
            _ => Vec::new(),
        }
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        let latest = || (self.latest.as_ref().map(|l| l.0.clone()), self.latest.iter().map(|l| l.1.clone()).collect());
        if facts.is_absent(&self.spec.proposer) && self.phase != Phase::Done {
            let (answer, decided_by) = latest();
            return Some(Finish {
                reason: format!("the proposer {} is absent; its latest proposal stands", self.spec.proposer),
                answer,
                decided_by,
            });
        }
        if self.phase != Phase::Done {
            return None;
        }
        Some(match &self.final_answer {
            Some((text, id)) => Finish {
                reason: format!("{}; the proposer wrote the final answer", self.why_final),
                answer: Some(text.clone()),
                decided_by: vec![id.clone()],
            },
            None => {
                let (answer, decided_by) = latest();
                Finish {
                    reason: format!("{}; the final answer failed, the latest proposal stands", self.why_final),
                    answer,
                    decided_by,
                }
            }
        })
    }

    fn signals(&self) -> Signals {
        Signals { round: self.round, verdict: self.satisfied, consensus: self.satisfied, ..Default::default() }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        self.final_answer.clone().or_else(|| self.latest.clone())
    }
}
