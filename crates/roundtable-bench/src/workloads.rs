//! The workloads.

use roundtable_core::team::NoEnv;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roundtable_core::PeerId;
use roundtable_core::log::{LogStore, MemStore, SessionLog};
use roundtable_core::model::ChatModel;
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::team::{TeamPlan, parse_team};
use serde::Serialize;

use crate::mock::MockModel;
use crate::{Memory, memory};

/// A round-robin team of `n` peers that stops after `messages` messages (the task
/// included), with full history in every peer's context.
pub fn group_chat_plan(n: usize, messages: u64) -> TeamPlan {
    let mut src =
        String::from("name = \"groupchat\"\n[models.mock]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"-\"]\n");
    for i in 0..n {
        src.push_str(&format!("[[peers]]\nid = \"p{i}\"\nmodel = \"mock\"\n"));
    }
    let contributions = messages.saturating_sub(1).max(1);
    let rounds = contributions.div_ceil(n as u64) + 1;
    src.push_str(&format!(
        "[protocol]\nkind = \"round_robin\"\nrounds = {rounds}\n[termination]\nmax_messages = {contributions}\n[presence]\nheartbeat_secs = 3600\n"
    ));
    parse_team("groupchat.toml", &src, &NoEnv).expect("the benchmark plan is valid")
}

/// Settings of the group-chat overhead workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct GroupChatConfig {
    pub peers: usize,
    /// Messages in the session, the task included.
    pub messages: u64,
    /// Persist the log in SQLite (in a temporary directory).
    pub persist: bool,
    /// The mock model reads the whole history on every call.
    pub walk_history: bool,
    /// Messages of a session run first, in the same process and the same way, and not
    /// timed (0: none): the measured session then runs in a warm process, its code
    /// already paged in. Memory is still counted from before the warm-up.
    pub warmup: u64,
}

/// What one group-chat run measured.
#[derive(Clone, Debug, Serialize)]
pub struct GroupChatResult {
    pub workload: &'static str,
    #[serde(flatten)]
    pub config: GroupChatConfig,
    pub wall_ms: f64,
    pub messages_per_sec: f64,
    /// From posting the task to the first model call (peers starting and reading it).
    pub start_us: f64,
    /// From the last model call to the end (the stop agreed, every peer gone, the
    /// summary read).
    pub end_us: f64,
    /// Mean time between consecutive model calls over the first and the last 100 messages.
    pub us_per_msg_first100: f64,
    pub us_per_msg_last100: f64,
    pub last_over_first: f64,
    /// Median gap over the first and the last 100 messages (robust to a lone stall,
    /// such as a WAL checkpoint or the other core's noise).
    pub us_median_first100: f64,
    pub us_median_last100: f64,
    pub median_last_over_first: f64,
    /// Memory before the session (the runtime already started) and after it stopped,
    /// with every peer and the log still held.
    pub memory_before: Memory,
    pub memory_after: Memory,
    pub peak_rss_kib: u64,
    /// What the session added: the growth of anonymous memory (see [`Memory`]).
    pub added_kib: u64,
    /// Bytes of the session's envelopes as JSON (the payload).
    pub payload_bytes: u64,
    /// `added_kib` over the payload.
    pub added_over_payload: f64,
    /// Executable code paged in for the first time during the session (file-backed,
    /// shared; not the session's data).
    pub code_paged_in_kib: u64,
    /// Every gap between consecutive model calls, in µs, in order (for `--gaps`).
    #[serde(skip)]
    pub gaps_us: Vec<f64>,
}

/// One group-chat session: its log (and the directory holding it), what the mock saw,
/// when the task was posted and how long until the stop.
struct Ran {
    log: Arc<dyn SessionLog>,
    mock: Arc<MockModel>,
    start: Instant,
    wall: Duration,
    _dir: tempfile::TempDir,
}

async fn run_group_chat(cfg: &GroupChatConfig, messages: u64) -> Result<Ran, String> {
    let plan = group_chat_plan(cfg.peers, messages);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let session = new_session_id();
    let log: Arc<dyn SessionLog> = if cfg.persist {
        let store = roundtable_sqlite::SqliteStore::open(
            &dir.path().join("bench.db"),
            true,
            roundtable_sqlite::Durability::Normal,
        )
        .map_err(|e| e.to_string())?;
        store.open(&session, true).await.map_err(|e| e.to_string())?
    } else {
        MemStore::new().open(&session, true).await.map_err(|e| e.to_string())?
    };
    let mock = Arc::new(MockModel::new(None, cfg.walk_history, messages as usize));
    let models: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), mock.clone() as Arc<dyn ChatModel>)).collect();

    let start = Instant::now();
    open_session(log.as_ref(), &plan, "Discuss the benchmark topic.").await.map_err(|e| e.to_string())?;
    let summary = run_peers(log.clone(), &plan, models, None, None).await.map_err(|e| e.to_string())?;
    let wall = start.elapsed();
    let expected = messages.saturating_sub(1);
    if summary.messages != expected {
        return Err(format!("expected {expected} messages, the session has {}", summary.messages));
    }
    Ok(Ran { log, mock, start, wall, _dir: dir })
}

