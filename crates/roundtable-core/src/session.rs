//! The state every peer folds from the log, and the decisions read from it.
//!
//! [`SessionState`] holds what all protocols share — the task, the [`Tally`], absent
//! peers, the stop — and drives the protocol's reducer. [`SessionState::duties`] is the
//! single place where a peer learns what to do next, in this order: nothing once the
//! session is stopped; record a stop when the protocol has finished or a termination
//! condition holds; come back after an absence; write (or wait for) the summary of
//! older rounds when the context policy asks for one; otherwise the protocol's duties.
//!
//! # Summaries of older rounds
//! Under `[context] policy = "summary"`, when the protocol enters round `r` with
//! `r > keep_rounds`, the rounds up to `r - keep_rounds - 1` must be summarized before
//! anyone speaks: the summarizer (the configured peer, or the first present peer in
//! team order) writes a `summary` envelope with step `summary/{upto}` from the previous
//! summary and the rounds after it, and everyone else waits for it. Every peer's
//! context is then the task, that one summary, and the last `keep_rounds` rounds, so
//! prompt tokens per round stop growing. A summary that fails is recorded and skipped;
//! the next round's summary covers its rounds too.
//!
//! # Stops are re-derived
//! Any peer may record the stop, so a reader does not take one on its author's word:
//! a stop is taken only when it follows from the log before it (see
//! [`SessionState::apply`]). A stop says where it was decided (`decided_at`, the last
//! log position its author had folded) and the clock reading it was decided with
//! (`elapsed_ms`); the reader folds the log up to that position and derives the
//! decision itself — the protocol's own finish, a termination condition, failures in a
//! row, every peer absent — and the stop must be exactly that decision: its reason,
//! answer, acceptance, the envelopes that decided it and the totals it reports. The
//! clock is the one input a reader cannot re-derive, so a timeout or a wall-time budget
//! is taken on the word of whoever wrote the stop (across processes, a roster member:
//! signatures are checked before the fold). A budget stop names the limit and the
//! usage it was refused at: the limit must be the plan's, the usage the log's; the
//! size of the refused prompt is the writer's estimate. A stop that does not follow is
//! folded as the `failure` it stands for, at its place, and the session goes on.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use crate::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use crate::log::Entry;
use crate::protocol::{Action, Due, Duty, Facts, Reducer, View, reducer_for};
use crate::team::{ContextPolicy, TeamPlan};
use crate::termination::Tally;

/// The step of the session's opening task envelope.
pub const TASK_STEP: &str = "task";
/// The step of the stop envelope (collective: one per session).
pub const STOP_STEP: &str = "stop";
/// How the stop reason of a session that ended because its model calls failed begins
/// (it ran on failures only, or every peer failed in a row).
pub const FAILED_PREFIX: &str = "failures:";
/// The peer id used for the task envelope.
pub const USER: &str = "user";

/// What one peer knows of a session, folded from the log.
pub struct SessionState {
    pub plan: Arc<TeamPlan>,
    pub session: SessionId,
    pub task: Option<Arc<Envelope>>,
    pub tally: Tally,
    pub absent: BTreeSet<PeerId>,
    /// Absence notices per peer so far (to derive the next notice's step).
    absences: std::collections::BTreeMap<PeerId, u32>,
    pub stop: Option<Entry>,
    /// Failed model calls since the last successful one, and the latest one.
    pub failure_streak: u32,
    last_failure: Option<String>,
    pub last_seq: u64,
    pub lamport: u64,
    protocol: Box<dyn Reducer>,
    mention: Option<Arc<str>>,
    /// The last round covered by a summary, and summaries that failed.
    summary_upto: Option<u32>,
    summary_failed: BTreeSet<u32>,
    /// Summaries of older rounds attempted (written or failed), in all and per peer.
    summaries: u32,
    summaries_by: std::collections::BTreeMap<PeerId, u32>,
    /// Every entry folded before the stop (a rejected stop as its rejection): a stop
    /// decided before the latest entry is checked by folding the log up to its place.
    history: Vec<Entry>,
    /// Whether stops are checked: off in the fold that checks one (every stop before it
    /// in the history was rejected already).
    derive_stops: bool,
}

impl SessionState {
    /// The state one peer keeps: like [`SessionState::new`], but the tally keeps
    /// per-peer totals for `me` only.
    pub fn for_peer(plan: Arc<TeamPlan>, session: SessionId, me: &PeerId) -> Self {
        let mut st = Self::new(plan, session);
        st.tally.only = Some(me.clone());
        st
    }

    pub fn new(plan: Arc<TeamPlan>, session: SessionId) -> Self {
        let protocol = reducer_for(&plan);
        let mention = plan.termination.mention().map(Arc::from);
        SessionState {
            plan,
            session,
            task: None,
            tally: Tally::default(),
            absent: BTreeSet::new(),
            absences: Default::default(),
            stop: None,
            failure_streak: 0,
            last_failure: None,
            last_seq: 0,
            lamport: 0,
            protocol,
            mention,
            summary_upto: None,
            summary_failed: BTreeSet::new(),
            summaries: 0,
            summaries_by: Default::default(),
            history: Vec::new(),
            derive_stops: true,
        }
    }

