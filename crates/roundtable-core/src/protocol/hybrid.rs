//! Hybrid: a leader states the objective, the peers work it out peer to peer, and the
//! leader decides only when they deadlock (no consensus after k rounds).
//!
//! - **Steps.** The leader's `objective`; then the members' simultaneous rounds as in
//!   [`super::rounds`] (`r{r}/answer`, each round seeing the objective and the others'
//!   answers from the round before); on deadlock, the leader's `decide`.
//! - **Consensus.** After each round, when the leading answer among the present
//!   members' latest answers has at least `threshold` of them (default 1.0:
//!   unanimity), the peers agree and the session ends with it; the leader says
//!   nothing more.
//! - **Deadlock.** After `deadlock_rounds` rounds without consensus, the leader reads
//!   the members' latest answers and decides (its stated answer, or its whole reply).
//! - **Ties.** The leading answer on a tie is the one whose first supporter comes
//!   first in team order (it matters only for the threshold share).
//! - **Failures.** A failed objective leaves the members with the task alone; a
//!   failed member answer is handled as in [`super::rounds`]; a failed decision ends
//!   the session without an answer (the reason names the leading answer).
//! - **Absent peers.** An absent leader states no objective; on deadlock with the
//!   leader absent the session ends without an answer. Absent members are not waited
//!   for.
//!
//! Team-file keys: `leader` (required), `members` (every other peer),
//! `deadlock_rounds` (2), `threshold` (1.0), `instruction`, `update_instruction`,
//! `leader_instruction`, `decide_instruction`.

use std::sync::Arc;

use super::answers::{Outcome, Rule, answer_or_text, tally};
use super::debate::ballot_ids;
use super::rounds::{ANSWER_FIRST, ANSWER_UPDATE, Rounds};
use super::{Duty, Facts, Finish, Reducer, Shown, View};
use crate::envelope::{EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::HybridSpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Objective,
    Work,
    Decide,
    Done,
}

pub struct Hybrid {
    spec: HybridSpec,
    phase: Phase,
    rounds: Rounds,
    outcome: Option<Outcome>,
    agreed: bool,
    decision: Option<(Arc<str>, EnvelopeId)>,
    decide_failed: bool,
}

impl Hybrid {
    pub fn new(spec: HybridSpec) -> Self {
        Hybrid {
            rounds: Rounds::new(spec.members.clone()),
            spec,
            phase: Phase::Objective,
            outcome: None,
            agreed: false,
            decision: None,
            decide_failed: false,
        }
    }

    fn present_ballots(&self, facts: &Facts<'_>) -> Outcome {
        let ballots: Vec<_> =
            self.rounds.ballots(facts.plan).into_iter().filter(|b| !facts.is_absent(&b.peer)).collect();
        tally(&ballots, Rule::Approval { threshold: self.spec.threshold })
    }

    fn advance(&mut self, facts: &Facts<'_>) {
        if self.phase == Phase::Objective && facts.is_absent(&self.spec.leader) {
            self.phase = Phase::Work;
        }
        if self.phase == Phase::Work && self.rounds.round_complete(facts) {
            let o = self.present_ballots(facts);
            self.agreed = o.decided;
            self.outcome = Some(o);
            self.rounds.close();
            if self.agreed {
                self.phase = Phase::Done;
            } else if self.rounds.round >= self.spec.deadlock_rounds {
                self.phase = Phase::Decide;
            }
        }
        if self.phase == Phase::Work && self.rounds.all_absent(facts) {
            self.phase = Phase::Decide;
        }
        if self.phase == Phase::Decide && facts.is_absent(&self.spec.leader) {
            self.phase = Phase::Done;
        }
    }
}

