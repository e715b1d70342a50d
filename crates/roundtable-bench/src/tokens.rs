//! Workload 3, token growth: prompt tokens per round under each context policy, with a
//! deterministic offline model whose prompt-token count is what it was actually sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use roundtable_core::PeerId;
use roundtable_core::envelope::Kind;
use roundtable_core::log::{LogStore, MemStore};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError, estimate_tokens};
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::team::{TeamPlan, parse_team};
use serde::Serialize;

use roundtable_core::team::NoEnv;

/// The words replies are made of (cycled, then cut to the reply's size).
const FILLER: &str = "the proposal holds if the cache is warmed before the first request and the fallback path \
                      stays idle under normal load so the cost is bounded by the number of peers times the rounds ";

/// A deterministic offline model. Its reply is `reply_bytes` long (its peer, step and
/// ordinal, then filler words), and its prompt tokens are counted by walking every
/// message it was sent — the system prompt, then each message's estimated tokens plus
/// 4 for the message's framing — the same estimate the budget uses, but computed from
/// what the request holds rather than from the peer's running sums.
pub struct ContextModel {
    pub reply_bytes: usize,
    /// Calls whose walked count differed from [`ChatRequest::estimated_prompt_tokens`].
    pub mismatches: AtomicU64,
}

impl ContextModel {
    pub fn new(reply_bytes: usize) -> Self {
        ContextModel { reply_bytes, mismatches: AtomicU64::new(0) }
    }

    fn reply(&self, req: &ChatRequest) -> String {
        let mut text = format!("{} at {} (call {}): ", req.peer, req.step, req.ordinal);
        while text.len() < self.reply_bytes {
            text.push_str(FILLER);
        }
        let mut end = self.reply_bytes.max(1).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text
    }
}

/// Prompt tokens of a request, by walking what it holds.
pub fn walked_prompt_tokens(req: &ChatRequest) -> u64 {
    let system = req.system.as_deref().map_or(0, |s| u64::from(estimate_tokens(s)));
    system + req.messages().map(|m| u64::from(estimate_tokens(&m.content)) + 4).sum::<u64>()
}

#[async_trait]
impl ChatModel for ContextModel {
    fn name(&self) -> &str {
        "context-mock"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let prompt_tokens = walked_prompt_tokens(req);
        if prompt_tokens != req.estimated_prompt_tokens() {
            self.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        let text = self.reply(req);
        let completion_tokens = u64::from(estimate_tokens(&text));
        Ok(ChatResponse {
            text,
            model: "context-mock".into(),
            prompt_tokens,
            completion_tokens,
            finish_reason: Some("stop".into()),
            tool_calls: Vec::new(),
        })
    }
}

/// A context policy of the workload, with its parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum Policy {
    Full,
    LastK { k: usize },
    Summary { keep_rounds: u32 },
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Full => "full",
            Policy::LastK { .. } => "last_k",
            Policy::Summary { .. } => "summary",
        }
    }

    fn toml(&self) -> String {
        match self {
            Policy::Full => "[context]\npolicy = \"full\"\n".into(),
            Policy::LastK { k } => format!("[context]\npolicy = \"last_k\"\nk = {k}\n"),
            Policy::Summary { keep_rounds } => {
                format!("[context]\npolicy = \"summary\"\nkeep_rounds = {keep_rounds}\n")
            }
        }
    }
}

/// Round robin among `n` peers for `rounds` rounds under a context policy.
pub fn tokens_plan(n: usize, rounds: u32, policy: Policy) -> TeamPlan {
    let mut src =
        String::from("name = \"tokens\"\n[models.mock]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"-\"]\n");
    for i in 0..n {
        src.push_str(&format!("[[peers]]\nid = \"p{i}\"\nmodel = \"mock\"\n"));
    }
    src.push_str(&format!(
        "[protocol]\nkind = \"round_robin\"\nrounds = {rounds}\n[presence]\nheartbeat_secs = 3600\n"
    ));
    src.push_str(&policy.toml());
    parse_team("tokens.toml", &src, &NoEnv).expect("the benchmark plan is valid")
}

/// Settings of the token-growth workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TokensConfig {
    pub peers: usize,
    pub rounds: u32,
    #[serde(flatten)]
    pub policy: Policy,
    /// Bytes of every reply (turns and summaries alike).
    pub reply_bytes: usize,
}

/// Prompt tokens of one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundTokens {
    /// 1-based.
    pub round: u32,
    /// The peers' turns in this round and their prompt tokens.
    pub turns: u64,
    pub turn_prompt_tokens: u64,
    /// Summaries written as this round opened (summary policy) and their prompt tokens.
    pub summaries: u64,
    pub summary_prompt_tokens: u64,
    /// Everything sent to a model for this round: turns and summaries.
    pub prompt_tokens: u64,
}

