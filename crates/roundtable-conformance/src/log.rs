//! Checks of [`SessionLog`] and [`LogStore`]: total order without gaps, idempotent
//! appends, reads from any sequence number, a live tail, concurrent appenders.
//!
//! Each log check takes the log of a fresh session.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use roundtable_core::envelope::{Body, Envelope, EnvelopeId, SessionId};
use roundtable_core::log::{Appended, Entry, EntryStream, LogErrorKind, LogStore, SessionLog};

use crate::{envelope, fresh_session, join, within};

async fn append(log: &dyn SessionLog, env: Envelope) -> Appended {
    let id = env.id.clone();
    log.append(env).await.unwrap_or_else(|e| panic!("append of {id} failed: {e}"))
}

async fn read_all(log: &dyn SessionLog) -> Vec<Entry> {
    log.read_all().await.unwrap_or_else(|e| panic!("read_all failed: {e}"))
}

async fn last_seq(log: &dyn SessionLog) -> u64 {
    log.last_seq().await.unwrap_or_else(|e| panic!("last_seq failed: {e}"))
}

/// The next entry of a tail, which must come within the deadline.
async fn next_entry(tail: &mut EntryStream, what: &str) -> Entry {
    match within(what, tail.next()).await {
        Some(Ok(e)) => e,
        Some(Err(e)) => panic!("{what}: tail failed: {e}"),
        None => panic!("{what}: tail ended"),
    }
}

fn ids(entries: &[Entry]) -> Vec<EnvelopeId> {
    entries.iter().map(|e| e.env.id.clone()).collect()
}

fn assert_numbered_from(entries: &[Entry], first: u64, what: &str) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, first + i as u64, "{what}: entry {i} has seq {} (sequence numbers must not skip)", e.seq);
    }
}

/// Appends get sequence numbers 1, 2, 3, … with no gaps; every read sees that order and
/// the envelopes unchanged.
pub async fn log_total_order(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    assert_eq!(last_seq(&*log).await, 0, "a new session's log is empty");
    assert!(read_all(&*log).await.is_empty(), "a new session's log is empty");
    let mut sent = Vec::new();
    for i in 1..=30u64 {
        let env = envelope(&s, ["a", "b", "c"][i as usize % 3], &format!("turn/{i}"))
            .with_round(i as u32)
            .with_parents(sent.last().map(|e: &Envelope| vec![e.id.clone()]).unwrap_or_default());
        let got = append(&*log, env.clone()).await;
        assert_eq!(got, Appended { seq: i, duplicate: false }, "append #{i}");
        assert_eq!(last_seq(&*log).await, i, "last_seq after append #{i}");
        sent.push(env);
    }
    let all = read_all(&*log).await;
    assert_numbered_from(&all, 1, "read_all");
    let got: Vec<&Envelope> = all.iter().map(|e| &*e.env).collect();
    let want: Vec<&Envelope> = sent.iter().collect();
    assert_eq!(got, want, "read_all must return the envelopes as appended, in append order");
}

/// Appending an envelope whose id is on the log adds nothing and returns the original
/// sequence number with `duplicate: true`, however long ago it was appended.
pub async fn log_append_idempotent(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    let first = envelope(&s, "a", "step/1");
    assert_eq!(append(&*log, first.clone()).await, Appended { seq: 1, duplicate: false });
    assert_eq!(append(&*log, first.clone()).await, Appended { seq: 1, duplicate: true }, "immediate duplicate");
    for i in 2..=20 {
        append(&*log, envelope(&s, "a", &format!("step/{i}"))).await;
    }
    // The same id with a different body (a step re-done after a crash): still the original.
    let mut redo = first.clone();
    redo.body = Body::text("a different answer the second time");
    assert_eq!(append(&*log, redo).await, Appended { seq: 1, duplicate: true }, "old duplicate");
    let mid = envelope(&s, "a", "step/10");
    assert_eq!(append(&*log, mid).await, Appended { seq: 10, duplicate: true });
    assert_eq!(last_seq(&*log).await, 20, "duplicates must not be appended");
    let all = read_all(&*log).await;
    assert_eq!(all.len(), 20);
    assert_eq!(*all[0].env, first, "the first append's envelope stays on the log");
}

