//! `roundtable trace | replay | fork | ui`, and what `run` needs for observability (the
//! session span, `--metrics`). The logic lives in `roundtable-observe`; this is glue.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use roundtable_core::log::{Entry, LogStore, SessionLog};
use roundtable_core::model::layers::RetryObserver;
use roundtable_core::session::{new_session_id, plan_of};
use roundtable_core::team::TeamPlan;
use roundtable_core::{Kind, SessionId};
use roundtable_observe::fork::{Edit, fork_envelopes};
use roundtable_observe::metrics::{self, Metrics, Source};
use roundtable_observe::replay::{ReplayOptions, replay};
use roundtable_observe::telemetry::session_span;
use roundtable_observe::trace::Trace;
use roundtable_sqlite::{Durability, SqliteReader};
use tracing::Instrument;

use crate::{Failure, factory};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum TraceFormat {
    /// For people: who said what to whom, why it stopped, cost per peer.
    Text,
    /// A Mermaid flowchart of the causal graph.
    Mermaid,
    /// A Graphviz digraph of the causal graph.
    Dot,
    /// Everything, for tools.
    Json,
}

#[derive(Args)]
pub(crate) struct TraceArgs {
    /// A session id (see `roundtable sessions`), or a JSON-lines export of one.
    session: String,
    #[arg(long, value_enum, default_value_t = TraceFormat::Text)]
    format: TraceFormat,
    #[command(flatten)]
    remote: crate::nats::NatsArgs,
}

#[derive(Args)]
pub(crate) struct ReplayArgs {
    /// A session id, or a JSON-lines export of one.
    session: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: crate::nats::NatsArgs,
}

#[derive(Args)]
pub(crate) struct ForkArgs {
    /// The session to fork: a session id, or a JSON-lines export of one.
    session: String,
    /// Keep the session's envelopes 1 to SEQ (the numbers `roundtable log` and `trace`
    /// show), then continue with live models.
    #[arg(long, value_name = "SEQ")]
    at: u64,
    /// Replace the text of one kept envelope first: its id (or a unique prefix of it, or
    /// #SEQ), `=`, and the new text.
    #[arg(long, value_name = "ENVELOPE_ID=TEXT")]
    edit: Option<Edit>,
    /// Print only a JSON summary when the new session ends.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    budget: BudgetArgs,
}

/// A new budget for a forked session (each flag replaces that limit of the plan's
/// `[budget]`; the rest is kept).
#[derive(Args, Debug, Default)]
pub(crate) struct BudgetArgs {
    /// Model calls for the whole session.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_calls: Option<u64>,
    /// Tokens (prompt + completion) for the whole session.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Option<u64>,
    /// US dollars for the whole session.
    #[arg(long, value_name = "USD", value_parser = non_negative)]
    max_cost_usd: Option<f64>,
    /// Seconds of wall time from the forked session's start.
    #[arg(long, value_name = "SECS", value_parser = non_negative)]
    max_wall_secs: Option<f64>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number of at least 0")),
    }
}

impl BudgetArgs {
    /// Whether any limit was given.
    pub(crate) fn any(&self) -> bool {
        self.max_calls.is_some()
            || self.max_tokens.is_some()
            || self.max_cost_usd.is_some()
            || self.max_wall_secs.is_some()
    }

    /// Apply the flags given to a budget; whether any was given.
    fn apply(&self, b: &mut roundtable_core::termination::Budget) -> bool {
        let before = b.clone();
        b.max_calls = self.max_calls.or(b.max_calls);
        b.max_tokens = self.max_tokens.or(b.max_tokens);
        b.max_cost_usd = self.max_cost_usd.or(b.max_cost_usd);
        b.max_wall_ms = self.max_wall_secs.map(|s| (s * 1000.0) as u64).or(b.max_wall_ms);
        *b != before
    }
}

