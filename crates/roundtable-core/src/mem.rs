//! In-process implementations of the blackboard and the work queue (the embedded
//! default). Their semantics are the ones written in [`crate::blackboard`] and
//! [`crate::workqueue`], mirroring JetStream; the details below are where a choice had
//! to be made, and they are the JetStream choices too.
//!
//! # [`MemBlackboard`]
//! - Revisions count every write on the board, starting at 1 (a KV stream's sequence).
//! - The full history is kept, so [`Blackboard::watch`] from any revision replays every
//!   write since then (JetStream would have compacted older values of a key; the
//!   in-process board never has to).
//! - [`Blackboard::update`] compares with the revision of the key's last write,
//!   tombstones included, or 0 when the key was never written: so `update(k, v, 0)`
//!   creates a key that was never written, and updating a deleted key with its
//!   tombstone's revision succeeds.
//! - [`Blackboard::delete`] writes a tombstone even when the key is absent.
//!
//! # [`MemWorkQueue`]
//! - Lease expiry is evaluated on every call against [`tokio::time::Instant`] (so tests
//!   may pause time); no background task runs. A lease whose deadline has passed is lost
//!   even before the task is handed out again.
//! - A claimer waiting in [`WorkQueue::claim`] wakes on a push, a nack, or when a lease
//!   or a nack delay runs out.
//! - A task nacked on its last delivery is dead-lettered at once.
//! - [`QueueConfig::max_deliver`] of 0 means no limit (JetStream's default).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::blackboard::{Blackboard, BoardEntry, BoardError, BoardErrorKind, BoardOp, validate_key};
use crate::envelope::PeerId;
use crate::workqueue::{Claim, DeadLetter, QueueConfig, QueueError, QueueErrorKind, QueueStats, WorkQueue};

// ---------------------------------------------------------------------------------------
// Blackboard

#[derive(Default)]
struct BoardState {
    /// Every write, in revision order: revision `r` is `history[r - 1]`.
    history: Vec<BoardEntry>,
    /// Each key's last write (an index into `history`), tombstones included.
    latest: BTreeMap<String, usize>,
}

impl BoardState {
    fn last_revision(&self, key: &str) -> u64 {
        self.latest.get(key).map_or(0, |&i| self.history[i].revision)
    }

    fn current(&self, key: &str) -> Option<&BoardEntry> {
        self.latest.get(key).map(|&i| &self.history[i]).filter(|e| e.op == BoardOp::Put)
    }
}

struct BoardInner {
    state: Mutex<BoardState>,
    /// The last revision written; watchers wait on it.
    last: watch::Sender<u64>,
}

/// In-process blackboard: the full history of writes in memory, and a watch channel that
/// wakes watchers.
pub struct MemBlackboard {
    inner: Arc<BoardInner>,
}

impl Default for MemBlackboard {
    fn default() -> Self {
        MemBlackboard {
            inner: Arc::new(BoardInner { state: Mutex::new(BoardState::default()), last: watch::Sender::new(0) }),
        }
    }
}

impl MemBlackboard {
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision of the last write on the board, 0 when nothing was written.
    pub fn last_revision(&self) -> u64 {
        *self.inner.last.borrow()
    }

    /// Write `key` if `check` accepts its current state (the last revision, tombstones
    /// included, and whether it currently has a value).
    fn write(
        &self,
        key: &str,
        value: Vec<u8>,
        op: BoardOp,
        check: impl FnOnce(u64, bool) -> Result<(), BoardError>,
    ) -> Result<u64, BoardError> {
        validate_key(key)?;
        let mut st = self.inner.state.lock().expect("board lock");
        check(st.last_revision(key), st.current(key).is_some())?;
        let revision = st.history.len() as u64 + 1;
        st.history.push(BoardEntry { key: key.to_owned(), value, revision, op });
        let index = st.history.len() - 1;
        st.latest.insert(key.to_owned(), index);
        // Under the lock, so the published revision never goes backwards.
        self.inner.last.send_replace(revision);
        Ok(revision)
    }

    /// Up to `max` writes with revision ≥ `from`, in order.
    fn history_from(&self, from: u64, max: usize) -> Vec<BoardEntry> {
        let st = self.inner.state.lock().expect("board lock");
        let start = (from.max(1) - 1) as usize;
        if start >= st.history.len() {
            return Vec::new();
        }
        let end = st.history.len().min(start.saturating_add(max));
        st.history[start..end].to_vec()
    }
}

