//! Checks of [`WorkQueue`]: idempotent pushes, push order, exclusive claims, nack with a
//! delay, leases kept by progress and lost by expiry, dead letters, stats.
//!
//! Each check takes the queue of a fresh session, opened with the config its docs name:
//! [`LONG_LEASE`] (no lease runs out during the check), [`SHORT_LEASE`] (leases run out
//! quickly) or [`PROGRESS_LEASE`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use roundtable_core::envelope::PeerId;
use roundtable_core::workqueue::{Claim, QueueConfig, QueueError, QueueErrorKind, QueueStats, WorkQueue};
use serde_json::json;
use tokio::time::Instant;

use crate::{DEADLINE, join, within};

/// Leases that do not run out during a check.
pub const LONG_LEASE: QueueConfig = QueueConfig { lease: Duration::from_secs(120), max_deliver: 5 };
/// Leases that run out within a second; three deliveries.
pub const SHORT_LEASE: QueueConfig = QueueConfig { lease: Duration::from_secs(1), max_deliver: 3 };
/// Leases long enough to be extended with margin to spare.
pub const PROGRESS_LEASE: QueueConfig = QueueConfig { lease: Duration::from_secs(2), max_deliver: 5 };

/// How long a claim waits when the check expects nothing to be claimable.
const NOTHING_WAIT: Duration = Duration::from_millis(300);

fn peer(p: &str) -> PeerId {
    PeerId::from(p)
}

fn ok<T>(what: &str, r: Result<T, QueueError>) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

fn needs(q: &dyn WorkQueue, check: &str, config: QueueConfig) {
    assert_eq!(q.config(), config, "{check} needs a queue opened with {config:?}");
}

async fn push(q: &dyn WorkQueue, id: &str, payload: serde_json::Value) {
    ok(&format!("push({id})"), q.push(id, payload).await);
}

/// A claim that must come within the deadline.
async fn claim(q: &dyn WorkQueue, who: &str, what: &str) -> Claim {
    let got = within(what, q.claim(&peer(who), DEADLINE)).await;
    ok(what, got).unwrap_or_else(|| panic!("{what}: no task to claim within {DEADLINE:?}"))
}

/// A short claim that must find nothing.
async fn claim_nothing(q: &dyn WorkQueue, what: &str) {
    let got = ok(what, within(what, q.claim(&peer("probe"), NOTHING_WAIT)).await);
    if let Some(c) = got {
        panic!("{what}: claimed task {:?} (delivery {}), expected nothing", c.task_id, c.delivery);
    }
}

fn lease_lost(what: &str, r: Result<(), QueueError>) {
    match r {
        Err(e) => assert_eq!(e.kind(), QueueErrorKind::LeaseLost, "{what}: wrong error kind ({e})"),
        Ok(()) => panic!("{what} succeeded with a lease that is no longer held; it must fail with LeaseLost"),
    }
}

async fn stats(q: &dyn WorkQueue) -> QueueStats {
    ok("stats", q.stats().await)
}

/// Pushing a task id that is queued, in flight or done changes nothing. Needs
/// [`LONG_LEASE`].
pub async fn queue_push_idempotent(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_push_idempotent", LONG_LEASE);
    push(&*q, "a", json!({"n": 1})).await;
    push(&*q, "a", json!({"n": 2})).await;
    assert_eq!(stats(&*q).await.pending, 1, "a task pushed twice is queued once");
    let c = claim(&*q, "p", "claim of a").await;
    assert_eq!((c.task_id.as_str(), &c.payload, c.delivery), ("a", &json!({"n": 1}), 1), "the first push's payload");
    push(&*q, "a", json!({"n": 3})).await;
    claim_nothing(&*q, "claim after pushing a task that is in flight").await;
    ok("ack", q.ack(&c).await);
    push(&*q, "a", json!({"n": 4})).await;
    claim_nothing(&*q, "claim after pushing a task that is done").await;
    push(&*q, "b", json!({"n": 1})).await;
    let c = claim(&*q, "p", "claim of b").await;
    assert_eq!(c.task_id, "b", "another id with the same payload is another task");
    ok("ack", q.ack(&c).await);
    assert_eq!(stats(&*q).await, QueueStats { acked: 2, ..Default::default() });
}