/// What one token-growth run measured.
#[derive(Clone, Debug, Serialize)]
pub struct TokensResult {
    pub workload: &'static str,
    #[serde(flatten)]
    pub config: TokensConfig,
    pub per_round: Vec<RoundTokens>,
    pub total_prompt_tokens: u64,
    pub round5_prompt_tokens: u64,
    pub last_round_prompt_tokens: u64,
    /// The largest relative distance of a round's prompt tokens from round 5's, over
    /// rounds 5 to the last (target for `summary`: ≤ 0.10).
    pub max_dev_from_round5: f64,
    /// Model calls whose walked prompt tokens differed from the request's own estimate.
    pub estimate_mismatches: u64,
}

/// Run the token-growth workload once.
pub async fn tokens(cfg: TokensConfig) -> Result<TokensResult, String> {
    let plan = tokens_plan(cfg.peers, cfg.rounds, cfg.policy);
    let log = MemStore::new().open(&new_session_id(), true).await.map_err(|e| e.to_string())?;
    let model = Arc::new(ContextModel::new(cfg.reply_bytes));
    let models: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), model.clone() as Arc<dyn ChatModel>)).collect();
    open_session(log.as_ref(), &plan, "Should the team move the nightly batch jobs to a queue?")
        .await
        .map_err(|e| e.to_string())?;
    let summary = run_peers(log.clone(), &plan, models, None, None).await.map_err(|e| e.to_string())?;
    if summary.failures > 0 || !summary.stopped {
        return Err(format!("the session failed {} calls (stopped: {})", summary.failures, summary.stopped));
    }

    let mut per_round: Vec<RoundTokens> =
        (1..=cfg.rounds).map(|round| RoundTokens { round, ..Default::default() }).collect();
    for e in log.read_all().await.map_err(|e| e.to_string())? {
        let env = &e.env;
        let (Some(usage), Some(r)) = (&env.usage, per_round.get_mut(env.round as usize)) else {
            continue;
        };
        match env.kind {
            Kind::Message if env.step.starts_with("turn/") => {
                r.turns += 1;
                r.turn_prompt_tokens += usage.prompt_tokens;
            }
            Kind::Summary => {
                r.summaries += 1;
                r.summary_prompt_tokens += usage.prompt_tokens;
            }
            _ => continue,
        }
        r.prompt_tokens += usage.prompt_tokens;
    }
    let turns: u64 = per_round.iter().map(|r| r.turns).sum();
    let expected = cfg.peers as u64 * u64::from(cfg.rounds);
    if turns != expected {
        return Err(format!("expected {expected} turns, the log has {turns}"));
    }
    let at = |round: u32| per_round.get(round as usize - 1).map_or(0, |r| r.prompt_tokens);
    let base = at(5.min(cfg.rounds).max(1));
    let max_dev = per_round
        .iter()
        .skip(4)
        .map(|r| if base > 0 { (r.prompt_tokens as f64 - base as f64).abs() / base as f64 } else { 0.0 })
        .fold(0.0, f64::max);
    Ok(TokensResult {
        workload: "tokens",
        config: cfg,
        total_prompt_tokens: per_round.iter().map(|r| r.prompt_tokens).sum(),
        round5_prompt_tokens: base,
        last_round_prompt_tokens: at(cfg.rounds.max(1)),
        per_round,
        max_dev_from_round5: max_dev,
        estimate_mismatches: model.mismatches.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(policy: Policy) -> TokensResult {
        tokens(TokensConfig { peers: 3, rounds: 7, policy, reply_bytes: 120 }).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_policy_runs_every_turn_and_counts_what_was_sent() {
        let full = run(Policy::Full).await;
        let last = run(Policy::LastK { k: 3 }).await;
        let summary = run(Policy::Summary { keep_rounds: 1 }).await;
        for r in [&full, &last, &summary] {
            assert_eq!(r.per_round.len(), 7);
            assert!(r.per_round.iter().all(|x| x.turns == 3 && x.turn_prompt_tokens > 0), "{r:?}");
            assert_eq!(r.estimate_mismatches, 0, "walked and estimated prompt tokens agree");
        }
        // Full history grows every round; the others stop growing.
        assert!(full.per_round.windows(2).all(|w| w[1].prompt_tokens > w[0].prompt_tokens), "{full:?}");
        assert!(full.max_dev_from_round5 > 0.1);
        assert_eq!(last.max_dev_from_round5, 0.0, "{last:?}");
        // One summary per round from round 3 on (keep_rounds = 1), and flat prompts.
        let summaries: Vec<u64> = summary.per_round.iter().map(|r| r.summaries).collect();
        assert_eq!(summaries, [0, 0, 1, 1, 1, 1, 1]);
        assert!(summary.max_dev_from_round5 <= 0.10, "{summary:?}");
        assert!(summary.total_prompt_tokens < full.total_prompt_tokens);
    }

    #[test]
    fn replies_have_the_size_asked_for() {
        let m = ContextModel::new(100);
        let req = ChatRequest::simple("p1", "go");
        assert_eq!(m.reply(&req).len(), 100);
        assert_eq!(walked_prompt_tokens(&req), req.estimated_prompt_tokens());
    }
}
