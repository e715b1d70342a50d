//! Checks of [`Blackboard`]: create-if-absent, compare-and-set under races, tombstones,
//! watch, key validation, and a random-operation comparison with a model.
//!
//! Each check takes the board of a fresh session.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use roundtable_core::blackboard::{Blackboard, BoardEntry, BoardError, BoardErrorKind, BoardOp};

use crate::{join, within};

type Watch = BoxStream<'static, Result<BoardEntry, BoardError>>;

fn ok<T>(what: &str, r: Result<T, BoardError>) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

fn expect_kind<T: std::fmt::Debug>(what: &str, r: Result<T, BoardError>, kind: BoardErrorKind) {
    match r {
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error kind ({e})"),
        Ok(v) => panic!("{what} succeeded with {v:?}; it must fail with {kind:?}"),
    }
}

async fn next_write(w: &mut Watch, what: &str) -> BoardEntry {
    match within(what, w.next()).await {
        Some(Ok(e)) => e,
        Some(Err(e)) => panic!("{what}: watch failed: {e}"),
        None => panic!("{what}: watch ended"),
    }
}

/// `create` writes only when the key is absent; the loser learns `AlreadyExists` and the
/// value stays the winner's.
pub async fn board_create_if_absent(board: Arc<dyn Blackboard>) {
    assert_eq!(ok("get of a never-written key", board.get("k").await), None);
    let rev = ok("create of an absent key", board.create("k", b"first".to_vec()).await);
    assert!(rev > 0, "revisions start at 1");
    expect_kind(
        "create of an existing key",
        board.create("k", b"second".to_vec()).await,
        BoardErrorKind::AlreadyExists,
    );
    let e = ok("get", board.get("k").await).expect("created key has a value");
    assert_eq!((e.key.as_str(), e.value.as_slice(), e.revision, e.op), ("k", &b"first"[..], rev, BoardOp::Put));
    assert_eq!(ok("keys", board.keys().await), ["k"]);

    // Racing creates of one key: exactly one wins.
    let start = Arc::new(tokio::sync::Barrier::new(6));
    let racers: Vec<_> = (0..6u8)
        .map(|i| {
            let (board, start) = (board.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                board.create("race", vec![i]).await.map(|rev| (i, rev))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for r in racers {
        match join(r).await {
            Ok(w) => winners.push(w),
            Err(e) => assert_eq!(e.kind(), BoardErrorKind::AlreadyExists, "a losing create: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "six racing creates of one key: exactly one must win, won: {winners:?}");
    let (i, rev) = winners[0];
    let e = ok("get", board.get("race").await).expect("the winner's value");
    assert_eq!((e.value, e.revision), (vec![i], rev), "the value is the winner's");
}

/// Revisions grow across the whole board, not per key, and `get` reports the revision
/// that the write returned.
pub async fn board_revisions_grow_across_keys(board: Arc<dyn Blackboard>) {
    let mut last = 0;
    for i in 0..20 {
        let key = format!("k{}", i % 4);
        let rev = ok("put", board.put(&key, vec![i]).await);
        assert!(rev > last, "write {i} got revision {rev} after {last}: revisions must grow across the board");
        last = rev;
        let e = ok("get", board.get(&key).await).expect("a written key has a value");
        assert_eq!((e.revision, e.value), (rev, vec![i]), "get({key}) after put");
    }
    assert_eq!(ok("keys", board.keys().await), ["k0", "k1", "k2", "k3"], "keys are sorted");
}

/// Two tasks update one key from the same revision at once: exactly one wins, the other
/// gets `WrongLastRevision` and succeeds after reading the new revision.
pub async fn board_cas_race(board: Arc<dyn Blackboard>) {
    let mut rev = ok("put", board.put("cas", b"0".to_vec()).await);
    for round in 0..20u8 {
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let racers: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|who| {
                let (board, start) = (board.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    (who, board.update("cas", format!("{who}/{round}").into_bytes(), rev).await)
                })
            })
            .collect();
        let mut winner = None;
        let mut loser = None;
        for r in racers {
            match join(r).await {
                (who, Ok(new_rev)) => {
                    assert!(winner.is_none(), "round {round}: both updates from revision {rev} succeeded");
                    winner = Some((who, new_rev));
                }
                (who, Err(e)) => {
                    assert_eq!(e.kind(), BoardErrorKind::WrongLastRevision, "round {round}: the loser's error: {e}");
                    loser = Some(who);
                }
            }
        }
        let (Some((winner, won_rev)), Some(loser)) = (winner, loser) else {
            panic!("round {round}: two updates from revision {rev}: exactly one must win and one lose")
        };
        assert!(won_rev > rev);
        let seen = ok("get", board.get("cas").await).expect("value");
        assert_eq!(seen.revision, won_rev, "round {round}: the loser re-reads the winner's revision");
        assert_eq!(seen.value, format!("{winner}/{round}").into_bytes(), "round {round}: the value is the winner's");
        expect_kind(
            "update from the stale revision",
            board.update("cas", vec![], rev).await,
            BoardErrorKind::WrongLastRevision,
        );
        rev =
            ok("the loser's retry", board.update("cas", format!("{loser}/{round}").into_bytes(), seen.revision).await);
    }
}

/// Increments by read-modify-CAS from several tasks at once: no increment is lost.
pub async fn board_cas_counter(board: Arc<dyn Blackboard>) {
    const TASKS: u64 = 4;
    const EACH: u64 = 25;
    ok("create", board.create("counter", b"0".to_vec()).await);
    let workers: Vec<_> = (0..TASKS)
        .map(|_| {
            let board = board.clone();
            tokio::spawn(async move {
                let mut revs = Vec::new();
                let mut conflicts = 0;
                for _ in 0..EACH {
                    loop {
                        let e = ok("get", board.get("counter").await).expect("counter exists");
                        let n: u64 = String::from_utf8(e.value).expect("utf-8").parse().expect("a number");
                        match board.update("counter", (n + 1).to_string().into_bytes(), e.revision).await {
                            Ok(rev) => {
                                revs.push(rev);
                                break;
                            }
                            Err(err) if err.kind() == BoardErrorKind::WrongLastRevision => conflicts += 1,
                            Err(err) => panic!("update failed: {err}"),
                        }
                    }
                }
                (revs, conflicts)
            })
        })
        .collect();
    let mut all_revs = Vec::new();
    for w in workers {
        all_revs.extend(join(w).await.0);
    }
    let e = ok("get", board.get("counter").await).expect("counter exists");
    assert_eq!(e.value, (TASKS * EACH).to_string().into_bytes(), "{TASKS} tasks × {EACH} CAS increments");
    all_revs.sort_unstable();
    all_revs.dedup();
    assert_eq!(all_revs.len() as u64, TASKS * EACH, "two successful updates returned one revision");
}

/// Delete writes a tombstone with its own revision: the key reads as absent, leaves
/// `keys`, can be created again, and an update from a revision before the tombstone fails.
pub async fn board_delete_and_recreate(board: Arc<dyn Blackboard>) {
    let r1 = ok("put", board.put("d", b"v1".to_vec()).await);
    ok("put", board.put("other", b"x".to_vec()).await);
    let r2 = ok("delete", board.delete("d").await);
    assert!(r2 > r1, "a delete gets a revision of its own, after the write it deletes");
    assert_eq!(ok("get of a deleted key", board.get("d").await), None);
    assert_eq!(ok("keys", board.keys().await), ["other"], "a deleted key is not listed");
    expect_kind(
        "update from the revision before the delete",
        board.update("d", b"v2".to_vec(), r1).await,
        BoardErrorKind::WrongLastRevision,
    );
    assert_eq!(ok("get", board.get("d").await), None, "a failed update writes nothing");
    let r3 = ok("create of a deleted key", board.create("d", b"v3".to_vec()).await);
    assert!(r3 > r2);
    let e = ok("get", board.get("d").await).expect("recreated");
    assert_eq!((e.value.as_slice(), e.revision, e.op), (&b"v3"[..], r3, BoardOp::Put));
    assert_eq!(ok("keys", board.keys().await), ["d", "other"]);
    expect_kind("create of a recreated key", board.create("d", vec![]).await, BoardErrorKind::AlreadyExists);
    let r4 = ok("update after recreate", board.update("d", b"v4".to_vec(), r3).await);
    assert!(r4 > r3);
}

/// A watch from a revision yields every write from it (history), then live writes, in
/// revision order, deletes included; a watch from 0 starts at the beginning.
///
/// Every write here is to a distinct key, so compaction (one value kept per key) cannot
/// excuse a missing write.
pub async fn board_watch_history_then_live(board: Arc<dyn Blackboard>) {
    let mut written: Vec<(String, u64, BoardOp)> = Vec::new();
    for i in 0..6 {
        let key = format!("h{i}");
        written.push((key.clone(), ok("put", board.put(&key, vec![i]).await), BoardOp::Put));
    }
    let from = written[2].1;
    let mut w = ok("watch", board.watch(from).await);
    let mut w0 = ok("watch(0)", board.watch(0).await);
    for (key, rev, op) in &written[2..] {
        let e = next_write(&mut w, &format!("watch({from}), history write {key}")).await;
        assert_eq!((&e.key, e.revision, e.op), (key, *rev, *op), "watch({from}) replays history in revision order");
    }
    let first = next_write(&mut w0, "watch(0), first write").await;
    assert_eq!((&first.key, first.revision), (&written[0].0, written[0].1), "watch(0) starts at the first write");

    let writer = {
        let board = board.clone();
        tokio::spawn(async move {
            let mut live = Vec::new();
            for i in 0..40u8 {
                let key = format!("live{i}");
                let rev = ok("put", board.put(&key, vec![i]).await);
                live.push((key, rev, BoardOp::Put, vec![i]));
                if i % 10 == 9 {
                    let key = format!("h{}", i / 10);
                    let rev = ok("delete", board.delete(&key).await);
                    live.push((key, rev, BoardOp::Delete, vec![]));
                }
            }
            live
        })
    };
    // Read while the writer writes, then compare with what it wrote.
    let mut watched = Vec::new();
    for i in 0..44 {
        watched.push(next_write(&mut w, &format!("watch({from}), live write #{i}")).await);
    }
    let live = join(writer).await;
    assert_eq!(live.len(), watched.len());
    for ((key, rev, op, value), e) in live.iter().zip(watched) {
        assert_eq!((&e.key, e.revision, e.op), (key, *rev, *op), "watch follows live writes in revision order");
        if *op == BoardOp::Put {
            assert_eq!(&e.value, value, "the watched value of {key}");
        }
    }
    // The watch from 0 saw the same writes in the same order.
    let mut expected: Vec<(String, u64)> = written[1..].iter().map(|(k, r, _)| (k.clone(), *r)).collect();
    expected.extend(live.iter().map(|(k, r, _, _)| (k.clone(), *r)));
    for (key, rev) in expected {
        let e = next_write(&mut w0, &format!("watch(0), write {key}")).await;
        assert_eq!((e.key, e.revision), (key, rev), "watch(0) yields every write in revision order");
    }
    // Writes that come while the watch is already waiting for them, one at a time.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let writer = {
        let board = board.clone();
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..5u8 {
                if ready_rx.recv().await.is_none() {
                    break;
                }
                // Give the watcher time to be parked on the stream (coverage, not
                // correctness: the write must arrive either way).
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                revs.push(ok("put", board.put(&format!("pong{i}"), vec![i]).await));
            }
            revs
        })
    };
    let mut pongs = Vec::new();
    for i in 0..5u8 {
        ready_tx.send(()).await.expect("writer is running");
        let e = next_write(&mut w, &format!("watch({from}), a write made while it waits (#{i})")).await;
        assert_eq!((e.key, e.value), (format!("pong{i}"), vec![i]), "the write made while waiting");
        pongs.push(e.revision);
    }
    assert_eq!(pongs, join(writer).await, "the revisions of the writes made while waiting");
}

/// Many writes to one key while a watch follows: the watch never goes back in revision,
/// and ends on the last write (a backend may skip superseded values of a key).
pub async fn board_watch_same_key_in_order(board: Arc<dyn Blackboard>) {
    let start = ok("put", board.put("hot", b"start".to_vec()).await);
    let mut w = ok("watch", board.watch(start).await);
    let writer = {
        let board = board.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..100u32 {
                last = ok("put", board.put("hot", i.to_string().into_bytes()).await);
            }
            last
        })
    };
    let mut seen = start - 1;
    loop {
        let e = next_write(&mut w, "watch, waiting for the last write (value 99)").await;
        assert!(e.revision > seen, "the watch went from revision {seen} back to {}", e.revision);
        assert_eq!((e.key.as_str(), e.op), ("hot", BoardOp::Put));
        seen = e.revision;
        if e.value == b"99" {
            break;
        }
    }
    assert_eq!(seen, join(writer).await, "the watch ends on the revision of the last write");
}