    fn facts(&self) -> Facts<'_> {
        Facts { plan: &self.plan, session: &self.session, absent: &self.absent, task: self.task.as_ref() }
    }

    /// Fold one entry in. Entries after the stop are recorded in the tally only. A stop
    /// that does not follow from the log before it (see the module docs) is folded as
    /// the rejection it stands for ([`rejected_stop`]), and the session goes on.
    pub fn apply(&mut self, entry: &Entry) {
        if let Some(rejection) = self.rejection_of(entry) {
            return self.take(rejection);
        }
        if self.fold_session(entry) {
            let facts =
                Facts { plan: &self.plan, session: &self.session, absent: &self.absent, task: self.task.as_ref() };
            self.protocol.apply(entry, &facts);
        }
    }

    /// [`SessionState::apply`], owning the entry: a protocol that keeps the envelope
    /// takes this reference instead of making another (see [`Reducer::take`]).
    pub fn take(&mut self, entry: Entry) {
        let entry = match self.rejection_of(&entry) {
            Some(rejection) => rejection,
            None => entry,
        };
        if self.fold_session(&entry) {
            let facts =
                Facts { plan: &self.plan, session: &self.session, absent: &self.absent, task: self.task.as_ref() };
            self.protocol.take(entry, &facts);
        }
    }

    /// The session's own part of folding an entry; whether the protocol folds it too.
    fn fold_session(&mut self, entry: &Entry) -> bool {
        let env = &entry.env;
        self.last_seq = self.last_seq.max(entry.seq);
        self.lamport = self.lamport.max(env.lamport);
        self.tally.observe(entry.seq, env, self.mention.as_deref());
        if self.stop.is_some() {
            return false;
        }
        if self.derive_stops && env.kind != Kind::Stop {
            self.history.push(entry.clone());
        }
        match env.kind {
            Kind::Task if self.task.is_none() => self.task = Some(env.clone()),
            Kind::Stop => {
                self.stop = Some(entry.clone());
                return false;
            }
            Kind::Absent => {
                if let Some(p) = absent_peer(env) {
                    *self.absences.entry(p.clone()).or_default() += 1;
                    self.absent.insert(p);
                }
            }
            Kind::Join => {
                self.absent.remove(&env.from);
            }
            Kind::Summary => {
                self.count_summary(&env.from);
                if let Some(upto) = summary_upto(&env.step) {
                    self.summary_upto = Some(self.summary_upto.map_or(upto, |c| c.max(upto)));
                }
            }
            Kind::Failure => {
                if let Some(upto) = summary_upto(&env.step) {
                    self.count_summary(&env.from);
                    self.summary_failed.insert(upto);
                }
                // A failed model call carries the attempts' usage; a rejection recorded
                // by a protocol (a malformed vote) is not a model failure.
                if env.usage.is_some() {
                    self.failure_streak += 1;
                    self.last_failure = Some(format!("{}: {}", env.from, env.body.text));
                }
            }
            _ if env.usage.is_some() => self.failure_streak = 0,
            _ => {}
        }
        true
    }

    /// The rejection to fold instead of `entry`, when it is a stop that does not follow
    /// from the log before it.
    fn rejection_of(&self, entry: &Entry) -> Option<Entry> {
        if entry.env.kind != Kind::Stop || self.stop.is_some() || !self.derive_stops {
            return None;
        }
        let why = self.stop_follows(entry).err()?;
        tracing::warn!(session = %self.session, seq = entry.seq, from = %entry.env.from, "{why}");
        Some(Entry { seq: entry.seq, env: Arc::new(rejected_stop(entry, &why)) })
    }

    /// Whether `stop`, the entry after everything folded so far, follows from the log;
    /// if not, why. A stop decided at the latest entry is derived from this state; one
    /// decided earlier (entries landed between its decision and its append) from a
    /// fold of the history up to its place.
    fn stop_follows(&self, stop: &Entry) -> Result<(), String> {
        let Some(at) = decided_at(&self.plan, &self.session, stop)? else {
            return Ok(());
        };
        if at == self.last_seq {
            return self.derives(stop, &self.tally);
        }
        let mut fresh = SessionState::new(self.plan.clone(), self.session.clone());
        fresh.derive_stops = false;
        for e in self.history.iter().take_while(|e| e.seq <= at) {
            fresh.apply(e);
        }
        if fresh.last_seq != at {
            return Err(format!("the stop says it was decided at log position {at}, which is not on the log"));
        }
        fresh.derives(stop, &self.tally)
    }

    /// Whether this state (the log up to the place `stop` says it was decided at)
    /// decides `stop`; `now` is the tally of the whole log before the stop. If not, why.
    fn derives(&self, stop: &Entry, now: &Tally) -> Result<(), String> {
        let env = &stop.env;
        let json = env.body.json.as_ref();
        let field = |k: &str| json.and_then(|j| j.get(k));
        let reason = field("reason").and_then(|r| r.as_str()).unwrap_or("");
        let elapsed_ms = field("elapsed_ms").and_then(|e| e.as_u64()).unwrap_or(0);
        let at = self.last_seq;
        if self.task.is_none() {
            return Err(format!("the stop says it was decided at log position {at}, before the session's task"));
        }
        let decision = match self.decide(elapsed_ms) {
            Some(d) => StopDecision { elapsed_ms, ..d },
            None if reason.starts_with(BUDGET_PREFIX) => {
                budget_follows(&self.plan.budget, reason, &self.tally, now)
                    .map_err(|why| format!("the budget stop {reason:?} does not follow from the log: {why}"))?;
                let decided_by = self.tally.last_call.iter().cloned().collect();
                StopDecision::not_accepted(reason.to_owned(), self.best_answer(), decided_by)
            }
            None => {
                return Err(format!(
                    "the stop {reason:?} does not follow from the log: nothing up to log position {at} ends the session"
                ));
            }
        };
        let expected = self.stop_duty(decision);
        let Action::Post { body } = &expected.action else { unreachable!("a stop duty posts its body") };
        if body.json.as_ref() == json && body.text == env.body.text && expected.parents == env.parents {
            return Ok(());
        }
        let want = body.json.as_ref().map(|j| j.to_string()).unwrap_or_default();
        let got = json.map(|j| j.to_string()).unwrap_or_default();
        Err(format!("the stop does not follow from the log: up to log position {at} it is {want}, the stop says {got}"))
    }

    /// Whether `entry` may be recorded by its author at this point of the log; if not,
    /// why. A summary of older rounds (or its failure, at a `summary/{upto}` step) only
    /// by the summarizer, when that summary is due; a collective envelope as the
    /// protocol says ([`Reducer::may_record`]). For readers that reject what may not
    /// be recorded at its place (the NATS log's, see [`SessionState::checks_writers`]).
    pub fn may_record(&self, entry: &Entry) -> Result<(), String> {
        let env = &entry.env;
        if matches!(env.kind, Kind::Summary | Kind::Failure)
            && let Some(upto) = summary_upto(&env.step)
        {
            let due = self.summary_duty(&env.from).is_some_and(|d| d.iter().any(|d| *d.step == *env.step));
            return due.then_some(()).ok_or_else(|| {
                format!(
                    "a summary of the rounds up to {} by {}, which is not a summary due from it",
                    upto + 1,
                    env.from
                )
            });
        }
        self.protocol.may_record(env, &self.facts())
    }

    /// Whether a session under `plan` has envelopes only some peer may record at a given
    /// point ([`SessionState::may_record`]): summaries of older rounds, and work-queue
    /// and contract-net results.
    pub fn checks_writers(plan: &TeamPlan) -> bool {
        matches!(plan.protocol, crate::team::ProtocolSpec::WorkQueue(_) | crate::team::ProtocolSpec::ContractNet(_))
            || matches!(plan.context, ContextPolicy::Summary { .. })
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_some()
    }

    /// Milliseconds since the task was posted.
    pub fn elapsed_ms(&self, now_ms: u64) -> u64 {
        self.task.as_ref().map_or(0, |t| now_ms.saturating_sub(t.time_ms))
    }

    /// Why the session should stop now, with the answer and what decided it.
    ///
    /// The answer is *accepted* only when the protocol finished by its own rule with an
    /// answer. A termination condition, a budget, a timeout, failures or absence stop
    /// the session with the leading candidate, not accepted.
    pub fn stop_decision(&self, now_ms: u64) -> Option<StopDecision> {
        if self.stop.is_some() || self.task.is_none() {
            return None;
        }
        let elapsed_ms = self.elapsed_ms(now_ms);
        self.decide(elapsed_ms).map(|d| StopDecision { elapsed_ms, ..d })
    }

    /// [`SessionState::stop_decision`] with the clock read already: `elapsed_ms` since
    /// the task. The clock is the only input that is not on the log.
    fn decide(&self, elapsed_ms: u64) -> Option<StopDecision> {
        let facts = self.facts();
        if let Some(f) = self.protocol.finished(&facts) {
            if self.tally.messages == 0 && self.tally.failures > 0 {
                // The protocol ran its course, but on failures only: say so.
                let last = self.last_failure.as_deref().unwrap_or("");
                return Some(StopDecision::not_accepted(
                    format!("{FAILED_PREFIX} no peer produced an answer; last: {last}"),
                    None,
                    Vec::new(),
                ));
            }
            let accepted = f.answer.is_some();
            return Some(StopDecision {
                reason: f.reason,
                answer: f.answer,
                decided_by: f.decided_by,
                accepted,
                elapsed_ms: 0,
            });
        }
        let signals = self.protocol.signals();
        if let Some(reason) = self.plan.termination.check(&self.tally, &signals, elapsed_ms) {
            let best = self.protocol.best_answer();
            // The condition was reached by the latest contribution (or the best answer's).
            let mut decided_by: Vec<EnvelopeId> = self.tally.last_call.iter().cloned().collect();
            if decided_by.is_empty() {
                decided_by.extend(best.as_ref().map(|b| b.1.clone()));
            }
            return Some(StopDecision::not_accepted(reason, best.map(|b| b.0), decided_by));
        }
        // Every peer failed once in a row (at least 3 failures): the models are down or
        // misconfigured, and going on would only record more failures.
        let streak_limit = (self.plan.peers.len() as u32).max(3);
        if self.failure_streak >= streak_limit {
            let best = self.protocol.best_answer();
            let last = self.last_failure.as_deref().unwrap_or("");
            return Some(StopDecision::not_accepted(
                format!("{FAILED_PREFIX} {} model calls failed in a row; last: {last}", self.failure_streak),
                best.map(|b| b.0),
                Vec::new(),
            ));
        }
        let everyone_absent = self.plan.peers.iter().all(|p| self.absent.contains(&p.id));
        if everyone_absent {
            let best = self.protocol.best_answer();
            return Some(StopDecision::not_accepted(
                "absent: every peer is absent".into(),
                best.map(|b| b.0),
                Vec::new(),
            ));
        }
        None
    }

    /// The stop for a model call the session budget refused: it names the call that
    /// reached the limit (the latest call on the log) and leaves the leading
    /// candidate not accepted.
    pub fn budget_stop(&self, why: String) -> Duty {
        let decided_by = self.tally.last_call.iter().cloned().collect();
        self.stop_duty(StopDecision::not_accepted(why, self.best_answer(), decided_by))
    }

    /// What `me` must do now.
    pub fn duties(&self, me: &PeerId, now_ms: u64) -> Vec<Duty> {
        if self.stop.is_some() || self.task.is_none() {
            return Vec::new();
        }
        if let Some(decision) = self.stop_decision(now_ms) {
            return vec![self.stop_duty(decision)];
        }
        if self.absent.contains(me) {
            let n = self.absences.get(me).copied().unwrap_or(0);
            return vec![Duty {
                step: Arc::from(format!("join/{me}/{n}")),
                kind: Kind::Join,
                to: Recipient::All,
                round: self.round(),
                parents: Vec::new(),
                action: Action::Post { body: Body::text(format!("{me} is back")) },
                collective: false,
            }];
        }
        if let Some(summary) = self.summary_duty(me) {
            return summary;
        }
        self.protocol.duties(me, &self.facts())
    }

    /// Under the summary policy, when older rounds need a summary: the summarizer's
    /// duty, or nothing for the others (they wait for it). `None` when no summary is due.
    fn summary_duty(&self, me: &PeerId) -> Option<Vec<Duty>> {
        let ContextPolicy::Summary { keep_rounds, summarizer, instruction } = &self.plan.context else {
            return None;
        };
        let round = self.round();
        if round <= *keep_rounds {
            return None;
        }
        let upto = round - keep_rounds - 1;
        if self.summary_upto.is_some_and(|c| c >= upto) || self.summary_failed.contains(&upto) {
            return None;
        }
        let who = summarizer.iter().chain(self.plan.peers.iter().map(|p| &p.id)).find(|p| !self.absent.contains(*p))?;
        if who != me {
            return Some(Vec::new());
        }
        let instruction = instruction.clone().unwrap_or_else(|| {
            format!(
                "Summarize the discussion up to and including round {} for the team: the positions taken, the arguments that matter, \
                 what was agreed and what is still open. Be concise; this summary replaces those rounds in everyone's context.",
                upto + 1
            )
        });
        Some(vec![Duty::speak(
            format!("{SUMMARY_STEP}/{upto}"),
            Kind::Summary,
            round,
            Some(Arc::from(instruction)),
            false,
            View::ToSummarize { upto },
        )])
    }

    /// The duty of recording the stop, for any peer. The stop says where it was decided
    /// (the last position folded) and with which clock reading, so every reader can
    /// derive it again (see the module docs).
    pub fn stop_duty(&self, decision: StopDecision) -> Duty {
        stop_duty_at(decision, self.round(), &self.tally, self.last_seq)
    }

    /// What `me` reads of this state while it carries out a duty read from it (see
    /// [`Snapshot`]).
    pub fn snapshot(&self, me: &PeerId) -> Snapshot {
        Snapshot {
            session: self.session.clone(),
            task: self.task.clone(),
            tally: self.tally.for_peer(me),
            last_seq: self.last_seq,
            lamport: self.lamport,
            round: self.round(),
            summaries: self.summaries,
            my_summaries: self.summaries_by.get(me).copied().unwrap_or(0),
            best: self.best_answer(),
        }
    }

    /// Which peers' duties may have changed with `entry`, the entry folded last (see
    /// [`Reducer::due`]): everyone when the entry concerns the session as a whole (the
    /// task, a stop, an absence or a return, a summary, an approval) or when the session
    /// should stop now (any peer records the stop); otherwise what the protocol says.
    /// `now_ms` is the clock, read only when the plan has a timeout or a wall-time budget.
    pub fn due(&self, entry: &Entry, now_ms: u64) -> Due {
        if self.stop.is_some() || self.task.is_none() {
            return Due::Everyone;
        }
        let env = &entry.env;
        let session_wide =
            matches!(env.kind, Kind::Task | Kind::Stop | Kind::Absent | Kind::Join | Kind::Summary | Kind::Approval)
                || (env.kind == Kind::Failure && (summary_upto(&env.step).is_some() || env.usage.is_some()));
        if session_wide || self.stop_decision(now_ms).is_some() {
            return Due::Everyone;
        }
        if matches!(self.plan.context, ContextPolicy::Summary { .. }) && self.summary_duty(&env.from).is_some() {
            return Due::Everyone;
        }
        match self.protocol.due(entry, &self.facts()) {
            // An absent peer's duty is to come back, in the current round.
            Due::Peers(mut peers) if !self.absent.is_empty() => {
                peers.extend(self.absent.iter().cloned());
                Due::Peers(peers)
            }
            due => due,
        }
    }

    /// The duty of recording that `peer` is absent.
    pub fn absent_duty(&self, peer: &PeerId) -> Duty {
        let n = self.absences.get(peer).copied().unwrap_or(0);
        Duty {
            step: Arc::from(format!("absent/{peer}/{n}")),
            kind: Kind::Absent,
            to: Recipient::All,
            round: self.round(),
            parents: Vec::new(),
            action: Action::Post {
                body: Body::text(format!("{peer} stopped answering; its turns are skipped"))
                    .with_json(serde_json::json!({ "peer": peer.as_str() })),
            },
            collective: true,
        }
    }

    pub fn round(&self) -> u32 {
        self.protocol.signals().round
    }

    /// How many model calls (or failed attempts at one) `me` has recorded: the ordinal
    /// of its next call, which scripted replies are chosen by.
    pub fn ordinal(&self, me: &PeerId) -> u32 {
        self.tally.per_peer.get(me).map_or(0, |p| (p.messages_from_calls + p.failures) as u32)
    }

    /// The ordinal of `me`'s next call for `step`: summaries of older rounds are
    /// counted apart from turns (the n-th summary of the session, whoever wrote the
    /// earlier ones; the n-th turn of this peer), so a scripted summarizer's summary
    /// never consumes one of its turn replies.
    pub fn call_ordinal(&self, me: &PeerId, step: &str) -> u32 {
        if summary_upto(step).is_some() {
            self.summaries
        } else {
            self.ordinal(me).saturating_sub(self.summaries_by.get(me).copied().unwrap_or(0))
        }
    }

    fn count_summary(&mut self, from: &PeerId) {
        self.summaries += 1;
        *self.summaries_by.entry(from.clone()).or_default() += 1;
    }

    pub fn best_answer(&self) -> Option<Arc<str>> {
        self.protocol.best_answer().map(|b| b.0)
    }
}

