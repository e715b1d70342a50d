//! The evaluation harness: collaboration patterns against the single-agent and
//! sample-and-vote baselines, on questions with known answers.
//!
//! [`run_eval`] runs every question through the real runtime — a team plan parsed
//! from a generated team file, an in-memory session log, one task per peer — once per
//! pattern, and grades the final answer of each session against the known answer. The
//! report gives, per pattern, accuracy with a Wilson 95% confidence interval, model
//! calls, tokens and wall time.
//!
//! # Baselines at an equal number of calls
//! The literature shows that debate does not always beat voting, so the report always
//! includes `single` (one agent, one call) and sample-and-vote (`vote@k`: k independent
//! answers, then the vote) for every call count k that a requested pattern spent on
//! average per question (rounded), and `vote@N·R` when no multi-agent pattern was
//! asked for. Sample-and-vote is a one-round debate of k agents with the same model:
//! k independent samples.
//!
//! # Tasks
//! `arithmetic`: Du et al.'s expressions `a+b*c+d-e*f` with integers 0–29, seeded
//! ([`crate::model::simulated::arithmetic`]). `jsonl:FILE`: one `{"question": …,
//! "answer": …}` object per line ([`parse_jsonl`]).
//!
//! # Models
//! [`EvalModel::Simulated`] is the offline noisy oracle (it knows the JSONL answer key
//! too); [`EvalModel::Custom`] hands every peer a model of the caller's (a real
//! provider), graded the same way.

use crate::team::NoEnv;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use crate::envelope::{PeerId, SessionId};
use crate::log::{MemLog, SessionLog, SharedMemLog};
use crate::model::ChatModel;
use crate::model::scripted::Scripted;
use crate::model::simulated::{Oracle, Simulated, arithmetic};
use crate::peer::PeerExtras;
use crate::protocol::answers::{extract, normalize};
use crate::runner::{open_session, run_peers_with};
use crate::team::{ProviderSpec, TeamPlan, VoteRule, parse_team};

/// One question with its known answer.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalItem {
    pub question: String,
    pub answer: String,
}

/// The questions of an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalTask {
    /// Seeded `a+b*c+d-e*f` expressions.
    Arithmetic,
    /// Questions read from a JSONL file.
    Jsonl { name: String, items: Vec<EvalItem> },
}

impl EvalTask {
    pub fn name(&self) -> String {
        match self {
            EvalTask::Arithmetic => "arithmetic".into(),
            EvalTask::Jsonl { name, .. } => format!("jsonl:{name}"),
        }
    }

    /// The first `n` questions (all of a JSONL file when it has fewer).
    pub fn items(&self, n: usize, seed: u64) -> Vec<EvalItem> {
        match self {
            EvalTask::Arithmetic => (0..n as u64)
                .map(|i| {
                    let (q, a) = arithmetic::question(seed, i);
                    EvalItem { question: q, answer: a.to_string() }
                })
                .collect(),
            EvalTask::Jsonl { items, .. } => items.iter().take(n).cloned().collect(),
        }
    }
}

/// The task named by a command-line argument: `arithmetic`, or `jsonl:FILE` (read with
/// `read`, which gets the file name).
pub fn task_from_arg(arg: &str, read: &dyn Fn(&str) -> Result<String, String>) -> Result<EvalTask, String> {
    match arg.trim() {
        "arithmetic" => Ok(EvalTask::Arithmetic),
        a => match a.strip_prefix("jsonl:") {
            Some(file) if !file.is_empty() => parse_jsonl(file, &read(file).map_err(|e| format!("{file}: {e}"))?),
            _ => Err(format!("unknown task `{a}`; valid: `arithmetic`, `jsonl:FILE`")),
        },
    }
}

/// Parse a JSONL task file: one `{"question": "...", "answer": ...}` per line (the
/// answer may be a string or a number; blank lines are skipped). Errors name the line.
pub fn parse_jsonl(name: &str, contents: &str) -> Result<EvalTask, String> {
    let mut items = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{name}:{}: {e}", i + 1))?;
        let q = v.get("question").and_then(|q| q.as_str()).filter(|q| !q.trim().is_empty());
        let a = match v.get("answer") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        };
        match (q, a) {
            (Some(q), Some(a)) => items.push(EvalItem { question: q.to_string(), answer: a }),
            (None, _) => {
                return Err(format!("{name}:{}: field `question`: a non-empty string is required", i + 1));
            }
            (_, None) => {
                return Err(format!("{name}:{}: field `answer`: a string or number is required", i + 1));
            }
        }
    }
    if items.is_empty() {
        return Err(format!("{name}: no questions"));
    }
    Ok(EvalTask::Jsonl { name: name.to_string(), items })
}

