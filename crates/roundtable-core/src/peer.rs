//! A peer: one task with its own view of the log.
//!
//! A peer tails the session log from the start, folds every entry into its own
//! [`SessionState`], and does what that state says is its duty — call its model and
//! append the answer, append a decision, commit or reveal a vote, measure similarity,
//! write the blackboard, claim work. Then it waits until its own envelope comes back
//! through the log before it looks for the next duty, so a duty is never done twice.
//! The peers of one process may share that fold instead ([`fold::SharedFold`], given
//! through [`PeerExtras::fold`]): the log is folded once for all of them, and an entry
//! wakes only the peers whose duty it may have changed.
//! Nothing that matters lives only in the peer's memory: a peer that restarts reads the
//! log again and reaches the same state.
//!
//! # Budgets
//! Every model call — a turn, a vote, a judge's verdict, a summary, an embedding — is
//! checked against the session's and the peer's budget first. A call the session's
//! budget does not allow is not made: the peer records the stop with the best answer so
//! far. A call the peer's own budget does not allow is recorded as a failure of that
//! step, and the protocol moves on without it.
//!
//! # When a peer dies mid-call
//! The model call's result was not on the log, so the step is not done; whoever runs
//! the peer again (a restart, `roundtable resume`) redoes it, and the id derived from
//! (session, peer, step) keeps the log free of duplicates if the first append did land.
//! Other peers notice the missing heartbeats after the configured time and record an
//! `absent` envelope; protocols skip an absent peer's turns.
//!
//! Writes outside the log are made so that a restart finds them: a blackboard value
//! names the peer and step that wrote it (and the call's usage), so a peer that wrote
//! the board but died before recording it records it on restart without calling its
//! model again; a commitment's answer is sealed on the log (see
//! [`crate::protocol::seal`]); work-queue claims are recorded before they are acked.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

mod acting;
pub mod fold;
use acting::{Granted, InTurn, Ledger, call_with_tools};
use fold::{Seat, SharedFold};

use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::blackboard::{Blackboard, BoardErrorKind};
use crate::bus::{MemParts, Presence};
use crate::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, Usage, now_ms};
use crate::log::{Entry, LogError, LogErrorKind, SessionLog};
use crate::model::{
    ChatMessage, ChatModel, ChatRequest, Embedder, History, ModelError, Price, Role, Transcript, estimate_tokens,
};
use crate::protocol::{Action, BoardMark, Duty, QueueItem, View, seal};
use crate::session::{SessionState, Snapshot, plan_of, summary_upto};
use crate::similarity::{Pairwise, cosine};
use crate::team::{ContextPolicy, ModelSpec, PeerSpec, TeamPlan};
use crate::termination::BudgetScope;
use crate::workqueue::WorkQueue;

/// What a peer tells the outside world while it works (not on the log: streaming text
/// and progress are for display only).
#[derive(Clone, Debug)]
pub enum PeerEvent {
    /// The peer started a model call for a step.
    Thinking { peer: PeerId, step: Arc<str>, round: u32 },
    /// A piece of streamed text.
    Token { peer: PeerId, step: Arc<str>, text: String },
    /// Attempt `attempt` of at most `of` failed; the next starts after `wait_ms`. The
    /// text it streamed is not part of the answer.
    AttemptFailed {
        peer: PeerId,
        step: Arc<str>,
        attempt: u32,
        of: u32,
        error: String,
        wait_ms: u64,
        /// The wait is the provider's Retry-After.
        retry_after: bool,
    },
    /// Attempt `attempt` (2 or more) of at most `of` started.
    Retrying { peer: PeerId, step: Arc<str>, attempt: u32, of: u32 },
    /// The model call answered (sent before the envelope it leads to is appended, so a
    /// display can close the call before the next one starts).
    Answered { peer: PeerId, step: Arc<str>, text: Arc<str>, usage: Usage },
}

pub type EventSink = Arc<dyn Fn(PeerEvent) + Send + Sync>;

/// How a peer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerExit {
    /// The session has a stop envelope.
    Stopped,
}

/// Shared state and capabilities some protocols need besides the log. All optional:
/// a peer that is given none uses an in-process blackboard and work queue shared by
/// every peer of the session in this process, no embedder (embedding similarity then
/// falls back to lexical), and a secret for sealing votes that lives as long as the
/// process (see [`crate::protocol::seal`] for what that means for a juror that restarts
/// in another process).
#[derive(Clone, Default)]
pub struct PeerExtras {
    pub board: Option<Arc<dyn Blackboard>>,
    pub queue: Option<Arc<dyn WorkQueue>>,
    pub embedder: Option<Arc<dyn Embedder>>,
    /// The peer's secret for sealing commit-reveal votes. Never written anywhere.
    pub secret: Option<Arc<[u8]>>,
    /// The plan in the session's task envelope, already parsed: a runner starting many
    /// peers in one process parses it once and shares it (each peer parsing its own
    /// copy costs O(peers) memory per peer). Must be the plan of this log's task.
    pub plan: Option<Arc<crate::team::TeamPlan>>,
    /// The history of this session's in-context envelopes, shared by the peers of this
    /// process that fold its log (see [`History`]); a runner starting many peers gives
    /// them one, so that a message is held once, not once per peer. Must be of this
    /// log's session.
    pub history: Option<Arc<History>>,
    /// The tools this process built from the plan's `[tools]` (see
    /// [`crate::tool::ToolBox`]). A peer granted a tool the box lacks has its calls to
    /// it refused, on the record.
    pub tools: Option<Arc<crate::tool::ToolBox>>,
    /// The fold of this session's log shared by the peers of this process (see
    /// [`SharedFold`]): a runner starting many peers in one process gives them one, so
    /// that an entry is folded once and wakes only the peers it concerns. Without one
    /// (a peer run alone) the peer folds the log itself. Ignored when it is not of this
    /// log's session.
    pub fold: Option<Arc<SharedFold>>,
}

/// Everything a peer needs to run.
#[derive(Clone)]
pub struct PeerConfig {
    pub me: PeerId,
    pub log: Arc<dyn SessionLog>,
    /// The peer's model, already wrapped in its layers.
    pub model: Arc<dyn ChatModel>,
    pub presence: Option<Arc<dyn Presence>>,
    pub events: Option<EventSink>,
}

/// In-process blackboards and work queues, per session, for peers given none.
fn local_parts() -> &'static MemParts {
    static PARTS: OnceLock<MemParts> = OnceLock::new();
    PARTS.get_or_init(MemParts::default)
}

/// A secret for this process, for peers given none.
fn process_secret() -> Arc<[u8]> {
    static SECRET: OnceLock<Arc<[u8]>> = OnceLock::new();
    SECRET.get_or_init(|| Arc::from(rand::random::<[u8; 32]>().to_vec())).clone()
}