/// Keys outside letters, digits and `-_/=.`, empty, or starting or ending with `.` are
/// rejected by every operation with `InvalidKey`; nothing is written.
pub async fn board_invalid_keys_rejected(board: Arc<dyn Blackboard>) {
    let long = "k".repeat(257);
    let bad = ["", ".start", "end.", "with space", "star*", "gt>", "tab\t", "ünïcode", "semi;colon", long.as_str()];
    for key in bad {
        let kind = BoardErrorKind::InvalidKey;
        expect_kind(&format!("get({key:?})"), board.get(key).await, kind);
        expect_kind(&format!("put({key:?})"), board.put(key, vec![1]).await, kind);
        expect_kind(&format!("create({key:?})"), board.create(key, vec![1]).await, kind);
        expect_kind(&format!("update({key:?})"), board.update(key, vec![1], 0).await, kind);
        expect_kind(&format!("delete({key:?})"), board.delete(key).await, kind);
    }
    assert!(ok("keys", board.keys().await).is_empty(), "rejected writes must write nothing");
    let good = ["a", "A-b_c", "path/to/key", "x=y", "dotted.key.name", "0123456789"];
    for key in good {
        ok(&format!("put({key:?})"), board.put(key, key.as_bytes().to_vec()).await);
    }
    let mut sorted = good.to_vec();
    sorted.sort_unstable();
    assert_eq!(ok("keys", board.keys().await), sorted);
}

