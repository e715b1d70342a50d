//! `roundtable worktest`: the mission's distributed-testing example.
//!
//! A suite — real commands from a suite file (`--suite FILE`, one JSON test a line, or
//! `--collect cargo|pytest` from a runner's listing), or synthetic tests (each sleeps for
//! a duration drawn from a seeded log-normal, a set share of them fail, some depend on
//! earlier ones) — is queued on one shared NATS work queue; worker processes —
//! equals, with no coordinator — claim tests, run them and report on the session log;
//! a failing test's worker notifies the holders of the tests that depend on it, and they
//! skip them. With `--kill N`, N workers are SIGKILLed mid-run (while they hold a test)
//! and, with `--restart-after-ms`, started again. The run ends with a report: completion
//! time against the ideal (tests × duration ÷ workers), tests lost and tests completed
//! twice (both must be 0), redeliveries.
//!
//! A suite collected with `--collect cargo` runs the test binaries themselves: `cargo
//! test ARGS --no-run` builds them once, each binary's `--list` names its tests, and a
//! test's command is `BINARY --exact NAME` in its package's directory (where `cargo
//! test` runs it). Running `cargo test … -- --exact NAME` per test instead would have
//! every worker wait on cargo's lock of the target directory, re-check the package, and
//! start every test binary and the doc tests to find one test. `--collect pytest` runs
//! `pytest -q -p no:cacheprovider NODEID` per test (without the cache, which concurrent
//! workers would race to rewrite).
//!
//! The command that starts a run only submits the suite, starts the workers, kills the
//! chosen ones, and reads the report from the log: the workers decide everything among
//! themselves (see [`worker`]). Workers can equally be started by hand on other machines
//! (`--worker ID --session S`), with `--spawn 0` here.

mod coordinator;
mod file;
mod suite;
mod worker;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roundtable_core::bus::Backend;
use roundtable_core::envelope::{PeerId, SessionId};
use roundtable_core::session::new_session_id;
use roundtable_nats::NatsBackend;
use serde::Serialize;