/// Run the group-chat overhead workload once.
pub async fn group_chat(cfg: GroupChatConfig) -> Result<GroupChatResult, String> {
    let before = memory();
    if cfg.warmup > 0 {
        run_group_chat(&cfg, cfg.warmup).await?;
    }
    let Ran { log, mock, start, wall, _dir } = run_group_chat(&cfg, cfg.messages).await?;
    let after = memory();

    let calls = mock.calls.lock().expect("calls lock").clone();
    let gaps: Vec<f64> = calls.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e6).collect();
    let mean = |xs: &[f64]| if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 };
    let k = gaps.len().min(100);
    let first = mean(&gaps[..k]);
    let last = mean(&gaps[gaps.len() - k..]);
    let med_first = crate::median(gaps[..k].to_vec());
    let med_last = crate::median(gaps[gaps.len() - k..].to_vec());
    let payload: u64 =
        log.read_all().await.map_err(|e| e.to_string())?.iter().map(|e| e.env.to_json().len() as u64).sum();
    drop(log);
    Ok(GroupChatResult {
        workload: "groupchat",
        config: cfg,
        wall_ms: wall.as_secs_f64() * 1e3,
        messages_per_sec: cfg.messages as f64 / wall.as_secs_f64(),
        start_us: calls.first().map_or(0.0, |c| (*c - start).as_secs_f64() * 1e6),
        end_us: calls.last().map_or(0.0, |c| (start + wall).saturating_duration_since(*c).as_secs_f64() * 1e6),
        us_per_msg_first100: first,
        us_per_msg_last100: last,
        last_over_first: if first > 0.0 { last / first } else { 0.0 },
        us_median_first100: med_first,
        us_median_last100: med_last,
        median_last_over_first: if med_first > 0.0 { med_last / med_first } else { 0.0 },
        memory_before: before,
        memory_after: after,
        peak_rss_kib: after.peak,
        added_kib: after.anon.saturating_sub(before.anon),
        payload_bytes: payload,
        added_over_payload: after.anon.saturating_sub(before.anon) as f64 / (payload as f64 / 1024.0),
        code_paged_in_kib: after.file.saturating_sub(before.file),
        gaps_us: gaps,
    })
}

/// Settings of the scale workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ScaleConfig {
    pub peers: usize,
    /// Rounds of round robin; 0 keeps every peer idle (tailing, no turns yet).
    pub rounds: u32,
}

/// What the scale workload measured.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleResult {
    pub workload: &'static str,
    #[serde(flatten)]
    pub config: ScaleConfig,
    pub messages: u64,
    pub wall_ms: f64,
    /// Anonymous memory added (see [`Memory`]), and per peer.
    pub added_kib: u64,
    pub kib_per_peer: f64,
    /// Resident set size added, executable code paged in included.
    pub rss_added_kib: u64,
}

/// Hold `peers` peers in one process: idle (waiting for a task that never comes in
/// rounds = 0), or active for some rounds of round robin.
pub async fn scale(cfg: ScaleConfig) -> Result<ScaleResult, String> {
    let before = memory();
    let start = Instant::now();
    let (messages, after) = if cfg.rounds == 0 {
        (0, idle_peers(cfg.peers).await?)
    } else {
        let messages = u64::from(cfg.rounds) * cfg.peers as u64 + 1;
        let chat = GroupChatConfig { peers: cfg.peers, messages, persist: false, walk_history: false, warmup: 0 };
        // Measured while the session's log and peers' history are still held.
        let _ran = run_group_chat(&chat, messages).await?;
        (messages - 1, memory())
    };
    let added = after.anon.saturating_sub(before.anon);
    Ok(ScaleResult {
        workload: "scale",
        config: cfg,
        messages,
        wall_ms: start.elapsed().as_secs_f64() * 1e3,
        added_kib: added,
        kib_per_peer: added as f64 / cfg.peers as f64,
        rss_added_kib: after.rss.saturating_sub(before.rss),
    })
}

/// `peers` peers, each a task tailing a log that has no task yet; memory after 300 ms.
async fn idle_peers(peers: usize) -> Result<Memory, String> {
    let plan = group_chat_plan(peers, peers as u64 + 1);
    let log = MemStore::new().open(&new_session_id(), true).await.map_err(|e| e.to_string())?;
    let mock: Arc<dyn ChatModel> = Arc::new(MockModel::new(None, false, 0));
    let handles: Vec<_> = plan
        .peers
        .iter()
        .map(|p| {
            let cfg = roundtable_core::peer::PeerConfig {
                me: p.id.clone(),
                log: log.clone(),
                model: mock.clone(),
                presence: None,
                events: None,
            };
            tokio::spawn(roundtable_core::peer::run_peer(cfg))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = memory();
    for h in &handles {
        h.abort();
    }
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_chat_runs_exactly_the_messages_asked_for() {
        for persist in [false, true] {
            let cfg = GroupChatConfig { peers: 4, messages: 120, persist, walk_history: true, warmup: 30 };
            let r = group_chat(cfg).await.unwrap();
            assert!(r.payload_bytes > 119 * 50, "{r:?}");
            assert!(r.memory_after.anon > 0 && r.memory_after.rss >= r.memory_after.anon, "{r:?}");
            assert!(r.us_per_msg_first100 > 0.0 && r.us_per_msg_last100 > 0.0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scale_holds_idle_and_active_peers() {
        let r = scale(ScaleConfig { peers: 50, rounds: 0 }).await.unwrap();
        assert_eq!(r.messages, 0);
        let r = scale(ScaleConfig { peers: 50, rounds: 1 }).await.unwrap();
        assert_eq!(r.messages, 50);
    }
}