/// What a peer knows of itself, fixed for the session.
struct Me {
    cfg: PeerConfig,
    extras: PeerExtras,
    plan: Arc<TeamPlan>,
    spec: PeerSpec,
    system: Arc<str>,
    model_spec: Option<ModelSpec>,
    price: Price,
    secret: Arc<[u8]>,
    /// The id of the last append that was a duplicate (its step was already done).
    duplicate: std::sync::Mutex<Option<EnvelopeId>>,
    /// The tools this peer may call.
    granted: Granted,
    /// Work-queue tasks this peer claimed through `queue_claim` and holds.
    claims: std::sync::Mutex<std::collections::HashMap<String, crate::workqueue::Claim>>,
}

impl Me {
    fn board(&self) -> Arc<dyn Blackboard> {
        self.extras.board.clone().unwrap_or_else(|| local_parts().blackboard(self.cfg.log.session()))
    }
    fn queue(&self) -> Arc<dyn WorkQueue> {
        self.extras.queue.clone().unwrap_or_else(|| {
            local_parts().work_queue(self.cfg.log.session(), self.plan.protocol.queue_config().unwrap_or_default())
        })
    }
}

/// Run one peer until the session is stopped.
pub async fn run_peer(cfg: PeerConfig) -> Result<PeerExit, LogError> {
    run_peer_with(cfg, PeerExtras::default()).await
}

/// [`run_peer`] with a blackboard, a work queue, an embedder or a secret (see
/// [`PeerExtras`]).
pub async fn run_peer_with(cfg: PeerConfig, extras: PeerExtras) -> Result<PeerExit, LogError> {
    let session = cfg.log.session().clone();
    let started = tokio::time::Instant::now();
    let fold = extras.fold.clone().filter(|f| f.is_of(cfg.log.as_ref()));

    // The first entry is the task, which carries the plan; over NATS, messages published
    // before it are read as rejections (see `session::task_entry`), folded before it.
    let mut source = match &fold {
        Some(f) => Source::Shared(f.join(&cfg.me)),
        None => Source::Own { tail: cfg.log.tail(1).await?, st: None, before: Vec::new() },
    };
    let first = source.first().await?;
    let plan = match (&fold, &extras.plan) {
        (Some(f), _) => f.plan().clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => Arc::new(plan_of(&first.env).map_err(|e| LogError::new(LogErrorKind::Corrupt, e))?),
    };
    let spec = plan
        .peer(&cfg.me)
        .ok_or_else(|| LogError::new(LogErrorKind::Rejected, format!("{} is not a peer of this team", cfg.me)))?
        .clone();
    let model_spec = plan.models.get(&spec.model).cloned();
    let me = Me {
        system: Arc::from(spec.system_prompt()),
        price: model_spec.as_ref().map(|m| m.price).unwrap_or_default(),
        secret: extras.secret.clone().unwrap_or_else(process_secret),
        extras,
        model_spec,
        spec,
        plan: plan.clone(),
        cfg: cfg.clone(),
        duplicate: std::sync::Mutex::new(None),
        granted: Granted::default(),
        claims: Default::default(),
    };
    let me = Me { granted: Granted::of(&me.spec, &plan, me.extras.tools.as_deref()), ..me };

    let history = match &fold {
        Some(f) => f.history().clone(),
        None => me.extras.history.clone().unwrap_or_default(),
    };
    let mut obs = Observers {
        view: PeerView::over(cfg.me.clone(), me.spec.group.clone(), history),
        ledger: Ledger::default(),
        asked: acting::Asked::default(),
        tools_seen: 0,
        approvals_seen: 0,
        summaries_seen: 0,
    };
    source.start(plan.clone(), &cfg.me, first, &mut obs);

    let hb = Duration::from_millis(plan.presence.heartbeat_ms.max(10));
    let stalls = Arc::new(Stalls::new(Duration::from_millis(plan.presence.absent_after_ms) * 4));
    // Heartbeats run on a task of their own: a peer waiting on a long model call is
    // alive, and must not be noticed absent for it. Their lateness measures this
    // process's own stalls (see [`Stalls`]).
    let _beats = cfg.presence.clone().map(|p| {
        let me = cfg.me.clone();
        let stalls = stalls.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut beat = tokio::time::interval(hb);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let due = beat.tick().await;
                stalls.note(due, hb);
                if let Err(e) = p.beat(&me).await {
                    tracing::warn!(peer = %me, error = %e, "heartbeat failed");
                }
            }
        }))
    });
    let mut tick = tokio::time::interval(hb);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let uses_clock = plan.termination.timeout_ms().is_some() || plan.budget.max_wall_ms.is_some();
    let mut wait_for_seq = 0u64;
    let mut stalled: Option<(EnvelopeId, u64)> = None;
    // Duties human peers wait on, to record them absent when one waits too long.
    let mut overdue = crate::human::Overdue::applies(&plan).then(crate::human::Overdue::default);

    loop {
        // Take everything that is ready (or, sharing a fold, wait to be woken), then
        // act once.
        let woke = tokio::select! {
            biased;
            r = source.next(&cfg.me, &mut obs) => Woke::Log(r),
            due = tick.tick() => Woke::Tick(due),
        };
        let due = match woke {
            Woke::Log(r) => {
                r?;
                None
            }
            Woke::Tick(due) => Some(due),
        };
        if let Some(due) = due {
            // A late tick means this peer was not running (a stall, or a duty that
            // took long): let the heartbeat task note a stall before judging others.
            let on_time = due.elapsed() <= hb;
            let (last_seq, stopped) = source.with(|st| (st.last_seq, st.is_stopped()));
            if on_time
                && last_seq >= wait_for_seq
                && !stopped
                && let Some(presence) = &cfg.presence
                && let Ok(seen) = presence.last_seen().await
                && let Some((duty, snap)) = absence_duty(&source, &cfg, started, &stalls, &plan, &seen)
            {
                wait_for_seq = post(&me, &snap, &duty, body_of(&duty)).await?;
                source.wait_for(wait_for_seq);
                continue;
            }
            if last_seq >= wait_for_seq
                && let Some(o) = overdue.as_mut()
                && let Some((duty, snap)) =
                    source.with(|st| o.check(st, &cfg.me, now_ms()).map(|d| (d, st.snapshot(&cfg.me))))
            {
                wait_for_seq = post(&me, &snap, &duty, body_of(&duty)).await?;
                source.wait_for(wait_for_seq);
                continue;
            }
        }
        // The clock matters only to a timeout or a wall-time budget; reading it for
        // every folded entry of every peer is measurable in large teams.
        let now = if uses_clock { now_ms() } else { 0 };
        let next = source.read(&cfg.me, &mut obs, |st, obs| {
            if st.is_stopped() {
                return Next::Stopped;
            }
            if st.last_seq < wait_for_seq {
                return Next::Wait;
            }
            // A peer waits on this one's answer before its tool runs: answer first.
            if let Some(request) = obs.asked.next() {
                return Next::Approve(request, st.snapshot(&cfg.me));
            }
            match st.duties(&cfg.me, now).into_iter().next() {
                Some(duty) => Next::Duty(duty, st.snapshot(&cfg.me)),
                None => Next::Wait,
            }
        });
        let (duty, snap) = match next {
            Next::Stopped => return Ok(PeerExit::Stopped),
            Next::Wait => continue,
            Next::Approve(request, snap) => {
                wait_for_seq = acting::answer_approval(&me, &snap, &obs.view, &request).await?;
                source.wait_for(wait_for_seq);
                continue;
            }
            Next::Duty(duty, snap) => {
                // A duty whose envelope is already on the log, yet still a duty once
                // that envelope was folded in, would be retried forever: wait for
                // something new. (The id is derived only when there is something to
                // compare it with.)
                if let Some((id, seq)) = &stalled
                    && *seq == snap.last_seq
                    && *id == duty.envelope_id(&session, &cfg.me)
                {
                    continue;
                }
                (duty, snap)
            }
        };
        if let Some(seq) = perform(&me, &snap, &obs.view, &duty, &obs.ledger).await? {
            wait_for_seq = seq;
            source.wait_for(seq);
        }
        let duplicate = me.duplicate.lock().expect("duplicate lock").take();
        if let Some(id) = duplicate
            && wait_for_seq <= snap.last_seq
            && id == duty.envelope_id(&session, &cfg.me)
        {
            tracing::warn!(peer = %cfg.me, step = %duty.step, "duty already on the log; waiting for new entries");
            stalled = Some((id, snap.last_seq));
        }
    }
}

