//! Waiting out a server that cannot be reached.
//!
//! The NATS parts fail a call with an `Unavailable` kind while the server is away (a
//! restart, a network cut); the client reconnects on its own. A peer wants neither to
//! die nor to record a failure for that: it wants the call to go through once the server
//! is back. These wrappers retry calls that fail with `Unavailable`, backing off from
//! 50 ms to 2 s, and pass every other outcome on unchanged. What [`crate::NatsBackend`]
//! opens after [`crate::NatsBackend::patient`] is wrapped in them.
//!
//! Retrying is safe because every call is idempotent or fenced:
//! - **Log.** An append is idempotent by envelope id, so an append whose acknowledgement
//!   was lost lands once. A tail that fails or ends is reopened after the last entry it
//!   yielded, so its reader sees every entry once, in order, across the outage.
//! - **Blackboard.** A compare-and-set (or create) whose first attempt did land fails on
//!   retry with a revision conflict against its own write; the retry therefore reads the
//!   key first, and a key that holds exactly the value written, at a later revision,
//!   counts as written.
//! - **Queue.** Pushes are idempotent by task id; a claim whose delivery was lost is
//!   redelivered when its lease runs out; ack, nack and progress are retried only while
//!   the lease is held, after which they fail with `LeaseLost` as usual.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use roundtable_core::blackboard::{Blackboard, BoardEntry, BoardError, BoardErrorKind};
use roundtable_core::envelope::PeerId;
use roundtable_core::envelope::{Envelope, EnvelopeId, SessionId};
use roundtable_core::log::{Appended, Entry, EntryStream, LogError, LogErrorKind, LogStore, SessionInfo, SessionLog};
use roundtable_core::workqueue::{Claim, DeadLetter, QueueConfig, QueueError, QueueErrorKind, QueueStats, WorkQueue};

/// Backoff between attempts: 50 ms, doubling, at most 2 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(2))
}

/// Run `call` until it returns anything but an error that `unavailable` recognises.
async fn retry<T, E: std::fmt::Display, F, Fut>(what: &str, unavailable: fn(&E) -> bool, mut call: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Err(e) if unavailable(&e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt, "{what}: the NATS server cannot be reached; retrying");
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
            other => return other,
        }
    }
}

fn log_unavailable(e: &LogError) -> bool {
    e.kind() == LogErrorKind::Unavailable
}

fn board_unavailable(e: &BoardError) -> bool {
    e.kind() == BoardErrorKind::Unavailable
}

fn queue_unavailable(e: &QueueError) -> bool {
    e.kind() == QueueErrorKind::Unavailable
}

/// A [`LogStore`] whose logs are [`PatientLog`]s.
pub struct PatientStore {
    inner: Arc<dyn LogStore>,
}

impl PatientStore {
    pub fn new(inner: Arc<dyn LogStore>) -> Self {
        PatientStore { inner }
    }
}

#[async_trait]
impl LogStore for PatientStore {
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError> {
        let inner = retry("opening a session log", log_unavailable, || self.inner.open(session, create)).await?;
        Ok(Arc::new(PatientLog { inner }))
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError> {
        retry("listing sessions", log_unavailable, || self.inner.sessions()).await
    }
}

/// A session log that waits out outages (see the module docs).
pub struct PatientLog {
    inner: Arc<dyn SessionLog>,
}

impl PatientLog {
    pub fn new(inner: Arc<dyn SessionLog>) -> Self {
        PatientLog { inner }
    }
}

#[async_trait]
impl SessionLog for PatientLog {
    fn session(&self) -> &SessionId {
        self.inner.session()
    }

    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        retry("appending to the log", log_unavailable, || self.inner.append(env.clone())).await
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        retry("reading the log", log_unavailable, || self.inner.read(from, max)).await
    }

    async fn last_seq(&self) -> Result<u64, LogError> {
        retry("reading the log", log_unavailable, || self.inner.last_seq()).await
    }

    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        let from = from.max(1);
        let first = retry("tailing the log", log_unavailable, || self.inner.tail(from)).await?;
        struct Tail {
            log: Arc<dyn SessionLog>,
            next: u64,
            stream: Option<EntryStream>,
            attempt: u32,
        }
        let state = Tail { log: self.inner.clone(), next: from, stream: Some(first), attempt: 0 };
        Ok(Box::pin(futures::stream::unfold(state, |mut st| async move {
            loop {
                let Some(stream) = st.stream.as_mut() else {
                    tokio::time::sleep(backoff(st.attempt)).await;
                    st.attempt = st.attempt.saturating_add(1);
                    match st.log.tail(st.next).await {
                        Ok(s) => st.stream = Some(s),
                        Err(e) if log_unavailable(&e) => {}
                        Err(e) => return Some((Err(e), st)),
                    }
                    continue;
                };
                match stream.next().await {
                    // A reopened tail may repeat what was already yielded: skip it.
                    Some(Ok(e)) if e.seq < st.next => {}
                    Some(Ok(e)) => {
                        st.attempt = 0;
                        st.next = e.seq + 1;
                        return Some((Ok(e), st));
                    }
                    Some(Err(e)) if !log_unavailable(&e) => return Some((Err(e), st)),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the log's tail broke off; reopening it");
                        st.stream = None;
                    }
                    None => {
                        tracing::warn!("the log's tail ended; reopening it");
                        st.stream = None;
                    }
                }
            }
        })))
    }

    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        retry("looking up an envelope", log_unavailable, || self.inner.seq_of(id)).await
    }
}

