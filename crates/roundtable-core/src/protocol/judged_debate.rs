//! Debaters and a judge (Liang et al. 2023, multi-agent debate): two or more debaters
//! with assigned stances argue in turn; after each round a judge peer reads it and
//! returns a structured verdict; the debate ends on a verdict, or at the last round
//! when the judge picks the best answer.
//!
//! - **Steps.** Round r: each debater's `r{r}/argue`, in the configured order (each
//!   sees the arguments before it); then the judge's `r{r}/judge`. After the last
//!   round, if no verdict ended it, the judge's `final`.
//! - **Duties.** The next debater of the round speaks with its visible history (its
//!   stance is in its system prompt); the judge answers with JSON
//!   `{"consensus_reached": true|false, "conclusion": "...", "reason": "..."}`; in
//!   `final` it picks the best answer: `{"conclusion": "...", "reason": "..."}`.
//! - **Decision.** A verdict with `consensus_reached: true` and a conclusion ends the
//!   debate with that conclusion. The final pick ends it with its conclusion.
//! - **Malformed verdicts.** A verdict without a boolean `consensus_reached` (or a
//!   final pick without a conclusion) decides nothing: any peer records a rejection
//!   (a collective failure envelope naming it), and the debate goes on. When the final
//!   pick is missing or malformed, the debaters' latest stated answers are counted
//!   (plurality; ties by team order).
//! - **Failures.** A failed argument consumes the debater's turn; a failed verdict
//!   decides nothing.
//! - **Absent peers.** An absent debater's turns are skipped; with the judge absent,
//!   rounds go on unjudged and the debate ends with the debaters' vote.
//!
//! Team-file keys: `judge` (required), `members` (the debaters: every peer but the
//! judge), `rounds` (3), `instruction`, `judge_instruction`, `final_instruction`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::answers::{Ballot, Rule, answer_or_text, tally};
use super::rounds::team_order;
use super::{Duty, Facts, Finish, Reducer, View, is_round_step, rejection};
use crate::envelope::{Envelope, EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::JudgedDebateSpec;
use crate::termination::Signals;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Argue,
    Judge,
    Final,
    Done,
}

/// A judge's verdict, read from its JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub consensus_reached: bool,
    pub conclusion: Option<Arc<str>>,
    pub reason: Option<String>,
}

/// Read a verdict; `None` when `consensus_reached` is missing or not a boolean (or,
/// for a final pick, when there is no conclusion).
pub fn read_verdict(env: &Envelope, final_pick: bool) -> Option<Verdict> {
    let j = env.body.json.as_ref()?;
    let conclusion = j.get("conclusion").and_then(|c| match c {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(Arc::from(s.trim())),
        serde_json::Value::Number(n) => Some(Arc::from(n.to_string())),
        _ => None,
    });
    let reason = j.get("reason").and_then(|r| r.as_str()).map(str::to_owned);
    if final_pick {
        return conclusion.map(|c| Verdict { consensus_reached: true, conclusion: Some(c), reason });
    }
    let consensus_reached = j.get("consensus_reached")?.as_bool()?;
    Some(Verdict { consensus_reached, conclusion, reason })
}

pub struct JudgedDebate {
    spec: JudgedDebateSpec,
    round: u32,
    phase: Phase,
    /// This round's arguments (`None`: failed).
    argued: BTreeMap<PeerId, Option<EnvelopeId>>,
    /// Every debater's latest argument.
    latest: BTreeMap<PeerId, (Arc<str>, EnvelopeId)>,
    last_argument: Option<EnvelopeId>,
    decision: Option<(Verdict, EnvelopeId, String)>,
    /// Malformed verdicts to record: (step, judge envelope).
    malformed: Vec<(String, EnvelopeId)>,
    final_done: bool,
}

impl JudgedDebate {
    pub fn new(spec: JudgedDebateSpec) -> Self {
        JudgedDebate {
            spec,
            round: 0,
            phase: Phase::Argue,
            argued: BTreeMap::new(),
            latest: BTreeMap::new(),
            last_argument: None,
            decision: None,
            malformed: Vec::new(),
            final_done: false,
        }
    }

