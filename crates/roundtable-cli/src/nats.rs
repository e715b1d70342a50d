//! Sessions on a NATS JetStream server: `--nats URL` and its connection options for
//! `run`, `resume`, `sessions`, `log` and `export`, and `roundtable peer`, which runs one
//! peer of a team as a process of its own, on any machine that reaches the server.
//!
//! # Agreeing on a session
//! Peers on different machines meet in a session by its id. The first `roundtable peer`
//! started without `--session` creates a session, posts its task and prints the id; the
//! others are started with `--session ID`. Peers started with the same `--session` may
//! start in any order: each that has a topic posts the task, whose id is derived from
//! the session alone, so the first post wins and the others are duplicates the log drops.
//! Every peer runs the plan in the task on the log, but what a peer executes (its
//! model's endpoint, API-key variable, headers, replies) must be what its own team file
//! says: a peer refuses (exit 2, the differences listed) a session whose task says
//! otherwise, since whoever can publish a task could otherwise send a peer's
//! transcript and key anywhere (see `roundtable_core::trust`).
//! Votes are sealed with the data directory's secret (see `factory::local_secret`), so a
//! peer restarted on the same machine can open the votes it sealed before.
//!
//! # Connections
//! Credentials and TLS settings are passed to the client as given and never printed:
//! messages show the server's address with any `user:password@` removed. Prefer the
//! environment variables (`NATS_PASSWORD`, `NATS_TOKEN`) or files (`--nats-creds`,
//! `--nats-nkey`) to secrets on the command line, where other users of the machine can
//! read them. The client reconnects forever, backing off up to 4 s; while the server is
//! away, peers wait (see `roundtable_nats::patient`) and go on from the log when it is
//! back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use futures::StreamExt;
use roundtable_core::bus::{Backend, Presence};
use roundtable_core::log::{LogStore, SessionLog};
use roundtable_core::peer::PeerExtras;
use roundtable_core::runner::{open_session, summarize};
use roundtable_core::session::{TASK_STEP, USER, new_session_id, plan_of};
use roundtable_core::team::TeamPlan;
use roundtable_core::{EnvelopeId, Kind, PeerId, SessionId};
use roundtable_nats::{NatsBackend, redact_url};

use crate::{Failure, factory, finish, load_plan, observe};

/// Where the NATS server is and how to log in. Without `--nats`, sessions are local.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct NatsArgs {
    /// Use the NATS JetStream server at URL (nats://host:4222, tls://…, or several
    /// separated by commas) instead of the local store.
    #[arg(long, env = "ROUNDTABLE_NATS", value_name = "URL")]
    pub(crate) nats: Option<String>,
    /// User name for the NATS server (with NATS_PASSWORD).
    #[arg(long, env = "NATS_USER", value_name = "USER", requires = "nats")]
    nats_user: Option<String>,
    /// Password for --nats-user; better set in NATS_PASSWORD than on the command line.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, value_name = "PASSWORD", requires = "nats")]
    nats_password: Option<String>,
    /// Token for the NATS server; better set in NATS_TOKEN than on the command line.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, value_name = "TOKEN", requires = "nats")]
    nats_token: Option<String>,
    /// File holding an NKey seed (SU…) to authenticate with.
    #[arg(long, env = "NATS_NKEY", value_name = "FILE", requires = "nats")]
    nats_nkey: Option<PathBuf>,
    /// Credentials file (JWT and NKey seed, as `nsc` writes it).
    #[arg(long, env = "NATS_CREDS", value_name = "FILE", requires = "nats")]
    nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with.
    #[arg(long, env = "NATS_CA", value_name = "FILE", requires = "nats")]
    nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --nats-key.
    #[arg(long, env = "NATS_CERT", value_name = "FILE", requires_all = ["nats", "nats_key"])]
    nats_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS, with --nats-cert.
    #[arg(long, env = "NATS_KEY", value_name = "FILE", requires_all = ["nats", "nats_cert"])]
    nats_key: Option<PathBuf>,
    /// Require TLS even when the URL does not say tls://.
    #[arg(long, env = "ROUNDTABLE_NATS_TLS", requires = "nats")]
    nats_tls: bool,
    /// Copies of each session stream and bucket this process creates, on as many
    /// servers of a JetStream cluster (3 survives the loss of any one server); 1 for a
    /// single server. Sessions that exist keep theirs.
    #[arg(long, env = "ROUNDTABLE_NATS_REPLICAS", value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=roundtable_nats::MAX_REPLICAS as i64), requires = "nats")]
    nats_replicas: Option<u8>,
}

