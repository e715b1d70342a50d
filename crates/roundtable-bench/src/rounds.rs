//! Workload 2, parallel rounds: a debate whose members call a model with a fixed
//! latency. Round 0 is independent and concurrent, and round r waits only for round
//! r-1, so the critical path is `rounds × latency`; whatever the wall time adds to it is
//! the framework's.

use roundtable_core::team::NoEnv;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use roundtable_core::PeerId;
use roundtable_core::log::{LogStore, MemStore};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::team::{TeamPlan, parse_team};
use serde::Serialize;

use crate::mock::REPLY;

/// Answers [`REPLY`] after sleeping `latency`, recording when each call started and
/// returned.
pub struct LatencyModel {
    pub latency: Duration,
    /// (start, end) of every call, in the order they returned.
    pub calls: std::sync::Mutex<Vec<(Instant, Instant)>>,
}

#[async_trait]
impl ChatModel for LatencyModel {
    fn name(&self) -> &str {
        "mock"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let t0 = Instant::now();
        tokio::time::sleep(self.latency).await;
        self.calls.lock().expect("calls lock").push((t0, Instant::now()));
        Ok(ChatResponse {
            text: REPLY.to_string(),
            model: "mock".into(),
            prompt_tokens: req.estimated_prompt_tokens(),
            completion_tokens: 12,
            finish_reason: Some("stop".into()),
            tool_calls: Vec::new(),
        })
    }
}

/// Plans are built from strings with no environment and no files.
/// A debate of `n` members over `rounds` rounds (round 0 included), decided by
/// plurality, with no other stop condition.
pub fn debate_plan(n: usize, rounds: u32) -> TeamPlan {
    let mut src =
        String::from("name = \"rounds\"\n[models.mock]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"-\"]\n");
    for i in 0..n {
        src.push_str(&format!("[[peers]]\nid = \"p{i}\"\nmodel = \"mock\"\n"));
    }
    src.push_str(&format!(
        "[protocol]\nkind = \"debate\"\nrounds = {rounds}\nvote = \"plurality\"\n[presence]\nheartbeat_secs = 3600\n"
    ));
    parse_team("rounds.toml", &src, &NoEnv).expect("the benchmark plan is valid")
}

/// Settings of the parallel-rounds workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RoundsConfig {
    pub peers: usize,
    /// Debate rounds, round 0 included: every member calls its model this many times.
    pub rounds: u32,
    /// The mock model's latency per call.
    pub latency_ms: u64,
    /// Persist the log in SQLite (in a temporary directory), as a user's run does.
    pub persist: bool,
}

/// What one parallel-rounds run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RoundsResult {
    pub workload: &'static str,
    #[serde(flatten)]
    pub config: RoundsConfig,
    /// Model calls made (peers × rounds).
    pub calls: u64,
    /// From posting the task until every peer has seen the stop.
    pub wall_ms: f64,
    /// `rounds × latency`.
    pub critical_path_ms: f64,
    /// `wall_ms / critical_path_ms` (target ≤ 1.1 at 32 peers).
    pub ratio: f64,
    /// What the wall time adds to the critical path.
    pub overhead_ms: f64,
    /// From posting the task to the first model call.
    pub start_ms: f64,
    /// Within a round, from its first model call to its last one (the worst round).
    pub max_round_spread_ms: f64,
    /// From the last call of round r-1 returning (start + latency) to the first call
    /// of round r, averaged over rounds 1.. (the hand-off between rounds).
    pub mean_handoff_ms: f64,
    /// From the last call returning to every peer having ended.
    pub stop_ms: f64,
    /// What the model calls themselves took beyond the latency, on average (timer
    /// granularity and scheduling: a sleep of L takes a little more than L).
    pub mean_call_excess_ms: f64,
}

/// Run the parallel-rounds workload once.
pub async fn rounds(cfg: RoundsConfig) -> Result<RoundsResult, String> {
    let plan = debate_plan(cfg.peers, cfg.rounds);
    let latency = Duration::from_millis(cfg.latency_ms);
    let expected = cfg.peers * cfg.rounds as usize;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = if cfg.persist {
        let path = dir.path().join("bench.db");
        let store = roundtable_sqlite::SqliteStore::open(&path, true, roundtable_sqlite::Durability::Normal)
            .map_err(|e| e.to_string())?;
        store.open(&new_session_id(), true).await.map_err(|e| e.to_string())?
    } else {
        MemStore::new().open(&new_session_id(), true).await.map_err(|e| e.to_string())?
    };
    let mock = Arc::new(LatencyModel { latency, calls: std::sync::Mutex::new(Vec::with_capacity(expected)) });
    let models: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), mock.clone() as Arc<dyn ChatModel>)).collect();

    let start = Instant::now();
    open_session(log.as_ref(), &plan, "Is 17 a prime number?").await.map_err(|e| e.to_string())?;
    let summary = run_peers(log.clone(), &plan, models, None, None).await.map_err(|e| e.to_string())?;
    let wall = start.elapsed();

    let mut calls = mock.calls.lock().expect("calls lock").clone();
    if calls.len() != expected || summary.calls != expected as u64 || !summary.stopped {
        return Err(format!(
            "expected {expected} model calls and a stop; the mock saw {}, the log records {} (stopped: {})",
            calls.len(),
            summary.calls,
            summary.stopped
        ));
    }
    if summary.rounds != cfg.rounds {
        return Err(format!("expected {} rounds, the log records {}", cfg.rounds, summary.rounds));
    }
    // No call of round r can start before round r-1 closed, so in start order the
    // calls of round r are calls[r·n .. (r+1)·n].
    calls.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_round: Vec<&[(Instant, Instant)]> = calls.chunks(cfg.peers).collect();
    let spread = per_round.iter().map(|c| ms(c[c.len() - 1].0 - c[0].0)).fold(0.0, f64::max);
    let last_end = |c: &[(Instant, Instant)]| c.iter().map(|x| x.1).max().expect("a round has calls");
    let handoffs: Vec<f64> =
        per_round.windows(2).map(|w| ms(w[1][0].0.saturating_duration_since(last_end(w[0])))).collect();
    let end = start + wall;
    let excess: Vec<f64> = calls.iter().map(|(a, b)| ms(*b - *a) - cfg.latency_ms as f64).collect();
    let critical = cfg.rounds as f64 * cfg.latency_ms as f64;
    let wall_ms = ms(wall);
    Ok(RoundsResult {
        workload: "rounds",
        config: cfg,
        calls: calls.len() as u64,
        wall_ms,
        critical_path_ms: critical,
        ratio: if critical > 0.0 { wall_ms / critical } else { 0.0 },
        overhead_ms: wall_ms - critical,
        start_ms: ms(calls[0].0 - start),
        max_round_spread_ms: spread,
        mean_handoff_ms: mean(&handoffs),
        stop_ms: ms(end.saturating_duration_since(last_end(&calls))),
        mean_call_excess_ms: mean(&excess),
    })
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_debate_makes_every_call_of_every_round() {
        let r = rounds(RoundsConfig { peers: 4, rounds: 3, latency_ms: 20, persist: false }).await.unwrap();
        assert_eq!(r.calls, 12, "the calls the mock model saw");
        assert_eq!(r.critical_path_ms, 60.0);
        // Each round waits for the one before it: three sleeps of 20 ms end to end (a
        // lower bound, which no scheduling can break; overlapping rounds would not
        // reach it).
        assert!(r.wall_ms >= r.critical_path_ms && r.ratio >= 1.0, "{r:?}");
        assert!(r.start_ms <= r.wall_ms - r.critical_path_ms, "{r:?}");
    }
}
