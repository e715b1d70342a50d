//! Adversarial consensus: a designated devil's advocate must argue against every
//! proposal; consensus is reached only when it can no longer raise a valid objection,
//! as decided by the other peers' vote or by a judge.
//!
//! - **Steps.** Round r: the proposer's `r{r}/propose` (a proposal); the advocate's
//!   `r{r}/object` (a message); then either the judge's `r{r}/rule` (a verdict) or
//!   every voter's `r{r}/vote` (a vote).
//! - **Duties.** The advocate answers with JSON `{"objection": "...", "concede":
//!   true|false}`: it must object, and concedes only when no valid objection is left.
//!   The judge answers `{"objection_valid": true|false, "reason": "..."}`; a voter
//!   `{"valid": true|false, "reason": "..."}`.
//! - **Decision.** A concession is consensus on the proposal. Otherwise the objection
//!   is dismissed — consensus — when the judge rules it invalid, or when more than half
//!   of the voters present vote it invalid. An objection that stands sends the
//!   proposal back for revision; after the last round the session ends without
//!   consensus and without an answer.
//! - **Ties.** A tied vote does not dismiss the objection (the advocate's job is to
//!   be taken seriously).
//! - **Malformed and failed rulings.** A vote or ruling without the boolean does not
//!   dismiss the objection; any peer records a rejection (a collective failure
//!   envelope `…/malformed`). A failed objection decides nothing and the round is
//!   repeated; a failed proposal ends its round.
//! - **Absent peers.** An absent advocate can raise no objection: the proposal stands.
//!   An absent judge hands the ruling to the voters (if there are none, the objection
//!   stands). Absent voters are not waited for or counted; an absent proposer ends the
//!   session without consensus.
//!
//! Team-file keys: `advocate` (required), `proposer` (the first peer), `voters` (the
//! others, unless a `judge` is given), `judge`, `rounds` (3), `instruction`,
//! `advocate_instruction`, `vote_instruction`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::consensus::{read_approval, record_vote};
use super::{Due, Duty, Facts, Finish, Reducer, View, is_round_step, rejection};
use crate::envelope::{EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::AdversarialSpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Propose,
    Object,
    Decide,
    Done,
}

pub struct Adversarial {
    spec: AdversarialSpec,
    round: u32,
    phase: Phase,
    proposal: Option<(Arc<str>, EnvelopeId)>,
    objection: Option<EnvelopeId>,
    /// Votes on the objection: `Some(valid)`, `None` for failed or malformed.
    votes: BTreeMap<PeerId, Option<bool>>,
    /// The judge's ruling this round: `Some(valid)`, `None` for failed or malformed.
    ruling: Option<Option<bool>>,
    agreed: bool,
    why: String,
    pending: Vec<(String, PeerId, EnvelopeId)>,
    /// Whether the last entry folded in moved the protocol (see [`Reducer::due`]).
    moved: bool,
}

impl Adversarial {
    pub fn new(spec: AdversarialSpec) -> Self {
        Adversarial {
            spec,
            round: 0,
            phase: Phase::Propose,
            proposal: None,
            objection: None,
            votes: BTreeMap::new(),
            ruling: None,
            agreed: false,
            why: String::new(),
            pending: Vec::new(),
            moved: false,
        }
    }

    fn judge_rules(&self, facts: &Facts<'_>) -> bool {
        self.spec.judge.as_ref().is_some_and(|j| !facts.is_absent(j))
    }

    fn agree(&mut self, why: String) {
        self.agreed = true;
        self.phase = Phase::Done;
        self.why = why;
    }

    fn next_round(&mut self, why_last: String) {
        if self.round + 1 < self.spec.rounds {
            self.round += 1;
            self.phase = Phase::Propose;
            self.votes.clear();
            self.ruling = None;
            self.objection = None;
        } else {
            self.phase = Phase::Done;
            self.why = why_last;
        }
    }