/// The rounds a session reached, counted from 1 as people count them: the latest round
/// any contribution was made in, plus one (envelopes stamp rounds from 0), and never more
/// than the protocol's configured rounds (a round robin's final summary is stamped with
/// the round after the last).
fn rounds_reached(plan: &TeamPlan, entries: &[Entry]) -> u32 {
    let latest = entries
        .iter()
        .filter(|e| {
            !matches!(
                e.env.kind,
                Kind::Task | Kind::Stop | Kind::Absent | Kind::Join | Kind::Failure | Kind::Summary | Kind::ToolList
            )
        })
        .map(|e| e.env.round)
        .max();
    let reached = latest.map_or(0, |r| r + 1);
    let configured = serde_json::to_value(&plan.protocol).ok().and_then(|p| p.get("rounds")?.as_u64());
    configured.map_or(reached, |n| reached.min(n as u32))
}

/// Why a session stops, with its answer, the envelopes that decided it, and whether
/// the answer was accepted by the protocol's own rule.
#[derive(Clone, Debug, PartialEq)]
pub struct StopDecision {
    pub reason: String,
    pub answer: Option<Arc<str>>,
    pub decided_by: Vec<EnvelopeId>,
    pub accepted: bool,
    /// The time since the task that the decision was made with (0 when the clock was
    /// not read): recorded in the stop, since a reader cannot derive it.
    pub elapsed_ms: u64,
}

