//! `roundtable worktest`: the mission's distributed-testing example.
//!
//! A suite of synthetic tests (each sleeps for a set time, a set share of them fail, some
//! depend on earlier ones) is queued on one shared NATS work queue; worker processes —
//! equals, with no coordinator — claim tests, run them and report on the session log;
//! a failing test's worker notifies the holders of the tests that depend on it, and they
//! skip them. With `--kill N`, N workers are SIGKILLed mid-run (while they hold a test)
//! and, with `--restart-after-ms`, started again. The run ends with a report: completion
//! time against the ideal (tests × duration ÷ workers), tests lost and tests completed
//! twice (both must be 0), redeliveries.
//!
//! The command that starts a run only submits the suite, starts the workers, kills the
//! chosen ones, and reads the report from the log: the workers decide everything among
//! themselves (see [`worker`]). Workers can equally be started by hand on other machines
//! (`--worker ID --session S`), with `--spawn 0` here.

mod suite;
mod worker;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roundtable_core::bus::Backend;
use roundtable_core::envelope::{PeerId, SessionId};
use roundtable_core::session::new_session_id;
use roundtable_nats::NatsBackend;
use serde::Serialize;
use tokio::sync::Notify;

use crate::Failure;
use crate::nats::NatsArgs;
use suite::{Fold, Outcome, Suite};

/// Options of `roundtable worktest`.
#[derive(clap::Args)]
pub(crate) struct WorktestArgs {
    /// Number of synthetic tests.
    #[arg(long, default_value_t = 5000)]
    tests: usize,
    /// Number of workers (peer processes).
    #[arg(long, default_value_t = 20)]
    workers: usize,
    /// How many of the workers this command starts (the others are started elsewhere
    /// with --worker); all by default.
    #[arg(long)]
    spawn: Option<usize>,
    /// How long each synthetic test runs, in ms.
    #[arg(long, default_value_t = 100)]
    duration_ms: u64,
    /// Share of the tests that fail (0 to 1).
    #[arg(long, default_value_t = 0.01)]
    fail_rate: f64,
    /// Share of the tests that depend on one or two earlier tests (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    dep_rate: f64,
    /// SIGKILL this many workers mid-run, each while it holds a test.
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Start each killed worker again after this many ms (not restarted without it).
    #[arg(long, value_name = "MS")]
    restart_after_ms: Option<u64>,
    /// The queue's lease: a test whose worker neither reports nor extends it within this
    /// time goes to another worker.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// A worker silent for this long is recorded absent.
    #[arg(long, default_value_t = 3000)]
    absent_after_ms: u64,
    /// Seed of the suite (outcomes, dependencies) and of the choice of victims.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up (exit 1) when the run has not ended after this many seconds (default: 10
    /// times the ideal, at least 2 minutes).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// The session's id (default: a new one).
    #[arg(long)]
    session: Option<String>,
    /// Run as worker ID of the session given with --session (what this command starts
    /// for each worker; use it to add workers from other machines).
    #[arg(long, value_name = "ID", requires = "session")]
    worker: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Without --nats, a private nats-server (from PATH) is started for the run.
    #[command(flatten)]
    remote: NatsArgs,
}

/// The numbers a run ends with.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) session: String,
    pub(crate) tests: usize,
    pub(crate) workers: usize,
    pub(crate) duration_ms: u64,
    pub(crate) fail_rate: f64,
    pub(crate) dep_rate: f64,
    pub(crate) lease_ms: u64,
    /// From the workers' start to the stop.
    pub(crate) completion_ms: u64,
    /// tests × duration ÷ workers.
    pub(crate) ideal_ms: u64,
    /// The same for the tests that ran (skipped ones do not).
    pub(crate) ideal_ran_ms: u64,
    /// Queueing the suite (before the workers start).
    pub(crate) setup_ms: u64,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) skipped: usize,
    pub(crate) dead_lettered: usize,
    /// Tests without a result (must be 0).
    pub(crate) lost: usize,
    /// Tests with more than one result (must be 0).
    pub(crate) completed_twice: usize,
    /// Deliveries beyond the first, as the queue counts them.
    pub(crate) redeliveries: u64,
    /// Tests handed back by a worker waiting for dependencies.
    pub(crate) deferred: u64,
    /// Tests claimed by more than one worker (taken over after a kill, or deferred).
    pub(crate) taken_over: usize,
    /// Workers that lost a lease before reporting.
    pub(crate) abandoned: u64,
    pub(crate) killed: usize,
    pub(crate) restarted: usize,
    pub(crate) absent_notices: u64,
    pub(crate) joins: u64,
    pub(crate) dependency_notices: u64,
    pub(crate) envelopes: u64,
}