/// A collaboration pattern to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// One agent, one call.
    Single,
    /// Sample-and-vote: `k` independent answers, then the vote (`None`: k = N·R).
    Vote(Option<u32>),
    Debate,
    Jury,
    JudgedDebate,
    ProposerCritic,
    Consensus,
    Emergent,
    Adversarial,
    Hybrid,
}

impl Pattern {
    /// The names [`Pattern::parse`] accepts (`vote` also as `vote@K`).
    pub const NAMES: &'static [&'static str] = &[
        "single",
        "vote",
        "debate",
        "jury",
        "judged_debate",
        "proposer_critic",
        "consensus",
        "emergent",
        "adversarial",
        "hybrid",
    ];

    pub fn parse(s: &str) -> Result<Pattern, String> {
        let s = s.trim();
        if let Some(k) = s.strip_prefix("vote@") {
            return match k.parse::<u32>() {
                Ok(k) if k >= 1 => Ok(Pattern::Vote(Some(k))),
                _ => Err(format!("`{s}`: vote@K needs a whole number K ≥ 1")),
            };
        }
        Ok(match s {
            "single" => Pattern::Single,
            "vote" => Pattern::Vote(None),
            "debate" => Pattern::Debate,
            "jury" => Pattern::Jury,
            "judged_debate" => Pattern::JudgedDebate,
            "proposer_critic" => Pattern::ProposerCritic,
            "consensus" => Pattern::Consensus,
            "emergent" => Pattern::Emergent,
            "adversarial" => Pattern::Adversarial,
            "hybrid" => Pattern::Hybrid,
            other => {
                let valid: Vec<String> = Self::NAMES.iter().map(|n| format!("`{n}`")).collect();
                return Err(format!("unknown pattern `{other}`; valid: {}, or `vote@K`", valid.join(", ")));
            }
        })
    }

    /// A comma-separated list of patterns (`single,vote@6,debate`).
    pub fn parse_list(s: &str) -> Result<Vec<Pattern>, String> {
        s.split(',').filter(|p| !p.trim().is_empty()).map(Pattern::parse).collect()
    }

    pub fn name(&self) -> String {
        match self {
            Pattern::Single => "single".into(),
            Pattern::Vote(Some(k)) => format!("vote@{k}"),
            Pattern::Vote(None) => "vote".into(),
            Pattern::Debate => "debate".into(),
            Pattern::Jury => "jury".into(),
            Pattern::JudgedDebate => "judged_debate".into(),
            Pattern::ProposerCritic => "proposer_critic".into(),
            Pattern::Consensus => "consensus".into(),
            Pattern::Emergent => "emergent".into(),
            Pattern::Adversarial => "adversarial".into(),
            Pattern::Hybrid => "hybrid".into(),
        }
    }

    fn is_baseline(&self) -> bool {
        matches!(self, Pattern::Single | Pattern::Vote(_))
    }
}

/// Builds a peer's model for an evaluation run.
pub type ModelFactory = Arc<dyn Fn(&PeerId) -> Arc<dyn ChatModel> + Send + Sync>;

/// The model every peer uses.
#[derive(Clone)]
pub enum EvalModel {
    /// The offline noisy oracle (see [`crate::model::simulated`]).
    Simulated { p_correct: f64, susceptibility: f64 },
    /// A model of the caller's, described by `name` in the report.
    Custom { name: String, factory: ModelFactory },
}

impl std::fmt::Debug for EvalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl EvalModel {
    fn describe(&self) -> String {
        match self {
            EvalModel::Simulated { p_correct, susceptibility } => {
                format!("simulated p={p_correct:.2} s={susceptibility:.2}")
            }
            EvalModel::Custom { name, .. } => name.clone(),
        }
    }
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub task: EvalTask,
    /// Patterns to run; the baselines are added (see the module docs).
    pub patterns: Vec<Pattern>,
    /// Agents per team (N).
    pub agents: usize,
    /// Rounds (R).
    pub rounds: u32,
    /// Questions.
    pub n: usize,
    pub seed: u64,
    pub model: EvalModel,
    /// How debate and sample-and-vote count their final answers.
    pub vote: VoteRule,
    /// Sessions run at once.
    pub concurrency: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            task: EvalTask::Arithmetic,
            patterns: vec![Pattern::Debate],
            agents: 3,
            rounds: 2,
            n: 100,
            seed: 0,
            model: EvalModel::Simulated { p_correct: 0.6, susceptibility: 0.0 },
            vote: VoteRule::Plurality,
            concurrency: 8,
        }
    }
}

