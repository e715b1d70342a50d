//! One worker: claims tests from the shared queue, runs them, reports on the log.
//!
//! - **Claim.** A worker takes the next test from the queue and records the claim on the
//!   log (`claim/<test>/<delivery>`). A redelivered test whose result is already on the
//!   log (its last holder reported, then died before acking) is acked, not run again.
//! - **Dependencies.** A test runs once every test it depends on has passed. A claimed
//!   test still waiting for one is held (its lease extended) while the worker goes on
//!   with others, up to two at a time; beyond that it is deferred: recorded
//!   (`defer/…`) and handed back to the queue with a delay.
//! - **Run and report.** A synthetic test sleeps for its duration; a suite file's test
//!   runs its command from the worker's own copy of the file (never from the log), as a
//!   command tool: no shell, its timeout (the process group is killed and the result
//!   says `timed_out`), its output capped (the log keeps its head and tail around a
//!   marker); a program that cannot start is an `error` result. The lease is extended
//!   as it goes. Before reporting, the worker checks that it still holds the lease with
//!   half a lease left (a worker that lost it reports nothing: `abandon/…`); then it
//!   records the result (`result/<test>`) and acks in the background. Result ids are
//!   per worker, so a test that two workers both completed would show up as two
//!   results: the report counts them.
//! - **Round trips.** A test's critical path is three server round trips: the pull,
//!   the claim envelope and the result envelope. The rest is kept off it without
//!   changing what is recorded before what: the lease record rides without waiting for
//!   the server (it feeds only the queue's stats); the log is read to its end before a
//!   claim only when a result may be there already (a redelivery, or a test with a
//!   priority copy), as the fold after the claim envelope catches the rest; the lease
//!   check before reporting is local while the last extension leaves half a lease; and
//!   the ack, after the result is on the log, goes in the background (a worker killed
//!   before it lands leaves a redelivery that finds the result and lets it go). Before
//!   this, a test cost ten: pull, lease record, the log's last sequence, claim envelope,
//!   `+WPI` and its lease record, result envelope, ack record, `+ACK`, lease removal.
//! - **Failure notices.** When a test fails (or is skipped), its worker sends each worker
//!   that holds a test depending on it a direct notice (`notice/<failed>/<dependent>`);
//!   a holder then skips the dependent without running it, and the skip is noticed down
//!   the chain the same way. A dependent nobody holds yet is skipped by whoever claims
//!   it, who reads the failure on the log.
//! - **Likely affected tests move up.** When a test fails, its worker names the tests
//!   likely affected — its model does, reading the failure's output, when the worker
//!   has one (`--team`); otherwise the unresolved tests of the same area — records them
//!   (`prioritize/<failed>`), sends their holders a direct notice, and puts a copy of
//!   each on the priority queue. A worker claims from the priority queue first whenever
//!   the log shows a prioritized test without a result, so the claim order follows the
//!   log. Only one copy of a test runs: after recording its claim, a worker looks at the
//!   claims of the test's other copy not yet settled; if one is earlier on the log (and
//!   its claimer is not absent, or is this worker) it yields (`yield/…`): a priority
//!   copy is acked away, a main copy is handed back with a delay, so it is still there
//!   if the other claimer dies.
//! - **Presence.** Workers beat; one that stays silent is recorded absent by the first
//!   worker to notice (one notice, whoever writes it); its claims come back through the
//!   queue when their leases run out. A restarted worker records that it is back.
//! - **End.** When every test has a result, any worker records the stop; all exit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use roundtable_core::bus::{Backend, Presence};
use roundtable_core::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::{LogErrorKind, SessionLog};
use roundtable_core::model::{ChatModel, ChatRequest};
use roundtable_core::session::STOP_STEP;
use roundtable_core::workqueue::{Claim, QueueConfig, QueueErrorKind, WorkQueue};
use roundtable_nats::NatsBackend;
use tokio::sync::Notify;

use super::file::LocalSuite;
use super::suite::{Fold, Lane, Outcome, Suite, collective};
use crate::Failure;

/// Tests a worker holds while they wait for their dependencies.
const MAX_WAITING: usize = 2;
/// Bytes of a test's output a command keeps of each stream.
const CAPTURE_BYTES: u64 = 256 * 1024;
/// Bytes of a test's output its result envelope carries.
pub(crate) const LOG_OUTPUT_BYTES: usize = 16 * 1024;
/// Tests one failure may move up the queue.
const MAX_PRIORITIZED: usize = 64;

