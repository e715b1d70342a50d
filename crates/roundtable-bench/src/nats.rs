//! Workload 5, NATS: Roundtable's parts over a nats-server of the benchmark's own,
//! measured against raw NATS on the same server.
//!
//! - Latency, one message at a time (the next is sent when the previous one arrived):
//!   a direct message through Roundtable (one peer appends an envelope addressed to
//!   another; the time until the addressee's tail yields it), a Roundtable round trip
//!   (the addressee answers with a direct message of its own), and, for comparison,
//!   raw core-NATS publish → subscriber, raw request/reply, and a raw JetStream publish
//!   until its acknowledgement.
//! - Work-queue throughput: `tasks` pushed by `claimers` concurrent pushers, then
//!   claimed and acked by `claimers` concurrent claimers, each on a connection of its
//!   own (as peers in separate processes would be).
//! - Session-log append throughput: one appender awaiting each append, then
//!   `appenders` concurrent appenders sharing one connection (peers of one process).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use roundtable_core::bus::Backend;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::SessionLog;
use roundtable_core::trust::{SecretKey, Signers};
use roundtable_core::workqueue::{QueueConfig, WorkQueue};
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::mock::REPLY;

/// Settings of the NATS workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NatsConfig {
    /// Messages timed per latency measurement (after `samples / 10` untimed ones).
    pub samples: usize,
    /// Tasks through the work queue.
    pub tasks: usize,
    /// Concurrent claimers (and pushers).
    pub claimers: usize,
    /// Envelopes appended per append measurement.
    pub appends: usize,
    /// Concurrent appenders.
    pub appenders: usize,
    /// Sessions whose peers sign every envelope and whose readers verify each one
    /// (a task naming the peers' public keys opens every session).
    #[serde(default)]
    pub signed: bool,
}

/// What one NATS run measured. Latencies are in µs.
#[derive(Clone, Debug, Serialize)]
pub struct NatsResult {
    pub workload: &'static str,
    #[serde(flatten)]
    pub config: NatsConfig,
    pub server_version: String,
    /// Bytes of a direct-message envelope as stored; raw messages carry as many.
    pub message_bytes: usize,
    pub raw_pubsub_p50_us: f64,
    pub raw_pubsub_p99_us: f64,
    pub raw_request_p50_us: f64,
    pub raw_request_p99_us: f64,
    pub js_publish_p50_us: f64,
    pub js_publish_p99_us: f64,
    /// A Roundtable append returning (the sender's side of a direct message).
    pub append_p50_us: f64,
    pub append_p99_us: f64,
    /// A direct message: from the sender's append to the addressee's tail yielding it.
    pub dm_p50_us: f64,
    pub dm_p99_us: f64,
    /// `dm_p50_us / raw_request_p50_us` (target ≤ 2).
    pub dm_over_raw_request_p50: f64,
    /// A direct message and its answer: from the first append to the sender's tail
    /// yielding the answer.
    pub dm_roundtrip_p50_us: f64,
    pub dm_roundtrip_p99_us: f64,
    pub queue_pushes_per_sec: f64,
    pub queue_claim_acks_per_sec: f64,
    /// `tasks` over the push and claim-ack phases together.
    pub queue_tasks_per_sec: f64,
    pub append_sequential_per_sec: f64,
    pub append_concurrent_per_sec: f64,
    /// Signing one direct-message envelope (canonical encoding and Ed25519), in µs.
    pub sign_us: f64,
    /// Verifying one (canonical encoding of the parsed envelope and Ed25519), in µs.
    pub verify_us: f64,
}

/// The `q`-quantile of samples (nearest rank), in µs.
fn quantile_us(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1e6
}

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn dm(session: &SessionId, from: &PeerId, to: &PeerId, step: String) -> Envelope {
    Envelope::new(session, from, step, Kind::Message, Recipient::Peer(to.clone()), Body::text(REPLY))
}

/// Run the NATS workload once, on a nats-server started for it.
pub async fn nats(cfg: NatsConfig) -> Result<NatsResult, String> {
    let server = tokio::task::spawn_blocking(NatsServer::start).await.map_err(|e| e.to_string())?;
    let result = run(&server.url(), cfg).await;
    drop(server);
    result
}