use crate::Failure;
use crate::nats::NatsArgs;
use suite::{FileMeta, Fold, Outcome, Suite};

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
    /// Run the tests of this suite file (JSON lines: id, cmd, depends_on, area,
    /// timeout_secs, cwd) instead of synthetic ones. Each worker reads the commands from
    /// its own copy (workers started here get this path).
    #[arg(long, value_name = "FILE", conflicts_with = "collect")]
    suite: Option<PathBuf>,
    /// Collect the suite from a runner's listing (`cargo test -- --list`, `pytest
    /// --collect-only -q`) run in --collect-dir; each test runs as its own command.
    #[arg(long, value_name = "RUNNER")]
    collect: Option<file::Runner>,
    /// Where the runner lists (and runs) its tests.
    #[arg(long, value_name = "DIR", default_value = ".", requires = "collect")]
    collect_dir: PathBuf,
    /// An argument for the runner, before its `--` (repeat it: `--collect-arg -p
    /// --collect-arg mycrate`).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true, requires = "collect")]
    collect_arg: Vec<String>,
    /// Each collected test's timeout, in seconds.
    #[arg(long, default_value_t = 300.0, requires = "collect")]
    collect_timeout_secs: f64,
    /// A team file whose first peer's model (scripted or simulated offline, any provider
    /// online) reads a failing test's output and names the tests or areas likely
    /// affected; without it, the tests of the failed test's area are.
    #[arg(long, value_name = "FILE")]
    team: Option<PathBuf>,
    /// The median of how long each synthetic test runs, in ms.
    #[arg(long, default_value_t = 100)]
    duration_ms: u64,
    /// The spread of synthetic durations: σ of a log-normal around the median (0 to 3;
    /// 0 gives every test the median).
    #[arg(long, default_value_t = 0.0)]
    spread: f64,
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
    /// Run the coordinator baseline instead: one coordinator process assigns the tests
    /// to the workers and collects their results (core NATS request/reply).
    #[arg(long)]
    coordinator: bool,
    /// With --coordinator: SIGKILL the coordinator once 40% of the tests are resolved
    /// (the run then stops; the report says what was lost).
    #[arg(long, requires = "coordinator")]
    kill_coordinator: bool,
    /// Run as the coordinator of the session given with --session (what --coordinator
    /// starts).
    #[arg(long, requires = "session", conflicts_with = "worker", hide = true)]
    coordinate: bool,
    /// With --worker: a worker of the coordinator baseline.
    #[arg(long, requires = "worker", hide = true)]
    coordinated: bool,
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
    /// `peers` (the shared queue) or `coordinator` (the baseline).
    pub(crate) mode: &'static str,
    pub(crate) duration_ms: u64,
    pub(crate) spread: f64,
    /// The suite file's name and digest (none for a synthetic suite).
    pub(crate) suite_file: Option<String>,
    pub(crate) fail_rate: f64,
    pub(crate) dep_rate: f64,
    pub(crate) lease_ms: u64,
    /// From the workers' start to the stop.
    pub(crate) completion_ms: u64,
    /// The tests' durations summed ÷ workers (for a suite file: the durations measured
    /// on the log, so the same as `ideal_ran_ms`).
    pub(crate) ideal_ms: u64,
    /// The same for the tests that ran (skipped ones do not).
    pub(crate) ideal_ran_ms: u64,
    /// Queueing the suite (before the workers start).
    pub(crate) setup_ms: u64,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) skipped: usize,
    pub(crate) dead_lettered: usize,
    /// Commands killed at their timeout, and commands that could not start.
    pub(crate) timed_out: usize,
    pub(crate) errors: usize,
    /// Failures that named likely affected tests, and notices to their holders.
    pub(crate) prioritize_envelopes: u64,
    pub(crate) affected_notices: u64,
    /// Claims given up to the claimer of a test's other copy.
    pub(crate) yields: u64,
    /// Tests without a result (must be 0).
    pub(crate) lost: usize,
    /// Tests with more than one result (must be 0).
    pub(crate) completed_twice: usize,
    /// Deliveries beyond the first, as the queue counts them (for the coordinator: its
    /// reassignments).
    pub(crate) redeliveries: u64,
    /// Tests handed back by a worker waiting for dependencies.
    pub(crate) deferred: u64,
    /// Tests claimed by more than one worker (taken over after a kill, or deferred).
    pub(crate) taken_over: usize,
    /// Workers that lost a lease before reporting.
    pub(crate) abandoned: u64,
    pub(crate) killed: usize,
    pub(crate) restarted: usize,
    /// The coordinator was SIGKILLed.
    pub(crate) coordinator_killed: bool,
    /// The run ended without a stop on the log (the coordinator died): the tests
    /// without a result are counted lost.
    pub(crate) stopped_early: bool,
    pub(crate) absent_notices: u64,
    pub(crate) joins: u64,
    pub(crate) dependency_notices: u64,
    pub(crate) envelopes: u64,
}