    fn next_debater(&self, facts: &Facts<'_>) -> Option<&PeerId> {
        self.spec.debaters.iter().find(|d| !facts.is_absent(d) && !self.argued.contains_key(*d))
    }

    fn after_round(&mut self) {
        if self.round + 1 < self.spec.rounds {
            self.round += 1;
            self.phase = Phase::Argue;
            self.argued.clear();
        } else {
            self.phase = Phase::Final;
        }
    }

    fn advance(&mut self, facts: &Facts<'_>) {
        loop {
            match self.phase {
                Phase::Argue if self.next_debater(facts).is_none() => {
                    self.phase = Phase::Judge;
                }
                Phase::Judge if facts.is_absent(&self.spec.judge) => self.after_round(),
                Phase::Final if facts.is_absent(&self.spec.judge) => self.phase = Phase::Done,
                _ => return,
            }
        }
    }

    fn vote(&self, facts: &Facts<'_>) -> Option<(Arc<str>, Vec<EnvelopeId>, String)> {
        let ballots: Vec<Ballot> = self
            .latest
            .iter()
            .map(|(p, (text, id))| {
                let a = answer_or_text(text, None);
                Ballot {
                    peer: p.clone(),
                    order: team_order(facts.plan, p),
                    answer: a.answer,
                    confidence: a.confidence,
                    id: id.clone(),
                    text: text.clone(),
                }
            })
            .collect();
        let o = tally(&ballots, Rule::Plurality);
        let w = o.winner()?;
        Some((Arc::from(w.answer.as_str()), w.first_id.iter().cloned().collect(), o.describe()))
    }
}

