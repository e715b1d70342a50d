//! One fold of a session's log for all the peers of one process.
//!
//! The session state is a pure function of the log, so the peers of one process that
//! run the same session need not each fold every entry: a [`SharedFold`] tails the log
//! once, folds each entry once into one [`SessionState`], and wakes only the peers whose
//! duty the entry may have changed ([`SessionState::due`], from the protocol's
//! [`crate::protocol::Reducer::due`]). A peer reads its own duty from the shared state
//! when it wakes. What a peer observes of the log besides the state (its view of the
//! history, its tool calls, approvals asked of it) it catches up on when it wakes, from
//! what the fold keeps for it: the shared [`History`], and the few envelopes that
//! concern only some peers, routed by peer. So an append costs one fold and the wake of
//! the peers that have something to do, whatever the size of the team.
//!
//! A peer also wakes when an append of its own has been folded (it waits for that
//! before it reads its next duty), and on its periodic tick, the safety net.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{FutureExt, StreamExt};
use tokio::sync::Notify;

use crate::envelope::{Envelope, Kind, PeerId, now_ms};
use crate::log::{Entry, LogError, LogErrorKind, SessionLog};
use crate::model::{History, Transcript};
use crate::protocol::Due;
use crate::session::SessionState;
use crate::team::TeamPlan;

use super::AbortOnDrop;

/// The fold of one session's log shared by the peers of one process (see the module
/// docs). Give the same one to every peer of the session in this process through
/// [`super::PeerExtras::fold`].
pub struct SharedFold {
    log: Arc<dyn SessionLog>,
    plan: Arc<TeamPlan>,
    history: Arc<History>,
    inner: Arc<Mutex<Inner>>,
    /// The task that tails the log, started when the first peer joins.
    tail: Mutex<Option<AbortOnDrop>>,
}

/// What the fold holds, behind one lock.
pub(super) struct Inner {
    pub(super) st: SessionState,
    /// Places every in-context envelope in the shared history, in log order.
    lead: Transcript,
    /// Tool calls and results, by the peer that recorded them.
    pub(super) tools: HashMap<PeerId, Vec<Arc<Envelope>>>,
    /// Approval requests and answers, in log order.
    pub(super) approvals: Vec<Arc<Envelope>>,
    /// Summaries of older rounds, in log order.
    pub(super) summaries: Vec<Arc<Envelope>>,
    /// The peers to wake, by id.
    seats: HashMap<PeerId, Vec<Arc<Notify>>>,
    /// Peers waiting for the log to reach a position (an append of their own).
    waiting: BTreeMap<u64, Vec<Arc<Notify>>>,
    /// The error that ended the tail, if one did.
    failed: Option<LogError>,
    uses_clock: bool,
}

impl SharedFold {
    /// A fold of `log`, whose task holds `plan`, with the in-context envelopes in
    /// `history` (shared with the peers' views).
    pub fn new(log: Arc<dyn SessionLog>, plan: Arc<TeamPlan>, history: Arc<History>) -> Arc<Self> {
        let st = SessionState::new(plan.clone(), log.session().clone());
        let uses_clock = plan.termination.timeout_ms().is_some() || plan.budget.max_wall_ms.is_some();
        let inner = Inner {
            st,
            lead: Transcript::over(history.clone()),
            tools: HashMap::new(),
            approvals: Vec::new(),
            summaries: Vec::new(),
            seats: HashMap::new(),
            waiting: BTreeMap::new(),
            failed: None,
            uses_clock,
        };
        Arc::new(SharedFold { log, plan, history, inner: Arc::new(Mutex::new(inner)), tail: Mutex::new(None) })
    }

    /// Whether the peers of a team with this plan should share a fold. Not in a
    /// conversation: a turn reads the mail its peer had folded when it took the turn
    /// up, so how mail is batched into turns depends on when each peer folds; a peer
    /// folding the log itself takes up a turn on exactly the entries it has just read,
    /// as it did when the session was recorded, which is what lets a replay batch the
    /// same way. (Its peers act on their mail, not on a turn that comes round, so they
    /// gain little from being woken selectively.)
    pub fn suits(plan: &TeamPlan) -> bool {
        !matches!(plan.protocol, crate::team::ProtocolSpec::Conversation(_))
    }

    pub fn plan(&self) -> &Arc<TeamPlan> {
        &self.plan
    }

    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// Whether this fold is of `log`'s session.
    pub fn is_of(&self, log: &dyn SessionLog) -> bool {
        self.log.session() == log.session()
    }

