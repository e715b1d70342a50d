//! Acknowledged means committed: a process appending from many tasks at once (so that
//! appends share transactions) is killed with SIGKILL, and every envelope whose append
//! had returned is in the database, in a log without gaps.
//!
//! The appending process is this test binary run again with `KILL_CHILD_DB` set, which
//! makes `appender_process` (a no-op otherwise) append until it is killed, printing the
//! id of each envelope once its append has returned.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use roundtable_core::log::{LogStore, SessionLog};
use roundtable_core::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_sqlite::{Durability, SqliteStore};

const CHILD_DB: &str = "KILL_CHILD_DB";
const APPENDERS: usize = 16;

fn session() -> SessionId {
    SessionId::from("killed")
}

#[test]
fn appender_process() {
    let Some(db) = std::env::var_os(CHILD_DB) else {
        return; // run as the child of `sigkill_loses_no_acknowledged_append` only
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = SqliteStore::open(std::path::Path::new(&db), true, Durability::Normal).unwrap();
        let log: Arc<dyn SessionLog> = store.open(&session(), true).await.unwrap();
        let mut tasks = Vec::new();
        for p in 0..APPENDERS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let s = session();
                let peer = PeerId::from(format!("p{p}"));
                for i in 0.. {
                    let step = format!("m/{i}");
                    let env = Envelope::new(
                        &s,
                        &peer,
                        step.as_str(),
                        Kind::Message,
                        Recipient::All,
                        Body::text(step.clone()),
                    );
                    let id = env.id.clone();
                    log.append(env).await.unwrap();
                    println!("{id}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn sigkill_loses_no_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteStore::default_path(dir.path());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "appender_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = HashSet::new();
    // The test harness prints a header line first; ids are 32 hex digits.
    let is_id = |l: &str| l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit());
    while acked.len() < 2000 {
        let line = lines.next().expect("the appender stopped early").unwrap();
        if is_id(&line) {
            acked.insert(line);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // What the child printed before it died was acknowledged before it died.
    for line in lines {
        let line = line.unwrap();
        if is_id(&line) {
            acked.insert(line);
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stored = rt.block_on(async {
        let store = SqliteStore::open(&db, false, Durability::Normal).unwrap();
        // Reopening checks that the sequence numbers have no gap and every row parses.
        store.open(&session(), false).await.unwrap().read_all().await.unwrap()
    });
    let ids: HashSet<String> = stored.iter().map(|e| e.env.id.as_str().to_owned()).collect();
    assert_eq!(ids.len(), stored.len(), "no envelope is stored twice");
    let lost: Vec<&String> = acked.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged envelopes lost, e.g. {:?}", lost.len(), acked.len(), lost.first());
    // Each appender's envelopes are a prefix of its steps: a later step never landed
    // without an earlier one (rows are committed in log order).
    for p in 0..APPENDERS {
        let steps: Vec<u64> = stored
            .iter()
            .filter(|e| e.env.from.as_str() == format!("p{p}"))
            .map(|e| e.env.step.trim_start_matches("m/").parse().unwrap())
            .collect();
        assert!(steps.iter().enumerate().all(|(i, &s)| s == i as u64), "appender p{p} has a gap: {steps:?}");
    }
}
