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
    /// Whether logs are read as sessions' (see [`NatsLogStore::for_sessions`]).
    sessions: bool,
    signers: Arc<roundtable_core::trust::Signers>,
    /// How many servers of a cluster keep a copy of each stream and bucket created.
    replicas: usize,
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
    /// fail here and not in the middle of a session. A server that refuses the
    /// credentials or the certificate is asked once: that will not change by retrying.
    /// Neither the URL's credentials nor the options' secrets appear in an error.
    pub async fn connect_with(url: &str, options: async_nats::ConnectOptions) -> Result<NatsBackend, BusError> {
        use async_nats::ConnectErrorKind;
        let shown = redact_url(url);
        let connected_ms = Arc::new(AtomicU64::new(0));
        let on_connect = connected_ms.clone();
        let options = options
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let on_connect = on_connect.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            on_connect.store(now_ms(), Ordering::Relaxed);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                        _ => {}
                    }
                }
            });
        let start = std::time::Instant::now();
        let mut attempt = 0;
        // The first connection is made here, attempt by attempt, so that each failure is
        // seen with its cause: a server not up yet is waited for, a refusal is final.
        let client = loop {
            attempt += 1;
            // The client takes a list of addresses, not one string with commas in it.
            let addrs: Vec<&str> = url.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
            let error = match options.clone().connect(addrs).await {
                Ok(client) => break client,
                Err(e) => e,
            };
            let why = redact_url(&error.to_string());
            let refused = matches!(
                error.kind(),
                ConnectErrorKind::AuthorizationViolation
                    | ConnectErrorKind::Authentication
                    | ConnectErrorKind::Tls
                    | ConnectErrorKind::ServerParse
            );
            if refused {
                return Err(BusError::new(
                    BusErrorKind::Unavailable,
                    format!("cannot connect to the NATS server at {shown}: {why}"),
                ));
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err(BusError::new(
                    BusErrorKind::Unavailable,
                    format!("no NATS server answers at {shown} ({why})"),
                ));
            }
            tokio::time::sleep(reconnect_delay(attempt + 1).max(Duration::from_millis(10))).await;
        };
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
            replicas: 1,
            sessions: false,
        }
    }

    /// Create every stream and bucket (log, blackboard, work queue, presence) with
    /// `replicas` copies, on that many servers of a JetStream cluster: with 3, a session
    /// survives the loss of any one server, and an acknowledged append is on a majority
    /// of the copies. 1 (the default) is what a single server can hold. Streams that
    /// exist keep the count they were created with. Valid: 1 to [`MAX_REPLICAS`]; a
    /// count above the cluster's size makes creating a session fail with the server's
    /// reason.
    pub fn with_replicas(mut self, replicas: usize) -> Result<NatsBackend, BusError> {
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(BusError::new(
                BusErrorKind::Storage,
                format!("{replicas} replicas: valid counts are 1 to {MAX_REPLICAS}"),
            ));
        }
        self.replicas = replicas;
        Ok(self)
    }

    /// The replica count streams and buckets are created with.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Parts that wait out a server that cannot be reached instead of failing: see
    /// [`patient`]. What peers want; tests of failure behaviour want the default.
    pub fn patient(mut self) -> NatsBackend {
        self.patient = true;
        self
    }

    /// Read every log as a session's, which starts at its task: see
    /// [`NatsLogStore::for_sessions`]. What the `roundtable` binary does.
    pub fn for_sessions(mut self) -> NatsBackend {
        self.sessions = true;
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

/// How many times a publish that nothing answered is asked again, and how long apart.
const NO_RESPONDERS_RETRIES: u32 = 4;
const NO_RESPONDERS_WAIT: Duration = Duration::from_millis(250);

/// Publish to a stream and wait for its acknowledgement. A publish that nothing answers
/// ("no responders": no stream took it, so nothing was stored) is asked again a few times,
/// 250 ms apart, as the NATS Go client does: a stream just created by another process,
/// or one whose leader is moving in a cluster, can miss a publish for a moment. A
/// subject that no stream ever takes still fails, after about a second.
pub(crate) async fn publish_acked(
    js: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    use jetstream::context::PublishErrorKind;
    let mut retries = 0;
    loop {
        let ack = match js.publish_with_headers(subject.clone(), headers.clone(), payload.clone().into()).await {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match ack {
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound && retries < NO_RESPONDERS_RETRIES => {
                retries += 1;
                tracing::debug!(%subject, retries, "no stream answered a publish; asking again");
                tokio::time::sleep(NO_RESPONDERS_WAIT).await;
            }
            other => return other,
        }
    }
}

/// The most copies JetStream keeps of a stream (its own limit).
pub const MAX_REPLICAS: usize = 5;

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
        let store = NatsLogStore::new(self.js.clone()).with_signers(self.signers.clone()).with_replicas(self.replicas);
        let store = if self.sessions { store.for_sessions() } else { store };
        if self.patient { Arc::new(patient::PatientStore::new(Arc::new(store))) } else { Arc::new(store) }
    }

    async fn blackboard(&self, session: &SessionId) -> Result<Arc<dyn Blackboard>, BoardError> {
        if let Some(b) = self.parts.lock().expect("parts lock").boards.get(session) {
            return Ok(b.clone());
        }
        let board: Arc<dyn Blackboard> = Arc::new(NatsBoard::open(&self.js, session, self.replicas).await?);
        let board = if self.patient { Arc::new(patient::PatientBoard::new(board)) } else { board };
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.boards.entry(session.clone()).or_insert(board).clone())
    }

    async fn work_queue(&self, session: &SessionId, config: QueueConfig) -> Result<Arc<dyn WorkQueue>, QueueError> {
        if let Some(q) = self.parts.lock().expect("parts lock").queues.get(session) {
            return Ok(q.clone());
        }
        let queue: Arc<dyn WorkQueue> = Arc::new(NatsWorkQueue::open(&self.js, session, config, self.replicas).await?);
        let queue = if self.patient { Arc::new(patient::PatientQueue::new(queue)) } else { queue };
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.queues.entry(session.clone()).or_insert(queue).clone())
    }

    async fn presence(&self, session: &SessionId) -> Result<Arc<dyn Presence>, BusError> {
        if let Some(p) = self.parts.lock().expect("parts lock").presence.get(session) {
            return Ok(p.clone());
        }
        let presence = Arc::new(NatsPresence::open(&self.js, session, self.connected_ms.clone(), self.replicas).await?);
        let mut parts = self.parts.lock().expect("parts lock");
        Ok(parts.presence.entry(session.clone()).or_insert(presence).clone())
    }
}

