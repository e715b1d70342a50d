//! Presence as a JetStream KV bucket, `RTP_<session>`: one key per peer, written on every
//! beat; a peer's age is the time since the server stored its last beat.
//!
//! Ages compare the server's timestamps with this host's clock, so hosts and server need
//! clocks kept in step (NTP); an age that would be negative counts as zero. Keys expire
//! after a day without a beat.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use futures::StreamExt;
use roundtable_core::bus::{BusError, Presence};
use roundtable_core::envelope::{PeerId, SessionId};

use crate::{bus_error, open_bucket, token};

/// One session's heartbeats on JetStream (see the module docs).
pub struct NatsPresence {
    kv: kv::Store,
}

impl NatsPresence {
    /// Open (creating when needed) the presence bucket of `session`.
    pub async fn open(
        js: &jetstream::Context,
        session: &SessionId,
    ) -> Result<NatsPresence, BusError> {
        let bucket = format!("RTP_{}", token(session.as_str()));
        let description = format!("heartbeats of session {session}");
        let kv = open_bucket(js, &bucket, description, 1, Duration::from_secs(24 * 3600))
            .await
            .map_err(|e| bus_error(&format!("opening presence of session {session}"), e))?;
        Ok(NatsPresence { kv })
    }
}

#[async_trait]
impl Presence for NatsPresence {
    async fn beat(&self, peer: &PeerId) -> Result<(), BusError> {
        // The key is a token of the peer id; the value is the id itself.
        self.kv
            .put(
                token(peer.as_str()),
                peer.as_str().as_bytes().to_vec().into(),
            )
            .await
            .map_err(|e| bus_error(&format!("heartbeat of {peer}"), e))?;
        Ok(())
    }

    async fn last_seen(&self) -> Result<HashMap<PeerId, Duration>, BusError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| bus_error("listing heartbeats", e))?
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| bus_error("listing heartbeats", e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let mut out = HashMap::new();
        for key in keys {
            let entry = self
                .kv
                .entry(key.as_str())
                .await
                .map_err(|e| bus_error("reading a heartbeat", e))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            let peer = PeerId::from(String::from_utf8_lossy(&entry.value).into_owned());
            let age = u64::try_from(now - entry.created.unix_timestamp_nanos()).unwrap_or(0);
            out.insert(peer, Duration::from_nanos(age));
        }
        Ok(out)
    }
}
