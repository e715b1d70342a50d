//! The work queue as a JetStream work-queue stream with one shared durable pull consumer.
//!
//! - Stream `RTQ_<session>` (retention: work queue, file storage), one message per task
//!   on `rtq.<session>.tasks`; an ack removes it. Consumer `workers`: explicit acks,
//!   `ack_wait` = [`QueueConfig::lease`]. A claim is a pull of one message; a nack is a
//!   `-NAK` with the delay; progress is `+WPI`. Every ack-kind is sent as a request, so a
//!   call returns once the server has processed it.
//! - Four KV buckets keep what the stream forgets: `RTQT_` the ids of every task ever
//!   pushed (a push is idempotent for good, not only within the stream's 2-minute
//!   `Nats-Msg-Id` window), `RTQA_` the acked tasks, `RTQD_` the dead letters, `RTQL_`
//!   the lease deadlines of tasks in flight (for [`WorkQueue::stats`], kept for two
//!   leases at most).
//!
//! **Round trips.** A task costs its claimer two round trips to the server: the pull,
//! and the ack with its `RTQA_` record and the lease record's removal sent side by side
//! (why their order does not matter is said at `ack`), plus one per extension of the
//! lease (`+WPI` beside its lease record). [`WorkQueue::hold`] answers from the local
//! deadline while an extension covers what the caller asks for. A claim's first lease
//! record, which only feeds [`WorkQueue::stats`], is published without waiting for the
//! server: it lands before anything the claimer sends later on the same connection
//! (its removal included), but `in_flight` may miss a claim made a moment ago on
//! another connection; one lost with its connection expires with the bucket's
//! `max_age`.
//!
//! Two things JetStream does not do the way the queue promises, and how they are closed:
//!
//! - **Stale leases.** The server applies an ack to the message whatever delivery it
//!   names, so an ack from a claimer whose lease ran out would ack the next claimer's
//!   delivery. The queue therefore checks leases itself: a claim's lease is held by the
//!   process that claimed it, until `lease - margin` after the message arrived (or after
//!   the last progress), where the margin is a tenth of the lease, capped at one second.
//!   After that, ack, nack and progress fail with `LeaseLost` without reaching the
//!   server. The server's own deadline is later (it started counting when it sent the
//!   message), so as long as a round trip takes less than the margin, a claimer can
//!   never touch a delivery that is not its own. Only the claiming process can settle a
//!   claim.
//! - **Dead letters.** The consumer's `max_deliver` is left unlimited. A task nacked on
//!   its last delivery is dead-lettered by the nack; a task whose last lease runs out
//!   comes back once more and is dead-lettered by the claim that receives it, instead of
//!   being handed out. Either way the dead letter is written to `RTQD_` before the
//!   message is acked away, so it is never silently lost (a server-side `max_deliver`
//!   would only announce it as an advisory that nobody may be listening to).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use futures::StreamExt;
use roundtable_core::envelope::{PeerId, SessionId};
use roundtable_core::workqueue::{Claim, DeadLetter, QueueConfig, QueueError, QueueErrorKind, QueueStats, WorkQueue};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{latest_values, open_bucket, queue_error, token};

const CONSUMER: &str = "workers";
/// The consumer's description: this, then the queue's `max_deliver`.
const MAX_DELIVER_TAG: &str = "roundtable work queue claimers; max_deliver=";

/// A task as stored on the stream.
#[derive(Serialize, Deserialize)]
struct TaskMessage {
    id: String,
    payload: serde_json::Value,
}

/// A dead letter as stored in `RTQD_`.
#[derive(Serialize, Deserialize)]
struct DeadRecord {
    task_id: String,
    payload: serde_json::Value,
    deliveries: u32,
    /// Found dead by a claim (its last lease ran out), which took one more delivery.
    found_by_claim: bool,
}

/// A claim held by this process.
struct Held {
    task_id: String,
    payload: serde_json::Value,
    delivery: u32,
    stream_seq: u64,
    /// After this, the lease counts as lost (see the module docs).
    deadline: Instant,
}

