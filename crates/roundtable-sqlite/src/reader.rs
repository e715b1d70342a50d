//! Read-only access to a database that other processes write (the web view, metrics):
//! reads go to the database rather than to an in-memory cache, and tails poll it for
//! new rows, so a session that `roundtable run` is writing in another process shows up
//! live. WAL lets these reads run while the writer writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use roundtable_core::log::{Entry, EntryStream, LogError, LogErrorKind, LogStore, SessionInfo, SessionLog};
use roundtable_core::{Envelope, EnvelopeId, SessionId};
use rusqlite::{OptionalExtension, params};

use crate::{Durability, SqliteStore, storage};

/// The session logs of a database, read-only, following other writers.
#[derive(Clone)]
pub struct SqliteReader {
    path: PathBuf,
    poll: Duration,
    /// Opened on first use: the database may not exist yet when a viewer starts.
    store: Arc<Mutex<Option<SqliteStore>>>,
}

impl SqliteReader {
    /// A reader of the database at `path` whose tails look for new rows every `poll`.
    pub fn new(path: &Path, poll: Duration) -> Self {
        SqliteReader { path: path.to_path_buf(), poll, store: Arc::new(Mutex::new(None)) }
    }

    fn store(&self) -> Result<Option<SqliteStore>, LogError> {
        let mut s = self.store.lock().expect("reader lock");
        if s.is_none() && self.path.exists() {
            *s = Some(SqliteStore::open(&self.path, false, Durability::Normal)?);
        }
        Ok(s.clone())
    }
}

#[async_trait]
impl LogStore for SqliteReader {
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError> {
        if create {
            return Err(LogError::new(LogErrorKind::Rejected, "this view of the database is read-only"));
        }
        let not_found = || {
            LogError::new(
                LogErrorKind::NotFound,
                format!("no session {session} in {} (see `roundtable sessions`)", self.path.display()),
            )
        };
        let store = self.store()?.ok_or_else(not_found)?;
        if !store.exists(session)? {
            return Err(not_found());
        }
        Ok(Arc::new(ReaderLog { store, session: session.clone(), poll: self.poll }))
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError> {
        match self.store()? {
            Some(s) => s.sessions().await,
            None => Ok(Vec::new()),
        }
    }
}

/// One session's log as the database has it now.
struct ReaderLog {
    store: SqliteStore,
    session: SessionId,
    poll: Duration,
}

impl ReaderLog {
    fn read_rows(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        let path = &self.store.path;
        let conn = self.store.conn.lock().expect("db lock");
        let mut stmt = conn
            .prepare_cached("SELECT seq, json FROM envelopes WHERE session = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3")
            .map_err(|e| storage("reading", path, e))?;
        let rows = stmt
            .query_map(params![self.session.as_str(), from.max(1) as i64, max.min(i64::MAX as usize) as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| storage("reading", path, e))?;
        let mut out = Vec::new();
        for (expect, row) in (from.max(1)..).zip(rows) {
            let (seq, json) = row.map_err(|e| storage("reading", path, e))?;
            let seq = seq as u64;
            if seq != expect {
                return Err(LogError::new(
                    LogErrorKind::Corrupt,
                    format!("session {} in {}: sequence {expect} is missing", self.session, path.display()),
                ));
            }
            let env = Envelope::from_json(json.as_bytes()).map_err(|e| {
                LogError::new(
                    LogErrorKind::Corrupt,
                    format!("session {} in {}: envelope {seq}: {e}", self.session, path.display()),
                )
            })?;
            out.push(Entry { seq, env: Arc::new(env) });
        }
        Ok(out)
    }
}

#[async_trait]
impl SessionLog for ReaderLog {
    fn session(&self) -> &SessionId {
        &self.session
    }

    async fn append(&self, _env: Envelope) -> Result<roundtable_core::log::Appended, LogError> {
        Err(LogError::new(LogErrorKind::Rejected, "this view of the database is read-only"))
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        self.read_rows(from, max)
    }

    async fn last_seq(&self) -> Result<u64, LogError> {
        let conn = self.store.conn.lock().expect("db lock");
        conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM envelopes WHERE session = ?1",
            params![self.session.as_str()],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n as u64)
        .map_err(|e| storage("reading", &self.store.path, e))
    }

    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        struct St {
            log: ReaderLog,
            next: u64,
            buf: std::collections::VecDeque<Entry>,
        }
        let log = ReaderLog { store: self.store.clone(), session: self.session.clone(), poll: self.poll };
        let st = St { log, next: from.max(1), buf: Default::default() };
        Ok(Box::pin(futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.buf.pop_front() {
                    return Some((Ok(e), st));
                }
                match st.log.read_rows(st.next, 1024) {
                    Ok(batch) if batch.is_empty() => tokio::time::sleep(st.log.poll).await,
                    Ok(batch) => {
                        st.next = batch.last().map_or(st.next, |e| e.seq + 1);
                        st.buf.extend(batch);
                    }
                    Err(e) => return Some((Err(e), st)),
                }
            }
        })))
    }

    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        let conn = self.store.conn.lock().expect("db lock");
        conn.query_row(
            "SELECT seq FROM envelopes WHERE session = ?1 AND id = ?2",
            params![self.session.as_str(), id.as_str()],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|s| s.map(|s| s as u64))
        .map_err(|e| storage("reading", &self.store.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use roundtable_core::{Body, Kind, PeerId, Recipient};

    fn env(s: &SessionId, step: &str) -> Envelope {
        Envelope::new(s, &PeerId::from("p"), step, Kind::Message, Recipient::All, Body::text(step))
    }

    #[tokio::test]
    async fn follows_rows_written_through_another_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let reader = SqliteReader::new(&path, Duration::from_millis(10));
        assert!(reader.sessions().await.unwrap().is_empty(), "no database yet: no sessions");
        let s = SessionId::from("s1");
        assert_eq!(reader.open(&s, false).await.err().unwrap().kind(), LogErrorKind::NotFound);

        // The writer: another store with its own connection and cache, as another process has.
        let writer = SqliteStore::open(&path, true, Durability::Normal).unwrap();
        let wlog = writer.open(&s, true).await.unwrap();
        wlog.append(env(&s, "a")).await.unwrap();

        let rlog = reader.open(&s, false).await.unwrap();
        assert!(reader.open(&s, true).await.is_err(), "read-only");
        assert!(rlog.append(env(&s, "x")).await.is_err(), "read-only");
        let mut tail = rlog.tail(1).await.unwrap();
        assert_eq!(&*tail.next().await.unwrap().unwrap().env.step, "a");
        wlog.append(env(&s, "b")).await.unwrap();
        let e = tail.next().await.unwrap().unwrap();
        assert_eq!((e.seq, &*e.env.step), (2, "b"));
        assert_eq!(rlog.last_seq().await.unwrap(), 2);
        assert_eq!(rlog.seq_of(&env(&s, "b").id).await.unwrap(), Some(2));
        assert_eq!(rlog.read(2, 10).await.unwrap().len(), 1);
        assert_eq!(reader.sessions().await.unwrap()[0].envelopes, 2);
    }
}