/// What a worker shares between its tasks.
struct Worker {
    me: PeerId,
    session: SessionId,
    log: Arc<dyn SessionLog>,
    queue: Arc<dyn WorkQueue>,
    /// Copies of tests likely affected by a failure, drained first.
    priority: Arc<dyn WorkQueue>,
    suite: Arc<Suite>,
    /// This machine's copy of the suite file (for a suite file's run).
    local: Option<Arc<LocalSuite>>,
    /// The model that names the tests a failure likely affects (none: the area rule).
    namer: Option<Arc<dyn ChatModel>>,
    dependents: Vec<Vec<usize>>,
    fold: Arc<Mutex<Fold>>,
    changed: Arc<Notify>,
    /// Claims this process holds (waiting or running), by test.
    held: Arc<Mutex<HashMap<usize, Claim>>>,
    /// Acks of reported tests still on their way (off the critical path: see `report`).
    acks: Mutex<tokio::task::JoinSet<()>>,
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

/// Open the session's log, waiting for the session to be created.
pub(crate) async fn open_log(backend: &NatsBackend, session: &SessionId) -> Result<Arc<dyn SessionLog>, Failure> {
    let mut told = false;
    loop {
        match backend.logs().open(session, false).await {
            Ok(log) => return Ok(log),
            Err(e) if e.kind() == LogErrorKind::NotFound => {
                if !told {
                    eprintln!("waiting for session {session} to be started…");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Follow the log into `fold`, waking `changed` after each batch.
pub(crate) async fn follow(log: Arc<dyn SessionLog>, fold: Arc<Mutex<Fold>>, changed: Arc<Notify>) {
    let mut tail = loop {
        match log.tail(1).await {
            Ok(t) => break t,
            Err(e) => {
                tracing::warn!(error = %e, "opening the log's tail; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    while let Some(next) = tail.next().await {
        match next {
            Ok(e) => {
                let mut f = fold.lock().expect("fold lock");
                f.apply(&e);
                while let Some(Some(Ok(more))) = futures::FutureExt::now_or_never(tail.next()) {
                    f.apply(&more);
                }
                drop(f);
                changed.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "reading the log"),
        }
    }
}

/// The log folded by a background task as it grows.
pub(crate) struct Following {
    pub(crate) fold: Arc<Mutex<Fold>>,
    /// Notified after each fold.
    pub(crate) changed: Arc<Notify>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Start folding `log` in the background and wait until it names the suite.
pub(crate) async fn follow_to_suite(log: &Arc<dyn SessionLog>) -> (Following, Arc<Suite>) {
    let fold = Arc::new(Mutex::new(Fold::new()));
    let changed = Arc::new(Notify::new());
    let task = tokio::spawn(follow(log.clone(), fold.clone(), changed.clone()));
    let suite = suite_of(&fold, &changed).await;
    (Following { fold, changed, task }, suite)
}

/// Wait until the fold has a suite.
async fn suite_of(fold: &Mutex<Fold>, changed: &Notify) -> Arc<Suite> {
    loop {
        if let Some(s) = fold.lock().expect("fold lock").suite.clone() {
            return s;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), changed.notified()).await;
    }
}

/// Push every test to the queue (idempotent) and record that it was done.
pub(crate) async fn seed(
    queue: &Arc<dyn WorkQueue>,
    log: &Arc<dyn SessionLog>,
    suite: &Suite,
    who: &PeerId,
) -> Result<(), Failure> {
    let pushes = futures::stream::iter(0..suite.tests)
        .map(|i| {
            let queue = queue.clone();
            let id = suite.id(i);
            async move { queue.push(&id, serde_json::json!({ "test": i })).await }
        })
        // A suite file's order is the order its tests are claimed in (what a failure's
        // likely affected tests jump ahead of): pushed one by one. Synthetic suites,
        // for benchmarks, are pushed 64 at a time.
        .buffered(if suite.file.is_some() { 1 } else { 64 });
    futures::pin_mut!(pushes);
    while let Some(r) = pushes.next().await {
        r.map_err(runtime)?;
    }
    let body = Body::text(format!("{} tests queued", suite.tests))
        .with_json(serde_json::json!({ "op": "queued", "tests": suite.tests }));
    log.append(collective(log.session(), who, "queued".into(), Kind::Work, Recipient::All, body)).await?;
    Ok(())
}

/// Wait until `fold` has caught up with everything on the log now.
pub(crate) async fn sync_to_end(
    log: &Arc<dyn SessionLog>,
    fold: &Mutex<Fold>,
    changed: &Notify,
) -> Result<(), Failure> {
    let last = log.last_seq().await?;
    while fold.lock().expect("fold lock").last_seq < last {
        let _ = tokio::time::timeout(Duration::from_millis(50), changed.notified()).await;
    }
    Ok(())
}

pub(crate) fn queue_config(suite: &Suite) -> QueueConfig {
    QueueConfig { lease: Duration::from_millis(suite.lease_ms), max_deliver: suite.max_deliver }
}

/// The session of a run's priority queue.
pub(crate) fn priority_session(session: &SessionId) -> SessionId {
    SessionId::from(format!("{session}-priority").as_str())
}

/// This machine's copy of the suite a run's task names, checked against its digest.
pub(crate) fn local_suite(
    session: &SessionId,
    suite: &Suite,
    path: Option<&std::path::Path>,
) -> Result<Option<Arc<LocalSuite>>, Failure> {
    match (&suite.file, path) {
        (None, None) => Ok(None),
        (None, Some(p)) => Err(Failure::Input(format!(
            "--suite {}: session {session} runs a synthetic suite, not a suite file",
            p.display()
        ))),
        (Some(f), None) => Err(Failure::Input(format!(
            "session {session} runs suite file {} ({}): start the worker with --suite PATH to this \
             machine's copy of it (commands are never taken from the log)",
            f.name, f.digest
        ))),
        (Some(f), Some(p)) => {
            let local = super::file::load(p)?;
            if local.digest != f.digest {
                return Err(Failure::Input(format!(
                    "--suite {}: this copy's digest is {}, but session {session} runs {} ({}): refusing to \
                     run commands that differ from the suite's",
                    p.display(),
                    local.digest,
                    f.name,
                    f.digest
                )));
            }
            Ok(Some(Arc::new(local)))
        }
    }
}

/// Run worker `me` of `session` until the run stops.
pub(crate) async fn run(
    backend: NatsBackend,
    session: SessionId,
    me: PeerId,
    suite_path: Option<std::path::PathBuf>,
    namer: Option<Arc<dyn ChatModel>>,
) -> Result<(), Failure> {
    let log = open_log(&backend, &session).await?;
    let (Following { fold, changed, task: follower }, suite) = follow_to_suite(&log).await;
    if !suite.workers.iter().any(|w| w.as_str() == me.as_str()) {
        follower.abort();
        return Err(Failure::Input(format!(
            "session {session} has no worker {me:?}; its workers are {}",
            suite.workers.join(", ")
        )));
    }
    let local = match local_suite(&session, &suite, suite_path.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            follower.abort();
            return Err(e);
        }
    };
    let queue = backend.work_queue(&session, queue_config(&suite)).await.map_err(runtime)?;
    let priority = backend.work_queue(&priority_session(&session), queue_config(&suite)).await.map_err(runtime)?;
    let presence = backend.presence(&session).await.map_err(runtime)?;
    let w = Arc::new(Worker {
        me: me.clone(),
        session: session.clone(),
        log: log.clone(),
        queue,
        priority,
        local,
        namer,
        dependents: suite.dependents(),
        suite: suite.clone(),
        fold: fold.clone(),
        changed,
        held: Arc::default(),
        acks: Mutex::default(),
    });
    let mut background = vec![follower];
    background.push(tokio::spawn(beat(presence.clone(), me.clone(), suite.heartbeat_ms)));
    background.push(tokio::spawn(watch_presence(w.clone(), presence)));
    background.push(tokio::spawn(extend_leases(w.clone())));
    let result = w.work().await;
    w.finish_acks().await;
    for task in background {
        task.abort();
    }
    result
}

async fn beat(presence: Arc<dyn Presence>, me: PeerId, every_ms: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = presence.beat(&me).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

/// Record workers that stopped beating as absent (the first notice wins).
async fn watch_presence(w: Arc<Worker>, presence: Arc<dyn Presence>) {
    let started = Instant::now();
    let limit = Duration::from_millis(w.suite.absent_after_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(w.suite.heartbeat_ms.max(10) * 2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(seen) = presence.last_seen().await else { continue };
        let gone: Vec<(PeerId, u32, Option<Duration>)> = {
            let f = w.fold.lock().expect("fold lock");
            if f.stop.is_some() || f.done() {
                continue;
            }
            w.suite
                .workers
                .iter()
                .map(|p| PeerId::from(p.as_str()))
                .filter(|p| *p != w.me && !f.absent.contains(p))
                .filter_map(|p| {
                    let age = seen.get(&p).copied();
                    let silent = match age {
                        Some(age) => age > limit,
                        None => started.elapsed() > limit,
                    };
                    let n = f.absences.get(&p).copied().unwrap_or(0);
                    silent.then_some((p, n, age))
                })
                .collect()
        };
        for (p, n, age) in gone {
            let silent = match age {
                Some(age) => format!("silent for {} ms", age.as_millis()),
                None => format!("not heard from in the {} ms this worker has run", started.elapsed().as_millis()),
            };
            let body = Body::text(format!("{p} stopped answering ({silent}); its tests come back through the queue"))
                .with_json(serde_json::json!({ "peer": p.as_str(), "silent_ms": age.map(|a| a.as_millis() as u64) }));
            let env = collective(&w.session, &w.me, format!("absent/{p}/{n}"), Kind::Absent, Recipient::All, body);
            if let Err(e) = w.log.append(env).await {
                tracing::warn!(error = %e, "recording an absence");
            }
        }
    }
}

/// Keep the leases of held claims alive; forget those that were lost.
async fn extend_leases(w: Arc<Worker>) {
    let every = Duration::from_millis((w.suite.lease_ms / 3).max(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let held: Vec<(usize, Claim)> =
            w.held.lock().expect("held lock").iter().map(|(i, c)| (*i, c.clone())).collect();
        for (i, claim) in held {
            match w.queue_of(&claim).progress(&claim).await {
                Ok(()) => {}
                Err(e) if e.kind() == QueueErrorKind::LeaseLost => {
                    tracing::warn!(test = i, error = %e, "lease lost; the test goes back to the queue");
                    w.held.lock().expect("held lock").remove(&i);
                }
                Err(e) => tracing::warn!(test = i, error = %e, "extending a lease"),
            }
        }
    }
}

impl Worker {
    /// The queue a claim came from.
    fn queue_of(&self, claim: &Claim) -> &Arc<dyn WorkQueue> {
        match lane_of(claim) {
            Lane::Main => &self.queue,
            Lane::Priority => &self.priority,
        }
    }

    fn envelope(&self, step: String, body: Body) -> Envelope {
        Envelope::new(&self.session, &self.me, step, Kind::Work, Recipient::All, body)
    }

    async fn append(&self, env: Envelope) -> Result<(), Failure> {
        self.log.append(env).await?;
        Ok(())
    }

    /// Wait until the fold has applied the entry at `seq`.
    async fn wait_for(&self, seq: u64) {
        while self.fold.lock().expect("fold lock").last_seq < seq {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.changed.notified()).await;
        }
    }

    /// Wait until the fold has caught up with everything on the log now.
    async fn sync(&self) -> Result<(), Failure> {
        sync_to_end(&self.log, &self.fold, &self.changed).await
    }

    async fn work(&self) -> Result<(), Failure> {
        let mut waiting: BTreeMap<usize, Claim> = BTreeMap::new();
        let mut stop_posted = false;
        let mut last_dead_check = Instant::now();
        loop {
            let (done, stopped, me_absent) = {
                let f = self.fold.lock().expect("fold lock");
                (f.done(), f.stop.is_some(), f.absent.contains(&self.me).then(|| f.absences[&self.me]))
            };
            if stopped {
                return Ok(());
            }
            if let Some(n) = me_absent {
                let body = Body::text(format!("{} is back", self.me));
                let env = Envelope::new(
                    &self.session,
                    &self.me,
                    format!("join/{}/{n}", self.me),
                    Kind::Join,
                    Recipient::All,
                    body,
                );
                self.append(env).await?;
            }
            if done {
                if !stop_posted {
                    self.post_stop().await?;
                    stop_posted = true;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), self.changed.notified()).await;
                continue;
            }
            // Held tests first: skip those whose dependency did not pass, run the first
            // one that is ready, drop those whose lease was lost.
            waiting.retain(|i, _| self.held.lock().expect("held lock").contains_key(i));
            let mut ready = None;
            for (&i, claim) in &waiting {
                let (deps, resolved) = {
                    let f = self.fold.lock().expect("fold lock");
                    (f.deps_passed(&self.suite, i), f.result[i].is_some())
                };
                if resolved {
                    ready = Some((i, claim.clone(), None));
                    break;
                }
                if let Some(passed) = deps {
                    ready = Some((i, claim.clone(), Some(passed)));
                    break;
                }
            }
            if let Some((i, claim, deps)) = ready {
                waiting.remove(&i);
                match deps {
                    None => self.finish_done(i, &claim).await,
                    Some(true) => self.run_test(i, claim).await?,
                    Some(false) => self.skip(i, claim).await?,
                }
                continue;
            }
            // Then a new claim: from the priority queue first while the log shows a
            // prioritized test without a result.
            let pending_priority = self.fold.lock().expect("fold lock").pending_priority > 0;
            let mut claim = None;
            if pending_priority {
                claim = match self.priority.claim(&self.me, Duration::ZERO).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming from the priority queue");
                        None
                    }
                };
            }
            if claim.is_none() {
                claim = match self.queue.claim(&self.me, Duration::ZERO).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming");
                        None
                    }
                };
            }
            let Some(claim) = claim else {
                if last_dead_check.elapsed() > Duration::from_secs(5) {
                    last_dead_check = Instant::now();
                    self.record_dead_letters().await?;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
                continue;
            };
            let Some(i) = self.suite.index(&claim.task_id) else {
                let _ = self.queue_of(&claim).ack(&claim).await;
                continue;
            };
            // A redelivery, or a copy of a test that has (or had) another copy, may have a
            // result on the log already: read the log to its end before claiming. A main
            // copy's first delivery cannot, unless a priority copy ran first, which the
            // check after the claim below catches: it saves the round trip.
            let first_of_its_kind = claim.delivery == 1
                && lane_of(&claim) == Lane::Main
                && !self.fold.lock().expect("fold lock").prioritized[i];
            if !first_of_its_kind {
                self.sync().await?;
            }
            if self.fold.lock().expect("fold lock").result[i].is_some() {
                // Reported by a holder that died before acking (or by the holder of the
                // other copy): finish, do not re-run.
                let _ = self.queue_of(&claim).ack(&claim).await;
                continue;
            }
            let lane = lane_of(&claim);
            let id = self.suite.id(i);
            let body = Body::text(format!("{} takes {id}", self.me)).with_json(
                serde_json::json!({ "op": "claim", "task": id, "delivery": claim.delivery, "queue": lane.as_str() }),
            );
            let step = match lane {
                Lane::Main => format!("claim/{id}/{}", claim.delivery),
                Lane::Priority => format!("claim/{id}/priority/{}", claim.delivery),
            };
            // Everything before this claim on the log is folded once the claim itself is
            // (the follower brings it: no extra round trip).
            let at = self.log.append(self.envelope(step, body)).await?.seq;
            self.wait_for(at).await;
            if self.fold.lock().expect("fold lock").result[i].is_some() {
                // Reported (by the holder of the other copy) between the check above and
                // this claim.
                let _ = self.queue_of(&claim).ack(&claim).await;
                continue;
            }
            if self.other_copy_first(i, lane) {
                self.yield_copy(i, claim, lane).await?;
                continue;
            }
            self.held.lock().expect("held lock").insert(i, claim.clone());
            let deps = self.fold.lock().expect("fold lock").deps_passed(&self.suite, i);
            match deps {
                Some(true) => self.run_test(i, claim).await?,
                Some(false) => self.skip(i, claim).await?,
                None if waiting.len() < MAX_WAITING => {
                    waiting.insert(i, claim);
                }
                None => self.defer(i, claim).await?,
            }
        }
    }

    /// A held test someone else already reported: let it go.
    async fn finish_done(&self, i: usize, claim: &Claim) {
        let _ = self.queue_of(claim).ack(claim).await;
        self.held.lock().expect("held lock").remove(&i);
    }

    /// Whether the test's other copy has an unsettled claim earlier on the log than this
    /// worker's claim of `lane`, by this worker or by a worker not recorded absent.
    fn other_copy_first(&self, i: usize, lane: Lane) -> bool {
        let f = self.fold.lock().expect("fold lock");
        let mine = f.open[i].iter().find(|c| c.peer == self.me && c.lane == lane).map(|c| c.seq);
        let Some(mine) = mine else {
            // Superseded already (a later delivery of this copy was claimed): not ours.
            return true;
        };
        f.open[i].iter().any(|c| c.lane != lane && c.seq < mine && (c.peer == self.me || !f.absent.contains(&c.peer)))
    }

    /// Give way to the other copy's claimer: a priority copy goes away, a main copy comes
    /// back after a lease (in case that claimer dies).
    async fn yield_copy(&self, i: usize, claim: Claim, lane: Lane) -> Result<(), Failure> {
        let id = self.suite.id(i);
        let body = Body::text(format!("{} leaves {id} to the claimer of its other copy", self.me)).with_json(
            serde_json::json!({ "op": "yield", "task": id, "delivery": claim.delivery, "queue": lane.as_str() }),
        );
        self.append(self.envelope(format!("yield/{id}/{}/{}", lane.as_str(), claim.delivery), body)).await?;
        let settled = match lane {
            Lane::Priority => self.priority.ack(&claim).await,
            Lane::Main => self.queue.nack(&claim, Duration::from_millis(self.suite.lease_ms)).await,
        };
        if let Err(e) = settled {
            tracing::warn!(test = %id, error = %e, "yielding");
        }
        Ok(())
    }

    async fn run_test(&self, i: usize, claim: Claim) -> Result<(), Failure> {
        let ran = match &self.local {
            None => {
                let ms = self.suite.duration_of(i);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let outcome = if self.suite.fails(i) { Outcome::Fail } else { Outcome::Pass };
                Ran { outcome, status: None, output: None, duration_ms: ms }
            }
            Some(local) => run_command(&local.tests[i]).await,
        };
        let id = self.suite.id(i);
        // Report only while holding the lease, with half a lease left to write the
        // result in: a worker that lost it (it stalled, or the server was away too
        // long) leaves the test to its next holder. The lease extensions of
        // `extend_leases` usually leave that much, and then this costs no round trip.
        let at_least = Duration::from_millis(self.suite.lease_ms / 2);
        if let Err(e) = self.queue_of(&claim).hold(&claim, at_least).await {
            self.held.lock().expect("held lock").remove(&i);
            if e.kind() == QueueErrorKind::LeaseLost {
                let body = Body::text(format!("{} lost the lease of {id} before reporting", self.me)).with_json(
                    serde_json::json!({ "op": "abandon", "task": id, "delivery": claim.delivery, "queue": lane_of(&claim).as_str(), "error": e.to_string() }),
                );
                self.append(self.envelope(format!("abandon/{id}/{}", claim.delivery), body)).await?;
                return Ok(());
            }
            tracing::warn!(error = %e, "checking a lease before reporting");
            return Ok(());
        }
        let failed = ran.outcome == Outcome::Fail;
        let output = ran.output.clone();
        self.report(i, &claim, ran, None, Vec::new()).await?;
        if failed {
            self.prioritize_affected(i, output.as_deref()).await?;
        }
        Ok(())
    }

    /// Name the tests a failure of `i` likely affects, tell their holders, and move them
    /// up: the unresolved tests of the same area (not those depending on `i`: they are
    /// skipped anyway).
    async fn prioritize_affected(&self, i: usize, output: Option<&str>) -> Result<(), Failure> {
        let area = self.suite.area(i);
        self.sync().await?;
        // Candidates: unresolved, not yet moved up, not depending on `i` (skipped anyway).
        let open: Vec<usize> = {
            let f = self.fold.lock().expect("fold lock");
            (0..self.suite.tests)
                .filter(|&j| j != i && f.result[j].is_none() && !f.prioritized[j])
                .filter(|j| !self.dependents[i].contains(j))
                .collect()
        };
        let failed = self.suite.id(i);
        let mut model_note = serde_json::Value::Null;
        let (affected, why): (Vec<usize>, String) = match &self.namer {
            Some(model) => {
                let (named, note) = self.ask_model(model.as_ref(), i, output, &open).await;
                model_note = note;
                (named, format!("named by {}'s model reading {failed}'s output", self.me))
            }
            None if area.is_empty() => return Ok(()),
            None => (
                open.iter().copied().filter(|&j| self.suite.area(j) == area).take(MAX_PRIORITIZED).collect(),
                format!("same area ({area}) as {failed}"),
            ),
        };
        if affected.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = affected.iter().map(|&j| self.suite.id(j)).collect();
        let mut json = serde_json::json!({ "op": "prioritize", "failed": failed, "tests": names, "why": why });
        if !model_note.is_null() {
            json["model"] = model_note;
        }
        let body =
            Body::text(format!("{failed} failed; likely affected, moved up: {}", names.join(", "))).with_json(json);
        // This worker's next claim already follows it.
        let at = self.log.append(self.envelope(format!("prioritize/{failed}"), body)).await?.seq;
        self.wait_for(at).await;
        let holders: Vec<(usize, PeerId)> = {
            let f = self.fold.lock().expect("fold lock");
            affected
                .iter()
                .filter_map(|&j| f.holder[j].as_ref().map(|(h, _)| (j, h.clone())))
                .filter(|(j, h)| *h != self.me && !f.absent.contains(h) && f.result[*j].is_none())
                .collect()
        };
        for (j, holder) in holders {
            let test = self.suite.id(j);
            let body = Body::text(format!("{failed} failed; your test {test} is likely affected ({why})"))
                .with_json(serde_json::json!({ "op": "affected", "failed": failed, "test": test, "why": why }));
            let step = format!("affected/{failed}/{test}");
            self.append(collective(&self.session, &self.me, step, Kind::Work, Recipient::Peer(holder), body)).await?;
        }
        for &j in &affected {
            let test = self.suite.id(j);
            if let Err(e) = self.priority.push(&test, serde_json::json!({ "test": j, "queue": "priority" })).await {
                // The main copy is still queued: the test only loses its place.
                tracing::warn!(test = %test, error = %e, "queueing a priority copy");
            }
        }
        Ok(())
    }

    /// Ask the model which of the `open` tests a failure of `i` likely affects: the
    /// tests it names and those of the areas it names (unknown names are dropped). The
    /// note records the model's answer on the log; an unusable answer names nothing.
    async fn ask_model(
        &self,
        model: &dyn ChatModel,
        i: usize,
        output: Option<&str>,
        open: &[usize],
    ) -> (Vec<usize>, serde_json::Value) {
        let listed: Vec<String> =
            open.iter().take(500).map(|&j| format!("{} [{}]", self.suite.id(j), self.suite.area(j))).collect();
        let prompt = format!(
            "Test {} (area {:?}) failed. Its output (cut):\n{}\n\nTests not yet run, as `id [area]`:\n{}\n\n\
             Which of them are likely affected by this failure? Answer with a JSON object: \
             {{\"tests\": [ids], \"areas\": [areas]}}.",
            self.suite.id(i),
            self.suite.area(i),
            cap_output(output.unwrap_or(""), 4096),
            listed.join("\n")
        );
        let mut req = ChatRequest::simple(self.me.as_str(), &prompt);
        req.step = Arc::from(format!("affected/{}", self.suite.id(i)).as_str());
        req.json = true;
        let answer = match model.chat(&req).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "asking the model which tests a failure affects");
                return (Vec::new(), serde_json::json!({ "name": model.name(), "error": e.to_string() }));
            }
        };
        let note = serde_json::json!({
            "name": model.name(),
            "answer": cap_output(&answer.text, 2048),
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        });
        let parsed: Option<serde_json::Value> = serde_json::from_str(answer.text.trim()).ok().or_else(|| {
            // A JSON object inside other text.
            let (a, b) = (answer.text.find('{')?, answer.text.rfind('}')?);
            serde_json::from_str(answer.text.get(a..=b)?).ok()
        });
        let Some(parsed) = parsed else { return (Vec::new(), note) };
        let strings = |key: &str| -> Vec<String> {
            parsed[key].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        let (tests, areas) = (strings("tests"), strings("areas"));
        let named: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&j| tests.contains(&self.suite.id(j)) || areas.contains(&self.suite.area(j)))
            .take(MAX_PRIORITIZED)
            .collect();
        (named, note)
    }

    async fn skip(&self, i: usize, claim: Claim) -> Result<(), Failure> {
        let (failed, parents) = {
            let f = self.fold.lock().expect("fold lock");
            let failed: Vec<usize> = self
                .suite
                .deps(i)
                .into_iter()
                .filter(|&d| !matches!(f.result[d], Some((Outcome::Pass, _)) | None))
                .collect();
            let parents: Vec<EnvelopeId> =
                failed.iter().filter_map(|&d| f.result[d].as_ref().map(|(_, id)| id.clone())).collect();
            (failed, parents)
        };
        let names: Vec<String> = failed.iter().map(|&d| self.suite.id(d)).collect();
        let why = format!("depends on {} which did not pass", names.join(", "));
        let ran = Ran { outcome: Outcome::Skip, status: None, output: None, duration_ms: 0 };
        self.report(i, &claim, ran, Some(why), parents).await
    }

    /// Record a result, tell the holders of dependents when it is not a pass, and ack.
    async fn report(
        &self,
        i: usize,
        claim: &Claim,
        ran: Ran,
        why: Option<String>,
        parents: Vec<EnvelopeId>,
    ) -> Result<(), Failure> {
        let id = self.suite.id(i);
        let outcome = ran.outcome;
        let mut text = match (&why, ran.status) {
            (Some(why), _) => format!("{id} {}: {why}", outcome.as_str()),
            (None, Some(status)) if status != "passed" && status != "failed" => {
                format!("{id} {} ({})", outcome.as_str(), status.replace('_', " "))
            }
            (None, _) => format!("{id} {}", outcome.as_str()),
        };
        if let Some(out) = &ran.output
            && outcome != Outcome::Pass
        {
            text.push('\n');
            text.push_str(out);
        }
        let mut json = serde_json::json!({
            "op": "result",
            "task": id,
            "outcome": outcome,
            "delivery": claim.delivery,
            "queue": lane_of(claim).as_str(),
            "duration_ms": ran.duration_ms,
        });
        if let Some(status) = ran.status {
            json["status"] = status.into();
        }
        if let Some(out) = ran.output {
            json["output"] = out.into();
        }
        let body = Body::text(text).with_json(json);
        self.append(self.envelope(format!("result/{id}"), body).with_parents(parents)).await?;
        if outcome != Outcome::Pass {
            self.notify_dependents(i).await?;
        }
        // The result is on the log, so the ack leaves the critical path: if it never
        // lands (this worker is killed first), the test is redelivered and whoever gets
        // it finds the result and lets it go.
        self.held.lock().expect("held lock").remove(&i);
        let (queue, claim) = (self.queue_of(claim).clone(), claim.clone());
        let mut acks = self.acks.lock().expect("acks lock");
        while acks.try_join_next().is_some() {}
        acks.spawn(async move {
            if let Err(e) = queue.ack(&claim).await {
                tracing::warn!(test = %id, error = %e, "acking after the result");
            }
        });
        Ok(())
    }

    /// Wait (a while) for the acks still on their way, so that a worker that stops does
    /// not leave reported tests to be redelivered.
    async fn finish_acks(&self) {
        let mut acks = std::mem::take(&mut *self.acks.lock().expect("acks lock"));
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(_)) = tokio::time::timeout_at(give_up, acks.join_next()).await {}
    }

    /// Tell the workers holding tests that depend on `i` (which did not pass).
    async fn notify_dependents(&self, i: usize) -> Result<(), Failure> {
        self.sync().await?;
        let holders: Vec<(usize, PeerId)> = {
            let f = self.fold.lock().expect("fold lock");
            self.dependents[i]
                .iter()
                .filter(|&&d| f.result[d].is_none())
                .filter_map(|&d| f.holder[d].as_ref().map(|(h, _)| (d, h.clone())))
                .filter(|(_, h)| *h != self.me && !f.absent.contains(h))
                .collect()
        };
        let failed = self.suite.id(i);
        for (d, holder) in holders {
            let dependent = self.suite.id(d);
            let body = Body::text(format!("{failed} did not pass; your test {dependent} depends on it"))
                .with_json(serde_json::json!({ "op": "dependency_failed", "failed": failed, "dependent": dependent }));
            let step = format!("notice/{failed}/{dependent}");
            self.append(collective(&self.session, &self.me, step, Kind::Work, Recipient::Peer(holder), body)).await?;
        }
        Ok(())
    }

    /// Hand a test back for later: it waits for dependencies and this worker holds enough.
    async fn defer(&self, i: usize, claim: Claim) -> Result<(), Failure> {
        let id = self.suite.id(i);
        let waiting_for: Vec<String> = {
            let f = self.fold.lock().expect("fold lock");
            self.suite.deps(i).into_iter().filter(|&d| f.result[d].is_none()).map(|d| self.suite.id(d)).collect()
        };
        let body = Body::text(format!("{} defers {id}: it waits for {}", self.me, waiting_for.join(", "))).with_json(
            serde_json::json!({ "op": "defer", "task": id, "delivery": claim.delivery, "queue": lane_of(&claim).as_str(), "waiting_for": waiting_for }),
        );
        self.append(self.envelope(format!("defer/{id}/{}", claim.delivery), body)).await?;
        let delay = Duration::from_millis(self.suite.duration_ms.clamp(100, 5000) * 2 + 50);
        if let Err(e) = self.queue_of(&claim).nack(&claim, delay).await {
            tracing::warn!(test = %id, error = %e, "deferring");
        }
        self.held.lock().expect("held lock").remove(&i);
        Ok(())
    }

    /// Tests that ran out of deliveries get a result saying so, so the run can end.
    async fn record_dead_letters(&self) -> Result<(), Failure> {
        let dead = match self.queue.dead_letters().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading dead letters");
                return Ok(());
            }
        };
        for d in dead {
            let Some(i) = self.suite.index(&d.task_id) else { continue };
            if self.fold.lock().expect("fold lock").result[i].is_some() {
                continue;
            }
            let body = Body::text(format!("{} ran out of deliveries ({})", d.task_id, d.deliveries)).with_json(
                serde_json::json!({ "op": "dead", "task": d.task_id, "outcome": Outcome::Dead, "deliveries": d.deliveries }),
            );
            self.append(collective(
                &self.session,
                &self.me,
                format!("dead/{}", d.task_id),
                Kind::Work,
                Recipient::All,
                body,
            ))
            .await?;
        }
        Ok(())
    }

