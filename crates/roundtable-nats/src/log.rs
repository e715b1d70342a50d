//! The session log as a JetStream stream.
//!
//! One stream per session, `RT_<session>`, file storage. Each envelope is published on a
//! subject of its own, `rt.<session>.log.<author>.<envelope id>`, with the header
//! `Nats-Expected-Last-Subject-Sequence: 0`: the server refuses a second message on that
//! subject, so an envelope id lands on the log at most once **for the whole life of the
//! stream**, atomically, whichever process appends it (a `Nats-Msg-Id` would only
//! deduplicate within a 2-minute window). A refused append looks up the original's
//! sequence number by subject: `seq_of` is one server lookup, not a scan.
//!
//! The log's sequence number is the stream sequence: 1, 2, 3, … with no gaps, since
//! nothing is ever deleted from the stream. `append` returns when the server has stored
//! the envelope (the publish acknowledgement), so an acknowledged append survives a
//! server restart.
//!
//! # Authors in subjects
//! The second-to-last token of an envelope's subject is its author: the token of its
//! `from` when its id is the author's own (derived from the session, the author and the
//! step), and [`SHARED`] (`~`) for the task and for decisions any peer may record (the
//! stop, an absence, a closed round: their ids do not depend on who records them, so
//! the first of them wins on one subject). A reader rejects an envelope on another
//! author's subject, so a server that lets each peer publish only on
//! `rt.*.log.<its id>.>` and `rt.*.log.~.>` (what `roundtable nats-config` writes)
//! enforces authorship itself: a peer cannot even put a message where another's words
//! go. Readers still read every author with one wildcard (the stream takes
//! `rt.<session>.log.>`).
//!
//! Streams made before authors were in subjects (their subjects are
//! `rt.<session>.log.*`, one token per id) keep that layout: a log opened on one
//! publishes and checks subjects the old way, so an old session is read, resumed and
//! exported as before, without the server's help on authorship. New streams always
//! take the new layout; nothing is migrated.
//!
//! Reads and tails use ordered push consumers from a start sequence (ephemeral, no
//! acks, recreated by the client if a message is missed); a read of a few entries
//! fetches them one by one instead of creating a consumer.
//!
//! # Messages nobody should have sent
//! Anyone allowed to publish on the session's subjects can put anything on the stream: not
//! JSON, an envelope of another version, one larger than
//! [`MAX_ENVELOPE_BYTES`](roundtable_core::envelope::MAX_ENVELOPE_BYTES), one of
//! another session, or one on a subject that is not its id's (which would defeat the
//! one-append-per-id rule). Such a message still takes its place in the sequence, so
//! every reader reads it — and reads, instead of it, the same `failure` envelope: from
//! `nats`, step `rejected/<seq>`, the reason in its text and in `json.reason`, its time
//! the server's. It is derived from the stored message alone, so it is the same for
//! every reader, in every process, at every read: the rejection is recorded once, at
//! the place of the message, and the session goes on.
//!
//! A stop is one more such message when it does not follow from the log before it
//! ([`roundtable_core::session::stop_follows`]: the reader derives the decision from
//! the session's plan and the entries before the stop, and the stop must be exactly
//! that), or when the session stopped already. It is checked once per process, when it
//! is taken, and rejected at its place like garbage: it does not hold the stop's id, so
//! the honest stop still lands on the id's next subject.
//!
//! A tool listing (`tool_list`) is one more when a process running the team could not
//! have recorded it ([`roundtable_core::tool::listing_rejected`]: a server the plan does
//! not declare, an author not granted it, another step or id): like a forged stop it
//! is rejected at its place and does not hold the listing's id.
//!
//! A collective decision only some peer may record at its place — a work-queue or
//! contract-net task's result (its holder's or awardee's), a summary of older rounds
//! (the summarizer's, when due) — is checked the same way, against the session's fold
//! that the reader keeps for sessions that have such decisions
//! ([`roundtable_core::session::SessionState::may_record`]): one that may not be
//! recorded is rejected at its place and does not hold its id.
//!
//! # Squatted subjects and copies
//! A message published on the subject of an envelope that is not there yet would take
//! that subject for good. So an envelope may also land on the next subjects of its id,
//! `<id>-1` … `<id>-7`: an appender whose subject holds a rejected message tries the
//! next one, and every appender walks them in the same order, stopping at the first
//! that is free (it appends) or holds this very envelope (a duplicate). When junk holds
//! all of them — anyone allowed on the shared subjects (`~`) can fill every subject of
//! a future stop, absence or task — the envelope goes on the last subject after the
//! last message there, on condition that it is still the last (an appender that finds
//! this envelope there has a duplicate). Junk on a future step therefore stalls no
//! one. And since anyone may publish a copy of an envelope
//! already on the log (or a second message on its subject, without the header), the
//! readers of a process take messages strictly in sequence order: an envelope whose id
//! is already on the log is rejected at its place as a second copy, the same way in
//! every process.
//!
//! # Signed envelopes
//! When the session's task names the peers' public keys (see
//! [`roundtable_core::trust`]), the task fixes the roster and an envelope also has to
//! be signed by its own author with a key on it: one that is not signed, signed by a
//! key off the roster, or signed by one peer in another's name is read, like garbage,
//! as the `failure` at its place, and so can never take a step, a stop, a vote or the
//! final answer. A log signs what it appends with the keys of the peers its process
//! runs ([`NatsLogStore::with_signers`]). Each process verifies each message once:
//! the outcome is kept by sequence number and shared by every reader and tail of the
//! log opened from the same store.
//!
//! # A session starts at its task
//! Anyone allowed on a session's subjects can publish there before its task: garbage,
//! an envelope in a peer's name, a task of their own. A log read as a session's
//! ([`NatsLogStore::for_sessions`], what the `roundtable` binary opens) rejects every
//! message at its place until the first that is the session's task — at the task's id
//! (on one of its subjects), from `user`, signed by a peer of the roster its plan names
//! when it names one (a task without a plan, as other kinds of sessions open with,
//! names none) — and the roster is that task's. So
//! junk before the task neither keeps a session from starting nor leaves it read as
//! unsigned, and nothing published before the task counts. Which message is the task
//! is decided in sequence order like everything else, the same in every process; a
//! self-consistent task of someone else's that lands first is the session's task (a
//! peer whose team file differs then refuses it, see `roundtable peer`), and the honest
//! one is a second copy of its id. Peers post the task when it is not on the log, not
//! when the log is empty. A log not read as a session's (the conformance suite's: any
//! sequence of envelopes) takes its roster from its first message only.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_trait::async_trait;
use futures::StreamExt;
use roundtable_core::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::{Appended, Entry, EntryStream, LogError, LogErrorKind, LogStore, SessionInfo, SessionLog};

