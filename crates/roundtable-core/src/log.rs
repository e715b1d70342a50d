//! The session log: the truth of a session.
//!
//! # Ordering
//! A [`SessionLog`] is append-only and totally ordered: every envelope gets a sequence
//! number, starting at 1, with no gaps, and every reader sees the same sequence. Every
//! decision a peer takes is a pure function of this sequence.
//!
//! # Idempotence
//! [`SessionLog::append`] is idempotent by envelope id: appending an envelope whose id is
//! already on the log changes nothing and returns the existing sequence number with
//! `duplicate: true`. Since ids are derived from (session, peer, step), a peer that
//! re-does a step after a crash cannot produce a duplicate, and when several peers race
//! to append the same decision (a stop, an absence notice), the first one wins.
//!
//! # Delivery
//! [`SessionLog::tail`] yields every entry from a sequence number on, then waits for new
//! ones: at-least-once from the reader's point of view only in the sense that a reader
//! that restarts reads again from where it chooses; within one stream, each entry once,
//! in order. A slow reader never blocks writers (entries are shared, not copied per
//! reader).
//!
//! # Acknowledgement and durability
//! When `append` returns `Ok`, the envelope is acknowledged: it is on the log and every
//! later read sees it. A durable backend (SQLite, JetStream) has it in storage by then,
//! so a process killed with SIGKILL right after loses nothing that was acknowledged.
//! If the appending peer dies before `append` returns, the envelope may or may not be on
//! the log; the peer that re-does the step produces the same id, so either way it ends
//! up there exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::task::AtomicWaker;

use crate::envelope::{Envelope, EnvelopeId, Kind, SessionId};
use crate::error::Error;

crate::error_kind! {
    /// What went wrong with a session log.
    pub enum LogErrorKind {
        /// The session does not exist.
        NotFound => "session not found",
        /// The envelope belongs to another session or is otherwise not acceptable.
        Rejected => "envelope rejected",
        /// The storage failed (disk, database, server).
        Storage => "storage failure",
        /// The stored log is damaged (truncated, unparseable).
        Corrupt => "corrupt log",
        /// The backend cannot be reached right now; retrying may help.
        Unavailable => "backend unavailable",
    }
}

pub type LogError = Error<LogErrorKind>;

/// One envelope at its place in the log. Cloning is cheap: the envelope is shared.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub env: Arc<Envelope>,
}

/// The result of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The envelope's id was already on the log; nothing was added.
    pub duplicate: bool,
}

/// A live stream of entries.
pub type EntryStream = BoxStream<'static, Result<Entry, LogError>>;

/// Append-only, totally ordered, readable from any sequence number, with a live tail.
#[async_trait]
pub trait SessionLog: Send + Sync + 'static {
    fn session(&self) -> &SessionId;

    /// Append an envelope; idempotent by envelope id (see the module docs).
    async fn append(&self, env: Envelope) -> Result<Appended, LogError>;

    /// Up to `max` entries with `seq >= from`, in order.
    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError>;

    /// The sequence number of the last entry, 0 when empty.
    async fn last_seq(&self) -> Result<u64, LogError>;

    /// Every entry with `seq >= from`, then new ones as they are appended.
    async fn tail(&self, from: u64) -> Result<EntryStream, LogError>;

    /// The sequence number of the envelope with this id, if it is on the log.
    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError>;

    /// Every entry, in order.
    async fn read_all(&self) -> Result<Vec<Entry>, LogError> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let batch = self.read(from, 4096).await?;
            if batch.is_empty() {
                return Ok(out);
            }
            from = batch.last().map_or(from, |e| e.seq + 1);
            out.extend(batch);
        }
    }
}

/// What a store knows of one session without reading all of it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub envelopes: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    /// The team's name, from the session's task envelope.
    pub team: Option<String>,
    /// The recorded stop reason, when the session is closed.
    pub stop: Option<String>,
}