    async fn post_stop(&self) -> Result<(), Failure> {
        let (text, json) = {
            let f = self.fold.lock().expect("fold lock");
            let count = |o: Outcome| f.result.iter().filter(|r| matches!(r, Some((x, _)) if *x == o)).count();
            let (pass, fail, skip, dead) =
                (count(Outcome::Pass), count(Outcome::Fail), count(Outcome::Skip), count(Outcome::Dead));
            let reason = format!(
                "all {} tests resolved: {pass} passed, {fail} failed, {skip} skipped, {dead} dead-lettered",
                self.suite.tests
            );
            (
                reason.clone(),
                serde_json::json!({ "reason": reason, "passed": pass, "failed": fail, "skipped": skip, "dead": dead }),
            )
        };
        let env = collective(
            &self.session,
            &self.me,
            STOP_STEP.into(),
            Kind::Stop,
            Recipient::All,
            Body::text(text).with_json(json),
        );
        self.append(env).await
    }
}

/// Which queue a claim came from (the priority copies say so in their payload).
fn lane_of(claim: &Claim) -> Lane {
    Lane::of(Some(&claim.payload))
}

/// How a test ran.
pub(crate) struct Ran {
    pub(crate) outcome: Outcome,
    /// `passed`, `failed`, `timed_out` or `error` (could not start), for commands.
    pub(crate) status: Option<&'static str>,
    /// The command's output, capped for the log.
    pub(crate) output: Option<String>,
    pub(crate) duration_ms: u64,
}

