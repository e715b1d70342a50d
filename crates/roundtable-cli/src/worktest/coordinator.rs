//! The coordinator baseline: the same suite run by one process that assigns tests to
//! workers and collects their results, over the same NATS server.
//!
//! **Transport: core NATS request/reply.** A coordinator keeps the run's state in its
//! own memory — that is what makes it a coordinator — so JetStream's durable queue has
//! nothing to add on its path; request/reply is the cheapest round trip NATS has. The
//! coordinator does record what it decides on the session log (assignments, results,
//! skips, reassignments, the stop), as a competent one would for an audit trail, and so
//! that the report counts lost and twice-run tests from the log exactly as for the
//! peers. It appends in a background task, never waiting on the log before handing out
//! work; a result is acknowledged to its worker only once it is on the log.
//!
//! **Protocol.** A worker asks `rtc.<session>.work` for work, carrying the result of its
//! previous assignment, so each test costs one round trip. The reply assigns a test
//! (its index and an assignment number; never a command — the worker runs the command
//! from its own copy of the suite file), says to ask again shortly, or says the run is
//! done. While a test runs, its worker publishes progress on `rtc.<session>.progress`
//! every third of the lease.
//!
//! **Scheduling.** Workers pull, so none idles while work is ready; a test is handed out
//! once every test it depends on has passed, and skipped (recorded by the coordinator)
//! when one did not; after a failure, the unassigned tests of the failed test's area go
//! to the front, as the peers do it.
//!
//! **Failures.** A worker that stops reporting progress for a lease loses its
//! assignment: the test goes to the front of the line. A result that arrives after its
//! test was reassigned is still recorded (and counted twice if both ran). When the
//! coordinator dies, the run stops: the workers' requests go unanswered, the tests in
//! flight and those never handed out have no result, and nothing resumes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::SessionLog;
use roundtable_core::session::STOP_STEP;
use roundtable_nats::NatsBackend;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::file::LocalSuite;
use super::suite::{Outcome, Suite, collective};
use super::worker::{self, Ran};
use crate::Failure;

/// The coordinator's peer id on the log.
pub(crate) const COORDINATOR: &str = "coordinator";
/// How long a worker waits before asking again when nothing is ready.
const WAIT_MS: u64 = 25;
/// A worker whose requests go unanswered this long gives up.
const GIVE_UP: Duration = Duration::from_secs(60);

fn work_subject(session: &SessionId) -> String {
    format!("rtc.{}.work", roundtable_nats::token(session.as_str()))
}