impl SessionInfo {
    /// Fold one entry into the summary (used by stores that compute it from the log).
    pub fn observe(&mut self, env: &Envelope) {
        self.envelopes += 1;
        if self.first_ms == 0 {
            self.first_ms = env.time_ms;
        }
        self.last_ms = self.last_ms.max(env.time_ms);
        match env.kind {
            Kind::Task if self.team.is_none() => {
                self.team =
                    env.body.json.as_ref().and_then(|j| j.get("team_name")).and_then(|v| v.as_str()).map(str::to_owned);
            }
            Kind::Stop if self.stop.is_none() => {
                self.stop =
                    env.body.json.as_ref().and_then(|j| j.get("reason")).and_then(|v| v.as_str()).map(str::to_owned);
            }
            _ => {}
        }
    }

    pub fn empty(id: SessionId) -> Self {
        SessionInfo { id, envelopes: 0, first_ms: 0, last_ms: 0, team: None, stop: None }
    }

    /// The summary of a whole log, with the stop its fold takes: a stop that does not
    /// follow from the log is read as the rejection it stands for
    /// ([`crate::session::as_folded`]), so a listing never shows a session stopped by it.
    /// What every store's `sessions` uses.
    pub fn of_entries(session: &SessionId, entries: &[Entry]) -> Self {
        let mut info = SessionInfo::empty(session.clone());
        for e in crate::session::as_folded(session, entries) {
            info.observe(&e.env);
        }
        info
    }
}

/// A place that holds many session logs.
#[async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// Open a session's log, creating it when `create` is true.
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError>;
    /// Every session, newest first.
    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError>;
}

// ---------------------------------------------------------------------------------------
// In-process implementation.

/// The seq of each id on a [`MemLog`]. Hashed with foldhash (seeded per process): an
/// id is 32 hex digits, which SipHash makes the bulk of the cost of growing the index,
/// a pause proportional to the log's length at every doubling.
type IdIndex = HashMap<EnvelopeId, u64, foldhash::fast::RandomState>;

/// An in-process session log: entries in an append-only vector that readers read
/// without a lock, and the wakers of the tails waiting for more. Also the
/// write-through cache of durable logs (SQLite).
pub struct MemLog {
    session: SessionId,
    entries: boxcar::Vec<Entry>,
    /// The ids on the log; its lock also serializes appends.
    ids: Mutex<IdIndex>,
    /// Entries `1..=published` are readable.
    published: AtomicU64,
    /// Tails waiting for entries past what they read; woken after each append.
    /// A tail that is gone leaves its waker held here alone.
    waiting: Mutex<Vec<Arc<AtomicWaker>>>,
    /// Called under the append lock for each new (non-duplicate) entry, before it is
    /// visible: a durable backend writes it to storage there.
    sink: Option<Box<dyn Fn(&Entry) -> Result<(), LogError> + Send + Sync>>,
}

impl MemLog {
    pub fn new(session: SessionId) -> Self {
        MemLog {
            session,
            entries: boxcar::Vec::new(),
            ids: Mutex::default(),
            published: AtomicU64::new(0),
            waiting: Mutex::default(),
            sink: None,
        }
    }

    /// A log that calls `sink` for every new entry before acknowledging it, and starts
    /// with `existing` entries (already durable).
    pub fn with_sink(
        session: SessionId,
        existing: Vec<Envelope>,
        sink: Box<dyn Fn(&Entry) -> Result<(), LogError> + Send + Sync>,
    ) -> Self {
        let entries = boxcar::Vec::with_capacity(existing.len());
        let mut ids = IdIndex::with_capacity_and_hasher(existing.len(), Default::default());
        for (i, env) in existing.into_iter().enumerate() {
            let seq = i as u64 + 1;
            ids.insert(env.id.clone(), seq);
            entries.push(Entry { seq, env: Arc::new(env) });
        }
        let n = ids.len() as u64;
        MemLog {
            session,
            entries,
            ids: Mutex::new(ids),
            published: AtomicU64::new(n),
            waiting: Mutex::default(),
            sink: Some(sink),
        }
    }