/// What woke a peer.
enum Woke {
    Log(Result<(), LogError>),
    Tick(tokio::time::Instant),
}

/// What a peer does next, read from the state.
enum Next {
    Stopped,
    /// Nothing to do until the log moves (or this peer's own append lands).
    Wait,
    /// Answer this approval request.
    Approve(Arc<Envelope>, Snapshot),
    /// Do this duty, with the state it was read from.
    Duty(Duty, Snapshot),
}

/// What a peer observes of the log besides the session state: its view of the history,
/// its own tool calls, and approvals asked of it. A peer that folds the log itself
/// feeds them every entry; one that shares a fold catches them up when it wakes (the
/// counts say how far in the fold's lists).
struct Observers {
    view: PeerView,
    ledger: Ledger,
    asked: acting::Asked,
    tools_seen: usize,
    approvals_seen: usize,
    summaries_seen: usize,
}

impl Observers {
    fn observe(&mut self, me: &PeerId, env: &Arc<Envelope>) {
        self.view.observe(env);
        self.ledger.observe(me, env);
        self.asked.observe(me, env);
    }

    /// Catch up with what the shared fold holds.
    fn catch_up(&mut self, me: &PeerId, inner: &fold::Inner) {
        for env in inner.summaries.get(self.summaries_seen..).unwrap_or_default() {
            self.view.observe(env);
        }
        self.summaries_seen = inner.summaries.len();
        self.view.catch_up();
        if let Some(mine) = inner.tools.get(me) {
            for env in mine.get(self.tools_seen..).unwrap_or_default() {
                self.ledger.observe(me, env);
            }
            self.tools_seen = mine.len();
        }
        for env in inner.approvals.get(self.approvals_seen..).unwrap_or_default() {
            self.asked.observe(me, env);
        }
        self.approvals_seen = inner.approvals.len();
    }
}

/// Where a peer's session state comes from: its own fold of the log, or a fold shared
/// with the other peers of its process.
enum Source {
    /// Folding the log itself; `before`: the rejections read before the task.
    Own {
        tail: crate::log::EntryStream,
        st: Option<SessionState>,
        before: Vec<Entry>,
    },
    Shared(Seat),
}

impl Source {
    /// The log's first entry, the task.
    async fn first(&mut self) -> Result<Entry, LogError> {
        match self {
            Source::Own { tail, before, .. } => loop {
                match tail.next().await {
                    Some(e) => {
                        let e = e?;
                        if !crate::session::is_rejection(&e.env) {
                            return Ok(e);
                        }
                        before.push(e);
                    }
                    None => return Err(LogError::new(LogErrorKind::NotFound, "the log ended before its task")),
                }
            },
            Source::Shared(seat) => loop {
                if let Some(task) = seat.with(|st| st.task.clone()) {
                    return Ok(Entry { seq: 1, env: task });
                }
                seat.woken().await?;
            },
        }
    }

    /// Start folding with the first entry, after the rejections read before it (a shared
    /// fold has them already).
    fn start(&mut self, plan: Arc<TeamPlan>, me: &PeerId, first: Entry, obs: &mut Observers) {
        match self {
            Source::Own { st, before, .. } => {
                let mut mine = SessionState::for_peer(plan, first.env.session.clone(), me);
                for e in before.drain(..) {
                    obs.view.observe(&e.env);
                    mine.take(e);
                }
                obs.view.observe(&first.env);
                mine.take(first);
                *st = Some(mine);
            }
            Source::Shared(_) => obs.view.observe(&first.env),
        }
    }

    /// Wait for the log to move: fold what is ready, or be woken by the shared fold.
    async fn next(&mut self, me: &PeerId, obs: &mut Observers) -> Result<(), LogError> {
        match self {
            Source::Own { tail, st, .. } => {
                let st = st.as_mut().expect("started");
                let Some(e) = tail.next().await else {
                    return Err(LogError::new(LogErrorKind::Unavailable, "the log's tail ended"));
                };
                let e = e?;
                obs.observe(me, &e.env);
                st.take(e);
                while let Some(Some(more)) = tail.next().now_or_never() {
                    let more = more?;
                    obs.observe(me, &more.env);
                    st.take(more);
                }
                Ok(())
            }
            Source::Shared(seat) => seat.woken().await,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&SessionState) -> R) -> R {
        match self {
            Source::Own { st, .. } => f(st.as_ref().expect("started")),
            Source::Shared(seat) => seat.with(f),
        }
    }

    /// Read the state with the observers caught up with it.
    fn read<R>(&self, me: &PeerId, obs: &mut Observers, f: impl FnOnce(&SessionState, &Observers) -> R) -> R {
        match self {
            Source::Own { st, .. } => f(st.as_ref().expect("started"), obs),
            Source::Shared(seat) => {
                let g = seat.lock();
                obs.catch_up(me, &g);
                f(&g.st, obs)
            }
        }
    }

    /// This peer appended at `seq`: wake it when the state has folded that far.
    fn wait_for(&self, seq: u64) {
        if let Source::Shared(seat) = self {
            seat.wait_for(seq);
        }
    }
}