/// One session's work queue on JetStream (see the module docs).
pub struct NatsWorkQueue {
    config: QueueConfig,
    session: SessionId,
    js: jetstream::Context,
    stream: stream::Stream,
    consumer: consumer::PullConsumer,
    subject: String,
    known: kv::Store,
    acked: kv::Store,
    dead: kv::Store,
    leases: kv::Store,
    held: Mutex<HashMap<String, Held>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lost(claim: &Claim, why: &str) -> QueueError {
    QueueError::new(QueueErrorKind::LeaseLost, format!("task {:?}, delivery {}: {why}", claim.task_id, claim.delivery))
}

impl NatsWorkQueue {
    /// Open (creating when needed, with `replicas` copies of its stream and buckets)
    /// the work queue of `session`. When the queue exists,
    /// it keeps the lease and `max_deliver` it was created with, whatever `config` says
    /// ([`WorkQueue::config`] tells which).
    pub async fn open(
        js: &jetstream::Context,
        session: &SessionId,
        config: QueueConfig,
        replicas: usize,
    ) -> Result<NatsWorkQueue, QueueError> {
        let tok = token(session.as_str());
        let subject = format!("rtq.{tok}.tasks");
        let what = format!("opening the work queue of session {session}");
        let stream = crate::get_or_create_stream(
            js,
            stream::Config {
                name: format!("RTQ_{tok}"),
                description: Some(format!("work queue of session {session}")),
                subjects: vec![subject.clone()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| queue_error(&what, e))?;
        let consumer_config = consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            description: Some(format!("{MAX_DELIVER_TAG}{}", config.max_deliver)),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.lease,
            // Dead letters are handled by the queue (see the module docs).
            max_deliver: -1,
            max_ack_pending: 100_000,
            ..Default::default()
        };
        let consumer = crate::patiently(CONSUMER, || stream.get_or_create_consumer(CONSUMER, consumer_config.clone()))
            .await
            .map_err(|e| queue_error(&what, e))?;
        // The first opener's settings hold for everyone: the lease is the consumer's
        // ack_wait, and max_deliver (enforced by the claimers) is kept in its description.
        let existing = &consumer.cached_info().config;
        let max_deliver = existing
            .description
            .as_deref()
            .and_then(|d| d.strip_prefix(MAX_DELIVER_TAG))
            .and_then(|n| n.parse().ok())
            .unwrap_or(config.max_deliver);
        let config = QueueConfig { lease: existing.ack_wait, max_deliver };
        let bucket = |kind: &str, about: &str, max_age: Duration| {
            let name = format!("RTQ{kind}_{tok}");
            let description = format!("{about} of session {session}");
            let what = &what;
            async move { open_bucket(js, &name, description, 1, max_age, replicas).await.map_err(|e| queue_error(what, e)) }
        };
        // A lease record outlives its lease by one more lease at most: after that its
        // deadline has passed, and the server drops it (and a removal's marker), so that
        // `stats` reads only the records of tasks in flight.
        let lease_records = (config.lease * 2).max(Duration::from_secs(2));
        Ok(NatsWorkQueue {
            config,
            session: session.clone(),
            js: js.clone(),
            stream,
            consumer,
            subject,
            known: bucket("T", "task ids", Duration::ZERO).await?,
            acked: bucket("A", "acked tasks", Duration::ZERO).await?,
            dead: bucket("D", "dead letters", Duration::ZERO).await?,
            leases: bucket("L", "leases", lease_records).await?,
            held: Mutex::default(),
        })
    }

    fn margin(&self) -> Duration {
        (self.config.lease / 10).min(Duration::from_secs(1))
    }

    /// The next message for the consumer, waiting up to `wait`.
    async fn next_message(&self, wait: Duration) -> Result<Option<jetstream::Message>, QueueError> {
        let what = || format!("claiming from the work queue of session {}", self.session);
        let mut batch = if wait < Duration::from_millis(10) {
            self.consumer.fetch().max_messages(1).messages().await.map_err(|e| queue_error(&what(), e))?
        } else {
            self.consumer.batch().max_messages(1).expires(wait).messages().await.map_err(|e| queue_error(&what(), e))?
        };
        match batch.next().await {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(queue_error(&what(), e)),
        }
    }

    /// Send an ack-kind (`+ACK`, `-NAK …`, `+WPI`) for a delivery and wait until the
    /// server has processed it.
    async fn settle(&self, reply: &str, body: String) -> Result<(), QueueError> {
        self.js
            .client()
            .request(reply.to_owned(), body.into())
            .await
            .map(|_| ())
            .map_err(|e| queue_error(&format!("settling a delivery in session {}", self.session), e))
    }

    /// The claim's delivery, if this process still holds its lease.
    fn check_held(&self, claim: &Claim) -> Result<(u64, u32, serde_json::Value), QueueError> {
        let held = self.held.lock().expect("held lock");
        let Some(h) = held.get(&claim.lease).filter(|h| h.task_id == claim.task_id) else {
            return Err(lost(claim, "not held by this process (already settled, or claimed elsewhere)"));
        };
        if Instant::now() >= h.deadline {
            return Err(lost(claim, "the lease ran out"));
        }
        Ok((h.stream_seq, h.delivery, h.payload.clone()))
    }

    fn release(&self, claim: &Claim) {
        self.held.lock().expect("held lock").remove(&claim.lease);
    }

    /// The subject a lease record of `stream_seq` is written on.
    fn lease_subject(&self, stream_seq: u64) -> String {
        format!("{}{stream_seq}", self.leases.put_prefix.as_deref().unwrap_or(&self.leases.prefix))
    }

    async fn forget_lease(&self, stream_seq: u64) -> Result<(), QueueError> {
        self.leases.delete(stream_seq.to_string()).await.map_err(|e| queue_error("removing a lease record", e))
    }

    fn lease_deadline(&self) -> Vec<u8> {
        (now_ms() + self.config.lease.as_millis() as u64).to_string().into_bytes()
    }

    async fn record_lease(&self, stream_seq: u64) -> Result<(), QueueError> {
        self.leases
            .put(stream_seq.to_string(), self.lease_deadline().into())
            .await
            .map(|_| ())
            .map_err(|e| queue_error("recording a lease", e))
    }

    /// Record a new claim's lease without waiting for the server (see the module docs).
    async fn publish_lease(&self, stream_seq: u64) {
        let sent = self.js.client().publish(self.lease_subject(stream_seq), self.lease_deadline().into()).await;
        if let Err(e) = sent {
            tracing::debug!(session = %self.session, stream_seq, error = %e, "recording a lease");
        }
    }

    /// Write the dead letter, then remove the task's message.
    async fn bury(&self, record: DeadRecord, reply: &str, stream_seq: u64) -> Result<(), QueueError> {
        let key = token(&record.task_id);
        let bytes = serde_json::to_vec(&record).expect("dead letter serializes");
        match self.dead.create(key, bytes.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(queue_error("recording a dead letter", e)),
        }
        self.settle(reply, "+ACK".into()).await?;
        self.forget_lease(stream_seq).await
    }

    async fn dead_records(&self) -> Result<Vec<(u64, DeadRecord)>, QueueError> {
        let mut out = Vec::new();
        for entry in latest_values(&self.dead).await.map_err(|e| queue_error("listing dead letters", e))? {
            let record: DeadRecord = serde_json::from_slice(&entry.value)
                .map_err(|e| QueueError::new(QueueErrorKind::Storage, format!("dead letter {}: {e}", entry.key)))?;
            out.push((entry.revision, record));
        }
        out.sort_by_key(|(rev, _)| *rev);
        Ok(out)
    }
}

#[async_trait]
impl WorkQueue for NatsWorkQueue {
    fn config(&self) -> QueueConfig {
        self.config
    }

