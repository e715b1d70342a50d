//! Checks across two connections to one store: what peers in two processes see of one
//! session. Each check takes two backends (the fixture's, and another connection to the
//! same store — for an in-process backend, the same one) and a fresh session.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use roundtable_core::blackboard::BoardErrorKind;
use roundtable_core::bus::Backend;
use roundtable_core::envelope::{PeerId, SessionId};
use roundtable_core::workqueue::QueueErrorKind;
use serde_json::json;

use crate::queue::LONG_LEASE;
use crate::{envelope, join, open_board, open_log, open_queue, within};

/// Appends from two connections, some of the same envelopes from both, land once each,
/// in one order that both connections read and tail alike.
pub async fn pair_log_one_sequence(a: Arc<dyn Backend>, b: Arc<dyn Backend>, s: SessionId) {
    let (la, lb) = (open_log(&*a, &s).await, open_log(&*b, &s).await);
    let mut tail_b = lb.tail(1).await.expect("tail on b");
    const EACH: usize = 30;
    let writers: Vec<_> = [("a", la.clone()), ("b", lb.clone())]
        .into_iter()
        .map(|(who, log)| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    log.append(envelope(&s, who, &format!("own/{i}"))).await.expect("append");
                    // Both write the shared steps: one of each lands.
                    log.append(envelope(&s, "shared", &format!("shared/{i}"))).await.expect("append shared");
                }
            })
        })
        .collect();
    for w in writers {
        join(w).await;
    }
    let from_a = la.read_all().await.expect("read on a");
    let from_b = lb.read_all().await.expect("read on b");
    assert_eq!(from_a.len(), 3 * EACH, "each own step once from each writer, each shared step once");
    let ids =
        |entries: &[roundtable_core::log::Entry]| entries.iter().map(|e| (e.seq, e.env.id.clone())).collect::<Vec<_>>();
    assert_eq!(ids(&from_a), ids(&from_b), "both connections read one sequence");
    let distinct: BTreeSet<_> = from_a.iter().map(|e| e.env.id.clone()).collect();
    assert_eq!(distinct.len(), from_a.len(), "no envelope twice");
    for e in &from_a {
        let t = within("b's tail", tail_b.next()).await.expect("an entry").expect("ok");
        assert_eq!((t.seq, &t.env.id), (e.seq, &e.env.id), "b's tail follows the same sequence");
    }
}

/// Two connections update one key from the same revision at once: exactly one wins,
/// the other fails with a revision conflict and succeeds on the new revision.
pub async fn pair_board_cas_race(a: Arc<dyn Backend>, b: Arc<dyn Backend>, s: SessionId) {
    let (ba, bb) = (open_board(&*a, &s).await, open_board(&*b, &s).await);
    let mut rev = ba.create("key", b"0".to_vec()).await.expect("create");
    for round in 0..10u32 {
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let racers: Vec<_> = [("a", ba.clone()), ("b", bb.clone())]
            .into_iter()
            .map(|(who, board)| {
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    (who, board.update("key", format!("{who}/{round}").into_bytes(), rev).await)
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for r in racers {
            match join(r).await {
                (who, Ok(new_rev)) => won.push((who, new_rev)),
                (who, Err(e)) => {
                    assert_eq!(e.kind(), BoardErrorKind::WrongLastRevision, "round {round}: {who} lost with {e}");
                    lost.push(who);
                }
            }
        }
        assert_eq!((won.len(), lost.len()), (1, 1), "round {round}: exactly one of two CAS from {rev} wins");
        let (winner, won_rev) = won[0];
        // The loser reads the winner's write through its own connection and retries on it.
        let loser_board = if lost[0] == "a" { &ba } else { &bb };
        let seen = loser_board.get("key").await.expect("get").expect("value");
        assert_eq!((seen.revision, seen.value.clone()), (won_rev, format!("{winner}/{round}").into_bytes()));
        rev = loser_board
            .update("key", format!("{}/{round}", lost[0]).into_bytes(), seen.revision)
            .await
            .expect("the loser's retry on the new revision");
    }
}

/// Claimers on two connections share one queue: every task is handed out once, and a
/// claim is settled by its claimer (another connection is refused, where the backend
/// tells connections apart).
pub async fn pair_queue_exclusive_claims(a: Arc<dyn Backend>, b: Arc<dyn Backend>, s: SessionId) {
    let (qa, qb) = (open_queue(&*a, &s, LONG_LEASE).await, open_queue(&*b, &s, LONG_LEASE).await);
    const TASKS: usize = 40;
    for i in 0..TASKS {
        let q = if i % 2 == 0 { &qa } else { &qb };
        q.push(&format!("task{i}"), json!({ "i": i })).await.expect("push");
    }
    // The same ids again, from the other side: nothing new.
    for i in 0..TASKS {
        let q = if i % 2 == 0 { &qb } else { &qa };
        q.push(&format!("task{i}"), json!({ "i": i })).await.expect("push again");
    }
    let done = Arc::new(AtomicUsize::new(0));
    let claimers: Vec<_> = [("a", qa.clone()), ("a2", qa.clone()), ("b", qb.clone()), ("b2", qb.clone())]
        .into_iter()
        .map(|(who, q)| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while done.load(Ordering::SeqCst) < TASKS {
                    if let Some(c) = q.claim(&PeerId::from(who), Duration::from_millis(100)).await.expect("claim") {
                        q.ack(&c).await.expect("ack by the claimer");
                        done.fetch_add(1, Ordering::SeqCst);
                        got.push(c.task_id);
                    }
                }
                got
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for c in claimers {
        for id in within("claimers on both connections", join(c)).await {
            assert!(seen.insert(id.clone()), "{id} was handed out twice");
        }
    }
    assert_eq!(seen.len(), TASKS);
    // A claim settled from the other connection is refused.
    qa.push("last", json!({})).await.expect("push");
    let c = qa.claim(&PeerId::from("a"), Duration::from_secs(5)).await.expect("claim").expect("the last task");
    let elsewhere = qb.ack(&c).await;
    if let Err(e) = elsewhere {
        assert_eq!(e.kind(), QueueErrorKind::LeaseLost, "{e}");
        qa.ack(&c).await.expect("the claimer's own ack");
    }
    assert_eq!(qa.stats().await.expect("stats").acked, TASKS as u64 + 1);
}
