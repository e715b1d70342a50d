//! Explicit consensus: a peer proposes, the others approve or reject with reasons;
//! below the threshold the proposal is revised and voted again.
//!
//! - **Steps.** Round r: the proposer's `r{r}/propose` (a proposal); then every
//!   voter's `r{r}/vote` (a vote).
//! - **Duties.** The proposer speaks with its visible history (in later rounds it has
//!   the reasons of the rejections). A voter answers with JSON
//!   `{"approve": true|false, "reason": "..."}`; `{"vote": "approve"|"reject"}` is
//!   read too, and a free-text reply by its words (see [`free_text_approval`]).
//! - **Decision.** The approval share is the approvals over the voters present (a
//!   failed or malformed vote is not an approval). At or above `threshold` the
//!   proposal is adopted and the session ends with it. Below it, the proposer revises;
//!   after the last round the session ends without consensus and without an answer
//!   (the reason names the best-supported proposal).
//! - **Ties.** A share exactly at the threshold passes.
//! - **Malformed votes.** Any peer records a rejection (a collective failure envelope
//!   `r{r}/vote/{voter}/malformed` naming it); the vote counts as no approval.
//! - **Absent peers.** Absent voters are not waited for and not counted. With every
//!   voter absent, or the proposer absent, the session ends without consensus.
//!
//! Team-file keys: `proposer` (the first peer), `voters` (the others), `threshold`
//! (2/3), `rounds` (3), `instruction`, `vote_instruction`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Due, Duty, Facts, Finish, Reducer, View, is_round_step, rejection};
use crate::envelope::{Envelope, EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::ConsensusSpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Propose,
    Vote,
    Done,
}

/// Record `env` as its sender's vote in round `r`: `Some(approve)` read from `field`,
/// or `None` for a failed call or a malformed ballot — the latter also queued in
/// `pending` for a recorded rejection. Shared by the consensus and adversarial
/// protocols.
pub(crate) fn record_vote(
    votes: &mut BTreeMap<PeerId, Option<bool>>,
    pending: &mut Vec<(String, PeerId, EnvelopeId)>,
    env: &Envelope,
    r: u32,
    field: &str,
) {
    match env.kind {
        Kind::Vote => {
            let v = read_approval(env, field);
            if v.is_none() {
                pending.push((format!("r{r}/vote/{}/malformed", env.from), env.from.clone(), env.id.clone()));
            }
            votes.insert(env.from.clone(), v);
        }
        Kind::Failure => {
            votes.insert(env.from.clone(), None);
        }
        _ => {}
    }
}

/// A vote read from a reply: approve or not; `None` when it cannot be read.
pub fn read_approval(env: &Envelope, field: &str) -> Option<bool> {
    if let Some(j) = &env.body.json {
        match j.get(field) {
            Some(serde_json::Value::Bool(b)) => return Some(*b),
            Some(serde_json::Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" => return Some(true),
                "false" | "no" => return Some(false),
                _ => {}
            },
            _ => {}
        }
        if let Some(v) = j.get("vote").and_then(|v| v.as_str()) {
            match v.trim().to_ascii_lowercase().as_str() {
                "approve" | "approved" | "yes" => return Some(true),
                "reject" | "rejected" | "no" => return Some(false),
                _ => {}
            }
        }
    }
    free_text_approval(&env.body.text)
}

/// A free-text vote: the words of the reply, case and punctuation ignored. `approve`,
/// `approved`, `approves` and `lgtm` approve; `reject`, `rejected`, `rejects` reject,
/// and so does an approving word right after a negation (`not`, `don't`, `cannot`,
/// `can't`, `won't`, `never`). A reply with approving and rejecting words both, or
/// neither, cannot be read (`None`). So "LGTM, approve" and "Approve - fine to merge"
/// read the same, wherever the word stands.
pub fn free_text_approval(text: &str) -> Option<bool> {
    let words: Vec<String> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}'))
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase().replace('\u{2019}', "'"))
        .collect();
    let (mut yes, mut no) = (false, false);
    for (i, w) in words.iter().enumerate() {
        let negated =
            i > 0 && matches!(words[i - 1].as_str(), "not" | "don't" | "cannot" | "can't" | "won't" | "never");
        match w.as_str() {
            "approve" | "approved" | "approves" | "lgtm" if negated => no = true,
            "approve" | "approved" | "approves" | "lgtm" => yes = true,
            "reject" | "rejected" | "rejects" => no = true,
            _ => {}
        }
    }
    match (yes, no) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

