//! `roundtable`: the command line over the Roundtable libraries. This crate is the CLI
//! plus glue; every decision lives in `roundtable-core`.

mod bench;
mod eval;
mod factory;
mod join;
mod keys;
mod nats;
mod natsconfig;
mod observe;
mod render;
mod seal;
mod seat;
mod worktest;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use roundtable_core::log::{LogError, LogErrorKind, LogStore, SessionLog, jsonl};
use roundtable_core::peer::EventSink;
use roundtable_core::peer::PeerExtras;
use roundtable_core::runner::{open_session, run_peers_with, summarize};
use roundtable_core::session::{SessionSummary, new_session_id, plan_of};
use roundtable_core::team::{TeamPlan, parse_team};
use roundtable_core::tool::ToolListBody;
use roundtable_core::{Kind, SessionId};
use roundtable_sqlite::{Durability, SqliteStore};

const AFTER_HELP: &str = "\
Examples:
  roundtable run examples/product-debate.toml            watch a debate, offline
  roundtable run examples/api-design.toml --json         run, then print a JSON summary
  roundtable validate my-team.toml                        check a team file, run nothing
  roundtable sessions                                     list recorded sessions
  roundtable log SESSION                                  show a session's transcript
  roundtable export SESSION > s.jsonl                     save a session as JSON lines
  roundtable import s.jsonl                               load a saved session
  roundtable resume SESSION                               finish a session that was cut off
  roundtable peer TEAM.toml --id PEER --nats URL          run one peer as its own process;
                                                          the others join with --session

Sessions are recorded in .roundtable/roundtable.db under the working directory
(or --data-dir); with --nats URL, run, resume, sessions, log and export use a NATS
JetStream server instead. Exit codes: 0 done, 1 runtime failure, 2 bad input.";