    /// Append synchronously (the in-process log never waits).
    pub fn append_now(&self, env: Envelope) -> Result<Appended, LogError> {
        if env.session != self.session {
            return Err(LogError::new(
                LogErrorKind::Rejected,
                format!("envelope of session {} appended to session {}", env.session, self.session),
            ));
        }
        let mut ids = self.ids.lock().expect("log lock");
        if let Some(&seq) = ids.get(&env.id) {
            return Ok(Appended { seq, duplicate: true });
        }
        let seq = self.published.load(Ordering::Relaxed) + 1;
        let entry = Entry { seq, env: Arc::new(env) };
        if let Some(sink) = &self.sink {
            sink(&entry)?;
        }
        ids.insert(entry.env.id.clone(), seq);
        // Appends are serialized by the lock: the entry lands at index seq - 1.
        self.entries.push(entry);
        // Under the lock: published in append order, so the value never goes backwards.
        self.published.store(seq, Ordering::Release);
        drop(ids);
        self.wake_tails();
        Ok(Appended { seq, duplicate: false })
    }

    pub fn read_now(&self, from: u64, max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        self.read_into(from, max, &mut out);
        out
    }

    /// Up to `max` entries from `from` added to `out`; how many. Never waits for a
    /// writer.
    pub fn read_into(&self, from: u64, max: usize, out: &mut impl Extend<Entry>) -> usize {
        let last = self.published.load(Ordering::Acquire) as usize;
        let start = (from.max(1) - 1) as usize;
        if start >= last {
            return 0;
        }
        let end = last.min(start.saturating_add(max));
        // Every index below the published length is written; stopping at a hole (there
        // is none) would only make a reader come back for the rest, never skip it.
        let mut read = 0;
        out.extend((start..end).map_while(|i| self.entries.get(i).cloned()).inspect(|_| read += 1));
        read
    }

    pub fn len(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wake every tail that registered since it last read (a tail's waker is taken
    /// when woken, so a tail that has not come back for more is not woken again), and
    /// forget the tails that are gone.
    fn wake_tails(&self) {
        let mut waiting = self.waiting.lock().expect("tails lock");
        waiting.retain(|w| {
            let alive = Arc::strong_count(w) > 1;
            if alive {
                w.wake();
            }
            alive
        });
    }

    /// A live tail from `from`, reading in batches so that a reader that lags behind
    /// copies many pointers at once, and never waiting for a writer.
    pub fn tail_now(self: &Arc<Self>, from: u64) -> EntryStream {
        let waker = Arc::new(AtomicWaker::new());
        self.waiting.lock().expect("tails lock").push(waker.clone());
        Box::pin(MemTail { log: self.clone(), next: from.max(1), buf: Default::default(), waker })
    }
}

/// A tail of a [`MemLog`].
struct MemTail {
    log: Arc<MemLog>,
    next: u64,
    buf: std::collections::VecDeque<Entry>,
    waker: Arc<AtomicWaker>,
}

impl futures::Stream for MemTail {
    type Item = Result<Entry, LogError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.buf.pop_front() {
                return std::task::Poll::Ready(Some(Ok(e)));
            }
            let read = this.log.read_into(this.next, 256, &mut this.buf);
            if read > 0 {
                this.next += read as u64;
                continue;
            }
            // Register, then look again: an append between the read and the register
            // is seen here, one after it wakes this waker (the waker's own atomic
            // orders the two sides).
            this.waker.register(cx.waker());
            if this.log.len() < this.next {
                return std::task::Poll::Pending;
            }
        }
    }
}

/// The in-process log behind an `Arc`, so that tails can share it.
#[derive(Clone)]
pub struct SharedMemLog(pub Arc<MemLog>);

#[async_trait]
impl SessionLog for SharedMemLog {
    fn session(&self) -> &SessionId {
        &self.0.session
    }
    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        self.0.append_now(env)
    }
    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        Ok(self.0.read_now(from, max))
    }
    async fn last_seq(&self) -> Result<u64, LogError> {
        Ok(self.0.len())
    }
    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        Ok(self.0.tail_now(from))
    }
    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        Ok(self.0.ids.lock().expect("log lock").get(id).copied())
    }
}

