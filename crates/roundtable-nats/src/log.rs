//! The session log as a JetStream stream.
//!
//! One stream per session, `RT_<session>`, file storage. Each envelope is published on a
//! subject of its own, `rt.<session>.log.<envelope id>`, with the header
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
//! Reads and tails use ordered push consumers from a start sequence (ephemeral, no
//! acks, recreated by the client if a message is missed).

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_trait::async_trait;
use futures::StreamExt;
use roundtable_core::envelope::{Envelope, EnvelopeId, SessionId};
use roundtable_core::log::{
    Appended, Entry, EntryStream, LogError, LogErrorKind, LogStore, SessionInfo, SessionLog,
};

use crate::{is_unavailable, token};

fn log_error(what: &str, err: impl std::fmt::Display) -> LogError {
    let kind = if is_unavailable(&err) {
        LogErrorKind::Unavailable
    } else {
        LogErrorKind::Storage
    };
    LogError::new(kind, format!("{what}: {err}"))
}

fn stream_name(session: &SessionId) -> String {
    format!("RT_{}", token(session.as_str()))
}

fn subject_prefix(session: &SessionId) -> String {
    format!("rt.{}.log.", token(session.as_str()))
}

fn stream_config(session: &SessionId) -> stream::Config {
    stream::Config {
        name: stream_name(session),
        description: Some(session.as_str().to_owned()),
        subjects: vec![format!("{}*", subject_prefix(session))],
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

fn entry_of(seq: u64, payload: &[u8]) -> Result<Entry, LogError> {
    let env = Envelope::from_json(payload)
        .map_err(|e| LogError::new(LogErrorKind::Corrupt, format!("log entry {seq}: {e}")))?;
    Ok(Entry {
        seq,
        env: Arc::new(env),
    })
}

/// One session's log on JetStream (see the module docs).
pub struct NatsLog {
    session: SessionId,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
}

impl NatsLog {
    fn subject(&self, id: &EnvelopeId) -> String {
        format!("{}{}", self.prefix, token(id.as_str()))
    }

    /// An ordered consumer's messages from `from` on.
    async fn ordered_from(&self, from: u64) -> Result<consumer::push::Ordered, LogError> {
        let consumer = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                description: Some("roundtable log reader".into()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| log_error(&format!("reading session {}", self.session), e))?;
        consumer
            .messages()
            .await
            .map_err(|e| log_error(&format!("reading session {}", self.session), e))
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
                format!(
                    "envelope of session {} appended to session {}",
                    env.session, self.session
                ),
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let what = || format!("appending {} to session {}", env.id, self.session);
        let ack = self
            .js
            .publish_with_headers(self.subject(&env.id), headers, env.to_json().into())
            .await
            .map_err(|e| log_error(&what(), e))?
            .await;
        match ack {
            Ok(ack) => Ok(Appended {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                match self.seq_of(&env.id).await? {
                    Some(seq) => Ok(Appended {
                        seq,
                        duplicate: true,
                    }),
                    None => Err(LogError::new(
                        LogErrorKind::Storage,
                        format!(
                            "{}: the server holds the id but the message is gone",
                            what()
                        ),
                    )),
                }
            }
            Err(e) => Err(log_error(&what(), e)),
        }
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        let from = from.max(1);
        let last = self.last_seq().await?;
        if max == 0 || from > last {
            return Ok(Vec::new());
        }
        let end = last.min(from.saturating_add(max as u64 - 1));
        let mut messages = self.ordered_from(from).await?;
        let mut out = Vec::with_capacity((end - from + 1) as usize);
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| log_error(&format!("reading session {}", self.session), e))?;
            let info = m
                .info()
                .map_err(|e| log_error("reading message metadata", e))?;
            let seq = info.stream_sequence;
            if seq > end {
                break;
            }
            out.push(entry_of(seq, &m.payload)?);
            if seq == end || info.pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn last_seq(&self) -> Result<u64, LogError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| log_error(&format!("reading session {}", self.session), e))?;
        Ok(info.state.last_sequence)
    }

    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        let session = self.session.clone();
        let from = from.max(1);
        let messages = self.ordered_from(from).await?;
        let entries = messages.filter_map(move |m| {
            let entry = m
                .map_err(|e| log_error(&format!("tailing session {session}"), e))
                .and_then(|m| {
                    let info = m
                        .info()
                        .map_err(|e| log_error("reading message metadata", e))?;
                    // A start past the end is moved back to the end by the server.
                    if info.stream_sequence < from {
                        return Ok(None);
                    }
                    entry_of(info.stream_sequence, &m.payload).map(Some)
                });
            std::future::ready(entry.transpose())
        });
        Ok(Box::pin(entries))
    }

    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(id))
            .await
        {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(log_error(
                &format!("looking up {id} in session {}", self.session),
                e,
            )),
        }
    }
}

/// Every session log on one NATS server: the streams named `RT_…`.
#[derive(Clone)]
pub struct NatsLogStore {
    js: jetstream::Context,
}

impl NatsLogStore {
    pub fn new(js: jetstream::Context) -> Self {
        NatsLogStore { js }
    }

    async fn summary(&self, name: &str) -> Result<Option<SessionInfo>, LogError> {
        let what = || format!("reading stream {name}");
        let stream = match self.js.get_stream(name).await {
            Ok(s) => s,
            // Deleted between listing and reading.
            Err(e) if stream_missing(&e) => return Ok(None),
            Err(e) => return Err(log_error(&what(), e)),
        };
        let info = stream.cached_info();
        let Some(session) = info.config.description.clone() else {
            return Ok(None);
        };
        let mut summary = SessionInfo::empty(SessionId::from(session));
        let state = &info.state;
        // The first and last envelopes give the team (the task opens a session) and the
        // stop reason (a stop closes it) without reading everything in between.
        let mut ends = vec![state.first_sequence];
        if state.last_sequence != state.first_sequence {
            ends.push(state.last_sequence);
        }
        if state.messages > 0 {
            for seq in ends {
                let m = stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| log_error(&what(), e))?;
                summary.observe(&entry_of(seq, &m.payload)?.env);
            }
        }
        summary.envelopes = state.messages;
        Ok(Some(summary))
    }
}

#[async_trait]
impl LogStore for NatsLogStore {
    async fn open(
        &self,
        session: &SessionId,
        create: bool,
    ) -> Result<Arc<dyn SessionLog>, LogError> {
        let what = || format!("opening session {session}");
        let stream = if create {
            self.js
                .get_or_create_stream(stream_config(session))
                .await
                .map_err(|e| log_error(&what(), e))?
        } else {
            match self.js.get_stream(stream_name(session)).await {
                Ok(s) => s,
                Err(e) if stream_missing(&e) => {
                    return Err(LogError::new(
                        LogErrorKind::NotFound,
                        format!("no session {session}"),
                    ));
                }
                Err(e) => return Err(log_error(&what(), e)),
            }
        };
        Ok(Arc::new(NatsLog {
            session: session.clone(),
            js: self.js.clone(),
            stream,
            prefix: subject_prefix(session),
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
