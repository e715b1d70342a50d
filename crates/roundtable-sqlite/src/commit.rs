//! Group commit without a writer thread: the appenders take turns leading.
//!
//! An append is published in memory first, so the next peer can read it at once, and
//! acknowledged only once a transaction holding its row has committed. An appender
//! whose row is not yet committed leads a commit if nobody is leading one: it writes
//! every row published and not yet committed, in sequence order, in one transaction,
//! on its own thread (no hand-off to another thread, whose wake-up on a busy machine
//! would cost more than the commit). Before leading, it yields to the tasks its append
//! woke for as long as they keep appending, so that one commit holds their rows too
//! (with model calls between appends, that is a single yield). Appenders that publish
//! while a commit is being
//! written wait for it to end; the first of them to find its row still uncommitted
//! leads the next one, which holds all of their rows. So a lone append costs one
//! transaction, as a write-through would, and appends that overlap share one.
//!
//! Rows are committed in sequence order, so an acknowledged entry never depends on one
//! the database lacks: a session killed at any instant reopens with a prefix of its log
//! that holds every acknowledged entry.
//!
//! A transaction that fails (disk full, a damaged file) fails the session: the entries
//! past the last commit stay visible in this process but are not durable, so every
//! waiting and later append reports the storage error, and a reopened session ends at
//! its last commit, as after a crash.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use roundtable_core::log::{Entry, LogError, LogErrorKind, MemLog};
use rusqlite::{Connection, TransactionBehavior, params};

use crate::storage;

/// The insert every append becomes (one cached statement).
pub(crate) const INSERT: &str =
    "INSERT INTO envelopes (session, seq, id, kind, time_ms, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// How many times an appender lets others append before it leads a commit.
const MAX_YIELDS: usize = 16;

/// What the leader of a commit owns.
struct Lead {
    /// The last sequence number committed (the truth; `committed` below follows it).
    committed: u64,
    /// Reused for every commit: the rows being written and one envelope's JSON.
    entries: Vec<Entry>,
    json: Vec<u8>,
}

/// One open session's log in memory and how far the database has it.
pub(crate) struct Durable {
    pub(crate) mem: Arc<MemLog>,
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Held by the appender leading a commit; never waited for.
    lead: Mutex<Lead>,
    /// The last sequence number committed, published after the leader lets go, for the
    /// appenders waiting on it.
    committed: tokio::sync::watch::Sender<u64>,
    /// Set once, when a commit failed.
    failed: OnceLock<(LogErrorKind, String)>,
}

impl Durable {
    pub(crate) fn new(mem: Arc<MemLog>, conn: Arc<Mutex<Connection>>, path: PathBuf) -> Self {
        let committed = mem.len();
        Durable {
            mem,
            conn,
            path,
            lead: Mutex::new(Lead { committed, entries: Vec::new(), json: Vec::with_capacity(1024) }),
            committed: tokio::sync::watch::Sender::new(committed),
            failed: OnceLock::new(),
        }
    }

    pub(crate) fn failure(&self) -> Option<LogError> {
        self.failed.get().map(|(kind, message)| LogError::new(*kind, message.clone()))
    }

    /// Return once `seq` is committed, leading commits while nobody else does.
    pub(crate) async fn commit(&self, seq: u64) -> Result<(), LogError> {
        let mut rx = self.committed.subscribe();
        // Let the tasks this append woke (the next peer, whom the scheduler runs next on
        // this thread) go first, for as long as they keep appending: their rows then
        // share one commit, and the commit, which holds this thread, comes once rather
        // than once per row. With nobody else appending, that is one yield.
        let mut seen = self.mem.len();
        for _ in 0..MAX_YIELDS {
            tokio::task::yield_now().await;
            let now = self.mem.len();
            if now == seen || *self.committed.borrow() >= seq {
                break;
            }
            seen = now;
        }
        loop {
            // Subscribed before looking: a commit that ends after this look is seen by
            // `changed` below.
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(e) = self.failure() {
                return Err(e);
            }
            if let Ok(mut lead) = self.lead.try_lock() {
                let done = self.lead_commit(&mut lead);
                drop(lead);
                // Published after letting go, so an appender that found the lead taken
                // is woken after it is free again.
                match done {
                    // Always a wake-up, even when this commit had nothing to write: an
                    // appender may have found the lead taken after this leader read.
                    Ok(last) => self.committed.send_modify(|c| *c = (*c).max(last)),
                    Err(e) => {
                        let _ = self.failed.set((e.kind(), e.message().to_owned()));
                        self.committed.send_modify(|_| {});
                    }
                }
                continue;
            }
            // Someone leads: wait for the end of that commit, then look again.
            if rx.changed().await.is_err() {
                return Err(LogError::new(LogErrorKind::Storage, "the session's log was closed"));
            }
        }
    }

    /// Commit every published row past the last commit; the new last commit.
    fn lead_commit(&self, lead: &mut Lead) -> Result<u64, LogError> {
        if self.failed.get().is_some() {
            return Ok(lead.committed);
        }
        let Lead { committed, entries, json } = lead;
        entries.clear();
        self.mem.read_into(*committed + 1, usize::MAX, entries);
        let Some(last) = entries.last().map(|e| e.seq) else {
            return Ok(*committed);
        };
        let mut conn = self.conn.lock().expect("db lock");
        write(&mut conn, entries, json, &self.path)?;
        drop(conn);
        *committed = last;
        entries.clear();
        Ok(last)
    }
}

/// Every entry in one transaction.
fn write(conn: &mut Connection, entries: &[Entry], json: &mut Vec<u8>, path: &Path) -> Result<(), LogError> {
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

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Checkpoints on a connection and a thread of their own, so that appends never wait
/// for one: a checkpoint syncs the WAL and the database file (milliseconds, tens of
/// them on a busy disk), and SQLite's automatic checkpoint would run it inside the
/// commit that crosses the WAL's size limit. Passive: it never blocks a writer. Stops
/// when the last handle (the store and its logs hold one each) is dropped.
pub(crate) struct Checkpointer {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path) -> Result<Arc<Checkpointer>, LogError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| storage("opening the database for checkpoints", path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| storage("configuring", path, e))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let at = path.to_path_buf();
        std::thread::Builder::new()
            .name("roundtable-sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(db = %at.display(), error = %e, "checkpoint");
                    }
                }
            })
            .map_err(|e| {
                LogError::new(LogErrorKind::Storage, format!("starting the checkpoints of {}: {e}", path.display()))
            })?;
        Ok(Arc::new(Checkpointer { _stop: stop }))
    }
}
