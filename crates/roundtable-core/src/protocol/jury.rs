//! Jury: every juror answers independently and no juror can see another's answer
//! before committing to its own — commit-reveal voting — then the revealed answers
//! are counted.
//!
//! - **Steps.** Round r: every juror's `jury/r{r}/commit` (a commit envelope: a hash
//!   commitment and the answer sealed, see [`super::seal`]); once every present juror
//!   has committed (or failed), every committed juror's `jury/r{r}/reveal` (the answer
//!   and the salt).
//! - **Duties.** Commit: call the model with the task alone (round 0) or with the
//!   previous round's revealed answers (later rounds), and seal the answer. Reveal:
//!   open the peer's own seal — no model call — and post it.
//! - **Checks.** Every peer recomputes each commitment from the revealed answer and
//!   salt. A reveal that does not match its commitment, one posted before every juror
//!   committed, or one whose answer cannot be read (a malformed vote: no `Answer:` line
//!   and no JSON `answer`) is rejected: it does not count, and any peer records the
//!   rejection (a collective failure envelope `jury/r{r}/reject/{juror}` naming it).
//! - **Decision.** The valid ballots are counted by the aggregation rule: `plurality`
//!   (the most votes), `approval` (the leader needs at least `threshold` of the valid
//!   ballots, default 60%), or `confidence` (votes weighted by ReConcile's recalibrated
//!   confidence buckets). A round that decides ends the session with the winning
//!   answer. One that does not (threshold not met, no valid ballot) opens the next
//!   round, where jurors see the revealed answers, or after the last round ends the
//!   session as a hung jury, without an answer.
//! - **Ties.** The answer whose first supporter comes first in team order wins.
//! - **Failures.** A failed commit means no vote in that round. A juror that cannot
//!   open its seal (it restarted without the secret it committed with) records that it
//!   forfeits; its vote does not count.
//! - **A juror that crashes between commit and reveal** reveals when it comes back:
//!   its answer is sealed on the log, and its salt and key are re-derived from its
//!   secret, so it reveals exactly what it committed to without calling its model
//!   again. If it does not come back, it is noticed absent and the round is counted
//!   without it. Without presence the session waits for it until a termination
//!   condition (e.g. `timeout`) stops it with the best answer so far.
//!
//! Team-file keys: `members` (the jurors: every peer), `aggregation` (`plurality` |
//! `approval` | `confidence`), `threshold` (approval only, 0.6), `rounds` (1),
//! `instruction`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::answers::{Ballot, Outcome, Rule, extract, tally};
use super::rounds::{ANSWER_FIRST, ANSWER_JSON, team_order};
use super::{Action, Due, Duty, Facts, Finish, Reducer, Shown, View, rejection, seal};
use crate::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::peer::parse_json_answer;
use crate::team::JurySpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Commit,
    Reveal,
    Done,
}

#[derive(Clone, Debug)]
enum Committed {
    Sealed(Arc<Envelope>),
    Failed,
}

#[derive(Clone, Debug)]
enum Revealed {
    Valid(Ballot),
    Rejected(&'static str),
    Failed,
}

pub struct Jury {
    spec: JurySpec,
    round: u32,
    phase: Phase,
    commits: BTreeMap<PeerId, Committed>,
    reveals: BTreeMap<PeerId, Revealed>,
    /// Rejections to record: (round, juror, error, explanation, envelope).
    pending: Vec<(u32, PeerId, &'static str, String, EnvelopeId)>,
    /// The previous round's valid reveals (shown in the next round).
    previous: Vec<(PeerId, Arc<str>)>,
    outcome: Option<Outcome>,
    decided: bool,
    /// Whether the last entry folded in moved the protocol (see [`Reducer::due`]).
    moved: bool,
}

impl Jury {
    pub fn new(spec: JurySpec) -> Self {
        Jury {
            spec,
            round: 0,
            phase: Phase::Commit,
            commits: BTreeMap::new(),
            reveals: BTreeMap::new(),
            pending: Vec::new(),
            previous: Vec::new(),
            outcome: None,
            decided: false,
            moved: false,
        }
    }

    fn commit_step(r: u32) -> String {
        format!("jury/r{r}/commit")
    }
    fn reveal_step(r: u32) -> String {
        format!("jury/r{r}/reveal")
    }
    fn reject_step(r: u32, p: &PeerId) -> String {
        format!("jury/r{r}/reject/{p}")
    }

    fn reject(&mut self, env: &Envelope, error: &'static str, text: String) {
        self.reveals.insert(env.from.clone(), Revealed::Rejected(error));
        self.pending.push((self.round, env.from.clone(), error, text, env.id.clone()));
    }

