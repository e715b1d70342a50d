//! `dataproc`: negotiated data processing against a coordinator (see
//! `roundtable_bench::dataproc`), agents as processes of their own.
//!
//! ```text
//! dataproc run [--mode p2p|coordinator|both] [--agents 15] [--partitions 30] [--events 60]
//!              [--hot 3] [--hot-ms 50] [--cold-ms 5] [--batch 10] [--kill 0]
//!              [--kill-at 0.3] [--absent-after-ms 1500] [--runs 1] [--nats URL]
//!              [--restart-server-at FRACTION] [--server-down-ms 1000]
//! ```
//!
//! `run` starts a private nats-server (from PATH) unless `--nats` names one, publishes
//! the backlog, starts the agents (and the coordinator), SIGKILLs `--kill` agents (the
//! owners of the hot partitions) once `--kill-at` of the events are recorded, and
//! prints one JSON line per run, counted from the log. With `--restart-server-at`, the
//! private server is SIGKILLed once that fraction of the events is recorded and started
//! again on the same port and store after `--server-down-ms` (not with `--nats`: the
//! server is not ours to kill). Exit 0 when every run lost nothing and recorded nothing
//! twice, 1 otherwise, 2 on bad input.

use std::collections::HashMap;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use roundtable_bench::dataproc::{self, Mode, RunResult, Workload};
use roundtable_core::bus::Backend;
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;

const USAGE: &str = "usage: dataproc run [--mode p2p|coordinator|both] [--agents N] [--partitions N] [--events N] \
[--hot N] [--hot-ms MS] [--cold-ms MS] [--batch N] [--kill N] [--kill-at FRACTION] [--absent-after-ms MS] [--runs N] [--nats URL] \
[--restart-server-at FRACTION] [--server-down-ms MS]";

const FLAGS: &[&str] = &[
    "--mode",
    "--agents",
    "--partitions",
    "--events",
    "--hot",
    "--hot-ms",
    "--cold-ms",
    "--batch",
    "--kill",
    "--kill-at",
    "--absent-after-ms",
    "--runs",
    "--nats",
    "--restart-server-at",
    "--server-down-ms",
    "--run",
    "--index",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match parse_flags(rest) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dataproc: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let result = match command.as_str() {
        "run" => rt.block_on(run(&flags)),
        "agent" | "coordinator" => rt.block_on(child(command, &flags)),
        other => Err(Bad::Input(format!("unknown command {other:?}; valid: run"))),
    };
    match result {
        Ok(code) => code,
        Err(Bad::Input(e)) => {
            eprintln!("dataproc: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Bad::Runtime(e)) => {
            eprintln!("dataproc: {e}");
            ExitCode::from(1)
        }
    }
}

enum Bad {
    Input(String),
    Runtime(String),
}

fn runtime(e: impl std::fmt::Display) -> Bad {
    Bad::Runtime(e.to_string())
}

fn parse_flags(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag:?}; valid: {}", FLAGS[..FLAGS.len() - 2].join(", ")));
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        out.insert(flag.clone(), value.clone());
    }
    Ok(out)
}

fn num<T: std::str::FromStr>(flags: &HashMap<String, String>, flag: &str, default: T) -> Result<T, Bad> {
    match flags.get(flag) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| Bad::Input(format!("{flag} {v:?}: not a number"))),
    }
}

fn workload(flags: &HashMap<String, String>) -> Result<Workload, Bad> {
    let w = Workload {
        agents: num(flags, "--agents", 15)?,
        partitions: num(flags, "--partitions", 30)?,
        events: num(flags, "--events", 60)?,
        hot: num(flags, "--hot", 3)?,
        hot_ms: num(flags, "--hot-ms", 50)?,
        cold_ms: num(flags, "--cold-ms", 5)?,
        batch: num(flags, "--batch", 10)?,
        absent_after_ms: num(flags, "--absent-after-ms", 1500)?,
    };
    w.check().map_err(Bad::Input)?;
    Ok(w)
}

/// The command line that makes a child process repeat this workload.
fn workload_args(w: &Workload) -> Vec<String> {
    [
        ("--agents", w.agents as u64),
        ("--partitions", w.partitions as u64),
        ("--events", w.events as u64),
        ("--hot", w.hot as u64),
        ("--hot-ms", w.hot_ms),
        ("--cold-ms", w.cold_ms),
        ("--batch", w.batch as u64),
        ("--absent-after-ms", w.absent_after_ms),
    ]
    .iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect()
}