impl StopDecision {
    /// A stop that leaves the leading candidate (if any) not accepted.
    pub fn not_accepted(reason: String, answer: Option<Arc<str>>, decided_by: Vec<EnvelopeId>) -> Self {
        StopDecision { reason, answer, decided_by, accepted: false, elapsed_ms: 0 }
    }
}

/// The stop duty for `decision`, read from a state at `round` with totals `tally` that
/// has folded the log up to `last_seq`.
fn stop_duty_at(decision: StopDecision, round: u32, tally: &Tally, last_seq: u64) -> Duty {
    let StopDecision { reason, answer, decided_by, accepted, elapsed_ms } = decision;
    let json = serde_json::json!({
        "reason": reason,
        "answer": answer.as_deref(),
        "accepted": accepted,
        "decided_by": decided_by.iter().map(EnvelopeId::as_str).collect::<Vec<_>>(),
        "round": round,
        "messages": tally.messages,
        "tokens": tally.tokens(),
        "cost_usd": tally.cost_usd,
        "decided_at": last_seq,
        "elapsed_ms": elapsed_ms,
    });
    Duty {
        step: Arc::from(STOP_STEP),
        kind: Kind::Stop,
        to: Recipient::All,
        round,
        parents: decided_by,
        action: Action::Post { body: Body::text(answer.as_deref().unwrap_or("")).with_json(json) },
        collective: true,
    }
}

