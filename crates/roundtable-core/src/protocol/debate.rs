//! Debate with simultaneous rounds, then a vote (Du et al. 2023).
//!
//! - **Steps.** Rounds `0..rounds` of [`super::rounds`]: in round 0 every member
//!   answers the task alone and concurrently; in round r ≥ 1 every member sees the
//!   others' answers as they stood at the end of round r-1 (never the same round's)
//!   and updates its own. Member answers are steps `r{r}/answer`.
//! - **Duties.** Each member answers each round once; then it waits for the round to
//!   close.
//! - **Decision.** After the last round, every member's latest stated answer is a
//!   ballot. `vote = "plurality"`: the most common answer wins. `vote = "majority"`:
//!   it must also have more than half of the ballots, or the debate ends without an
//!   answer ("no majority").
//! - **Ties.** The answer whose first supporter comes first in team order wins.
//! - **Failures.** A failed answer consumes the member's round; its latest earlier
//!   answer still counts.
//! - **Absent members.** Rounds close without them; their latest answer still counts.
//!   When every member is absent the debate ends with the leading answer so far.
//!
//! Team-file keys: `rounds` (2: round 0 and one update round), `members` (every peer),
//! `vote` (`plurality` | `majority`), `json` (ask for `{answer, confidence, reason}`),
//! `instruction`, `update_instruction`.

use std::sync::{Arc, OnceLock};

use super::answers::{Outcome, Rule, tally_keyed};
use super::rounds::{ANSWER_FIRST, ANSWER_JSON, ANSWER_UPDATE, Rounds, team_order};
use super::{Due, Duty, Facts, Finish, Reducer};
use crate::envelope::{EnvelopeId, PeerId};
use crate::log::Entry;
use crate::team::{DebateSpec, VoteRule};
use crate::termination::Signals;

pub struct Debate {
    spec: DebateSpec,
    rounds: Rounds,
    /// Each member's place in the team (the tie-break), read from the plan on the first
    /// entry.
    orders: Vec<usize>,
    /// The tally of the members' latest answers, counted when first asked for after an
    /// answer changed. Every peer folds every answer, so counting on each one would
    /// cost O(members) per entry and O(members³) per round over the team.
    outcome: OnceLock<Outcome>,
    /// The tally when the last round closed: what termination conditions read, so a
    /// signal never fires on a round half answered.
    closed: Option<Outcome>,
    /// The entry folded last closed a round: every member has a new duty.
    just_closed: bool,
}

impl Debate {
    pub fn new(spec: DebateSpec) -> Self {
        Debate {
            rounds: Rounds::new(spec.members.clone()),
            spec,
            orders: Vec::new(),
            outcome: OnceLock::new(),
            closed: None,
            just_closed: false,
        }
    }

    fn rule(&self) -> Rule {
        match self.spec.vote {
            VoteRule::Plurality => Rule::Plurality,
            VoteRule::Majority => Rule::Majority,
        }
    }

    /// The tally of the members' latest answers.
    fn outcome(&self) -> &Outcome {
        self.outcome.get_or_init(|| {
            // Ballots are the latest answers in member order, as are their keys.
            let keys: Vec<&str> = self.rounds.latest.iter().flatten().map(|a| a.key()).collect();
            tally_keyed(&self.rounds.ballots_in_order(&self.orders), &keys, self.rule())
        })
    }

    fn instructions(&self) -> (String, String) {
        let json = if self.spec.json { format!(" {ANSWER_JSON}") } else { String::new() };
        let first = self.spec.instruction.clone().unwrap_or_else(|| ANSWER_FIRST.to_string()) + &json;
        let update = self.spec.update_instruction.clone().unwrap_or_else(|| ANSWER_UPDATE.to_string()) + &json;
        (first, update)
    }
}

impl Reducer for Debate {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        if self.orders.len() != self.rounds.members.len() {
            self.orders = self.rounds.members.iter().map(|m| team_order(facts.plan, m)).collect();
        }
        let changed = self.rounds.observe(&entry.env);
        let mut closed = false;
        while self.rounds.round < self.spec.rounds && self.rounds.round_complete(facts) {
            self.rounds.close();
            closed = true;
        }
        if changed {
            self.outcome = OnceLock::new();
        }
        if closed {
            self.closed = Some(self.outcome().clone());
        }
        self.just_closed = closed;
    }

    /// A member's duty changes when a round opens (an answer ends only its author's).
    fn due(&self, _entry: &Entry, _facts: &Facts<'_>) -> Due {
        if self.just_closed { Due::Everyone } else { Due::nobody() }
    }

    fn duties(&self, me: &PeerId, _facts: &Facts<'_>) -> Vec<Duty> {
        if self.rounds.round >= self.spec.rounds {
            return Vec::new();
        }
        let (first, update) = self.instructions();
        self.rounds.duty(me, &first, &update, self.spec.json).into_iter().collect()
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        let all_absent = self.rounds.all_absent(facts);
        if self.rounds.round < self.spec.rounds && !all_absent {
            return None;
        }
        let outcome = self.outcome();
        let rounds = self.rounds.round;
        let n_rounds = crate::readable::count(rounds, "round", "rounds");
        let rule = self.rule().name();
        let why = if all_absent { format!("every member is absent after {n_rounds}; ") } else { String::new() };
        Some(match outcome.winner() {
            Some(w) => {
                let tie = if outcome.tie_broken { ", tie broken by team order" } else { "" };
                Finish {
                    reason: format!(
                        "{why}vote after {n_rounds} ({rule}): {} with {} of {} ballots{tie} [{}]",
                        w.answer,
                        w.supporters.len(),
                        outcome.ranking.iter().map(|s| s.supporters.len()).sum::<usize>(),
                        outcome.describe()
                    ),
                    answer: Some(Arc::from(w.answer.as_str())),
                    decided_by: ballot_ids(&self.rounds, &w.supporters),
                }
            }
            None => Finish {
                reason: format!("{why}no {rule} after {n_rounds} [{}]", outcome.describe()),
                answer: None,
                decided_by: Vec::new(),
            },
        })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.rounds.round,
            consensus: self.closed.as_ref().is_some_and(|o| o.ranking.len() == 1),
            confidence: self.closed.as_ref().map(|o| o.share),
            rounds_without_change: self.rounds.unchanged,
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        let l = self.outcome().leader()?;
        Some((Arc::from(l.answer.as_str()), l.first_id.clone()?))
    }
}

/// The envelopes of the latest answers of these members.
pub(crate) fn ballot_ids(rounds: &Rounds, supporters: &[PeerId]) -> Vec<EnvelopeId> {
    supporters
        .iter()
        .filter_map(|p| rounds.index(p).and_then(|i| rounds.latest[i].as_ref()).map(|a| a.id.clone()))
        .collect()
}
