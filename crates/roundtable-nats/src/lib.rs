//! Roundtable over NATS JetStream: peers in many processes and machines share a session
//! through one nats-server (2.9 or newer; nothing here needs a 2.10+ feature).
//!
//! | part | JetStream shape |
//! |---|---|
//! | session log ([`NatsLog`]) | stream `RT_<session>`, one subject per envelope: `rt.<session>.log.<author>.<envelope id>` (`~` for shared envelopes) |
//! | blackboard ([`NatsBoard`]) | KV bucket `RTB_<session>` |
//! | work queue ([`NatsWorkQueue`]) | work-queue stream `RTQ_<session>` with one durable pull consumer, and KV buckets for task ids, acks, dead letters and leases |
//! | presence ([`NatsPresence`]) | KV bucket `RTP_<session>`, one key per peer |
//!
//! Names are built from [`token`]s of the session id, so any session id is accepted.
//! Every part's semantics are the ones written in `roundtable-core` and checked by
//! `roundtable-conformance`; where JetStream differs from them, the module of the part
//! says how the difference is closed.
//!
//! [`NatsBackend::connect`] (or [`NatsBackend::connect_with`], for credentials and TLS)
//! opens a connection; the client reconnects on its own, forever, when the server
//! restarts, and calls made while it is away fail with an `Unavailable` kind — unless
//! the backend is [`NatsBackend::patient`], whose parts wait for the server instead (see
//! [`patient`]): what peers use. Log tails reopen after their last entry on every
//! reconnection either way. Messages on a log's subjects that are not envelopes of that
//! session are read as `failure` envelopes in their place (see [`NatsLog`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
pub mod patient;
pub mod permissions;
mod presence;
mod queue;
pub mod testing;

pub use board::NatsBoard;
pub use log::{NatsLog, NatsLogStore, REJECTED_FROM, SHARED, log_subject};
pub use presence::NatsPresence;
pub use queue::NatsWorkQueue;

/// A name piece that every NATS name accepts (subject token, stream, bucket and key):
/// the string itself when it is 1–64 of `A-Za-z0-9_-`, otherwise `x` and 32 hex digits
/// of its SHA-256.
pub fn token(s: &str) -> String {
    let plain =
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
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
    ["timed out", "timeout", "broken pipe", "disconnected", "no responders", "connection", "not connected"]
        .iter()
        .any(|needle| text.contains(needle))
}

/// The connection and the per-session parts opened on it.
#[derive(Clone)]
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    parts: Arc<Mutex<Parts>>,
    /// When this process last (re)connected, in ms since the epoch (see [`NatsPresence`]).
    connected_ms: Arc<AtomicU64>,
    patient: bool,
    signers: Arc<roundtable_core::trust::Signers>,
}

#[derive(Default)]
struct Parts {
    boards: HashMap<SessionId, Arc<dyn Blackboard>>,
    queues: HashMap<SessionId, Arc<dyn WorkQueue>>,
    presence: HashMap<SessionId, Arc<NatsPresence>>,
}