use roundtable_core::session::{SessionState, TASK_STEP, USER, plan_of, stop_follows};
use roundtable_core::team::TeamPlan;
use roundtable_core::trust::{Roster, Signers};

use crate::{is_unavailable, token};

fn log_error(what: &str, err: impl std::fmt::Display) -> LogError {
    let kind = if is_unavailable(&err) { LogErrorKind::Unavailable } else { LogErrorKind::Storage };
    LogError::new(kind, format!("{what}: {err}"))
}

fn stream_name(session: &SessionId) -> String {
    format!("RT_{}", token(session.as_str()))
}

fn subject_prefix(session: &SessionId) -> String {
    format!("rt.{}.log.", token(session.as_str()))
}

fn stream_config(session: &SessionId, replicas: usize) -> stream::Config {
    stream::Config {
        num_replicas: replicas,
        name: stream_name(session),
        description: Some(session.as_str().to_owned()),
        subjects: vec![format!("{}>", subject_prefix(session))],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // Envelopes are at most 1 MiB of JSON (see MAX_ENVELOPE_BYTES); headers on top.
        max_message_size: -1,
        ..Default::default()
    }
}

fn stream_missing(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The peer id of the `failure` envelopes that stand for rejected messages.
pub const REJECTED_FROM: &str = "nats";

/// The envelope a reader sees at `seq` for the stored message (`subject`, `payload`,
/// stored at `time_ns`): the envelope itself, or the `failure` that records why it was
/// rejected (see the module docs). `roster` is the session's, when its task names one.
#[allow(clippy::too_many_arguments)]
fn entry_of(
    session: &SessionId,
    prefix: &str,
    layout: Layout,
    roster: Option<&Roster>,
    seq: u64,
    subject: &str,
    payload: &[u8],
    time_ns: i128,
) -> Entry {
    let checked =
        check(session, prefix, layout, subject, payload).and_then(|env| match roster.map(|r| r.verify(&env)) {
            Some(Err(why)) => Err(format!("rejected as not the session's: {why}")),
            _ => Ok(env),
        });
    let env = match checked {
        Ok(env) => env,
        Err(reason) => rejected(session, seq, subject, payload.len(), &reason, time_ns),
    };
    Entry { seq, env: Arc::new(env) }
}

/// The roster fixed by a session's first message, if it is a task whose plan names one.
fn roster_of(session: &SessionId, prefix: &str, layout: Layout, subject: &str, payload: &[u8]) -> Option<Roster> {
    let task = check(session, prefix, layout, subject, payload).ok().filter(|e| e.kind == Kind::Task)?;
    let plan = plan_of(&task).ok()?;
    let roster = Roster::of_plan(&plan).ok()??;
    // The task itself must be signed by a peer on the roster it names.
    roster.verify(&task).ok().map(|()| roster)
}

/// Whether the stored message is the task of a session log read as one (see
/// [`NatsLogStore::for_sessions`]), and the roster it fixes; if not, why. The task is
/// the envelope at the task's id (so on its subjects), from `user`, signed by one of
/// the peers its plan names keys for when it names them (a task without a plan names
/// no roster).
fn session_task(
    session: &SessionId,
    prefix: &str,
    layout: Layout,
    subject: &str,
    payload: &[u8],
) -> Result<(Envelope, Option<Roster>), String> {
    let env = check(session, prefix, layout, subject, payload)?;
    let task_id = EnvelopeId::derive(session, &PeerId::from(USER), TASK_STEP);
    if env.kind != Kind::Task || env.id != task_id {
        return Err(format!(
            "a {} from {} before the session's task (a session's log starts with its task)",
            env.kind, env.from
        ));
    }
    // A task without a plan (what other kinds of sessions open with, such as
    // `roundtable worktest`'s) names no roster.
    let roster = match plan_of(&env) {
        Ok(plan) => Roster::of_plan(&plan)?,
        Err(_) => None,
    };
    if let Some(r) = &roster {
        r.verify(&env).map_err(|why| format!("a task that is not its roster's: {why}"))?;
    }
    Ok((env, roster))
}

/// What the readers of one session's log in this process share: every entry read so
/// far, in order from the first, with the roster its task fixed and the ids already
/// on the log. Messages are checked in sequence order, each once per process, so that
/// whether a message repeats an id already on the log is decided the same way by every
/// reader: the first copy counts, a later one is rejected at its place.
struct Reader {
    session: SessionId,
    prefix: String,
    layout: Layout,
    /// Whether the log is read as a session's (see [`NatsLogStore::for_sessions`]).
    sessions: bool,
    js: jetstream::Context,
    stream: stream::Stream,
    state: std::sync::Mutex<ReadState>,
}

#[derive(Default)]
struct ReadState {
    /// The entries at sequence numbers 1, 2, … as read (envelopes or rejections).
    entries: Vec<Arc<Envelope>>,
    /// Where each accepted envelope's id first is.
    ids: std::collections::HashMap<EnvelopeId, u64>,
    /// The roster of the task at sequence number 1, if it names one.
    roster: Option<Roster>,
    /// The plan of the task at sequence number 1, if it is one: stops are re-derived
    /// from it (see [`roundtable_core::session::stop_follows`]).
    plan: Option<Arc<TeamPlan>>,
    /// Where the stop that followed from the log is, once one has.
    stopped: Option<u64>,
    /// Where the session's task is, once taken (logs read as sessions' only).
    task_at: Option<u64>,
    /// The session's fold of every entry taken, kept only for protocols with collective
    /// decisions that only some peer may record ([`SessionState::checks_writers`]).
    fold: Option<SessionState>,
}

impl ReadState {
    fn cached(&self, seq: u64) -> Option<Arc<Envelope>> {
        usize::try_from(seq).ok().and_then(|i| i.checked_sub(1)).and_then(|i| self.entries.get(i)).cloned()
    }

    /// Take the message at `seq`, the one after the last taken. `sessions`: the log is
    /// read as a session's, which starts at its task (see [`NatsLogStore::for_sessions`]).
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        session: &SessionId,
        prefix: &str,
        layout: Layout,
        sessions: bool,
        seq: u64,
        subject: &str,
        payload: &[u8],
        time_ns: i128,
    ) {
        if seq != self.entries.len() as u64 + 1 {
            return;
        }
        if sessions && self.task_at.is_none() {
            // Before the task nothing is the session's: every message is rejected at its
            // place until the first that is the session's task, whose roster then holds
            // for everything after it.
            let env = match session_task(session, prefix, layout, subject, payload) {
                Ok((task, roster)) => {
                    self.task_at = Some(seq);
                    self.roster = roster;
                    self.plan = plan_of(&task).ok().map(Arc::new);
                    self.ids.insert(task.id.clone(), seq);
                    Arc::new(task)
                }
                Err(why) => Arc::new(rejected(session, seq, subject, payload.len(), &why, time_ns)),
            };
            self.entries.push(env);
            self.start_fold(session);
            return;
        }
        if !sessions && seq == 1 {
            self.roster = roster_of(session, prefix, layout, subject, payload);
        }
        let mut entry = entry_of(session, prefix, layout, self.roster.as_ref(), seq, subject, payload, time_ns);
        if !sessions && seq == 1 && entry.env.kind == Kind::Task {
            self.plan = plan_of(&entry.env).ok().map(Arc::new);
        }
        if entry.env.from.as_str() != REJECTED_FROM || !entry.env.step.starts_with("rejected/") {
            let why = match self.ids.get(&entry.env.id) {
                Some(first) => {
                    Some(format!("a second copy of envelope {} (the first is at log position {first})", entry.env.id))
                }
                None => self
                    .stop_rejected(session, &entry)
                    .or_else(|| self.listing_rejected(&entry))
                    .or_else(|| self.collective_rejected(session, &entry)),
            };
            match why {
                Some(why) => entry.env = Arc::new(rejected(session, seq, subject, payload.len(), &why, time_ns)),
                None => {
                    if entry.env.kind == Kind::Stop {
                        self.stopped = Some(seq);
                    }
                    self.ids.insert(entry.env.id.clone(), seq);
                }
            }
        }
        self.entries.push(entry.env.clone());
        if !sessions && seq == 1 {
            self.start_fold(session);
        } else if let Some(fold) = &mut self.fold {
            fold.take(entry);
        }
    }

    /// Start folding the session once its plan is known, over every entry taken so far,
    /// when its protocol has collective decisions only some peer may record.
    fn start_fold(&mut self, session: &SessionId) {
        let Some(plan) = self.plan.clone().filter(|p| SessionState::checks_writers(p)) else {
            return;
        };
        let mut fold = SessionState::new(plan, session.clone());
        for (i, env) in self.entries.iter().enumerate() {
            fold.take(Entry { seq: i as u64 + 1, env: env.clone() });
        }
        self.fold = Some(fold);
    }

    /// Why `entry` may not be recorded by its author at its place, if it may not: a
    /// collective envelope such as a task's result by a peer that does not hold it, or a
    /// summary of older rounds by a peer that is not the summarizer or when none is due
    /// (see [`SessionState::may_record`]). Rejected here, a collective envelope does not
    /// hold its id, so the peer that may record it still can.
    fn collective_rejected(&self, session: &SessionId, entry: &Entry) -> Option<String> {
        let fold = self.fold.as_ref()?;
        let env = &entry.env;
        let summary = env.step.starts_with("summary/");
        let collective = env.id == EnvelopeId::derive(session, &PeerId::from("*"), &env.step);
        if env.kind == Kind::Stop || !(summary || collective) {
            return None;
        }
        fold.may_record(entry).err()
    }

    /// Why the tool listing `entry` is not the session's, if it is one and is not: it is
    /// not one a process running the team could have recorded
    /// ([`roundtable_core::tool::listing_rejected`]), for instance a listing of a server
    /// in the name of a peer not granted it.
    fn listing_rejected(&self, entry: &Entry) -> Option<String> {
        if entry.env.kind != Kind::ToolList {
            return None;
        }
        let plan = self.plan.clone()?;
        roundtable_core::tool::listing_rejected(&plan, &entry.env)
    }

    /// Why the stop `entry` is not the session's, if it is a stop and is not: it does
    /// not follow from the log before it, or the session stopped already. A stop is
    /// checked once per process, when it is taken; the first that follows stops the
    /// session, and only it holds the stop's id.
    fn stop_rejected(&self, session: &SessionId, entry: &Entry) -> Option<String> {
        if entry.env.kind != Kind::Stop {
            return None;
        }
        if let Some(at) = self.stopped {
            return Some(format!("a second stop (the session stopped at log position {at})"));
        }
        let plan = self.plan.clone()?;
        let before = self.entries.iter().enumerate().map(|(i, env)| Entry { seq: i as u64 + 1, env: env.clone() });
        stop_follows(plan, session.clone(), before, entry).err()
    }
}

