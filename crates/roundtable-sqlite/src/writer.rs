//! Group commit: one thread writes every open session's new entries to the database,
//! many appends per transaction.
//!
//! An append is published in memory first (so the next peer can read it at once) and
//! acknowledged only when the transaction holding its row has committed. The writer
//! commits rows in sequence order, so an acknowledged entry never depends on one the
//! database lacks: a session killed at any instant reopens with a prefix of its log
//! that holds every acknowledged entry. Appends that arrive while a transaction is
//! being written share the next one; a lone append costs one transaction, written off
//! the appender's thread.
//!
//! A transaction that fails (disk full, a damaged file) fails the sessions it held: the
//! entries past the last commit stay visible in this process but are not durable, so
//! every waiting and later append of those sessions reports the storage error, and a
//! reopened session ends at its last commit, as after a crash.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use roundtable_core::log::{Entry, LogError, LogErrorKind, MemLog};
use rusqlite::{Connection, TransactionBehavior, params};

use crate::storage;

/// The insert every append becomes (one cached statement).
pub(crate) const INSERT: &str =
    "INSERT INTO envelopes (session, seq, id, kind, time_ms, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// One open session as the writer sees it: its log in memory and how far the database
/// has it.
pub(crate) struct Durable {
    pub(crate) mem: Arc<MemLog>,
    /// The last sequence number committed to the database.
    committed: tokio::sync::watch::Sender<u64>,
    /// Set once, when a transaction holding this session's rows failed.
    failed: OnceLock<(LogErrorKind, String)>,
    /// On the writer's queue (so an append queues the session only once per batch).
    queued: AtomicBool,
}

impl Durable {
    pub(crate) fn new(mem: Arc<MemLog>) -> Self {
        let committed = mem.len();
        Durable {
            mem,
            committed: tokio::sync::watch::Sender::new(committed),
            failed: OnceLock::new(),
            queued: AtomicBool::new(false),
        }
    }

    pub(crate) fn failure(&self) -> Option<LogError> {
        self.failed.get().map(|(kind, message)| LogError::new(*kind, message.clone()))
    }

    /// Wait until `seq` is committed (or the session failed).
    pub(crate) async fn committed(&self, seq: u64) -> Result<(), LogError> {
        if *self.committed.borrow() >= seq {
            return Ok(());
        }
        let mut rx = self.committed.subscribe();
        // The sender lives as long as `self`, so the wait ends only by the condition.
        let _ = rx.wait_for(|&c| c >= seq || self.failed.get().is_some()).await;
        if *rx.borrow() >= seq {
            return Ok(());
        }
        Err(self.failure().unwrap_or_else(|| LogError::new(LogErrorKind::Storage, "the session's writer stopped")))
    }
}

struct Queue {
    sessions: Vec<Arc<Durable>>,
    /// Every handle is gone: write what is queued, then stop.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The handle the store and its logs hold; the writer thread stops (after writing what
/// it was given) when the last one is dropped.
pub(crate) struct Writer {
    shared: Arc<Shared>,
}

impl Writer {
    pub(crate) fn start(conn: Arc<Mutex<Connection>>, path: PathBuf) -> Result<Writer, LogError> {
        let shared =
            Arc::new(Shared { queue: Mutex::new(Queue { sessions: Vec::new(), closed: false }), wake: Condvar::new() });
        let thread_shared = shared.clone();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("roundtable-sqlite-writer".into())
            .spawn(move || run(&thread_shared, &conn, &thread_path))
            .map_err(|e| {
                LogError::new(LogErrorKind::Storage, format!("starting the writer of {}: {e}", path.display()))
            })?;
        Ok(Writer { shared })
    }

    /// Have the writer commit `session`'s entries past its last commit.
    pub(crate) fn schedule(&self, session: &Arc<Durable>) {
        // Cleared by the writer before it reads the session's entries, so an entry
        // published after that read finds the flag down and queues the session again.
        if session.queued.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut q = self.shared.queue.lock().expect("writer queue");
        q.sessions.push(session.clone());
        drop(q);
        self.shared.wake.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("writer queue").closed = true;
        self.shared.wake.notify_one();
    }
}

fn run(shared: &Shared, conn: &Mutex<Connection>, path: &Path) {
    let mut json = Vec::with_capacity(1024);
    let mut batch: Vec<Arc<Durable>> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    // Per session of the batch: where its entries end in `entries`, and its last seq.
    let mut spans: Vec<(usize, u64)> = Vec::new();
    loop {
        {
            let mut q = shared.queue.lock().expect("writer queue");
            while q.sessions.is_empty() && !q.closed {
                q = shared.wake.wait(q).expect("writer queue");
            }
            if q.sessions.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut q.sessions);
        }
        entries.clear();
        spans.clear();
        for d in &batch {
            d.queued.store(false, Ordering::SeqCst);
            if d.failed.get().is_some() {
                // Its rows past the last commit stay out; reopening ends the log there.
                spans.push((entries.len(), 0));
                continue;
            }
            let from = *d.committed.borrow() + 1;
            d.mem.read_into(from, usize::MAX, &mut entries);
            spans.push((entries.len(), entries.last().map_or(from - 1, |e| e.seq)));
        }
        let result = {
            let mut conn = conn.lock().expect("db lock");
            write(&mut conn, &entries, &mut json, path)
        };
        let mut start = 0;
        for (d, &(end, last)) in batch.iter().zip(&spans) {
            match &result {
                Ok(()) => {
                    d.committed.send_if_modified(|c| {
                        let grew = last > *c;
                        *c = (*c).max(last);
                        grew
                    });
                }
                Err(e) if end > start => {
                    let _ = d.failed.set((e.kind(), e.message().to_owned()));
                    d.committed.send_modify(|_| {});
                }
                Err(_) => {}
            }
            start = end;
        }
        batch.clear();
    }
}

/// Every entry in one transaction.
fn write(conn: &mut Connection, entries: &[Entry], json: &mut Vec<u8>, path: &Path) -> Result<(), LogError> {
    if entries.is_empty() {
        return Ok(());
    }
    let sql = |e| storage("appending", path, e);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    {
        let mut stmt = tx.prepare_cached(INSERT).map_err(sql)?;
        for e in entries {
            json.clear();
            serde_json::to_writer(&mut *json, &*e.env).map_err(|err| encoding(path, e, &err))?;
            let text = std::str::from_utf8(json).map_err(|err| encoding(path, e, &err))?;
            stmt.execute(params![
                e.env.session.as_str(),
                e.seq as i64,
                e.env.id.as_str(),
                e.env.kind.as_str(),
                e.env.time_ms as i64,
                text
            ])
            .map_err(sql)?;
        }
    }
    tx.commit().map_err(sql)
}

fn encoding(path: &Path, e: &Entry, err: &dyn std::fmt::Display) -> LogError {
    LogError::new(
        LogErrorKind::Storage,
        format!(
            "appending ({}): envelope {} of session {} does not encode: {err}",
            path.display(),
            e.seq,
            e.env.session
        ),
    )
}