/// What a peer reads of the session state while it carries out a duty: the state as it
/// was when the duty was read from it, so that a state shared by the peers of a process
/// folds on meanwhile. Its tally keeps the peer's own per-peer totals only.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub session: SessionId,
    pub task: Option<Arc<Envelope>>,
    pub tally: Tally,
    pub last_seq: u64,
    pub lamport: u64,
    round: u32,
    summaries: u32,
    my_summaries: u32,
    best: Option<Arc<str>>,
}

impl Snapshot {
    /// Milliseconds since the task was posted.
    pub fn elapsed_ms(&self, now_ms: u64) -> u64 {
        self.task.as_ref().map_or(0, |t| now_ms.saturating_sub(t.time_ms))
    }

    /// [`SessionState::call_ordinal`] for the peer this snapshot was taken for.
    pub fn call_ordinal(&self, me: &PeerId, step: &str) -> u32 {
        if summary_upto(step).is_some() {
            self.summaries
        } else {
            let ordinal = self.tally.per_peer.get(me).map_or(0, |p| (p.messages_from_calls + p.failures) as u32);
            ordinal.saturating_sub(self.my_summaries)
        }
    }

    /// [`SessionState::budget_stop`], as the state was when the snapshot was taken.
    pub fn budget_stop(&self, why: String) -> Duty {
        let decided_by = self.tally.last_call.iter().cloned().collect();
        stop_duty_at(
            StopDecision::not_accepted(why, self.best.clone(), decided_by),
            self.round,
            &self.tally,
            self.last_seq,
        )
    }
}