/// Wall time since the task, for a wall-time budget; the clock is read only when the
/// plan has one (a clock read per call is measurable on some hosts).
fn elapsed_ms(me: &Me, st: &Snapshot) -> u64 {
    if me.plan.budget.max_wall_ms.is_some() { st.elapsed_ms(now_ms()) } else { 0 }
}

/// Aborts a background task when the peer that started it ends (or is dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn body_of(duty: &Duty) -> Body {
    match &duty.action {
        Action::Post { body } => body.clone(),
        _ => Body::default(),
    }
}

/// Carry out one duty; the sequence number of what it appended, if anything.
async fn perform(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    ledger: &Ledger,
) -> Result<Option<u64>, LogError> {
    let seq = match &duty.action {
        Action::Post { body } => post(me, st, duty, body.clone()).await?,
        Action::Turn { instruction, view: v, read_upto, reply_to } => {
            match call_with_tools(me, st, view, duty, instruction, false, v, ledger.of(&duty.step)).await? {
                Called::Answer { text, usage, turn, .. } => {
                    let quiet = text.trim().is_empty();
                    let body = Body::text(text.as_str()).with_json(serde_json::json!({ "read_upto": read_upto }));
                    let mut env = envelope(me, st, duty, Kind::Message, body).with_usage(usage);
                    env.to = if quiet { Recipient::Peer(me.cfg.me.clone()) } else { reply_to.clone() };
                    append_traced(me, env, turn).await?
                }
                Called::Stopped => return Ok(None),
                Called::Finished => {
                    let body = Body::text("").with_json(serde_json::json!({ "read_upto": read_upto }));
                    let mut env = envelope(me, st, duty, Kind::Message, body);
                    env.to = Recipient::Peer(me.cfg.me.clone());
                    append(me, env).await?
                }
                other => return not_answered(me, st, duty, other).await.map(Some),
            }
        }
        Action::Speak { instruction, json, view: v } => {
            match call_with_tools(me, st, view, duty, instruction, *json, v, ledger.of(&duty.step)).await? {
                Called::Answer { text, usage, turn, .. } => {
                    let mut body = Body::text(text.as_str());
                    if *json {
                        body.json = parse_json_answer(&text);
                    }
                    append_traced(me, envelope(me, st, duty, duty.kind, body).with_usage(usage), turn).await?
                }
                Called::Finished => post(me, st, duty, Body::text("")).await?,
                Called::Stopped => return Ok(None),
                other => return not_answered(me, st, duty, other).await.map(Some),
            }
        }
        Action::Commit { instruction, json, view: v } => {
            match call_model(me, st, view, duty, instruction, *json, v, None).await {
                Called::Answer { text, usage, turn, .. } => {
                    let salt = seal::salt(&me.secret, &st.session, &me.cfg.me, &duty.step);
                    let json = serde_json::json!({
                        "commitment": seal::commitment(&salt, &text),
                        "sealed": seal::seal(&me.secret, &st.session, &me.cfg.me, &duty.step, &text),
                    });
                    let body = Body::text(format!("{} committed to an answer", me.cfg.me)).with_json(json);
                    append_traced(me, envelope(me, st, duty, Kind::Commit, body).with_usage(usage), turn).await?
                }
                other => return not_answered(me, st, duty, other).await.map(Some),
            }
        }
        Action::Reveal { commit } => {
            let j = commit.body.json.as_ref();
            let sealed = j.and_then(|j| j.get("sealed")).and_then(|v| v.as_str()).unwrap_or("");
            let commitment = j.and_then(|j| j.get("commitment")).and_then(|v| v.as_str()).unwrap_or("");
            let salt = hex::encode(seal::salt(&me.secret, &st.session, &me.cfg.me, &commit.step));
            match seal::open(&me.secret, &st.session, &me.cfg.me, &commit.step, sealed) {
                Some(text) if seal::verify(commitment, &salt, &text) => {
                    let body =
                        Body::text(text).with_json(serde_json::json!({ "salt": salt, "commit": commit.id.as_str() }));
                    append(me, envelope(me, st, duty, Kind::Reveal, body)).await?
                }
                _ => {
                    let why = "cannot open my own commitment: this peer's secret is not the one it committed with; the vote is forfeited";
                    append(me, failure(me, st, duty, why, serde_json::json!({ "error": "unsealable" }), None)).await?
                }
            }
        }
        Action::Measure { texts } => return measure(me, st, duty, texts).await.map(Some),
        Action::BoardWrite { instruction, key, after } => {
            return board_write(me, st, view, duty, instruction, key, after.as_ref()).await.map(Some);
        }
        Action::Claim { items } => return claim(me, st, duty, items).await,
    };
    Ok(Some(seq))
}

/// The outcome of trying to call the model for a duty.
enum Called {
    /// The answer, and the turn's span (the envelope made from it carries its trace).
    Answer {
        text: String,
        usage: Usage,
        turn: tracing::Span,
        /// Tool calls the model asked for (only when tools were offered).
        calls: Vec<crate::tool::ToolCall>,
    },
    /// The duty's work ended with a tool call that ends the turn (`finish`), with no
    /// further model call.
    Finished,
    /// The session stopped while the duty worked: nothing more is appended.
    Stopped,
    /// The budget does not allow the call; it was not made.
    Refused {
        scope: BudgetScope,
        why: String,
    },
    Failed {
        error: ModelError,
        usage: Usage,
        turn: tracing::Span,
    },
}

