//! Roundtable over NATS JetStream: peers in many processes and machines share a session
//! through one nats-server (2.9 or newer; nothing here needs a 2.10+ feature).
//!
//! | part | JetStream shape |
//! |---|---|
//! | session log ([`NatsLog`]) | stream `RT_<session>`, one subject per envelope: `rt.<session>.log.<envelope id>` |
//! | blackboard ([`NatsBoard`]) | KV bucket `RTB_<session>` |
//! | work queue ([`NatsWorkQueue`]) | work-queue stream `RTQ_<session>` with one durable pull consumer, and KV buckets for task ids, acks, dead letters and leases |
//! | presence ([`NatsPresence`]) | KV bucket `RTP_<session>`, one key per peer |
//!
//! Names are built from [`token`]s of the session id, so any session id is accepted.
//! Every part's semantics are the ones written in `roundtable-core` and checked by
//! `roundtable-conformance`; where JetStream differs from them, the module of the part
//! says how the difference is closed.
//!
//! [`NatsBackend::connect`] opens a connection; the client reconnects on its own when the
//! server restarts, and calls made while it is away fail with an `Unavailable` kind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use roundtable_core::blackboard::{Blackboard, BoardError, BoardErrorKind};
use roundtable_core::bus::{Backend, BusError, BusErrorKind, Presence};
use roundtable_core::envelope::SessionId;
use roundtable_core::log::LogStore;
use roundtable_core::workqueue::{QueueConfig, QueueError, QueueErrorKind, WorkQueue};
use sha2::{Digest, Sha256};

mod board;
mod log;
mod presence;
mod queue;
pub mod testing;

pub use board::NatsBoard;
pub use log::{NatsLog, NatsLogStore};
pub use presence::NatsPresence;
pub use queue::NatsWorkQueue;

/// A name piece that every NATS name accepts (subject token, stream, bucket and key):
/// the string itself when it is 1–64 of `A-Za-z0-9_-`, otherwise `x` and 32 hex digits
/// of its SHA-256.
pub fn token(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        s.to_owned()
    } else {
        let digest = Sha256::digest(s.as_bytes());
        format!("x{}", hex::encode(&digest[..16]))
    }
}

/// Whether an async-nats error means the server could not be reached (or answered too
/// late), as opposed to a refusal or a storage failure.
fn is_unavailable(err: &dyn std::fmt::Display) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    [
        "timed out",
        "timeout",
        "broken pipe",
        "disconnected",
        "no responders",
        "connection",
        "not connected",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// The connection and the per-session parts opened on it.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    parts: Arc<Mutex<Parts>>,
}

#[derive(Default)]
struct Parts {
    boards: HashMap<SessionId, Arc<NatsBoard>>,
    queues: HashMap<SessionId, Arc<NatsWorkQueue>>,
    presence: HashMap<SessionId, Arc<NatsPresence>>,
}

impl NatsBackend {
    /// Connect to `url` (`nats://host:port`, or several separated by commas).
    pub async fn connect(url: &str) -> Result<NatsBackend, BusError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| {
                BusError::new(
                    BusErrorKind::Unavailable,
                    format!("connecting to {url}: {e}"),
                )
            })?;
        // Wait for the first connection, so that a wrong address fails here and not in
        // the middle of a session.
        let start = std::time::Instant::now();
        while client.connection_state() != async_nats::connection::State::Connected {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(BusError::new(
                    BusErrorKind::Unavailable,
                    format!("no NATS server answers at {url}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self::with_client(client))
    }

    /// Use an existing connection.
    pub fn with_client(client: async_nats::Client) -> NatsBackend {
        let js = jetstream::new(client.clone());
        NatsBackend {
            client,
            js,
            parts: Arc::default(),
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

#[async_trait]
impl Backend for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn logs(&self) -> Arc<dyn LogStore> {
        Arc::new(NatsLogStore::new(self.js.clone()))
    }

    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError> {
        if let Some(b) = self.parts.lock().expect("parts lock").boards.get(session) {
            return Ok(b.clone());
        }
        let board = Arc::new(NatsBoard::open(&self.js, session).await?);
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.boards.entry(session.clone()).or_insert(board).clone())
    }

    async fn work_queue(
        &self,
        session: &SessionId,
        config: QueueConfig,
    ) -> Result<Arc<dyn WorkQueue>, QueueError> {
        if let Some(q) = self.parts.lock().expect("parts lock").queues.get(session) {
            return Ok(q.clone());
        }
        let queue = Arc::new(NatsWorkQueue::open(&self.js, session, config).await?);
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.queues.entry(session.clone()).or_insert(queue).clone())
    }

    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError> {
        if let Some(p) = self.parts.lock().expect("parts lock").presence.get(session) {
            return Ok(p.clone());
        }
        let presence = Arc::new(NatsPresence::open(&self.js, session).await?);
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts
            .presence
            .entry(session.clone())
            .or_insert(presence)
            .clone())
    }
}

/// Open the KV bucket `bucket`, creating it when missing.
///
/// Created here rather than with `create_key_value`, which first asks for the account's
/// info in a shape nats-server 2.9 does not answer with; the stream is the one
/// `create_key_value` would make.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: String,
    history: i64,
    max_age: Duration,
) -> Result<jetstream::kv::Store, String> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    let config = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    // Another process may create it at the same moment: same config, same stream.
    js.get_or_create_stream(config)
        .await
        .map_err(|e| format!("creating bucket {bucket}: {e}"))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| format!("opening bucket {bucket}: {e}"))
}

pub(crate) fn board_error(what: &str, err: impl std::fmt::Display) -> BoardError {
    let kind = if is_unavailable(&err) {
        BoardErrorKind::Unavailable
    } else {
        BoardErrorKind::Storage
    };
    BoardError::new(kind, format!("{what}: {err}"))
}

pub(crate) fn queue_error(what: &str, err: impl std::fmt::Display) -> QueueError {
    let kind = if is_unavailable(&err) {
        QueueErrorKind::Unavailable
    } else {
        QueueErrorKind::Storage
    };
    QueueError::new(kind, format!("{what}: {err}"))
}

pub(crate) fn bus_error(what: &str, err: impl std::fmt::Display) -> BusError {
    let kind = if is_unavailable(&err) {
        BusErrorKind::Unavailable
    } else {
        BusErrorKind::Storage
    };
    BusError::new(kind, format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_plain_names_or_digests() {
        assert_eq!(token("20261121-024500-abc123"), "20261121-024500-abc123");
        assert_eq!(token("a_B-9"), "a_B-9");
        for odd in [
            "",
            "has.dot",
            "has space",
            "star*",
            "gt>",
            "ünï",
            &"x".repeat(65),
        ] {
            let t = token(odd);
            assert!(t.starts_with('x') && t.len() == 33, "{odd:?} -> {t}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()), "{t}");
        }
        assert_ne!(token("a.b"), token("a.c"));
    }
}