    fn on_reveal(&mut self, env: &Envelope, facts: &Facts<'_>) {
        let who = &env.from;
        if self.phase == Phase::Commit {
            let t = format!("{who} revealed before every juror committed; its vote is rejected");
            return self.reject(env, "early_reveal", t);
        }
        let Some(Committed::Sealed(commit)) = self.commits.get(who) else {
            return self.reject(env, "no_commitment", format!("{who} revealed without a commitment; rejected"));
        };
        let commitment =
            commit.body.json.as_ref().and_then(|j| j.get("commitment")).and_then(|v| v.as_str()).unwrap_or("");
        let salt = env.body.json.as_ref().and_then(|j| j.get("salt")).and_then(|v| v.as_str()).unwrap_or("");
        if !seal::verify(commitment, salt, &env.body.text) {
            let t = format!("the reveal of {who} does not match its commitment; rejected");
            return self.reject(env, "reveal_mismatch", t);
        }
        let parsed = parse_json_answer(&env.body.text);
        match extract(&env.body.text, parsed.as_ref()) {
            Some(a) => {
                let b = Ballot {
                    peer: who.clone(),
                    order: team_order(facts.plan, who),
                    answer: a.answer,
                    confidence: a.confidence,
                    id: env.id.clone(),
                    text: env.body.text.clone(),
                };
                self.reveals.insert(who.clone(), Revealed::Valid(b));
            }
            None => self.reject(env, "malformed_vote", format!("the vote of {who} states no answer; rejected")),
        }
    }

    fn advance(&mut self, facts: &Facts<'_>) {
        let present = |p: &&PeerId| !facts.is_absent(p);
        if self.phase == Phase::Commit && self.spec.jurors.iter().filter(present).all(|j| self.commits.contains_key(j))
        {
            if self.spec.jurors.iter().all(|j| facts.is_absent(j)) {
                return;
            }
            self.phase = Phase::Reveal;
        }
        if self.phase == Phase::Reveal {
            let waiting =
                self.spec.jurors.iter().filter(present).any(|j| {
                    matches!(self.commits.get(j), Some(Committed::Sealed(_))) && !self.reveals.contains_key(j)
                });
            if waiting {
                return;
            }
            let ballots: Vec<Ballot> = self
                .reveals
                .values()
                .filter_map(|r| if let Revealed::Valid(b) = r { Some(b.clone()) } else { None })
                .collect();
            let outcome = tally(&ballots, self.spec.rule);
            self.decided = outcome.decided;
            self.previous = ballots.iter().map(|b| (b.peer.clone(), b.text.clone())).collect();
            self.outcome = Some(outcome);
            if self.decided || self.round + 1 >= self.spec.rounds {
                self.phase = Phase::Done;
            } else {
                self.round += 1;
                self.phase = Phase::Commit;
                self.commits.clear();
                self.reveals.clear();
            }
        }
    }

    /// What every juror's duty follows (see [`Reducer::due`]).
    fn stage(&self) -> (u32, Phase, usize) {
        (self.round, self.phase, self.pending.len())
    }

    /// Fold one entry in (see [`Reducer::apply`]).
    fn fold(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let r = self.round;
        let step = env.step.as_ref();
        if self.phase != Phase::Done && self.spec.jurors.contains(&env.from) {
            if step == Self::commit_step(r) && self.phase == Phase::Commit && !self.commits.contains_key(&env.from) {
                match env.kind {
                    Kind::Commit => {
                        self.commits.insert(env.from.clone(), Committed::Sealed(env.clone()));
                    }
                    Kind::Failure => {
                        self.commits.insert(env.from.clone(), Committed::Failed);
                    }
                    _ => {}
                }
            } else if step == Self::reveal_step(r) && !self.reveals.contains_key(&env.from) {
                match env.kind {
                    Kind::Reveal => self.on_reveal(env, facts),
                    Kind::Failure => {
                        self.reveals.insert(env.from.clone(), Revealed::Failed);
                    }
                    _ => {}
                }
            }
        }
        if env.kind == Kind::Failure {
            self.pending.retain(|(rr, p, ..)| step != Self::reject_step(*rr, p));
        }
        self.advance(facts);
    }
}

impl Reducer for Jury {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let before = self.stage();
        self.fold(entry, facts);
        self.moved = before != self.stage();
    }

