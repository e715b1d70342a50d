//! Human seats on the embedded backend: seat leases, and the way a person's answers
//! reach a log that another process writes.
//!
//! One process writes a session's log (see the crate docs). A person who takes a human
//! peer's seat (`roundtable join`) runs that peer in a process of their own, so its
//! envelopes are *submitted*: written to the `submitted` table of the same database,
//! from which the writing process appends them ([`relay_submitted`]) after checking
//! that they are the session's and authored by one of its human peers, with the id
//! derived from their step. The seat holder's log ([`SeatRelay`]) reads the database
//! like any reader and acknowledges an append once the envelope is on the log. Leases
//! are rows of the `seats` table, taken in a transaction, so two people cannot both
//! hold a seat.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use roundtable_core::human::{SeatError, SeatLease};
use roundtable_core::log::{Appended, Entry, EntryStream, LogError, LogErrorKind, SessionLog};
use roundtable_core::{Envelope, EnvelopeId, PeerId, SessionId};
use rusqlite::{OptionalExtension, params};

use crate::{SqliteStore, storage};

fn now_ms() -> i64 {
    roundtable_core::envelope::now_ms() as i64
}

/// The seat leases of one session, in its database.
pub struct SqliteSeats {
    pub store: SqliteStore,
    pub session: SessionId,
}

#[async_trait]
impl SeatLease for SqliteSeats {
    async fn claim(&self, peer: &PeerId, holder: &str, lease: Duration) -> Result<(), SeatError> {
        let mut conn = self.store.conn.lock().expect("db lock");
        let err = |e: rusqlite::Error| SeatError::Store(format!("seat lease in {}: {e}", self.store.path.display()));
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        let held: Option<(String, i64)> = tx
            .query_row(
                "SELECT holder, until_ms FROM seats WHERE session = ?1 AND peer = ?2",
                params![self.session.as_str(), peer.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        if let Some((h, until)) = held
            && h != holder
            && until > now_ms()
        {
            return Err(SeatError::Taken(format!(
                "seat `{peer}` is taken: someone else joined as {peer} (only one person may hold a seat; it frees itself within {} s of its holder leaving)",
                lease.as_secs().max(1)
            )));
        }
        tx.execute(
            "INSERT INTO seats (session, peer, holder, until_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (session, peer) DO UPDATE SET holder = ?3, until_ms = ?4",
            params![self.session.as_str(), peer.as_str(), holder, now_ms() + lease.as_millis() as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    async fn release(&self, peer: &PeerId, holder: &str) {
        let conn = self.store.conn.lock().expect("db lock");
        let _ = conn.execute(
            "DELETE FROM seats WHERE session = ?1 AND peer = ?2 AND holder = ?3",
            params![self.session.as_str(), peer.as_str(), holder],
        );
    }
}

impl SqliteStore {
    /// Submit an envelope for the process that writes `session` to append.
    pub fn submit(&self, env: &Envelope) -> Result<(), LogError> {
        let conn = self.conn.lock().expect("db lock");
        conn.execute(
            "INSERT INTO submitted (session, json) VALUES (?1, ?2)",
            params![env.session.as_str(), env.to_json()],
        )
        .map_err(|e| storage("submitting", &self.path, e))?;
        Ok(())
    }

    /// Take the envelopes submitted for `session`, oldest first (each is taken once).
    pub fn take_submitted(&self, session: &SessionId) -> Result<Vec<String>, LogError> {
        let mut conn = self.conn.lock().expect("db lock");
        let err = |e| storage("reading submissions", &self.path, e);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        let rows: Vec<(i64, String)> = {
            let mut stmt =
                tx.prepare_cached("SELECT n, json FROM submitted WHERE session = ?1 ORDER BY n").map_err(err)?;
            stmt.query_map(params![session.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?
        };
        if let Some((last, _)) = rows.last() {
            tx.execute("DELETE FROM submitted WHERE session = ?1 AND n <= ?2", params![session.as_str(), last])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(rows.into_iter().map(|(_, j)| j).collect())
    }
}

/// Why a submitted envelope is not appended (it is dropped with a warning).
fn refuse(json: &str, session: &SessionId, seats: &BTreeSet<PeerId>) -> Result<Envelope, String> {
    let env = Envelope::from_json(json.as_bytes()).map_err(|e| format!("not an envelope: {e}"))?;
    if env.session != *session {
        return Err(format!("of session {}, not {session}", env.session));
    }
    if !seats.contains(&env.from) {
        return Err(format!("from {}, which is not a human peer of this session", env.from));
    }
    if env.id != EnvelopeId::derive(session, &env.from, &env.step) {
        return Err(format!("its id {} is not derived from its author and step", env.id));
    }
    Ok(env)
}

/// Append what the holders of `seats` (the session's human peers) submitted, until the
/// task is dropped: run by the process that writes the session, while it runs.
pub async fn relay_submitted(store: SqliteStore, log: Arc<dyn SessionLog>, seats: BTreeSet<PeerId>, poll: Duration) {
    let session = log.session().clone();
    loop {
        match store.take_submitted(&session) {
            Ok(rows) => {
                for json in rows {
                    match refuse(&json, &session, &seats) {
                        Ok(env) => {
                            if let Err(e) = log.append(env).await {
                                tracing::warn!(%session, error = %e, "a person's answer could not be appended");
                            }
                        }
                        Err(why) => tracing::warn!(%session, %why, "submitted envelope refused"),
                    }
                }
            }
            Err(e) => tracing::warn!(%session, error = %e, "reading submitted envelopes failed"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// The log as the holder of a human seat sees it: read from the database, appended to
/// by submission; an append is acknowledged once the writing process has put it on the
/// log (a duplicate when its id was already there).
pub struct SeatRelay {
    pub store: SqliteStore,
    pub reader: Arc<dyn SessionLog>,
    pub poll: Duration,
}

#[async_trait]
impl SessionLog for SeatRelay {
    fn session(&self) -> &SessionId {
        self.reader.session()
    }

    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        if let Some(seq) = self.reader.seq_of(&env.id).await? {
            return Ok(Appended { seq, duplicate: true });
        }
        let id = env.id.clone();
        self.store.submit(&env)?;
        loop {
            if let Some(seq) = self.reader.seq_of(&id).await? {
                return Ok(Appended { seq, duplicate: false });
            }
            // A session that stopped takes nothing more (nor does a writer that is gone):
            // the stop is what the peer waits for anyway.
            let last = self.reader.last_seq().await?;
            let recent = self.reader.read(last.saturating_sub(16).max(1), 17).await?;
            if recent.iter().any(|e| e.env.kind == roundtable_core::Kind::Stop) {
                return Err(LogError::new(LogErrorKind::Rejected, "the session stopped before this answer landed"));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        self.reader.read(from, max).await
    }

    async fn last_seq(&self) -> Result<u64, LogError> {
        self.reader.last_seq().await
    }

    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        self.reader.tail(from).await
    }

    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        self.reader.seq_of(id).await
    }
}