/// Sessions kept in memory only (tests, benchmarks, `--no-persist`).
#[derive(Default, Clone)]
pub struct MemStore {
    logs: Arc<Mutex<HashMap<SessionId, SharedMemLog>>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl LogStore for MemStore {
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError> {
        let mut logs = self.logs.lock().expect("store lock");
        if let Some(l) = logs.get(session) {
            return Ok(Arc::new(l.clone()));
        }
        if !create {
            return Err(LogError::new(LogErrorKind::NotFound, format!("no session {session}")));
        }
        let l = SharedMemLog(Arc::new(MemLog::new(session.clone())));
        logs.insert(session.clone(), l.clone());
        Ok(Arc::new(l))
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError> {
        let logs: Vec<SharedMemLog> = self.logs.lock().expect("store lock").values().cloned().collect();
        let mut out = Vec::new();
        for l in logs {
            let mut info = SessionInfo::empty(l.0.session.clone());
            for e in l.0.read_now(1, usize::MAX) {
                info.observe(&e.env);
            }
            out.push(info);
        }
        out.sort_by(|a, b| b.first_ms.cmp(&a.first_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }
}

/// JSONL export and import: one envelope per line, in log order.
pub mod jsonl {
    use super::*;
    use crate::envelope::{EnvelopeError, PeerId};

    /// Write every entry of `log` as one JSON line.
    pub async fn export(log: &dyn SessionLog, out: &mut dyn std::io::Write) -> Result<u64, LogError> {
        let mut n = 0;
        for e in log.read_all().await? {
            writeln!(out, "{}", e.env.to_json())
                .map_err(|err| LogError::new(LogErrorKind::Storage, format!("writing export: {err}")))?;
            n += 1;
        }
        Ok(n)
    }

    /// [`export`], then the seal of the chain over what was written, signed with `key`
    /// (see [`crate::chain`]), as the last line.
    pub async fn export_sealed(
        log: &dyn SessionLog,
        out: &mut dyn std::io::Write,
        key: &crate::trust::SecretKey,
    ) -> Result<u64, LogError> {
        let write = |err: std::io::Error| LogError::new(LogErrorKind::Storage, format!("writing export: {err}"));
        let mut chain = crate::chain::Chain::new(log.session());
        for e in log.read_all().await? {
            let line = e.env.to_json();
            writeln!(out, "{line}").map_err(write)?;
            chain.push_line(line.as_bytes());
        }
        writeln!(out, "{}", chain.seal(key).to_line()).map_err(write)?;
        Ok(chain.len())
    }

    /// A line of an import file that could not be read.
    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("{file}:{line}: {error}")]
    pub struct ImportError {
        pub file: String,
        pub line: usize,
        pub error: String,
    }

    /// Parse a JSONL file into envelopes, checking every line before anything is used:
    /// all envelopes belong to one session and no id repeats.
    pub fn parse(file: &str, text: &str) -> Result<Vec<Envelope>, ImportError> {
        Ok(parse_lines(file, text)?.into_iter().map(|(_, env)| env).collect())
    }

    /// [`parse`], each envelope with its line number.
    pub fn parse_lines(file: &str, text: &str) -> Result<Vec<(usize, Envelope)>, ImportError> {
        let mut out: Vec<(usize, Envelope)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let env = Envelope::from_json(line.as_bytes()).map_err(|e: EnvelopeError| ImportError {
                file: file.into(),
                line: lineno,
                error: e.to_string(),
            })?;
            if let Some((_, first)) = out.first()
                && first.session != env.session
            {
                return Err(ImportError {
                    file: file.into(),
                    line: lineno,
                    error: format!(
                        "field `session`: envelope of session {} in a file of session {}",
                        env.session, first.session
                    ),
                });
            }
            if !seen.insert(env.id.clone()) {
                return Err(ImportError {
                    file: file.into(),
                    line: lineno,
                    error: format!("field `id`: envelope {} appears twice", env.id),
                });
            }
            out.push((lineno, env));
        }
        if out.is_empty() {
            return Err(ImportError { file: file.into(), line: 0, error: "no envelopes in file".into() });
        }
        Ok(out)
    }

    /// Check that parsed lines are one session as a log would have written it, before
    /// anything is imported. A forged or edited file is refused with its line:
    ///
    /// - the session id is safe to name a session by ([`crate::envelope::check_session_id`]);
    /// - the first envelope is the session's task, from `user`, and no other is a task
    ///   (rejections of messages published before the task, `rejected/…` failures, may
    ///   come first: what a reader of a shared server reads there);
    /// - `roster(task)` gives the authors the task admits (its plan's peers): every other
    ///   envelope is from one of them, and a task with no readable roster is refused;
    /// - every id is derived from (session, author, step), or (session, `*`, step) for a
    ///   collective decision, so an id cannot be invented and an author cannot be changed;
    /// - every parent is an envelope earlier in the file;
    /// - there is at most one stop, and it follows from the envelopes before it
    ///   ([`crate::session::stop_follows`]). Envelopes may follow it — a peer's duty that was under
    ///   way when the stop landed — but a peer does one duty at a time, so at most one
    ///   per author (besides rejections of garbage, `rejected/…` failures), and none may
    ///   have the stop as a parent.
    pub fn check_session(
        file: &str,
        lines: &[(usize, Envelope)],
        roster: impl Fn(&Envelope) -> Result<std::collections::BTreeSet<PeerId>, String>,
    ) -> Result<(), ImportError> {
        let err = |line: usize, error: String| ImportError { file: file.into(), line, error };
        if lines.is_empty() {
            return Err(err(0, "no envelopes in file".into()));
        }
        // A session read from a shared server may hold messages published before its
        // task, read (and exported) as rejections: the task is the first envelope that
        // is not one.
        let rejection = |env: &Envelope| env.kind == Kind::Failure && env.step.starts_with("rejected/");
        let t = lines.iter().position(|(_, env)| !rejection(env)).unwrap_or(0);
        let (first_line, task) = &lines[t];
        crate::envelope::check_session_id(task.session.as_str())
            .map_err(|e| err(*first_line, format!("field `session`: {e}")))?;
        let user = PeerId::from(crate::session::USER);
        if task.kind != Kind::Task || task.from != user {
            return Err(err(
                *first_line,
                format!(
                    "the first envelope must be the session's task from `{user}`, not a {} from `{}`",
                    task.kind, task.from
                ),
            ));
        }
        let roster = roster(task).map_err(|e| err(*first_line, format!("field `body.json`: {e}")))?;
        let star = PeerId::from("*");
        let mut earlier = std::collections::HashSet::new();
        let mut stop: Option<&EnvelopeId> = None;
        let mut stop_at: Option<usize> = None;
        let mut after_stop = std::collections::HashSet::new();
        for (i, (line, env)) in lines.iter().enumerate() {
            let line = *line;
            let rejection = env.kind == Kind::Failure && env.step.starts_with("rejected/");
            if stop.is_some() && !rejection && !after_stop.insert(&env.from) {
                return Err(err(
                    line,
                    format!(
                        "field `kind`: a second envelope from `{}` after the stop; the stop is out of place",
                        env.from
                    ),
                ));
            }
            if i != t && env.kind == Kind::Task {
                return Err(err(line, "field `kind`: a second task; the task is the first envelope only".into()));
            }
            if i != t && !roster.contains(&env.from) {
                let names: Vec<&str> = roster.iter().map(PeerId::as_str).collect();
                return Err(err(
                    line,
                    format!("field `from`: `{}` is not a peer of this session (peers: {})", env.from, names.join(", ")),
                ));
            }
            let own = EnvelopeId::derive(&env.session, &env.from, &env.step);
            if env.id != own && env.id != EnvelopeId::derive(&env.session, &star, &env.step) {
                return Err(err(
                    line,
                    format!(
                        "field `id`: {} is not derived from the session, `from` ({}) and `step` ({:?}); the envelope was altered",
                        env.id, env.from, env.step
                    ),
                ));
            }
            if let Some(p) = env.parents.iter().find(|p| !earlier.contains(*p)) {
                return Err(err(line, format!("field `parents`: {p} is not an earlier envelope of the file")));
            }
            if let Some(s) = stop
                && env.parents.contains(s)
            {
                return Err(err(line, "field `parents`: nothing follows from the stop".into()));
            }
            if env.kind == Kind::Stop {
                if stop.is_some() {
                    return Err(err(line, "field `kind`: a second stop".into()));
                }
                stop = Some(&env.id);
                stop_at = Some(i);
            }
            earlier.insert(env.id.clone());
        }
        // The stop must follow from the envelopes before it, as every reader derives it.
        if let (Some(i), Ok(plan)) = (stop_at, crate::session::plan_of(task)) {
            let entry =
                |(k, (_, env)): (usize, &(usize, Envelope))| Entry { seq: k as u64 + 1, env: Arc::new(env.clone()) };
            let before = lines[..i].iter().enumerate().map(entry);
            let stop = entry((i, &lines[i]));
            crate::session::stop_follows(Arc::new(plan), task.session.clone(), before, &stop)
                .map_err(|why| err(lines[i].0, format!("field `body`: {why}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, Recipient};
    use futures::StreamExt;

    fn env(s: &SessionId, step: &str) -> Envelope {
        Envelope::new(s, &"p".into(), step, Kind::Message, Recipient::All, Body::text(step))
    }

    #[tokio::test]
    async fn append_is_ordered_and_idempotent() {
        let s = SessionId::from("s");
        let log = SharedMemLog(Arc::new(MemLog::new(s.clone())));
        assert_eq!(log.append(env(&s, "a")).await.unwrap(), Appended { seq: 1, duplicate: false });
        assert_eq!(log.append(env(&s, "b")).await.unwrap(), Appended { seq: 2, duplicate: false });
        assert_eq!(log.append(env(&s, "a")).await.unwrap(), Appended { seq: 1, duplicate: true });
        assert_eq!(log.last_seq().await.unwrap(), 2);
        let all = log.read(1, 10).await.unwrap();
        assert_eq!(all.iter().map(|e| &*e.env.step).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(log.read(2, 10).await.unwrap().len(), 1);
        assert!(log.read(3, 10).await.unwrap().is_empty());
        let other = env(&"t".into(), "x");
        assert_eq!(log.append(other).await.unwrap_err().kind(), LogErrorKind::Rejected);
    }

    #[tokio::test]
    async fn tail_replays_then_follows() {
        let s = SessionId::from("s");
        let log = SharedMemLog(Arc::new(MemLog::new(s.clone())));
        log.append(env(&s, "a")).await.unwrap();
        let mut t = log.tail(1).await.unwrap();
        assert_eq!(&*t.next().await.unwrap().unwrap().env.step, "a");
        let l2 = log.clone();
        let s2 = s.clone();
        tokio::spawn(async move {
            l2.append(env(&s2, "b")).await.unwrap();
        });
        let e = t.next().await.unwrap().unwrap();
        assert_eq!((e.seq, &*e.env.step), (2, "b"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appenders_and_tails_agree_on_one_gapless_order() {
        let s = SessionId::from("s");
        let log = Arc::new(MemLog::new(s.clone()));
        let tails: Vec<_> = (0..3).map(|_| log.tail_now(1)).collect();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (log, s) = (log.clone(), s.clone());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        // Every step twice, by two writers: the second append is a duplicate.
                        for step in [format!("{w}/{i}"), format!("{}/{i}", (w + 1) % 4)] {
                            log.append_now(env(&s, &step)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in tails {
            let seen: Vec<Entry> = t.take(2000).map(|e| e.unwrap()).collect().await;
            assert!(seen.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1), "gapless, in order");
            let steps: std::collections::HashSet<_> = seen.iter().map(|e| e.env.step.clone()).collect();
            assert_eq!(steps.len(), 2000, "each step once");
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(log.len(), 2000);
        let again = log.read_now(1, usize::MAX);
        assert_eq!(again.len(), 2000);
        assert!(again.iter().all(|e| log.read_now(e.seq, 1)[0].env.id == e.env.id));
    }

    #[test]
    fn jsonl_import_names_the_line() {
        let s = SessionId::from("s");
        let good = env(&s, "a").to_json();
        let text = format!("{good}\n{{\"v\":1}}\n");
        let err = jsonl::parse("x.jsonl", &text).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().starts_with("x.jsonl:2:"), "{err}");
        let dup = format!("{good}\n{good}\n");
        assert!(jsonl::parse("x.jsonl", &dup).unwrap_err().error.contains("twice"));
    }
}