/// Peer-to-peer multi-agent sessions: equal peers that debate, vote and decide
/// through a shared, append-only session log, with no coordinator.
#[derive(Parser)]
#[command(name = "roundtable", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where sessions are recorded (default: ./.roundtable).
    #[arg(long, global = true, env = "ROUNDTABLE_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a team file as a new session, showing the transcript live.
    ///
    /// Every envelope is recorded before it is shown; if the run is cut off,
    /// `roundtable resume SESSION` finishes it without calling a model again for steps
    /// already on the log.
    Run {
        /// The team file (TOML): models, peers, protocol, termination, budget.
        team: PathBuf,
        /// The task or topic (overrides the team file's `topic`).
        #[arg(long)]
        topic: Option<String>,
        /// Print only a JSON summary on stdout when the session ends.
        #[arg(long)]
        json: bool,
        /// Keep the session in memory only (nothing written under the data dir).
        #[arg(long)]
        no_persist: bool,
        /// Sync every write to disk (survives power loss, not only crashes).
        #[arg(long)]
        fsync: bool,
        /// Serve Prometheus metrics of the session at http://ADDR/metrics while it runs.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        remote: nats::NatsArgs,
    },
    /// Check a team file and print the plan it becomes; runs nothing.
    Validate {
        team: PathBuf,
        /// The task or topic `run` would be given (the team file's `topic` otherwise).
        #[arg(long)]
        topic: Option<String>,
        /// Print the validated plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the team file's JSON Schema (for editors: a `#:schema PATH` first line in a
    /// team file lets Even Better TOML complete and check it), or its reference page.
    ///
    /// `--write DIR` writes both, as DIR/team-file.schema.json and DIR/team-file.md
    /// (the committed copies are regenerated with `roundtable schema --write docs`).
    Schema {
        /// Print the Markdown reference page instead of the schema.
        #[arg(long)]
        reference: bool,
        /// Write team-file.schema.json and team-file.md into DIR instead of printing.
        #[arg(long, value_name = "DIR", conflicts_with = "reference")]
        write: Option<PathBuf>,
    },
    /// List recorded sessions, newest first.
    Sessions {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: nats::NatsArgs,
    },
    /// Show a session's transcript.
    Log {
        session: String,
        /// Print the summary as JSON instead of the transcript.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: nats::NatsArgs,
    },
    /// Write a session's envelopes as JSON lines (to stdout, or --output).
    Export {
        session: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        remote: nats::NatsArgs,
    },
    /// Load a session from a JSON-lines export (all or nothing). A sealed export is
    /// checked against its seal first: one that was altered is refused with the line.
    Import { file: PathBuf },
    /// Check an export against its seal (every envelope as sealed, in order, none
    /// dropped or added) and the session's rules, importing nothing.
    Verify {
        file: PathBuf,
        /// Require the seal to be signed by this public key (64 hex digits).
        #[arg(long, value_name = "HEX")]
        key: Option<String>,
    },
    /// Compare collaboration patterns on tasks with known answers (accuracy with a 95%
    /// interval, calls, tokens, time), always with the single-agent and sample-and-vote
    /// baselines at an equal number of calls.
    Eval(eval::EvalArgs),
    /// Measure the framework: group-chat overhead, scale, parallel rounds, token growth
    /// per context policy, NATS latency and throughput (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Continue a session that was cut off, from its log.
    ///
    /// `--extend` continues a session that already stopped (on a budget, say) with a
    /// larger budget: its log is append-only and its stop is a fact, so it goes on as a
    /// new session made of everything before the stop (like `fork`), under the new
    /// limits.
    Resume {
        session: String,
        #[arg(long)]
        json: bool,
        /// Continue a stopped session as a new one, with the budget flags given.
        #[arg(long)]
        extend: bool,
        #[command(flatten)]
        budget: observe::BudgetArgs,
        /// Serve Prometheus metrics of the session at http://ADDR/metrics while it runs.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        remote: nats::NatsArgs,
    },
    /// Run one peer of a team as a process of its own, on a NATS JetStream server that
    /// every peer reaches (on this machine or others). The first peer started without
    /// --session starts a session and prints its id; start the others with --session.
    Peer(nats::PeerArgs),
    /// Distributed testing: a suite (a JSON-lines file of commands with --suite, one
    /// collected with --collect cargo|pytest, or synthetic tests) on one shared NATS work
    /// queue, worker processes that claim, run and report them with no coordinator
    /// (--coordinator: the baseline with one), workers killed mid-run with --kill; ends
    /// with a report (time against the ideal, tests lost and completed twice, from the
    /// log).
    Worktest(worktest::WorktestArgs),
    /// Explain a session: who answered whom, which messages led to the decision, what
    /// each peer cost, and why it stopped (text, Mermaid, DOT or JSON).
    Trace(observe::TraceArgs),
    /// Re-run a session from its recorded model outputs, with no model calls, and check
    /// that every decision comes out the same (exit 1 at the first divergence).
    Replay(observe::ReplayArgs),
    /// Start a new session from the first envelopes of another, optionally with one
    /// message edited, and continue it with live models.
    Fork(observe::ForkArgs),
    /// Serve the live web view of the sessions (loopback only by default).
    Ui(observe::UiArgs),
    /// Take a human peer's seat (a `[[peers]]` entry with kind = "human") in a running
    /// session: see the transcript, answer each duty as it comes (turns, votes,
    /// verdicts, approvals), from this terminal. One person per seat; leave and come
    /// back at any time. Local sessions, or --nats for one on a server.
    Join(join::JoinArgs),
    /// Peers' signing keys: `keys new --peer ID` makes one (see the team file's
    /// `public_key`).
    Keys(keys::KeysArgs),
    /// Write a nats-server configuration for a team: one user per peer with an NKey,
    /// allowed to publish only its own envelopes, and the peers' seed files.
    NatsConfig(natsconfig::NatsConfigArgs),
}

/// A failure, with the exit code it maps to.
pub(crate) enum Failure {
    /// Bad input: a team file, a flag, an unknown session, a damaged file. Exit 2.
    Input(String),
    /// Something went wrong while running. Exit 1.
    Runtime(String),
}

