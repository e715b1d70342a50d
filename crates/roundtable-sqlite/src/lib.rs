//! The embedded backend: session logs persisted in SQLite, in WAL mode, in one database
//! file (`.roundtable/roundtable.db` under the working directory by default).
//!
//! # Durability
//! `append` returns only once the envelope's row is committed: once acknowledged, it
//! survives the process being killed (SIGKILL) at any instant. Appends are group
//! committed (see [`commit`](crate::commit)): an envelope is visible to the session's
//! readers in this process as soon as it is appended, its row is written by an appender
//! whose row is not yet committed, and appends that overlap share one transaction. Rows are committed in
//! sequence order, so whatever a killed process leaves is a prefix of its log that holds
//! every acknowledged envelope; an envelope a peer saw but that was never acknowledged
//! may be missing after a crash, together with everything after it.
//! The database runs with `journal_mode=WAL` and `synchronous=NORMAL`, which is durable
//! against process crashes; against power loss the last transactions may be lost (use
//! [`Durability::Full`] to sync every commit). Checkpoints (copying the WAL back into
//! the database, which syncs both files) run every second on a thread of their own,
//! never inside an append.
//!
//! # Reading
//! An open session's log is cached in memory ([`MemLog`]), so peers share one copy of
//! the history and tailing never touches the disk. Other processes (e.g.
//! `roundtable sessions` while a session runs) read the database directly; WAL lets them
//! read while the writer writes, and they see committed rows only.
//!
//! # One writer per session
//! The in-process backend runs a session's peers in one process. Two processes
//! appending to the same session would each have their own cache; teams that span
//! processes use the NATS backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use roundtable_core::blackboard::{Blackboard, BoardError};
use roundtable_core::bus::{Backend, BusError, MemParts, Presence};
use roundtable_core::log::{
    Appended, Entry, EntryStream, LogError, LogErrorKind, LogStore, MemLog, SessionInfo, SessionLog, SharedMemLog,
};
use roundtable_core::workqueue::{QueueConfig, QueueError, WorkQueue};
use roundtable_core::{Envelope, EnvelopeId, SessionId};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

mod commit;
mod reader;
mod seats;
use commit::{Checkpointer, Durable};
pub use reader::SqliteReader;
pub use seats::{SeatRelay, SqliteSeats, relay_submitted};

/// How hard the database syncs to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives process crashes (the default).
    #[default]
    Normal,
    /// Also survives power loss; slower appends.
    Full,
}

fn storage(context: &str, path: &Path, e: rusqlite::Error) -> LogError {
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) =>
        {
            LogErrorKind::Corrupt
        }
        _ => LogErrorKind::Storage,
    };
    LogError::new(kind, format!("{context} ({}): {e}", path.display()))
}

/// Session logs in one SQLite database.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    _checkpoints: Arc<Checkpointer>,
    open: Arc<Mutex<HashMap<SessionId, Arc<SqliteLog>>>>,
}

impl SqliteStore {
    /// The default database under a working directory: `DIR/.roundtable/roundtable.db`.
    pub fn default_path(dir: &Path) -> PathBuf {
        dir.join(".roundtable").join("roundtable.db")
    }