/// A blackboard that waits out outages (see the module docs).
pub struct PatientBoard {
    inner: Arc<dyn Blackboard>,
}

impl PatientBoard {
    pub fn new(inner: Arc<dyn Blackboard>) -> Self {
        PatientBoard { inner }
    }

    /// A conditional write, retried; a retry that finds its own value written counts as
    /// the write (see the module docs).
    async fn conditional<F, Fut>(&self, key: &str, value: &[u8], after: u64, write: F) -> Result<u64, BoardError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<u64, BoardError>>,
    {
        let mut interrupted = false;
        let mut attempt = 0u32;
        loop {
            match write().await {
                Err(e) if board_unavailable(&e) => {
                    interrupted = true;
                    if attempt.is_multiple_of(10) {
                        tracing::warn!(error = %e, key, "writing the blackboard: the NATS server cannot be reached; retrying");
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(e)
                    if interrupted
                        && matches!(e.kind(), BoardErrorKind::WrongLastRevision | BoardErrorKind::AlreadyExists) =>
                {
                    let current = retry("reading the blackboard", board_unavailable, || self.inner.get(key)).await?;
                    return match current {
                        Some(c) if c.value == value && c.revision > after => Ok(c.revision),
                        _ => Err(e),
                    };
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Blackboard for PatientBoard {
    async fn get(&self, key: &str) -> Result<Option<BoardEntry>, BoardError> {
        retry("reading the blackboard", board_unavailable, || self.inner.get(key)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        retry("writing the blackboard", board_unavailable, || self.inner.put(key, value.clone())).await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        self.conditional(key, &value, 0, || self.inner.create(key, value.clone())).await
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, BoardError> {
        self.conditional(key, &value, expected, || self.inner.update(key, value.clone(), expected)).await
    }

    async fn delete(&self, key: &str) -> Result<u64, BoardError> {
        retry("deleting from the blackboard", board_unavailable, || self.inner.delete(key)).await
    }

    async fn keys(&self) -> Result<Vec<String>, BoardError> {
        retry("listing the blackboard", board_unavailable, || self.inner.keys()).await
    }

    async fn watch(&self, from: u64) -> Result<BoxStream<'static, Result<BoardEntry, BoardError>>, BoardError> {
        retry("watching the blackboard", board_unavailable, || self.inner.watch(from)).await
    }
}

/// A work queue that waits out outages (see the module docs).
pub struct PatientQueue {
    inner: Arc<dyn WorkQueue>,
}

impl PatientQueue {
    pub fn new(inner: Arc<dyn WorkQueue>) -> Self {
        PatientQueue { inner }
    }
}

#[async_trait]
impl WorkQueue for PatientQueue {
    fn config(&self) -> QueueConfig {
        self.inner.config()
    }

    async fn push(&self, task_id: &str, payload: serde_json::Value) -> Result<(), QueueError> {
        retry("pushing a task", queue_unavailable, || self.inner.push(task_id, payload.clone())).await
    }

    async fn claim(&self, claimer: &PeerId, wait: Duration) -> Result<Option<Claim>, QueueError> {
        retry("claiming a task", queue_unavailable, || self.inner.claim(claimer, wait)).await
    }

    async fn ack(&self, claim: &Claim) -> Result<(), QueueError> {
        retry("acking a task", queue_unavailable, || self.inner.ack(claim)).await
    }

    async fn nack(&self, claim: &Claim, delay: Duration) -> Result<(), QueueError> {
        retry("nacking a task", queue_unavailable, || self.inner.nack(claim, delay)).await
    }

    async fn progress(&self, claim: &Claim) -> Result<(), QueueError> {
        retry("extending a lease", queue_unavailable, || self.inner.progress(claim)).await
    }

    async fn hold(&self, claim: &Claim, at_least: Duration) -> Result<(), QueueError> {
        retry("extending a lease", queue_unavailable, || self.inner.hold(claim, at_least)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        retry("listing dead letters", queue_unavailable, || self.inner.dead_letters()).await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        retry("reading queue stats", queue_unavailable, || self.inner.stats()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_two_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(6), Duration::from_secs(2));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(2));
    }
}
