//! Emergent consensus: peers iterate until their latest answers converge, measured by
//! pairwise similarity.
//!
//! - **Steps.** Simultaneous rounds as in [`super::rounds`] (`r{r}/answer`): round 0
//!   alone, later rounds seeing the others' answers from the round before. With
//!   embedding similarity, each closed round is measured by the measurer's
//!   `r{r}/measure` (a verdict envelope holding the similarity of every pair).
//! - **Similarity.** `lexical` (the default): cosine of word counts
//!   ([`crate::similarity::lexical`]), computed by every peer's reducer from the log.
//!   `embedding`: the measurer (the configured peer, or the first present member)
//!   embeds the answers with its [`crate::model::Embedder`] — a budget-checked call,
//!   recorded with its usage — and records the similarities; reducers read the
//!   recorded numbers, never call the embedder themselves. When the measurement
//!   fails (or no embedder is configured) that round falls back to lexical.
//!   `compare = "answer"` compares stated answers (`Answer: …`) instead of whole
//!   texts.
//! - **Decision.** After each round, when the least similar pair of the present
//!   members' latest answers is at or above `threshold`, the answers have converged:
//!   the session ends with the medoid answer (the one most similar to the others; ties
//!   by team order). After the last round without convergence it ends without an
//!   answer (the reason names the medoid).
//! - **Failures and absent members.** As in [`super::rounds`]; only present members'
//!   answers are compared. An absent measurer's duty passes to the next present member.
//!
//! Team-file keys: `members` (every peer), `rounds` (5), `threshold` (0.8),
//! `similarity` (`lexical` | `embedding`), `compare` (`text` | `answer`), `measurer`
//! (embedding only), `instruction`, `update_instruction`.

use std::sync::Arc;