/// One pattern's results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PatternResult {
    pub pattern: String,
    pub baseline: bool,
    pub agents: usize,
    pub rounds: u32,
    pub questions: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Wilson 95% confidence interval of the accuracy.
    pub ci_low: f64,
    pub ci_high: f64,
    pub calls: u64,
    pub calls_per_question: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub wall_ms: u64,
    /// Sessions that ended with no answer (e.g. no majority, a hung jury).
    pub unanswered: usize,
    /// Sessions that could not run (an error from the runtime).
    pub errors: usize,
}

/// The comparison table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub task: String,
    pub questions: usize,
    pub agents: usize,
    pub rounds: u32,
    pub seed: u64,
    pub model: String,
    pub vote: String,
    pub results: Vec<PatternResult>,
}

impl EvalReport {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("report serializes")
    }

    /// The report as a text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "task {} · {} questions · seed {} · model {} · N={} R={} · vote: {}\n\n",
            self.task, self.questions, self.seed, self.model, self.agents, self.rounds, self.vote
        );
        out.push_str(&format!(
            "{:<22} {:>6} {:>6} {:>9} {:>17} {:>8} {:>10} {:>9} {:>8}\n",
            "pattern", "agents", "rounds", "accuracy", "95% CI", "calls/q", "tokens/q", "wall", "no ans."
        ));
        for r in &self.results {
            let name = if r.baseline { format!("{} (baseline)", r.pattern) } else { r.pattern.clone() };
            let q = r.questions.max(1) as f64;
            out.push_str(&format!(
                "{:<22} {:>6} {:>6} {:>9.3} {:>17} {:>8.2} {:>10.0} {:>8.2}s {:>8}\n",
                name,
                r.agents,
                r.rounds,
                r.accuracy,
                format!("[{:.3}, {:.3}]", r.ci_low, r.ci_high),
                r.calls_per_question,
                r.tokens as f64 / q,
                r.wall_ms as f64 / 1000.0,
                r.unanswered,
            ));
            if r.errors > 0 {
                out.push_str(&format!("{:<22} {} sessions failed to run\n", "", r.errors));
            }
        }
        out
    }
}

/// The Wilson score interval for `k` successes in `n` trials at normal quantile `z`
/// (1.96 for 95%).
pub fn wilson(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The probability that more than half of `n` independent voters, each right with
/// probability `p`, are right: the binomial prediction for majority vote.
pub fn binomial_majority(n: u32, p: f64) -> f64 {
    (0..=n).filter(|k| 2 * k > n).map(|k| binomial(n, k) * p.powi(k as i32) * (1.0 - p).powi((n - k) as i32)).sum()
}

fn binomial(n: u32, k: u32) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * f64::from(n - i) / f64::from(i + 1))
}