/// How the reason of a stop for a session budget begins (see [`crate::termination::Budget`]).
const BUDGET_PREFIX: &str = "budget: ";

/// The author of the `failure` a fold takes in place of a stop that does not follow
/// from the log (a backend that rejects it itself records its own).
pub const REJECTED_BY: &str = "log";

/// The `failure` folded in place of `stop` when it does not follow from the log: step
/// `rejected/<seq>`, why in its text and in `json.reason`, at the stop's time.
pub fn rejected_stop(stop: &Entry, why: &str) -> Envelope {
    let env = &stop.env;
    let seq = stop.seq;
    let text = format!("rejected the stop at log position {seq} from {}: {why}", env.from);
    let json =
        serde_json::json!({"op": "rejected", "seq": seq, "kind": "stop", "from": env.from.as_str(), "reason": why});
    let mut out = Envelope::new(
        &env.session,
        &PeerId::from(REJECTED_BY),
        format!("rejected/{seq}"),
        Kind::Failure,
        Recipient::All,
        Body::text(text).with_json(json),
    );
    out.time_ms = env.time_ms;
    out
}

/// Where `stop` says it was decided (`decided_at`). A stop is recorded at step
/// [`STOP_STEP`] with the collective id only. `Ok(None)` for a stop from before stops
/// said where they were decided: taken as it is in a session whose envelopes are not
/// signed, refused in one whose are.
fn decided_at(plan: &TeamPlan, session: &SessionId, stop: &Entry) -> Result<Option<u64>, String> {
    let env = &stop.env;
    if &*env.step != STOP_STEP || env.id != EnvelopeId::derive(session, &PeerId::from("*"), STOP_STEP) {
        return Err(format!("a stop is recorded at step {STOP_STEP:?} with the collective id, not at {:?}", env.step));
    }
    let Some(json) = env.body.json.as_ref().and_then(|j| j.as_object()) else {
        return Err("the stop records no decision (its body has no JSON object)".into());
    };
    match json.get("decided_at") {
        Some(v) => match v.as_u64() {
            Some(at) if at < stop.seq => Ok(Some(at)),
            _ => Err(format!("the stop says it was decided at {v}, not a log position before its own ({})", stop.seq)),
        },
        None if matches!(crate::trust::Roster::of_plan(plan), Ok(Some(_))) => {
            Err("the stop does not say where it was decided (`decided_at`)".into())
        }
        None => Ok(None),
    }
}

/// Whether the session budget stop `reason` names a limit of `budget` that the usage on
/// the log reached: between `at` (the log where the stop was decided) and `now` (the
/// whole log before the stop), since a peer's turn may record calls of its own before
/// it is refused. What the refused call would have used (its prompt's size and cost)
/// and the wall time are its writer's to say.
fn budget_follows(b: &crate::termination::Budget, reason: &str, at: &Tally, now: &Tally) -> Result<(), String> {
    let rest = reason.strip_prefix(BUDGET_PREFIX).unwrap_or(reason);
    let within = |x: u64, lo: u64, hi: u64| lo <= x && x <= hi;
    let money = |x: f64, lo: f64, hi: f64| x >= lo - 0.00005 && x <= hi + 0.00005;
    if let Some(max) = b.max_calls
        && let Some(n) = rest.strip_suffix(&format!(" model calls made, limit {max}"))
    {
        let n: u64 = n.parse().map_err(|_| format!("{n:?} is not a number of calls"))?;
        return (within(n, at.calls, now.calls) && n + 1 > max)
            .then_some(())
            .ok_or_else(|| format!("the log has {} to {} calls, limit {max}", at.calls, now.calls));
    }
    if let Some(max) = b.max_tokens
        && let Some((used, next)) = rest
            .strip_suffix(&format!(", limit {max}"))
            .and_then(|r| r.split_once(" tokens used and the next prompt needs ~"))
    {
        let (used, next): (u64, u64) = (
            used.parse().map_err(|_| format!("{used:?} is not a number of tokens"))?,
            next.parse().map_err(|_| format!("{next:?} is not a number of tokens"))?,
        );
        return (within(used, at.tokens(), now.tokens()) && used.saturating_add(next) > max)
            .then_some(())
            .ok_or_else(|| format!("the log used {} to {} tokens, limit {max}", at.tokens(), now.tokens()));
    }
    if let Some(max) = b.max_cost_usd
        && let Some((used, next)) = rest
            .strip_suffix(&format!(", limit ${max:.4}"))
            .and_then(|r| r.strip_prefix('$'))
            .and_then(|r| r.split_once(" spent, next prompt ~$"))
    {
        let (used, next): (f64, f64) = (
            used.parse().map_err(|_| format!("{used:?} is not an amount"))?,
            next.parse().map_err(|_| format!("{next:?} is not an amount"))?,
        );
        return (money(used, at.cost_usd, now.cost_usd) && used + next > max - 0.0001)
            .then_some(())
            .ok_or_else(|| format!("the log spent ${:.4} to ${:.4}, limit ${max:.4}", at.cost_usd, now.cost_usd));
    }
    if let Some(max) = b.max_wall_ms
        && let Some(used) = rest.strip_suffix(&format!(" s of wall time used, limit {:.1} s", max as f64 / 1e3))
    {
        // The clock: a reader cannot tell, so the writer's reading is taken.
        let used: f64 = used.parse().map_err(|_| format!("{used:?} is not a number of seconds"))?;
        return (used + 0.05 >= max as f64 / 1e3)
            .then_some(())
            .ok_or_else(|| "the wall time is under the limit".into());
    }
    if let Some(max) = b.max_tool_calls
        && let Some(n) = rest.strip_suffix(&format!(" tool calls made, limit {max}"))
    {
        let n: u64 = n.parse().map_err(|_| format!("{n:?} is not a number of tool calls"))?;
        return (n >= max && n < now.tool_calls)
            .then_some(())
            .ok_or_else(|| format!("the log has {} tool calls, limit {max}", now.tool_calls));
    }
    if let Some(max) = b.max_tool_ms
        && rest.ends_with(&format!(" s spent in tools, limit {:.1} s", max as f64 / 1e3))
    {
        return (now.tool_ms >= max)
            .then_some(())
            .ok_or_else(|| format!("the log spent {} ms in tools, limit {max} ms", now.tool_ms));
    }
    Err("it names no limit of the session's budget".into())
}