    async fn push(&self, task_id: &str, payload: serde_json::Value) -> Result<(), QueueError> {
        let key = token(task_id);
        let what = || format!("pushing task {task_id:?} in session {}", self.session);
        if self.known.get(key.as_str()).await.map_err(|e| queue_error(&what(), e))?.is_some() {
            return Ok(());
        }
        let message = serde_json::to_vec(&TaskMessage { id: task_id.to_owned(), payload }).expect("task serializes");
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, key.as_str());
        crate::publish_acked(&self.js, self.subject.clone(), headers, message)
            .await
            .map_err(|e| queue_error(&what(), e))?;
        self.known.put(key, Vec::new().into()).await.map_err(|e| queue_error(&what(), e))?;
        Ok(())
    }

    async fn claim(&self, claimer: &PeerId, wait: Duration) -> Result<Option<Claim>, QueueError> {
        let give_up = Instant::now() + wait;
        loop {
            let Some(m) = self.next_message(give_up.saturating_duration_since(Instant::now())).await? else {
                return Ok(None);
            };
            let received = Instant::now();
            let info = m.info().map_err(|e| queue_error("reading delivery metadata", e))?;
            let (stream_seq, delivery) = (info.stream_sequence, u32::try_from(info.delivered).unwrap_or(u32::MAX));
            let Some(reply) = m.reply.as_ref().map(|r| r.to_string()) else {
                return Err(QueueError::new(QueueErrorKind::Storage, "a delivery without a reply subject"));
            };
            let task: TaskMessage = match serde_json::from_slice(&m.payload) {
                Ok(t) => t,
                Err(e) => {
                    // Not a task this queue wrote: bury it rather than hand it out forever.
                    let raw = String::from_utf8_lossy(&m.payload).into_owned();
                    tracing::warn!(session = %self.session, stream_seq, error = %e, "unreadable task message");
                    let record = DeadRecord {
                        task_id: format!("unreadable-{stream_seq}"),
                        payload: serde_json::Value::String(raw),
                        deliveries: delivery,
                        found_by_claim: true,
                    };
                    self.bury(record, &reply, stream_seq).await?;
                    continue;
                }
            };
            if delivery > 1
                && self.acked.get(token(&task.id)).await.map_err(|e| queue_error("reading acks", e))?.is_some()
            {
                // Acked, but the ack itself did not reach the server: finish it.
                self.settle(&reply, "+ACK".into()).await?;
                self.forget_lease(stream_seq).await?;
                continue;
            }
            let max = self.config.max_deliver;
            if max != 0 && delivery > max {
                let record =
                    DeadRecord { task_id: task.id, payload: task.payload, deliveries: max, found_by_claim: true };
                self.bury(record, &reply, stream_seq).await?;
                continue;
            }
            self.publish_lease(stream_seq).await;
            let deadline = received + self.config.lease - self.margin();
            let mut held = self.held.lock().expect("held lock");
            // Claims whose lease ran out can never be settled: forget them.
            held.retain(|_, h| h.deadline > received);
            held.insert(
                reply.clone(),
                Held { task_id: task.id.clone(), payload: task.payload.clone(), delivery, stream_seq, deadline },
            );
            drop(held);
            return Ok(Some(Claim {
                task_id: task.id,
                payload: task.payload,
                delivery,
                lease: reply,
                claimer: claimer.clone(),
            }));
        }
    }

