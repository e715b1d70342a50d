//! Helpers shared by the tests: example team files, offline models, in-memory sessions.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roundtable_core::PeerId;
use roundtable_core::log::{Entry, MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::ChatModel;
use roundtable_core::model::scripted::Scripted;
use roundtable_core::model::simulated::Simulated;
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::sitting::Sitting;
use roundtable_core::team::{PlanEnv, ProviderSpec, TeamPlan, parse_team};

pub struct FilesNextTo(pub PathBuf);
impl PlanEnv for FilesNextTo {
    fn var_is_set(&self, _: &str) -> bool {
        false
    }
    fn read(&self, p: &str) -> Result<String, String> {
        std::fs::read_to_string(self.0.join(p)).map_err(|e| e.to_string())
    }
    fn resolve(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

pub fn plan_from(src: &str) -> TeamPlan {
    parse_team("t.toml", src, &FilesNextTo(examples_dir())).unwrap_or_else(|e| panic!("{e}"))
}

pub fn example(name: &str) -> TeamPlan {
    let path = examples_dir().join(name);
    let src = std::fs::read_to_string(&path).unwrap();
    parse_team(&path.display().to_string(), &src, &FilesNextTo(examples_dir())).unwrap_or_else(|e| panic!("{e}"))
}

/// Every example team file, parsed (an example whose file does not validate offline is
/// an error: examples must run offline).
pub fn examples() -> Vec<(String, TeamPlan)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let src = std::fs::read_to_string(&path).unwrap();
        let mut plan = parse_team(&path.display().to_string(), &src, &FilesNextTo(examples_dir()))
            .unwrap_or_else(|e| panic!("{e}"));
        // Nobody sits in a human seat here: its duties wait a moment, then are skipped.
        for p in plan.peers.iter_mut().filter(|p| p.is_human()) {
            p.answer_within_ms = Some(100);
        }
        out.push((path.file_name().unwrap().to_string_lossy().into_owned(), plan));
    }
    out
}

/// Unlayered offline models for a plan (scripted and simulated providers).
pub fn offline_models(plan: &TeamPlan) -> HashMap<PeerId, Arc<dyn ChatModel>> {
    plan.peers
        .iter()
        // A human peer's answers come from a person, not a model.
        .filter(|p| !p.is_human())
        .map(|p| {
            let spec = &plan.models[&p.model];
            let m: Arc<dyn ChatModel> = match &spec.provider {
                ProviderSpec::Scripted { .. } => Arc::new(
                    Scripted::from_spec(format!("scripted:{}", p.model), &spec.provider).expect("a scripted spec"),
                ),
                ProviderSpec::Simulated { p_correct, susceptibility, seed } => {
                    Arc::new(Simulated::new(format!("simulated:{}", p.model), *p_correct, *susceptibility, *seed))
                }
                ProviderSpec::Program { command, cwd } => Arc::new(roundtable_models::CommandProgram::new(
                    format!("program:{}", p.model),
                    command.clone(),
                    cwd.clone(),
                )),
                other => panic!("{} needs a live provider ({})", p.id, other.kind()),
            };
            (p.id.clone(), m)
        })
        .collect()
}

pub fn new_log() -> Arc<dyn SessionLog> {
    Arc::new(SharedMemLog(Arc::new(MemLog::new(new_session_id()))))
}

/// Run a plan to its end in memory with the given models; the whole log.
pub async fn run_with(plan: &TeamPlan, models: HashMap<PeerId, Arc<dyn ChatModel>>) -> Vec<Entry> {
    let log = new_log();
    let topic = plan.topic.clone().unwrap_or_else(|| "topic".into());
    open_session(log.as_ref(), plan, &topic).await.unwrap();
    run_peers(log.clone(), plan, models, None, None).await.unwrap();
    log.read_all().await.unwrap()
}

pub async fn run(plan: &TeamPlan) -> Vec<Entry> {
    run_with(plan, offline_models(plan)).await
}

/// Seats for the web view over an in-memory store, taken as `roundtable join` takes them
/// (the same [`Sitting`], leases on a blackboard shared by every holder).
pub struct MemSeats {
    pub store: roundtable_core::log::MemStore,
    pub board: Arc<roundtable_core::mem::MemBlackboard>,
}

impl MemSeats {
    pub fn new(store: roundtable_core::log::MemStore) -> Self {
        MemSeats { store, board: Arc::new(roundtable_core::mem::MemBlackboard::new()) }
    }

    /// The lease store every holder of these seats shares.
    pub fn leases(&self) -> Arc<dyn roundtable_core::human::SeatLease> {
        Arc::new(roundtable_core::human::BoardSeats(self.board.clone()))
    }

    /// Take a seat directly, as a terminal would.
    pub async fn take_directly(
        &self,
        session: &roundtable_core::SessionId,
        peer: &PeerId,
    ) -> Result<
        (Sitting, tokio::sync::mpsc::UnboundedReceiver<roundtable_core::sitting::SeatEvent>),
        roundtable_core::sitting::SitError,
    > {
        use roundtable_core::log::LogStore;
        use roundtable_core::sitting::SitError;
        let log = self.store.open(session, false).await.map_err(|e| SitError::Refused(e.to_string()))?;
        let first = log.read(1, 1).await.map_err(|e| SitError::Store(e.to_string()))?;
        let plan = roundtable_core::session::plan_of(&first[0].env).map_err(|e| SitError::Refused(e.to_string()))?;
        Sitting::take(peer.clone(), log, Arc::new(plan), self.leases(), roundtable_core::peer::PeerExtras::default())
            .await
    }
}

#[async_trait::async_trait]
impl roundtable_observe::ui::SeatSource for MemSeats {
    async fn take(
        &self,
        session: &roundtable_core::SessionId,
        peer: &PeerId,
    ) -> Result<
        (Sitting, tokio::sync::mpsc::UnboundedReceiver<roundtable_core::sitting::SeatEvent>),
        roundtable_core::sitting::SitError,
    > {
        self.take_directly(session, peer).await
    }
}