impl Reader {
    fn next_seq(&self) -> u64 {
        self.state.lock().expect("reader lock").entries.len() as u64 + 1
    }

    /// The session's roster, once its first message is on the stream.
    async fn roster(&self) -> Result<Option<Roster>, LogError> {
        if self.sessions {
            // The task may be anywhere after junk: read up to it (or to the end).
            let taken = |s: &ReadState| s.task_at.is_some();
            if !taken(&self.state.lock().expect("reader lock")) {
                let info = self.stream.get_info().await;
                let last =
                    info.map_err(|e| log_error(&format!("reading session {}", self.session), e))?.state.last_sequence;
                let next = self.next_seq();
                if next <= last {
                    self.fill(next, last).await?;
                }
            }
            return Ok(self.state.lock().expect("reader lock").roster.clone());
        }
        if self.next_seq() == 1 {
            match self.stream.get_raw_message(1).await {
                Ok(m) => {
                    self.entry(1, &m.subject, &m.payload, m.time.unix_timestamp_nanos()).await?;
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(log_error(&format!("reading the task of session {}", self.session), e)),
            }
        }
        Ok(self.state.lock().expect("reader lock").roster.clone())
    }

    /// The entry for the stored message at `seq`: taken once, after every message
    /// before it (read from the server first if this process has not yet).
    async fn entry(&self, seq: u64, subject: &str, payload: &[u8], time_ns: i128) -> Result<Entry, LogError> {
        if let Some(env) = self.state.lock().expect("reader lock").cached(seq) {
            return Ok(Entry { seq, env });
        }
        let next = self.next_seq();
        if next < seq {
            self.fill(next, seq - 1).await?;
        }
        let mut state = self.state.lock().expect("reader lock");
        state.take(&self.session, &self.prefix, self.layout, self.sessions, seq, subject, payload, time_ns);
        match state.cached(seq) {
            Some(env) => Ok(Entry { seq, env }),
            None => Err(LogError::new(
                LogErrorKind::Storage,
                format!("reading session {}: the messages before {seq} could not be read in order", self.session),
            )),
        }
    }

    /// Take the messages `from..=to` from the server.
    async fn fill(&self, from: u64, to: u64) -> Result<(), LogError> {
        let what = || format!("reading session {}", self.session);
        if to - from < FEW {
            for seq in from..=to {
                let m = self.stream.get_raw_message(seq).await.map_err(|e| log_error(&what(), e))?;
                let time_ns = m.time.unix_timestamp_nanos();
                let mut state = self.state.lock().expect("reader lock");
                state.take(
                    &self.session,
                    &self.prefix,
                    self.layout,
                    self.sessions,
                    seq,
                    &m.subject,
                    &m.payload,
                    time_ns,
                );
            }
            return Ok(());
        }
        let mut messages = ordered_from(&self.js, &self.stream, &self.session, from).await?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| log_error(&what(), e))?;
            let info = m.info().map_err(|e| log_error("reading message metadata", e))?;
            let (seq, time_ns) = (info.stream_sequence, info.published.unix_timestamp_nanos());
            if seq > to {
                break;
            }
            let mut state = self.state.lock().expect("reader lock");
            state.take(&self.session, &self.prefix, self.layout, self.sessions, seq, &m.subject, &m.payload, time_ns);
            if seq == to {
                break;
            }
        }
        Ok(())
    }
}