async fn child(command: &str, flags: &HashMap<String, String>) -> Result<ExitCode, Bad> {
    let w = workload(flags)?;
    let url = flags.get("--nats").ok_or_else(|| Bad::Input("--nats is required".into()))?;
    let run = flags.get("--run").ok_or_else(|| Bad::Input("--run is required".into()))?;
    let mode = Mode::parse(flags.get("--mode").map_or("p2p", String::as_str))
        .ok_or_else(|| Bad::Input("--mode: valid: p2p, coordinator".into()))?;
    if command == "coordinator" {
        dataproc::coordinator(url, run, &w).await.map_err(runtime)?;
    } else {
        let index: usize = num(flags, "--index", usize::MAX)?;
        if index >= w.agents {
            return Err(Bad::Input(format!("--index {index}: valid: 0 to {}", w.agents - 1)));
        }
        let report = dataproc::agent(url, run, &w, index, mode).await.map_err(runtime)?;
        println!("{}", serde_json::to_string(&report).expect("a report serializes"));
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn run(flags: &HashMap<String, String>) -> Result<ExitCode, Bad> {
    let w = workload(flags)?;
    let kill: usize = num(flags, "--kill", 0)?;
    if kill >= w.agents {
        return Err(Bad::Input(format!("--kill {kill}: valid: 0 to {} (one agent must live)", w.agents - 1)));
    }
    let kill_at: f64 = num(flags, "--kill-at", 0.3)?;
    if !(0.0..=1.0).contains(&kill_at) {
        return Err(Bad::Input(format!("--kill-at {kill_at}: valid: 0 to 1")));
    }
    let runs: usize = num(flags, "--runs", 1)?;
    if !(1..=100).contains(&runs) {
        return Err(Bad::Input(format!("--runs {runs}: valid: 1 to 100")));
    }
    let modes = match flags.get("--mode").map_or("both", String::as_str) {
        "both" => vec![Mode::PeerToPeer, Mode::Coordinator],
        m => vec![Mode::parse(m).ok_or_else(|| Bad::Input(format!("--mode {m:?}: valid: p2p, coordinator, both")))?],
    };
    let restart_at: Option<f64> = match flags.get("--restart-server-at") {
        None => None,
        Some(v) => {
            let f: f64 = v.parse().map_err(|_| Bad::Input(format!("--restart-server-at {v:?}: not a number")))?;
            if !(0.0..=1.0).contains(&f) {
                return Err(Bad::Input(format!("--restart-server-at {v}: valid: 0 to 1")));
            }
            Some(f)
        }
    };
    let down_ms: u64 = num(flags, "--server-down-ms", 1000)?;
    if down_ms > 60_000 {
        return Err(Bad::Input(format!("--server-down-ms {down_ms}: valid: 0 to 60000")));
    }
    if restart_at.is_some() && flags.contains_key("--nats") {
        return Err(Bad::Input("--restart-server-at restarts the run's own server: valid only without --nats".into()));
    }
    let mut server = None;
    let url = match flags.get("--nats") {
        Some(u) => u.clone(),
        None => server.insert(NatsServer::start()).url(),
    };
    let restart = restart_at.map(|at| Restart { at, down: Duration::from_millis(down_ms) });
    // Patient: the harness reads the log across a server restart too.
    let backend = NatsBackend::connect(&url).await.map_err(runtime)?.patient();
    let mut ok = true;
    for n in 0..runs {
        // Alternate the modes' order, so neither always runs on a fresher machine.
        let order: Vec<Mode> = if n % 2 == 0 { modes.clone() } else { modes.iter().rev().copied().collect() };
        for mode in order {
            let run = format!("{}-{}-{}-{}", mode.name(), std::process::id(), n, now_ms());
            let faults = Faults { kill, kill_at, restart: restart.zip(server.as_mut()) };
            let r = one_run(&backend, &url, &run, &w, mode, faults).await?;
            ok &= r.lost == 0 && r.recorded_twice == 0;
            println!("{}", serde_json::to_string(&r).expect("a result serializes"));
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// When to SIGKILL the run's server, and for how long to leave it down.
#[derive(Clone, Copy)]
struct Restart {
    /// The fraction of the events recorded first.
    at: f64,
    down: Duration,
}

/// What goes wrong in a run: agents killed, the server killed and restarted.
struct Faults<'a> {
    /// Agents SIGKILLed (the owners of the hot partitions) …
    kill: usize,
    /// … once this fraction of the events is recorded.
    kill_at: f64,
    restart: Option<(Restart, &'a mut NatsServer)>,
}

/// Child processes, SIGKILLed when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn one_run(
    backend: &NatsBackend,
    url: &str,
    run: &str,
    w: &Workload,
    mode: Mode,
    faults: Faults<'_>,
) -> Result<RunResult, Bad> {
    let Faults { kill, kill_at, mut restart } = faults;
    dataproc::publish_events(backend, run, w).await.map_err(runtime)?;
    // The log exists before anyone counts on it.
    let log = backend.logs().open(&dataproc::session_of(run), true).await.map_err(runtime)?;
    let exe = std::env::current_exe().map_err(runtime)?;
    let spawn = |what: &str, extra: Vec<String>| -> Result<Child, Bad> {
        Command::new(&exe)
            .arg(what)
            .args(["--nats", url, "--run", run, "--mode", mode.name()])
            .args(workload_args(w))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(runtime)
    };
    let t0 = now_ms();
    let mut children = Children(Vec::new());
    for i in 0..w.agents {
        children.0.push((format!("agent-{i}"), spawn("agent", vec!["--index".into(), i.to_string()])?));
    }
    if mode == Mode::Coordinator {
        children.0.push(("coordinator".into(), spawn("coordinator", Vec::new())?));
    }
    let total = w.total() as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut killed = 0;
    let mut server_restarts = 0;
    let mut recorded_at_server_kill = 0;
    loop {
        let done = log.last_seq().await.map_err(runtime)?;
        if let Some((r, server)) = restart.as_mut()
            && server_restarts == 0
            && done as f64 >= r.at * total as f64
            && done < total
        {
            // The server dies (SIGKILL: no flush, no goodbye) and comes back on the same
            // port and store; the agents and the coordinator reconnect on their own.
            server.kill();
            recorded_at_server_kill = done;
            tokio::time::sleep(r.down).await;
            server.start_again();
            server_restarts += 1;
        }
        if killed < kill && done as f64 >= kill_at * total as f64 {
            // The owners of the hot partitions (agents 0, 1, …) die.
            for i in 0..kill {
                let (_, c) = &mut children.0[i];
                let _ = c.kill();
                let _ = c.wait();
            }
            killed = kill;
        }
        if done >= total {
            break;
        }
        // An agent (or the coordinator) that fails ends the run: it would not finish.
        for (name, c) in children.0.iter_mut().skip(killed) {
            if let Some(status) = c.try_wait().map_err(runtime)?
                && !status.success()
            {
                return Err(Bad::Runtime(format!("{run}: {name} failed ({status}) with {done} of {total} recorded")));
            }
        }
        if Instant::now() > deadline {
            return Err(Bad::Runtime(format!("{run}: {done} of {total} events recorded after 600 s")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The survivors exit on their own once everything is recorded.
    let (mut reexecuted, mut taken_over) = (0, 0);
    for (name, c) in children.0.iter_mut().skip(killed) {
        let status = wait_child(c, Duration::from_secs(60)).map_err(|e| Bad::Runtime(format!("{name}: {e}")))?;
        if !status.success() {
            return Err(Bad::Runtime(format!("{name} failed: {status}")));
        }
        let mut out = String::new();
        if let Some(mut o) = c.stdout.take() {
            use std::io::Read;
            let _ = o.read_to_string(&mut out);
        }
        if let Ok(r) = serde_json::from_str::<dataproc::AgentReport>(out.trim()) {
            reexecuted += r.reexecuted;
            taken_over += r.taken_over;
        }
    }
    let (recorded, twice, latencies) = dataproc::count(backend, run, w, t0).await.map_err(runtime)?;
    let wall_ms = latencies.last().copied().unwrap_or(0);
    Ok(RunResult {
        mode: mode.name(),
        agents: w.agents,
        killed,
        events: w.total(),
        recorded,
        lost: w.total() - recorded,
        recorded_twice: twice,
        reexecuted,
        taken_over,
        server_restarts,
        recorded_at_server_kill,
        wall_ms,
        events_per_s: if wall_ms == 0 { 0.0 } else { recorded as f64 * 1000.0 / wall_ms as f64 },
        p50_ms: dataproc::quantile(&latencies, 0.50),
        p99_ms: dataproc::quantile(&latencies, 0.99),
        ideal_ms: w.work_ms() / w.agents as u64,
    })
}

fn wait_child(c: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let start = Instant::now();
    loop {
        if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
            return Ok(s);
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            return Err(format!("did not exit within {limit:?} after the last event"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