fn readable(flag: &str, path: &Path) -> Result<(), Failure> {
    std::fs::metadata(path).map(|_| ()).map_err(|e| Failure::Input(format!("{flag} {}: {e}", path.display())))
}

impl NatsArgs {
    pub(crate) fn url(&self) -> Option<&str> {
        self.nats.as_deref()
    }

    /// The client's options, with every credential and TLS setting given (those in the
    /// URL included: the client does not read them there).
    fn options(&self) -> Result<async_nats::ConnectOptions, Failure> {
        let mut o = async_nats::ConnectOptions::new().name("roundtable");
        let (_, in_url) = split_credentials(self.nats.as_deref().unwrap_or_default());
        let given = self.nats_user.is_some() || self.nats_password.is_some() || self.nats_token.is_some();
        match in_url {
            Some((user, Some(pass))) if !given => o = o.user_and_password(user, pass),
            Some((token, None)) if !given => o = o.token(token),
            _ => {}
        }
        match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) => o = o.user_and_password(u.clone(), p.clone()),
            (Some(_), None) => return Err(Failure::Input("--nats-user needs a password: set NATS_PASSWORD".into())),
            (None, Some(_)) => return Err(Failure::Input("a NATS password needs --nats-user (or NATS_USER)".into())),
            (None, None) => {}
        }
        if let Some(t) = &self.nats_token {
            o = o.token(t.clone());
        }
        if let Some(path) = &self.nats_nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| Failure::Input(format!("--nats-nkey {}: {e}", path.display())))?;
            o = o.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.nats_creds {
            let creds = std::fs::read_to_string(path)
                .map_err(|e| Failure::Input(format!("--nats-creds {}: {e}", path.display())))?;
            // The file's text goes to the client only: an error names the file, not it.
            o = o
                .credentials(&creds)
                .map_err(|_| Failure::Input(format!("--nats-creds {}: not a NATS credentials file", path.display())))?;
        }
        if let Some(path) = &self.nats_ca {
            readable("--nats-ca", path)?;
            o = o.add_root_certificates(path.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_cert, &self.nats_key) {
            readable("--nats-cert", cert)?;
            readable("--nats-key", key)?;
            o = o.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        if self.nats_tls {
            o = o.require_tls(true);
        }
        Ok(o)
    }

    /// Connect. `patient`: the parts opened wait out server restarts (for peers); read-only
    /// commands fail instead.
    pub(crate) async fn connect(&self, patient: bool) -> Result<NatsBackend, Failure> {
        let url = self.nats.as_deref().ok_or_else(|| Failure::Input("--nats URL is required".into()))?;
        check_url(url)?;
        let backend =
            NatsBackend::connect_with(url, self.options()?).await.map_err(|e| Failure::Runtime(e.to_string()))?;
        let backend = backend
            .with_replicas(usize::from(self.nats_replicas.unwrap_or(1)))
            .map_err(|e| Failure::Input(format!("--nats-replicas: {e}")))?;
        // Every log this binary opens is a session's, which starts at its task.
        let backend = backend.for_sessions();
        Ok(if patient { backend.patient() } else { backend })
    }

    /// The same connection for a child process, as environment variables (so that no
    /// secret is ever on a command line).
    pub(crate) fn child_env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let vars = [
            ("ROUNDTABLE_NATS", self.nats.clone()),
            ("NATS_USER", self.nats_user.clone()),
            ("NATS_PASSWORD", self.nats_password.clone()),
            ("NATS_TOKEN", self.nats_token.clone()),
            ("NATS_NKEY", path(&self.nats_nkey)),
            ("NATS_CREDS", path(&self.nats_creds)),
            ("NATS_CA", path(&self.nats_ca)),
            ("NATS_CERT", path(&self.nats_cert)),
            ("NATS_KEY", path(&self.nats_key)),
            ("ROUNDTABLE_NATS_TLS", self.nats_tls.then(|| "true".to_owned())),
            ("ROUNDTABLE_NATS_REPLICAS", self.nats_replicas.map(|n| n.to_string())),
        ];
        vars.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }

    /// The server's address as it may be shown.
    fn shown(&self) -> String {
        self.nats.as_deref().map(redact_url).unwrap_or_default()
    }
}