impl Reducer for JudgedDebate {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let step = env.step.as_ref();
        let r = self.round;
        match self.phase {
            Phase::Argue
                if is_round_step(step, r, "argue")
                    && self.spec.debaters.contains(&env.from)
                    && !self.argued.contains_key(&env.from) =>
            {
                if env.kind == Kind::Message {
                    self.latest.insert(env.from.clone(), (env.body.text.clone(), env.id.clone()));
                    self.last_argument = Some(env.id.clone());
                    self.argued.insert(env.from.clone(), Some(env.id.clone()));
                } else if env.kind == Kind::Failure {
                    self.argued.insert(env.from.clone(), None);
                }
            }
            Phase::Judge if is_round_step(step, r, "judge") && env.from == self.spec.judge => {
                if env.kind == Kind::Verdict {
                    match read_verdict(env, false) {
                        Some(v) if v.consensus_reached && v.conclusion.is_some() => {
                            self.decision = Some((v, env.id.clone(), format!("judge verdict in round {}", r + 1)));
                            self.phase = Phase::Done;
                            return;
                        }
                        Some(_) => {}
                        None => self.malformed.push((format!("r{r}/judge/malformed"), env.id.clone())),
                    }
                }
                if matches!(env.kind, Kind::Verdict | Kind::Failure) {
                    self.after_round();
                }
            }
            Phase::Final if step == "final" && env.from == self.spec.judge => {
                if env.kind == Kind::Verdict {
                    match read_verdict(env, true) {
                        Some(v) => {
                            let rounds = self.spec.rounds;
                            let n_rounds = crate::readable::count(rounds, "round", "rounds");
                            self.decision = Some((
                                v,
                                env.id.clone(),
                                format!("{n_rounds} without consensus; the judge picked the best answer"),
                            ));
                        }
                        None => self.malformed.push(("final/malformed".into(), env.id.clone())),
                    }
                }
                if matches!(env.kind, Kind::Verdict | Kind::Failure) {
                    self.final_done = true;
                    self.phase = Phase::Done;
                }
            }
            _ => {}
        }
        // A rejection recorded: nothing more to do for it.
        if env.kind == Kind::Failure && step.ends_with("/malformed") {
            self.malformed.retain(|(s, _)| s != step);
        }
        self.advance(facts);
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        let mut out: Vec<Duty> = self
            .malformed
            .iter()
            .map(|(step, id)| {
                rejection(
                    step.clone(),
                    self.round,
                    &self.spec.judge,
                    "malformed_verdict",
                    format!(
                        "the verdict of {} has no boolean consensus_reached (or no conclusion); it decides nothing",
                        self.spec.judge
                    ),
                    id,
                )
            })
            .collect();
        let r = self.round;
        let parents: Vec<EnvelopeId> = self.last_argument.iter().cloned().collect();
        match self.phase {
            Phase::Argue if self.next_debater(facts) == Some(me) => {
                let instruction = self.spec.instruction.clone().unwrap_or_else(|| {
                    if r == 0 {
                        "Argue your assigned stance on the question. Be specific. End with a line 'Answer: <your answer>'.".into()
                    } else {
                        "Answer the other side's arguments and argue your stance again, conceding what you must. End with a line 'Answer: <your answer>'.".into()
                    }
                });
                out.push(
                    Duty::speak(
                        format!("r{r}/argue"),
                        Kind::Message,
                        r,
                        Some(Arc::from(instruction)),
                        false,
                        View::History,
                    )
                    .with_parents(parents),
                );
            }
            Phase::Judge if *me == self.spec.judge => {
                let instruction = self.spec.judge_instruction.clone().unwrap_or_else(|| {
                    "You are the judge. Read this round of the debate. Reply with a JSON object \
                     {\"consensus_reached\": true|false, \"conclusion\": \"<the answer the debate supports, if any>\", \"reason\": \"<why>\"}. \
                     Set consensus_reached to true only when one answer is clearly correct."
                        .into()
                });
                out.push(
                    Duty::speak(
                        format!("r{r}/judge"),
                        Kind::Verdict,
                        r,
                        Some(Arc::from(instruction)),
                        true,
                        View::History,
                    )
                    .with_parents(parents),
                );
            }
            Phase::Final if *me == self.spec.judge => {
                let instruction = self.spec.final_instruction.clone().unwrap_or_else(|| {
                    "The debate is over without consensus. Pick the best answer. Reply with a JSON object {\"conclusion\": \"<the best answer>\", \"reason\": \"<why>\"}.".into()
                });
                out.push(
                    Duty::speak("final", Kind::Verdict, r, Some(Arc::from(instruction)), true, View::History)
                        .with_parents(parents),
                );
            }
            _ => {}
        }
        // Rejections first only for the peer that has nothing else to do; the others
        // go on with their duty (someone idle records it).
        if out.len() > 1 {
            out.rotate_left(self.malformed.len());
        }
        out
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        if self.phase != Phase::Done || !self.malformed.is_empty() {
            return None;
        }
        if let Some((v, id, why)) = &self.decision {
            let reason = v.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            return Some(Finish {
                reason: format!("{why}{reason}"),
                answer: v.conclusion.clone(),
                decided_by: vec![id.clone()],
            });
        }
        let judge = &self.spec.judge;
        let why = if facts.is_absent(judge) {
            format!("the judge {judge} is absent")
        } else {
            format!("the judge {judge} gave no usable pick")
        };
        Some(match self.vote(facts) {
            Some((answer, ids, counts)) => Finish {
                reason: format!("{why}; the debaters' latest answers decide [{counts}]"),
                answer: Some(answer),
                decided_by: ids,
            },
            None => Finish { reason: format!("{why}; no debater answered"), answer: None, decided_by: Vec::new() },
        })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.round,
            verdict: self.decision.is_some(),
            consensus: self.decision.is_some(),
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        if let Some((v, id, _)) = &self.decision {
            return v.conclusion.clone().map(|c| (c, id.clone()));
        }
        let id = self.last_argument.clone()?;
        self.latest.values().find(|(_, i)| *i == id).map(|(t, i)| (t.clone(), i.clone()))
    }
}
