//! The bus: what carries a session between peers. A [`Backend`] opens, for a session,
//! its log, its blackboard, its work queue and its presence (heartbeats).
//!
//! Direct and broadcast messages are envelopes on the session log addressed to a peer,
//! a group or everyone (see [`crate::envelope::Recipient`]); the log's total order is
//! what lets equals agree without a coordinator. Heartbeats are the one kind of traffic
//! that is not on the log: they are frequent, carry no decision, and only their absence
//! matters — which is then recorded on the log as an `absent` envelope.
//!
//! Two backends implement this: in-process (tokio tasks in one process, the log
//! persisted in SQLite) and NATS JetStream (peers in many processes and machines).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use crate::blackboard::{Blackboard, BoardError};
use crate::envelope::{PeerId, SessionId};
use crate::error::Error;
use crate::log::LogStore;
use crate::workqueue::{QueueConfig, QueueError, WorkQueue};

crate::error_kind! {
    /// What went wrong talking to the bus.
    pub enum BusErrorKind {
        Unavailable => "backend unavailable",
        Storage => "storage failure",
    }
}

pub type BusError = Error<BusErrorKind>;

/// Heartbeats, and who has not sent one lately.
///
/// A peer beats every `interval`; a peer whose last beat is older than the configured
/// absence timeout is absent. Every peer checks on its own; the first to notice records
/// an `absent` envelope whose id is derived from (session, absent peer, its last seen
/// turn), so duplicates from several noticing peers are harmless.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    async fn beat(&self, peer: &PeerId) -> Result<(), BusError>;
    /// Peers heard from, with the time since their last beat.
    async fn last_seen(&self) -> Result<HashMap<PeerId, Duration>, BusError>;
    /// How long, from now, ages are still held down because this handle has only just
    /// (re)connected and could not yet hear everyone (zero for in-process presence).
    fn settling(&self) -> Duration {
        Duration::ZERO
    }
}

/// Opens the parts of a session on one transport.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `"memory"`, `"sqlite"`, `"nats"`…, for messages and summaries.
    fn name(&self) -> &'static str;
    fn logs(&self) -> Arc<dyn LogStore>;
    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError>;
    async fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Result<Arc<dyn WorkQueue>, QueueError>;
    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError>;
}

/// In-process presence: a shared map of last beats, on tokio's clock (so a test with a
/// paused clock controls ages).
#[derive(Default)]
pub struct MemPresence {
    seen: Mutex<HashMap<PeerId, Instant>>,
}

#[async_trait]
impl Presence for MemPresence {
    async fn beat(&self, peer: &PeerId) -> Result<(), BusError> {
        self.seen.lock().expect("presence lock").insert(peer.clone(), Instant::now());
        Ok(())
    }
    async fn last_seen(&self) -> Result<HashMap<PeerId, Duration>, BusError> {
        let now = Instant::now();
        Ok(self
            .seen
            .lock()
            .expect("presence lock")
            .iter()
            .map(|(p, t)| (p.clone(), now.saturating_duration_since(*t)))
            .collect())
    }
}

/// Per-session in-process parts, shared by every backend that keeps its blackboard,
/// queue and presence in memory (the in-process and SQLite backends).
#[derive(Default, Clone)]
pub struct MemParts {
    boards: Arc<Mutex<HashMap<SessionId, Arc<crate::mem::MemBlackboard>>>>,
    queues: Arc<Mutex<HashMap<SessionId, Arc<crate::mem::MemWorkQueue>>>>,
    presence: Arc<Mutex<HashMap<SessionId, Arc<MemPresence>>>>,
}

impl MemParts {
    pub fn blackboard(&self, session: &SessionId) -> Arc<dyn Blackboard> {
        self.boards.lock().expect("lock").entry(session.clone()).or_default().clone()
    }
    pub fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Arc<dyn WorkQueue> {
        self.queues
            .lock()
            .expect("lock")
            .entry(session.clone())
            .or_insert_with(|| Arc::new(crate::mem::MemWorkQueue::new(config)))
            .clone()
    }
    pub fn presence(&self, session: &SessionId) -> Arc<dyn Presence> {
        self.presence.lock().expect("lock").entry(session.clone()).or_default().clone()
    }
}

/// Everything in memory: for tests, benchmarks and `--no-persist` runs.
#[derive(Default, Clone)]
pub struct MemBackend {
    pub store: crate::log::MemStore,
    pub parts: MemParts,
}

#[async_trait]
impl Backend for MemBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn logs(&self) -> Arc<dyn LogStore> {
        Arc::new(self.store.clone())
    }
    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError> {
        Ok(self.parts.blackboard(session))
    }
    async fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Result<Arc<dyn WorkQueue>, QueueError> {
        Ok(self.parts.work_queue(session, config))
    }
    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError> {
        Ok(self.parts.presence(session))
    }
}