    fn check(&mut self, facts: &Facts<'_>) {
        let r = self.round + 1;
        let rounds = self.spec.rounds;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        if self.phase == Phase::Done {
            return;
        }
        if facts.is_absent(&self.spec.proposer) {
            self.phase = Phase::Done;
            self.why = format!("the proposer {} is absent", self.spec.proposer);
            return;
        }
        if self.phase == Phase::Object && facts.is_absent(&self.spec.advocate) {
            return self.agree(format!(
                "the devil's advocate {} is absent and can raise no objection (round {r})",
                self.spec.advocate
            ));
        }
        if self.phase != Phase::Decide {
            return;
        }
        if self.judge_rules(facts) {
            match self.ruling {
                None => {}
                Some(Some(false)) => self.agree(format!("consensus in round {r}: the judge dismissed the objection")),
                Some(_) => {
                    self.next_round(format!("no consensus after {n_rounds}: the judge upheld the last objection"))
                }
            }
            return;
        }
        let present: Vec<&PeerId> = self.spec.voters.iter().filter(|v| !facts.is_absent(v)).collect();
        if !present.iter().all(|v| self.votes.contains_key(*v)) {
            return;
        }
        let invalid = present.iter().filter(|v| self.votes.get(**v) == Some(&Some(false))).count();
        let n = present.len();
        if n > 0 && invalid * 2 > n {
            self.agree(format!("consensus in round {r}: {invalid} of {n} voters found the objection invalid"));
        } else {
            let why = if n == 0 {
                "no one could rule on the last objection".to_string()
            } else {
                format!("the last objection stood ({invalid} of {n} found it invalid)")
            };
            self.next_round(format!("no consensus after {n_rounds}: {why}"));
        }
    }

    /// What every member's duty follows (see [`Reducer::due`]).
    fn stage(&self) -> (u32, Phase, Option<EnvelopeId>, Option<EnvelopeId>, usize, bool) {
        (
            self.round,
            self.phase,
            self.proposal.as_ref().map(|p| p.1.clone()),
            self.objection.clone(),
            self.pending.len(),
            self.ruling.is_some(),
        )
    }

    /// Fold one entry in (see [`Reducer::apply`]).
    fn fold(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let step = env.step.as_ref();
        let r = self.round;
        match self.phase {
            Phase::Propose if env.from == self.spec.proposer && is_round_step(step, r, "propose") => match env.kind {
                Kind::Proposal => {
                    self.proposal = Some((env.body.text.clone(), env.id.clone()));
                    self.phase = Phase::Object;
                }
                Kind::Failure => self.next_round(format!(
                    "no consensus after {}: the last proposal failed",
                    crate::readable::count(self.spec.rounds, "round", "rounds")
                )),
                _ => {}
            },
            Phase::Object if env.from == self.spec.advocate && is_round_step(step, r, "object") => match env.kind {
                Kind::Message => {
                    let concede = read_approval(env, "concede") == Some(true)
                        && env.body.json.as_ref().and_then(|j| j.get("concede")).is_some();
                    if concede {
                        self.agree(format!("consensus in round {}: the devil's advocate conceded", r + 1));
                    } else {
                        self.objection = Some(env.id.clone());
                        self.phase = Phase::Decide;
                    }
                }
                Kind::Failure => self.next_round(format!(
                    "no consensus after {}: the last objection failed",
                    crate::readable::count(self.spec.rounds, "round", "rounds")
                )),
                _ => {}
            },
            Phase::Decide => {
                if Some(&env.from) == self.spec.judge.as_ref()
                    && is_round_step(step, r, "rule")
                    && self.ruling.is_none()
                {
                    let v = match env.kind {
                        Kind::Verdict => {
                            let v = read_approval(env, "objection_valid");
                            if v.is_none() {
                                self.pending.push((format!("r{r}/rule/malformed"), env.from.clone(), env.id.clone()));
                            }
                            v
                        }
                        _ => None,
                    };
                    if matches!(env.kind, Kind::Verdict | Kind::Failure) {
                        self.ruling = Some(v);
                    }
                } else if self.spec.voters.contains(&env.from)
                    && is_round_step(step, r, "vote")
                    && !self.votes.contains_key(&env.from)
                {
                    record_vote(&mut self.votes, &mut self.pending, env, r, "valid");
                }
            }
            _ => {}
        }
        if env.kind == Kind::Failure {
            self.pending.retain(|(s, ..)| s != step);
        }
        self.check(facts);
    }
}

