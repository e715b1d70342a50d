//! Presence as a JetStream KV bucket, `RTP_<session>`: one key per peer, written on every
//! beat; a peer's age is the time since the server stored its last beat.
//!
//! Ages compare the server's timestamps with this host's clock, so hosts and server need
//! clocks kept in step (NTP); an age that would be negative counts as zero. Keys expire
//! after a day without a beat.
//!
//! No peer can beat while the server is away, so after an outage every beat is old. An
//! age is therefore counted, at the most, from this process's last (re)connection plus
//! the longest a client waits between reconnection attempts (2 s): a peer is reported
//! silent only when it has stayed silent while it could have been heard, and a server
//! restart never makes peers that were merely cut off by it look absent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use roundtable_core::bus::{BusError, BusErrorKind, Presence};
use roundtable_core::envelope::{PeerId, SessionId};

use crate::{MAX_RECONNECT_DELAY, bus_error, latest_values, open_bucket, token};

/// How long a heartbeat may take before it is given up.
const BEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// One session's heartbeats on JetStream (see the module docs).
pub struct NatsPresence {
    kv: kv::Store,
    client: async_nats::Client,
    /// When this process last (re)connected, in ms since the epoch.
    connected_ms: Arc<AtomicU64>,
}

impl NatsPresence {
    /// Open (creating when needed, with `replicas` copies) the presence bucket of `session`. `connected_ms` is
    /// when this process last (re)connected to the server (ms since the epoch), kept up
    /// to date by the connection.
    pub async fn open(
        js: &jetstream::Context,
        session: &SessionId,
        connected_ms: Arc<AtomicU64>,
        replicas: usize,
    ) -> Result<NatsPresence, BusError> {
        let bucket = format!("RTP_{}", token(session.as_str()));
        let description = format!("heartbeats of session {session}");
        let kv = open_bucket(js, &bucket, description, 1, Duration::from_secs(24 * 3600), replicas)
            .await
            .map_err(|e| bus_error(&format!("opening presence of session {session}"), e))?;
        Ok(NatsPresence { kv, client: js.client(), connected_ms })
    }
}

#[async_trait]
impl Presence for NatsPresence {
    async fn beat(&self, peer: &PeerId) -> Result<(), BusError> {
        // A beat is worth something only now: not queued while the connection is down
        // (it would land late, looking fresh), and not waited for long, so that the
        // next one goes out on time once the server is back.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(BusError::new(BusErrorKind::Unavailable, format!("heartbeat of {peer}: not connected")));
        }
        // The key is a token of the peer id; the value is the id itself.
        let put = self.kv.put(token(peer.as_str()), peer.as_str().as_bytes().to_vec().into());
        match tokio::time::timeout(BEAT_TIMEOUT, put).await {
            Ok(r) => r.map(|_| ()).map_err(|e| bus_error(&format!("heartbeat of {peer}"), e)),
            Err(_) => Err(BusError::new(BusErrorKind::Unavailable, format!("heartbeat of {peer}: timed out"))),
        }
    }

    fn settling(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let heard_from = Duration::from_millis(self.connected_ms.load(Ordering::Relaxed)) + MAX_RECONNECT_DELAY;
        heard_from.saturating_sub(now)
    }

    async fn last_seen(&self) -> Result<HashMap<PeerId, Duration>, BusError> {
        let beats = latest_values(&self.kv).await.map_err(|e| bus_error("reading heartbeats", e))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        let since_connect = now
            - i128::from(self.connected_ms.load(Ordering::Relaxed)) * 1_000_000
            - MAX_RECONNECT_DELAY.as_nanos() as i128;
        Ok(beats
            .into_iter()
            .map(|b| {
                let peer = PeerId::from(String::from_utf8_lossy(&b.value).into_owned());
                let age = (now - b.created_ns).min(since_connect);
                (peer, Duration::from_nanos(u64::try_from(age).unwrap_or(0)))
            })
            .collect())
    }
}