/// How many subjects an envelope id may take: its own, then `-1`, `-2`, … when
/// messages nobody should have sent squat the ones before (see the module docs).
const SUBJECTS_PER_ID: u32 = 8;

/// How many times an append tries the last subject of its id, when every subject holds
/// junk, before it gives up: each try is lost only to a message published between
/// reading that subject's last message and the append.
const SQUATTED_RETRIES: u32 = 64;

/// The author token of the subjects of the task and of collective decisions, which any
/// peer of the session may publish. No peer id and no [`token`] contains `~`.
pub const SHARED: &str = "~";

/// How a log's subjects name envelopes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `rt.<session>.log.<author>.<id>`: streams made by this version on.
    ByAuthor,
    /// `rt.<session>.log.<id>`: streams made before authors were in subjects.
    ById,
}

impl Layout {
    fn of(config: &stream::Config, session: &SessionId) -> Layout {
        let legacy = format!("{}*", subject_prefix(session));
        if config.subjects.contains(&legacy) { Layout::ById } else { Layout::ByAuthor }
    }
}

/// The author token of `env`'s subjects: its author's when its id is the author's own,
/// [`SHARED`] otherwise (the task, collective decisions).
fn author_token(env: &Envelope) -> String {
    let own = env.from.as_str() != USER && env.id == EnvelopeId::derive(&env.session, &env.from, &env.step);
    if own { token(env.from.as_str()) } else { SHARED.to_owned() }
}