#[derive(Args)]
pub(crate) struct UiArgs {
    /// Where to serve the page. Loopback by default: the page shows everything the
    /// sessions said.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7600")]
    addr: SocketAddr,
    /// Require this token on every request (`?token=` in the URL, a bearer header or
    /// the cookie the page sets). On an address other than loopback a token is always
    /// required: without this option one is generated and printed.
    #[arg(long, env = "ROUNDTABLE_UI_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Also serve Prometheus metrics of every session at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Let a person take a human peer's seat from the page (answer its duties,
    /// interject, leave), as `roundtable join` does from a terminal. Acting always
    /// needs the token, even on loopback: without --token one is generated and the
    /// printed URL carries it.
    #[arg(long)]
    act: bool,
    /// With --act: leave a seat whose page has not asked about it for this long (a
    /// closed tab), so that someone else can take it. 5 to 3600.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = roundtable_observe::ui::IDLE.as_secs(),
        value_parser = clap::value_parser!(u64).range(roundtable_observe::ui::IDLE_SECS),
        requires = "act"
    )]
    seat_idle_secs: u64,
    #[command(flatten)]
    remote: crate::nats::NatsArgs,
}

/// A session's entries, from the store or from a JSON-lines export file.
async fn load(dir: &Path, session: &str) -> Result<(SessionId, Vec<Entry>), Failure> {
    load_from(dir, session, None).await
}

/// Like [`load`], reading from a NATS server when one is given.
async fn load_from(
    dir: &Path,
    session: &str,
    remote: Option<&crate::nats::NatsArgs>,
) -> Result<(SessionId, Vec<Entry>), Failure> {
    let path = Path::new(session);
    let entries = if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Failure::Input(format!("{session}: {e}")))?;
        roundtable_observe::entries_from_jsonl(session, &text).map_err(Failure::Input)?
    } else if let Some(remote) = remote.filter(|r| r.url().is_some()) {
        crate::nats::open_log(remote, session).await?.read_all().await?
    } else {
        let store = crate::open_store(dir, false, Durability::Normal)?;
        let log = store.open(&SessionId::from(session), false).await?;
        log.read_all().await?
    };
    match roundtable_core::session::task_entry(&entries) {
        Some(task) => Ok((task.env.session.clone(), entries)),
        _ => Err(Failure::Input(format!(
            "session {session}: the log does not start with a task envelope; it is damaged or not a session"
        ))),
    }
}