/// Whether `stop` (at its place) follows from `before`, every entry before it in order
/// from the first, as a reader that does not fold the session itself checks it (a
/// backend replacing what no reader may take): see the module docs. If not, why.
pub fn stop_follows(
    plan: Arc<TeamPlan>,
    session: SessionId,
    before: impl IntoIterator<Item = Entry>,
    stop: &Entry,
) -> Result<(), String> {
    let Some(at) = decided_at(&plan, &session, stop)? else {
        return Ok(());
    };
    let mention = plan.termination.mention().map(Arc::<str>::from);
    let mut fresh = SessionState::new(plan, session);
    fresh.derive_stops = false;
    let mut now: Option<Tally> = None;
    for e in before {
        // A stop before this one did not follow (or this one would be after the stop).
        let e = match e.env.kind {
            Kind::Stop => Entry { seq: e.seq, env: Arc::new(rejected_stop(&e, "an earlier stop that did not follow")) },
            _ => e,
        };
        match &mut now {
            None if e.seq <= at => fresh.apply(&e),
            None => {
                let mut t = fresh.tally.clone();
                t.observe(e.seq, &e.env, mention.as_deref());
                now = Some(t);
            }
            Some(t) => t.observe(e.seq, &e.env, mention.as_deref()),
        }
    }
    if fresh.last_seq != at {
        return Err(format!("the stop says it was decided at log position {at}, which is not on the log"));
    }
    let now = now.unwrap_or_else(|| fresh.tally.clone());
    fresh.derives(stop, &now)
}

/// The step prefix of summaries of older rounds: `summary/{upto}`.
pub const SUMMARY_STEP: &str = "summary";

/// The last round a summary step covers.
pub fn summary_upto(step: &str) -> Option<u32> {
    step.strip_prefix("summary/")?.parse().ok()
}

fn absent_peer(env: &Envelope) -> Option<PeerId> {
    env.body.json.as_ref()?.get("peer")?.as_str().map(PeerId::from)
}

/// The opening envelope of a session: the topic, and the plan (so the session can be
/// resumed from its log alone).
pub fn task_envelope(session: &SessionId, plan: &TeamPlan, topic: &str) -> Envelope {
    opening_envelope(session, topic, serde_json::json!({ "team_name": plan.name, "plan": plan }))
}

/// An opening task envelope with this text and JSON (from the user, to everyone, at the
/// task step): [`task_envelope`] for a team's plan, or what another kind of session
/// (a test run, a conformance check) records instead.
pub fn opening_envelope(session: &SessionId, text: &str, json: serde_json::Value) -> Envelope {
    Envelope::new(session, &PeerId::from(USER), TASK_STEP, Kind::Task, Recipient::All, Body::text(text).with_json(json))
}

/// The plan stored in a task envelope.
pub fn plan_of(task: &Envelope) -> Result<TeamPlan, String> {
    let plan = task.body.json.as_ref().and_then(|j| j.get("plan")).ok_or("the task envelope holds no plan")?;
    serde_json::from_value(plan.clone()).map_err(|e| format!("the plan in the task envelope is unreadable: {e}"))
}

/// A new session id: time-sortable and unique.
pub fn new_session_id() -> SessionId {
    let now = crate::envelope::now_ms();
    let secs = now / 1000;
    let (y, mo, d, h, mi, s) = civil(secs);
    let r: u32 = rand::random();
    SessionId::from(format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{:06x}", r & 0xff_ffff))
}

/// UTC calendar fields of a Unix time (days-from-civil inverse, Howard Hinnant's).
pub fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, ((rem % 3600) / 60) as u32, (rem % 60) as u32)
}

/// What a session came to: computed from its log, for `--json` and listings.
#[derive(Clone, Debug, Serialize)]
pub struct SessionSummary {
    pub session: SessionId,
    pub team: String,
    pub protocol: String,
    pub topic: String,
    pub stopped: bool,
    pub stop_reason: Option<String>,
    /// The answer the session ended with: the accepted answer when `answer_accepted`,
    /// else the leading candidate when a limit stopped the session (or none).
    pub final_answer: Option<String>,
    /// Whether the protocol accepted `final_answer` by its own rule. False when a
    /// budget, a termination condition, a timeout, failures or absence stopped the
    /// session first, and while it runs.
    pub answer_accepted: bool,
    pub envelopes: u64,
    pub messages: u64,
    /// Rounds reached, counted from 1.
    pub rounds: u32,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub failures: u64,
    /// The session stopped because its model calls failed (see [`FAILED_PREFIX`]).
    pub failed: bool,
    pub duration_ms: u64,
    pub per_peer: std::collections::BTreeMap<PeerId, crate::termination::PeerTally>,
}