/// The keys of the benchmark's peers (`a`, `b` and the concurrent appenders `p…`) and
/// the plan whose task names them.
struct Keys {
    plan: roundtable_core::team::TeamPlan,
    signers: Signers,
}

fn keys(cfg: NatsConfig) -> Result<Keys, String> {
    let mut signers = Signers::default();
    let mut peers = String::new();
    let ids = ["a".to_owned(), "b".to_owned()].into_iter().chain((0..cfg.appenders.max(1)).map(|w| format!("p{w}")));
    for id in ids {
        let key = SecretKey::generate();
        peers.push_str(&format!(
            "[[peers]]\nid = \"{id}\"\nmodel = \"s\"\npublic_key = \"{}\"\n",
            key.public().to_hex()
        ));
        signers.insert(PeerId::from(id), key);
    }
    let src = format!(
        "name = \"bench\"\n[models.s]\nprovider = \"scripted\"\nreplies = [\"x\"]\n{peers}[protocol]\nkind = \"round_robin\"\n"
    );
    let plan = roundtable_core::team::parse_team("bench.toml", &src, &roundtable_core::team::NoEnv)
        .map_err(|e| e.to_string())?;
    Ok(Keys { plan, signers })
}

/// Open `session` for the benchmark: with a signed task first when `keys` are given.
async fn open(backend: &NatsBackend, session: &SessionId, keys: Option<&Keys>) -> Result<Arc<dyn SessionLog>, String> {
    let log = backend.logs().open(session, true).await.map_err(|e| err("opening the log")(&e))?;
    if let Some(k) = keys {
        roundtable_core::runner::open_session(log.as_ref(), &k.plan, "bench").await.map_err(|e| err("the task")(&e))?;
    }
    Ok(log)
}

/// Sign and verify `n` direct messages: the µs each takes.
fn sign_verify(keys: &Keys, n: usize) -> (f64, f64) {
    let session = SessionId::from("sign-bench");
    let (pa, pb) = (PeerId::from("a"), PeerId::from("b"));
    let roster = roundtable_core::trust::Roster::of_plan(&keys.plan).ok().flatten().expect("the plan names keys");
    let mut envs: Vec<Envelope> = (0..n).map(|i| dm(&session, &pa, &pb, format!("dm/{i}"))).collect();
    let t0 = Instant::now();
    for env in &mut envs {
        keys.signers.sign(env);
    }
    let signing = t0.elapsed();
    let wire: Vec<Envelope> =
        envs.iter().map(|e| Envelope::from_json(e.to_json().as_bytes()).expect("parses")).collect();
    let t0 = Instant::now();
    for env in &wire {
        roster.verify(env).expect("verifies");
    }
    let verifying = t0.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    (per(signing), per(verifying))
}