fn input(msg: impl Into<String>) -> Failure {
    Failure::Input(msg.into())
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

/// The workers of a test run, if `task` is a test run's task.
pub(crate) fn suite_of(task: &roundtable_core::Envelope) -> Option<Vec<String>> {
    Suite::of_task(task).map(|s| s.workers)
}

pub(crate) async fn run(dir: &Path, args: WorktestArgs) -> Result<ExitCode, Failure> {
    if let Some(id) = &args.worker {
        let session = SessionId::from(args.session.as_deref().unwrap_or_default());
        let backend = args.remote.connect(true).await?;
        worker::run(backend, session, PeerId::from(id.as_str())).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.tests == 0 || args.workers == 0 || args.workers > 1000 {
        return Err(input("--tests must be at least 1 and --workers between 1 and 1000"));
    }
    for (flag, v) in [("--fail-rate", args.fail_rate), ("--dep-rate", args.dep_rate)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(input(format!("{flag} must be between 0 and 1, not {v}")));
        }
    }
    let spawn = args.spawn.unwrap_or(args.workers);
    if spawn > args.workers || args.kill > spawn {
        return Err(input(format!(
            "--spawn ({spawn}) must be at most --workers ({}), and --kill ({}) at most --spawn",
            args.workers, args.kill
        )));
    }
    if args.lease_ms < 100 {
        return Err(input("--lease-ms must be at least 100"));
    }
    // The server: the one given, or a private one for this run.
    let private = match args.remote.url() {
        Some(_) => None,
        None => {
            if !roundtable_nats::testing::server_binary().is_some_and(|p| p.is_file()) {
                return Err(input(
                    "no --nats URL and no nats-server to start a private one: install it \
                     (`apt-get install nats-server`, 2.9 or newer) or pass --nats URL",
                ));
            }
            let server = tokio::task::spawn_blocking(roundtable_nats::testing::NatsServer::start)
                .await
                .map_err(|e| runtime(format!("starting nats-server: {e}")))?;
            if !args.json {
                eprintln!("Started a private nats-server at {} for this run.", server.url());
            }
            Some(server)
        }
    };
    let mut remote = args.remote.clone();
    if let Some(server) = &private {
        remote.nats = Some(server.url());
    }
    let report = harness(dir, &args, &remote, spawn).await;
    drop(private);
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        print_report(&report);
    }
    Ok(if report.lost == 0 && report.completed_twice == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A worker process of this run.
struct Spawned {
    id: String,
    child: Option<Child>,
}

fn spawn_worker(remote: &NatsArgs, session: &SessionId, id: &str, logs: &Path) -> Result<Child, Failure> {
    let exe = std::env::current_exe().map_err(runtime)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{id}.log")))
        .map_err(|e| runtime(format!("{}: {e}", logs.display())))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["worktest", "--worker", id, "--session", session.as_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // The connection, secrets included, goes by environment, never on a command line.
    for (k, v) in remote.child_env() {
        cmd.env(k, v);
    }
    cmd.spawn().map_err(|e| runtime(format!("starting worker {id}: {e}")))
}

async fn harness(dir: &Path, args: &WorktestArgs, remote: &NatsArgs, spawn: usize) -> Result<Report, Failure> {
    let backend: NatsBackend = remote.connect(true).await?;
    let session = args.session.clone().map_or_else(new_session_id, SessionId::from);
    let workers: Vec<String> = (0..args.workers).map(|i| format!("w{i:02}")).collect();
    let suite = Suite {
        tests: args.tests,
        workers: workers.clone(),
        duration_ms: args.duration_ms,
        fail_rate: args.fail_rate,
        dep_rate: args.dep_rate,
        seed: args.seed,
        lease_ms: args.lease_ms,
        max_deliver: 20,
        heartbeat_ms: 250,
        absent_after_ms: args.absent_after_ms,
    };
    let setup = Instant::now();
    let log = backend.logs().open(&session, true).await?;
    log.append(suite.task_envelope(&session)).await?;
    let fold = Arc::new(Mutex::new(Fold::new()));
    let changed = Arc::new(Notify::new());
    let follower = tokio::spawn(worker::follow(log.clone(), fold.clone(), changed.clone()));
    // The suite on the log is the one that runs (a session given again keeps its own).
    let suite = worker::suite_of(&fold, &changed).await;
    let queue = backend.work_queue(&session, worker::queue_config(&suite)).await.map_err(runtime)?;
    if !args.json {
        eprintln!(
            "Session {session}: queueing {} tests of {} ms for {} workers…",
            suite.tests,
            suite.duration_ms,
            suite.workers.len()
        );
    }
    let submitter = PeerId::from("submitter");
    worker::sync_to_end(&log, &fold, &changed).await?;
    if !fold.lock().expect("fold lock").queued {
        worker::seed(&queue, &log, &suite, &submitter).await?;
    }
    let setup_ms = setup.elapsed().as_millis() as u64;

    let logs: PathBuf = dir.join("worktest").join(roundtable_nats::token(session.as_str()));
    std::fs::create_dir_all(&logs).map_err(|e| runtime(format!("{}: {e}", logs.display())))?;
    let started = Instant::now();
    let mut procs: Vec<Spawned> = Vec::new();
    for id in workers.iter().take(spawn) {
        procs.push(Spawned { id: id.clone(), child: Some(spawn_worker(remote, &session, id, &logs)?) });
    }
    if !args.json {
        eprintln!("Started {spawn} workers (their logs: {}).", logs.display());
    }

    // Kill points: fractions of the tests resolved, spread over the middle of the run.
    let mut rng = suite.seed ^ 0x5eed;
    let mut draw = move || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut kill_at: Vec<f64> = (0..args.kill).map(|k| 0.1 + 0.6 * (k as f64 + draw()) / args.kill as f64).collect();
    kill_at.sort_by(f64::total_cmp);
    let mut restarts: Vec<(Instant, String)> = Vec::new();
    let (mut killed, mut restarted) = (0, 0);
    let ideal_ms = (suite.tests as u64 * suite.duration_ms) / suite.workers.len() as u64;
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or((ideal_ms / 100).max(120)));
    let mut last_progress = 0;
    let completion_ms = loop {
        let (resolved, stopped) = {
            let f = fold.lock().expect("fold lock");
            (f.resolved, f.stop.is_some())
        };
        if stopped {
            break started.elapsed().as_millis() as u64;
        }
        if started.elapsed() > timeout {
            for p in &mut procs {
                if let Some(mut c) = p.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            follower.abort();
            return Err(Failure::Runtime(format!(
                "the run did not end within {timeout:?} ({resolved} of {} tests resolved); worker logs in {}",
                suite.tests,
                logs.display()
            )));
        }
        if !args.json && resolved * 10 / suite.tests > last_progress {
            last_progress = resolved * 10 / suite.tests;
            eprintln!("  {resolved} of {} tests resolved after {:.1} s", suite.tests, started.elapsed().as_secs_f64());
        }
        if let Some(&at) = kill_at.first()
            && resolved as f64 >= at * suite.tests as f64
        {
            kill_at.remove(0);
            // A worker in the middle of a test, if there is one.
            let victims: Vec<usize> = {
                let f = fold.lock().expect("fold lock");
                let running: Vec<usize> = (0..procs.len()).filter(|&k| procs[k].child.is_some()).collect();
                let busy: Vec<usize> = running
                    .iter()
                    .copied()
                    .filter(|&k| {
                        (0..suite.tests).any(|i| {
                            f.result[i].is_none()
                                && f.holder[i].as_ref().is_some_and(|(h, _)| h.as_str() == procs[k].id)
                        })
                    })
                    .collect();
                if busy.is_empty() { running } else { busy }
            };
            if !victims.is_empty() {
                let k = victims[(draw() * victims.len() as f64) as usize % victims.len()];
                if let Some(mut c) = procs[k].child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                    killed += 1;
                    if !args.json {
                        eprintln!("  killed {} (SIGKILL) after {:.1} s", procs[k].id, started.elapsed().as_secs_f64());
                    }
                    if let Some(ms) = args.restart_after_ms {
                        restarts.push((Instant::now() + Duration::from_millis(ms), procs[k].id.clone()));
                    }
                }
            }
        }
        let now = Instant::now();
        let due: Vec<String> = restarts.iter().filter(|(t, _)| *t <= now).map(|(_, id)| id.clone()).collect();
        restarts.retain(|(t, _)| *t > now);
        for id in due {
            let child = spawn_worker(remote, &session, &id, &logs)?;
            if let Some(p) = procs.iter_mut().find(|p| p.id == id) {
                p.child = Some(child);
            }
            restarted += 1;
            if !args.json {
                eprintln!("  restarted {id} after {:.1} s", started.elapsed().as_secs_f64());
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), changed.notified()).await;
    };

    // The workers exit once they see the stop.
    let grace = Instant::now() + Duration::from_secs(30);
    for p in &mut procs {
        if let Some(mut c) = p.child.take() {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    follower.abort();

    // The report, from the whole log.
    let mut f = Fold::new();
    let entries = log.read_all().await?;
    for e in &entries {
        f.apply(e);
    }
    let stats = queue.stats().await.map_err(runtime)?;
    let count = |o: Outcome| f.result.iter().filter(|r| matches!(r, Some((x, _)) if *x == o)).count();
    let (passed, failed, skipped, dead) =
        (count(Outcome::Pass), count(Outcome::Fail), count(Outcome::Skip), count(Outcome::Dead));
    let ran = (passed + failed) as u64;
    Ok(Report {
        session: session.to_string(),
        tests: suite.tests,
        workers: suite.workers.len(),
        duration_ms: suite.duration_ms,
        fail_rate: suite.fail_rate,
        dep_rate: suite.dep_rate,
        lease_ms: suite.lease_ms,
        completion_ms,
        ideal_ms,
        ideal_ran_ms: ran * suite.duration_ms / suite.workers.len() as u64,
        setup_ms,
        passed,
        failed,
        skipped,
        dead_lettered: dead,
        lost: f
            .result
            .iter()
            .filter(|r| !matches!(r, Some((Outcome::Pass | Outcome::Fail | Outcome::Skip, _))))
            .count(),
        completed_twice: f.results.iter().filter(|&&n| n > 1).count(),
        redeliveries: stats.redeliveries,
        deferred: f.defers,
        taken_over: f.claimers.iter().filter(|c| c.len() > 1).count(),
        abandoned: f.abandoned,
        killed,
        restarted,
        absent_notices: f.absent_notices,
        joins: f.joins,
        dependency_notices: f.notices,
        envelopes: entries.len() as u64,
    })
}

fn print_report(r: &Report) {
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    println!(
        "Distributed testing, session {}: {} tests of {} ms on {} workers (fail rate {}, dependency rate {}, lease {} ms)",
        r.session, r.tests, r.duration_ms, r.workers, r.fail_rate, r.dep_rate, r.lease_ms
    );
    let rows: Vec<(&str, String)> = vec![
        ("completion time", secs(r.completion_ms)),
        ("ideal (tests × duration ÷ workers)", secs(r.ideal_ms)),
        ("ideal for the tests that ran", secs(r.ideal_ran_ms)),
        ("completion ÷ ideal", format!("{:.2}", r.completion_ms as f64 / r.ideal_ms.max(1) as f64)),
        ("queueing the suite", secs(r.setup_ms)),
        ("passed / failed / skipped", format!("{} / {} / {}", r.passed, r.failed, r.skipped)),
        ("tests lost (must be 0)", r.lost.to_string()),
        ("tests completed twice (must be 0)", r.completed_twice.to_string()),
        ("redeliveries (queue)", r.redeliveries.to_string()),
        ("deferred (waiting for dependencies)", r.deferred.to_string()),
        ("tests claimed by more than one worker", r.taken_over.to_string()),
        ("leases lost before reporting", r.abandoned.to_string()),
        ("workers killed / restarted", format!("{} / {}", r.killed, r.restarted)),
        ("absence notices / returns", format!("{} / {}", r.absent_notices, r.joins)),
        ("dependency failure notices", r.dependency_notices.to_string()),
        ("dead-lettered", r.dead_lettered.to_string()),
        ("envelopes on the log", r.envelopes.to_string()),
    ];
    for (k, v) in rows {
        println!("  {k:<40} {v}");
    }
}