/// Run one test's command from this machine's suite file, as a command tool.
pub(crate) async fn run_command(test: &super::file::TestCase) -> Ran {
    let spec = roundtable_core::tool::CommandSpec {
        argv: test.cmd.clone(),
        parameters: serde_json::json!({ "type": "object" }),
        cwd: test.cwd.clone(),
        env: Vec::new(),
        timeout_secs: test.timeout_secs,
        max_stdout_bytes: CAPTURE_BYTES,
        max_stderr_bytes: CAPTURE_BYTES,
    };
    let started = Instant::now();
    let (out, timed_out) = roundtable_tools::command::run_literal(&test.cmd, &spec).await;
    let duration_ms = out.duration_ms.unwrap_or_else(|| started.elapsed().as_millis() as u64);
    let status = if timed_out {
        "timed_out"
    } else if out.outcome == roundtable_core::tool::Outcome::Ok {
        "passed"
    } else if out.exit_status.is_none() && out.signal.is_none() {
        "error"
    } else {
        "failed"
    };
    let outcome = if status == "passed" { Outcome::Pass } else { Outcome::Fail };
    Ran { outcome, status: Some(status), output: Some(cap_output(&out.output, LOG_OUTPUT_BYTES)), duration_ms }
}

/// At most about `cap` bytes of `text`: its head and its tail around a marker saying how
/// much was cut (the end of a failing test's output is usually what matters).
pub(crate) fn cap_output(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_owned();
    }
    let head_end = floor_char(text, cap / 4);
    let tail_start = ceil_char(text, text.len() - (cap - cap / 4));
    format!("{}\n[… {} bytes of output cut …]\n{}", &text[..head_end], tail_start - head_end, &text[tail_start..])
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}