fn progress_subject(session: &SessionId) -> String {
    format!("rtc.{}.progress", roundtable_nats::token(session.as_str()))
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

/// A test's result as a worker reports it.
#[derive(Clone, Serialize, Deserialize)]
struct Done {
    assignment: u64,
    test: usize,
    outcome: Outcome,
    #[serde(default)]
    status: Option<String>,
    duration_ms: u64,
    #[serde(default)]
    output: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WorkRequest {
    worker: String,
    #[serde(default)]
    done: Option<Done>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkReply {
    Assign { assignment: u64, test: usize },
    Wait { ms: u64 },
    Done,
}

#[derive(Serialize, Deserialize)]
struct Progress {
    worker: String,
    assignment: u64,
}

/// One assignment in flight.
struct Assigned {
    test: usize,
    worker: String,
    deadline: Instant,
}

/// An append for the background appender, and the reply to send once it is on the log.
type Append = (Envelope, Option<(async_nats::Subject, Vec<u8>)>);

struct State {
    suite: Arc<Suite>,
    session: SessionId,
    me: PeerId,
    dependents: Vec<Vec<usize>>,
    /// Dependencies of each test not yet passed.
    waiting: Vec<usize>,
    result: Vec<Option<Outcome>>,
    resolved: usize,
    ready: VecDeque<usize>,
    in_flight: HashMap<u64, Assigned>,
    /// Assignments whose result was recorded (a repeated request does not record twice).
    recorded: HashSet<u64>,
    next_assignment: u64,
    lease: Duration,
    counts: HashMap<Outcome, usize>,
}

impl State {
    fn envelope(&self, step: String, text: String, json: serde_json::Value) -> Envelope {
        Envelope::new(&self.session, &self.me, step, Kind::Work, Recipient::All, Body::text(text).with_json(json))
    }

    /// Record test `i`'s first result; release or skip its dependents. Returns the
    /// envelopes to append (skips, a prioritization).
    fn resolve(&mut self, i: usize, outcome: Outcome, out: &mut Vec<Envelope>) {
        if self.result[i].is_some() {
            return;
        }
        self.result[i] = Some(outcome);
        self.resolved += 1;
        *self.counts.entry(outcome).or_default() += 1;
        for d in self.dependents[i].clone() {
            if self.result[d].is_some() {
                continue;
            }
            if outcome == Outcome::Pass {
                self.waiting[d] -= 1;
                if self.waiting[d] == 0 {
                    self.ready.push_back(d);
                }
            } else {
                let (id, failed) = (self.suite.id(d), self.suite.id(i));
                let json = serde_json::json!({
                    "op": "result", "task": id, "outcome": Outcome::Skip, "duration_ms": 0, "worker": COORDINATOR,
                });
                out.push(self.envelope(
                    format!("result/{id}/skip"),
                    format!("{id} skip: depends on {failed} which did not pass"),
                    json,
                ));
                self.resolve(d, Outcome::Skip, out);
            }
        }
        if outcome == Outcome::Fail {
            self.prioritize(i, out);
        }
    }

    /// Move the ready tests of `i`'s area to the front of the line.
    fn prioritize(&mut self, i: usize, out: &mut Vec<Envelope>) {
        let area = self.suite.area(i);
        if area.is_empty() {
            return;
        }
        let moved: Vec<usize> = self.ready.iter().copied().filter(|&j| self.suite.area(j) == area).take(64).collect();
        if moved.is_empty() {
            return;
        }
        let set: HashSet<usize> = moved.iter().copied().collect();
        let rest = self.ready.iter().copied().filter(|j| !set.contains(j));
        self.ready = moved.iter().copied().chain(rest).collect();
        let names: Vec<String> = moved.iter().map(|&j| self.suite.id(j)).collect();
        let failed = self.suite.id(i);
        out.push(self.envelope(
            format!("prioritize/{failed}"),
            format!("{failed} failed; moved up: {}", names.join(", ")),
            serde_json::json!({ "op": "prioritize", "failed": failed, "tests": names, "why": format!("same area ({area})") }),
        ));
    }

    fn assign(&mut self, worker: &str, out: &mut Vec<Envelope>) -> WorkReply {
        if self.resolved == self.suite.tests {
            return WorkReply::Done;
        }
        while let Some(i) = self.ready.pop_front() {
            if self.result[i].is_some() {
                continue;
            }
            let assignment = self.next_assignment;
            self.next_assignment += 1;
            self.in_flight.insert(
                assignment,
                Assigned { test: i, worker: worker.to_owned(), deadline: Instant::now() + self.lease },
            );
            let id = self.suite.id(i);
            out.push(self.envelope(
                format!("claim/{id}/{assignment}"),
                format!("{COORDINATOR} gives {id} to {worker}"),
                serde_json::json!({ "op": "claim", "task": id, "delivery": assignment, "worker": worker }),
            ));
            return WorkReply::Assign { assignment, test: i };
        }
        WorkReply::Wait { ms: WAIT_MS }
    }

    /// A worker's result: recorded once per assignment, whatever else happened.
    fn record(&mut self, worker: &str, done: Done, out: &mut Vec<Envelope>) {
        if done.test >= self.suite.tests || !self.recorded.insert(done.assignment) {
            return;
        }
        self.in_flight.remove(&done.assignment);
        let id = self.suite.id(done.test);
        let mut json = serde_json::json!({
            "op": "result", "task": id, "outcome": done.outcome, "delivery": done.assignment,
            "duration_ms": done.duration_ms, "worker": worker,
        });
        if let Some(s) = &done.status {
            json["status"] = s.clone().into();
        }
        if let Some(o) = &done.output {
            json["output"] = worker::cap_output(o, worker::LOG_OUTPUT_BYTES).into();
        }
        out.push(self.envelope(
            format!("result/{id}/{}", done.assignment),
            format!("{id} {} on {worker}", done.outcome.as_str()),
            json,
        ));
        self.resolve(done.test, done.outcome, out);
    }

    /// Assignments whose worker went silent for a lease go to the front of the line.
    fn reassign_expired(&mut self, out: &mut Vec<Envelope>) {
        let now = Instant::now();
        let expired: Vec<u64> = self.in_flight.iter().filter(|(_, a)| a.deadline <= now).map(|(n, _)| *n).collect();
        for n in expired {
            let a = self.in_flight.remove(&n).expect("listed");
            if self.result[a.test].is_some() {
                continue;
            }
            let id = self.suite.id(a.test);
            out.push(self.envelope(
                format!("reassign/{id}/{n}"),
                format!("{} went silent on {id}; it goes to another worker", a.worker),
                serde_json::json!({ "op": "reassign", "task": id, "delivery": n, "worker": a.worker }),
            ));
            self.ready.push_front(a.test);
        }
    }

    fn stop_envelope(&self) -> Envelope {
        let c = |o: Outcome| self.counts.get(&o).copied().unwrap_or(0);
        let reason = format!(
            "all {} tests resolved: {} passed, {} failed, {} skipped (coordinator)",
            self.suite.tests,
            c(Outcome::Pass),
            c(Outcome::Fail),
            c(Outcome::Skip)
        );
        collective(
            &self.session,
            &self.me,
            STOP_STEP.into(),
            Kind::Stop,
            Recipient::All,
            Body::text(reason.clone()).with_json(serde_json::json!({ "reason": reason })),
        )
    }
}

/// Run the coordinator of `session` until every test has a result.
pub(crate) async fn coordinate(backend: NatsBackend, session: SessionId) -> Result<(), Failure> {
    let log = worker::open_log(&backend, &session).await?;
    let (following, suite) = worker::follow_to_suite(&log).await;
    following.task.abort();
    let client = backend.client().clone();
    let mut requests = client.subscribe(work_subject(&session)).await.map_err(runtime)?;
    let mut progress = client.subscribe(progress_subject(&session)).await.map_err(runtime)?;

    let n = suite.tests;
    let mut state = State {
        dependents: {
            let mut out = vec![Vec::new(); n];
            for i in 0..n {
                for d in suite.deps(i) {
                    out[d].push(i);
                }
            }
            out
        },
        waiting: (0..n).map(|i| suite.deps(i).len()).collect(),
        result: vec![None; n],
        resolved: 0,
        ready: (0..n).filter(|&i| suite.deps(i).is_empty()).collect(),
        in_flight: HashMap::new(),
        recorded: HashSet::new(),
        next_assignment: 1,
        lease: Duration::from_millis(suite.lease_ms),
        counts: HashMap::new(),
        suite: suite.clone(),
        session: session.clone(),
        me: PeerId::from(COORDINATOR),
    };

    // The appender: envelopes in order, each reply sent once its envelope is on the log.
    let (tx, rx) = mpsc::unbounded_channel::<Append>();
    let appender = tokio::spawn(append_in_order(log.clone(), client.clone(), rx));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stopped = false;
    let mut stopped_at: Option<Instant> = None;
    let mut told_done: HashSet<String> = HashSet::new();
    loop {
        let mut out = Vec::new();
        tokio::select! {
            msg = requests.next() => {
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply.clone() else { continue };
                let Ok(req) = serde_json::from_slice::<WorkRequest>(&msg.payload) else {
                    tracing::warn!("a malformed work request");
                    continue;
                };
                if let Some(done) = req.done {
                    state.record(&req.worker, done, &mut out);
                }
                let reply = state.assign(&req.worker, &mut out);
                let bytes = serde_json::to_vec(&reply).expect("reply serializes");
                if state.resolved == n && !stopped {
                    out.push(state.stop_envelope());
                    stopped = true;
                    stopped_at = Some(Instant::now());
                }
                if matches!(reply, WorkReply::Done) {
                    told_done.insert(req.worker.clone());
                }
                // The reply goes out with this request's last envelope, once its result
                // (if any) is on the log.
                let last = out.len();
                if last == 0 {
                    let _ = client.publish(reply_to, bytes.into()).await;
                } else {
                    for (k, env) in out.into_iter().enumerate() {
                        let reply = (k + 1 == last).then(|| (reply_to.clone(), bytes.clone()));
                        let _ = tx.send((env, reply));
                    }
                }
                if stopped && (told_done.len() >= suite.workers.len() || stopped_at.is_some_and(|t: Instant| t.elapsed() > Duration::from_secs(5))) {
                    break;
                }
                continue;
            }
            msg = progress.next() => {
                let Some(msg) = msg else { break };
                if let Ok(p) = serde_json::from_slice::<Progress>(&msg.payload)
                    && let Some(a) = state.in_flight.get_mut(&p.assignment)
                    && a.worker == p.worker
                {
                    a.deadline = Instant::now() + state.lease;
                }
                continue;
            }
            _ = tick.tick() => state.reassign_expired(&mut out),
        }
        if state.resolved == n && !stopped {
            out.push(state.stop_envelope());
            stopped = true;
            stopped_at = Some(Instant::now());
        }
        for env in out {
            let _ = tx.send((env, None));
        }
        // Answer "done" a little while after the stop, so every worker hears it.
        if stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
    }
    drop(tx);
    let _ = appender.await;
    Ok(())
}

async fn append_in_order(
    log: Arc<dyn SessionLog>,
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<Append>,
) {
    while let Some((env, reply)) = rx.recv().await {
        if let Err(e) = log.append(env).await {
            tracing::warn!(error = %e, "the coordinator could not record an envelope");
            continue;
        }
        if let Some((to, bytes)) = reply {
            let _ = client.publish(to, bytes.into()).await;
        }
    }
}

/// Run a worker of the coordinator baseline until the coordinator says the run is done.
pub(crate) async fn work(
    backend: NatsBackend,
    session: SessionId,
    me: PeerId,
    suite_path: Option<std::path::PathBuf>,
) -> Result<(), Failure> {
    let log = worker::open_log(&backend, &session).await?;
    let (following, suite) = worker::follow_to_suite(&log).await;
    following.task.abort();
    let local: Option<Arc<LocalSuite>> = worker::local_suite(&session, &suite, suite_path.as_deref())?;
    let client = backend.client().clone();
    let subject = work_subject(&session);
    let mut done: Option<Done> = None;
    let mut last_answer = Instant::now();
    loop {
        let req = WorkRequest { worker: me.to_string(), done: done.clone() };
        let payload = serde_json::to_vec(&req).expect("request serializes");
        let answer =
            tokio::time::timeout(Duration::from_secs(5), client.request(subject.clone(), payload.into())).await;
        let reply = match answer {
            Ok(Ok(msg)) => serde_json::from_slice::<WorkReply>(&msg.payload).ok(),
            _ => None,
        };
        let Some(reply) = reply else {
            if last_answer.elapsed() > GIVE_UP {
                return Err(Failure::Runtime(format!(
                    "the coordinator of session {session} has not answered for {} s",
                    GIVE_UP.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        last_answer = Instant::now();
        done = None;
        match reply {
            WorkReply::Done => return Ok(()),
            WorkReply::Wait { ms } => tokio::time::sleep(Duration::from_millis(ms.min(1000))).await,
            WorkReply::Assign { assignment, test } => {
                if test >= suite.tests {
                    tracing::warn!(test, "an assignment out of range");
                    continue;
                }
                let beat = tokio::spawn(progress_beats(
                    client.clone(),
                    progress_subject(&session),
                    Progress { worker: me.to_string(), assignment },
                    Duration::from_millis((suite.lease_ms / 3).max(10)),
                ));
                let ran = match &local {
                    None => {
                        let ms = suite.duration_of(test);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let outcome = if suite.fails(test) { Outcome::Fail } else { Outcome::Pass };
                        Ran { outcome, status: None, output: None, duration_ms: ms }
                    }
                    Some(l) => worker::run_command(&l.tests[test]).await,
                };
                beat.abort();
                done = Some(Done {
                    assignment,
                    test,
                    outcome: ran.outcome,
                    status: ran.status.map(str::to_owned),
                    duration_ms: ran.duration_ms,
                    output: ran.output,
                });
            }
        }
    }
}

async fn progress_beats(client: async_nats::Client, subject: String, p: Progress, every: Duration) {
    let payload = serde_json::to_vec(&p).expect("progress serializes");
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let _ = client.publish(subject.clone(), payload.clone().into()).await;
    }
}
