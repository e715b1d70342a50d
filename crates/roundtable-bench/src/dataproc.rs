//! Negotiated data processing: events with skewed costs on a JetStream stream,
//! processed by agent processes that share the work out among themselves (work
//! stealing recorded on the blackboard), against a coordinator process that assigns it
//! (the baseline), on the same NATS server.
//!
//! # The workload
//! `partitions` partitions of `events` events each; the first `hot` partitions are hot
//! (each event costs `hot_ms`), the others cold (`cold_ms`). Processing is simulated
//! work: a sleep of the event's cost. Every event is on the stream `DPE_<run>`, one
//! subject per event (`dpe.<run>.<partition>.<index>`), published before the agents
//! start: a backlog to drain. The unit of work is a batch of `batch` consecutive events
//! of one partition.
//!
//! # What "processed" means, and how it is counted
//! An agent records each event it has processed as a `work` envelope on the run's
//! session log, with an id derived from the event alone (a collective id), so the log
//! holds an event's completion at most once whoever records it. The harness counts
//! from the log: events lost (no record) and events recorded twice (two records of one
//! event: 0 by construction, counted anyway). An agent that takes over a batch from a
//! dead one first looks each event up on the log and skips the recorded ones; an append
//! the log refuses as a duplicate (the work was done again) is reported by the agent
//! as a re-execution.
//!
//! # Peer to peer: work stealing on the blackboard
//! Each agent owns the partitions `p` with `p % agents == index` and claims their
//! batches in order by creating the batch's key on the blackboard (`create` succeeds
//! for one claimer only). With nothing of its own left, it steals: it claims other
//! partitions' batches from the back of the backlog. A batch claimed by an agent whose
//! heartbeats stopped (`absent_after`) and not finished (no `done` key) is taken over
//! by compare-and-set on the claim's revision, so by one agent. Why stealing and not
//! contract-net bids: a claim is one compare-and-set, where an announcement, bids from
//! every agent and an award are three log round trips per batch, and waiting for the
//! bids of an agent that has just died stalls the award until it is noticed absent;
//! load needs no bid, since only an idle agent steals.
//!
//! # The baseline: a coordinator that assigns
//! One coordinator process waits for every agent's first heartbeat, then hands out
//! batches in backlog order over core NATS, keeping two batches in flight per agent
//! (so an agent never waits for the round trip); an agent reports each batch done and
//! gets the next. An agent silent for `absent_after` loses its batches to the front of
//! the backlog. The coordinator ends the run when every batch is reported.
//!
//! # A server that restarts
//! Events, the log and the blackboard are on JetStream and survive a server restart
//! (SIGKILL included: an acknowledged write is on disk); calls made while the server is
//! away are made again once it is back (the patient backend for the log and the board;
//! [`again`] for heartbeat reads and event reads). Core NATS keeps nothing: an
//! assignment or a report in flight when the server dies, or published before its
//! receiver has subscribed again, is gone. So the coordinator sends every batch it has
//! in flight again when its own connection comes back, and an agent whose connection
//! comes back says so (`hello`), and gets its batches in flight sent again. A batch sent
//! again is processed like a dead agent's — each event looked up on the log first, the
//! recorded ones skipped — so one the agent already did is only reported again, and a
//! report for a batch no longer in flight is ignored. An agent also ends when the log
//! holds every event, in case the coordinator's `stop` is lost.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use roundtable_core::blackboard::{Blackboard, BoardErrorKind};
use roundtable_core::bus::{Backend, Presence};
use roundtable_core::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::SessionLog;
use roundtable_nats::NatsBackend;
use serde::{Deserialize, Serialize};

/// How the work is shared out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Agents claim and steal batches on the blackboard.
    PeerToPeer,
    /// A coordinator process assigns batches.
    Coordinator,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "p2p" | "peer_to_peer" => Some(Mode::PeerToPeer),
            "coordinator" => Some(Mode::Coordinator),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::PeerToPeer => "p2p",
            Mode::Coordinator => "coordinator",
        }
    }
}