impl SessionSummary {
    /// Fold a whole log. Fails only when the log has no readable task envelope.
    pub fn from_entries(session: &SessionId, entries: &[Entry]) -> Result<Self, String> {
        let task = entries.iter().find(|e| e.env.kind == Kind::Task).ok_or("the log has no task envelope")?;
        let plan = Arc::new(plan_of(&task.env)?);
        let mut st = SessionState::new(plan.clone(), session.clone());
        for e in entries {
            st.apply(e);
        }
        let stop_json = st.stop.as_ref().and_then(|s| s.env.body.json.clone());
        let first = entries.first().map_or(0, |e| e.env.time_ms);
        let last = entries.last().map_or(0, |e| e.env.time_ms);
        Ok(SessionSummary {
            session: session.clone(),
            team: plan.name.clone(),
            protocol: plan.protocol.kind().into(),
            topic: task.env.body.text.to_string(),
            stopped: st.stop.is_some(),
            stop_reason: stop_json.as_ref().and_then(|j| j.get("reason")?.as_str().map(str::to_owned)),
            final_answer: match &st.stop {
                Some(s) => stop_json
                    .as_ref()
                    .and_then(|j| j.get("answer")?.as_str().map(str::to_owned))
                    .or_else(|| (!s.env.body.text.is_empty()).then(|| s.env.body.text.to_string())),
                None => st.best_answer().map(|a| a.to_string()),
            },
            // Logs from before `accepted` was recorded: an answer in the stop counted.
            answer_accepted: stop_json.as_ref().is_some_and(|j| {
                j.get("accepted")
                    .and_then(|a| a.as_bool())
                    .unwrap_or_else(|| j.get("answer").is_some_and(|a| a.is_string()))
            }),
            envelopes: entries.len() as u64,
            messages: st.tally.messages,
            rounds: rounds_reached(&plan, entries),
            calls: st.tally.calls,
            prompt_tokens: st.tally.prompt_tokens,
            completion_tokens: st.tally.completion_tokens,
            tokens: st.tally.tokens(),
            cost_usd: st.tally.cost_usd,
            failures: st.tally.failures,
            failed: stop_json
                .as_ref()
                .and_then(|j| j.get("reason")?.as_str())
                .is_some_and(|r| r.starts_with(FAILED_PREFIX)),
            duration_ms: last.saturating_sub(first),
            per_peer: st.tally.per_peer.clone(),
        })
    }
}

/// Whether `env` stands for a message a reader rejected at its place (garbage, a
/// forgery, a stop that did not follow): a `failure` at step `rejected/<seq>`.
pub fn is_rejection(env: &Envelope) -> bool {
    env.kind == Kind::Failure && env.step.starts_with("rejected/")
}

/// A session's task: its first entry that is not a rejection, when that is a task. Over
/// NATS anyone allowed on a session's subjects can publish before its task; what they
/// publish is read as rejections before it (see `roundtable_nats`), so a session starts
/// at its task rather than at its first entry.
pub fn task_entry(entries: &[Entry]) -> Option<&Entry> {
    entries.iter().find(|e| !is_rejection(&e.env)).filter(|e| e.env.kind == Kind::Task)
}

/// The task of the session on `log` as it stands (see [`task_entry`]): `None` when the
/// log holds nothing but rejections, or its first other entry is not a task.
pub async fn read_task(log: &dyn crate::log::SessionLog) -> Result<Option<Entry>, crate::log::LogError> {
    const CHUNK: usize = 64;
    let mut from = 1;
    loop {
        let entries = log.read(from, CHUNK).await?;
        if let Some(e) = entries.iter().find(|e| !is_rejection(&e.env)) {
            return Ok((e.env.kind == Kind::Task).then(|| e.clone()));
        }
        match entries.last() {
            Some(last) if entries.len() == CHUNK => from = last.seq + 1,
            _ => return Ok(None),
        }
    }
}

/// The log as a reader of the session takes it: every entry as it is, except a stop
/// that does not follow from the log before it (or comes after the session's stop),
/// which is the `failure` it stands for ([`rejected_stop`]). What readers that show a
/// log (`log`, `trace`, listings, the web view) show, so that they show the session's
/// outcome as its fold derives it, not as a stop's writer claims it. A log without a
/// readable task is returned as it is.
pub fn as_folded(session: &SessionId, entries: &[Entry]) -> Vec<Entry> {
    let Some(plan) = task_entry(entries).and_then(|t| plan_of(&t.env).ok()) else {
        return entries.to_vec();
    };
    let mut st = SessionState::new(Arc::new(plan), session.clone());
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let read = match (&st.stop, e.env.kind) {
            (Some(stop), Kind::Stop) => Entry {
                seq: e.seq,
                env: Arc::new(rejected_stop(
                    e,
                    &format!("a second stop (the session stopped at log position {})", stop.seq),
                )),
            },
            _ => st.rejection_of(e).unwrap_or_else(|| e.clone()),
        };
        if st.fold_session(&read) {
            let facts = Facts { plan: &st.plan, session: &st.session, absent: &st.absent, task: st.task.as_ref() };
            st.protocol.apply(&read, &facts);
        }
        out.push(read);
    }
    out
}