/// `read(from, max)` returns up to `max` entries with `seq >= from`, in order.
pub async fn log_read_from(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    let mut sent = Vec::new();
    for i in 1..=25 {
        let env = envelope(&s, "a", &format!("r/{i}"));
        sent.push(env.id.clone());
        append(&*log, env).await;
    }
    let read = |from: u64, max: usize| {
        let log = log.clone();
        async move { log.read(from, max).await.unwrap_or_else(|e| panic!("read({from}, {max}) failed: {e}")) }
    };
    let page = read(1, 10).await;
    assert_numbered_from(&page, 1, "read(1, 10)");
    assert_eq!(ids(&page), sent[0..10], "read(1, 10)");
    let page = read(11, 10).await;
    assert_numbered_from(&page, 11, "read(11, 10)");
    assert_eq!(ids(&page), sent[10..20], "read(11, 10)");
    let page = read(21, 10).await;
    assert_eq!(ids(&page), sent[20..25], "read(21, 10): only 5 are left");
    assert_numbered_from(&page, 21, "read(21, 10)");
    let page = read(0, 3).await;
    assert_eq!(ids(&page), sent[0..3], "read(0, 3): every seq is >= 0");
    assert_numbered_from(&page, 1, "read(0, 3)");
    assert_eq!(ids(&read(25, 100).await), sent[24..25], "read(25, 100): the last entry");
    assert!(read(26, 100).await.is_empty(), "read past the end is empty");
    assert!(read(1_000_000, 100).await.is_empty(), "read far past the end is empty");
}

/// A tail yields every entry from its start, then each new entry as it is appended, in
/// order and once; tails from different places do not disturb each other.
pub async fn log_tail_replays_then_follows(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    let mut sent = Vec::new();
    for i in 1..=5 {
        let env = envelope(&s, "a", &format!("t/{i}"));
        sent.push(env.id.clone());
        append(&*log, env).await;
    }
    let mut from_start = log.tail(1).await.expect("tail(1)");
    let mut from_4 = log.tail(4).await.expect("tail(4)");
    let mut from_future = log.tail(8).await.expect("tail(8)");
    for i in 1..=5u64 {
        let e = next_entry(&mut from_start, &format!("tail(1), history entry {i}")).await;
        assert_eq!((e.seq, &e.env.id), (i, &sent[i as usize - 1]), "tail(1) replays history in order");
    }
    for i in 4..=5u64 {
        let e = next_entry(&mut from_4, &format!("tail(4), history entry {i}")).await;
        assert_eq!((e.seq, &e.env.id), (i, &sent[i as usize - 1]), "tail(4) starts at seq 4");
    }
    // Live appends from another task, while the tails are waiting.
    let writer = {
        let (log, s) = (log.clone(), s.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 6..=60 {
                let env = envelope(&s, "b", &format!("t/{i}"));
                ids.push(env.id.clone());
                append(&*log, env).await;
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            ids
        })
    };
    let mut live = Vec::new();
    for i in 6..=60u64 {
        let a = next_entry(&mut from_start, &format!("tail(1), live entry {i}")).await;
        let b = next_entry(&mut from_4, &format!("tail(4), live entry {i}")).await;
        assert_eq!(a.seq, i, "tail(1) must follow live appends in order without gaps");
        assert_eq!(b.seq, i, "tail(4) must follow live appends in order without gaps");
        assert_eq!(a.env.id, b.env.id, "two tails see the same envelope at seq {i}");
        live.push(a.env.id.clone());
        if i >= 8 {
            let c = next_entry(&mut from_future, &format!("tail(8), entry {i}")).await;
            assert_eq!((c.seq, &c.env.id), (i, &a.env.id), "tail(8) starts at seq 8, even if it opened before it");
        }
    }
    assert_eq!(live, join(writer).await, "tails see live appends in append order");
    // A duplicate adds nothing, so no tail yields anything more.
    append(&*log, envelope(&s, "a", "t/1")).await;
    let one_more = envelope(&s, "a", "t/61");
    let id = one_more.id.clone();
    append(&*log, one_more).await;
    let e = next_entry(&mut from_start, "tail(1), the entry after a duplicate").await;
    assert_eq!((e.seq, &e.env.id), (61, &id), "a duplicate append must not reach tails");
    // Appends that come while the tail is already waiting for them, one at a time.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let writer = {
        let (log, s) = (log.clone(), s.clone());
        tokio::spawn(async move {
            for i in 62..=66 {
                if ready_rx.recv().await.is_none() {
                    break;
                }
                // Give the reader time to be parked on the tail (coverage, not
                // correctness: the entry must arrive either way).
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                append(&*log, envelope(&s, "c", &format!("t/{i}"))).await;
            }
        })
    };
    for i in 62..=66u64 {
        ready_tx.send(()).await.expect("writer is running");
        let e = next_entry(&mut from_start, &format!("tail(1), an append made while it waits (seq {i})")).await;
        assert_eq!((e.seq, &*e.env.step), (i, format!("t/{i}").as_str()), "the append made while waiting");
    }
    join(writer).await;
}

