//! What only a shared server can show: two connections (two processes, as far as the
//! server can tell) working on one session.

use std::time::Duration;

use futures::StreamExt;
use roundtable_core::bus::Backend;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::workqueue::{QueueConfig, QueueErrorKind};
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;
use serde_json::json;

async fn two_processes(server: &NatsServer) -> (NatsBackend, NatsBackend) {
    let a = NatsBackend::connect(&server.url()).await.expect("connect a");
    let b = NatsBackend::connect(&server.url()).await.expect("connect b");
    (a, b)
}

fn env(s: &SessionId, peer: &str, step: &str) -> Envelope {
    Envelope::new(s, &PeerId::from(peer), step, Kind::Message, Recipient::All, Body::text(step))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_log_and_one_append_per_id() {
    let server = NatsServer::start();
    let (a, b) = two_processes(&server).await;
    // A session id that is not a plain name still maps to valid stream names.
    let s = SessionId::from("team review.2026/11 #1");
    let log_a = a.logs().open(&s, true).await.expect("open a");
    let log_b = b.logs().open(&s, false).await.expect("open b: the session exists now");
    let mut tail_b = log_b.tail(1).await.expect("tail");
    assert_eq!(log_a.append(env(&s, "pm", "turn/1")).await.unwrap().seq, 1);
    let dup = log_b.append(env(&s, "pm", "turn/1")).await.unwrap();
    assert!(dup.duplicate && dup.seq == 1, "the other process's append of the same id: {dup:?}");
    assert_eq!(log_b.append(env(&s, "cfo", "turn/2")).await.unwrap().seq, 2);
    for seq in 1..=2 {
        let e = tokio::time::timeout(Duration::from_secs(10), tail_b.next()).await.expect("tail").unwrap().unwrap();
        assert_eq!(e.seq, seq);
    }
    let sessions = b.logs().sessions().await.expect("sessions");
    assert_eq!(sessions.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [s.as_str()]);
    assert_eq!(sessions[0].envelopes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_opener_sets_the_queue_and_only_the_claimer_settles() {
    let server = NatsServer::start();
    let (a, b) = two_processes(&server).await;
    let s = SessionId::from("queue");
    let first = QueueConfig { lease: Duration::from_secs(30), max_deliver: 4 };
    let qa = a.work_queue(&s, first).await.expect("open a");
    let qb = b.work_queue(&s, QueueConfig { lease: Duration::from_secs(1), max_deliver: 9 }).await.expect("open b");
    assert_eq!(qb.config(), first, "a queue keeps the settings it was created with");

    qa.push("t", json!({"n": 1})).await.unwrap();
    qb.push("t", json!({"n": 2})).await.unwrap();
    let c = qb.claim(&PeerId::from("b"), Duration::from_secs(10)).await.unwrap().expect("a task");
    assert_eq!((c.task_id.as_str(), &c.payload), ("t", &json!({"n": 1})));
    assert_eq!(qa.claim(&PeerId::from("a"), Duration::from_millis(300)).await.unwrap(), None, "claimed by b");
    for r in [qa.ack(&c).await, qa.progress(&c).await, qa.nack(&c, Duration::ZERO).await] {
        assert_eq!(r.unwrap_err().kind(), QueueErrorKind::LeaseLost, "a claim is settled by its claimer only");
    }
    qb.ack(&c).await.unwrap();
    let stats = qa.stats().await.unwrap();
    assert_eq!((stats.acked, stats.pending, stats.in_flight), (1, 0, 0), "{stats:?}");
}