    async fn ack(&self, claim: &Claim) -> Result<(), QueueError> {
        let (stream_seq, _, _) = self.check_held(claim)?;
        // The ack record, the ack and the lease record's removal go side by side, in one
        // round trip. The ack record matters only when the ack does not reach the
        // server: then the task is redelivered, and the record (if it landed) lets the
        // claim that receives it finish it instead of handing it out again. An ack that
        // landed without its record is never redelivered, so nothing reads the missing
        // record.
        let record = async {
            self.acked
                .put(token(&claim.task_id), Vec::new().into())
                .await
                .map(|_| ())
                .map_err(|e| queue_error("recording an ack", e))
        };
        let (recorded, settled, forgotten) =
            futures::join!(record, self.settle(&claim.lease, "+ACK".into()), self.forget_lease(stream_seq));
        settled?;
        self.release(claim);
        recorded?;
        forgotten
    }

    async fn nack(&self, claim: &Claim, delay: Duration) -> Result<(), QueueError> {
        let (stream_seq, delivery, payload) = self.check_held(claim)?;
        let max = self.config.max_deliver;
        if max != 0 && delivery >= max {
            let record =
                DeadRecord { task_id: claim.task_id.clone(), payload, deliveries: delivery, found_by_claim: false };
            self.bury(record, &claim.lease, stream_seq).await?;
            self.release(claim);
            return Ok(());
        }
        let body = if delay.is_zero() { "-NAK".to_owned() } else { format!("-NAK {{\"delay\":{}}}", delay.as_nanos()) };
        let (settled, forgotten) = futures::join!(self.settle(&claim.lease, body), self.forget_lease(stream_seq));
        settled?;
        self.release(claim);
        forgotten
    }