impl From<LogError> for Failure {
    fn from(e: LogError) -> Self {
        match e.kind() {
            LogErrorKind::NotFound | LogErrorKind::Corrupt | LogErrorKind::Rejected => Failure::Input(e.to_string()),
            _ => Failure::Runtime(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    // Behave like other Unix tools when the reader goes away (`roundtable log … | head`):
    // end quietly on SIGPIPE instead of panicking on a failed print.
    sigpipe::reset();
    let cli = Cli::parse();
    // Logs on stderr (ROUNDTABLE_LOG), spans over OTLP when OTEL_* ask for it; dropped
    // after the runtime, which flushes pending spans.
    let _telemetry = roundtable_observe::telemetry::init("ROUNDTABLE_LOG");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(Failure::Input(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn data_dir(cli_dir: &Option<PathBuf>) -> PathBuf {
    cli_dir.clone().unwrap_or_else(|| PathBuf::from(".roundtable"))
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("roundtable.db")
}

fn open_store(dir: &Path, create: bool, durability: Durability) -> Result<SqliteStore, Failure> {
    SqliteStore::open(&db_path(dir), create, durability).map_err(Failure::from)
}

async fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    let dir = data_dir(&cli.data_dir);
    match cli.command {
        Command::Keys(args) => keys::run(&dir, args),
        Command::NatsConfig(args) => natsconfig::run(args),
        Command::Join(args) => join::join(&dir, args).await,
        Command::Eval(args) => {
            eval::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            bench::run(args).await.map_err(Failure::Runtime)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { reference, write } => {
            match write {
                Some(dir) => {
                    let write = |name: &str, text: String| {
                        let path = dir.join(name);
                        std::fs::write(&path, text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
                    };
                    write("team-file.schema.json", roundtable_core::team::schema::team_schema_text())?;
                    write("team-file.md", roundtable_core::team::reference::reference_markdown())?;
                }
                None if reference => print!("{}", roundtable_core::team::reference::reference_markdown()),
                None => print!("{}", roundtable_core::team::schema::team_schema_text()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { team, topic, json } => {
            // Everything `run` checks before it starts: the plan, a topic, the models.
            let plan = load_plan(&team)?;
            topic_of(&team, topic, &plan)?;
            factory::models_for(&plan, None).map_err(|e| Failure::Input(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan).expect("plan serializes"));
            } else {
                describe_plan(&team, &plan);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { team, topic, json, no_persist, fsync, metrics, remote } => {
            if remote.url().is_some() {
                if no_persist || fsync {
                    return Err(Failure::Input("--no-persist and --fsync are for local sessions, not --nats".into()));
                }
                return nats::run(&dir, &team, topic, json, metrics, &remote).await;
            }
            let plan = load_plan(&team)?;
            let topic = topic_of(&team, topic, &plan)?;
            let watch = observe::RunWatch::start(metrics).await?;
            let models = factory::models_observed(&plan, None, watch.retry_observer())
                .map_err(|e| Failure::Input(e.to_string()))?;
            let session = new_session_id();
            let (log, extras, store): (Arc<dyn SessionLog>, PeerExtras, _) = if no_persist {
                let store = roundtable_core::log::MemStore::new();
                (store.open(&session, true).await?, PeerExtras::default(), None)
            } else {
                let store = open_store(&dir, true, if fsync { Durability::Full } else { Durability::Normal })?;
                let extras = PeerExtras { secret: Some(factory::local_secret(&dir)?), ..PeerExtras::default() };
                (store.open(&session, true).await?, extras, Some(store))
            };
            let _seats = seats_open(store, &log, &plan, &session.to_string(), json, None)?;
            let summary = watch
                .session(&session, &plan, &log, async {
                    open_session(log.as_ref(), &plan, &topic).await?;
                    drive(log.clone(), &plan, models, json, None, extras).await
                })
                .await?;
            if !no_persist {
                seal::seal_at_stop(&dir, log.as_ref()).await?;
            }
            finish(&summary, json)
        }
        Command::Resume { session, json, metrics, remote, extend, budget } => {
            if extend {
                if remote.url().is_some() {
                    return Err(Failure::Input("--extend is for local sessions, not --nats".into()));
                }
                return observe::extend(&dir, &session, json, budget).await;
            }
            if budget.any() {
                return Err(Failure::Input(
                    "budget flags apply with --extend (to continue a stopped session) or to `fork`".into(),
                ));
            }
            if remote.url().is_some() {
                return nats::resume(&dir, &session, json, metrics, &remote).await;
            }
            let store = open_store(&dir, false, Durability::Normal)?;
            let log = store.open(&SessionId::from(session.as_str()), false).await?;
            let entries = log.read(1, 1).await?;
            let task = entries
                .first()
                .filter(|e| e.env.kind == Kind::Task)
                .ok_or_else(|| Failure::Input(format!("session {session} has no task envelope")))?;
            let plan = plan_of(&task.env).map_err(|e| Failure::Input(format!("session {session}: {e}")))?;
            let current = summarize(log.as_ref()).await?;
            if current.stopped {
                if !json {
                    println!("Session {session} is already closed.");
                }
                return finish(&current, json);
            }
            let watch = observe::RunWatch::start(metrics).await?;
            let models = factory::models_observed(&plan, None, watch.retry_observer())
                .map_err(|e| Failure::Input(e.to_string()))?;
            if !json {
                println!("Resuming {session} from envelope {} …", current.envelopes);
            }
            // The same secret as the run that was cut off: a juror that committed can
            // still open its sealed vote and reveal it.
            let extras = PeerExtras { secret: Some(factory::local_secret(&dir)?), ..PeerExtras::default() };
            let id = log.session().clone();
            let _seats = seats_open(Some(store), &log, &plan, &session, json, None)?;
            let summary =
                watch.session(&id, &plan, &log, drive(log.clone(), &plan, models, json, None, extras)).await?;
            seal::seal_at_stop(&dir, log.as_ref()).await?;
            finish(&summary, json)
        }
        Command::Sessions { json, remote } => {
            let local = if remote.url().is_some() { None } else { Some(open_store(&dir, false, Durability::Normal)) };
            let store: Arc<dyn LogStore> = match local {
                None => nats::store(&remote).await?,
                Some(Ok(s)) => Arc::new(s),
                Some(Err(Failure::Input(_))) if !db_path(&dir).exists() => {
                    if json {
                        println!("[]");
                    } else {
                        println!("No sessions yet in {}. Start one with `roundtable run TEAM.toml`.", dir.display());
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Some(Err(e)) => return Err(e),
            };
            let list = store.sessions().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).expect("serializes"));
            } else if list.is_empty() {
                println!("No sessions yet.");
            } else {
                // Columns as wide as their widest cell (ids and names are padded as
                // strings: a Display impl may ignore the width).
                let wid = list.iter().map(|s| s.id.to_string().chars().count()).max().unwrap_or(0).max(7);
                let wteam =
                    list.iter().map(|s| s.team.as_deref().unwrap_or("?").chars().count()).max().unwrap_or(0).max(4);
                println!(
                    "{:<wid$}  {:<wteam$}  {:>9}  {:<19}  STATUS",
                    "SESSION", "TEAM", "ENVELOPES", "STARTED (UTC)"
                );
                for s in list {
                    let (y, mo, d, h, mi, sec) = roundtable_core::session::civil(s.first_ms / 1000);
                    println!(
                        "{:<wid$}  {:<wteam$}  {:>9}  {y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{sec:02}  {}",
                        s.id.to_string(),
                        s.team.as_deref().unwrap_or("?"),
                        s.envelopes,
                        s.stop.as_deref().map_or_else(|| "open (resume it)".to_string(), |r| format!("stopped: {r}"))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { session, json, remote } => {
            let log = open_log(&dir, &remote, &session).await?;
            let entries = log.read_all().await?;
            let written = if json {
                let s = SessionSummary::from_entries(log.session(), &entries).map_err(Failure::Input)?;
                print_out(&serde_json::to_string_pretty(&s).expect("serializes"))
            } else {
                let st = render::Style::for_stdout();
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                // As the session's fold reads the log: a stop that does not follow is
                // shown as the rejection it is.
                roundtable_core::session::as_folded(log.session(), &entries)
                    .iter()
                    .try_for_each(|e| writeln!(out, "{}", render::format_entry(e, st)))
                    .and_then(|()| out.flush())
                    .and_then(|()| match SessionSummary::from_entries(log.session(), &entries) {
                        Ok(s) => render::print_summary(&s),
                        Err(_) => Ok(()),
                    })
            };
            written.map_err(|e| Failure::Runtime(format!("writing the transcript to stdout: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { session, output, remote } => {
            let log = open_log(&dir, &remote, &session).await?;
            // A session sealed when it stopped is exported only as it was then.
            seal::check_log_against_stop_seal(&dir, log.as_ref()).await?;
            match output {
                Some(path) => {
                    let n = export_to(log.as_ref(), &path, &seal::key(&dir)?).await?;
                    eprintln!("Wrote {n} envelopes to {}", path.display());
                }
                None => {
                    let key = seal::key(&dir)?;
                    let mut out = std::io::stdout().lock();
                    jsonl::export_sealed(log.as_ref(), &mut out, &key).await?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Peer(args) => nats::peer(&dir, args).await,
        Command::Worktest(args) => worktest::run(&dir, args).await,
        Command::Trace(args) => observe::trace(&dir, args).await,
        Command::Replay(args) => observe::replay_cmd(&dir, args).await,
        Command::Fork(args) => observe::fork(&dir, args).await,
        Command::Ui(args) => observe::ui(&dir, args).await,
        Command::Verify { file, key } => {
            let (lines, sealed) = seal::read_export(&file, true)?;
            let sealed = sealed.expect("read_export requires a seal");
            seal::check_stop_seal(&dir, &file.display().to_string(), &lines)?;
            if let Some(want) = key {
                let want = roundtable_core::trust::PublicKey::parse(want.trim())
                    .map_err(|e| Failure::Input(format!("--key: {e}")))?;
                if want != sealed {
                    return Err(Failure::Input(format!(
                        "{}: sealed by key {}, not by the key given",
                        file.display(),
                        sealed.to_hex()
                    )));
                }
            }
            let own = seal::existing_key(&dir).map(|k| k.public()) == Some(sealed);
            println!(
                "{}: {} envelopes of session {}, as sealed by key {}{}",
                file.display(),
                lines.len(),
                lines[0].1.session,
                sealed.to_hex(),
                if own { " (this data directory's)" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Import { file } => {
            let (lines, _) = seal::read_export(&file, false)?;
            let envs: Vec<_> = lines.into_iter().map(|(_, e)| e).collect();
            let store = open_store(&dir, true, Durability::Normal)?;
            let session = store.import(&envs)?;
            println!("Imported session {session} ({} envelopes).", envs.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Who may author a session's envelopes, from its task: the plan's peers (a test run's
/// workers), and the NATS reader that records garbage on the subjects as a failure.
fn roster_of(task: &roundtable_core::Envelope) -> Result<std::collections::BTreeSet<roundtable_core::PeerId>, String> {
    let mut roster: std::collections::BTreeSet<_> = match worktest::suite_of(task) {
        Some(workers) => workers.into_iter().map(roundtable_core::PeerId::from).collect(),
        None => plan_of(task)?.peer_ids().into_iter().collect(),
    };
    roster.insert(roundtable_core::PeerId::from(roundtable_nats::REJECTED_FROM));
    Ok(roster)
}

/// Export a session to `path`: written to a temporary file beside it, then renamed over
/// it, so a failed export leaves nothing behind and a reader never sees half a file.
/// Only a regular file is replaced: a directory, symlink, FIFO or device at `path` is
/// refused before anything is written.
async fn export_to(log: &dyn SessionLog, path: &Path, key: &roundtable_core::trust::SecretKey) -> Result<u64, Failure> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            let t = m.file_type();
            let what = if t.is_dir() {
                "a directory"
            } else if t.is_symlink() {
                "a symbolic link"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            };
            return Err(Failure::Input(format!(
                "{}: is {what}; export -o writes a regular file only (use stdout to write elsewhere)",
                path.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Failure::Input(format!("{}: {e}", path.display()))),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
    // Removed when dropped, so every early return below leaves nothing.
    let mut tmp = tempfile::Builder::new()
        .prefix(".roundtable-export-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| Failure::Input(format!("{}: {e}", dir.display())))?;
    let mut out = std::io::BufWriter::new(tmp.as_file_mut());
    let n = jsonl::export_sealed(log, &mut out, key).await?;
    out.flush().map_err(io)?;
    drop(out);
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(n)
}

/// A line on stdout; a failed write (a full disk) is an error, not a panic.
pub(crate) fn print_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// A recorded session's log: on the NATS server with --nats, else in the local store.
async fn open_log(dir: &Path, remote: &nats::NatsArgs, session: &str) -> Result<Arc<dyn SessionLog>, Failure> {
    if remote.url().is_some() {
        return nats::open_log(remote, session).await;
    }
    let store = open_store(dir, false, Durability::Normal)?;
    Ok(store.open(&SessionId::from(session), false).await?)
}

/// A team file's plan, for `eval --team` (errors as text).
pub(crate) fn load_plan_for_eval(team: &Path) -> Result<TeamPlan, String> {
    match load_plan(team) {
        Ok(p) => Ok(p),
        Err(Failure::Input(e) | Failure::Runtime(e)) => Err(e),
    }
}

fn load_plan(team: &Path) -> Result<TeamPlan, Failure> {
    let src = std::fs::read_to_string(team).map_err(|e| Failure::Input(format!("{}: {e}", team.display())))?;
    let base = team.parent().map(Path::to_path_buf).unwrap_or_default();
    let plan = parse_team(&team.display().to_string(), &src, &factory::ProcessEnv { base })
        .map_err(|e| Failure::Input(e.to_string()))?;
    // What the tools' own checks find (schemas, templates), at the line of each table.
    let mut problems = Vec::new();
    for (name, spec) in &plan.tools {
        let at = src.find(&format!("[tools.{name}]")).unwrap_or(0);
        let (line, col) = roundtable_core::team::line_col(&src, at);
        for p in roundtable_tools::registry::validate(spec) {
            problems.push(format!("error: {}:{line}:{col}: `tools.{name}.{}`: {}", team.display(), p.key, p.message));
        }
    }
    if !problems.is_empty() {
        return Err(Failure::Input(problems.join("\n")));
    }
    Ok(plan)
}

/// The topic a run of `plan` is given: `--topic`, else the team file's (bad input when
/// neither is set, or when it is blank).
fn topic_of(team: &Path, topic: Option<String>, plan: &TeamPlan) -> Result<String, Failure> {
    topic.or_else(|| plan.topic.clone()).filter(|t| !t.trim().is_empty()).ok_or_else(|| {
        Failure::Input(format!("{}: no topic: set `topic` in the team file or pass --topic", team.display()))
    })
}

fn describe_plan(team: &Path, plan: &TeamPlan) {
    println!("{}: ok", team.display());
    println!("  team      {}", plan.name);
    println!("  protocol  {}", plan.protocol.kind());
    for p in &plan.peers {
        match plan.models.get(&p.model) {
            Some(m) => println!("  peer      {:<14} model {} ({})", p.id, p.model, m.provider.kind()),
            None => println!(
                "  peer      {:<14} a person (roundtable join SESSION --as {}){}",
                p.id,
                p.id,
                p.answer_within_ms.map_or(String::new(), |ms| format!(", answers within {} s", ms as f64 / 1000.0))
            ),
        }
    }
    if let Some(t) = &plan.topic {
        println!("  topic     {t}");
    }
    let termination = plan.termination.describe();
    println!("  stop      {}", if termination.is_empty() { "when the protocol finishes".into() } else { termination });
    let b = &plan.budget;
    let mut limits = Vec::new();
    let mut add = |name: &str, v: Option<String>| limits.extend(v.map(|v| format!("{name} {v}")));
    add("max_tokens", b.max_tokens.map(|n| n.to_string()));
    add("max_cost_usd", b.max_cost_usd.map(|n| n.to_string()));
    add("max_calls", b.max_calls.map(|n| n.to_string()));
    add("max_wall_secs", b.max_wall_ms.map(|n| (n as f64 / 1000.0).to_string()));
    add("per peer max_tokens", b.per_peer.max_tokens.map(|n| n.to_string()));
    add("per peer max_cost_usd", b.per_peer.max_cost_usd.map(|n| n.to_string()));
    add("per peer max_calls", b.per_peer.max_calls.map(|n| n.to_string()));
    println!("  budget    {}", if limits.is_empty() { "none".to_string() } else { limits.join(", ") });
    let context = match &plan.context {
        roundtable_core::team::ContextPolicy::Full => "full".to_string(),
        roundtable_core::team::ContextPolicy::LastK { k } => format!("last_k (k {k})"),
        roundtable_core::team::ContextPolicy::Summary { keep_rounds, summarizer, .. } => format!(
            "summary (keep_rounds {keep_rounds}, summarizer {})",
            summarizer.as_ref().map_or("the first present peer", |p| p.as_str())
        ),
    };
    println!("  context   {context}");
}

/// A session with human seats: say how to take them, and (locally) append what their
/// holders submit while the session runs (see `roundtable_sqlite::seats`). The relay
/// stops when the returned guard is dropped.
pub(crate) fn seats_open(
    store: Option<SqliteStore>,
    log: &Arc<dyn SessionLog>,
    plan: &TeamPlan,
    session: &str,
    json: bool,
    nats: Option<&str>,
) -> Result<Option<join::AbortOnDrop>, Failure> {
    let humans: std::collections::BTreeSet<_> =
        plan.peers.iter().filter(|p| p.is_human()).map(|p| p.id.clone()).collect();
    if humans.is_empty() {
        return Ok(None);
    }
    if !json {
        for h in &humans {
            let wait = plan.peer(h).and_then(|p| p.answer_within_ms).map_or_else(
                || "the team waits for them".to_string(),
                |ms| format!("each duty waits {} s, then is skipped", ms as f64 / 1000.0),
            );
            let flag = nats.map_or(String::new(), |u| format!(" --nats {u}"));
            eprintln!("Seat {h} is for a person ({wait}): take it with `roundtable join {session} --as {h}{flag}`");
        }
    }
    if store.is_none() && nats.is_none() {
        if !json {
            eprintln!("(--no-persist: nobody can join from another terminal; human seats stay empty)");
        }
        return Ok(None);
    }
    Ok(store.map(|store| {
        let poll = std::time::Duration::from_millis(50);
        join::AbortOnDrop(tokio::spawn(roundtable_sqlite::relay_submitted(store, log.clone(), humans, poll)))
    }))
}

/// Run every peer of the plan on this log, rendering as it goes.
pub(crate) async fn drive(
    log: Arc<dyn SessionLog>,
    plan: &TeamPlan,
    models: std::collections::HashMap<roundtable_core::PeerId, Arc<dyn roundtable_core::model::ChatModel>>,
    json: bool,
    presence: Option<Arc<dyn roundtable_core::bus::Presence>>,
    extras: PeerExtras,
) -> Result<SessionSummary, Failure> {
    // The team's tools, built once for every peer of this process (MCP servers started
    // and listed, the listings recorded); kept alive until the session ends.
    let mut extras = extras;
    let _tools = match (&extras.tools, plan.tools.is_empty()) {
        (None, false) => {
            let specs: Vec<_> = plan.tools.values().cloned().collect();
            let built = roundtable_tools::Registry::build(&specs).await;
            let listings = match &built {
                Ok(registry) => registry
                    .mcp_listings()
                    .into_iter()
                    .map(|(server, tools)| ToolListBody { server, tools, error: None })
                    .collect(),
                Err(roundtable_tools::RegistryError::Mcp { tool, error }) => {
                    vec![ToolListBody { server: tool.clone(), tools: Vec::new(), error: Some(error.to_string()) }]
                }
                Err(_) => Vec::new(),
            };
            for listing in &listings {
                if let Some(from) = listing_author(plan, &models, &listing.server) {
                    roundtable_core::tool::record_listing(log.as_ref(), &from, listing).await?;
                }
            }
            let registry =
                built.map_err(|e| Failure::Runtime(format!("the team's tools could not be started: {e}")))?;
            extras.tools = Some(Arc::new(registry.tool_box()));
            Some(registry)
        }
        _ => None,
    };
    if json {
        return run_peers_with(log, plan, models, presence, None, extras).await.map_err(Failure::from);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let events: EventSink = Arc::new(move |ev| {
        let _ = tx.send(ev);
    });
    let mut tail = log.tail(1).await?;
    let show = tokio::spawn(async move {
        let mut live = render::Live::new(render::LiveOutput::stdout());
        loop {
            // Events first: every event a peer sent before appending an envelope is in
            // the channel by the time the envelope can be read back, so draining them
            // first shows a call's last tokens before its envelope closes it.
            tokio::select! {
                biased;
                Some(ev) = rx.recv() => live.event(ev),
                next = tail.next() => match next {
                    Some(Ok(e)) => {
                        live.entry(&e);
                        if e.env.kind == Kind::Stop {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        live.finish();
    });
    let result = run_peers_with(log, plan, models, presence, Some(events), extras).await;
    let _ = show.await;
    result.map_err(Failure::from)
}

/// The peer of this process that records an MCP server's listing: the first (in team
/// order) granted the server, else the first this process runs, so the envelope is
/// signed by a key this process holds. `None` when it runs no peer.
fn listing_author(
    plan: &TeamPlan,
    models: &std::collections::HashMap<roundtable_core::PeerId, Arc<dyn roundtable_core::model::ChatModel>>,
    server: &str,
) -> Option<roundtable_core::PeerId> {
    let granted = |p: &&roundtable_core::team::PeerSpec| p.tools.iter().any(|t| t == server);
    let local: Vec<_> = plan.peers.iter().filter(|p| models.contains_key(&p.id)).collect();
    // A process whose peers do not hold the server records nothing when a peer of
    // another process does (readers reject a listing from a peer not granted it).
    let held_elsewhere = plan.peers.iter().any(|p| granted(&p));
    local
        .iter()
        .find(|p| granted(p))
        .or_else(|| if held_elsewhere { None } else { local.first() })
        .map(|p| p.id.clone())
}

/// Print the outcome. A session that ended because its models kept failing is a
/// runtime failure (exit 1), though it is recorded and closed like any other.
fn finish(summary: &SessionSummary, json: bool) -> Result<ExitCode, Failure> {
    let written = if json {
        print_out(&serde_json::to_string_pretty(summary).expect("summary serializes"))
    } else {
        render::print_summary(summary)
    };
    written.map_err(|e| Failure::Runtime(format!("writing the summary to stdout: {e}")))?;
    if summary.failed {
        let reason = summary.stop_reason.as_deref().unwrap_or("");
        eprintln!("error: the session stopped because its model calls failed: {reason}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