/// The team file of a pattern: N agents `a1…aN` (and roles), all on the model `m`.
fn team_file(p: Pattern, agents: usize, rounds: u32, vote: VoteRule) -> String {
    let vote = match vote {
        VoteRule::Plurality => "plurality",
        VoteRule::Majority => "majority",
    };
    let peers = |ids: &[String]| -> String {
        ids.iter().map(|id| format!("[[peers]]\nid = \"{id}\"\nmodel = \"m\"\n")).collect()
    };
    let ids = |n: usize, prefix: &str| -> Vec<String> { (1..=n).map(|i| format!("{prefix}{i}")).collect() };
    let list = |v: &[String]| -> String { v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ") };
    let n = agents.max(1);
    let (members, protocol) = match p {
        Pattern::Single => (ids(1, "a"), format!("kind = \"debate\"\nrounds = 1\nvote = \"{vote}\"")),
        Pattern::Vote(k) => {
            let k = k.map_or(n * rounds as usize, |k| k as usize).max(1);
            (ids(k, "a"), format!("kind = \"debate\"\nrounds = 1\nvote = \"{vote}\""))
        }
        Pattern::Debate => (ids(n.max(2), "a"), format!("kind = \"debate\"\nrounds = {rounds}\nvote = \"{vote}\"")),
        Pattern::Jury => (ids(n.max(2), "a"), "kind = \"jury\"".to_string()),
        Pattern::JudgedDebate => {
            let mut m = ids(n.max(2), "a");
            m.push("judge".into());
            (m, format!("kind = \"judged_debate\"\njudge = \"judge\"\nrounds = {rounds}"))
        }
        Pattern::ProposerCritic => (ids(n.max(2), "a"), format!("kind = \"proposer_critic\"\nrounds = {rounds}")),
        Pattern::Consensus => (ids(n.max(2), "a"), format!("kind = \"consensus\"\nrounds = {rounds}")),
        Pattern::Emergent => (
            ids(n.max(2), "a"),
            format!("kind = \"emergent\"\nrounds = {}\ncompare = \"answer\"\nthreshold = 0.99", rounds.max(1)),
        ),
        Pattern::Adversarial => {
            let m = ids(n.max(3), "a");
            (
                m.clone(),
                format!(
                    "kind = \"adversarial\"\nproposer = \"a1\"\nadvocate = \"a2\"\nrounds = {rounds}\nvoters = [{}]",
                    list(&m[2..])
                ),
            )
        }
        Pattern::Hybrid => {
            let mut m = vec!["lead".to_string()];
            m.extend(ids(n.max(2), "a"));
            (m, format!("kind = \"hybrid\"\nleader = \"lead\"\ndeadlock_rounds = {}", rounds.max(1)))
        }
    };
    format!(
        "name = \"eval-{}\"\n[models.m]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"unused\"]\n\n{}\n[protocol]\n{protocol}\n",
        p.name(),
        peers(&members)
    )
}

/// Offline models for a plan's peers (scripted and simulated providers; `None` for a
/// peer whose model needs the network). No retry or timeout layers: offline models
/// answer at once.
pub fn offline_models(plan: &TeamPlan, oracle: Option<Oracle>) -> HashMap<PeerId, Arc<dyn ChatModel>> {
    let mut out = HashMap::new();
    for p in &plan.peers {
        let Some(spec) = plan.models.get(&p.model) else {
            continue;
        };
        let m: Arc<dyn ChatModel> = match &spec.provider {
            ProviderSpec::Scripted { .. } => {
                Arc::new(Scripted::from_spec(format!("scripted:{}", p.model), &spec.provider).expect("a scripted spec"))
            }
            ProviderSpec::Simulated { p_correct, susceptibility, seed } => {
                let s = Simulated::new(format!("simulated:{}", p.model), *p_correct, *susceptibility, *seed);
                Arc::new(match &oracle {
                    Some(o) => s.with_oracle(o.clone()),
                    None => s,
                })
            }
            _ => continue,
        };
        out.insert(p.id.clone(), m);
    }
    out
}

/// How one session went.
struct Outcome {
    correct: bool,
    answered: bool,
    calls: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    error: bool,
}

async fn run_one(
    plan: Arc<TeamPlan>,
    item: EvalItem,
    index: usize,
    cfg: &EvalConfig,
    oracle: Option<Oracle>,
) -> Outcome {
    let session = SessionId::from(format!("eval-{}-{}-{index}", plan.name, cfg.seed));
    let log: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(session))));
    let models: HashMap<PeerId, Arc<dyn ChatModel>> = match &cfg.model {
        EvalModel::Simulated { p_correct, susceptibility } => plan
            .peers
            .iter()
            .map(|p| {
                let mut s = Simulated::new("simulated", *p_correct, *susceptibility, cfg.seed);
                if let Some(o) = &oracle {
                    s = s.with_oracle(o.clone());
                }
                (p.id.clone(), Arc::new(s) as Arc<dyn ChatModel>)
            })
            .collect(),
        EvalModel::Custom { factory, .. } => plan.peers.iter().map(|p| (p.id.clone(), factory(&p.id))).collect(),
    };
    let failed = Outcome {
        correct: false,
        answered: false,
        calls: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_usd: 0.0,
        error: true,
    };
    if open_session(log.as_ref(), &plan, &item.question).await.is_err() {
        return failed;
    }
    match run_peers_with(log, &plan, models, None, None, PeerExtras::default()).await {
        Ok(s) => {
            let given = s
                .final_answer
                .as_deref()
                .map(|a| extract(a, None).map_or_else(|| a.to_string(), |e| e.answer.to_string()));
            Outcome {
                correct: given.as_deref().is_some_and(|g| normalize(g) == normalize(&item.answer)),
                answered: given.is_some(),
                calls: s.calls,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                cost_usd: s.cost_usd,
                // A session that stopped because its model calls kept failing is an
                // error, not a wrong answer: a dead endpoint must not look like a bad model.
                error: s.failed,
            }
        }
        Err(_) => failed,
    }
}