/// The `k`-th subject of envelope `env` under `prefix`.
fn id_subject(prefix: &str, layout: Layout, env: &Envelope, k: u32) -> String {
    let base = match layout {
        Layout::ByAuthor => format!("{prefix}{}.{}", author_token(env), token(env.id.as_str())),
        Layout::ById => format!("{prefix}{}", token(env.id.as_str())),
    };
    if k == 0 { base } else { format!("{base}-{k}") }
}

/// The subject `env` is published on in a session made by this version (its first:
/// `rt.<session>.log.<author>.<id>`), for tools and tests that publish as a client would.
pub fn log_subject(env: &Envelope) -> String {
    id_subject(&subject_prefix(&env.session), Layout::ByAuthor, env, 0)
}

fn check(session: &SessionId, prefix: &str, layout: Layout, subject: &str, payload: &[u8]) -> Result<Envelope, String> {
    let env = Envelope::from_json(payload).map_err(|e| e.to_string())?;
    if env.session != *session {
        return Err(format!("an envelope of session {} on the log of session {session}", env.session));
    }
    let expected = id_subject(prefix, layout, &env, 0);
    let own = subject == expected
        || subject
            .strip_prefix(expected.as_str())
            .and_then(|k| k.strip_prefix('-'))
            .and_then(|k| k.parse::<u32>().ok())
            .is_some_and(|k| (1..SUBJECTS_PER_ID).contains(&k) && subject == id_subject(prefix, layout, &env, k));
    if !own {
        return Err(format!("envelope {} published on {subject}, not on its own subject {expected}", env.id));
    }
    Ok(env)
}