#[async_trait]
impl Blackboard for MemBlackboard {
    async fn get(&self, key: &str) -> Result<Option<BoardEntry>, BoardError> {
        validate_key(key)?;
        Ok(self.inner.state.lock().expect("board lock").current(key).cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        self.write(key, value, BoardOp::Put, |_, _| Ok(()))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        self.write(key, value, BoardOp::Put, |last, present| {
            if present {
                Err(BoardError::new(BoardErrorKind::AlreadyExists, format!("key {key:?} exists (revision {last})")))
            } else {
                Ok(())
            }
        })
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, BoardError> {
        self.write(key, value, BoardOp::Put, |last, _| {
            if last == expected {
                Ok(())
            } else {
                Err(BoardError::new(
                    BoardErrorKind::WrongLastRevision,
                    format!("key {key:?} is at revision {last}, not {expected}"),
                ))
            }
        })
    }

    async fn delete(&self, key: &str) -> Result<u64, BoardError> {
        self.write(key, Vec::new(), BoardOp::Delete, |_, _| Ok(()))
    }

    async fn keys(&self) -> Result<Vec<String>, BoardError> {
        let st = self.inner.state.lock().expect("board lock");
        Ok(st.latest.iter().filter(|&(_, &i)| st.history[i].op == BoardOp::Put).map(|(k, _)| k.clone()).collect())
    }

    async fn watch(&self, from: u64) -> Result<BoxStream<'static, Result<BoardEntry, BoardError>>, BoardError> {
        struct WatchState {
            board: MemBlackboard,
            next: u64,
            buf: std::collections::VecDeque<BoardEntry>,
            rx: watch::Receiver<u64>,
        }
        let st = WatchState {
            board: MemBlackboard { inner: self.inner.clone() },
            next: from.max(1),
            buf: Default::default(),
            rx: self.inner.last.subscribe(),
        };
        Ok(Box::pin(futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.buf.pop_front() {
                    return Some((Ok(e), st));
                }
                let batch = st.board.history_from(st.next, 256);
                if let Some(last) = batch.last() {
                    st.next = last.revision + 1;
                    st.buf.extend(batch);
                    continue;
                }
                // Caught up: wait until a write with the next revision is published. The
                // revision is published under the lock after the write, and the receiver
                // sees any value published since it was created, so nothing is missed.
                let next = st.next;
                if st.rx.wait_for(|&last| last >= next).await.is_err() {
                    return None;
                }
            }
        })))
    }
}

// ---------------------------------------------------------------------------------------
// Work queue

enum TaskState {
    /// Waiting to be claimed (when, is in [`QueueState::ready`]).
    Ready,
    InFlight {
        token: String,
        deadline: Instant,
    },
    Acked,
    Dead,
}

struct Task {
    /// Push order.
    seq: u64,
    payload: serde_json::Value,
    deliveries: u32,
    state: TaskState,
}

#[derive(Default)]
struct QueueState {
    /// Every task ever pushed, by id (acked and dead ones too: pushes are idempotent).
    tasks: HashMap<String, Task>,
    /// Ready tasks by push order, with the instant they may be claimed.
    ready: BTreeMap<u64, (Instant, String)>,
    /// Tasks in flight by lease deadline (then push order).
    leases: BTreeMap<(Instant, u64), String>,
    dead: Vec<DeadLetter>,
    next_seq: u64,
    next_token: u64,
    acked: u64,
    redeliveries: u64,
}

impl QueueState {
    /// Give back every task whose lease has run out, dead-lettering those that have had
    /// all their deliveries.
    fn expire(&mut self, now: Instant, max_deliver: u32) {
        while let Some(entry) = self.leases.first_entry() {
            let (deadline, _) = *entry.key();
            if deadline > now {
                break;
            }
            let id = entry.remove();
            self.give_back(&id, deadline, max_deliver);
        }
    }