async fn call_model(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    instruction: &Option<Arc<str>>,
    json: bool,
    v: &View,
    in_turn: Option<&InTurn>,
) -> Called {
    let cfg = &me.cfg;
    let (prelude, history, window) = view.parts(v, &me.plan.context);
    let tally = in_turn.map_or(&st.tally, |t| &t.tally);
    let req = ChatRequest {
        peer: cfg.me.clone(),
        step: duty.step.clone(),
        ordinal: st.call_ordinal(&cfg.me, &duty.step) + in_turn.map_or(0, |t| t.calls),
        round: duty.round + 1,
        system: Some(me.system.clone()),
        prelude,
        history,
        window,
        instruction: instruction.clone(),
        temperature: me.spec.temperature,
        max_tokens: me.model_spec.as_ref().and_then(|m| m.max_tokens),
        json,
        // The schema of the answer the instruction's template asks for, so a provider
        // with structured output returns it; the protocol still parses what comes back.
        json_schema: instruction
            .as_deref()
            .filter(|_| json)
            .and_then(|i| crate::human::Form::of_instruction(i).schema(duty.kind.as_str()))
            .map(Arc::new),
        tools: in_turn.map_or_else(|| Arc::from([]), |t| t.tools.clone()),
        tool_choice: in_turn.map_or(crate::tool::ToolChoice::Auto, |t| t.choice.clone()),
        tool_turns: in_turn.map_or_else(Vec::new, |t| t.turns.clone()),
        on_token: cfg.events.as_ref().map(|ev| {
            let ev = ev.clone();
            let (peer, step) = (cfg.me.clone(), duty.step.clone());
            Arc::new(move |t: &str| {
                ev(PeerEvent::Token { peer: peer.clone(), step: step.clone(), text: t.to_string() })
            }) as crate::model::TokenSink
        }),
        on_attempt: cfg.events.as_ref().map(|ev| {
            let ev = ev.clone();
            let (peer, step) = (cfg.me.clone(), duty.step.clone());
            Arc::new(move |n: crate::model::AttemptNotice| {
                let (peer, step) = (peer.clone(), step.clone());
                ev(match n {
                    crate::model::AttemptNotice::Failed { attempt, of, error, wait, retry_after } => {
                        PeerEvent::AttemptFailed {
                            peer,
                            step,
                            attempt,
                            of,
                            error,
                            wait_ms: wait.as_millis() as u64,
                            retry_after,
                        }
                    }
                    crate::model::AttemptNotice::Started { attempt, of } => {
                        PeerEvent::Retrying { peer, step, attempt, of }
                    }
                })
            }) as crate::model::AttemptSink
        }),
    };
    // A person in a human peer's seat is no model call: their answers count against no
    // call, token or cost limit (and record `calls: 0`), only the session's wall time.
    let person = me.spec.is_human();
    let allowed = if person {
        me.plan.budget.allows_wall(elapsed_ms(me, st))
    } else {
        let est = req.estimated_prompt_tokens();
        me.plan.budget.allows(tally, &cfg.me, est, me.price.cost(est, 0), elapsed_ms(me, st))
    };
    if let Err((scope, why)) = allowed {
        return Called::Refused { scope, why };
    }
    if let Some(ev) = &cfg.events {
        ev(PeerEvent::Thinking { peer: cfg.me.clone(), step: duty.step.clone(), round: duty.round });
    }
    let turn = turn_span(cfg, st, duty).await;
    let chat = chat_span(&turn, cfg, &me.spec, me.model_spec.as_ref(), &req);
    let t0 = Instant::now();
    let result = cfg.model.chat(&req).instrument(chat.clone()).await;
    let latency_ms = t0.elapsed().as_millis() as u64;
    record_chat(&chat, &result, latency_ms);
    drop(chat);
    let model_name = cfg.model.name().to_string();
    match result {
        Ok(resp) => {
            let usage = Usage {
                model: Arc::from(if resp.model.is_empty() { model_name } else { resp.model.clone() }),
                prompt_tokens: resp.prompt_tokens,
                completion_tokens: resp.completion_tokens,
                latency_ms,
                cost_usd: me.price.cost(resp.prompt_tokens, resp.completion_tokens),
                calls: u32::from(!person),
            };
            if let Some(ev) = &cfg.events {
                ev(PeerEvent::Answered {
                    peer: cfg.me.clone(),
                    step: duty.step.clone(),
                    text: Arc::from(resp.text.as_str()),
                    usage: usage.clone(),
                });
            }
            Called::Answer { turn, usage, text: resp.text, calls: resp.tool_calls }
        }
        Err(error) => {
            let calls = if person { 0 } else { error.attempts.max(1) };
            let usage = Usage { model: Arc::from(model_name), latency_ms, calls, ..Default::default() };
            Called::Failed { error, usage, turn }
        }
    }
}

/// Record why a duty's model call gave no answer: a stop (session budget) or a
/// failure of the step (peer budget, model error).
async fn not_answered(me: &Me, st: &Snapshot, duty: &Duty, called: Called) -> Result<u64, LogError> {
    match called {
        Called::Answer { .. } | Called::Finished | Called::Stopped => {
            unreachable!("answers are handled by the caller")
        }
        Called::Refused { scope: BudgetScope::Session, why } => {
            let stop = st.budget_stop(why);
            post(me, st, &stop, body_of(&stop)).await
        }
        Called::Refused { scope: BudgetScope::Peer, why } => {
            append(me, failure(me, st, duty, &why, serde_json::json!({"error": "budget", "scope": "peer"}), None)).await
        }
        Called::Failed { error, usage, turn } => {
            let json = serde_json::json!({
                "error": error.kind.to_string(),
                "status": error.status,
                "attempts": error.attempts,
                "message": error.message,
            });
            let env = failure(me, st, duty, &format!("model call failed: {error}"), json, Some(usage));
            append_traced(me, env, turn).await
        }
    }
}

/// The envelope a duty produces, with its id, round, parents and clock.
fn envelope(me: &Me, st: &Snapshot, duty: &Duty, kind: Kind, body: Body) -> Envelope {
    let id = duty.envelope_id(&st.session, &me.cfg.me);
    let mut env = Envelope::with_id(id, &st.session, &me.cfg.me, duty.step.clone(), kind, duty.to.clone(), body)
        .with_round(duty.round)
        .with_parents(duty.parents.clone());
    env.lamport = st.lamport + 1;
    env
}

/// A failure recorded for a duty's step: it consumes the step, so the protocol moves on.
fn failure(me: &Me, st: &Snapshot, duty: &Duty, text: &str, json: serde_json::Value, usage: Option<Usage>) -> Envelope {
    let mut env = envelope(me, st, duty, Kind::Failure, Body::text(text).with_json(json));
    env.to = Recipient::All;
    env.usage = usage;
    env
}

async fn append(me: &Me, env: Envelope) -> Result<u64, LogError> {
    let id = env.id.clone();
    let a = me.cfg.log.append(env).await?;
    if a.duplicate {
        *me.duplicate.lock().expect("duplicate lock") = Some(id);
    }
    Ok(a.seq)
}

/// Append an envelope a model call produced, carrying the turn's trace context.
async fn append_traced(me: &Me, mut env: Envelope, turn: tracing::Span) -> Result<u64, LogError> {
    env.trace = crate::telemetry::traceparent(&turn);
    append(me, env).instrument(turn).await
}

async fn post(me: &Me, st: &Snapshot, duty: &Duty, body: Body) -> Result<u64, LogError> {
    append(me, envelope(me, st, duty, duty.kind, body)).await
}