impl Reducer for Hybrid {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        match self.phase {
            Phase::Objective if env.from == self.spec.leader && env.step.as_ref() == "objective" => {
                if env.kind == Kind::Message {
                    self.rounds.preamble = vec![Shown::new(&env.from, &env.body.text)];
                }
                if matches!(env.kind, Kind::Message | Kind::Failure) {
                    self.phase = Phase::Work;
                }
            }
            Phase::Work => {
                self.rounds.observe(env);
            }
            Phase::Decide if env.from == self.spec.leader && env.step.as_ref() == "decide" => match env.kind {
                Kind::Message => {
                    let a = answer_or_text(&env.body.text, env.body.json.as_ref());
                    self.decision = Some((a.answer, env.id.clone()));
                    self.phase = Phase::Done;
                }
                Kind::Failure => {
                    self.decide_failed = true;
                    self.phase = Phase::Done;
                }
                _ => {}
            },
            _ => {}
        }
        self.advance(facts);
    }

    fn duties(&self, me: &PeerId, _facts: &Facts<'_>) -> Vec<Duty> {
        match self.phase {
            Phase::Objective if *me == self.spec.leader => {
                let i = self.spec.leader_instruction.clone().unwrap_or_else(|| {
                    "You lead this team. State the objective for the others in a few sentences: what a good answer must achieve. Do not answer it yourself.".into()
                });
                vec![Duty::speak("objective", Kind::Message, 0, Some(Arc::from(i)), false, View::Task)]
            }
            Phase::Work => {
                let first = self.spec.instruction.as_deref().unwrap_or(ANSWER_FIRST);
                let update = self.spec.update_instruction.as_deref().unwrap_or(ANSWER_UPDATE);
                self.rounds.duty(me, first, update, false).into_iter().collect()
            }
            Phase::Decide if *me == self.spec.leader => {
                let i = self.spec.decide_instruction.clone().unwrap_or_else(|| {
                    "The team is deadlocked: above are the members' latest answers. Decide. Explain briefly and end with a line 'Answer: <the decision>'.".into()
                });
                let shown: Vec<Shown> = self
                    .rounds
                    .latest
                    .iter()
                    .enumerate()
                    .filter_map(|(i, a)| a.as_ref().map(|a| Shown::new(&self.rounds.members[i], &a.text)))
                    .collect();
                let r = self.rounds.round;
                vec![
                    Duty::speak("decide", Kind::Message, r, Some(Arc::from(i)), false, View::Shown(shown))
                        .with_parents(self.rounds.latest.iter().flatten().map(|a| a.id.clone()).collect()),
                ]
            }
            _ => Vec::new(),
        }
    }

    fn finished(&self, _facts: &Facts<'_>) -> Option<Finish> {
        if self.phase != Phase::Done {
            return None;
        }
        let rounds = self.rounds.round;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        let leader = &self.spec.leader;
        let counts = self.outcome.as_ref().map(Outcome::describe).unwrap_or_default();
        if self.agreed {
            let o = self.outcome.as_ref()?;
            let w = o.winner()?;
            return Some(Finish {
                reason: format!(
                    "the peers agreed in round {rounds} ({:.0}% ≥ {:.0}%) without the leader [{counts}]",
                    o.share * 100.0,
                    self.spec.threshold * 100.0
                ),
                answer: Some(Arc::from(w.answer.as_str())),
                decided_by: ballot_ids(&self.rounds, &w.supporters),
            });
        }
        Some(match &self.decision {
            Some((answer, id)) => Finish {
                reason: format!("deadlock after {n_rounds}; the leader {leader} decided [{counts}]"),
                answer: Some(answer.clone()),
                decided_by: vec![id.clone()],
            },
            None => {
                let why = if self.decide_failed { "its decision failed" } else { "it is absent" };
                Finish {
                    reason: format!(
                        "deadlock after {n_rounds} and the leader {leader} cannot decide: {why} [{counts}]"
                    ),
                    answer: None,
                    decided_by: Vec::new(),
                }
            }
        })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.rounds.round,
            consensus: self.agreed,
            confidence: self.outcome.as_ref().map(|o| o.share),
            rounds_without_change: self.rounds.unchanged,
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        if let Some(d) = &self.decision {
            return Some(d.clone());
        }
        let l = self.outcome.as_ref()?.leader()?;
        Some((Arc::from(l.answer.as_str()), l.first_id.clone()?))
    }
}