/// The workload (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workload {
    pub agents: usize,
    pub partitions: usize,
    pub events: usize,
    pub hot: usize,
    pub hot_ms: u64,
    pub cold_ms: u64,
    pub batch: usize,
    /// An agent silent this long is taken for dead.
    pub absent_after_ms: u64,
}

impl Workload {
    pub fn total(&self) -> usize {
        self.partitions * self.events
    }
    pub fn batches_per_partition(&self) -> usize {
        self.events.div_ceil(self.batch)
    }
    /// Every batch, in backlog order (partition by partition).
    pub fn batches(&self) -> Vec<(usize, usize)> {
        (0..self.partitions).flat_map(|p| (0..self.batches_per_partition()).map(move |b| (p, b))).collect()
    }
    fn cost(&self, p: usize) -> Duration {
        Duration::from_millis(if p < self.hot { self.hot_ms } else { self.cold_ms })
    }
    /// The sum of every event's cost: the work to do, in ms.
    pub fn work_ms(&self) -> u64 {
        (0..self.partitions).map(|p| self.cost(p).as_millis() as u64 * self.events as u64).sum()
    }
    fn events_of(&self, (_, b): (usize, usize)) -> std::ops::Range<usize> {
        b * self.batch..((b + 1) * self.batch).min(self.events)
    }
    /// Check every value; the first out of range, named with its valid range.
    pub fn check(&self) -> Result<(), String> {
        let checks: [(&str, usize, usize, usize); 5] = [
            ("--agents", self.agents, 1, 200),
            ("--partitions", self.partitions, 1, 10_000),
            ("--events", self.events, 1, 100_000),
            ("--batch", self.batch, 1, 100_000),
            ("--hot", self.hot, 0, self.partitions),
        ];
        for (flag, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{flag} {v}: valid: {lo} to {hi}"));
            }
        }
        for (flag, v) in [("--hot-ms", self.hot_ms), ("--cold-ms", self.cold_ms)] {
            if v > 60_000 {
                return Err(format!("{flag} {v}: valid: 0 to 60000"));
            }
        }
        if !(100..=600_000).contains(&self.absent_after_ms) {
            return Err(format!("--absent-after-ms {}: valid: 100 to 600000", self.absent_after_ms));
        }
        if self.total() > 1_000_000 {
            return Err(format!("{} events in all: valid: at most 1000000", self.total()));
        }
        Ok(())
    }
}

pub fn session_of(run: &str) -> SessionId {
    SessionId::from(format!("dataproc-{run}"))
}

fn stream_name(run: &str) -> String {
    format!("DPE_{}", roundtable_nats::token(run))
}

fn event_subject(run: &str, p: usize, i: usize) -> String {
    format!("dpe.{}.{p}.{i}", roundtable_nats::token(run))
}

fn event_id(w: &Workload, p: usize, i: usize) -> usize {
    p * w.events + i
}

fn record_id(session: &SessionId, event: usize) -> EnvelopeId {
    EnvelopeId::derive(session, &PeerId::from("*"), &format!("event/{event}"))
}

fn claim_key((p, b): (usize, usize)) -> String {
    format!("claim-{p}-{b}")
}

fn done_key((p, b): (usize, usize)) -> String {
    format!("done-{p}-{b}")
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a call is made again while it fails (a server restarting is back well
/// within it); after that its error stands.
const PATIENCE: Duration = Duration::from_secs(60);

/// `call` until it succeeds, for at most [`PATIENCE`]: for the reads the patient backend
/// does not cover (heartbeats, events on their stream), which fail while the server is
/// away. Every call retried here only reads.
pub async fn again<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, Error>
where
    E: Into<Error>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(_) if start.elapsed() < PATIENCE => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                let e: Error = e.into();
                return Err(format!("{what}: {e}").into());
            }
        }
    }
}