/// Many tasks appending at once: every envelope lands exactly once, sequence numbers are
/// distinct and without gaps, each appender's own appends keep their order, and racing
/// appends of one id all get the one sequence number.
pub async fn log_concurrent_appenders(log: Arc<dyn SessionLog>) {
    const TASKS: usize = 8;
    const OWN: usize = 40;
    const SHARED: usize = 10;
    let s = log.session().clone();
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let (log, s, start) = (log.clone(), s.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let mut own = Vec::new();
            let mut shared = Vec::new();
            for i in 0..OWN {
                let env = envelope(&s, &format!("p{t}"), &format!("own/{i}"));
                let id = env.id.clone();
                own.push((id, append(&*log, env).await));
                if i % 4 == 0 {
                    // Every task appends the same "decision" envelopes: one wins each.
                    let env = envelope(&s, "shared", &format!("decision/{}", i / 4));
                    let id = env.id.clone();
                    shared.push((id, append(&*log, env).await));
                }
            }
            (own, shared)
        }));
    }
    let mut by_id: HashMap<EnvelopeId, u64> = HashMap::new();
    let mut shared_seqs: HashMap<EnvelopeId, (u64, usize)> = HashMap::new();
    for (t, h) in handles.into_iter().enumerate() {
        let (own, shared) = join(h).await;
        let seqs: Vec<u64> = own.iter().map(|(_, a)| a.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "task {t}: its appends must keep their order: {seqs:?}");
        for (id, a) in own {
            assert!(!a.duplicate, "task {t}: envelope {id} is new, yet the log called it a duplicate");
            assert!(by_id.insert(id.clone(), a.seq).is_none());
        }
        for (id, a) in shared {
            let (seq, new) = shared_seqs.entry(id.clone()).or_insert((a.seq, 0));
            assert_eq!(*seq, a.seq, "every append of {id} must return the same seq");
            if !a.duplicate {
                *new += 1;
            }
        }
    }
    for (id, (seq, new)) in &shared_seqs {
        assert_eq!(*new, 1, "{id} was appended by {TASKS} tasks at once: exactly one append must be new");
        by_id.insert(id.clone(), *seq);
    }
    let total = TASKS * OWN + SHARED;
    assert_eq!(shared_seqs.len(), SHARED);
    assert_eq!(last_seq(&*log).await, total as u64, "every envelope once, nothing else");
    let all = read_all(&*log).await;
    assert_numbered_from(&all, 1, "read_all after concurrent appends");
    let distinct: BTreeSet<&EnvelopeId> = all.iter().map(|e| &e.env.id).collect();
    assert_eq!(distinct.len(), total, "no envelope may appear twice");
    for e in &all {
        assert_eq!(by_id.get(&e.env.id), Some(&e.seq), "entry {} ({}) is not where append said", e.seq, e.env.id);
        let seq_of = log.seq_of(&e.env.id).await.expect("seq_of");
        assert_eq!(seq_of, Some(e.seq), "seq_of({})", e.env.id);
    }
}