fn rejected(session: &SessionId, seq: u64, subject: &str, bytes: usize, reason: &str, time_ns: i128) -> Envelope {
    let text = format!("rejected the message at log position {seq} ({bytes} bytes on {subject}): {reason}");
    let json = serde_json::json!({
        "op": "rejected",
        "seq": seq,
        "subject": subject,
        "bytes": bytes,
        "reason": reason,
    });
    let mut env = Envelope::new(
        session,
        &PeerId::from(REJECTED_FROM),
        format!("rejected/{seq}"),
        Kind::Failure,
        Recipient::All,
        Body::text(text).with_json(json),
    );
    env.time_ms = u64::try_from(time_ns / 1_000_000).unwrap_or(0);
    env
}

/// One session's log on JetStream (see the module docs).
pub struct NatsLog {
    session: SessionId,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    layout: Layout,
    reader: Arc<Reader>,
    signers: Arc<Signers>,
}

/// Reads of at most this many entries fetch them one by one rather than creating a
/// consumer.
const FEW: u64 = 8;

impl NatsLog {
    async fn entry(&self, seq: u64, subject: &str, payload: &[u8], time_ns: i128) -> Result<Entry, LogError> {
        self.reader.entry(seq, subject, payload, time_ns).await
    }

    /// The stored message on `subject`, if any.
    async fn stored(&self, subject: &str) -> Result<Option<jetstream::message::StreamMessage>, LogError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(log_error(&format!("looking up {subject} in session {}", self.session), e)),
        }
    }

    /// An ordered consumer's messages from `from` on.
    async fn ordered_from(&self, from: u64) -> Result<consumer::push::Ordered, LogError> {
        ordered_from(&self.js, &self.stream, &self.session, from).await
    }
}

async fn ordered_from(
    js: &jetstream::Context,
    stream: &stream::Stream,
    session: &SessionId,
    from: u64,
) -> Result<consumer::push::Ordered, LogError> {
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            description: Some("roundtable log reader".into()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| log_error(&format!("reading session {session}"), e))?;
    consumer.messages().await.map_err(|e| log_error(&format!("reading session {session}"), e))
}

/// How often a tail checks whether the connection was made again.
const RECONNECT_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// A live tail (see [`SessionLog::tail`]). The client's ordered consumer only notices a
/// server restart when its idle heartbeats stop (after 10 s); the tail therefore also
/// watches the connection, and after every reconnection reopens the consumer after the
/// last entry it yielded. A consumer that fails is reopened the same way; the error is
/// yielded (as `Unavailable`) and the tail goes on.
struct Tail {
    js: jetstream::Context,
    stream: stream::Stream,
    session: SessionId,
    reader: Arc<Reader>,
    next: u64,
    messages: Option<consumer::push::Ordered>,
    connects: u64,
    check: tokio::time::Interval,
}

impl Tail {
    fn connects(&self) -> u64 {
        self.js.client().statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn next_entry(&mut self) -> Result<Entry, LogError> {
        loop {
            let connects = self.connects();
            if connects != self.connects {
                self.connects = connects;
                self.messages = None;
            }
            let messages = match self.messages.as_mut() {
                Some(m) => m,
                None => {
                    let m = ordered_from(&self.js, &self.stream, &self.session, self.next).await.map_err(|e| {
                        LogError::new(LogErrorKind::Unavailable, format!("tailing session {}: {e}", self.session))
                    })?;
                    self.messages.insert(m)
                }
            };
            let m = tokio::select! {
                m = messages.next() => m,
                _ = self.check.tick() => continue,
            };
            let Some(m) = m else {
                self.messages = None;
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    // The consumer's errors are the transport's (a missed heartbeat, a
                    // lost connection).
                    self.messages = None;
                    return Err(LogError::new(
                        LogErrorKind::Unavailable,
                        format!("tailing session {}: {e}", self.session),
                    ));
                }
            };
            let info = m.info().map_err(|e| log_error("reading message metadata", e))?;
            // A start past the end is moved back to the end by the server; a reopened
            // consumer starts after the last entry yielded.
            if info.stream_sequence < self.next {
                continue;
            }
            let time_ns = info.published.unix_timestamp_nanos();
            self.next = info.stream_sequence + 1;
            return self.reader.entry(info.stream_sequence, &m.subject, &m.payload, time_ns).await;
        }
    }
}