/// `url` with any `user:password@` or `token@` replaced by `***@`, for messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| match (part.find("://"), part.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &part[..scheme + 3], &part[at..]),
            (None, Some(at)) => format!("***{}", &part[at..]),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl NatsBackend {
    /// Connect to `url` (`nats://host:port`, or several separated by commas) with default
    /// options.
    pub async fn connect(url: &str) -> Result<NatsBackend, BusError> {
        Self::connect_with(url, async_nats::ConnectOptions::new()).await
    }

    /// Connect to `url` with `options` (credentials, TLS, …). The client reconnects
    /// forever, backing off up to 2 s between attempts, when the connection drops; the
    /// first connection must be made within 5 s, so that a wrong address or credentials
    /// fail here and not in the middle of a session. Neither the URL's credentials nor
    /// the options' secrets appear in an error.
    pub async fn connect_with(url: &str, options: async_nats::ConnectOptions) -> Result<NatsBackend, BusError> {
        let shown = redact_url(url);
        let connected_ms = Arc::new(AtomicU64::new(0));
        let last_error: Arc<Mutex<Option<String>>> = Arc::default();
        let (on_connect, on_error) = (connected_ms.clone(), last_error.clone());
        let client = options
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let (on_connect, on_error) = (on_connect.clone(), on_error.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            on_connect.store(now_ms(), Ordering::Relaxed);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                        async_nats::Event::ServerError(e) => {
                            *on_error.lock().expect("error lock") = Some(redact_url(&e.to_string()));
                        }
                        async_nats::Event::ClientError(e) => {
                            *on_error.lock().expect("error lock") = Some(redact_url(&e.to_string()));
                        }
                        _ => {}
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| {
                BusError::new(
                    BusErrorKind::Unavailable,
                    format!("connecting to {shown}: {}", redact_url(&e.to_string())),
                )
            })?;
        let start = std::time::Instant::now();
        while client.connection_state() != async_nats::connection::State::Connected {
            // A refusal of the credentials or of a certificate will not change by retrying.
            let refused = last_error.lock().expect("error lock").as_deref().is_some_and(|e| {
                let e = e.to_ascii_lowercase();
                ["authorization", "authentication", "certificate", "tls"].iter().any(|w| e.contains(w))
            });
            if refused || start.elapsed() > Duration::from_secs(5) {
                let why = last_error.lock().expect("error lock").clone();
                return Err(BusError::new(
                    BusErrorKind::Unavailable,
                    match why {
                        Some(why) => format!("cannot connect to the NATS server at {shown}: {why}"),
                        None => format!("no NATS server answers at {shown}"),
                    },
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        connected_ms.fetch_max(now_ms(), Ordering::Relaxed);
        let mut backend = Self::with_client(client);
        backend.connected_ms = connected_ms;
        Ok(backend)
    }

    /// Use an existing connection.
    pub fn with_client(client: async_nats::Client) -> NatsBackend {
        let js = jetstream::new(client.clone());
        NatsBackend {
            client,
            js,
            parts: Arc::default(),
            connected_ms: Arc::new(AtomicU64::new(now_ms())),
            patient: false,
            signers: Arc::default(),
        }
    }

    /// Parts that wait out a server that cannot be reached instead of failing: see
    /// [`patient`]. What peers want; tests of failure behaviour want the default.
    pub fn patient(mut self) -> NatsBackend {
        self.patient = true;
        self
    }

    /// Sign every envelope this backend's logs append with its author's key, from
    /// `signers` (the keys of the peers this process runs; see `NatsLog`).
    pub fn with_signers(mut self, signers: roundtable_core::trust::Signers) -> NatsBackend {
        self.signers = Arc::new(signers);
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

/// The longest wait between two reconnection attempts.
pub(crate) const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The wait before reconnection attempt `attempts`: none for the first, then 2, 4, 8 ms …
/// up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(20);
    Duration::from_millis(1 << exp).min(MAX_RECONNECT_DELAY)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl Backend for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn logs(&self) -> Arc<dyn LogStore> {
        let store = NatsLogStore::new(self.js.clone()).with_signers(self.signers.clone());
        if self.patient { Arc::new(patient::PatientStore::new(Arc::new(store))) } else { Arc::new(store) }
    }

    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError> {
        if let Some(b) = self.parts.lock().expect("parts lock").boards.get(session) {
            return Ok(b.clone());
        }
        let board: Arc<dyn Blackboard> = Arc::new(NatsBoard::open(&self.js, session).await?);
        let board = if self.patient { Arc::new(patient::PatientBoard::new(board)) } else { board };
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.boards.entry(session.clone()).or_insert(board).clone())
    }

    async fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Result<Arc<dyn WorkQueue>, QueueError> {
        if let Some(q) = self.parts.lock().expect("parts lock").queues.get(session) {
            return Ok(q.clone());
        }
        let queue: Arc<dyn WorkQueue> = Arc::new(NatsWorkQueue::open(&self.js, session, config).await?);
        let queue = if self.patient { Arc::new(patient::PatientQueue::new(queue)) } else { queue };
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.queues.entry(session.clone()).or_insert(queue).clone())
    }

    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError> {
        if let Some(p) = self.parts.lock().expect("parts lock").presence.get(session) {
            return Ok(p.clone());
        }
        let presence = Arc::new(NatsPresence::open(&self.js, session, self.connected_ms.clone()).await?);
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.presence.entry(session.clone()).or_insert(presence).clone())
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
    js.get_or_create_stream(config).await.map_err(|e| format!("creating bucket {bucket}: {e}"))?;
    js.get_key_value(bucket).await.map_err(|e| format!("opening bucket {bucket}: {e}"))
}

/// The current value of every key of a KV bucket whose last operation is a put: the
/// keys from one stream-info request, then each key's last message by a direct get, a
/// few at a time (rather than a `keys()` listing and a request per key in turn).
///
/// Not a consumer with `DeliverPolicy::LastPerSubject`: nats-server 2.9 may skip keys
/// whose last message is replaced while such a consumer starts.
pub(crate) async fn latest_values(kv: &jetstream::kv::Store) -> Result<Vec<Latest>, String> {
    use futures::StreamExt;
    let what = |e: &dyn std::fmt::Display| format!("reading bucket {}: {e}", kv.name);
    let mut listing = kv.stream.info_with_subjects(format!("{}>", kv.prefix)).await.map_err(|e| what(&e))?;
    let mut subjects = Vec::new();
    while let Some(s) = listing.next().await {
        subjects.push(s.map_err(|e| what(&e))?.0);
    }
    let gets = futures::stream::iter(subjects)
        .map(|subject| async move { kv.stream.direct_get_last_for_subject(subject).await })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut out = Vec::new();
    for m in gets {
        let m = match m {
            Ok(m) => m,
            // Removed since the listing.
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => continue,
            Err(e) => return Err(what(&e)),
        };
        let removed = m.headers.get("KV-Operation").is_some() || m.headers.get("Nats-Marker-Reason").is_some();
        if !removed && let Some(key) = m.subject.strip_prefix(kv.prefix.as_str()) {
            out.push(Latest {
                key: key.to_owned(),
                value: m.payload.to_vec(),
                revision: m.sequence,
                created_ns: m.time.unix_timestamp_nanos(),
            });
        }
    }
    Ok(out)
}

/// One key's current value (see [`latest_values`]).
pub(crate) struct Latest {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    pub(crate) revision: u64,
    /// When the server stored it, in ns since the epoch.
    pub(crate) created_ns: i128,
}

pub(crate) fn board_error(what: &str, err: impl std::fmt::Display) -> BoardError {
    let kind = if is_unavailable(&err) { BoardErrorKind::Unavailable } else { BoardErrorKind::Storage };
    BoardError::new(kind, format!("{what}: {err}"))
}

pub(crate) fn queue_error(what: &str, err: impl std::fmt::Display) -> QueueError {
    let kind = if is_unavailable(&err) { QueueErrorKind::Unavailable } else { QueueErrorKind::Storage };
    QueueError::new(kind, format!("{what}: {err}"))
}

pub(crate) fn bus_error(what: &str, err: impl std::fmt::Display) -> BusError {
    let kind = if is_unavailable(&err) { BusErrorKind::Unavailable } else { BusErrorKind::Storage };
    BusError::new(kind, format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_backs_off_to_two_seconds() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(2));
        assert_eq!(reconnect_delay(11), Duration::from_millis(1024));
        assert_eq!(reconnect_delay(12), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn tokens_are_plain_names_or_digests() {
        assert_eq!(token("20261121-024500-abc123"), "20261121-024500-abc123");
        assert_eq!(token("a_B-9"), "a_B-9");
        for odd in ["", "has.dot", "has space", "star*", "gt>", "ünï", &"x".repeat(65)] {
            let t = token(odd);
            assert!(t.starts_with('x') && t.len() == 33, "{odd:?} -> {t}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()), "{t}");
        }
        assert_ne!(token("a.b"), token("a.c"));
    }
}
