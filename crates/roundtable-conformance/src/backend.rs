//! Checks of a whole [`Backend`]: what it opens for one session is separate from what it
//! opens for another.

use std::sync::Arc;
use std::time::Duration;

use roundtable_core::bus::Backend;
use roundtable_core::envelope::PeerId;
use serde_json::json;

use crate::queue::LONG_LEASE;
use crate::{envelope, fresh_session, open_board, open_log, open_presence, open_queue};

/// Two sessions of one backend share no log entries, keys, tasks or heartbeats; opening
/// a session's parts twice gives the same parts.
pub async fn backend_sessions_are_isolated(backend: Arc<dyn Backend>) {
    let (s1, s2) = (fresh_session("isolated-one"), fresh_session("isolated-two"));
    let b = &*backend;

    open_log(b, &s1).await.append(envelope(&s1, "p", "x")).await.expect("append");
    assert_eq!(open_log(b, &s1).await.last_seq().await.expect("last_seq"), 1, "reopened log");
    assert_eq!(open_log(b, &s2).await.last_seq().await.expect("last_seq"), 0, "another session's log");

    open_board(b, &s1).await.put("k", b"v".to_vec()).await.expect("put");
    assert!(open_board(b, &s1).await.get("k").await.expect("get").is_some(), "reopened board");
    assert_eq!(open_board(b, &s2).await.get("k").await.expect("get"), None, "another session's board");

    open_queue(b, &s1, LONG_LEASE).await.push("task", json!(1)).await.expect("push");
    let q2 = open_queue(b, &s2, LONG_LEASE).await;
    let other = q2.claim(&PeerId::from("p"), Duration::from_millis(300)).await.expect("claim");
    assert_eq!(other, None, "another session's queue");
    let q1 = open_queue(b, &s1, LONG_LEASE).await;
    let mine = q1.claim(&PeerId::from("p"), Duration::from_secs(5)).await.expect("claim");
    assert_eq!(mine.map(|c| c.task_id).as_deref(), Some("task"), "reopened queue");

    open_presence(b, &s1).await.beat(&PeerId::from("p")).await.expect("beat");
    assert_eq!(open_presence(b, &s1).await.last_seen().await.expect("last_seen").len(), 1, "reopened presence");
    assert!(open_presence(b, &s2).await.last_seen().await.expect("last_seen").is_empty(), "another session's presence");
}
