//! One worker: claims tests from the shared queue, runs them, reports on the log.
//!
//! - **Claim.** A worker takes the next test from the queue and records the claim on the
//!   log (`claim/<test>/<delivery>`). A redelivered test whose result is already on the
//!   log (its last holder reported, then died before acking) is acked, not run again.
//! - **Dependencies.** A test runs once every test it depends on has passed. A claimed
//!   test still waiting for one is held (its lease extended) while the worker goes on
//!   with others, up to two at a time; beyond that it is deferred: recorded
//!   (`defer/…`) and handed back to the queue with a delay.
//! - **Run and report.** The synthetic test sleeps for its duration, with the lease
//!   extended as it goes. Before reporting, the worker checks that it still holds the
//!   lease (a worker that lost it reports nothing: `abandon/…`); then it records the
//!   result (`result/<test>`) and acks. Result ids are per worker, so a test that two
//!   workers both completed would show up as two results: the report counts them.
//! - **Failure notices.** When a test fails (or is skipped), its worker sends each worker
//!   that holds a test depending on it a direct notice (`notice/<failed>/<dependent>`);
//!   a holder then skips the dependent without running it, and the skip is noticed down
//!   the chain the same way. A dependent nobody holds yet is skipped by whoever claims
//!   it, who reads the failure on the log.
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
use roundtable_core::session::STOP_STEP;
use roundtable_core::workqueue::{Claim, QueueConfig, QueueErrorKind, WorkQueue};
use roundtable_nats::NatsBackend;
use tokio::sync::Notify;

use super::suite::{Fold, Outcome, Suite, collective};
use crate::Failure;

/// Tests a worker holds while they wait for their dependencies.
const MAX_WAITING: usize = 2;

/// What a worker shares between its tasks.
struct Worker {
    me: PeerId,
    session: SessionId,
    log: Arc<dyn SessionLog>,
    queue: Arc<dyn WorkQueue>,
    suite: Arc<Suite>,
    dependents: Vec<Vec<usize>>,
    fold: Arc<Mutex<Fold>>,
    changed: Arc<Notify>,
    /// Claims this process holds (waiting or running), by test.
    held: Arc<Mutex<HashMap<usize, Claim>>>,
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

/// Wait until the fold has a suite.
pub(crate) async fn suite_of(fold: &Mutex<Fold>, changed: &Notify) -> Arc<Suite> {
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
            async move { queue.push(&Suite::id(i), serde_json::json!({ "test": i })).await }
        })
        .buffered(64);
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