use super::rounds::{ANSWER_FIRST, ANSWER_UPDATE, Answered, Rounds};
use super::{Action, Due, Duty, Facts, Finish, Reducer, Shown, is_round_step};
use crate::envelope::{EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::similarity::{Pairwise, lexical};
use crate::team::{Compare, EmergentSpec, SimilarityKind};
use crate::termination::Signals;

pub struct Emergent {
    spec: EmergentSpec,
    rounds: Rounds,
    /// The closed round waits for its measurement (embedding similarity).
    measuring: bool,
    /// The members compared in the last measurement, and how.
    measured: Option<Measured>,
    converged: bool,
    done: bool,
    /// Whether the last entry folded in opened a round, started or ended a
    /// measurement, or ended the protocol (see [`Reducer::due`]).
    moved: bool,
}

#[derive(Clone, Debug)]
struct Measured {
    peers: Vec<usize>,
    pairwise: Pairwise,
    method: &'static str,
}

impl Emergent {
    pub fn new(spec: EmergentSpec) -> Self {
        Emergent {
            rounds: Rounds::new(spec.members.clone()),
            spec,
            measuring: false,
            measured: None,
            converged: false,
            done: false,
            moved: false,
        }
    }

    fn compared(&self, a: &Answered) -> Arc<str> {
        match self.spec.compare {
            Compare::Text => a.text.clone(),
            Compare::Answer => a.answer.answer.clone(),
        }
    }

    /// The present members with an answer, by index.
    fn present(&self, facts: &Facts<'_>) -> Vec<usize> {
        (0..self.rounds.members.len())
            .filter(|&i| !facts.is_absent(&self.rounds.members[i]) && self.rounds.latest[i].is_some())
            .collect()
    }

    fn measurer<'a>(&'a self, facts: &Facts<'_>) -> Option<&'a PeerId> {
        self.spec.measurer.iter().chain(self.rounds.members.iter()).find(|p| !facts.is_absent(p))
    }

    fn lexical_now(&self, facts: &Facts<'_>) -> Measured {
        let peers = self.present(facts);
        let texts: Vec<Arc<str>> =
            peers.iter().map(|&i| self.compared(self.rounds.latest[i].as_ref().expect("answered"))).collect();
        Measured { pairwise: Pairwise::of(texts.len(), |i, j| lexical(&texts[i], &texts[j])), peers, method: "lexical" }
    }

    fn decide(&mut self, m: Measured) {
        self.converged = m.peers.len() >= 2 && m.pairwise.min + 1e-12 >= self.spec.threshold;
        self.measured = Some(m);
        self.measuring = false;
        if self.converged || self.rounds.round + 1 >= self.spec.rounds {
            self.done = true;
            self.rounds.close();
        } else {
            self.rounds.close();
        }
    }

    fn medoid(&self) -> Option<&Answered> {
        let m = self.measured.as_ref()?;
        let k = m.pairwise.medoid(m.peers.len())?;
        self.rounds.latest[m.peers[k]].as_ref()
    }

    /// Fold one entry in (see [`Reducer::apply`]).
    fn fold(&mut self, entry: &Entry, facts: &Facts<'_>) {
        if self.done {
            return;
        }
        let env = &entry.env;
        if self.measuring {
            if is_round_step(&env.step, self.rounds.round, "measure")
                && matches!(env.kind, Kind::Verdict | Kind::Failure)
            {
                let recorded = (env.kind == Kind::Verdict)
                    .then(|| env.body.json.as_ref())
                    .flatten()
                    .and_then(|j| serde_json::from_value::<Pairwise>(j.get("similarity")?.clone()).ok());
                let peers_of = |j: &serde_json::Value| -> Option<Vec<usize>> {
                    j.get("peers")?.as_array()?.iter().map(|p| self.rounds.index(&PeerId::from(p.as_str()?))).collect()
                };
                let peers = env.body.json.as_ref().and_then(peers_of);
                let m = match (recorded, peers) {
                    (Some(pairwise), Some(peers)) => Measured { peers, pairwise, method: "embedding" },
                    _ => self.lexical_now(facts),
                };
                self.decide(m);
            }
            return;
        }
        self.rounds.observe(env);
        if self.rounds.round_complete(facts) {
            if self.spec.similarity == SimilarityKind::Embedding && self.present(facts).len() >= 2 {
                self.measuring = true;
            } else {
                let m = self.lexical_now(facts);
                self.decide(m);
            }
        } else if self.rounds.all_absent(facts) {
            self.done = true;
        }
    }
}

impl Reducer for Emergent {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let before = (self.rounds.round, self.measuring, self.done);
        self.fold(entry, facts);
        self.moved = before != (self.rounds.round, self.measuring, self.done);
    }

    /// A member's duty depends on the round, on whether a measurement is asked for (and
    /// of whom: an absence, which wakes everyone anyway) and on its own answer, which
    /// its author is woken for: other answers change no one else's duty until the round
    /// closes.
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.moved { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        if self.done {
            return Vec::new();
        }
        if self.measuring {
            if self.measurer(facts) != Some(me) {
                return Vec::new();
            }
            let texts: Vec<Shown> = self
                .present(facts)
                .into_iter()
                .map(|i| {
                    Shown::new(
                        &self.rounds.members[i],
                        &self.compared(self.rounds.latest[i].as_ref().expect("answered")),
                    )
                })
                .collect();
            let r = self.rounds.round;
            return vec![Duty {
                step: Arc::from(format!("r{r}/measure")),
                kind: Kind::Verdict,
                to: crate::envelope::Recipient::All,
                round: r,
                parents: self.rounds.latest.iter().flatten().map(|a| a.id.clone()).collect(),
                action: Action::Measure { texts },
                collective: false,
            }];
        }
        let first = self.spec.instruction.as_deref().unwrap_or(ANSWER_FIRST);
        let update = self.spec.update_instruction.as_deref().unwrap_or(ANSWER_UPDATE);
        self.rounds.duty(me, first, update, false).into_iter().collect()
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        if !self.done {
            return None;
        }
        let Some(m) = &self.measured else {
            return Some(Finish { reason: "every member is absent".into(), answer: None, decided_by: Vec::new() });
        };
        let medoid = self.medoid();
        let th = self.spec.threshold;
        let rounds = self.rounds.round;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        let _ = facts;
        Some(if self.converged {
            let a = medoid?;
            Finish {
                reason: format!(
                    "converged in round {rounds}: least similar pair {:.2} ≥ {th:.2} ({})",
                    m.pairwise.min, m.method
                ),
                answer: Some(match self.spec.compare {
                    Compare::Answer => a.answer.answer.clone(),
                    Compare::Text => a.text.clone(),
                }),
                decided_by: m
                    .peers
                    .iter()
                    .filter_map(|&i| self.rounds.latest[i].as_ref().map(|a| a.id.clone()))
                    .collect(),
            }
        } else {
            let who = medoid
                .and_then(|a| self.rounds.latest.iter().position(|l| l.as_ref() == Some(a)))
                .map(|i| self.rounds.members[i].to_string());
            Finish {
                reason: format!(
                    "did not converge in {n_rounds}: least similar pair {:.2} < {th:.2} ({}); closest to the others: {}",
                    m.pairwise.min,
                    m.method,
                    who.unwrap_or_else(|| "none".into())
                ),
                answer: None,
                decided_by: Vec::new(),
            }
        })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.rounds.round,
            convergence: self.measured.as_ref().map(|m| m.pairwise.min),
            consensus: self.converged,
            rounds_without_change: self.rounds.unchanged,
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        let a = self.medoid().or_else(|| self.rounds.latest.iter().flatten().last())?;
        Some((a.text.clone(), a.id.clone()))
    }
}
