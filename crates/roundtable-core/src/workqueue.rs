//! The work queue: tasks that peers claim with a lease.
//!
//! Semantics mirror a JetStream work-queue stream with one shared durable pull consumer,
//! so a team behaves the same in-process and on NATS:
//! - [`WorkQueue::push`] adds a task; pushing a task id that is already queued, in flight
//!   or done changes nothing (idempotent by id).
//! - [`WorkQueue::claim`] hands a task to exactly one claimer at a time, with a lease of
//!   [`QueueConfig::lease`] (JetStream's `ack_wait`). Tasks are handed out in push order,
//!   except that a task whose delay (from a nack) has not elapsed waits.
//! - [`WorkQueue::ack`] finishes the task for good. [`WorkQueue::nack`] returns it to the
//!   queue after a delay. [`WorkQueue::progress`] extends the lease.
//! - When a lease expires without an ack (the claimer died, hung or lost its connection)
//!   the task is **redelivered** to the next claimer: delivery is at-least-once, and an
//!   ack with a stale lease fails with [`QueueErrorKind::LeaseLost`]. A claimer that
//!   needs exactly-once results records its result on the session log with an id derived
//!   from the task id, so a second completion is a duplicate the log drops.
//! - After [`QueueConfig::max_deliver`] deliveries without an ack the task is
//!   **dead-lettered**: never handed out again, and listed by
//!   [`WorkQueue::dead_letters`]; protocols record a notice of it on the session log.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::envelope::PeerId;
use crate::error::Error;

crate::error_kind! {
    /// What went wrong with a work-queue operation.
    pub enum QueueErrorKind {
        /// The lease is no longer held (expired and redelivered, or already acked).
        LeaseLost => "lease lost",
        /// The storage failed.
        Storage => "storage failure",
        /// The backend cannot be reached right now; retrying may help.
        Unavailable => "backend unavailable",
    }
}

pub type QueueError = Error<QueueErrorKind>;

/// Lease and redelivery settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// How long a claim holds a task before it is redelivered.
    pub lease: Duration,
    /// Deliveries before a task is dead-lettered.
    pub max_deliver: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { lease: Duration::from_secs(30), max_deliver: 5 }
    }
}

/// A task handed to a claimer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub task_id: String,
    pub payload: serde_json::Value,
    /// 1 on the first delivery, 2 on the first redelivery, …
    pub delivery: u32,
    /// Opaque token naming this delivery; ack/nack/progress take it.
    pub lease: String,
    pub claimer: PeerId,
}

/// A task that ran out of deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub task_id: String,
    pub payload: serde_json::Value,
    pub deliveries: u32,
}

/// Counts, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub pending: u64,
    pub in_flight: u64,
    pub acked: u64,
    pub dead: u64,
    /// Deliveries beyond the first, over all tasks.
    pub redeliveries: u64,
}

/// Tasks that peers claim with a lease (see the module docs).
#[async_trait]
pub trait WorkQueue: Send + Sync + 'static {
    fn config(&self) -> QueueConfig;
    /// Queue a task; idempotent by `task_id`.
    async fn push(&self, task_id: &str, payload: serde_json::Value) -> Result<(), QueueError>;
    /// Claim the next available task, waiting up to `wait` for one.
    async fn claim(&self, claimer: &PeerId, wait: Duration) -> Result<Option<Claim>, QueueError>;
    /// Finish the task.
    async fn ack(&self, claim: &Claim) -> Result<(), QueueError>;
    /// Give the task back, to be delivered again after `delay`.
    async fn nack(&self, claim: &Claim, delay: Duration) -> Result<(), QueueError>;
    /// Extend the lease by another [`QueueConfig::lease`].
    async fn progress(&self, claim: &Claim) -> Result<(), QueueError>;
    /// Make sure the claim still holds its lease with at least `at_least` of it left,
    /// extending it when less is left. A claimer about to record a result calls it: the
    /// lease must outlast the write, or the next claimer could run the task too. A queue
    /// that knows its leases' deadlines answers without a round trip while a recent
    /// extension covers `at_least`; the default always extends.
    async fn hold(&self, claim: &Claim, at_least: Duration) -> Result<(), QueueError> {
        let _ = at_least;
        self.progress(claim).await
    }
    /// Tasks that ran out of deliveries.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError>;
    async fn stats(&self) -> Result<QueueStats, QueueError>;
}