    /// Return an in-flight task (already removed from `leases`) to the queue, to be
    /// claimable from `not_before`, or dead-letter it when its deliveries are used up.
    fn give_back(&mut self, id: &str, not_before: Instant, max_deliver: u32) {
        let task = self.tasks.get_mut(id).expect("leased task is known");
        if max_deliver != 0 && task.deliveries >= max_deliver {
            task.state = TaskState::Dead;
            self.dead.push(DeadLetter {
                task_id: id.to_owned(),
                payload: std::mem::take(&mut task.payload),
                deliveries: task.deliveries,
            });
        } else {
            task.state = TaskState::Ready;
            self.ready.insert(task.seq, (not_before, id.to_owned()));
        }
    }

    /// Hand the first claimable task to `claimer`.
    fn take(&mut self, now: Instant, lease: Duration, claimer: &PeerId) -> Option<Claim> {
        let seq = self.ready.iter().find(|(_, (not_before, _))| *not_before <= now).map(|(&seq, _)| seq)?;
        let (_, id) = self.ready.remove(&seq).expect("found above");
        let task = self.tasks.get_mut(&id).expect("ready task is known");
        task.deliveries += 1;
        if task.deliveries > 1 {
            self.redeliveries += 1;
        }
        self.next_token += 1;
        let token = format!("{}.{}.{}", task.seq, task.deliveries, self.next_token);
        let deadline = now + lease;
        task.state = TaskState::InFlight { token: token.clone(), deadline };
        self.leases.insert((deadline, task.seq), id.clone());
        Some(Claim {
            task_id: id,
            payload: task.payload.clone(),
            delivery: task.deliveries,
            lease: token,
            claimer: claimer.clone(),
        })
    }

    /// The next instant at which something may become claimable without a push or nack.
    fn next_change(&self, now: Instant) -> Option<Instant> {
        let delayed = self.ready.values().map(|(t, _)| *t).filter(|t| *t > now).min();
        let lease = self.leases.keys().next().map(|(t, _)| *t);
        match (delayed, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The task of `claim` if `claim` still holds its lease (call after [`Self::expire`]).
    fn held(&mut self, claim: &Claim) -> Result<(&mut Task, Instant), QueueError> {
        let lost = |why: &str| {
            QueueError::new(
                QueueErrorKind::LeaseLost,
                format!("task {:?}, delivery {}: {why}", claim.task_id, claim.delivery),
            )
        };
        let task = self.tasks.get_mut(&claim.task_id).ok_or_else(|| lost("no such task"))?;
        match &task.state {
            TaskState::InFlight { token, deadline } if *token == claim.lease => {
                let deadline = *deadline;
                Ok((task, deadline))
            }
            TaskState::InFlight { .. } => Err(lost("the lease expired and the task was delivered again")),
            TaskState::Ready => Err(lost("the lease expired or the task was given back")),
            TaskState::Acked => Err(lost("the task is already acked")),
            TaskState::Dead => Err(lost("the task is dead-lettered")),
        }
    }
}

/// In-process work queue (see the module docs).
pub struct MemWorkQueue {
    config: QueueConfig,
    state: Mutex<QueueState>,
    /// Wakes waiting claimers when a task may have become claimable.
    changed: Notify,
}

impl MemWorkQueue {
    pub fn new(config: QueueConfig) -> Self {
        MemWorkQueue { config, state: Mutex::new(QueueState::default()), changed: Notify::new() }
    }

    /// The state, with expired leases already given back.
    fn state(&self, now: Instant) -> std::sync::MutexGuard<'_, QueueState> {
        let mut st = self.state.lock().expect("queue lock");
        st.expire(now, self.config.max_deliver);
        st
    }
}

#[async_trait]
impl WorkQueue for MemWorkQueue {
    fn config(&self) -> QueueConfig {
        self.config
    }