    async fn progress(&self, claim: &Claim) -> Result<(), QueueError> {
        let (stream_seq, _, _) = self.check_held(claim)?;
        let sent = Instant::now();
        // The extension and its lease record, side by side.
        let (settled, recorded) =
            futures::join!(self.settle(&claim.lease, "+WPI".into()), self.record_lease(stream_seq));
        settled?;
        if let Some(h) = self.held.lock().expect("held lock").get_mut(&claim.lease) {
            h.deadline = sent + self.config.lease - self.margin();
        }
        recorded
    }

    async fn hold(&self, claim: &Claim, at_least: Duration) -> Result<(), QueueError> {
        let deadline = {
            let held = self.held.lock().expect("held lock");
            held.get(&claim.lease).filter(|h| h.task_id == claim.task_id).map(|h| h.deadline)
        };
        // The local deadline is a margin earlier than the server's (see the module
        // docs): while it is `at_least` away, the server cannot redeliver the task
        // within `at_least` plus that margin, and no round trip is needed.
        match deadline {
            Some(d) if d.saturating_duration_since(Instant::now()) >= at_least => Ok(()),
            _ => self.progress(claim).await,
        }
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self
            .dead_records()
            .await?
            .into_iter()
            .map(|(_, r)| DeadLetter { task_id: r.task_id, payload: r.payload, deliveries: r.deliveries })
            .collect())
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let what = "reading work-queue stats";
        let messages = self.stream.get_info().await.map_err(|e| queue_error(what, e))?.state.messages;
        let consumer = self.stream.consumer_info(CONSUMER).await.map_err(|e| queue_error(what, e))?;
        let acked = self.acked.stream.get_info().await.map_err(|e| queue_error(what, e))?.state.messages;
        let dead = self.dead_records().await?;
        let found_by_claim = dead.iter().filter(|(_, r)| r.found_by_claim).count() as u64;
        let now = now_ms();
        // The lease records, read in one go: one per task in flight.
        let in_flight = latest_values(&self.leases)
            .await
            .map_err(|e| queue_error(what, e))?
            .iter()
            .filter(|l| String::from_utf8_lossy(&l.value).parse::<u64>().is_ok_and(|deadline| deadline > now))
            .count() as u64;
        // Every delivery beyond a message's first, less the extra one that found a dead
        // task (see the module docs).
        let deliveries = consumer.delivered.consumer_sequence;
        let first_deliveries = consumer.delivered.stream_sequence;
        Ok(QueueStats {
            pending: messages.saturating_sub(in_flight),
            in_flight,
            acked,
            dead: dead.len() as u64,
            redeliveries: deliveries.saturating_sub(first_deliveries).saturating_sub(found_by_claim),
        })
    }
}