/// One operation of the model comparison.
#[derive(Clone, Debug)]
pub enum ModelOp {
    Get(u8),
    Put(u8, u8),
    Create(u8, u8),
    /// Update from the key's current revision (or 0 when never written).
    UpdateCurrent(u8, u8),
    /// Update from a revision that is not the key's last one.
    UpdateStale(u8, u8),
    Delete(u8),
    Keys,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    let key = 0u8..4;
    prop_oneof![
        key.clone().prop_map(ModelOp::Get),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| ModelOp::Create(k, v)),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| ModelOp::UpdateCurrent(k, v)),
        (key.clone(), any::<u8>()).prop_map(|(k, v)| ModelOp::UpdateStale(k, v)),
        key.prop_map(ModelOp::Delete),
        Just(ModelOp::Keys),
    ]
}

/// The model: per key, its value (None when deleted) and the revision of its last write.
type Model = BTreeMap<String, (Option<Vec<u8>>, u64)>;

/// Run `ops` against `board` and the model, with keys under `prefix`; the first
/// difference, as a message.
async fn run_model(board: &dyn Blackboard, prefix: &str, ops: &[ModelOp]) -> Result<(), String> {
    let key = |k: u8| format!("{prefix}/k{k}");
    let mut model = Model::new();
    let mut last_rev = 0;
    // Record a write that must have succeeded, with a revision after every earlier one.
    fn wrote(
        model: &mut Model,
        last_rev: &mut u64,
        k: String,
        v: Option<Vec<u8>>,
        r: Result<u64, BoardError>,
    ) -> Result<(), String> {
        let rev = r.map_err(|e| format!("the write failed: {e}"))?;
        if rev <= *last_rev {
            return Err(format!("the write got revision {rev}, not after {last_rev}"));
        }
        *last_rev = rev;
        model.insert(k, (v, rev));
        Ok(())
    }
    let refused = |what: &str, r: Result<u64, BoardError>, kind: BoardErrorKind| match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(format!("{what}: expected {kind:?}, got {e}")),
        Ok(rev) => Err(format!("{what}: expected {kind:?}, but it wrote revision {rev}")),
    };
    for (i, op) in ops.iter().enumerate() {
        let at = format!("op {i} {op:?}");
        match *op {
            ModelOp::Get(k) => {
                let got = board.get(&key(k)).await.map_err(|e| format!("{at}: {e}"))?;
                let want = model.get(&key(k)).and_then(|(v, r)| v.clone().map(|v| (v, *r)));
                let got = got.map(|e| (e.value, e.revision));
                if got != want {
                    return Err(format!("{at}: got {got:?}, the model has {want:?}"));
                }
            }
            ModelOp::Put(k, v) => {
                let r = board.put(&key(k), vec![v]).await;
                wrote(&mut model, &mut last_rev, key(k), Some(vec![v]), r).map_err(|e| format!("{at}: {e}"))?;
            }
            ModelOp::Create(k, v) => {
                let r = board.create(&key(k), vec![v]).await;
                if matches!(model.get(&key(k)), Some((Some(_), _))) {
                    refused(&at, r, BoardErrorKind::AlreadyExists)?;
                } else {
                    wrote(&mut model, &mut last_rev, key(k), Some(vec![v]), r).map_err(|e| format!("{at}: {e}"))?;
                }
            }
            ModelOp::UpdateCurrent(k, v) => {
                let expected = model.get(&key(k)).map_or(0, |(_, r)| *r);
                let r = board.update(&key(k), vec![v], expected).await;
                wrote(&mut model, &mut last_rev, key(k), Some(vec![v]), r).map_err(|e| format!("{at}: {e}"))?;
            }
            ModelOp::UpdateStale(k, v) => {
                // A revision that was never this key's last: last + 1 when it exists
                // (never a revision of this key yet), or the newest board revision + 1.
                let expected = model.get(&key(k)).map_or(last_rev + 1, |(_, r)| r + 1);
                refused(&at, board.update(&key(k), vec![v], expected).await, BoardErrorKind::WrongLastRevision)?;
            }
            ModelOp::Delete(k) => {
                let r = board.delete(&key(k)).await;
                wrote(&mut model, &mut last_rev, key(k), None, r).map_err(|e| format!("{at}: {e}"))?;
            }
            ModelOp::Keys => {
                let got: Vec<String> = board
                    .keys()
                    .await
                    .map_err(|e| format!("{at}: {e}"))?
                    .into_iter()
                    .filter(|k| k.starts_with(&format!("{prefix}/")))
                    .collect();
                let want: Vec<String> =
                    model.iter().filter(|(_, (v, _))| v.is_some()).map(|(k, _)| k.clone()).collect();
                if got != want {
                    return Err(format!("{at}: keys {got:?}, the model has {want:?}"));
                }
            }
        }
    }
    Ok(())
}