/// The URL(s) without `user:password@` or `token@`, and those credentials (from the first
/// address that has them).
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let mut found = None;
    let parts: Vec<String> = url
        .split(',')
        .map(|part| {
            let rest = part.find("://").map_or(0, |i| i + 3);
            match part[rest..].find('@').map(|at| rest + at) {
                Some(at) => {
                    let info = &part[rest..at];
                    if found.is_none() {
                        found = Some(match info.split_once(':') {
                            Some((user, pass)) => (user.to_owned(), Some(pass.to_owned())),
                            None => (info.to_owned(), None),
                        });
                    }
                    format!("{}{}", &part[..rest], &part[at + 1..])
                }
                None => part.to_owned(),
            }
        })
        .collect();
    (parts.join(","), found)
}

/// `roundtable peer`: one peer of a team, as a process of its own.
#[derive(clap::Args)]
pub(crate) struct PeerArgs {
    /// The team file (TOML).
    team: PathBuf,
    /// The id of the peer this process runs (one of the team file's peers).
    #[arg(long, value_name = "PEER")]
    id: String,
    /// The session to join. Without it, a new session is started and its id printed,
    /// for the other peers' --session.
    #[arg(long, value_name = "SESSION")]
    session: Option<String>,
    /// The task or topic (overrides the team file's `topic`); used by whichever peer
    /// posts the session's task first.
    #[arg(long)]
    topic: Option<String>,
    /// Print only a JSON summary on stdout when the session ends.
    #[arg(long)]
    json: bool,
    /// Serve Prometheus metrics of the session at http://ADDR/metrics while it runs.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// The sessions on the server.
pub(crate) async fn store(args: &NatsArgs) -> Result<Arc<dyn LogStore>, Failure> {
    Ok(args.connect(false).await?.logs())
}

/// Check a `--nats` value before connecting: every comma-separated address must be a
/// URL with a host and a scheme of `nats`, `tls`, `ws` or `wss` (bad input, exit 2).
pub(crate) fn check_url(url: &str) -> Result<(), Failure> {
    for one in url.split(',').map(str::trim) {
        let bad = |why: String| {
            Failure::Input(format!(
                "--nats {one:?}: {why}; valid: nats://HOST:PORT, tls://HOST:PORT, ws://… or wss://… (several separated by commas)"
            ))
        };
        let addr: async_nats::ServerAddr = one.parse().map_err(|e: std::io::Error| bad(e.to_string()))?;
        if addr.host().is_empty() {
            return Err(bad("no host".into()));
        }
    }
    Ok(())
}

/// An existing session's log on the server.
pub(crate) async fn open_log(args: &NatsArgs, session: &str) -> Result<Arc<dyn SessionLog>, Failure> {
    let backend = args.connect(false).await?;
    Ok(backend.logs().open(&SessionId::from(session), false).await?)
}

/// What peers share besides the log: heartbeats, the blackboard, the work queue and a
/// master secret for sealing votes.
async fn parts(
    backend: &NatsBackend,
    session: &SessionId,
    plan: &TeamPlan,
    secret: Arc<[u8]>,
) -> Result<(Arc<dyn Presence>, PeerExtras), Failure> {
    let runtime = |e: &dyn std::fmt::Display| Failure::Runtime(e.to_string());
    let presence = backend.presence(session).await.map_err(|e| runtime(&e))?;
    let board = backend.blackboard(session).await.map_err(|e| runtime(&e))?;
    let queue = match plan.protocol.queue_config() {
        Some(cfg) => Some(backend.work_queue(session, cfg).await.map_err(|e| runtime(&e))?),
        None => None,
    };
    Ok((presence, PeerExtras { board: Some(board), queue, secret: Some(secret), ..PeerExtras::default() }))
}

/// `run --nats`: every peer of the team in this process, on the server.
pub(crate) async fn run(
    dir: &Path,
    team: &Path,
    topic: Option<String>,
    json: bool,
    metrics: Option<std::net::SocketAddr>,
    args: &NatsArgs,
) -> Result<ExitCode, Failure> {
    let plan = load_plan(team)?;
    let topic = topic.or_else(|| plan.topic.clone()).ok_or_else(|| {
        Failure::Input(format!("{}: no topic: set `topic` in the team file or pass --topic", team.display()))
    })?;
    let signers = crate::keys::signers(dir, &plan, &plan.peer_ids())?;
    let backend = args.connect(true).await?.with_signers(signers);
    let watch = observe::RunWatch::start(metrics).await?;
    let models =
        factory::models_observed(&plan, None, watch.retry_observer()).map_err(|e| Failure::Input(e.to_string()))?;
    let session = new_session_id();
    let log = backend.logs().open(&session, true).await?;
    if !json {
        eprintln!("Session {session} on {}", args.shown());
    }
    let (presence, extras) = parts(&backend, &session, &plan, factory::local_secret(dir)?).await?;
    crate::seats_open(None, &log, &plan, session.as_str(), json, Some(&args.shown()))?;
    let summary = watch
        .session(&session, &plan, &log, async {
            open_session(log.as_ref(), &plan, &topic).await?;
            crate::drive(log.clone(), &plan, models, json, Some(presence), extras).await
        })
        .await?;
    finish(&summary, json)
}

/// `resume --nats`: every peer of the team in this process, on an open session.
pub(crate) async fn resume(
    dir: &Path,
    session: &str,
    json: bool,
    metrics: Option<std::net::SocketAddr>,
    args: &NatsArgs,
) -> Result<ExitCode, Failure> {
    let backend = args.connect(true).await?;
    let session = SessionId::from(session);
    let log = backend.logs().open(&session, false).await?;
    let plan = task_plan(&log).await?;
    // Signed sessions: every peer's key, from this machine's data directory.
    let backend = backend.with_signers(crate::keys::signers(dir, &plan, &plan.peer_ids())?);
    let log = backend.logs().open(&session, false).await?;
    let current = summarize(log.as_ref()).await?;
    if current.stopped {
        if !json {
            println!("Session {session} is already closed.");
        }
        return finish(&current, json);
    }
    let watch = observe::RunWatch::start(metrics).await?;
    let models =
        factory::models_observed(&plan, None, watch.retry_observer()).map_err(|e| Failure::Input(e.to_string()))?;
    if !json {
        println!("Resuming {session} from envelope {} …", current.envelopes);
    }
    let (presence, extras) = parts(&backend, &session, &plan, factory::local_secret(dir)?).await?;
    let summary = watch
        .session(&session, &plan, &log, crate::drive(log.clone(), &plan, models, json, Some(presence), extras))
        .await?;
    finish(&summary, json)
}

/// The plan in a session's task, waiting for the task when the log is still empty.
async fn task_plan(log: &Arc<dyn SessionLog>) -> Result<TeamPlan, Failure> {
    Ok(task_and_plan(log).await?.1)
}

/// The session's task envelope (waiting for it) and the plan it carries.
async fn task_and_plan(log: &Arc<dyn SessionLog>) -> Result<(Arc<roundtable_core::Envelope>, TeamPlan), Failure> {
    let session = log.session().clone();
    let mut tail = log.tail(1).await?;
    // Messages published before the task are read as rejections: the task is the first
    // entry that is not one.
    let first = loop {
        match tail.next().await {
            Some(e) => {
                let e = e?;
                if !roundtable_core::session::is_rejection(&e.env) {
                    break e;
                }
            }
            None => return Err(Failure::Runtime(format!("session {session}: the log ended before its task"))),
        }
    };
    if first.env.kind != Kind::Task {
        return Err(Failure::Input(format!("session {session} does not start with a task envelope")));
    }
    let plan = plan_of(&first.env).map_err(|e| Failure::Input(format!("session {session}: {e}")))?;
    Ok((first.env, plan))
}

/// `roundtable peer`.
pub(crate) async fn peer(dir: &Path, args: PeerArgs) -> Result<ExitCode, Failure> {
    if args.nats.url().is_none() {
        return Err(Failure::Input("roundtable peer needs --nats URL: the server the peers meet on".into()));
    }
    let local = load_plan(&args.team)?;
    let me = PeerId::from(args.id.as_str());
    let known = |plan: &TeamPlan| plan.peers.iter().any(|p| p.id == me);
    let ids = |plan: &TeamPlan| plan.peers.iter().map(|p| p.id.to_string()).collect::<Vec<_>>().join(", ");
    if !known(&local) {
        return Err(Failure::Input(format!(
            "{}: no peer {me:?} in the team; the peers are {}",
            args.team.display(),
            ids(&local)
        )));
    }
    if local.peer(&me).is_some_and(|p| p.is_human()) {
        return Err(Failure::Input(format!(
            "{}: peer {me:?} is kind = \"human\": a person takes that seat with `roundtable join SESSION --as {me} --nats URL`",
            args.team.display()
        )));
    }
    let topic = args.topic.clone().or_else(|| local.topic.clone());
    let signers = crate::keys::signers(dir, &local, std::slice::from_ref(&me))?;
    let backend = args.nats.connect(true).await?.with_signers(signers);
    let (session, starting) = match &args.session {
        Some(s) => (SessionId::from(s.as_str()), false),
        None => (new_session_id(), true),
    };
    let log = backend.logs().open(&session, true).await?;
    if starting {
        let Some(topic) = &topic else {
            return Err(Failure::Input(format!(
                "{}: no topic to start a session with: set `topic` in the team file or pass --topic \
                 (or join a session with --session)",
                args.team.display()
            )));
        };
        open_session(log.as_ref(), &local, topic).await?;
        eprintln!(
            "Started session {session}. Start the other peers with:\n  roundtable peer {} --id PEER --nats {} --session {session}",
            args.team.display(),
            args.nats.shown()
        );
    } else {
        // Whether the session's task is on the log (not whether the log is empty: anyone
        // allowed on its subjects may have published there first, which is read as
        // rejections before the task).
        let task_id = EnvelopeId::derive(&session, &PeerId::from(USER), TASK_STEP);
        let posted = log.seq_of(&task_id).await?.is_some();
        if let Some(topic) = topic.as_ref().filter(|_| !posted) {
            // The first of the peers to get here posts the task; the others' posts are
            // duplicates of it (its id depends on the session only).
            open_session(log.as_ref(), &local, topic).await?;
        } else if !posted && !args.json {
            eprintln!("Waiting for session {session}'s task…");
        }
    }
    let (task, plan) = task_and_plan(&log).await?;
    if !known(&plan) {
        return Err(Failure::Input(format!("session {session} has no peer {me:?}; its peers are {}", ids(&plan))));
    }
    let differences = roundtable_core::trust::executable_differences(&plan, &local);
    if let Some(key) =
        (!differences.is_empty()).then(|| roundtable_core::trust::trusted_plan_signer(&task, &local)).flatten()
    {
        eprintln!(
            "warning: session {session} runs the plan in its task, which differs from {} in what this peer              executes; the task is signed by {}, which [trust] plan_signers trusts:\n  {}",
            args.team.display(),
            key.to_hex(),
            differences.join("\n  ")
        );
    } else if !differences.is_empty() {
        return Err(Failure::Input(format!(
            "session {session}: its task would have this peer run what {} does not say; refusing to join:\n  {}",
            args.team.display(),
            differences.join("\n  ")
        )));
    }
    let watch = observe::RunWatch::start(args.metrics).await?;
    let models = factory::models_observed(&plan, Some(&me), watch.retry_observer())
        .map_err(|e| Failure::Input(e.to_string()))?;
    let (presence, extras) = parts(&backend, &session, &plan, factory::local_secret(dir)?).await?;
    if !args.json {
        eprintln!("{me} joined session {session} on {}", args.nats.shown());
    }
    let summary = watch
        .session(&session, &plan, &log, crate::drive(log.clone(), &plan, models, args.json, Some(presence), extras))
        .await?;
    finish(&summary, args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_urls() {
        assert_eq!(split_credentials("nats://h:4222"), ("nats://h:4222".into(), None));
        assert_eq!(
            split_credentials("nats://u:p@h:1,nats://h2:2"),
            ("nats://h:1,nats://h2:2".into(), Some(("u".into(), Some("p".into()))))
        );
        assert_eq!(split_credentials("tls://tok@h"), ("tls://h".into(), Some(("tok".into(), None))));
        assert_eq!(split_credentials("u:p@h:1").0, "h:1");
    }
}
