//! The SQLite log: durable appends, reopening, listing, import, corruption.

use std::sync::Arc;

use futures::StreamExt;
use roundtable_core::log::{LogErrorKind, LogStore, SessionLog, jsonl};
use roundtable_core::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_sqlite::{Durability, SqliteStore};

fn env(s: &SessionId, from: &str, step: &str, kind: Kind) -> Envelope {
    let mut e =
        Envelope::new(s, &PeerId::from(from), step, kind, Recipient::All, Body::text(format!("{from} at {step}")));
    if kind == Kind::Task {
        e.body.json = Some(serde_json::json!({"team_name": "trio"}));
    }
    if kind == Kind::Stop {
        e.body.json = Some(serde_json::json!({"reason": "completed: 1 rounds"}));
    }
    e
}

#[tokio::test]
async fn appended_envelopes_survive_reopening_and_stay_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = SqliteStore::default_path(dir.path());
    let s = SessionId::from("20260101-000000-abcdef");
    {
        let store = SqliteStore::open(&path, true, Durability::Normal).unwrap();
        let log = store.open(&s, true).await.unwrap();
        log.append(env(&s, "user", "task", Kind::Task)).await.unwrap();
        log.append(env(&s, "pm", "turn/0", Kind::Message)).await.unwrap();
        assert!(log.append(env(&s, "pm", "turn/0", Kind::Message)).await.unwrap().duplicate);
    }
    let store = SqliteStore::open(&path, false, Durability::Normal).unwrap();
    let log = store.open(&s, false).await.unwrap();
    let all = log.read_all().await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(&*all[1].env.body.text, "pm at turn/0");
    // Still idempotent after reopening: the id index was rebuilt.
    let again = log.append(env(&s, "pm", "turn/0", Kind::Message)).await.unwrap();
    assert!(again.duplicate && again.seq == 2);
    let next = log.append(env(&s, "eng", "turn/1", Kind::Message)).await.unwrap();
    assert_eq!((next.seq, next.duplicate), (3, false));
    // A tail from 2 replays then follows.
    let mut t = log.tail(2).await.unwrap();
    assert_eq!(t.next().await.unwrap().unwrap().seq, 2);
    assert_eq!(t.next().await.unwrap().unwrap().seq, 3);
}

#[tokio::test]
async fn sessions_are_listed_with_team_and_stop_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&SqliteStore::default_path(dir.path()), true, Durability::Normal).unwrap();
    let a = SessionId::from("a");
    let log = store.open(&a, true).await.unwrap();
    log.append(env(&a, "user", "task", Kind::Task)).await.unwrap();
    log.append(env(&a, "pm", "turn/0", Kind::Message)).await.unwrap();
    log.append(env(&a, "pm", "stop", Kind::Stop)).await.unwrap();
    let b = SessionId::from("b");
    store.open(&b, true).await.unwrap().append(env(&b, "user", "task", Kind::Task)).await.unwrap();
    let list = store.sessions().await.unwrap();
    assert_eq!(list.len(), 2);
    let a_info = list.iter().find(|i| i.id == a).unwrap();
    assert_eq!(a_info.envelopes, 3);
    assert_eq!(a_info.team.as_deref(), Some("trio"));
    assert_eq!(a_info.stop.as_deref(), Some("completed: 1 rounds"));
    assert_eq!(list.iter().find(|i| i.id == b).unwrap().stop, None);
    // Unknown sessions are not created by reading.
    let err = store.open(&SessionId::from("nope"), false).await.err().unwrap();
    assert_eq!(err.kind(), LogErrorKind::NotFound);
    assert_eq!(store.sessions().await.unwrap().len(), 2);
}

#[tokio::test]
async fn export_then_import_reproduces_the_session_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&SqliteStore::default_path(dir.path()), true, Durability::Normal).unwrap();
    let s = SessionId::from("x");
    let log = store.open(&s, true).await.unwrap();
    for (i, step) in ["task", "turn/0", "turn/1"].iter().enumerate() {
        log.append(env(&s, if i == 0 { "user" } else { "pm" }, step, if i == 0 { Kind::Task } else { Kind::Message }))
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(jsonl::export(log.as_ref(), &mut out).await.unwrap(), 3);
    let text = String::from_utf8(out).unwrap();
    let envs = jsonl::parse("x.jsonl", &text).unwrap();

    let other =
        SqliteStore::open(&SqliteStore::default_path(&dir.path().join("other")), true, Durability::Normal).unwrap();
    assert_eq!(other.import(&envs).unwrap(), s);
    let copy = other.open(&s, false).await.unwrap().read_all().await.unwrap();
    let orig = log.read_all().await.unwrap();
    assert_eq!(copy.len(), 3);
    for (a, b) in copy.iter().zip(&orig) {
        assert_eq!((a.seq, &*a.env), (b.seq, &*b.env));
    }
    let err = other.import(&envs).unwrap_err();
    assert_eq!(err.kind(), LogErrorKind::Rejected);
    assert_eq!(other.open(&s, false).await.unwrap().read_all().await.unwrap().len(), 3, "nothing changed");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.db");
    std::fs::write(&path, b"this is not sqlite, just some text that is long enough to look like a header....").unwrap();
    let err = SqliteStore::open(&path, false, Durability::Normal).err().unwrap();
    assert_eq!(err.kind(), LogErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("bad.db"), "{err}");
}

#[tokio::test]
async fn a_damaged_envelope_row_is_reported_with_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = SqliteStore::default_path(dir.path());
    let s = SessionId::from("s");
    {
        let store = SqliteStore::open(&path, true, Durability::Normal).unwrap();
        let log = store.open(&s, true).await.unwrap();
        log.append(env(&s, "user", "task", Kind::Task)).await.unwrap();
        log.append(env(&s, "pm", "turn/0", Kind::Message)).await.unwrap();
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE envelopes SET json = '{\"v\":1,' WHERE seq = 2", []).unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, false, Durability::Normal).unwrap();
    let err = store.open(&s, false).await.err().unwrap();
    assert_eq!(err.kind(), LogErrorKind::Corrupt);
    assert!(err.to_string().contains("envelope 2"), "{err}");
}

#[tokio::test]
async fn concurrent_appenders_land_once_each_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = SqliteStore::default_path(dir.path());
    let s = SessionId::from("c");
    let store = SqliteStore::open(&path, true, Durability::Normal).unwrap();
    let log: Arc<dyn SessionLog> = store.open(&s, true).await.unwrap();
    let mut hs = Vec::new();
    for p in 0..8 {
        let log = log.clone();
        let s = s.clone();
        hs.push(tokio::spawn(async move {
            for i in 0..50 {
                log.append(env(&s, &format!("p{p}"), &format!("m/{i}"), Kind::Message)).await.unwrap();
                // Every peer also races to append the same collective step.
                let mut stop = env(&s, &format!("p{p}"), "same", Kind::Message);
                stop.id = roundtable_core::EnvelopeId::derive(&s, &PeerId::from("*"), "same");
                log.append(stop).await.unwrap();
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    drop(log);
    drop(store);
    let store = SqliteStore::open(&path, false, Durability::Normal).unwrap();
    let all = store.open(&s, false).await.unwrap().read_all().await.unwrap();
    assert_eq!(all.len(), 8 * 50 + 1);
    assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
}