/// Measure pairwise similarity with the embedder and record it as a verdict.
async fn measure(me: &Me, st: &Snapshot, duty: &Duty, texts: &[crate::protocol::Shown]) -> Result<u64, LogError> {
    let Some(embedder) = me.extras.embedder.clone() else {
        let why = "no embedder is configured for this peer; similarity falls back to lexical";
        return append(me, failure(me, st, duty, why, serde_json::json!({"error": "no_embedder"}), None)).await;
    };
    let inputs: Vec<String> = texts.iter().map(|t| t.text.to_string()).collect();
    let est: u64 = inputs.iter().map(|t| u64::from(estimate_tokens(t))).sum();
    if let Err((scope, why)) = me.plan.budget.allows(&st.tally, &me.cfg.me, est, 0.0, elapsed_ms(me, st)) {
        return not_answered(me, st, duty, Called::Refused { scope, why }).await;
    }
    let t0 = Instant::now();
    let result = embedder.embed(&inputs).await;
    let usage = Usage {
        model: Arc::from(embedder.name()),
        prompt_tokens: est,
        completion_tokens: 0,
        latency_ms: t0.elapsed().as_millis() as u64,
        cost_usd: 0.0,
        calls: 1,
    };
    match result {
        Ok(vectors) if vectors.len() == inputs.len() => {
            let p = Pairwise::of(vectors.len(), |i, j| cosine(&vectors[i], &vectors[j]));
            let json = serde_json::json!({
                "method": "embedding",
                "embedder": embedder.name(),
                "peers": texts.iter().map(|t| t.from.as_str()).collect::<Vec<_>>(),
                "similarity": p,
            });
            let body = Body::text(format!("pairwise similarity (embedding): min {:.3}", p.min)).with_json(json);
            append(me, envelope(me, st, duty, Kind::Verdict, body).with_usage(usage)).await
        }
        Ok(vectors) => {
            let error = ModelError::new(
                crate::model::ModelErrorKind::Malformed,
                format!("embedder returned {} vectors for {} texts", vectors.len(), inputs.len()),
            );
            not_answered(me, st, duty, Called::Failed { error, usage, turn: tracing::Span::none() }).await
        }
        Err(error) => not_answered(me, st, duty, Called::Failed { error, usage, turn: tracing::Span::none() }).await,
    }
}

/// What a peer stores on the blackboard: the text, and who wrote it at which step with
/// what usage (so a write that reached the board but not the log can be recorded later).
#[derive(serde::Serialize, serde::Deserialize)]
struct BoardValue {
    text: String,
    by: String,
    step: String,
    #[serde(default)]
    usage: Option<Usage>,
}

fn board_value(bytes: &[u8]) -> Option<BoardValue> {
    serde_json::from_slice(bytes).ok()
}

async fn board_write(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    instruction: &Option<Arc<str>>,
    key: &str,
    after: Option<&BoardMark>,
) -> Result<u64, LogError> {
    let board = me.board();
    let record = |op: &str, rev: Option<u64>, text: &str, reason: Option<&str>| {
        let json = serde_json::json!({ "op": op, "key": key, "revision": rev, "reason": reason });
        envelope(me, st, duty, Kind::Board, Body::text(text).with_json(json))
    };
    let board_failed = |e: crate::blackboard::BoardError, usage: Option<Usage>| {
        failure(
            me,
            st,
            duty,
            &format!("blackboard: {e}"),
            serde_json::json!({"error": "blackboard", "key": key}),
            usage,
        )
    };
    // Where the board stands against the log, before any model call.
    let mut expected = None;
    for _ in 0..3 {
        let cur = match board.get(key).await {
            Ok(c) => c,
            Err(e) => return append(me, board_failed(e, None)).await,
        };
        let cur_value = cur.as_ref().and_then(|e| board_value(&e.value));
        // This peer wrote it for this step and died before recording it: record it now.
        if let (Some(e), Some(v)) = (&cur, &cur_value)
            && v.by == me.cfg.me.as_str()
            && v.step == *duty.step
        {
            let mut env = record("put", Some(e.revision), &v.text, Some("recovered"));
            env.usage = v.usage.clone();
            return append(me, env).await;
        }
        match (&cur, after) {
            (None, None) => {
                expected = Some(None);
                break;
            }
            (Some(e), Some(m)) if cur_value.as_ref().is_some_and(|v| v.by == m.by.as_str() && v.step == *m.step) => {
                expected = Some(Some(e.revision));
                break;
            }
            // The board lost what the log knows (a fresh in-process board after a
            // restart): put it back, then compare again.
            (None, Some(m)) => {
                let v = BoardValue {
                    text: m.text.to_string(),
                    by: m.by.to_string(),
                    step: m.step.to_string(),
                    usage: None,
                };
                match board.create(key, serde_json::to_vec(&v).expect("board value")).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == BoardErrorKind::AlreadyExists => {}
                    Err(e) => return append(me, board_failed(e, None)).await,
                }
            }
            // Someone wrote the key and the log does not know it yet: the race is lost.
            _ => {
                return append(
                    me,
                    record("conflict", cur.as_ref().map(|e| e.revision), "", Some("the board moved ahead of the log")),
                )
                .await;
            }
        }
    }
    let Some(expected) = expected else {
        return append(me, record("conflict", None, "", Some("the board keeps changing"))).await;
    };
    let (text, usage, turn) = match call_model(me, st, view, duty, instruction, false, &View::Task, None).await {
        Called::Answer { text, usage, turn, .. } => (text, usage, turn),
        other => return not_answered(me, st, duty, other).await,
    };
    let value = BoardValue {
        text: text.clone(),
        by: me.cfg.me.to_string(),
        step: duty.step.to_string(),
        usage: Some(usage.clone()),
    };
    let bytes = serde_json::to_vec(&value).expect("board value");
    let written = match expected {
        None => board.create(key, bytes).await,
        Some(rev) => board.update(key, bytes, rev).await,
    };
    let env = match written {
        Ok(rev) => record("put", Some(rev), &text, None),
        Err(e) if matches!(e.kind(), BoardErrorKind::WrongLastRevision | BoardErrorKind::AlreadyExists) => {
            record("conflict", None, &text, Some("another peer wrote the key first"))
        }
        Err(e) => board_failed(e, None),
    };
    append_traced(me, env.with_usage(usage), turn).await
}

/// Push the items the log says are open, claim one, and record the claim. Nothing is
/// appended when the queue hands out nothing (or an item the log no longer offers).
async fn claim(me: &Me, st: &Snapshot, duty: &Duty, items: &[QueueItem]) -> Result<Option<u64>, LogError> {
    let queue = me.queue();
    for item in items {
        if let Err(e) = queue.push(&item.id, serde_json::json!({ "task": item.task })).await {
            tracing::warn!(peer = %me.cfg.me, error = %e, "work queue push failed");
            return Ok(None);
        }
    }
    let claim = match queue.claim(&me.cfg.me, Duration::from_millis(20)).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(peer = %me.cfg.me, error = %e, "work queue claim failed");
            return Ok(None);
        }
    };
    let Some(item) = items.iter().find(|i| i.id == claim.task_id) else {
        // Done or held according to the log: drain it.
        let _ = queue.ack(&claim).await;
        return Ok(None);
    };
    let json = serde_json::json!({ "op": "claim", "task": item.task, "item": item.id, "delivery": claim.delivery });
    let mut d = duty.clone();
    d.step = Arc::from(format!("claim/{}", item.id));
    let body = Body::text(format!("{} takes task {}", me.cfg.me, item.task)).with_json(json);
    let seq = append(me, envelope(me, st, &d, Kind::Work, body)).await?;
    if let Err(e) = queue.ack(&claim).await {
        tracing::warn!(peer = %me.cfg.me, error = %e, "work queue ack failed (the claim is on the log)");
    }
    Ok(Some(seq))
}