    /// A juror's duty follows the round and the phase (and its own commit or reveal,
    /// which its author is woken for); a rejection to record is everyone's. So another
    /// juror's commit or reveal that closes no phase changes no one else's duty.
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.moved { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        let r = self.round;
        let mut out = Vec::new();
        match self.phase {
            Phase::Commit if self.spec.jurors.contains(me) && !self.commits.contains_key(me) => {
                let json = matches!(self.spec.rule, Rule::Confidence);
                let mut instruction = self.spec.instruction.clone().unwrap_or_else(|| {
                    if r == 0 {
                        format!("Answer independently: no juror sees another's answer before committing. {ANSWER_FIRST}")
                    } else {
                        "Above are the jurors' revealed answers from the last round (no answer won enough support). Reconsider and give your answer. End with a line 'Answer: <your answer>'.".into()
                    }
                });
                if json {
                    instruction = format!("{instruction} {ANSWER_JSON}");
                }
                let view = if r == 0 {
                    View::Task
                } else {
                    View::Shown(self.previous.iter().map(|(p, t)| Shown::new(p, t)).collect())
                };
                out.push(Duty {
                    step: Arc::from(Self::commit_step(r)),
                    kind: Kind::Commit,
                    to: crate::envelope::Recipient::All,
                    round: r,
                    parents: Vec::new(),
                    action: Action::Commit { instruction: Some(Arc::from(instruction)), json, view },
                    collective: false,
                });
            }
            Phase::Reveal if !self.reveals.contains_key(me) => {
                if let Some(Committed::Sealed(c)) = self.commits.get(me) {
                    out.push(Duty {
                        step: Arc::from(Self::reveal_step(r)),
                        kind: Kind::Reveal,
                        to: crate::envelope::Recipient::All,
                        round: r,
                        parents: vec![c.id.clone()],
                        action: Action::Reveal { commit: c.clone() },
                        collective: false,
                    });
                }
            }
            _ => {}
        }
        let _ = facts;
        for (rr, p, error, text, id) in &self.pending {
            out.push(rejection(Self::reject_step(*rr, p), *rr, p, error, text.clone(), id));
        }
        out
    }

    fn finished(&self, _facts: &Facts<'_>) -> Option<Finish> {
        if self.phase != Phase::Done || !self.pending.is_empty() {
            return None;
        }
        let o = self.outcome.as_ref()?;
        let rounds = self.round + 1;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        let rule = self.spec.rule.name();
        let rejected: Vec<String> = self
            .reveals
            .iter()
            .filter_map(|(p, r)| if let Revealed::Rejected(why) = r { Some(format!("{p}: {why}")) } else { None })
            .collect();
        let rejected = if rejected.is_empty() { String::new() } else { format!(", rejected {}", rejected.join(", ")) };
        let valid: usize = o.ranking.iter().map(|s| s.supporters.len()).sum();
        Some(match o.winner() {
            Some(w) => {
                let tie = if o.tie_broken { ", tie broken by team order" } else { "" };
                Finish {
                    reason: format!(
                        "jury verdict ({rule}) in round {rounds}: {} with {:.0}% of {valid} valid votes{rejected}{tie} [{}]",
                        w.answer,
                        o.share * 100.0,
                        o.describe()
                    ),
                    answer: Some(Arc::from(w.answer.as_str())),
                    decided_by: self
                        .reveals
                        .values()
                        .filter_map(|r| match r {
                            Revealed::Valid(b) if super::answers::normalize(&b.answer) == w.key => Some(b.id.clone()),
                            _ => None,
                        })
                        .collect(),
                }
            }
            None => Finish {
                reason: format!(
                    "hung jury ({rule}) after {n_rounds}: {valid} valid votes{rejected} [{}]",
                    o.describe()
                ),
                answer: None,
                decided_by: Vec::new(),
            },
        })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.round + u32::from(self.phase == Phase::Done),
            consensus: self.decided,
            confidence: self.outcome.as_ref().map(|o| o.share),
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        if let Some(o) = &self.outcome
            && let Some(l) = o.leader()
        {
            return Some((Arc::from(l.answer.as_str()), l.first_id.clone()?));
        }
        // Mid-round: the valid reveals so far.
        let ballots: Vec<Ballot> = self
            .reveals
            .values()
            .filter_map(|r| if let Revealed::Valid(b) = r { Some(b.clone()) } else { None })
            .collect();
        let o = tally(&ballots, self.spec.rule);
        let l = o.leader()?;
        Some((Arc::from(l.answer.as_str()), l.first_id.clone()?))
    }
}

/// A body for tests and tools: what a reveal of `text` with `salt` looks like.
pub fn reveal_body(text: &str, salt_hex: &str, commit: &EnvelopeId) -> Body {
    Body::text(text).with_json(serde_json::json!({ "salt": salt_hex, "commit": commit.as_str() }))
}