/// Tasks are handed out in push order. Needs [`LONG_LEASE`].
pub async fn queue_claim_order(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_claim_order", LONG_LEASE);
    let ids: Vec<String> = (0..12).map(|i| format!("t{i:02}")).collect();
    // Not in lexical order of anything but the push.
    for (i, id) in ids.iter().enumerate().rev() {
        push(&*q, id, json!(i)).await;
    }
    let mut claims = Vec::new();
    for id in ids.iter().rev() {
        let c = claim(&*q, "p", &format!("claim of {id}")).await;
        assert_eq!(&c.task_id, id, "tasks are handed out in push order");
        claims.push(c);
    }
    claim_nothing(&*q, "claim when every task is in flight").await;
    // Acks in any order.
    for c in claims.iter().rev() {
        ok("ack", q.ack(c).await);
    }
    assert_eq!(stats(&*q).await.acked, 12);
}

/// Many claimers at once, tasks pushed while they claim: each task is delivered to one
/// claimer, once. Needs [`LONG_LEASE`].
pub async fn queue_exclusive_claims(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_exclusive_claims", LONG_LEASE);
    const TASKS: usize = 60;
    const CLAIMERS: usize = 6;
    let done = Arc::new(AtomicUsize::new(0));
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|w| {
            let (q, done) = (q.clone(), done.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                while done.load(Ordering::SeqCst) < TASKS {
                    let c = ok("claim", q.claim(&peer(&format!("w{w}")), Duration::from_millis(100)).await);
                    if let Some(c) = c {
                        ok("ack", q.ack(&c).await);
                        done.fetch_add(1, Ordering::SeqCst);
                        got.push(c);
                    }
                }
                got
            })
        })
        .collect();
    let pushers: Vec<_> = (0..2)
        .map(|p| {
            let q = q.clone();
            tokio::spawn(async move {
                for i in (p..TASKS).step_by(2) {
                    push(&*q, &format!("task{i}"), json!({ "i": i })).await;
                }
            })
        })
        .collect();
    for p in pushers {
        join(p).await;
    }
    let mut seen: BTreeMap<String, Claim> = BTreeMap::new();
    let mut leases = BTreeSet::new();
    for c in claimers {
        for claim in within("claimers finishing every task", join(c)).await {
            assert_eq!(claim.delivery, 1, "task {} was delivered again though its lease held", claim.task_id);
            assert!(leases.insert(claim.lease.clone()), "two deliveries share the lease token {:?}", claim.lease);
            let id = claim.task_id.clone();
            if let Some(first) = seen.insert(id.clone(), claim.clone()) {
                panic!("task {id} was delivered to {} and to {}", first.claimer, claim.claimer);
            }
        }
    }
    assert_eq!(seen.len(), TASKS, "every task delivered");
    for (id, c) in &seen {
        assert_eq!(format!("task{}", c.payload["i"]), *id, "the payload of {id}");
    }
    assert_eq!(stats(&*q).await, QueueStats { acked: TASKS as u64, ..Default::default() });
}

