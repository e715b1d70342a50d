//! Simultaneous rounds: the engine under debate, emergent consensus and hybrid.
//!
//! In round 0 every member answers the task independently and concurrently: its model
//! sees the task alone. In round r ≥ 1 every member sees the task, its own latest
//! answer and the other members' latest answers **as they stood when round r-1
//! closed** — never an answer given in the same round, whatever order the answers land
//! in — and gives an updated answer. Member `m`'s answer in round `r` is recorded with
//! step `r{r}/answer`.
//!
//! A round closes when every member not recorded absent has an answer or a failure for
//! it. A failure consumes the member's turn in that round; its latest answer stays the
//! one from an earlier round. A member that comes back after being absent answers the
//! current round. The protocol that owns the engine decides what happens between
//! rounds (vote, measure, ask a leader) and when to open the next one.

use std::sync::Arc;

use super::answers::{Ballot, Extracted, extract, normalize, whole_text};
use super::{Duty, Facts, Shown, View, is_round_step};
use crate::envelope::{Envelope, EnvelopeId, Kind, PeerId};
use crate::team::TeamPlan;

/// One member's answer in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Answered {
    pub id: EnvelopeId,
    pub round: u32,
    pub text: Arc<str>,
    /// The stated answer, or the whole text when none is stated.
    pub answer: Extracted,
    /// Whether the answer was stated (`Answer:` or JSON), not just the whole text.
    pub stated: bool,
    /// The answer's [`normalize`](super::answers::normalize)d key, computed once.
    pub key: Arc<str>,
}

impl Answered {
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// What a member did in a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Answer(Answered),
    Failed,
}

/// The state of simultaneous rounds (see the module docs).
#[derive(Clone, Debug)]
pub struct Rounds {
    pub members: Vec<PeerId>,
    /// The round being answered now.
    pub round: u32,
    /// Records of the current round, by member index.
    pub current: Vec<Option<Record>>,
    /// Every member's latest answer.
    pub latest: Vec<Option<Answered>>,
    /// `latest` as it stood when the previous round closed.
    pub snapshot: Vec<Option<Answered>>,
    /// Closed rounds in a row in which no member's answer changed.
    pub unchanged: u32,
    /// Messages shown before the answers in every round (e.g. a leader's objective).
    pub preamble: Vec<Shown>,
}

impl Rounds {
    pub fn new(members: Vec<PeerId>) -> Self {
        let n = members.len();
        Rounds {
            members,
            round: 0,
            current: vec![None; n],
            latest: vec![None; n],
            snapshot: vec![None; n],
            unchanged: 0,
            preamble: Vec::new(),
        }
    }

    pub fn step(round: u32) -> String {
        format!("r{round}/answer")
    }

    pub fn index(&self, p: &PeerId) -> Option<usize> {
        self.members.iter().position(|m| m == p)
    }

    /// Fold an envelope in; true when it recorded something for the current round.
    pub fn observe(&mut self, env: &Envelope) -> bool {
        let Some(i) = self.index(&env.from) else {
            return false;
        };
        if !is_round_step(&env.step, self.round, "answer") || self.current[i].is_some() {
            return false;
        }
        match env.kind {
            Kind::Message => {
                let stated = extract(&env.body.text, env.body.json.as_ref());
                let is_stated = stated.is_some();
                let answer = stated.unwrap_or_else(|| whole_text(&env.body.text));
                let a = Answered {
                    id: env.id.clone(),
                    round: self.round,
                    text: env.body.text.clone(),
                    stated: is_stated,
                    key: Arc::from(normalize(&answer.answer)),
                    answer,
                };
                self.latest[i] = Some(a.clone());
                self.current[i] = Some(Record::Answer(a));
                true
            }
            Kind::Failure => {
                self.current[i] = Some(Record::Failed);
                true
            }
            _ => false,
        }
    }

    /// Whether every member not absent has a record for the current round (and at
    /// least one member is present).
    pub fn round_complete(&self, facts: &Facts<'_>) -> bool {
        let mut present = 0;
        for (i, m) in self.members.iter().enumerate() {
            if facts.is_absent(m) {
                continue;
            }
            present += 1;
            if self.current[i].is_none() {
                return false;
            }
        }
        present > 0
    }