#[async_trait]
impl SessionLog for NatsLog {
    fn session(&self) -> &SessionId {
        &self.session
    }

    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        if env.session != self.session {
            return Err(LogError::new(
                LogErrorKind::Rejected,
                format!("envelope of session {} appended to session {}", env.session, self.session),
            ));
        }
        let mut env = env;
        if !self.signers.sign(&mut env) && self.reader.roster().await?.is_some() {
            return Err(LogError::new(
                LogErrorKind::Rejected,
                format!(
                    "session {} takes signed envelopes only, and this process holds no key of {}'s (see `roundtable keys new`)",
                    self.session, env.from
                ),
            ));
        }
        let what = || format!("appending {} to session {}", env.id, self.session);
        let payload = env.to_json();
        // The envelope's own subject, or, when a message nobody should have sent took
        // it, the next one: every appender walks them in the same order and stops at
        // the first that is free or holds this envelope.
        for k in 0..SUBJECTS_PER_ID {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            let subject = id_subject(&self.prefix, self.layout, &env, k);
            let ack = crate::publish_acked(&self.js, subject.clone(), headers, payload.clone().into_bytes()).await;
            match ack {
                Ok(ack) => return Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate }),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => match self.stored(&subject).await? {
                    Some(m) => {
                        let time_ns = m.time.unix_timestamp_nanos();
                        let entry = self.entry(m.sequence, &m.subject, &m.payload, time_ns).await?;
                        if entry.env.id == env.id {
                            return Ok(Appended { seq: m.sequence, duplicate: true });
                        }
                        tracing::warn!(session = %self.session, id = %env.id, subject = %m.subject, "{}", entry.env.body.text);
                    }
                    None => {
                        return Err(LogError::new(
                            LogErrorKind::Storage,
                            format!("{}: the server holds the id but the message is gone", what()),
                        ));
                    }
                },
                // The stream was there when this log opened it and nothing here deletes
                // streams: on a cluster, "no stream" is a stream between leaders (a server
                // of its replicas died), which an append waits out like a server away.
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(LogError::new(LogErrorKind::Unavailable, format!("{}: {e}", what())));
                }
                Err(e) => return Err(log_error(&what(), e)),
            }
        }
        // Every subject of the id holds messages nobody should have sent (anyone allowed
        // on the shared subjects can fill all of them): the envelope goes on the last
        // one, after the message there, on condition that it is still the last. A copy
        // raced there by another appender is found the same way; junk published in
        // between only makes this look again.
        let subject = id_subject(&self.prefix, self.layout, &env, SUBJECTS_PER_ID - 1);
        for _ in 0..SQUATTED_RETRIES {
            let Some(m) = self.stored(&subject).await? else {
                return Err(LogError::new(
                    LogErrorKind::Storage,
                    format!("{}: the server holds the subject {subject} but the message is gone", what()),
                ));
            };
            let entry = self.entry(m.sequence, &m.subject, &m.payload, m.time.unix_timestamp_nanos()).await?;
            if entry.env.id == env.id {
                return Ok(Appended { seq: m.sequence, duplicate: true });
            }
            let mut headers = HeaderMap::new();
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, m.sequence.to_string().as_str());
            match crate::publish_acked(&self.js, subject.clone(), headers, payload.clone().into_bytes()).await {
                Ok(ack) => return Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate }),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(LogError::new(LogErrorKind::Unavailable, format!("{}: {e}", what())));
                }
                Err(e) => return Err(log_error(&what(), e)),
            }
        }
        Err(LogError::new(
            LogErrorKind::Rejected,
            format!(
                "{}: all {SUBJECTS_PER_ID} of its subjects hold rejected messages, and messages kept landing on the last                  ({SQUATTED_RETRIES} times in a row)",
                what()
            ),
        ))
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        let from = from.max(1);
        let last = self.last_seq().await?;
        if max == 0 || from > last {
            return Ok(Vec::new());
        }
        let end = last.min(from.saturating_add(max as u64 - 1));
        let what = || format!("reading session {}", self.session);
        let mut out = Vec::with_capacity((end - from + 1) as usize);
        if end - from < FEW {
            for seq in from..=end {
                let m = self.stream.get_raw_message(seq).await.map_err(|e| log_error(&what(), e))?;
                out.push(self.entry(seq, &m.subject, &m.payload, m.time.unix_timestamp_nanos()).await?);
            }
            return Ok(out);
        }
        let mut messages = self.ordered_from(from).await?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| log_error(&what(), e))?;
            let info = m.info().map_err(|e| log_error("reading message metadata", e))?;
            let (seq, pending, time_ns) = (info.stream_sequence, info.pending, info.published.unix_timestamp_nanos());
            if seq > end {
                break;
            }
            out.push(self.entry(seq, &m.subject, &m.payload, time_ns).await?);
            if seq == end || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn last_seq(&self) -> Result<u64, LogError> {
        let info =
            self.stream.get_info().await.map_err(|e| log_error(&format!("reading session {}", self.session), e))?;
        Ok(info.state.last_sequence)
    }

    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        let from = from.max(1);
        let mut check = tokio::time::interval(RECONNECT_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tail = Tail {
            js: self.js.clone(),
            stream: self.stream.clone(),
            session: self.session.clone(),
            reader: self.reader.clone(),
            next: from,
            messages: None,
            connects: 0,
            check,
        };
        tail.connects = tail.connects();
        tail.messages = Some(self.ordered_from(from).await?);
        Ok(Box::pin(futures::stream::unfold(tail, |mut tail| async move {
            let entry = tail.next_entry().await;
            Some((entry, tail))
        })))
    }

    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        // Only the envelope itself counts, not a rejected message on one of its subjects
        // nor a second copy. The subject of an id names its author, which an id alone
        // does not tell, so the answer comes from the process's reader, brought up to
        // the end of the log (each message is read once per process however often this
        // is asked).
        if let Some(seq) = self.reader.state.lock().expect("reader lock").ids.get(id) {
            return Ok(Some(*seq));
        }
        let last = self.last_seq().await?;
        let next = self.reader.next_seq();
        if next <= last {
            self.reader.fill(next, last).await?;
        }
        Ok(self.reader.state.lock().expect("reader lock").ids.get(id).copied())
    }
}