pub struct Consensus {
    spec: ConsensusSpec,
    round: u32,
    phase: Phase,
    proposal: Option<(Arc<str>, EnvelopeId)>,
    /// This round's votes: `Some(approve)`, `None` for failed or malformed.
    votes: BTreeMap<PeerId, Option<bool>>,
    /// The best-supported proposal so far: (share, text, id, round).
    best: Option<(f64, Arc<str>, EnvelopeId, u32)>,
    share: Option<f64>,
    adopted: bool,
    why: String,
    pending: Vec<(String, PeerId, EnvelopeId)>,
    /// Whether the last entry folded in moved the protocol (see [`Reducer::due`]).
    moved: bool,
}

impl Consensus {
    pub fn new(spec: ConsensusSpec) -> Self {
        Consensus {
            spec,
            round: 0,
            phase: Phase::Propose,
            proposal: None,
            votes: BTreeMap::new(),
            best: None,
            share: None,
            adopted: false,
            why: String::new(),
            pending: Vec::new(),
            moved: false,
        }
    }

    fn end_round(&mut self, why_last: String) {
        if self.round + 1 < self.spec.rounds {
            self.round += 1;
            self.phase = Phase::Propose;
            self.votes.clear();
        } else {
            self.phase = Phase::Done;
            self.why = why_last;
        }
    }

    fn check(&mut self, facts: &Facts<'_>) {
        if self.phase == Phase::Done {
            return;
        }
        if facts.is_absent(&self.spec.proposer) {
            self.phase = Phase::Done;
            self.why = format!("the proposer {} is absent", self.spec.proposer);
            return;
        }
        if self.phase != Phase::Vote {
            return;
        }
        let present: Vec<&PeerId> = self.spec.voters.iter().filter(|v| !facts.is_absent(v)).collect();
        if present.is_empty() {
            self.phase = Phase::Done;
            self.why = "every voter is absent".into();
            return;
        }
        if !present.iter().all(|v| self.votes.contains_key(*v)) {
            return;
        }
        let approvals = present.iter().filter(|v| self.votes.get(**v) == Some(&Some(true))).count();
        let share = approvals as f64 / present.len() as f64;
        self.share = Some(share);
        let (text, id) = self.proposal.clone().expect("votes follow a proposal");
        if self.best.as_ref().is_none_or(|b| share >= b.0) {
            self.best = Some((share, text, id, self.round));
        }
        let summary = format!(
            "{approvals} of {} voters approve ({:.0}%, threshold {:.0}%)",
            present.len(),
            share * 100.0,
            self.spec.threshold * 100.0
        );
        if share + 1e-12 >= self.spec.threshold {
            self.adopted = true;
            self.phase = Phase::Done;
            self.why = format!("consensus in round {}: {summary}", self.round + 1);
        } else {
            let rounds = self.spec.rounds;
            let n_rounds = crate::readable::count(rounds, "round", "rounds");
            self.end_round(format!("no consensus after {n_rounds}: last round {summary}"));
        }
    }

    /// What every member's duty follows (see [`Reducer::due`]).
    fn stage(&self) -> (u32, Phase, Option<EnvelopeId>, usize) {
        (self.round, self.phase, self.proposal.as_ref().map(|p| p.1.clone()), self.pending.len())
    }

    /// Fold one entry in (see [`Reducer::apply`]).
    fn fold(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let step = env.step.as_ref();
        let r = self.round;
        if self.phase == Phase::Propose && env.from == self.spec.proposer && is_round_step(step, r, "propose") {
            match env.kind {
                Kind::Proposal => {
                    self.proposal = Some((env.body.text.clone(), env.id.clone()));
                    self.phase = Phase::Vote;
                }
                Kind::Failure => {
                    let rounds = self.spec.rounds;
                    let n_rounds = crate::readable::count(rounds, "round", "rounds");
                    self.end_round(format!("no consensus after {n_rounds}: the last proposal failed"));
                }
                _ => {}
            }
        } else if self.phase == Phase::Vote
            && self.spec.voters.contains(&env.from)
            && is_round_step(step, r, "vote")
            && !self.votes.contains_key(&env.from)
        {
            record_vote(&mut self.votes, &mut self.pending, env, r, "approve");
        }
        if env.kind == Kind::Failure {
            self.pending.retain(|(s, ..)| s != step);
        }
        self.check(facts);
    }
}