/// The stalls of this process, as its heartbeat task saw them: when a beat was due and
/// how much later it ran. A process that was not running (suspended, starved of CPU, a
/// paused VM) heard nothing in that time, whatever the others did, so an observer never
/// blames another peer for it: a silence counts only the time the observer was running
/// (as a server outage does not count, see the NATS presence).
struct Stalls {
    /// (when the late beat ran, how late it was), oldest first.
    seen: std::sync::Mutex<std::collections::VecDeque<(tokio::time::Instant, Duration)>>,
    /// How far back stalls are kept: ages longer than this are not reduced further.
    horizon: Duration,
}

impl Stalls {
    fn new(horizon: Duration) -> Self {
        Stalls { seen: std::sync::Mutex::new(std::collections::VecDeque::new()), horizon }
    }

    /// A beat due at `due` runs now: lateness beyond one period is a stall.
    fn note(&self, due: tokio::time::Instant, period: Duration) {
        let now = tokio::time::Instant::now();
        let late = now.saturating_duration_since(due);
        let mut seen = self.seen.lock().expect("stalls lock");
        while seen.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.horizon) {
            seen.pop_front();
        }
        if late > period {
            seen.push_back((now, late));
        }
    }

    /// `age` less the time this process stalled within it.
    fn running(&self, age: Duration) -> Duration {
        let now = tokio::time::Instant::now();
        let stalled: Duration = self
            .seen
            .lock()
            .expect("stalls lock")
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < age)
            .map(|(_, late)| *late)
            .sum();
        age.saturating_sub(stalled)
    }
}

/// A peer that has not beaten within the absence timeout, counting only the time this
/// peer was running ([`Stalls`]), if any (and it is not this peer and not already
/// recorded absent).
fn absence_duty(
    source: &Source,
    cfg: &PeerConfig,
    started: tokio::time::Instant,
    stalls: &Stalls,
    plan: &TeamPlan,
    seen: &std::collections::HashMap<PeerId, Duration>,
) -> Option<(Duty, Snapshot)> {
    let limit = Duration::from_millis(plan.presence.absent_after_ms);
    source.with(|st| {
        for p in &plan.peers {
            // A human seat may be empty for as long as the team waits for a person; its
            // time limit is `answer_within_secs` (see [`crate::human::Overdue`]).
            if p.id == cfg.me || st.absent.contains(&p.id) || p.is_human() {
                continue;
            }
            let silent = match seen.get(&p.id) {
                Some(since) => *since,
                // Never heard from: give it the timeout from when this peer started.
                None => started.elapsed(),
            };
            let gone = stalls.running(silent) > limit;
            if gone {
                return Some((st.absent_duty(&p.id), st.snapshot(&cfg.me)));
            }
        }
        None
    })
}

/// The span of one turn (GenAI `invoke_agent`): a child of the session's span named in
/// the task envelope, linked to the spans of the envelopes the turn answers, so one trace
/// spans peers in different processes.
async fn turn_span(cfg: &PeerConfig, st: &Snapshot, duty: &Duty) -> tracing::Span {
    let span = tracing::info_span!(
        "turn",
        otel.name = %format!("invoke_agent {}", cfg.me),
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = %cfg.me,
        gen_ai.conversation.id = %st.session,
        roundtable.step = %duty.step,
        roundtable.round = i64::from(duty.round),
    );
    if crate::telemetry::enabled() && !span.is_disabled() {
        crate::telemetry::set_parent(&span, st.task.as_ref().and_then(|t| t.trace.as_deref()));
        for parent in &duty.parents {
            if let Ok(Some(seq)) = cfg.log.seq_of(parent).await {
                for e in cfg.log.read(seq, 1).await.unwrap_or_default() {
                    crate::telemetry::add_link(&span, e.env.trace.as_deref());
                }
            }
        }
    }
    span
}