/// Every session log on one NATS server: the streams named `RT_…`.
#[derive(Clone)]
pub struct NatsLogStore {
    js: jetstream::Context,
    signers: Arc<Signers>,
    replicas: usize,
    sessions: bool,
}

impl NatsLogStore {
    pub fn new(js: jetstream::Context) -> Self {
        NatsLogStore { js, signers: Arc::default(), replicas: 1, sessions: false }
    }

    /// Read every log as a session's, which starts at its task (what the `roundtable`
    /// binary does): every message before the first that is the session's task — at
    /// the task's id, from `user`, signed by a peer of the roster its plan names when
    /// it names one — is rejected at its place, and the roster is the
    /// task's. Without this, a log is any sequence of envelopes (what the conformance
    /// suite checks) and its roster is read from its first message only, so junk
    /// published before a session's task leaves it read as unsigned. See the module
    /// docs.
    pub fn for_sessions(mut self) -> Self {
        self.sessions = true;
        self
    }

    /// Create session streams with `replicas` copies (see `NatsBackend::with_replicas`).
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sign what is appended with these keys (see the module docs).
    pub fn with_signers(mut self, signers: Arc<Signers>) -> Self {
        self.signers = signers;
        self
    }

    /// A session's entry in the list: its whole log read as every reader reads it (so
    /// junk, forgeries and a stop that does not follow are rejections, and the outcome
    /// is the one the log's fold derives: [`SessionInfo::of_entries`]). That costs a
    /// read of every log listed, in exchange for a list that never shows a stop the
    /// session's readers reject.
    async fn summary(&self, name: &str) -> Result<Option<SessionInfo>, LogError> {
        let what = || format!("reading stream {name}");
        let stream = match self.js.get_stream(name).await {
            Ok(s) => s,
            // Deleted between listing and reading.
            Err(e) if stream_missing(&e) => return Ok(None),
            Err(e) => return Err(log_error(&what(), e)),
        };
        let Some(session) = stream.cached_info().config.description.clone() else {
            return Ok(None);
        };
        let session = SessionId::from(session);
        let log = match self.open(&session, false).await {
            Ok(log) => log,
            Err(e) if e.kind() == LogErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let entries = log.read_all().await?;
        Ok(Some(SessionInfo::of_entries(&session, &entries)))
    }
}

#[async_trait]
impl LogStore for NatsLogStore {
    async fn open(&self, session: &SessionId, create: bool) -> Result<Arc<dyn SessionLog>, LogError> {
        let what = || format!("opening session {session}");
        let stream = if create {
            crate::get_or_create_stream(&self.js, stream_config(session, self.replicas))
                .await
                .map_err(|e| log_error(&what(), e))?
        } else {
            match self.js.get_stream(stream_name(session)).await {
                Ok(s) => s,
                Err(e) if stream_missing(&e) => {
                    return Err(LogError::new(LogErrorKind::NotFound, format!("no session {session}")));
                }
                Err(e) => return Err(log_error(&what(), e)),
            }
        };
        let layout = Layout::of(&stream.cached_info().config, session);
        let reader = Arc::new(Reader {
            session: session.clone(),
            prefix: subject_prefix(session),
            layout,
            sessions: self.sessions,
            js: self.js.clone(),
            stream: stream.clone(),
            state: Default::default(),
        });
        Ok(Arc::new(NatsLog {
            session: session.clone(),
            js: self.js.clone(),
            stream,
            prefix: subject_prefix(session),
            layout,
            reader,
            signers: self.signers.clone(),
        }))
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, LogError> {
        let mut names = self.js.stream_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| log_error("listing streams", e))?;
            if !name.starts_with("RT_") {
                continue;
            }
            if let Some(summary) = self.summary(&name).await? {
                out.push(summary);
            }
        }
        out.sort_by(|a, b| b.first_ms.cmp(&a.first_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }
}