/// A nacked task comes back after its delay, not before, and later tasks are not held
/// up meanwhile; a nack without delay makes it claimable at once. Needs [`LONG_LEASE`].
pub async fn queue_nack_with_delay(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_nack_with_delay", LONG_LEASE);
    let delay = Duration::from_millis(1500);
    push(&*q, "a", json!("a")).await;
    push(&*q, "b", json!("b")).await;
    let a = claim(&*q, "p", "claim of a").await;
    assert_eq!(a.task_id, "a");
    let nacked = Instant::now();
    ok("nack with delay", q.nack(&a, delay).await);
    let b = claim(&*q, "p", "claim while a waits out its delay").await;
    assert_eq!(b.task_id, "b", "a nacked task waits out its delay; later tasks go first");
    ok("ack", q.ack(&b).await);
    lease_lost("ack after nack", q.ack(&a).await);
    let a2 = claim(&*q, "p", "claim of a after its delay").await;
    assert!(
        nacked.elapsed() >= delay,
        "a was handed out again {:?} after a nack with delay {delay:?}",
        nacked.elapsed()
    );
    assert_eq!((a2.task_id.as_str(), &a2.payload, a2.delivery), ("a", &json!("a"), 2));
    assert_ne!(a2.lease, a.lease, "each delivery has its own lease token");
    ok("nack without delay", q.nack(&a2, Duration::ZERO).await);
    let a3 = claim(&*q, "p", "claim of a after a nack without delay").await;
    assert_eq!((a3.task_id.as_str(), a3.delivery), ("a", 3));
    ok("ack", q.ack(&a3).await);
    assert_eq!(stats(&*q).await, QueueStats { acked: 2, redeliveries: 2, ..Default::default() });
}

/// Progress extends a lease: a task whose claimer keeps reporting progress is not handed
/// to anyone else long past its first lease, and the ack at the end succeeds. Needs
/// [`PROGRESS_LEASE`].
pub async fn queue_progress_extends_lease(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_progress_extends_lease", PROGRESS_LEASE);
    let lease = q.config().lease;
    push(&*q, "long", json!(null)).await;
    let c = claim(&*q, "worker", "claim").await;
    // Four half-leases: twice the lease in all, with progress every half lease.
    for round in 1..=4 {
        let other = ok("claim", q.claim(&peer("other"), lease / 2).await);
        if let Some(o) = other {
            panic!(
                "round {round}: task {:?} was handed out again (delivery {}) while its claimer reported progress",
                o.task_id, o.delivery
            );
        }
        ok(&format!("progress, round {round}"), q.progress(&c).await);
    }
    ok("ack after two leases' worth of progress", q.ack(&c).await);
    assert_eq!(stats(&*q).await, QueueStats { acked: 1, ..Default::default() });
}

/// A lease that runs out hands the task to the next claimer with `delivery` 2; the first
/// claimer's ack, nack and progress then fail with `LeaseLost` and change nothing. Needs
/// [`SHORT_LEASE`].
pub async fn queue_redelivery_after_lease_expiry(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_redelivery_after_lease_expiry", SHORT_LEASE);
    push(&*q, "t", json!({"job": 7})).await;
    let first = claim(&*q, "a", "first claim").await;
    assert_eq!((first.task_id.as_str(), first.delivery, first.claimer.as_str()), ("t", 1, "a"));
    // "a" hangs; "b" waits until the task comes back.
    let second = claim(&*q, "b", "claim after the first lease runs out").await;
    assert_eq!(second.task_id, "t");
    assert_eq!(second.delivery, 2, "the second delivery of a task");
    assert_eq!(second.payload, json!({"job": 7}));
    assert_eq!(second.claimer.as_str(), "b");
    assert_ne!(second.lease, first.lease, "each delivery has its own lease token");
    lease_lost("ack with the expired lease", q.ack(&first).await);
    lease_lost("nack with the expired lease", q.nack(&first, Duration::ZERO).await);
    lease_lost("progress with the expired lease", q.progress(&first).await);
    ok("ack by the current holder", q.ack(&second).await);
    lease_lost("a second ack", q.ack(&second).await);
    lease_lost("ack with the expired lease, after the ack", q.ack(&first).await);
    assert_eq!(stats(&*q).await, QueueStats { acked: 1, redeliveries: 1, ..Default::default() });
    // Acked for good: it does not come back when the second lease would have run out.
    let after = ok("claim", q.claim(&peer("c"), q.config().lease * 2).await);
    assert_eq!(after, None, "an acked task was handed out again");
}