async fn run(url: &str, cfg: NatsConfig) -> Result<NatsResult, String> {
    let keys = if cfg.signed { Some(keys(cfg)?) } else { None };
    let signers = keys.as_ref().map(|k| k.signers.clone()).unwrap_or_default();
    let a = NatsBackend::connect(url).await.map_err(|e| err("connecting")(&e))?.with_signers(signers.clone());
    let b = NatsBackend::connect(url).await.map_err(|e| err("connecting")(&e))?.with_signers(signers);
    let warmup = (cfg.samples / 10).max(1);
    let session = roundtable_core::session::new_session_id();
    let (pa, pb) = (PeerId::from("a"), PeerId::from("b"));
    let message_bytes = dm(&session, &pa, &pb, "dm/0".into()).to_json().len();
    let payload = vec![b'x'; message_bytes];

    // Raw core NATS: publish → subscriber, one way.
    // A flush only writes the socket: the server may not have the subscription yet, so
    // publish until one arrives.
    let mut sub = b.client().subscribe("bench.oneway").await.map_err(|e| err("subscribing")(&e))?;
    let ready = Instant::now() + Duration::from_secs(10);
    loop {
        a.client().publish("bench.oneway", payload.clone().into()).await.map_err(|e| err("publishing")(&e))?;
        if tokio::time::timeout(Duration::from_millis(100), sub.next()).await.is_ok() {
            break;
        }
        if Instant::now() > ready {
            return Err("the subscriber never received a message".into());
        }
    }
    let mut oneway = Vec::with_capacity(cfg.samples);
    for i in 0..warmup + cfg.samples {
        let t0 = Instant::now();
        a.client().publish("bench.oneway", payload.clone().into()).await.map_err(|e| err("publishing")(&e))?;
        sub.next().await.ok_or("the subscription ended")?;
        if i >= warmup {
            oneway.push(t0.elapsed());
        }
    }
    drop(sub);

    // Raw core NATS request/reply: a responder echoes the payload back.
    let mut echo = b.client().subscribe("bench.echo").await.map_err(|e| err("subscribing")(&e))?;
    let responder = {
        let client = b.client().clone();
        tokio::spawn(async move {
            while let Some(m) = echo.next().await {
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, m.payload).await;
                }
            }
        })
    };
    // Until the server has the responder's subscription, requests find no responders.
    let ready = Instant::now() + Duration::from_secs(10);
    while let Err(e) = a.client().request("bench.echo", payload.clone().into()).await {
        if Instant::now() > ready {
            return Err(format!("requesting: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut request = Vec::with_capacity(cfg.samples);
    for i in 0..warmup + cfg.samples {
        let t0 = Instant::now();
        a.client().request("bench.echo", payload.clone().into()).await.map_err(|e| err("requesting")(&e))?;
        if i >= warmup {
            request.push(t0.elapsed());
        }
    }
    responder.abort();

    // Raw JetStream: publish to a file-backed stream and wait for the server's ack.
    let js = a.jetstream();
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.js.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| err("creating the stream")(&e))?;
    let mut js_publish = Vec::with_capacity(cfg.samples);
    for i in 0..warmup + cfg.samples {
        let t0 = Instant::now();
        js.publish(format!("bench.js.{i}"), payload.clone().into())
            .await
            .map_err(|e| err("publishing")(&e))?
            .await
            .map_err(|e| err("publish ack")(&e))?;
        if i >= warmup {
            js_publish.push(t0.elapsed());
        }
    }

    // Roundtable direct messages: a appends, b's tail sees it (and answers on pong/i).
    let log_a = open(&a, &session, keys.as_ref()).await?;
    let log_b = b.logs().open(&session, false).await.map_err(|e| err("opening the log")(&e))?;
    let (seen_b, mut at_b) = mpsc::unbounded_channel::<(Arc<str>, Instant)>();
    let (seen_a, mut at_a) = mpsc::unbounded_channel::<(Arc<str>, Instant)>();
    let watch = |log: Arc<dyn SessionLog>, me: PeerId, tx: mpsc::UnboundedSender<(Arc<str>, Instant)>| async move {
        let mut tail = log.tail(1).await.map_err(|e| err("tailing")(&e))?;
        while let Some(e) = tail.next().await {
            let e = e.map_err(|e| err("tailing")(&e))?;
            if e.env.from != me && e.env.visible_to(&me, None) && tx.send((e.env.step.clone(), Instant::now())).is_err()
            {
                break;
            }
        }
        Ok::<(), String>(())
    };
    let tail_a = tokio::spawn(watch(log_a.clone(), pa.clone(), seen_a));
    let tail_b = tokio::spawn(watch(log_b.clone(), pb.clone(), seen_b));
    let mut appends = Vec::with_capacity(cfg.samples);
    let mut dms = Vec::with_capacity(cfg.samples);
    for i in 0..warmup + cfg.samples {
        let step = format!("dm/{i}");
        let t0 = Instant::now();
        log_a.append(dm(&session, &pa, &pb, step.clone())).await.map_err(|e| err("appending")(&e))?;
        let appended = t0.elapsed();
        let (got, t1) = at_b.recv().await.ok_or("b's tail ended")?;
        if *got != *step {
            return Err(format!("b's tail yielded {got}, expected {step}"));
        }
        if i >= warmup {
            appends.push(appended);
            dms.push(t1 - t0);
        }
    }
    let mut roundtrips = Vec::with_capacity(cfg.samples);
    for i in 0..warmup + cfg.samples {
        let (ping, pong) = (format!("ping/{i}"), format!("pong/{i}"));
        let t0 = Instant::now();
        log_a.append(dm(&session, &pa, &pb, ping.clone())).await.map_err(|e| err("appending")(&e))?;
        let (got, _) = at_b.recv().await.ok_or("b's tail ended")?;
        if *got != *ping {
            return Err(format!("b's tail yielded {got}, expected {ping}"));
        }
        log_b.append(dm(&session, &pb, &pa, pong.clone())).await.map_err(|e| err("appending")(&e))?;
        let (got, t1) = at_a.recv().await.ok_or("a's tail ended")?;
        if *got != *pong {
            return Err(format!("a's tail yielded {got}, expected {pong}"));
        }
        if i >= warmup {
            roundtrips.push(t1 - t0);
        }
    }
    tail_a.abort();
    tail_b.abort();

    let (pushes, claim_acks) = work_queue(url, cfg).await?;
    let (sequential, concurrent) = log_appends(&a, cfg, keys.as_ref()).await?;
    let (sign_us, verify_us) = keys.as_ref().map_or((0.0, 0.0), |k| sign_verify(k, cfg.samples.max(1000)));

    let raw_request_p50 = quantile_us(&mut request, 0.5);
    let dm_p50 = quantile_us(&mut dms, 0.5);
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    Ok(NatsResult {
        workload: "nats",
        config: cfg,
        server_version: a.client().server_info().version,
        message_bytes,
        raw_pubsub_p50_us: quantile_us(&mut oneway, 0.5),
        raw_pubsub_p99_us: quantile_us(&mut oneway, 0.99),
        raw_request_p50_us: raw_request_p50,
        raw_request_p99_us: quantile_us(&mut request, 0.99),
        js_publish_p50_us: quantile_us(&mut js_publish, 0.5),
        js_publish_p99_us: quantile_us(&mut js_publish, 0.99),
        append_p50_us: quantile_us(&mut appends, 0.5),
        append_p99_us: quantile_us(&mut appends, 0.99),
        dm_p50_us: dm_p50,
        dm_p99_us: quantile_us(&mut dms, 0.99),
        dm_over_raw_request_p50: if raw_request_p50 > 0.0 { dm_p50 / raw_request_p50 } else { 0.0 },
        dm_roundtrip_p50_us: quantile_us(&mut roundtrips, 0.5),
        dm_roundtrip_p99_us: quantile_us(&mut roundtrips, 0.99),
        queue_pushes_per_sec: cfg.tasks as f64 / secs(pushes),
        queue_claim_acks_per_sec: cfg.tasks as f64 / secs(claim_acks),
        queue_tasks_per_sec: cfg.tasks as f64 / secs(pushes + claim_acks),
        append_sequential_per_sec: cfg.appends as f64 / secs(sequential),
        append_concurrent_per_sec: cfg.appends as f64 / secs(concurrent),
        sign_us,
        verify_us,
    })
}

/// Push `tasks` with `claimers` concurrent pushers, then claim and ack them all with
/// `claimers` concurrent claimers; each on a connection of its own. The two phases'
/// durations.
async fn work_queue(url: &str, cfg: NatsConfig) -> Result<(Duration, Duration), String> {
    let session = roundtable_core::session::new_session_id();
    let n = cfg.claimers.max(1);
    let mut queues: Vec<Arc<dyn WorkQueue>> = Vec::with_capacity(n);
    for _ in 0..n {
        let backend = NatsBackend::connect(url).await.map_err(|e| err("connecting")(&e))?;
        queues.push(backend.work_queue(&session, QueueConfig::default()).await.map_err(|e| err("opening")(&e))?);
    }
    let start = Instant::now();
    let mut pushers = tokio::task::JoinSet::new();
    for (w, q) in queues.iter().enumerate() {
        let q = q.clone();
        let mine: Vec<usize> = (w..cfg.tasks).step_by(n).collect();
        pushers.spawn(async move {
            for t in mine {
                q.push(&format!("task-{t}"), serde_json::json!({ "n": t })).await.map_err(|e| err("pushing")(&e))?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = pushers.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let pushed = start.elapsed();

    let done = Arc::new(AtomicU64::new(0));
    let total = cfg.tasks as u64;
    let start = Instant::now();
    let mut claimers = tokio::task::JoinSet::new();
    for (w, q) in queues.iter().enumerate() {
        let (q, done) = (q.clone(), done.clone());
        let me = PeerId::from(format!("c{w}"));
        claimers.spawn(async move {
            let mut mine = 0u64;
            while done.load(Ordering::Relaxed) < total {
                match q.claim(&me, Duration::from_millis(100)).await.map_err(|e| err("claiming")(&e))? {
                    Some(c) => {
                        q.ack(&c).await.map_err(|e| err("acking")(&e))?;
                        done.fetch_add(1, Ordering::Relaxed);
                        mine += 1;
                    }
                    None if start.elapsed() > Duration::from_secs(300) => {
                        return Err("the work queue did not drain within 300 s".to_string());
                    }
                    None => {}
                }
            }
            Ok::<u64, String>(mine)
        });
    }
    let mut acked = 0;
    while let Some(r) = claimers.join_next().await {
        acked += r.map_err(|e| e.to_string())??;
    }
    let claimed = start.elapsed();
    if acked != total {
        return Err(format!("pushed {total} tasks, acked {acked}"));
    }
    let stats = queues[0].stats().await.map_err(|e| err("reading stats")(&e))?;
    if stats.acked != total || stats.pending != 0 || stats.redeliveries != 0 {
        return Err(format!("after the run the queue says {stats:?}"));
    }
    Ok((pushed, claimed))
}

/// Append `appends` envelopes one at a time, then with `appenders` concurrent appenders
/// on one connection (each to a fresh session). The two durations.
async fn log_appends(
    backend: &NatsBackend,
    cfg: NatsConfig,
    keys: Option<&Keys>,
) -> Result<(Duration, Duration), String> {
    let from = PeerId::from("a");
    let task = usize::from(keys.is_some());
    let session = roundtable_core::session::new_session_id();
    let log = open(backend, &session, keys).await?;
    let start = Instant::now();
    for i in 0..cfg.appends {
        let env = Envelope::new(&session, &from, format!("s/{i}"), Kind::Message, Recipient::All, Body::text(REPLY));
        log.append(env).await.map_err(|e| err("appending")(&e))?;
    }
    let sequential = start.elapsed();
    check_last(log.as_ref(), cfg.appends + task).await?;

    let session = roundtable_core::session::new_session_id();
    let log = open(backend, &session, keys).await?;
    let n = cfg.appenders.max(1);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..n {
        let (log, session) = (log.clone(), session.clone());
        let from = PeerId::from(format!("p{w}"));
        let mine: Vec<usize> = (w..cfg.appends).step_by(n).collect();
        tasks.spawn(async move {
            for i in mine {
                let env =
                    Envelope::new(&session, &from, format!("c/{i}"), Kind::Message, Recipient::All, Body::text(REPLY));
                log.append(env).await.map_err(|e| err("appending")(&e))?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let concurrent = start.elapsed();
    check_last(log.as_ref(), cfg.appends + task).await?;
    Ok((sequential, concurrent))
}

async fn check_last(log: &dyn SessionLog, expected: usize) -> Result<(), String> {
    let last = log.last_seq().await.map_err(|e| err("reading the log")(&e))?;
    if last != expected as u64 {
        return Err(format!("appended {expected} envelopes, the log ends at {last}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_nats_measurement_runs_and_counts_what_it_claims() {
        let r = nats(NatsConfig { samples: 20, tasks: 30, claimers: 4, appends: 40, appenders: 4, signed: false })
            .await
            .unwrap();
        assert!(r.message_bytes > REPLY.len());
        for v in [r.raw_pubsub_p50_us, r.raw_request_p50_us, r.js_publish_p50_us, r.append_p50_us, r.dm_p50_us] {
            assert!(v > 0.0, "{r:?}");
        }
        assert!(r.dm_p99_us >= r.dm_p50_us && r.dm_roundtrip_p50_us > 0.0);
        assert!(r.queue_tasks_per_sec > 0.0 && r.append_sequential_per_sec > 0.0 && r.append_concurrent_per_sec > 0.0);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut xs: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(quantile_us(&mut xs, 0.5), 50.0);
        assert_eq!(quantile_us(&mut xs, 0.99), 99.0);
        assert_eq!(quantile_us(&mut [], 0.5), 0.0);
    }
}