/// The model of the team file's first peer.
fn namer(team: &Path) -> Result<Arc<dyn roundtable_core::model::ChatModel>, Failure> {
    let plan = crate::load_plan(team)?;
    let first = plan.peers.first().ok_or_else(|| input(format!("{}: the team has no peer", team.display())))?;
    let models = crate::factory::models_for(&plan, Some(&first.id)).map_err(|e| input(e.to_string()))?;
    models.get(&first.id).cloned().ok_or_else(|| input(format!("{}: peer {} has no model", team.display(), first.id)))
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
        let me = PeerId::from(id.as_str());
        if args.coordinated {
            coordinator::work(backend, session, me, args.suite.clone()).await?;
        } else {
            let namer = match &args.team {
                Some(team) => Some(namer(team)?),
                None => None,
            };
            worker::run(backend, session, me, args.suite.clone(), namer).await?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.coordinate {
        let session = SessionId::from(args.session.as_deref().unwrap_or_default());
        let backend = args.remote.connect(true).await?;
        coordinator::coordinate(backend, session).await?;
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
    if !(0.0..=3.0).contains(&args.spread) {
        return Err(input(format!("--spread must be between 0 and 3, not {}", args.spread)));
    }
    if !(args.collect_timeout_secs > 0.0 && args.collect_timeout_secs <= 86_400.0) {
        return Err(input(format!(
            "--collect-timeout-secs must be more than 0 and at most 86400, not {}",
            args.collect_timeout_secs
        )));
    }
    if args.team.is_some() && args.coordinator {
        return Err(input("--team names the peers' model; the --coordinator baseline uses the area rule"));
    }
    // The team file and the suite file are checked before anything starts.
    if let Some(team) = &args.team {
        namer(team)?;
    }
    let local = match &args.suite {
        Some(path) => Some(file::load(path)?),
        None => None,
    };
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
    let report = harness(dir, &args, &remote, spawn, local).await;
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

/// How a process of the run is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Peer,
    CoordinatedWorker,
    Coordinator,
}

fn spawn_worker(
    remote: &NatsArgs,
    session: &SessionId,
    id: &str,
    logs: &Path,
    suite: Option<&Path>,
    team: Option<&Path>,
    role: Role,
) -> Result<Child, Failure> {
    let exe = std::env::current_exe().map_err(runtime)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{id}.log")))
        .map_err(|e| runtime(format!("{}: {e}", logs.display())))?;
    let mut cmd = std::process::Command::new(exe);
    match role {
        Role::Coordinator => cmd.args(["worktest", "--coordinate", "--session", session.as_str()]),
        Role::Peer => cmd.args(["worktest", "--worker", id, "--session", session.as_str()]),
        Role::CoordinatedWorker => {
            cmd.args(["worktest", "--worker", id, "--coordinated", "--session", session.as_str()])
        }
    };
    if let Some(path) = suite.filter(|_| role != Role::Coordinator) {
        cmd.arg("--suite").arg(path);
    }
    if let Some(path) = team.filter(|_| role == Role::Peer) {
        cmd.arg("--team").arg(path);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // The connection, secrets included, goes by environment, never on a command line.
    for (k, v) in remote.child_env() {
        cmd.env(k, v);
    }
    cmd.spawn().map_err(|e| runtime(format!("starting worker {id}: {e}")))
}

async fn harness(
    dir: &Path,
    args: &WorktestArgs,
    remote: &NatsArgs,
    spawn: usize,
    local: Option<file::LocalSuite>,
) -> Result<Report, Failure> {
    let backend: NatsBackend = remote.connect(true).await?;
    let session = args.session.clone().map_or_else(new_session_id, SessionId::from);
    let logs: PathBuf = dir.join("worktest").join(roundtable_nats::token(session.as_str()));
    std::fs::create_dir_all(&logs).map_err(|e| runtime(format!("{}: {e}", logs.display())))?;
    // A collected suite is written next to the workers' logs, and runs from there.
    let local = match (local, args.collect) {
        (Some(l), _) => Some(l),
        (None, Some(runner)) => {
            let lines = file::collect(runner, &args.collect_dir, &args.collect_arg, args.collect_timeout_secs)?;
            let path = logs.join("suite.jsonl");
            std::fs::write(&path, lines).map_err(|e| runtime(format!("{}: {e}", path.display())))?;
            Some(file::load(&path)?)
        }
        (None, None) => None,
    };
    let suite_path: Option<PathBuf> = match &local {
        Some(l) => Some(std::fs::canonicalize(&l.path).map_err(|e| runtime(format!("{}: {e}", l.path.display())))?),
        None => None,
    };
    let team_path: Option<PathBuf> = match &args.team {
        Some(t) => Some(std::fs::canonicalize(t).map_err(|e| input(format!("{}: {e}", t.display())))?),
        None => None,
    };
    let workers: Vec<String> = (0..args.workers).map(|i| format!("w{i:02}")).collect();
    let suite = Suite {
        tests: local.as_ref().map_or(args.tests, |l| l.tests.len()),
        spread: args.spread,
        file: local.as_ref().map(FileMeta::of),
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
    // The suite on the log is the one that runs (a session given again keeps its own).
    let (worker::Following { fold, changed, task: follower }, suite) = worker::follow_to_suite(&log).await;
    // A session given again runs its own suite: this machine's copy must match it.
    worker::local_suite(&session, &suite, suite_path.as_deref())?;
    let queue = if args.coordinator {
        None
    } else {
        let q = backend.work_queue(&session, worker::queue_config(&suite)).await.map_err(runtime)?;
        // Created here, so the workers do not race to create it.
        backend.work_queue(&worker::priority_session(&session), worker::queue_config(&suite)).await.map_err(runtime)?;
        Some(q)
    };
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
    if let Some(queue) = &queue
        && !fold.lock().expect("fold lock").queued
    {
        worker::seed(queue, &log, &suite, &submitter).await?;
    }
    let setup_ms = setup.elapsed().as_millis() as u64;

    let started = Instant::now();
    let role = if args.coordinator { Role::CoordinatedWorker } else { Role::Peer };
    let mut coordinator: Option<Child> = if args.coordinator {
        Some(spawn_worker(remote, &session, coordinator::COORDINATOR, &logs, None, None, Role::Coordinator)?)
    } else {
        None
    };
    let mut coordinator_killed_at: Option<Instant> = None;
    let mut stopped_early = false;
    let mut procs: Vec<Spawned> = Vec::new();
    for id in workers.iter().take(spawn) {
        procs.push(Spawned {
            id: id.clone(),
            child: Some(spawn_worker(remote, &session, id, &logs, suite_path.as_deref(), team_path.as_deref(), role)?),
        });
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
    let ideal_ms = match &local {
        None => (0..suite.tests).map(|i| suite.duration_of(i)).sum::<u64>() / suite.workers.len() as u64,
        // Known from the log at the end.
        Some(_) => 0,
    };
    // By default 10 × the ideal; for commands, twice their timeouts ÷ workers.
    let default_timeout = match &local {
        None => (ideal_ms / 100).max(120),
        Some(l) => {
            (l.tests.iter().map(|t| t.timeout_secs).sum::<f64>() * 2.0 / suite.workers.len() as f64) as u64 + 120
        }
    };
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or(default_timeout));
    let mut last_progress = 0;
    let completion_ms = loop {
        let (resolved, stopped) = {
            let f = fold.lock().expect("fold lock");
            (f.resolved, f.stop.is_some())
        };
        if stopped {
            break started.elapsed().as_millis() as u64;
        }
        if args.kill_coordinator
            && coordinator_killed_at.is_none()
            && resolved * 10 >= suite.tests * 4
            && let Some(mut c) = coordinator.take()
        {
            let _ = c.kill();
            let _ = c.wait();
            coordinator_killed_at = Some(Instant::now());
            if !args.json {
                eprintln!("  killed the coordinator (SIGKILL) after {:.1} s", started.elapsed().as_secs_f64());
            }
        }
        // Nothing takes over from a dead coordinator: once nothing has moved for two
        // leases (at least 5 s), the run is over.
        if let Some(at) = coordinator_killed_at {
            let quiet = Duration::from_millis(suite.lease_ms * 2).max(Duration::from_secs(5));
            if at.elapsed() > quiet {
                stopped_early = true;
                break started.elapsed().as_millis() as u64;
            }
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
            let child = spawn_worker(remote, &session, &id, &logs, suite_path.as_deref(), team_path.as_deref(), role)?;
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

    // The workers exit once they see the stop (a run that stopped early ends them).
    if stopped_early {
        for p in &mut procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
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
    if let Some(mut c) = coordinator.take() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    follower.abort();

    // The report, from the whole log.
    let mut f = Fold::new();
    let entries = log.read_all().await?;
    for e in &entries {
        f.apply(e);
    }
    let redeliveries = match &queue {
        Some(q) => q.stats().await.map_err(runtime)?.redeliveries,
        None => f.reassigned,
    };
    let count = |o: Outcome| f.result.iter().filter(|r| matches!(r, Some((x, _)) if *x == o)).count();
    let (passed, failed, skipped, dead) =
        (count(Outcome::Pass), count(Outcome::Fail), count(Outcome::Skip), count(Outcome::Dead));
    let ideal_ran_ms = f.ran_ms / suite.workers.len() as u64;
    Ok(Report {
        session: session.to_string(),
        tests: suite.tests,
        workers: suite.workers.len(),
        mode: if args.coordinator { "coordinator" } else { "peers" },
        duration_ms: if suite.file.is_some() { 0 } else { suite.duration_ms },
        spread: suite.spread,
        suite_file: suite.file.as_ref().map(|f| format!("{} ({})", f.name, f.digest)),
        fail_rate: suite.fail_rate,
        dep_rate: suite.dep_rate,
        lease_ms: suite.lease_ms,
        completion_ms,
        ideal_ms: if suite.file.is_some() { ideal_ran_ms } else { ideal_ms },
        ideal_ran_ms,
        setup_ms,
        passed,
        failed,
        skipped,
        dead_lettered: dead,
        timed_out: f.timed_out,
        errors: f.errors,
        prioritize_envelopes: f.prioritize_envelopes,
        affected_notices: f.affected_notices,
        yields: f.yields,
        lost: f
            .result
            .iter()
            .filter(|r| !matches!(r, Some((Outcome::Pass | Outcome::Fail | Outcome::Skip, _))))
            .count(),
        completed_twice: f.results.iter().filter(|&&n| n > 1).count(),
        redeliveries,
        deferred: f.defers,
        taken_over: f.claimers.iter().filter(|c| c.len() > 1).count(),
        abandoned: f.abandoned,
        killed,
        restarted,
        coordinator_killed: coordinator_killed_at.is_some(),
        stopped_early,
        absent_notices: f.absent_notices,
        joins: f.joins,
        dependency_notices: f.notices,
        envelopes: entries.len() as u64,
    })
}

fn print_report(r: &Report) {
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    match &r.suite_file {
        Some(file) => println!(
            "Distributed testing ({}), session {}: the {} tests of {file} on {} workers (lease {} ms)",
            r.mode, r.session, r.tests, r.workers, r.lease_ms
        ),
        None => println!(
            "Distributed testing ({}), session {}: {} tests of {} ms (median, spread {}) on {} workers (fail rate {}, dependency rate {}, lease {} ms)",
            r.mode, r.session, r.tests, r.duration_ms, r.spread, r.workers, r.fail_rate, r.dep_rate, r.lease_ms
        ),
    }
    let rows: Vec<(&str, String)> = vec![
        ("completion time", secs(r.completion_ms)),
        ("ideal (durations summed ÷ workers)", secs(r.ideal_ms)),
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
        ("coordinator killed / run stopped early", format!("{} / {}", r.coordinator_killed, r.stopped_early)),
        ("absence notices / returns", format!("{} / {}", r.absent_notices, r.joins)),
        ("dependency failure notices", r.dependency_notices.to_string()),
        ("dead-lettered", r.dead_lettered.to_string()),
        ("timed out / could not start", format!("{} / {}", r.timed_out, r.errors)),
        ("failures moving tests up / notices", format!("{} / {}", r.prioritize_envelopes, r.affected_notices)),
        ("claims yielded to the other copy", r.yields.to_string()),
        ("envelopes on the log", r.envelopes.to_string()),
    ];
    for (k, v) in rows {
        println!("  {k:<40} {v}");
    }
}