/// A task delivered `max_deliver` times without an ack (nacked or left to expire) is
/// dead-lettered: listed with its payload, never handed out again, and later tasks still
/// flow. Needs [`SHORT_LEASE`].
pub async fn queue_dead_letter_after_max_deliver(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_dead_letter_after_max_deliver", SHORT_LEASE);
    let max = q.config().max_deliver;
    push(&*q, "doomed", json!({"poison": true})).await;
    let mut last = None;
    for delivery in 1..=max {
        let c = claim(&*q, "p", &format!("delivery {delivery} of {max}")).await;
        assert_eq!((c.task_id.as_str(), c.delivery), ("doomed", delivery));
        assert!(ok("dead_letters", q.dead_letters().await).is_empty(), "dead before its last delivery");
        // Alternate the two ways a delivery fails: a nack, and a lease left to run out.
        if delivery % 2 == 1 {
            ok("nack", q.nack(&c, Duration::ZERO).await);
        }
        last = Some(c);
    }
    let start = Instant::now();
    let dead = loop {
        let dead = ok("dead_letters", q.dead_letters().await);
        if !dead.is_empty() {
            break dead;
        }
        if start.elapsed() > DEADLINE {
            panic!("no dead letter within {DEADLINE:?} after {max} failed deliveries");
        }
        // A claim both waits a little and gives a lazy backend its chance to notice.
        if let Some(c) = ok("claim", q.claim(&peer("p"), Duration::from_millis(100)).await) {
            panic!("task {:?} handed out for delivery {} with max_deliver {max}", c.task_id, c.delivery);
        }
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].task_id.as_str(), &dead[0].payload, dead[0].deliveries),
        ("doomed", &json!({"poison": true}), max),
        "the dead letter"
    );
    if let Some(c) = last {
        lease_lost("ack of a dead-lettered task", q.ack(&c).await);
    }
    push(&*q, "doomed", json!("again")).await;
    push(&*q, "next", json!(1)).await;
    let c = claim(&*q, "p", "claim of a task pushed after the dead letter").await;
    assert_eq!((c.task_id.as_str(), c.delivery), ("next", 1), "a dead task is never handed out again");
    ok("ack", q.ack(&c).await);
    let after = ok("claim", q.claim(&peer("p"), q.config().lease * 2).await);
    assert_eq!(after, None, "nothing is left to hand out");
    let s = stats(&*q).await;
    assert_eq!(
        s,
        QueueStats { acked: 1, dead: 1, redeliveries: u64::from(max) - 1, ..Default::default() },
        "stats after a dead letter"
    );
}

/// Stats count queued, in-flight, acked and dead tasks and redeliveries. Needs
/// [`LONG_LEASE`].
pub async fn queue_stats(q: Arc<dyn WorkQueue>) {
    needs(&*q, "queue_stats", LONG_LEASE);
    assert_eq!(stats(&*q).await, QueueStats::default(), "a new queue");
    for i in 1..=4 {
        push(&*q, &format!("t{i}"), json!(i)).await;
    }
    assert_eq!(stats(&*q).await, QueueStats { pending: 4, ..Default::default() });
    let t1 = claim(&*q, "p", "claim of t1").await;
    let t2 = claim(&*q, "p", "claim of t2").await;
    assert_eq!((t1.task_id.as_str(), t2.task_id.as_str()), ("t1", "t2"));
    assert_eq!(stats(&*q).await, QueueStats { pending: 2, in_flight: 2, ..Default::default() });
    ok("ack", q.ack(&t1).await);
    assert_eq!(stats(&*q).await, QueueStats { pending: 2, in_flight: 1, acked: 1, ..Default::default() });
    ok("nack", q.nack(&t2, Duration::ZERO).await);
    assert_eq!(
        stats(&*q).await,
        QueueStats { pending: 3, acked: 1, ..Default::default() },
        "a nacked task is pending again"
    );
    let again = claim(&*q, "p", "claim after the nack").await;
    assert_eq!((again.task_id.as_str(), again.delivery), ("t2", 2), "the nacked task comes first: it was pushed first");
    assert_eq!(stats(&*q).await, QueueStats { pending: 2, in_flight: 1, acked: 1, redeliveries: 1, dead: 0 });
}