impl Reducer for Adversarial {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let before = self.stage();
        self.fold(entry, facts);
        self.moved = before != self.stage();
    }

    /// Every duty follows the round, the phase, the proposal, the objection and the
    /// ruling (a voter's own vote ends only its own, and its author is woken for it); a
    /// rejection to record is everyone's.
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.moved { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        let r = self.round;
        let mut parents: Vec<EnvelopeId> = self.proposal.iter().map(|p| p.1.clone()).collect();
        parents.extend(self.objection.iter().cloned());
        let mut out = Vec::new();
        let say = |step: String, kind: Kind, instruction: String, json: bool| {
            Duty::speak(step, kind, r, Some(Arc::from(instruction)), json, View::History).with_parents(parents.clone())
        };
        match self.phase {
            Phase::Propose if *me == self.spec.proposer => {
                let i = self.spec.instruction.clone().unwrap_or_else(|| {
                    if r == 0 {
                        "Propose a solution. Be concrete. End with a line 'Answer: <the proposal in one line>'.".into()
                    } else {
                        "The devil's advocate's objection stood. Revise your proposal to meet it, or restate it with a better defence. End with a line 'Answer: <the proposal in one line>'.".into()
                    }
                });
                out.push(say(format!("r{r}/propose"), Kind::Proposal, i, false));
            }
            Phase::Object if *me == self.spec.advocate => {
                let i = self.spec.advocate_instruction.clone().unwrap_or_else(|| {
                    "You are the devil's advocate: argue against the latest proposal with the strongest objection you can find. \
                     Reply with a JSON object {\"objection\": \"<your objection>\", \"concede\": false}. \
                     Only if you can find no valid objection at all, reply {\"objection\": \"\", \"concede\": true}."
                        .into()
                });
                out.push(say(format!("r{r}/object"), Kind::Message, i, true));
            }
            Phase::Decide
                if self.judge_rules(facts) && Some(me) == self.spec.judge.as_ref() && self.ruling.is_none() =>
            {
                let i = self.spec.vote_instruction.clone().unwrap_or_else(|| {
                    "Rule on the devil's advocate's objection to the latest proposal. Reply with a JSON object {\"objection_valid\": true|false, \"reason\": \"<why>\"}.".into()
                });
                out.push(say(format!("r{r}/rule"), Kind::Verdict, i, true));
            }
            Phase::Decide
                if !self.judge_rules(facts) && self.spec.voters.contains(me) && !self.votes.contains_key(me) =>
            {
                let i = self.spec.vote_instruction.clone().unwrap_or_else(|| {
                    "Is the devil's advocate's objection to the latest proposal valid? Reply with a JSON object {\"valid\": true|false, \"reason\": \"<why>\"}.".into()
                });
                out.push(say(format!("r{r}/vote"), Kind::Vote, i, true));
            }
            _ => {}
        }
        for (step, p, id) in &self.pending {
            out.push(rejection(
                step.clone(),
                r,
                p,
                "malformed_vote",
                format!("the ruling of {p} on the objection states neither valid nor invalid; it does not dismiss it"),
                id,
            ));
        }
        out
    }

    fn finished(&self, _facts: &Facts<'_>) -> Option<Finish> {
        if self.phase != Phase::Done || !self.pending.is_empty() {
            return None;
        }
        if self.agreed {
            let (text, id) = self.proposal.clone()?;
            let mut decided_by = vec![id];
            decided_by.extend(self.objection.iter().cloned());
            return Some(Finish { reason: self.why.clone(), answer: Some(text), decided_by });
        }
        Some(Finish { reason: self.why.clone(), answer: None, decided_by: Vec::new() })
    }

    fn signals(&self) -> Signals {
        Signals { round: self.round, consensus: self.agreed, verdict: self.agreed, ..Default::default() }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        self.proposal.clone()
    }
}