/// The span of one model call (GenAI `chat`), inside its turn.
fn chat_span(
    turn: &tracing::Span,
    cfg: &PeerConfig,
    spec: &crate::team::PeerSpec,
    model: Option<&crate::team::ModelSpec>,
    req: &ChatRequest,
) -> tracing::Span {
    let name = cfg.model.name();
    tracing::info_span!(
        parent: turn,
        "chat",
        otel.name = %format!("chat {name}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = model.map_or("unknown", |m| m.provider.kind()),
        gen_ai.request.model = %name,
        gen_ai.request.temperature = spec.temperature.map(f64::from),
        gen_ai.request.max_tokens = req.max_tokens.map(i64::from),
        gen_ai.agent.name = %cfg.me,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        roundtable.latency_ms = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

fn record_chat(span: &tracing::Span, result: &Result<crate::model::ChatResponse, ModelError>, latency_ms: u64) {
    if span.is_disabled() {
        return;
    }
    // Integers as i64: OpenTelemetry has no unsigned attributes.
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("roundtable.latency_ms", int(latency_ms));
    match result {
        Ok(r) => {
            span.record("gen_ai.response.model", r.model.as_str());
            span.record("gen_ai.usage.input_tokens", int(r.prompt_tokens));
            span.record("gen_ai.usage.output_tokens", int(r.completion_tokens));
            if let Some(f) = &r.finish_reason {
                span.record("gen_ai.response.finish_reasons", f.as_str());
            }
        }
        Err(e) => {
            span.record("error.type", e.kind.to_string().as_str());
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// A JSON object in a model's answer: the whole text, or the first `{…}` block in it
/// (models like to wrap JSON in prose or code fences).
pub fn parse_json_answer(text: &str) -> Option<serde_json::Value> {
    let t = text.trim();
    if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(t) {
        return Some(v);
    }
    let start = t.find('{')?;
    let end = t.rfind('}')?;
    (end > start).then(|| serde_json::from_str(&t[start..=end]).ok()).flatten().filter(serde_json::Value::is_object)
}

/// Whether envelopes of this kind belong in a model's context (the history).
fn in_context(kind: Kind) -> bool {
    matches!(kind, Kind::Task | Kind::Message | Kind::Proposal | Kind::Vote | Kind::Reveal | Kind::Verdict)
}

/// What one peer can see of the log, as chat messages.
///
/// The transcript holds every envelope in the peer's context (visibility honoured: a
/// direct message is in its addressee's and its sender's context only), each with its
/// round; the latest summary of older rounds is held apart and replaces those rounds
/// under the summary policy.
pub struct PeerView {
    me: PeerId,
    group: Option<String>,
    /// Visible messages, shared with in-flight model calls.
    pub transcript: Arc<Transcript>,
    /// The round of each transcript message.
    task: Option<ChatMessage>,
    /// The latest summary: the last round it covers, and the message.
    summary: Option<(u32, ChatMessage)>,
}

impl PeerView {
    pub fn new(me: PeerId, group: Option<String>) -> Self {
        PeerView::over(me, group, History::new())
    }

    /// A view whose transcript is over `history`, shared with the other peers of this
    /// session in this process (see [`History`]).
    pub fn over(me: PeerId, group: Option<String>, history: Arc<History>) -> Self {
        PeerView { me, group, transcript: Arc::new(Transcript::over(history)), task: None, summary: None }
    }

    /// Add an envelope if it belongs in this peer's context.
    pub fn observe(&mut self, env: &Arc<Envelope>) {
        if env.kind == Kind::Summary {
            if let Some(upto) = summary_upto(&env.step)
                && self.summary.as_ref().is_none_or(|(c, _)| *c < upto)
            {
                let text = format!("Summary of rounds 1 to {} (by {}):\n{}", upto + 1, env.from, env.body.text);
                self.summary = Some((upto, ChatMessage::new(Role::User, None, Arc::from(text))));
            }
            return;
        }
        if !in_context(env.kind) {
            return;
        }
        let visible = env.visible_to(&self.me, self.group.as_deref());
        if visible && env.kind == Kind::Task && self.task.is_none() {
            self.task = Some(ChatMessage::new(Role::User, None, env.body.text.clone()));
        }
        // Every in-context envelope is folded, visible or not, so that the history is
        // the same for every peer; only the visible ones enter this transcript. A copy
        // (of a few runs, never of the messages) only when a model call holds it.
        Arc::make_mut(&mut self.transcript).fold(env, visible);
    }

    /// Account for every in-context envelope appended to the shared history since this
    /// view's last (see [`Transcript::catch_up`]); summaries are observed apart.
    fn catch_up(&mut self) {
        let (me, group) = (&self.me, self.group.as_deref());
        let behind = self.transcript.cursor() < self.transcript.history_len();
        if behind {
            Arc::make_mut(&mut self.transcript).catch_up(|env| env.visible_to(me, group));
        }
    }

    /// The index of the first message after the task with a round above `round`
    /// (rounds do not decrease along the log for the protocols that use history).
    fn after_round(&self, round: u32) -> usize {
        let skip = usize::from(self.task.is_some()).min(self.transcript.len());
        self.transcript.partition_point(skip, |e| e.round <= round)
    }

    /// The prelude, the history and the window of it a model call sees under a view.
    pub fn parts(
        &self,
        v: &View,
        policy: &ContextPolicy,
    ) -> (Vec<ChatMessage>, Arc<Transcript>, std::ops::Range<usize>) {
        let n = self.transcript.len();
        let task: Vec<ChatMessage> = self.task.iter().cloned().collect();
        match v {
            View::History => match policy {
                ContextPolicy::Full => (Vec::new(), self.transcript.clone(), 0..n),
                ContextPolicy::LastK { k } => {
                    if n > k + 1 {
                        (task, self.transcript.clone(), n - k..n)
                    } else {
                        (Vec::new(), self.transcript.clone(), 0..n)
                    }
                }
                ContextPolicy::Summary { .. } => match &self.summary {
                    Some((upto, s)) => {
                        let mut prelude = task;
                        prelude.push(s.clone());
                        (prelude, self.transcript.clone(), self.after_round(*upto)..n)
                    }
                    None => (Vec::new(), self.transcript.clone(), 0..n),
                },
            },
            View::Task => (task, Arc::new(Transcript::default()), 0..0),
            View::Shown(shown) => {
                let mut t = Transcript::default();
                for s in shown {
                    let role = if s.from == self.me { Role::Assistant } else { Role::User };
                    t.push(ChatMessage::new(role, Some(s.from.clone()), s.text.clone()));
                }
                let len = t.len();
                (task, Arc::new(t), 0..len)
            }
            View::ToSummarize { upto } => {
                let mut prelude = task;
                let start = match &self.summary {
                    Some((covered, s)) => {
                        prelude.push(s.clone());
                        self.after_round(*covered)
                    }
                    None => usize::from(self.task.is_some()).min(n),
                };
                let end = self.after_round(*upto).max(start);
                (prelude, self.transcript.clone(), start..end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, SessionId};

    #[test]
    fn views_over_one_history_hold_each_message_once_and_see_only_what_is_theirs() {
        let s = SessionId::from("s");
        let e = |from: &str, step: &str, kind: Kind, to: Recipient| {
            Arc::new(Envelope::new(&s, &PeerId::from(from), step, kind, to, Body::text(step)))
        };
        let log = [
            e("user", "task", Kind::Task, Recipient::All),
            e("a", "hello", Kind::Message, Recipient::All),
            e("c", "to-a", Kind::Message, Recipient::Peer("a".into())),
            e("c", "claim", Kind::Work, Recipient::All),
            e("c", "to-g1", Kind::Message, Recipient::Group("g1".into())),
            e("a", "to-b", Kind::Message, Recipient::Peer("b".into())),
            e("c", "to-c", Kind::Message, Recipient::Peer("c".into())),
            e("b", "last", Kind::Message, Recipient::All),
        ];
        let history = History::new();
        let mut a = PeerView::over("a".into(), Some("g1".into()), history.clone());
        let mut b = PeerView::over("b".into(), None, history.clone());
        for env in &log {
            a.observe(env);
            // b reads its own copies of the envelopes (as from another connection).
            b.observe(&Arc::new((**env).clone()));
        }
        let steps = |v: &PeerView| -> Vec<String> {
            let t = &v.transcript;
            t.iter(0..t.len()).map(|e| e.step.to_string()).collect()
        };
        assert_eq!(steps(&a), ["task", "hello", "to-a", "to-g1", "to-b", "last"]);
        assert_eq!(steps(&b), ["task", "hello", "to-b", "last"]);
        assert_eq!(history.len(), 7, "every in-context envelope once, visible to these two or not; no work item");
        assert!(Arc::ptr_eq(b.transcript.get(2).unwrap(), &log[5]), "b holds the shared envelope, not its copy");
        let (_, t, window) = b.parts(&View::History, &ContextPolicy::Full);
        assert_eq!(window, 0..4);
        let want: u64 = ["task", "hello", "to-b", "last"].iter().map(|x| u64::from(estimate_tokens(x) + 4)).sum();
        assert_eq!(t.tokens(window), want);
    }
}