/// Open the KV bucket `bucket`, creating it when missing, with `replicas` copies.
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
    replicas: usize,
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
        num_replicas: replicas,
        ..Default::default()
    };
    get_or_create_stream(js, config).await.map_err(|e| format!("creating bucket {bucket}: {e}"))?;
    patiently(bucket, || js.get_key_value(bucket)).await.map_err(|e| format!("opening bucket {bucket}: {e}"))
}

/// How long opening a stream keeps trying through timeouts and races (see
/// [`get_or_create_stream`]).
const CREATE_PATIENCE: Duration = Duration::from_secs(30);

/// The stream `config` names, created when it does not exist (see [`patiently`]).
pub(crate) async fn get_or_create_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<jetstream::stream::Stream, jetstream::context::CreateStreamError> {
    patiently(&config.name, || js.get_or_create_stream(config.clone())).await
}

/// Run `call`, a step of opening a session's streams, buckets or consumers, asking again
/// while it fails for a reason that passes. Several processes of one session open its
/// parts at the same moment, and in a cluster a creation may time out while replicas
/// are placed, or be refused ("subjects overlap", "name already in use") because
/// another process's creation of the same thing is under way: those are asked again,
/// backing off, for up to 30 s, after which the last error stands. Any other refusal is
/// final at once.
pub(crate) async fn patiently<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let text = e.to_string().to_ascii_lowercase();
                let racing = ["overlap", "already in use", "already exists"].iter().any(|n| text.contains(n));
                if !(racing || is_unavailable(&e)) || start.elapsed() > CREATE_PATIENCE {
                    return Err(e);
                }
                attempt += 1;
                tracing::debug!(what, attempt, error = %e, "opening: asking again");
                tokio::time::sleep(Duration::from_millis(50u64 << attempt.min(4))).await;
            }
        }
    }
}

/// The current value of every key of a KV bucket whose last operation is a put: the
/// keys from one stream-info request, then each key's last message, a few at a time
/// (rather than a `keys()` listing and a request per key in turn).
///
/// Each message is read from the stream's leader, not by a direct get: with replicas, a
/// direct get may be answered by a follower that is behind (a server just restarted,
/// still catching up), whose heartbeats are as old as its outage, and a live peer
/// would be judged absent on them.
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
        .map(|subject| async move { kv.stream.get_last_raw_message_by_subject(&subject).await })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut out = Vec::new();
    for m in gets {
        let m = match m {
            Ok(m) => m,
            // Removed since the listing.
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => continue,
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

    #[tokio::test]
    async fn a_publish_nothing_answers_is_asked_again_then_fails() {
        let server = testing::NatsServer::start();
        let backend = NatsBackend::connect(&server.url()).await.unwrap();
        let start = std::time::Instant::now();
        let e = publish_acked(backend.jetstream(), "no.stream.here".into(), Default::default(), b"x".to_vec())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), jetstream::context::PublishErrorKind::StreamNotFound, "{e}");
        // Asked again after each wait: the waits alone take this long.
        assert!(start.elapsed() >= NO_RESPONDERS_WAIT * NO_RESPONDERS_RETRIES, "{:?}", start.elapsed());
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