async fn run_pattern(p: Pattern, items: &[EvalItem], cfg: &EvalConfig, oracle: Option<Oracle>) -> PatternResult {
    let src = team_file(p, cfg.agents, cfg.rounds, cfg.vote);
    let plan =
        Arc::new(parse_team(&format!("eval-{}.toml", p.name()), &src, &NoEnv).expect("generated team files are valid"));
    let start = Instant::now();
    let outcomes: Vec<Outcome> = futures::stream::iter(items.iter().cloned().enumerate())
        .map(|(i, item)| run_one(plan.clone(), item, i, cfg, oracle.clone()))
        .buffer_unordered(cfg.concurrency.max(1))
        .collect()
        .await;
    let wall_ms = start.elapsed().as_millis() as u64;
    let n = outcomes.len();
    let correct = outcomes.iter().filter(|o| o.correct).count();
    let (ci_low, ci_high) = wilson(correct, n, 1.96);
    let calls: u64 = outcomes.iter().map(|o| o.calls).sum();
    let prompt_tokens: u64 = outcomes.iter().map(|o| o.prompt_tokens).sum();
    let completion_tokens: u64 = outcomes.iter().map(|o| o.completion_tokens).sum();
    let agents = plan.peers.len();
    let rounds = match &plan.protocol {
        crate::team::ProtocolSpec::Debate(d) => d.rounds,
        crate::team::ProtocolSpec::Jury(j) => j.rounds,
        crate::team::ProtocolSpec::JudgedDebate(j) => j.rounds,
        crate::team::ProtocolSpec::ProposerCritic(pc) => pc.rounds,
        crate::team::ProtocolSpec::Consensus(c) => c.rounds,
        crate::team::ProtocolSpec::Emergent(e) => e.rounds,
        crate::team::ProtocolSpec::Adversarial(a) => a.rounds,
        crate::team::ProtocolSpec::Hybrid(h) => h.deadlock_rounds,
        _ => cfg.rounds,
    };
    PatternResult {
        pattern: match p {
            Pattern::Vote(None) => format!("vote@{}", agents),
            _ => p.name(),
        },
        baseline: p.is_baseline(),
        agents,
        rounds,
        questions: n,
        correct,
        accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        ci_low,
        ci_high,
        calls,
        calls_per_question: if n == 0 { 0.0 } else { calls as f64 / n as f64 },
        prompt_tokens,
        completion_tokens,
        tokens: prompt_tokens + completion_tokens,
        cost_usd: outcomes.iter().map(|o| o.cost_usd).sum(),
        wall_ms,
        unanswered: outcomes.iter().filter(|o| !o.answered && !o.error).count(),
        errors: outcomes.iter().filter(|o| o.error).count(),
    }
}