/// Random sequences of operations on a few keys, compared step by step with a model (a
/// `BTreeMap`); a failing sequence is shrunk to a small one before it is reported.
///
/// Each case writes under a prefix of its own, so the cases share the board.
pub async fn board_matches_model(board: Arc<dyn Blackboard>) {
    let strategy = proptest::collection::vec(model_op(), 1..40);
    let mut runner = TestRunner::new(Config { cases: 48, failure_persistence: None, ..Config::default() });
    let mut case = 0u32;
    let mut prefix = || {
        case += 1;
        format!("case{case}")
    };
    for _ in 0..48 {
        let mut tree = strategy.new_tree(&mut runner).expect("generate a case");
        let Err(first) = run_model(&*board, &prefix(), &tree.current()).await else {
            continue;
        };
        // Shrink: simplify while it fails, complicate back when it passes (proptest's loop).
        let (mut failing, mut why) = (tree.current(), first);
        let mut passed = false;
        for _ in 0..512 {
            if !(if passed { tree.complicate() } else { tree.simplify() }) {
                break;
            }
            match run_model(&*board, &prefix(), &tree.current()).await {
                Ok(()) => passed = true,
                Err(e) => {
                    (failing, why) = (tree.current(), e);
                    passed = false;
                }
            }
        }
        panic!("the board differs from the model: {why}\nminimal operations ({} of them): {failing:#?}", failing.len());
    }
}