    async fn push(&self, task_id: &str, payload: serde_json::Value) -> Result<(), QueueError> {
        let now = Instant::now();
        {
            let mut st = self.state(now);
            if st.tasks.contains_key(task_id) {
                return Ok(());
            }
            st.next_seq += 1;
            let seq = st.next_seq;
            st.tasks.insert(task_id.to_owned(), Task { seq, payload, deliveries: 0, state: TaskState::Ready });
            st.ready.insert(seq, (now, task_id.to_owned()));
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn claim(&self, claimer: &PeerId, wait: Duration) -> Result<Option<Claim>, QueueError> {
        let give_up = Instant::now() + wait;
        loop {
            // Registered before looking, so a push between the look and the wait wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let next_change = {
                let mut st = self.state(now);
                if let Some(claim) = st.take(now, self.config.lease, claimer) {
                    return Ok(Some(claim));
                }
                st.next_change(now)
            };
            if now >= give_up {
                return Ok(None);
            }
            let until = next_change.map_or(give_up, |t| t.min(give_up));
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, claim: &Claim) -> Result<(), QueueError> {
        let mut st = self.state(Instant::now());
        let (task, deadline) = st.held(claim)?;
        task.state = TaskState::Acked;
        task.payload = serde_json::Value::Null;
        let seq = task.seq;
        st.leases.remove(&(deadline, seq));
        st.acked += 1;
        Ok(())
    }

    async fn nack(&self, claim: &Claim, delay: Duration) -> Result<(), QueueError> {
        let now = Instant::now();
        {
            let mut st = self.state(now);
            let (task, deadline) = st.held(claim)?;
            let seq = task.seq;
            st.leases.remove(&(deadline, seq));
            st.give_back(&claim.task_id, now + delay, self.config.max_deliver);
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn progress(&self, claim: &Claim) -> Result<(), QueueError> {
        let now = Instant::now();
        let mut st = self.state(now);
        let (task, deadline) = st.held(claim)?;
        let seq = task.seq;
        let new_deadline = now + self.config.lease;
        task.state = TaskState::InFlight { token: claim.lease.clone(), deadline: new_deadline };
        st.leases.remove(&(deadline, seq));
        st.leases.insert((new_deadline, seq), claim.task_id.clone());
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.state(Instant::now()).dead.clone())
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let st = self.state(Instant::now());
        Ok(QueueStats {
            pending: st.ready.len() as u64,
            in_flight: st.leases.len() as u64,
            acked: st.acked,
            dead: st.dead.len() as u64,
            redeliveries: st.redeliveries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    fn peer(p: &str) -> PeerId {
        PeerId::from(p)
    }

    #[tokio::test]
    async fn board_revisions_are_global_and_cas_holds() {
        let b = MemBlackboard::new();
        assert_eq!(b.create("a", b"1".to_vec()).await.unwrap(), 1);
        assert_eq!(b.put("b", b"x".to_vec()).await.unwrap(), 2);
        assert_eq!(b.create("a", b"2".to_vec()).await.unwrap_err().kind(), BoardErrorKind::AlreadyExists);
        assert_eq!(b.update("a", b"2".to_vec(), 2).await.unwrap_err().kind(), BoardErrorKind::WrongLastRevision);
        assert_eq!(b.update("a", b"2".to_vec(), 1).await.unwrap(), 3);
        let e = b.get("a").await.unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.revision, e.op), (&b"2"[..], 3, BoardOp::Put));
        // Never written: revision 0 is its last revision.
        assert_eq!(b.update("c", b"c".to_vec(), 0).await.unwrap(), 4);
        assert_eq!(b.keys().await.unwrap(), ["a", "b", "c"]);
        assert_eq!(b.last_revision(), 4);
    }

    #[tokio::test]
    async fn board_delete_is_a_tombstone_with_a_revision() {
        let b = MemBlackboard::new();
        b.put("k", b"v".to_vec()).await.unwrap();
        assert_eq!(b.delete("k").await.unwrap(), 2);
        assert_eq!(b.get("k").await.unwrap(), None);
        assert!(b.keys().await.unwrap().is_empty());
        // CAS against the tombstone's revision, and create on a deleted key, both write.
        assert_eq!(b.update("k", b"w".to_vec(), 1).await.unwrap_err().kind(), BoardErrorKind::WrongLastRevision);
        assert_eq!(b.update("k", b"w".to_vec(), 2).await.unwrap(), 3);
        b.delete("k").await.unwrap();
        assert_eq!(b.create("k", b"z".to_vec()).await.unwrap(), 5);
        // Deleting an absent key still writes a tombstone.
        assert_eq!(b.delete("never").await.unwrap(), 6);
        assert_eq!(b.get("bad key").await.unwrap_err().kind(), BoardErrorKind::InvalidKey);
        assert_eq!(b.put(".x", vec![]).await.unwrap_err().kind(), BoardErrorKind::InvalidKey);
        assert_eq!(b.last_revision(), 6, "a rejected write takes no revision");
    }

    #[tokio::test]
    async fn board_watch_replays_then_follows() {
        let b = Arc::new(MemBlackboard::new());
        for i in 0..5u8 {
            b.put(&format!("k{i}"), vec![i]).await.unwrap();
        }
        let mut w = b.watch(3).await.unwrap();
        for rev in 3..=5 {
            assert_eq!(w.next().await.unwrap().unwrap().revision, rev);
        }
        let b2 = b.clone();
        let writer = tokio::spawn(async move {
            for i in 0..100u8 {
                b2.put("live", vec![i]).await.unwrap();
                tokio::task::yield_now().await;
            }
            b2.delete("live").await.unwrap();
        });
        for rev in 6..=105 {
            let e = w.next().await.unwrap().unwrap();
            assert_eq!((e.revision, e.op, e.value[0] as u64), (rev, BoardOp::Put, rev - 6));
        }
        let e = w.next().await.unwrap().unwrap();
        assert_eq!((e.revision, e.op, e.key.as_str()), (106, BoardOp::Delete, "live"));
        writer.await.unwrap();
        // A watch from beyond the end waits for that revision.
        let mut w = b.watch(200).await.unwrap();
        assert!(futures::poll!(w.next()).is_pending());
    }

    fn cfg(lease_ms: u64, max_deliver: u32) -> QueueConfig {
        QueueConfig { lease: Duration::from_millis(lease_ms), max_deliver }
    }

    #[tokio::test(start_paused = true)]
    async fn queue_hands_out_in_push_order_and_push_is_idempotent() {
        let q = MemWorkQueue::new(cfg(1000, 3));
        for t in ["a", "b", "c"] {
            q.push(t, json!(t)).await.unwrap();
        }
        q.push("a", json!("again")).await.unwrap();
        let a = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((a.task_id.as_str(), &a.payload, a.delivery), ("a", &json!("a"), 1));
        q.ack(&a).await.unwrap();
        q.push("a", json!("after ack")).await.unwrap();
        let b = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        let c = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((b.task_id.as_str(), c.task_id.as_str()), ("b", "c"));
        assert_ne!(b.lease, c.lease);
        assert_eq!(q.claim(&peer("p"), Duration::ZERO).await.unwrap(), None);
        assert_eq!(
            q.stats().await.unwrap(),
            QueueStats { pending: 0, in_flight: 2, acked: 1, dead: 0, redeliveries: 0 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_redelivers_and_stale_leases_are_lost() {
        let q = MemWorkQueue::new(cfg(1000, 5));
        q.push("t", json!(1)).await.unwrap();
        let first = q.claim(&peer("a"), Duration::ZERO).await.unwrap().unwrap();
        tokio::time::advance(Duration::from_millis(999)).await;
        q.progress(&first).await.unwrap(); // now held until 1999
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(q.claim(&peer("b"), Duration::ZERO).await.unwrap(), None, "lease was extended");
        tokio::time::advance(Duration::from_millis(1)).await;
        // Expired at 1999 but not yet handed out again: the lease is already lost.
        assert_eq!(q.ack(&first).await.unwrap_err().kind(), QueueErrorKind::LeaseLost);
        let second = q.claim(&peer("b"), Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((second.delivery, second.claimer.as_str()), (2, "b"));
        for r in [q.ack(&first).await, q.nack(&first, Duration::ZERO).await, q.progress(&first).await] {
            assert_eq!(r.unwrap_err().kind(), QueueErrorKind::LeaseLost);
        }
        q.ack(&second).await.unwrap();
        assert_eq!(q.ack(&second).await.unwrap_err().kind(), QueueErrorKind::LeaseLost);
        assert_eq!(q.stats().await.unwrap(), QueueStats { acked: 1, redeliveries: 1, ..Default::default() });
    }

    #[tokio::test(start_paused = true)]
    async fn claim_waits_for_push_nack_delay_and_expiry() {
        let q = Arc::new(MemWorkQueue::new(cfg(1000, 5)));
        let start = Instant::now();
        // Wakes on a push.
        let q2 = q.clone();
        let pusher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            q2.push("t", json!(null)).await.unwrap();
        });
        let c = q.claim(&peer("a"), Duration::from_secs(10)).await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        pusher.await.unwrap();
        // Wakes when a nack's delay has elapsed, not before.
        q.nack(&c, Duration::from_millis(500)).await.unwrap();
        assert_eq!(q.claim(&peer("a"), Duration::from_millis(499)).await.unwrap(), None);
        let c = q.claim(&peer("a"), Duration::from_secs(10)).await.unwrap().unwrap();
        assert_eq!((c.delivery, start.elapsed()), (2, Duration::from_millis(800)));
        // Wakes when the lease runs out.
        let c = q.claim(&peer("b"), Duration::from_secs(10)).await.unwrap().unwrap();
        assert_eq!((c.delivery, start.elapsed()), (3, Duration::from_millis(1800)));
        // Gives up after `wait`.
        q.ack(&c).await.unwrap();
        assert_eq!(q.claim(&peer("b"), Duration::from_secs(3)).await.unwrap(), None);
        assert_eq!(start.elapsed(), Duration::from_millis(4800));
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_task_does_not_block_later_ones() {
        let q = MemWorkQueue::new(cfg(1000, 5));
        q.push("a", json!(null)).await.unwrap();
        q.push("b", json!(null)).await.unwrap();
        let a = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        q.nack(&a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap().task_id, "b");
        assert_eq!(q.stats().await.unwrap().pending, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letter_after_max_deliver() {
        let q = MemWorkQueue::new(cfg(1000, 3));
        q.push("x", json!({"n": 1})).await.unwrap();
        q.push("y", json!(2)).await.unwrap();
        // x: expires, is nacked, expires again: three deliveries, then dead.
        let c = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((c.task_id.as_str(), c.delivery), ("x", 1));
        let c = q.claim(&peer("p"), Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!((c.task_id.as_str(), c.delivery), ("y", 1));
        q.ack(&c).await.unwrap();
        let c = q.claim(&peer("p"), Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!((c.task_id.as_str(), c.delivery), ("x", 2));
        q.nack(&c, Duration::ZERO).await.unwrap();
        let c = q.claim(&peer("p"), Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!((c.task_id.as_str(), c.delivery), ("x", 3));
        assert!(q.dead_letters().await.unwrap().is_empty());
        assert_eq!(q.claim(&peer("p"), Duration::from_secs(5)).await.unwrap(), None);
        assert_eq!(
            q.dead_letters().await.unwrap(),
            [DeadLetter { task_id: "x".into(), payload: json!({"n": 1}), deliveries: 3 }]
        );
        assert_eq!(q.ack(&c).await.unwrap_err().kind(), QueueErrorKind::LeaseLost);
        q.push("x", json!("again")).await.unwrap();
        assert_eq!(q.claim(&peer("p"), Duration::ZERO).await.unwrap(), None, "a dead task stays dead");
        assert_eq!(q.stats().await.unwrap(), QueueStats { acked: 1, dead: 1, redeliveries: 2, ..Default::default() });

        // Nacked on the last delivery: dead at once.
        let q = MemWorkQueue::new(cfg(1000, 1));
        q.push("z", json!(null)).await.unwrap();
        let c = q.claim(&peer("p"), Duration::ZERO).await.unwrap().unwrap();
        q.nack(&c, Duration::from_secs(1)).await.unwrap();
        assert_eq!(q.stats().await.unwrap().dead, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_deliver_zero_means_no_limit() {
        let q = MemWorkQueue::new(cfg(10, 0));
        q.push("t", json!(null)).await.unwrap();
        for n in 1..=20 {
            let c = q.claim(&peer("p"), Duration::from_secs(1)).await.unwrap().unwrap();
            assert_eq!(c.delivery, n);
        }
        assert!(q.dead_letters().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claimers_each_get_distinct_tasks() {
        let q = Arc::new(MemWorkQueue::new(cfg(60_000, 5)));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..8 {
            let (q, done) = (q.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while done.load(std::sync::atomic::Ordering::SeqCst) < 500 {
                    if let Some(c) = q.claim(&peer(&format!("w{w}")), Duration::from_millis(10)).await.unwrap() {
                        q.ack(&c).await.unwrap();
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        got.push(c.task_id);
                    }
                }
                got
            }));
        }
        for i in 0..500 {
            q.push(&format!("t{i}"), json!(i)).await.unwrap();
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all.sort();
        let mut expected: Vec<String> = (0..500).map(|i| format!("t{i}")).collect();
        expected.sort();
        assert_eq!(all, expected);
        assert_eq!(q.stats().await.unwrap(), QueueStats { acked: 500, ..Default::default() });
    }
}