pub(crate) async fn trace(dir: &Path, args: TraceArgs) -> Result<ExitCode, Failure> {
    let (session, entries) = load_from(dir, &args.session, Some(&args.remote)).await?;
    let t = Trace::build(&session, &entries);
    match args.format {
        TraceFormat::Text => print!("{}", t.to_text()),
        TraceFormat::Mermaid => print!("{}", t.to_mermaid()),
        TraceFormat::Dot => print!("{}", t.to_dot()),
        TraceFormat::Json => println!("{}", serde_json::to_string_pretty(&t).expect("trace serializes")),
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 0 when every decision came out the same, 1 at a divergence.
pub(crate) async fn replay_cmd(dir: &Path, args: ReplayArgs) -> Result<ExitCode, Failure> {
    let (session, entries) = load_from(dir, &args.session, Some(&args.remote)).await?;
    let report = replay(&entries, ReplayOptions::default()).await.map_err(|e| match e {
        roundtable_observe::replay::ReplayError::Log(l) => Failure::Runtime(l.to_string()),
        other => Failure::Input(format!("session {session}: {other}")),
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        println!(
            "Replayed session {session} with no model calls: {} envelopes recorded, {} replayed, {} model outputs taken from the recording.",
            report.recorded, report.replayed, report.model_calls
        );
        if !report.inputs.is_empty() {
            let list: Vec<String> = report.inputs.iter().map(|s| format!("#{s}")).collect();
            println!("Clock and presence decisions read from the log: {}.", list.join(", "));
        }
        if let Some(r) = &report.stop_reason {
            println!("Stop: {r}");
        }
        match &report.divergence {
            None => println!(
                "No divergence: all {} recorded envelopes and every decision came out the same.",
                report.matched
            ),
            Some(d) => println!("DIVERGENCE (the first one):\n  {d}"),
        }
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `resume --extend`: a stopped session goes on as a new session made of everything
/// before its stop, under a new budget.
pub(crate) async fn extend(dir: &Path, session: &str, json: bool, budget: BudgetArgs) -> Result<ExitCode, Failure> {
    if !budget.any() {
        return Err(Failure::Input(
            "--extend needs a new limit: --max-calls, --max-tokens, --max-cost-usd or --max-wall-secs".into(),
        ));
    }
    let (id, entries) = load(dir, session).await?;
    // The stop the session's fold takes, not one that does not follow from the log.
    let folded = roundtable_core::session::as_folded(&id, &entries);
    let Some(stop) = folded.iter().find(|e| e.env.kind == Kind::Stop) else {
        return Err(Failure::Input(format!(
            "session {id} has not stopped; continue it with `roundtable resume {id}` (no --extend)"
        )));
    };
    if !json {
        println!("Session {id} stopped at #{}; continuing from #{} as a new session.", stop.seq, stop.seq - 1);
    }
    fork(dir, ForkArgs { session: session.to_string(), at: stop.seq - 1, edit: None, json, budget }).await
}

pub(crate) async fn fork(dir: &Path, args: ForkArgs) -> Result<ExitCode, Failure> {
    let (old, entries) = load(dir, &args.session).await?;
    let mut plan = plan_of(&entries[0].env).map_err(|e| Failure::Input(format!("session {old}: {e}")))?;
    let new = new_session_id();
    // Every check before anything is written.
    let mut envs =
        fork_envelopes(&entries, &new, args.at, args.edit.as_ref()).map_err(|e| Failure::Input(e.to_string()))?;
    if args.budget.apply(&mut plan.budget) {
        // The new budget is part of the new session's plan, on its task envelope.
        if let Some(serde_json::Value::Object(m)) = envs[0].body.json.as_mut() {
            m.insert("plan".into(), serde_json::to_value(&plan).expect("a plan serializes"));
        }
    }
    let models = factory::models_for(&plan, None).map_err(|e| Failure::Input(e.to_string()))?;
    let store = crate::open_store(dir, true, Durability::Normal)?;
    let span = session_span(&new, &plan.name, plan.protocol.kind());
    envs[0].trace = roundtable_core::telemetry::traceparent(&span);
    store.import(&envs)?;
    let log = store.open(&new, false).await?;
    if !args.json {
        let edit = args.edit.as_ref().map_or_else(String::new, |e| format!(", with {} edited", e.target));
        println!("Forked session {old} at #{}{edit} into {new}; continuing with live models.", args.at);
    }
    let extras = roundtable_core::peer::PeerExtras {
        secret: Some(factory::local_secret(dir)?),
        ..roundtable_core::peer::PeerExtras::default()
    };
    let summary = crate::drive(log.clone(), &plan, models, args.json, None, extras).instrument(span).await?;
    crate::seal::seal_at_stop(dir, log.as_ref()).await?;
    crate::finish(&summary, args.json)
}

pub(crate) async fn ui(dir: &Path, args: UiArgs) -> Result<ExitCode, Failure> {
    let store: Arc<dyn LogStore> = match args.remote.url() {
        Some(_) => crate::nats::store(&args.remote).await?,
        None => Arc::new(SqliteReader::new(&crate::db_path(dir), Duration::from_millis(200))),
    };
    if let Some(t) = &args.token
        && (t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(Failure::Input("--token: a token is letters, digits, '-' and '_' (it goes in a URL)".into()));
    }
    let token = match args.token.clone() {
        Some(t) => Some(t),
        None if args.act || !args.addr.ip().is_loopback() => Some(hex::encode(rand::random::<[u8; 24]>())),
        None => None,
    };
    // On loopback, reading stays open unless a token was given; acting never is.
    let read_token = token.as_deref().filter(|_| args.token.is_some() || !args.addr.ip().is_loopback());
    let access = read_token.map_or(roundtable_observe::ui::Access::Open, |t| {
        roundtable_observe::ui::Access::Token(std::sync::Arc::from(t))
    });
    let acting = match (&token, args.act) {
        (Some(t), true) => {
            let seats = crate::seat::WebSeats { dir: dir.to_path_buf(), remote: args.remote.clone() };
            let idle = Duration::from_secs(args.seat_idle_secs);
            Some(roundtable_observe::ui::Acting::with_idle(Arc::new(seats), Arc::from(t.as_str()), idle))
        }
        _ => None,
    };
    let bound = roundtable_observe::ui::serve_acting(args.addr, store.clone(), access, acting)
        .await
        .map_err(|e| Failure::Input(format!("--addr {}: {e}", args.addr)))?;
    let source = args.remote.url().map_or_else(|| dir.display().to_string(), str::to_owned);
    match &token {
        // Printed only when generated: a token given by the user is the user's.
        Some(t) if args.token.is_none() => {
            println!("Roundtable web view: http://{bound}/?token={t} (sessions in {source})")
        }
        Some(_) => println!("Roundtable web view: http://{bound}/?token=… (the token given; sessions in {source})"),
        None => println!("Roundtable web view: http://{bound}/ (sessions in {source})"),
    }
    if args.act {
        println!(
            "Seats: a person can take a human peer's seat from the page opened with this URL (its token is needed to act); \
             a page silent for {} s gives its seat up.",
            args.seat_idle_secs
        );
        if args.token.is_none() {
            println!("(The token is new at every start: give --token to keep this URL across restarts.)");
        }
    }
    if !bound.ip().is_loopback() {
        eprintln!(
            "warning: {bound} is reachable from other machines; every request needs the token, but it travels \
             unencrypted over http"
        );
    }
    if let Some(addr) = args.metrics {
        let m = metrics::serve(addr, Source::Store(Metrics::new(), store))
            .await
            .map_err(|e| Failure::Input(format!("--metrics {addr}: {e}")))?;
        println!("Prometheus metrics: http://{m}/metrics");
    }
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await.map_err(|e| Failure::Runtime(format!("waiting for Ctrl-C: {e}")))?;
    Ok(ExitCode::SUCCESS)
}

/// What `run` adds around a session: the session span and, with `--metrics`, counters
/// served over HTTP.
pub(crate) struct RunWatch {
    metrics: Option<Arc<Metrics>>,
}

impl RunWatch {
    pub(crate) async fn start(metrics_addr: Option<SocketAddr>) -> Result<Self, Failure> {
        let Some(addr) = metrics_addr else {
            return Ok(RunWatch { metrics: None });
        };
        let m = Metrics::new();
        let bound = metrics::serve(addr, Source::Live(m.clone()))
            .await
            .map_err(|e| Failure::Input(format!("--metrics {addr}: {e}")))?;
        eprintln!("Prometheus metrics: http://{bound}/metrics");
        Ok(RunWatch { metrics: Some(m) })
    }

    /// For the retry layer: counts retried attempts.
    pub(crate) fn retry_observer(&self) -> Option<RetryObserver> {
        self.metrics.as_ref().map(Metrics::retry_observer)
    }

    /// Run `session` (opening it and driving its peers) inside its span, counting its
    /// log as it grows.
    pub(crate) async fn session<T>(
        &self,
        session: &SessionId,
        plan: &TeamPlan,
        log: &Arc<dyn SessionLog>,
        run: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        if let Some(m) = &self.metrics {
            tokio::spawn(m.clone().follow(log.clone()));
        }
        run.instrument(session_span(session, &plan.name, plan.protocol.kind())).await
    }
}