/// Run worker `me` of `session` until the run stops.
pub(crate) async fn run(backend: NatsBackend, session: SessionId, me: PeerId) -> Result<(), Failure> {
    let log = open_log(&backend, &session).await?;
    let fold = Arc::new(Mutex::new(Fold::new()));
    let changed = Arc::new(Notify::new());
    let follower = tokio::spawn(follow(log.clone(), fold.clone(), changed.clone()));
    let suite = suite_of(&fold, &changed).await;
    if !suite.workers.iter().any(|w| w.as_str() == me.as_str()) {
        follower.abort();
        return Err(Failure::Input(format!(
            "session {session} has no worker {me:?}; its workers are {}",
            suite.workers.join(", ")
        )));
    }
    let queue = backend.work_queue(&session, queue_config(&suite)).await.map_err(runtime)?;
    let presence = backend.presence(&session).await.map_err(runtime)?;
    let w = Arc::new(Worker {
        me: me.clone(),
        session: session.clone(),
        log: log.clone(),
        queue,
        dependents: suite.dependents(),
        suite: suite.clone(),
        fold: fold.clone(),
        changed,
        held: Arc::default(),
    });
    let mut background = vec![follower];
    background.push(tokio::spawn(beat(presence.clone(), me.clone(), suite.heartbeat_ms)));
    background.push(tokio::spawn(watch_presence(w.clone(), presence)));
    background.push(tokio::spawn(extend_leases(w.clone())));
    let result = w.work().await;
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
            match w.queue.progress(&claim).await {
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
    fn envelope(&self, step: String, body: Body) -> Envelope {
        Envelope::new(&self.session, &self.me, step, Kind::Work, Recipient::All, body)
    }

    async fn append(&self, env: Envelope) -> Result<(), Failure> {
        self.log.append(env).await?;
        Ok(())
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
            // Then a new claim.
            let claim = match self.queue.claim(&self.me, Duration::ZERO).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming");
                    None
                }
            };
            let Some(claim) = claim else {
                if last_dead_check.elapsed() > Duration::from_secs(5) {
                    last_dead_check = Instant::now();
                    self.record_dead_letters().await?;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), self.changed.notified()).await;
                continue;
            };
            let Some(i) = self.suite.index(&claim.task_id) else {
                let _ = self.queue.ack(&claim).await;
                continue;
            };
            self.sync().await?;
            if self.fold.lock().expect("fold lock").result[i].is_some() {
                // Reported by a holder that died before acking: finish, do not re-run.
                let _ = self.queue.ack(&claim).await;
                continue;
            }
            self.held.lock().expect("held lock").insert(i, claim.clone());
            let id = Suite::id(i);
            let body = Body::text(format!("{} takes {id}", self.me))
                .with_json(serde_json::json!({ "op": "claim", "task": id, "delivery": claim.delivery }));
            self.append(self.envelope(format!("claim/{id}/{}", claim.delivery), body)).await?;
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
        let _ = self.queue.ack(claim).await;
        self.held.lock().expect("held lock").remove(&i);
    }

    async fn run_test(&self, i: usize, claim: Claim) -> Result<(), Failure> {
        tokio::time::sleep(Duration::from_millis(self.suite.duration_ms)).await;
        let id = Suite::id(i);
        // Report only while holding the lease: a worker that lost it (it stalled, or the
        // server was away too long) leaves the test to its next holder.
        if let Err(e) = self.queue.progress(&claim).await {
            self.held.lock().expect("held lock").remove(&i);
            if e.kind() == QueueErrorKind::LeaseLost {
                let body = Body::text(format!("{} lost the lease of {id} before reporting", self.me)).with_json(
                    serde_json::json!({ "op": "abandon", "task": id, "delivery": claim.delivery, "error": e.to_string() }),
                );
                self.append(self.envelope(format!("abandon/{id}/{}", claim.delivery), body)).await?;
                return Ok(());
            }
            tracing::warn!(error = %e, "checking a lease before reporting");
            return Ok(());
        }
        let outcome = if self.suite.fails(i) { Outcome::Fail } else { Outcome::Pass };
        self.report(i, &claim, outcome, None, Vec::new()).await
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
        let names: Vec<String> = failed.iter().map(|&d| Suite::id(d)).collect();
        let why = format!("depends on {} which did not pass", names.join(", "));
        self.report(i, &claim, Outcome::Skip, Some(why), parents).await
    }

    /// Record a result, tell the holders of dependents when it is not a pass, and ack.
    async fn report(
        &self,
        i: usize,
        claim: &Claim,
        outcome: Outcome,
        why: Option<String>,
        parents: Vec<EnvelopeId>,
    ) -> Result<(), Failure> {
        let id = Suite::id(i);
        let text = match &why {
            Some(why) => format!("{id} {}: {why}", outcome.as_str()),
            None => format!("{id} {}", outcome.as_str()),
        };
        let body = Body::text(text).with_json(serde_json::json!({
            "op": "result",
            "task": id,
            "outcome": outcome,
            "delivery": claim.delivery,
            "duration_ms": if outcome == Outcome::Skip { 0 } else { self.suite.duration_ms },
        }));
        self.append(self.envelope(format!("result/{id}"), body).with_parents(parents)).await?;
        if outcome != Outcome::Pass {
            self.notify_dependents(i).await?;
        }
        if let Err(e) = self.queue.ack(claim).await {
            // Reported already: whoever gets it next finds the result and lets it go.
            tracing::warn!(test = %id, error = %e, "acking after the result");
        }
        self.held.lock().expect("held lock").remove(&i);
        Ok(())
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
        let failed = Suite::id(i);
        for (d, holder) in holders {
            let dependent = Suite::id(d);
            let body = Body::text(format!("{failed} did not pass; your test {dependent} depends on it"))
                .with_json(serde_json::json!({ "op": "dependency_failed", "failed": failed, "dependent": dependent }));
            let step = format!("notice/{failed}/{dependent}");
            self.append(collective(&self.session, &self.me, step, Kind::Work, Recipient::Peer(holder), body)).await?;
        }
        Ok(())
    }

    /// Hand a test back for later: it waits for dependencies and this worker holds enough.
    async fn defer(&self, i: usize, claim: Claim) -> Result<(), Failure> {
        let id = Suite::id(i);
        let waiting_for: Vec<String> = {
            let f = self.fold.lock().expect("fold lock");
            self.suite.deps(i).into_iter().filter(|&d| f.result[d].is_none()).map(Suite::id).collect()
        };
        let body = Body::text(format!("{} defers {id}: it waits for {}", self.me, waiting_for.join(", "))).with_json(
            serde_json::json!({ "op": "defer", "task": id, "delivery": claim.delivery, "waiting_for": waiting_for }),
        );
        self.append(self.envelope(format!("defer/{id}/{}", claim.delivery), body)).await?;
        let delay = Duration::from_millis(self.suite.duration_ms * 2 + 50);
        if let Err(e) = self.queue.nack(&claim, delay).await {
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