    /// Whether every member is absent.
    pub fn all_absent(&self, facts: &Facts<'_>) -> bool {
        self.members.iter().all(|m| facts.is_absent(m))
    }

    /// Close the current round and open the next.
    pub fn close(&mut self) {
        if self.round > 0 {
            let same = self
                .latest
                .iter()
                .zip(&self.snapshot)
                .all(|(a, b)| a.as_ref().map(Answered::key) == b.as_ref().map(Answered::key));
            self.unchanged = if same { self.unchanged + 1 } else { 0 };
        }
        self.snapshot = self.latest.clone();
        self.round += 1;
        self.current = vec![None; self.members.len()];
    }

    /// `me`'s duty in the current round, if it has not answered it yet.
    pub fn duty(&self, me: &PeerId, first: &str, update: &str, json: bool) -> Option<Duty> {
        let i = self.index(me)?;
        if self.current[i].is_some() {
            return None;
        }
        let (instruction, view) = if self.round == 0 {
            let view = if self.preamble.is_empty() { View::Task } else { View::Shown(self.preamble.clone()) };
            (first.to_string(), view)
        } else {
            let mut shown = self.preamble.clone();
            if let Some(a) = &self.snapshot[i] {
                shown.push(Shown::new(me, &a.text));
            }
            for (j, a) in self.snapshot.iter().enumerate() {
                if j != i
                    && let Some(a) = a
                {
                    shown.push(Shown::new(&self.members[j], &a.text));
                }
            }
            (update.to_string(), View::Shown(shown))
        };
        let parents = self.snapshot.iter().flatten().map(|a| a.id.clone()).collect();
        Some(
            Duty::speak(Self::step(self.round), Kind::Message, self.round, Some(Arc::from(instruction)), json, view)
                .with_parents(parents),
        )
    }

    /// Every member's latest answer as a ballot.
    pub fn ballots(&self, plan: &TeamPlan) -> Vec<Ballot> {
        let orders: Vec<usize> = self.members.iter().map(|m| team_order(plan, m)).collect();
        self.ballots_in_order(&orders)
    }

    /// [`Self::ballots`] with each member's team order given (by member index).
    pub fn ballots_in_order(&self, orders: &[usize]) -> Vec<Ballot> {
        self.latest
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let a = a.as_ref()?;
                Some(Ballot {
                    peer: self.members[i].clone(),
                    order: orders.get(i).copied().unwrap_or(usize::MAX),
                    answer: a.answer.answer.clone(),
                    confidence: a.answer.confidence,
                    id: a.id.clone(),
                    text: a.text.clone(),
                })
            })
            .collect()
    }

    /// Whether every present member's latest answer is the same (and there is one).
    pub fn unanimous(&self, facts: &Facts<'_>) -> Option<&Answered> {
        let mut first: Option<&Answered> = None;
        for (i, m) in self.members.iter().enumerate() {
            if facts.is_absent(m) {
                continue;
            }
            let a = self.latest[i].as_ref()?;
            match first {
                None => first = Some(a),
                Some(f) if f.key() == a.key() => {}
                Some(_) => return None,
            }
        }
        first
    }
}

/// A peer's place in the team file (ties are broken by it).
pub fn team_order(plan: &TeamPlan, p: &PeerId) -> usize {
    plan.peers.iter().position(|s| &s.id == p).unwrap_or(usize::MAX)
}

/// Instructions for answering with a stated answer.
pub const ANSWER_FIRST: &str =
    "Answer the question. Explain your reasoning briefly, then end with a line of the form 'Answer: <your answer>'.";
pub const ANSWER_UPDATE: &str = "Above are your previous answer and the other agents' latest answers. Using their reasoning as additional advice, give an updated answer. End with a line of the form 'Answer: <your answer>'.";
pub const ANSWER_JSON: &str = "Reply with a JSON object: {\"answer\": \"<your answer>\", \"confidence\": <0 to 1>, \"reason\": \"<one sentence>\"}.";