/// Run an evaluation (see the module docs). Never fails: sessions that cannot run are
/// counted as errors (and as wrong) in their pattern's row.
pub async fn run_eval(cfg: EvalConfig) -> EvalReport {
    let items = cfg.task.items(cfg.n, cfg.seed);
    let oracle: Option<Oracle> = match &cfg.task {
        EvalTask::Arithmetic => None,
        EvalTask::Jsonl { items, .. } => {
            let key: HashMap<String, String> =
                items.iter().map(|i| (i.question.trim().to_string(), i.answer.clone())).collect();
            Some(Arc::new(move |q: &str| key.get(q.trim()).cloned()))
        }
    };
    // The requested patterns, without baselines: they are added below at equal calls.
    let mut others: Vec<Pattern> = Vec::new();
    let mut votes: BTreeSet<u32> = BTreeSet::new();
    for p in &cfg.patterns {
        match p {
            Pattern::Single => {}
            Pattern::Vote(Some(k)) => {
                votes.insert(*k);
            }
            Pattern::Vote(None) => {
                votes.insert((cfg.agents.max(1) as u32) * cfg.rounds.max(1));
            }
            other if !others.contains(other) => others.push(*other),
            _ => {}
        }
    }
    let mut results = Vec::new();
    let mut measured = Vec::new();
    for p in &others {
        let r = run_pattern(*p, &items, &cfg, oracle.clone()).await;
        measured.push(r);
    }
    for r in &measured {
        let k = r.calls_per_question.round() as u32;
        if k >= 2 {
            votes.insert(k);
        }
    }
    if votes.is_empty() {
        votes.insert((cfg.agents.max(1) as u32) * cfg.rounds.max(1));
    }
    results.push(run_pattern(Pattern::Single, &items, &cfg, oracle.clone()).await);
    for k in votes {
        results.push(run_pattern(Pattern::Vote(Some(k)), &items, &cfg, oracle.clone()).await);
    }
    results.extend(measured);
    EvalReport {
        task: cfg.task.name(),
        questions: items.len(),
        agents: cfg.agents,
        rounds: cfg.rounds,
        seed: cfg.seed,
        model: cfg.model.describe(),
        vote: match cfg.vote {
            VoteRule::Plurality => "plurality".into(),
            VoteRule::Majority => "majority".into(),
        },
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_and_binomial() {
        let (lo, hi) = wilson(60, 100, 1.96);
        assert!((lo - 0.502).abs() < 0.002 && (hi - 0.691).abs() < 0.002, "{lo} {hi}");
        assert_eq!(wilson(0, 0, 1.96), (0.0, 1.0));
        let (lo, hi) = wilson(0, 10, 1.96);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.25 && hi < 0.35);
        // P(X ≥ 3) for X ~ Bin(5, 0.6) = 0.68256.
        assert!((binomial_majority(5, 0.6) - 0.68256).abs() < 1e-9);
        assert!((binomial_majority(1, 0.6) - 0.6).abs() < 1e-12);
        assert!((binomial_majority(4, 0.5) - 5.0 / 16.0).abs() < 1e-12, "a tie is not a majority");
    }

    #[test]
    fn patterns_parse_and_name_the_valid_ones() {
        assert_eq!(Pattern::parse("vote@6"), Ok(Pattern::Vote(Some(6))));
        assert_eq!(Pattern::parse("debate"), Ok(Pattern::Debate));
        let e = Pattern::parse("debat").unwrap_err();
        assert!(e.contains("`debate`") && e.contains("vote@K"), "{e}");
        assert!(Pattern::parse("vote@0").is_err());
        for name in Pattern::NAMES {
            let p = Pattern::parse(name).unwrap();
            let src = team_file(p, 3, 2, VoteRule::Plurality);
            parse_team("t.toml", &src, &NoEnv).unwrap_or_else(|e| panic!("{name}: {e}\n{src}"));
        }
    }

    #[test]
    fn task_and_pattern_arguments() {
        let read = |f: &str| {
            if f == "q.jsonl" {
                Ok("{\"question\": \"q\", \"answer\": \"a\"}".to_string())
            } else {
                Err("no such file".into())
            }
        };
        assert_eq!(task_from_arg("arithmetic", &read), Ok(EvalTask::Arithmetic));
        assert_eq!(task_from_arg("jsonl:q.jsonl", &read).unwrap().name(), "jsonl:q.jsonl");
        assert_eq!(task_from_arg("jsonl:x.jsonl", &read).unwrap_err(), "x.jsonl: no such file");
        assert!(task_from_arg("gsm8k", &read).unwrap_err().contains("`arithmetic`, `jsonl:FILE`"));
        assert_eq!(
            Pattern::parse_list("single, vote@4,debate"),
            Ok(vec![Pattern::Single, Pattern::Vote(Some(4)), Pattern::Debate])
        );
        assert!(Pattern::parse_list("single,nope").is_err());
    }

    #[test]
    fn jsonl_tasks_name_the_bad_line() {
        let t = parse_jsonl("q.jsonl", "{\"question\": \"2+2?\", \"answer\": 4}\n\n{\"question\": \"Capital of France?\", \"answer\": \"Paris\"}\n").unwrap();
        let EvalTask::Jsonl { items, .. } = &t else { panic!() };
        assert_eq!(items[0], EvalItem { question: "2+2?".into(), answer: "4".into() });
        assert_eq!(items.len(), 2);
        let e = parse_jsonl("q.jsonl", "{\"question\": \"x\", \"answer\": 1}\n{\"question\": \"y\"}\n").unwrap_err();
        assert!(e.starts_with("q.jsonl:2:") && e.contains("answer"), "{e}");
        assert!(parse_jsonl("q.jsonl", "not json").unwrap_err().starts_with("q.jsonl:1:"));
    }
}