/// Publish every event of the workload on the run's stream (created here).
pub async fn publish_events(backend: &NatsBackend, run: &str, w: &Workload) -> Result<(), Error> {
    let js = backend.jetstream();
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream_name(run),
        subjects: vec![format!("dpe.{}.>", roundtable_nats::token(run))],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let mut acks = Vec::new();
    for p in 0..w.partitions {
        for i in 0..w.events {
            let cost = w.cost(p).as_millis() as u64;
            let body = serde_json::json!({ "event": event_id(w, p, i), "partition": p, "cost_ms": cost });
            acks.push(js.publish(event_subject(run, p, i), body.to_string().into()).await?);
            if acks.len() >= 256 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// What one agent did, printed as JSON when it exits.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AgentReport {
    pub agent: String,
    pub batches: usize,
    pub stolen: usize,
    pub taken_over: usize,
    pub processed: usize,
    /// Events processed whose record the log refused as already there.
    pub reexecuted: usize,
}

/// One agent process: connect, heartbeat, process, report.
pub async fn agent(url: &str, run: &str, w: &Workload, index: usize, mode: Mode) -> Result<AgentReport, Error> {
    let backend = NatsBackend::connect(url).await?.patient();
    let session = session_of(run);
    let me = PeerId::from(format!("agent-{index}"));
    let log = backend.logs().open(&session, true).await?;
    let presence = backend.presence(&session).await?;
    let stream = backend.jetstream().get_stream(stream_name(run)).await?;
    // Heard from before claiming anything, so no one takes this agent's claims for a
    // dead one's. The bucket may have been created a moment ago by another agent, and
    // the server may not route to it yet ("no stream found"): ask again, for a while.
    let mut tries = 0;
    loop {
        match presence.beat(&me).await {
            Ok(()) => break,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let beat = {
        let (presence, me) = (presence.clone(), me.clone());
        tokio::spawn(async move {
            loop {
                let _ = presence.beat(&me).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let worker = Worker { w: w.clone(), run: run.to_owned(), session, log, stream };
    let mut report = AgentReport { agent: me.to_string(), ..AgentReport::default() };
    let result = match mode {
        Mode::PeerToPeer => {
            let board = backend.blackboard(&worker.session).await?;
            // The same as for heartbeats: the bucket another agent created a moment ago
            // may not be routed yet ("no stream found"), so the first write is made
            // again until it lands; it marks the agent as started.
            let started = format!("started-{index}");
            again("the first write to the blackboard", || board.put(&started, me.as_str().as_bytes().to_vec())).await?;
            steal_loop(&worker, &board, &presence, &me, index, &mut report).await
        }
        Mode::Coordinator => assigned_loop(&worker, backend.client(), &me, &mut report).await,
    };
    beat.abort();
    result.map(|()| report)
}

struct Worker {
    w: Workload,
    run: String,
    session: SessionId,
    log: Arc<dyn SessionLog>,
    stream: async_nats::jetstream::stream::Stream,
}

impl Worker {
    /// Process one batch: each event read from the stream, worked on, recorded. With
    /// `recheck`, events already recorded (by an agent that died) are skipped.
    async fn process(
        &self,
        batch: (usize, usize),
        me: &PeerId,
        recheck: bool,
        r: &mut AgentReport,
    ) -> Result<(), Error> {
        let (p, _) = batch;
        for i in self.w.events_of(batch) {
            let event = event_id(&self.w, p, i);
            let id = record_id(&self.session, event);
            if recheck && self.log.seq_of(&id).await?.is_some() {
                continue;
            }
            let subject = event_subject(&self.run, p, i);
            let msg = again("reading an event", || self.stream.get_last_raw_message_by_subject(&subject)).await?;
            let body: serde_json::Value = serde_json::from_slice(&msg.payload)?;
            let cost = body["cost_ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(cost)).await;
            let env = Envelope::with_id(
                id.clone(),
                &self.session,
                me,
                Arc::from(format!("event/{event}")),
                Kind::Work,
                Recipient::All,
                Body::text(format!("event {event} done")).with_json(serde_json::json!({
                    "event": event, "partition": p, "batch": batch.1, "by": me.as_str(),
                })),
            );
            let appended = self.log.append(env).await?;
            if appended.duplicate && !self.recorded_by(&id, me).await? {
                r.reexecuted += 1;
            } else {
                r.processed += 1;
            }
        }
        r.batches += 1;
        Ok(())
    }

    /// Whether the record `id` on the log is `me`'s: an append retried across a server
    /// restart finds its own first attempt there (the work was done once).
    async fn recorded_by(&self, id: &EnvelopeId, me: &PeerId) -> Result<bool, Error> {
        let Some(seq) = self.log.seq_of(id).await? else { return Ok(false) };
        let entry = self.log.read(seq, 1).await?;
        Ok(entry.first().and_then(|e| e.env.body.json.as_ref()?.get("by")?.as_str().map(|by| by == me.as_str()))
            == Some(true))
    }

    async fn all_done(&self) -> Result<bool, Error> {
        Ok(self.log.last_seq().await? >= self.w.total() as u64)
    }
}

async fn claim(board: &Arc<dyn Blackboard>, batch: (usize, usize), me: &PeerId) -> Result<bool, Error> {
    match board.create(&claim_key(batch), me.as_str().as_bytes().to_vec()).await {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), BoardErrorKind::AlreadyExists | BoardErrorKind::WrongLastRevision) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn steal_loop(
    wk: &Worker,
    board: &Arc<dyn Blackboard>,
    presence: &Arc<dyn Presence>,
    me: &PeerId,
    index: usize,
    r: &mut AgentReport,
) -> Result<(), Error> {
    let w = &wk.w;
    let all = w.batches();
    let own: Vec<_> = all.iter().copied().filter(|(p, _)| p % w.agents == index).collect();
    // Thieves start from the back of the backlog, each at its own offset.
    let mut others: Vec<_> = all.iter().copied().filter(|(p, _)| p % w.agents != index).rev().collect();
    let offset = if others.is_empty() { 0 } else { index * others.len() / w.agents.max(1) };
    others.rotate_left(offset);
    let mut known_claimed: BTreeSet<(usize, usize)> = BTreeSet::new();
    let absent_after = Duration::from_millis(w.absent_after_ms);
    loop {
        let mut did = false;
        for b in own.iter().chain(others.iter()) {
            if known_claimed.contains(b) {
                continue;
            }
            known_claimed.insert(*b);
            if claim(board, *b, me).await? {
                if !own.contains(b) {
                    r.stolen += 1;
                }
                wk.process(*b, me, false, r).await?;
                board.put(&done_key(*b), me.as_str().as_bytes().to_vec()).await?;
                did = true;
                break;
            }
        }
        if did {
            continue;
        }
        if wk.all_done().await? {
            return Ok(());
        }
        // Nothing left to claim: take over a batch of an agent that stopped beating.
        let seen = again("reading heartbeats", || presence.last_seen()).await?;
        for b in &all {
            let Some(claim) = board.get(&claim_key(*b)).await? else { continue };
            let owner = PeerId::from(String::from_utf8_lossy(&claim.value).as_ref());
            if owner == *me || seen.get(&owner).is_some_and(|age| *age < absent_after) {
                continue;
            }
            if board.get(&done_key(*b)).await?.is_some() {
                continue;
            }
            match board.update(&claim_key(*b), me.as_str().as_bytes().to_vec(), claim.revision).await {
                Ok(_) => {
                    r.taken_over += 1;
                    wk.process(*b, me, true, r).await?;
                    board.put(&done_key(*b), me.as_str().as_bytes().to_vec()).await?;
                    did = true;
                    break;
                }
                Err(e) if e.kind() == BoardErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !did {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn assign_subject(run: &str, agent: &PeerId) -> String {
    format!("dpc.{}.assign.{}", roundtable_nats::token(run), agent)
}

fn report_subject(run: &str) -> String {
    format!("dpc.{}.done", roundtable_nats::token(run))
}

fn stop_subject(run: &str) -> String {
    format!("dpc.{}.stop", roundtable_nats::token(run))
}

fn hello_subject(run: &str) -> String {
    format!("dpc.{}.hello", roundtable_nats::token(run))
}

/// How many times `client` has connected: it grows by one at each reconnection.
fn connects(client: &async_nats::Client) -> u64 {
    client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Serialize, Deserialize)]
struct Assignment {
    partition: usize,
    batch: usize,
    /// Reassigned from an agent that died: skip the events already recorded.
    retry: bool,
    /// Sent again after a reconnection (the first may have been lost, or its report):
    /// skip the events already recorded.
    #[serde(default)]
    resent: bool,
}

#[derive(Serialize, Deserialize)]
struct Report {
    agent: String,
    partition: usize,
    batch: usize,
}

async fn assigned_loop(
    wk: &Worker,
    client: &async_nats::Client,
    me: &PeerId,
    r: &mut AgentReport,
) -> Result<(), Error> {
    let mut assigned = client.subscribe(assign_subject(&wk.run, me)).await?;
    let mut stop = client.subscribe(stop_subject(&wk.run)).await?;
    let mut connected = connects(client);
    let mut reconnected = false;
    let mut check = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.next() => return Ok(()),
            m = assigned.next() => {
                let Some(m) = m else { return Ok(()) };
                let a: Assignment = serde_json::from_slice(&m.payload)?;
                if a.retry {
                    r.taken_over += 1;
                }
                wk.process((a.partition, a.batch), me, a.retry || a.resent, r).await?;
                let rep = Report { agent: me.to_string(), partition: a.partition, batch: a.batch };
                client.publish(report_subject(&wk.run), serde_json::to_vec(&rep)?.into()).await?;
            }
            _ = check.tick() => {
                // Back after the server was away: this agent's subscriptions are renewed
                // before anything it publishes now, so the coordinator's answer reaches it.
                let now = connects(client);
                if now != connected {
                    connected = now;
                    reconnected = true;
                    client.publish(hello_subject(&wk.run), me.as_str().to_owned().into()).await?;
                }
                // After the server was away, the coordinator's stop may be lost with it.
                if reconnected && wk.all_done().await? {
                    return Ok(());
                }
            }
        }
    }
}

/// The coordinator process of the baseline (see the module docs).
pub async fn coordinator(url: &str, run: &str, w: &Workload) -> Result<(), Error> {
    const IN_FLIGHT: usize = 2;
    let backend = NatsBackend::connect(url).await?.patient();
    let session = session_of(run);
    let presence = backend.presence(&session).await?;
    let client = backend.client().clone();
    let mut reports = client.subscribe(report_subject(run)).await?;
    let mut hellos = client.subscribe(hello_subject(run)).await?;
    client.flush().await?;
    let mut connected = connects(&client);
    let agents: Vec<PeerId> = (0..w.agents).map(|i| PeerId::from(format!("agent-{i}"))).collect();
    // Every agent's first heartbeat: it is subscribed by then.
    let start = Instant::now();
    loop {
        let seen = again("reading heartbeats", || presence.last_seen()).await?;
        if agents.iter().all(|a| seen.contains_key(a)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("not every agent started within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut backlog: VecDeque<((usize, usize), bool)> = w.batches().into_iter().map(|b| (b, false)).collect();
    let mut in_flight: HashMap<PeerId, Vec<(usize, usize)>> = agents.iter().map(|a| (a.clone(), Vec::new())).collect();
    let mut remaining = backlog.len();
    let absent_after = Duration::from_millis(w.absent_after_ms);
    let mut check = tokio::time::interval(Duration::from_millis(200));
    while remaining > 0 {
        // Fill every live agent up to IN_FLIGHT, in team order.
        for a in &agents {
            let Some(mine) = in_flight.get_mut(a) else { continue };
            while mine.len() < IN_FLIGHT {
                let Some((b, retry)) = backlog.pop_front() else { break };
                let msg = Assignment { partition: b.0, batch: b.1, retry, resent: false };
                client.publish(assign_subject(run, a), serde_json::to_vec(&msg)?.into()).await?;
                mine.push(b);
            }
        }
        tokio::select! {
            m = reports.next() => {
                let Some(m) = m else { return Err("the report subscription ended".into()) };
                let rep: Report = serde_json::from_slice(&m.payload)?;
                let b = (rep.partition, rep.batch);
                if let Some(mine) = in_flight.get_mut(&PeerId::from(rep.agent.as_str()))
                    && let Some(i) = mine.iter().position(|x| *x == b)
                {
                    mine.remove(i);
                    remaining -= 1;
                }
            }
            m = hellos.next() => {
                let Some(m) = m else { return Err("the hello subscription ended".into()) };
                let agent = PeerId::from(String::from_utf8_lossy(&m.payload).as_ref());
                if let Some(mine) = in_flight.get(&agent) {
                    resend(&client, run, &agent, mine).await?;
                }
            }
            _ = check.tick() => {
                // Back after the server was away: what was in flight may be lost.
                let now = connects(&client);
                if now != connected {
                    connected = now;
                    for (agent, mine) in &in_flight {
                        resend(&client, run, agent, mine).await?;
                    }
                }
                let seen = again("reading heartbeats", || presence.last_seen()).await?;
                let dead: Vec<PeerId> = in_flight
                    .keys()
                    .filter(|a| seen.get(*a).is_none_or(|age| *age >= absent_after))
                    .cloned()
                    .collect();
                for a in dead {
                    for b in in_flight.remove(&a).unwrap_or_default().into_iter().rev() {
                        backlog.push_front((b, true));
                    }
                }
                if in_flight.is_empty() {
                    return Err("every agent is dead".into());
                }
            }
        }
    }
    client.publish(stop_subject(run), "stop".into()).await?;
    client.flush().await?;
    Ok(())
}

/// Send `agent`'s batches in flight again (see "A server that restarts").
async fn resend(
    client: &async_nats::Client,
    run: &str,
    agent: &PeerId,
    batches: &[(usize, usize)],
) -> Result<(), Error> {
    for &(partition, batch) in batches {
        let msg = Assignment { partition, batch, retry: false, resent: true };
        client.publish(assign_subject(run, agent), serde_json::to_vec(&msg)?.into()).await?;
    }
    Ok(())
}

/// What a run measured, from the log.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub mode: &'static str,
    pub agents: usize,
    pub killed: usize,
    pub events: usize,
    pub recorded: usize,
    pub lost: usize,
    pub recorded_twice: usize,
    pub reexecuted: usize,
    /// Batches of dead agents finished by others.
    pub taken_over: usize,
    /// Times the run's NATS server was SIGKILLed and started again mid-run.
    pub server_restarts: usize,
    /// Events recorded when the server was SIGKILLed (0 without a restart).
    pub recorded_at_server_kill: u64,
    pub wall_ms: u64,
    pub events_per_s: f64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    /// The sum of the events' costs over the agents: a lower bound on the wall time.
    pub ideal_ms: u64,
}

/// Count the run from its log: every event recorded once, none twice; each event's
/// latency is its record's time since `t0_ms` (when the agents were started, the
/// backlog already on the stream).
pub async fn count(
    backend: &NatsBackend,
    run: &str,
    w: &Workload,
    t0_ms: u64,
) -> Result<(usize, usize, Vec<u64>), Error> {
    let log = backend.logs().open(&session_of(run), false).await?;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut latencies = Vec::new();
    for e in log.read_all().await? {
        if e.env.kind != Kind::Work {
            continue;
        }
        let Some(event) = e.env.body.json.as_ref().and_then(|j| j["event"].as_u64()) else { continue };
        *seen.entry(event).or_default() += 1;
        latencies.push(e.env.time_ms.saturating_sub(t0_ms));
    }
    let recorded = seen.keys().filter(|e| (**e as usize) < w.total()).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    latencies.sort_unstable();
    Ok((recorded, twice, latencies))
}

/// The `q` quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