    /// A seat for `me`: woken when its duty may have changed. Starts tailing the log on
    /// the first seat.
    pub fn join(self: &Arc<Self>, me: &PeerId) -> Seat {
        let notify = Arc::new(Notify::new());
        let mut inner = lock(&self.inner);
        inner.seats.entry(me.clone()).or_default().push(notify.clone());
        // Whatever was folded before this seat was taken may hold its duty.
        notify.notify_one();
        drop(inner);
        let mut tail = self.tail.lock().expect("fold tail lock");
        if tail.is_none() {
            let (log, inner) = (self.log.clone(), self.inner.clone());
            *tail = Some(AbortOnDrop(tokio::spawn(drive(log, inner))));
        }
        Seat { fold: self.clone(), me: me.clone(), notify }
    }

    /// The state as folded so far (for tests and tools that read it).
    pub fn with<R>(&self, f: impl FnOnce(&SessionState) -> R) -> R {
        f(&lock(&self.inner).st)
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().expect("fold lock")
}

/// Tail the log and fold it, waking the peers each entry concerns.
async fn drive(log: Arc<dyn SessionLog>, inner: Arc<Mutex<Inner>>) {
    let mut tail = match log.tail(1).await {
        Ok(t) => t,
        Err(e) => return fail(&inner, e),
    };
    loop {
        let Some(first) = tail.next().await else {
            return fail(&inner, LogError::new(LogErrorKind::Unavailable, "the log's tail ended"));
        };
        let mut batch = vec![first];
        while let Some(Some(more)) = tail.next().now_or_never() {
            batch.push(more);
        }
        let mut wake = Vec::new();
        let mut error = None;
        {
            let mut g = lock(&inner);
            let mut everyone = false;
            for e in batch {
                match e {
                    Ok(entry) => match g.fold(entry) {
                        Due::Everyone => everyone = true,
                        Due::Peers(ps) if !everyone => {
                            for p in ps {
                                wake.extend(g.seats.get(&p).into_iter().flatten().cloned());
                            }
                        }
                        Due::Peers(_) => {}
                    },
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if everyone {
                wake.clear();
                wake.extend(g.seats.values().flatten().cloned());
            }
            let reached = g.st.last_seq;
            let later = g.waiting.split_off(&(reached + 1));
            let done = std::mem::replace(&mut g.waiting, later);
            wake.extend(done.into_values().flatten());
        }
        for n in wake {
            n.notify_one();
        }
        if let Some(e) = error {
            return fail(&inner, e);
        }
    }
}

/// The tail failed: record why and wake every peer to read it.
fn fail(inner: &Mutex<Inner>, e: LogError) {
    let mut g = lock(inner);
    g.failed = Some(e);
    for n in g.seats.values().flatten() {
        n.notify_one();
    }
}

impl Inner {
    /// Fold one entry in; whose duties it may have changed.
    fn fold(&mut self, entry: Entry) -> Due {
        let env = &entry.env;
        match env.kind {
            Kind::ToolCall | Kind::ToolResult => self.tools.entry(env.from.clone()).or_default().push(env.clone()),
            Kind::Approval => self.approvals.push(env.clone()),
            Kind::Summary => self.summaries.push(env.clone()),
            _ => {}
        }
        if super::in_context(env.kind) {
            self.lead.fold(env, false);
        }
        self.st.take(entry.clone());
        let now = if self.uses_clock { now_ms() } else { 0 };
        self.st.due(&entry, now)
    }
}

/// A peer's place at a [`SharedFold`]: how it is woken, and how it reads the state.
pub struct Seat {
    fold: Arc<SharedFold>,
    me: PeerId,
    notify: Arc<Notify>,
}

impl Seat {
    /// Wait until this peer's duty may have changed (or the log failed: its error).
    pub async fn woken(&self) -> Result<(), LogError> {
        self.notify.notified().await;
        let g = lock(&self.fold.inner);
        match &g.failed {
            Some(e) if !g.st.is_stopped() => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Wake this peer once the fold has reached log position `seq`.
    pub fn wait_for(&self, seq: u64) {
        let mut g = lock(&self.fold.inner);
        if g.st.last_seq >= seq {
            self.notify.notify_one();
        } else {
            g.waiting.entry(seq).or_default().push(self.notify.clone());
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.fold.inner)
    }

    pub fn with<R>(&self, f: impl FnOnce(&SessionState) -> R) -> R {
        f(&self.lock().st)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let Ok(mut g) = self.fold.inner.lock() else { return };
        if let Some(v) = g.seats.get_mut(&self.me) {
            v.retain(|n| !Arc::ptr_eq(n, &self.notify));
            if v.is_empty() {
                g.seats.remove(&self.me);
            }
        }
        for v in g.waiting.values_mut() {
            v.retain(|n| !Arc::ptr_eq(n, &self.notify));
        }
    }
}