    /// Open (creating the file and its directory when `create`) a database.
    pub fn open(path: &Path, create: bool, durability: Durability) -> Result<Self, LogError> {
        if !create && !path.exists() {
            return Err(LogError::new(
                LogErrorKind::NotFound,
                format!("no session database at {} (run a session first)", path.display()),
            ));
        }
        if create && let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| LogError::new(LogErrorKind::Storage, format!("creating {}: {e}", dir.display())))?;
        }
        let flags = if create {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        let conn = Connection::open_with_flags(path, flags).map_err(|e| storage("opening the database", path, e))?;
        let sync = match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| storage("configuring", path, e))?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous={sync};
             PRAGMA wal_autocheckpoint=0;
             CREATE TABLE IF NOT EXISTS envelopes (
                 session TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 id TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 time_ms INTEGER NOT NULL,
                 json TEXT NOT NULL,
                 PRIMARY KEY (session, seq),
                 UNIQUE (session, id)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS seats (
                 session TEXT NOT NULL,
                 peer TEXT NOT NULL,
                 holder TEXT NOT NULL,
                 until_ms INTEGER NOT NULL,
                 PRIMARY KEY (session, peer)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS submitted (
                 n INTEGER PRIMARY KEY AUTOINCREMENT,
                 session TEXT NOT NULL,
                 json TEXT NOT NULL
             );"
        ))
        .map_err(|e| storage("preparing the database", path, e))?;
        let conn = Arc::new(Mutex::new(conn));
        // After the table exists: the checkpointer's connection needs the file in WAL mode.
        let checkpoints = Checkpointer::start(path)?;
        Ok(SqliteStore { path: path.to_path_buf(), conn, _checkpoints: checkpoints, open: Default::default() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self, session: &SessionId) -> Result<Vec<Envelope>, LogError> {
        let conn = self.conn.lock().expect("db lock");
        let mut stmt = conn
            .prepare_cached("SELECT seq, json FROM envelopes WHERE session = ?1 ORDER BY seq")
            .map_err(|e| storage("reading", &self.path, e))?;
        let rows = stmt
            .query_map(params![session.as_str()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| storage("reading", &self.path, e))?;
        let mut out = Vec::new();
        for (i, row) in rows.enumerate() {
            let (seq, json) = row.map_err(|e| storage("reading", &self.path, e))?;
            if seq != i as i64 + 1 {
                return Err(LogError::new(
                    LogErrorKind::Corrupt,
                    format!("session {session} in {}: sequence {} is missing", self.path.display(), i + 1),
                ));
            }
            let env = Envelope::from_json(json.as_bytes()).map_err(|e| {
                LogError::new(
                    LogErrorKind::Corrupt,
                    format!("session {session} in {}: envelope {seq}: {e}", self.path.display()),
                )
            })?;
            out.push(env);
        }
        Ok(out)
    }

    fn exists(&self, session: &SessionId) -> Result<bool, LogError> {
        let conn = self.conn.lock().expect("db lock");
        conn.query_row("SELECT 1 FROM envelopes WHERE session = ?1 LIMIT 1", params![session.as_str()], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| storage("reading", &self.path, e))
    }

    /// Write many envelopes of a new session in one transaction (JSONL import): all or
    /// nothing.
    pub fn import(&self, envs: &[Envelope]) -> Result<SessionId, LogError> {
        let session = envs
            .first()
            .map(|e| e.session.clone())
            .ok_or_else(|| LogError::new(LogErrorKind::Rejected, "nothing to import"))?;
        if self.exists(&session)? {
            return Err(LogError::new(
                LogErrorKind::Rejected,
                format!("session {session} already exists in {}", self.path.display()),
            ));
        }
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn.transaction().map_err(|e| storage("importing", &self.path, e))?;
        for (i, env) in envs.iter().enumerate() {
            tx.execute(
                commit::INSERT,
                params![
                    session.as_str(),
                    i as i64 + 1,
                    env.id.as_str(),
                    env.kind.as_str(),
                    env.time_ms as i64,
                    env.to_json()
                ],
            )
            .map_err(|e| storage("importing", &self.path, e))?;
        }
        tx.commit().map_err(|e| storage("importing", &self.path, e))?;
        Ok(session)
    }
}

#[async_trait]
impl LogStore for SqliteStore {
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError> {
        if let Some(l) = self.open.lock().expect("open lock").get(session) {
            return Ok(l.clone());
        }
        let existing = self.load(session)?;
        if existing.is_empty() && !create {
            return Err(LogError::new(
                LogErrorKind::NotFound,
                format!("no session {session} in {} (see `roundtable sessions`)", self.path.display()),
            ));
        }
        let mem = Arc::new(MemLog::new(session.clone()));
        for env in existing {
            // `load` checked the sequence; the rows are the session's and distinct.
            mem.append_now(env).map_err(|e| {
                LogError::new(LogErrorKind::Corrupt, format!("session {session} in {}: {e}", self.path.display()))
            })?;
        }
        let log = Arc::new(SqliteLog {
            durable: Arc::new(Durable::new(mem.clone(), self.conn.clone(), self.path.clone())),
            mem: SharedMemLog(mem),
            _checkpoints: self._checkpoints.clone(),
        });
        let mut open = self.open.lock().expect("open lock");
        let log = open.entry(session.clone()).or_insert(log).clone();
        Ok(log)
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError> {
        let conn = self.conn.lock().expect("db lock");
        let mut stmt = conn
            .prepare(
                "SELECT e.session, COUNT(*), MIN(e.time_ms), MAX(e.time_ms),
                        (SELECT json FROM envelopes t WHERE t.session = e.session AND t.kind = 'task' ORDER BY seq LIMIT 1),
                        (SELECT json FROM envelopes s WHERE s.session = e.session AND s.kind = 'stop' ORDER BY seq LIMIT 1)
                 FROM envelopes e GROUP BY e.session ORDER BY MIN(e.time_ms) DESC, e.session DESC",
            )
            .map_err(|e| storage("listing sessions", &self.path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(|e| storage("listing sessions", &self.path, e))?;
        let rows = rows.collect::<Result<Vec<_>, _>>().map_err(|e| storage("listing sessions", &self.path, e))?;
        drop(stmt);
        drop(conn);
        let mut out = Vec::new();
        for (id, n, first, last, task, stop) in rows {
            let session = SessionId::from(id);
            let mut info = SessionInfo::empty(session.clone());
            if let Some(json) = task
                && let Ok(env) = Envelope::from_json(json.as_bytes())
            {
                info.observe(&env);
            }
            if stop.is_some() {
                // A stop is listed only as the log's fold takes it (one that does not
                // follow from the log is not the session's): that needs the whole log.
                match self.load(&session) {
                    Ok(envs) => {
                        let entries: Vec<Entry> = envs
                            .into_iter()
                            .enumerate()
                            .map(|(i, env)| Entry { seq: i as u64 + 1, env: Arc::new(env) })
                            .collect();
                        info.stop = SessionInfo::of_entries(&session, &entries).stop;
                    }
                    Err(e) => info.stop = Some(format!("unknown (the log cannot be read: {e})")),
                }
            }
            info.envelopes = n as u64;
            info.first_ms = first as u64;
            info.last_ms = last as u64;
            out.push(info);
        }
        Ok(out)
    }
}

/// An open session of a [`SqliteStore`]: read from memory, made durable by group
/// commit (see the crate docs on durability).
struct SqliteLog {
    mem: SharedMemLog,
    durable: Arc<Durable>,
    _checkpoints: Arc<Checkpointer>,
}

#[async_trait]
impl SessionLog for SqliteLog {
    fn session(&self) -> &SessionId {
        self.mem.session()
    }
    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        if let Some(e) = self.durable.failure() {
            return Err(e);
        }
        let appended = self.durable.mem.append_now(env)?;
        // A duplicate too is acknowledged once the first append of its id is durable.
        self.durable.commit(appended.seq).await?;
        Ok(appended)
    }
    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        self.mem.read(from, max).await
    }
    async fn last_seq(&self) -> Result<u64, LogError> {
        self.mem.last_seq().await
    }
    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        self.mem.tail(from).await
    }
    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        self.mem.seq_of(id).await
    }
}

/// The embedded backend: logs in SQLite, blackboard, queue and presence in memory.
#[derive(Clone)]
pub struct SqliteBackend {
    pub store: SqliteStore,
    pub parts: MemParts,
}

impl SqliteBackend {
    pub fn new(store: SqliteStore) -> Self {
        SqliteBackend { store, parts: MemParts::default() }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn logs(&self) -> Arc<dyn LogStore> {
        Arc::new(self.store.clone())
    }
    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError> {
        Ok(self.parts.blackboard(session))
    }
    async fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Result<Arc<dyn WorkQueue>, QueueError> {
        Ok(self.parts.work_queue(session, config))
    }
    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError> {
        Ok(self.parts.presence(session))
    }
}