/// An envelope of another session is rejected and nothing is appended.
pub async fn log_session_mismatch_rejected(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    append(&*log, envelope(&s, "a", "one")).await;
    let other = SessionId::from(format!("{s}-other"));
    let stray = envelope(&other, "a", "two");
    let id = stray.id.clone();
    match log.append(stray).await {
        Err(e) => assert_eq!(e.kind(), LogErrorKind::Rejected, "wrong error kind for another session's envelope: {e}"),
        Ok(a) => panic!("an envelope of session {other} was appended to {s}: {a:?}"),
    }
    assert_eq!(last_seq(&*log).await, 1, "a rejected envelope must not be appended");
    assert_eq!(log.seq_of(&id).await.expect("seq_of"), None);
}

/// `seq_of` finds an envelope's sequence number by id, and only for envelopes on the log.
pub async fn log_seq_of(log: Arc<dyn SessionLog>) {
    let s = log.session().clone();
    let a = envelope(&s, "a", "x");
    let b = envelope(&s, "b", "x");
    assert_eq!(log.seq_of(&a.id).await.expect("seq_of"), None, "nothing is on a new log");
    append(&*log, a.clone()).await;
    for i in 0..10 {
        append(&*log, envelope(&s, "c", &format!("fill/{i}"))).await;
    }
    append(&*log, b.clone()).await;
    assert_eq!(log.seq_of(&a.id).await.expect("seq_of"), Some(1));
    assert_eq!(log.seq_of(&b.id).await.expect("seq_of"), Some(12));
    let absent = envelope(&s, "a", "never appended");
    assert_eq!(log.seq_of(&absent.id).await.expect("seq_of"), None);
}

fn task_envelope(s: &SessionId, team: &str) -> Envelope {
    roundtable_core::session::opening_envelope(s, "the task", serde_json::json!({ "team_name": team }))
}

/// A store opens a session only when asked to create it or when it exists; every handle
/// on a session is the same log; the session list summarizes each one, newest first.
///
/// The store may hold other sessions (a shared server): only the ones made here are
/// checked.
pub async fn store_open_and_list(store: Arc<dyn LogStore>) {
    let older = fresh_session("store-older");
    let newer = fresh_session("store-newer");
    match store.open(&older, false).await {
        Err(e) => assert_eq!(e.kind(), LogErrorKind::NotFound, "opening a missing session without create: {e}"),
        Ok(_) => panic!("open({older}, create = false) opened a session that does not exist"),
    }
    let a = store.open(&older, true).await.expect("open with create");
    assert_eq!(a.session(), &older);
    let mut task = task_envelope(&older, "alpha");
    task.time_ms -= 10_000;
    append(&*a, task).await;
    let mut msg = envelope(&older, "p", "m1");
    msg.time_ms -= 9_000;
    append(&*a, msg).await;

    let again = store.open(&older, false).await.expect("reopen an existing session");
    assert_eq!(last_seq(&*again).await, 2, "a second handle sees what the first appended");
    append(&*again, envelope(&older, "p", "m2")).await;
    assert_eq!(last_seq(&*a).await, 3, "the first handle sees what the second appended");

    let b = store.open(&newer, true).await.expect("open with create");
    append(&*b, task_envelope(&newer, "beta")).await;
    assert_eq!(last_seq(&*a).await, 3, "sessions are separate logs");

    let list = store.sessions().await.expect("sessions");
    let pos = |s: &SessionId| list.iter().position(|i| &i.id == s);
    let (Some(pa), Some(pb)) = (pos(&older), pos(&newer)) else {
        panic!("sessions() must list {older} and {newer}: {list:?}")
    };
    assert!(pb < pa, "sessions() lists the newest first: {list:?}");
    assert_eq!(list[pa].envelopes, 3, "{:?}", list[pa]);
    assert_eq!(list[pa].team.as_deref(), Some("alpha"), "{:?}", list[pa]);
    assert_eq!(list[pb].envelopes, 1, "{:?}", list[pb]);
    assert_eq!(list[pb].team.as_deref(), Some("beta"), "{:?}", list[pb]);
}