impl Reducer for Consensus {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let before = self.stage();
        self.fold(entry, facts);
        self.moved = before != self.stage();
    }

    /// The proposer's duty and every voter's follow the round, the phase and the
    /// proposal; a voter's own vote ends only its author's, who is woken for it; a
    /// rejection to record is everyone's. So an entry that moves none of these (another
    /// voter's vote) changes no one else's duty.
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.moved { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, _facts: &Facts<'_>) -> Vec<Duty> {
        let r = self.round;
        let parents: Vec<EnvelopeId> = self.proposal.iter().map(|p| p.1.clone()).collect();
        let mut out = Vec::new();
        match self.phase {
            Phase::Propose if *me == self.spec.proposer => {
                let instruction = self.spec.instruction.clone().unwrap_or_else(|| {
                    if r == 0 {
                        "Propose a solution the team can agree on. Be concrete. End with a line 'Answer: <the proposal in one line>'.".into()
                    } else {
                        "Your proposal did not reach the approval threshold. Revise it to address the reasons given for rejecting it. End with a line 'Answer: <the proposal in one line>'.".into()
                    }
                });
                out.push(
                    Duty::speak(
                        format!("r{r}/propose"),
                        Kind::Proposal,
                        r,
                        Some(Arc::from(instruction)),
                        false,
                        View::History,
                    )
                    .with_parents(parents),
                );
            }
            Phase::Vote if self.spec.voters.contains(me) && !self.votes.contains_key(me) => {
                let instruction = self.spec.vote_instruction.clone().unwrap_or_else(|| {
                    "Vote on the latest proposal. Reply with a JSON object {\"approve\": true|false, \"reason\": \"<why; what would change your mind>\"}.".into()
                });
                out.push(
                    Duty::speak(format!("r{r}/vote"), Kind::Vote, r, Some(Arc::from(instruction)), true, View::History)
                        .with_parents(parents),
                );
            }
            _ => {}
        }
        for (step, p, id) in &self.pending {
            out.push(rejection(
                step.clone(),
                r,
                p,
                "malformed_vote",
                format!("the vote of {p} neither approves nor rejects; it counts as no approval"),
                id,
            ));
        }
        out
    }

    fn finished(&self, _facts: &Facts<'_>) -> Option<Finish> {
        if self.phase != Phase::Done || !self.pending.is_empty() {
            return None;
        }
        if self.adopted {
            let (text, id) = self.proposal.clone()?;
            return Some(Finish { reason: self.why.clone(), answer: Some(text), decided_by: vec![id] });
        }
        let best = match &self.best {
            Some((share, _, _, round)) => {
                format!("; the best-supported proposal (round {}) had {:.0}%", round + 1, share * 100.0)
            }
            None => String::new(),
        };
        Some(Finish { reason: format!("{}{best}", self.why), answer: None, decided_by: Vec::new() })
    }

    fn signals(&self) -> Signals {
        Signals { round: self.round, consensus: self.adopted, confidence: self.share, ..Default::default() }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        if let Some((_, t, id, _)) = &self.best {
            return Some((t.clone(), id.clone()));
        }
        self.proposal.clone()
    }
}

#[cfg(test)]
mod free_text_tests {
    use super::free_text_approval as read;

    #[test]
    fn free_text_votes_read_the_same_wherever_the_word_stands() {
        assert_eq!(read("Approve - simpler now, fine to merge."), Some(true));
        assert_eq!(read("LGTM from security, approve."), Some(true));
        assert_eq!(read("lgtm"), Some(true));
        assert_eq!(read("REJECT: string concatenation into SQL"), Some(false));
        assert_eq!(read("I do not approve this patch."), Some(false));
        assert_eq!(read("I can\u{2019}t approve it yet."), Some(false));
        assert_eq!(read("Approve the idea, reject the patch."), None, "both: cannot be read");
        assert_eq!(read("Looks fine to me."), None, "neither");
        assert_eq!(read("Disapprove."), None, "a word, not a substring");
    }
}
