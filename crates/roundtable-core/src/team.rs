//! Team files: a raw TOML file becomes a validated [`TeamPlan`] before anything runs.
//!
//! Every error names the file, the line and column, the key, and where there is a fixed
//! set of valid values, the choices. All errors are reported at once. The plan is
//! serializable: it is stored in the session's task envelope, so a session resumes from
//! its log alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::envelope::PeerId;
use crate::model::Price;
use crate::termination::{Budget, PeerBudget, Termination};

mod protocols;
pub mod reference;
pub mod schema;
pub mod tools;
pub use protocols::*;
pub use schema::team_schema;

/// One problem in a team file.
#[derive(Clone, Debug, PartialEq)]
pub struct TeamError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// Dotted key path, e.g. `peers[2].model`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for TeamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
        } else {
            write!(f, "{}:{}:{}: `{}`: {}", self.file, self.line, self.col, self.key, self.message)
        }
    }
}

/// All the problems found in a team file.
#[derive(Clone, Debug, PartialEq)]
pub struct TeamErrors(pub Vec<TeamError>);

impl fmt::Display for TeamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TeamErrors {}

/// What plan validation may look at outside the file: environment variables (API-key
/// variables must be set; their values are never read into the plan) and files that
/// the team file names (scripted replies).
pub trait PlanEnv {
    fn var_is_set(&self, name: &str) -> bool;
    /// Read a file named in the team file, relative to the team file's directory. Only
    /// files under that directory may be read (no absolute paths, no `..`, no symbolic
    /// link out of it): a team file from elsewhere reads nothing else on the machine.
    fn read(&self, path: &str) -> Result<String, String>;
    /// Whether a program a tool runs exists (on PATH, or as a path to an executable).
    fn program_exists(&self, _program: &str) -> bool {
        true
    }
    /// A path the team file names (a tool's working directory), resolved against the
    /// team file's directory.
    fn resolve(&self, path: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(path)
    }
}

/// A plan environment with no variables and no files: for plans written in code
/// (evaluations, benchmarks, tests), which name no API-key variables or reply files.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEnv;

impl PlanEnv for NoEnv {
    fn var_is_set(&self, _: &str) -> bool {
        false
    }
    fn read(&self, path: &str) -> Result<String, String> {
        Err(format!("no file {path}: this plan may name no files"))
    }
}

// ----------------------------------------------------------------------------------
// The validated plan.

/// A validated team: what a session runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeamPlan {
    pub name: String,
    pub topic: Option<String>,
    pub models: BTreeMap<String, ModelSpec>,
    pub peers: Vec<PeerSpec>,
    pub protocol: ProtocolSpec,
    pub termination: Termination,
    pub budget: Budget,
    pub context: ContextPolicy,
    pub presence: PresenceSpec,
    /// The tools declared in `[tools]`, by name (granted to peers by `PeerSpec::tools`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, crate::tool::ToolSpec>,
    /// Whose signatures this file trusts (`[trust]`). It is the local file's: a task's
    /// copy is never consulted.
    #[serde(default, skip_serializing_if = "TrustSpec::is_empty")]
    pub trust: TrustSpec,
}

/// Keys the team file trusts, and for what.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrustSpec {
    /// Public keys (64 hex digits) whose signature on a session's task lets this peer run
    /// that task's plan even where it differs from this file in what a peer executes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_signers: Vec<String>,
}

impl TrustSpec {
    pub fn is_empty(&self) -> bool {
        self.plan_signers.is_empty()
    }
}

impl TeamPlan {
    pub fn peer(&self, id: &PeerId) -> Option<&PeerSpec> {
        self.peers.iter().find(|p| &p.id == id)
    }
    pub fn peer_ids(&self) -> Vec<PeerId> {
        self.peers.iter().map(|p| p.id.clone()).collect()
    }
    pub fn model_of(&self, peer: &PeerId) -> Option<&ModelSpec> {
        self.peer(peer).and_then(|p| self.models.get(&p.model))
    }
}

/// A model and the layers around it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub provider: ProviderSpec,
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub max_concurrency: usize,
    pub price: Price,
    pub max_tokens: Option<u32>,
}

/// Which provider, and its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum ProviderSpec {
    Openai {
        model: String,
        base_url: String,
        /// Name of the environment variable holding the key (never the key).
        api_key_env: Option<String>,
        headers: BTreeMap<String, String>,
        query: BTreeMap<String, String>,
    },
    Anthropic {
        model: String,
        base_url: String,
        api_key_env: Option<String>,
    },
    Scripted {
        replies: Vec<String>,
        per_peer: BTreeMap<String, Vec<String>>,
        /// Replies for summaries of older rounds, apart from turns.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        summary_replies: Vec<String>,
        /// Start a list over when it runs out (plans stored before this existed did).
        #[serde(default = "yes")]
        cycle: bool,
        /// How long each call takes, in ms (a slow model, rehearsed offline).
        #[serde(default, skip_serializing_if = "is_zero")]
        delay_ms: u64,
    },
    Simulated {
        p_correct: f64,
        susceptibility: f64,
        seed: u64,
    },
    /// A program takes the peer's turns: it reads its inbox as JSON lines on stdin and
    /// writes actions as JSON lines on stdout (see [`crate::model::program`]).
    Program {
        command: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<std::path::PathBuf>,
    },
}

fn yes() -> bool {
    true
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ProviderSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSpec::Openai { .. } => "openai",
            ProviderSpec::Anthropic { .. } => "anthropic",
            ProviderSpec::Scripted { .. } => "scripted",
            ProviderSpec::Simulated { .. } => "simulated",
            ProviderSpec::Program { .. } => "program",
        }
    }
    /// The model name for usage records.
    pub fn model_name(&self, key: &str) -> String {
        match self {
            ProviderSpec::Openai { model, .. } | ProviderSpec::Anthropic { model, .. } => model.clone(),
            ProviderSpec::Scripted { .. } => format!("scripted:{key}"),
            ProviderSpec::Simulated { .. } => format!("simulated:{key}"),
            ProviderSpec::Program { .. } => format!("program:{key}"),
        }
    }
}

/// A peer of the team.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerSpec {
    pub id: PeerId,
    pub persona: String,
    pub model: String,
    pub group: Option<String>,
    pub temperature: Option<f32>,
    /// An assigned stance (for debates), appended to the persona.
    pub stance: Option<String>,
    /// How readily the peer should agree with the others, 0–1 (a groupthink knob):
    /// adds an agreement-intensity instruction to the system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f32>,
    /// The tools this peer may call: names of `[tools]` tables or built-ins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// The peer's Ed25519 public key, 64 hex digits (`roundtable keys new` prints it).
    /// When the peers have keys, every envelope of a session across processes must be
    /// signed by its author (see [`crate::trust`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Who answers for the peer: its model, or a person in its seat.
    #[serde(default, skip_serializing_if = "PeerKind::is_model")]
    pub kind: PeerKind,
    /// A human peer's time to answer a duty, in milliseconds (none: the team waits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_within_ms: Option<u64>,
}

/// Who answers for a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    /// Its model (the default).
    #[default]
    Model,
    /// A person who takes the seat (`roundtable join`); see [`crate::human`].
    Human,
}

impl PeerKind {
    pub fn is_model(&self) -> bool {
        *self == PeerKind::Model
    }
}

impl PeerSpec {
    /// Whether a person answers for this peer.
    pub fn is_human(&self) -> bool {
        self.kind == PeerKind::Human
    }

    /// The system prompt: persona, then stance, then the agreement instruction.
    pub fn system_prompt(&self) -> String {
        let mut s = self.persona.clone();
        if let Some(stance) = &self.stance {
            s.push_str(&format!("\n\nYour assigned stance: {stance}"));
        }
        if let Some(a) = self.agreement {
            s.push_str("\n\n");
            s.push_str(&agreement_instruction(a));
        }
        s
    }
}

/// The agreement-intensity instruction for an intensity in 0–1 (after Du et al.'s
/// prompts that range from "hold your ground" to "agree with the others").
pub fn agreement_instruction(intensity: f32) -> String {
    let pct = (intensity.clamp(0.0, 1.0) * 100.0).round();
    let how = if intensity >= 0.75 {
        "When the other agents' answers differ from yours, lean towards agreeing with them unless you see a clear error in their reasoning."
    } else if intensity > 0.25 {
        "When the other agents' answers differ from yours, weigh their reasoning against yours, and change your answer only if theirs is better."
    } else {
        "Hold your position: do not change your answer because others disagree; change it only when shown a concrete error in your own reasoning."
    };
    format!("Agreement intensity: {pct}%. {how}")
}

/// What a peer's model sees of the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum ContextPolicy {
    /// Everything visible to the peer.
    Full,
    /// The task and the last `k` visible messages.
    LastK { k: usize },
    /// The task, one shared summary of the rounds older than the last `keep_rounds`,
    /// and those last rounds in full. A summarizer peer writes the summary into a
    /// `summary` envelope that every peer reuses, so prompts stop growing with rounds.
    Summary {
        keep_rounds: u32,
        /// Who writes summaries (the first peer by default; the next present peer in
        /// team order when it is absent).
        summarizer: Option<PeerId>,
        instruction: Option<String>,
    },
}

impl ContextPolicy {
    pub const KINDS: &'static [&'static str] = &["full", "last_k", "summary"];
}

/// Heartbeats and absence detection.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceSpec {
    pub heartbeat_ms: u64,
    pub absent_after_ms: u64,
}

impl Default for PresenceSpec {
    fn default() -> Self {
        PresenceSpec { heartbeat_ms: 1000, absent_after_ms: 10_000 }
    }
}

// ----------------------------------------------------------------------------------
// The raw file.

/// A team file: the models, the peers, the protocol, when to stop and the budget.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Roundtable team file")]
struct RawTeam {
    /// The team's name, shown in listings.
    #[schemars(extend("x-default" = "the file's name without `.toml`"), example = &"code-review")]
    name: Option<String>,
    /// The task every peer works on: the text of the session's opening envelope.
    #[schemars(example = &"Review the patch in PR 42 and decide whether to merge it.")]
    topic: Option<String>,
    /// The models peers may use, each under a name of your choice (`[models.NAME]`);
    /// a peer names one in its `model` key.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, RawModel>")]
    models: BTreeMap<String, Spanned<RawModel>>,
    /// The peers, in team order (`[[peers]]`, one table each). Team order breaks ties and
    /// is the default speaking order.
    #[serde(default)]
    #[schemars(with = "Vec<RawPeer>")]
    peers: Vec<Spanned<RawPeer>>,
    /// The collaboration protocol: `kind` and the keys of that kind.
    #[schemars(with = "Option<protocols::RawProtocol>")]
    protocol: Option<Spanned<protocols::RawProtocol>>,
    /// Conditions that stop the session (any one of them holds, unless combined with
    /// `all`). A stop by one of these ends the session with the leading candidate
    /// *not accepted* unless the protocol had already accepted an answer.
    termination: Option<RawTermination>,
    /// Hard limits checked before every model call: a call that would exceed one is not
    /// made, and the session stops naming the call that reached the limit.
    budget: Option<RawBudget>,
    /// What each peer's model sees of the history.
    #[schemars(with = "Option<RawContext>")]
    context: Option<Spanned<RawContext>>,
    /// Heartbeats and absence detection (for peers in other processes).
    presence: Option<RawPresence>,
    /// Tools peers may call, each under a name (`[tools.NAME]`); a peer's `tools`
    /// grants them, with the built-in ones.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, tools::RawTool>")]
    tools: BTreeMap<String, Spanned<tools::RawTool>>,
    /// Keys this file trusts. Only the local file's `[trust]` counts, never a task's.
    trust: Option<RawTrust>,
}

/// Keys a team file trusts.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    /// Public keys (64 hex digits, as `roundtable keys new` prints them) whose signature
    /// on a session's task lets a peer run with this file a plan that differs from it
    /// in what the peer executes (model endpoints, key variables, tools). Without it, such
    /// a task is refused. Trust only keys of people who may decide where your peers send
    /// data and which secrets they read.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    plan_signers: Vec<Spanned<String>>,
}

#[derive(Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum ProviderKind {
    /// Any OpenAI-compatible chat completions endpoint (OpenAI, Azure, Ollama `/v1`,
    /// vLLM, llama.cpp server, LM Studio, OpenRouter).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Replies listed in the file or in `replies_file`: offline demos and tests.
    Scripted,
    /// A seeded noisy oracle for integer arithmetic and multiple-choice questions (anything
    /// else gets "I cannot answer this"; see "What `simulated` answers").
    Simulated,
    /// A program of your own that answers for the peer (JSON lines on stdin and stdout).
    Program,
}

/// A model and the layers around it (`[models.NAME]`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawModel {
    /// Which provider serves this model.
    provider: ProviderKind,
    /// The provider's model name (openai, anthropic; required there).
    #[schemars(example = &"gpt-4o-mini")]
    model: Option<String>,
    /// The endpoint (openai, anthropic).
    #[schemars(extend("x-default" = "https://api.openai.com/v1 (openai), https://api.anthropic.com (anthropic)"))]
    base_url: Option<String>,
    /// The *name* of the environment variable holding the API key (openai, anthropic);
    /// the key itself never goes in the file. Validation fails when it is not set.
    #[schemars(with = "Option<String>", example = &"OPENAI_API_KEY")]
    api_key_env: Option<Spanned<String>>,
    /// Extra HTTP headers sent with every request (openai).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Extra URL query parameters (openai; e.g. Azure's `api-version`).
    #[serde(default)]
    query: BTreeMap<String, String>,
    /// Seconds before one call is abandoned (and retried).
    #[schemars(with = "Option<f64>", range(min = 0.001, max = 604800.0), extend("default" = 120))]
    timeout_secs: Option<Spanned<f64>>,
    /// Retries of a failed call (429 honouring Retry-After, 5xx, timeouts, cut streams).
    #[schemars(with = "Option<u32>", range(max = 100), extend("default" = 3))]
    max_retries: Option<Spanned<u32>>,
    /// Calls to this model in flight at once, shared by every peer using it.
    #[schemars(with = "Option<usize>", range(min = 1, max = 1024), extend("default" = 8))]
    max_concurrency: Option<Spanned<usize>>,
    /// The longest answer one call may produce (sent to the provider as its
    /// `max_tokens`). Not a budget: `budget.max_tokens` caps the session's total and
    /// `termination.token_budget` stops the session softly after a total.
    #[schemars(with = "Option<u32>", range(min = 1, max = 10000000))]
    max_tokens: Option<Spanned<u32>>,
    /// Price per million tokens, for cost accounting and `max_cost_usd` budgets.
    #[schemars(with = "Option<Price>", extend("default" = { "prompt_per_mtok": 0.0, "completion_per_mtok": 0.0 }))]
    price: Option<Spanned<Price>>,
    /// scripted: the replies, in order, for every peer using this model without its
    /// own `per_peer` list. A peer's n-th call gets the n-th reply. Placeholders:
    /// `{peer}`, `{step}`, `{n}` (the call's number for this peer, from 1), `{round}`
    /// (the protocol round, from 1). `!error KIND message` fails the call instead.
    #[schemars(example = &["{peer} proposes plan A.", "{peer} agrees. Answer: A"])]
    replies: Option<Vec<String>>,
    /// scripted: replies for one peer (`per_peer.ID = [...]`), used instead of `replies`.
    #[serde(default)]
    per_peer: BTreeMap<String, Vec<String>>,
    /// scripted: a file of replies, relative to the team file's directory: TOML with
    /// `replies = [...]`, `summary_replies = [...]` and `[per_peer]`, or plain text
    /// with replies separated by lines holding only `---`. Added after `replies`.
    #[schemars(with = "Option<String>", example = &"replies/review.toml")]
    replies_file: Option<Spanned<String>>,
    /// scripted: replies for context summaries (`[context] policy = "summary"`), kept
    /// apart from turns so a summary never consumes a turn's reply. Without it a
    /// summary is a fixed sentence naming the rounds it covers.
    summary_replies: Option<Vec<String>>,
    /// scripted: start the list over when a peer has used every reply. Without it,
    /// running out of replies is an error naming the peer and the call.
    #[schemars(extend("default" = false))]
    cycle: Option<bool>,
    /// scripted: seconds each call takes before it answers, to rehearse a slow model
    /// offline (kills and restarts in the middle of a call).
    #[schemars(with = "Option<f64>", range(min = 0.0, max = 3600.0), extend("default" = 0))]
    delay_secs: Option<Spanned<f64>>,
    /// simulated: the probability that an answer is correct.
    #[schemars(range(min = 0.0, max = 1.0), extend("default" = 0.7))]
    p_correct: Option<f64>,
    /// simulated: the chance of adopting the majority answer the peer sees.
    #[schemars(range(min = 0.0, max = 1.0), extend("default" = 0.0))]
    susceptibility: Option<f64>,
    /// simulated: the random seed (answers are a function of seed, peer and step).
    #[schemars(extend("default" = 0))]
    seed: Option<u64>,
    /// program: the command that answers for the peer (JSON lines on stdin and stdout).
    #[schemars(with = "Option<Vec<String>>")]
    command: Option<Spanned<Vec<String>>>,
    /// program: the command's working directory, relative to the team file.
    cwd: Option<String>,
}

/// One peer of the team (`[[peers]]`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    /// The peer's id: 1-64 letters, digits, `-` or `_`, unique, not `user`. Protocol
    /// keys that name peers (`members`, `judge`, …) use it.
    #[schemars(with = "String", example = &"security")]
    id: Spanned<String>,
    /// The system prompt.
    #[schemars(extend("default" = "You are a thoughtful member of a team."))]
    persona: Option<String>,
    /// Who answers for this peer: `model` (its `model` key's model) or `human` (a
    /// person who takes the seat with `roundtable join SESSION --as ID` or the web view;
    /// a human peer has no `model`, `temperature`, `agreement` or `tools`).
    #[schemars(with = "Option<String>", extend("enum" = ["model", "human"], "default" = "model"))]
    kind: Option<Spanned<String>>,
    /// The name of a `[models.NAME]` table (required unless `kind = "human"`).
    #[schemars(with = "Option<String>", example = &"reviewer")]
    model: Option<Spanned<String>>,
    /// For a human peer: seconds a duty (a turn, a vote, an approval) waits for the
    /// person's answer. When they pass, the peer is recorded absent with the reason and
    /// its duties are skipped until the person comes back; without it the team waits.
    #[schemars(with = "Option<f64>", range(min = 0.001, max = 604800.0), example = &300.0)]
    answer_within_secs: Option<Spanned<f64>>,
    /// A visibility group: a message addressed to the group (by a protocol or a tool)
    /// is seen only by its members and its sender. Protocol keys take peer ids, never
    /// group names.
    #[schemars(example = &"red")]
    group: Option<String>,
    /// Sampling temperature sent to the provider.
    #[schemars(with = "Option<f32>", range(min = 0.0, max = 2.0))]
    temperature: Option<Spanned<f32>>,
    /// An assigned stance (for debates), appended to the persona.
    #[schemars(example = &"Argue for shipping this quarter.")]
    stance: Option<String>,
    /// How readily the peer agrees with the others, 0 (hold your ground) to 1 (lean
    /// towards agreeing): adds an agreement instruction to the system prompt.
    #[schemars(with = "Option<f32>", range(min = 0.0, max = 1.0))]
    agreement: Option<Spanned<f32>>,
    /// The tools this peer may call: names of `[tools.NAME]` tables or built-in tools
    /// (`send`, `broadcast`, `board_read`, `board_write`, `queue_push`, `queue_claim`,
    /// `queue_done`, `finish`).
    #[schemars(with = "Option<Vec<String>>")]
    tools: Option<Vec<Spanned<String>>>,
    /// The peer's Ed25519 public key (from `roundtable keys new --peer ID`): over NATS its
    /// envelopes must carry its signature. Give every peer one, or none.
    #[schemars(with = "Option<String>")]
    public_key: Option<Spanned<String>>,
}

/// Stop conditions. Keys in one table are alternatives (any one stops the session);
/// `any = [{...}, ...]` and `all = [{...}, ...]` combine nested tables.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct RawTermination {
    /// Stop after this many protocol rounds (counted from 1).
    #[schemars(with = "Option<u32>", range(min = 1, max = 10000))]
    max_rounds: Option<Spanned<u32>>,
    /// Stop after this many messages from peers.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_messages: Option<Spanned<u64>>,
    /// Stop once the session has used this many tokens (prompt + completion) in all.
    /// Checked after calls; `budget.max_tokens` is the hard limit checked before them.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    token_budget: Option<Spanned<u64>>,
    /// Stop once the session has cost this many US dollars (see `price`).
    #[schemars(with = "Option<f64>", range(min = 0.000001, max = 1000000.0))]
    cost_budget: Option<Spanned<f64>>,
    /// Stop after this many model calls.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_calls: Option<Spanned<u64>>,
    /// Stop after this many seconds of wall time.
    #[schemars(with = "Option<f64>", range(min = 0.001, max = 604800.0))]
    timeout_secs: Option<Spanned<f64>>,
    /// Stop when a message contains this text.
    #[schemars(with = "Option<String>", example = &"APPROVED")]
    text_mention: Option<Spanned<String>>,
    /// Stop when a judge's verdict declares a winner (judged debate).
    judge_verdict: Option<bool>,
    /// Stop when the leading answer's share of confidence reaches this fraction.
    #[schemars(with = "Option<f64>", range(min = 0.0, max = 1.0))]
    confidence: Option<Spanned<f64>>,
    /// Stop when the answers' similarity reaches this fraction.
    #[schemars(with = "Option<f64>", range(min = 0.0, max = 1.0))]
    convergence: Option<Spanned<f64>>,
    /// Stop when the protocol reports consensus.
    consensus_reached: Option<bool>,
    /// Stop after this many rounds in which the leading answer did not change.
    #[schemars(with = "Option<u32>", range(min = 1, max = 10000))]
    no_progress: Option<Spanned<u32>>,
    /// Stop when any of these tables holds.
    any: Option<Vec<RawTermination>>,
    /// Stop when all of these tables hold.
    all: Option<Vec<RawTermination>>,
}

/// Hard limits, checked before every model call.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    /// Tokens (prompt + completion) for the whole session. A call whose estimated prompt
    /// would pass it is not made. (A model's `max_tokens` caps one answer instead.)
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_tokens: Option<Spanned<u64>>,
    /// US dollars for the whole session (see the models' `price`).
    #[schemars(with = "Option<f64>", range(min = 0.000001, max = 1000000.0))]
    max_cost_usd: Option<Spanned<f64>>,
    /// Model calls for the whole session.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_calls: Option<Spanned<u64>>,
    /// Seconds of wall time from the session's start.
    #[schemars(with = "Option<f64>", range(min = 0.001, max = 604800.0))]
    max_wall_secs: Option<Spanned<f64>>,
    /// Tool calls for the whole session.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_tool_calls: Option<Spanned<u64>>,
    /// Seconds spent in tools, summed over calls.
    #[schemars(with = "Option<f64>", range(min = 0.001, max = 604800.0))]
    max_tool_secs: Option<Spanned<f64>>,
    /// The same limits for each peer separately.
    per_peer: Option<RawPeerBudget>,
}

/// Limits for each peer separately.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct RawPeerBudget {
    /// Tokens per peer.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_tokens: Option<Spanned<u64>>,
    /// US dollars per peer.
    #[schemars(with = "Option<f64>", range(min = 0.000001, max = 1000000.0))]
    max_cost_usd: Option<Spanned<f64>>,
    /// Model calls per peer.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_calls: Option<Spanned<u64>>,
    /// Tool calls per peer.
    #[schemars(with = "Option<u64>", range(min = 1, max = 1000000000000u64))]
    max_tool_calls: Option<Spanned<u64>>,
}

/// What each peer's model sees.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawContext {
    /// `full`: everything visible to the peer; `last_k`: the task and the last `k`
    /// messages; `summary`: the task, one shared summary of older rounds and the last
    /// `keep_rounds` rounds in full.
    #[schemars(with = "String", extend("enum" = ContextPolicy::KINDS, "default" = "full"))]
    policy: Spanned<String>,
    /// last_k: how many of the latest visible messages a peer sees.
    #[schemars(with = "Option<usize>", range(min = 1, max = 10000), extend("default" = 6))]
    k: Option<Spanned<usize>>,
    /// summary: how many of the latest rounds are kept in full.
    #[schemars(with = "Option<u32>", range(min = 1, max = 10000), extend("default" = 1))]
    keep_rounds: Option<Spanned<u32>>,
    /// summary: the peer id that writes the summaries.
    #[schemars(with = "Option<String>", extend("x-default" = "the first present peer in team order"))]
    summarizer: Option<Spanned<String>>,
    /// summary: the instruction given to the summarizer. (Under `[protocol]`,
    /// round robin's `summary_instruction` is a different thing: it asks for the
    /// session's final answer.)
    #[schemars(with = "Option<String>")]
    instruction: Option<Spanned<String>>,
}

/// Heartbeats and absence detection.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawPresence {
    /// Seconds between a peer's heartbeats.
    #[schemars(with = "Option<f64>", range(min = 0.01, max = 86400.0), extend("default" = 1))]
    heartbeat_secs: Option<Spanned<f64>>,
    /// Seconds of silence before a peer is recorded absent and its turns are skipped.
    #[schemars(with = "Option<f64>", range(min = 0.05, max = 86400.0), extend("default" = 10))]
    absent_after_secs: Option<Spanned<f64>>,
}

impl RawTermination {
    /// The conditions, each checked against its range (see [`ranges`]) as it is taken.
    fn into_termination(self, cx: &mut Ctx<'_>, path: &str) -> Termination {
        let key = |k: &str| format!("{path}.{k}");
        let mut cs = Vec::new();
        if let Some(n) = cx.count(self.max_rounds, &key("max_rounds"), ranges::ROUNDS) {
            cs.push(Termination::MaxRounds(n));
        }
        if let Some(n) = cx.count(self.max_messages, &key("max_messages"), ranges::COUNT) {
            cs.push(Termination::MaxMessages(n));
        }
        if let Some(n) = cx.count(self.token_budget, &key("token_budget"), ranges::COUNT) {
            cs.push(Termination::TokenBudget(n));
        }
        if let Some(c) = cx.real(self.cost_budget, &key("cost_budget"), ranges::USD) {
            cs.push(Termination::CostBudget(c));
        }
        if let Some(n) = cx.count(self.max_calls, &key("max_calls"), ranges::COUNT) {
            cs.push(Termination::MaxCalls(n));
        }
        if let Some(s) = cx.real(self.timeout_secs, &key("timeout_secs"), ranges::SECS) {
            cs.push(Termination::TimeoutMs(ranges::millis(s)));
        }
        if let Some(m) = self.text_mention {
            if m.get_ref().trim().is_empty() {
                cx.err_at(
                    m.span().start,
                    key("text_mention"),
                    "text_mention must not be empty (it would match every message)",
                );
            } else {
                cs.push(Termination::TextMention(Arc::from(m.into_inner())));
            }
        }
        if self.judge_verdict == Some(true) {
            cs.push(Termination::JudgeVerdict);
        }
        if let Some(c) = cx.real(self.confidence, &key("confidence"), ranges::FRACTION) {
            cs.push(Termination::Confidence(c));
        }
        if let Some(c) = cx.real(self.convergence, &key("convergence"), ranges::FRACTION) {
            cs.push(Termination::Convergence(c));
        }
        if self.consensus_reached == Some(true) {
            cs.push(Termination::ConsensusReached);
        }
        if let Some(k) = cx.count(self.no_progress, &key("no_progress"), ranges::ROUNDS) {
            cs.push(Termination::NoProgress(k));
        }
        if let Some(any) = self.any {
            let any = any.into_iter().enumerate().map(|(i, t)| t.into_termination(cx, &format!("{path}.any[{i}]")));
            cs.push(Termination::Any(any.collect()));
        }
        if let Some(all) = self.all {
            let all = all.into_iter().enumerate().map(|(i, t)| t.into_termination(cx, &format!("{path}.all[{i}]")));
            cs.push(Termination::All(all.collect()));
        }
        Termination::Any(cs)
    }
}

/// The valid range of every number a team file may hold. A value outside its range is
/// an error naming the file, line, key and range: nothing that parses may later be
/// unwritable (NaN and infinities are outside every range) or unbounded (a count that
/// would never be reached, a pool of permits no semaphore holds).
pub mod ranges {
    /// Inclusive bounds.
    pub type Range<T> = (T, T);
    /// Rounds of a protocol, `max_rounds`, `no_progress`, deadlock rounds.
    pub const ROUNDS: Range<u64> = (1, 10_000);
    /// Message, call and token limits.
    pub const COUNT: Range<u64> = (1, 1_000_000_000_000);
    /// Money in US dollars (budgets).
    pub const USD: Range<f64> = (0.000_001, 1_000_000.0);
    /// A price in US dollars per million tokens (0 for free models).
    pub const PRICE: Range<f64> = (0.0, 100_000.0);
    /// Durations in seconds: timeouts, wall-time budgets, leases (a millisecond to a week).
    pub const SECS: Range<f64> = (0.001, 604_800.0);
    /// A work-queue lease in seconds (the server needs some time to redeliver).
    pub const LEASE_SECS: Range<f64> = (0.01, 604_800.0);
    /// Deliveries of one work-queue task.
    pub const DELIVERIES: Range<u64> = (1, 1000);
    /// Re-announcements of one contract-net task.
    pub const REANNOUNCE: Range<u64> = (0, 1000);
    /// How long a scripted model's call takes, in seconds (up to an hour).
    pub const SCRIPTED_DELAY_SECS: Range<f64> = (0.0, 3600.0);
    /// Heartbeat and absence intervals in seconds.
    pub const PRESENCE_SECS: Range<f64> = (0.01, 86_400.0);
    /// Fractions: confidence, convergence, thresholds, probabilities.
    pub const FRACTION: Range<f64> = (0.0, 1.0);
    /// Concurrent calls to one model.
    pub const CONCURRENCY: Range<u64> = (1, 1024);
    /// Retries of one call.
    pub const RETRIES: Range<u64> = (0, 100);
    /// Tokens of one answer.
    pub const ANSWER_TOKENS: Range<u64> = (1, 10_000_000);
    /// Messages kept by `last_k`, rounds kept by `summary`.
    pub const CONTEXT: Range<u64> = (1, 10_000);

    /// Seconds in range as whole milliseconds (at least 1).
    pub fn millis(secs: f64) -> u64 {
        ((secs * 1000.0).round() as u64).max(1)
    }
}

// ----------------------------------------------------------------------------------
// Validation.

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
    errors: Vec<TeamError>,
}

impl Ctx<'_> {
    fn err_at(&mut self, offset: usize, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = line_col(self.src, offset);
        self.errors.push(TeamError { file: self.file.into(), line, col, key: key.into(), message: message.into() });
    }

    /// A whole number given for `key`, if it is in range; else an error naming the range.
    fn count<T: Copy + Into<u64>>(
        &mut self,
        v: Option<Spanned<T>>,
        key: &str,
        (lo, hi): ranges::Range<u64>,
    ) -> Option<T> {
        let v = v?;
        let n: u64 = (*v.get_ref()).into();
        if (lo..=hi).contains(&n) {
            Some(*v.get_ref())
        } else {
            self.err_at(v.span().start, key, format!("{key} is {n}; valid: {lo} to {hi}"));
            None
        }
    }

    /// A `usize` given for `key`, if it is in range.
    fn size(&mut self, v: Option<Spanned<usize>>, key: &str, range: ranges::Range<u64>) -> Option<usize> {
        let v = v?;
        let n = u64::try_from(*v.get_ref()).unwrap_or(u64::MAX);
        let span = v.span();
        self.count(Some(Spanned::new(span, n)), key, range).map(|n| n as usize)
    }

    /// A real number given for `key`, if it is finite and in range.
    fn real(&mut self, v: Option<Spanned<f64>>, key: &str, (lo, hi): ranges::Range<f64>) -> Option<f64> {
        let v = v?;
        let x = *v.get_ref();
        if (lo..=hi).contains(&x) {
            Some(x)
        } else {
            self.err_at(v.span().start, key, format!("{key} is {x}; valid: a number from {lo} to {hi}"));
            None
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The dotted key path at a byte offset: the innermost table header above it, and the
/// key on its line (e.g. `models.fast.provider`, `peers[1].model`).
pub fn key_path_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let mut table = String::new();
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    let line_start = src[..offset].rfind('\n').map_or(0, |i| i + 1);
    for line in src[..line_start].lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).and_modify(|n| *n += 1).or_insert(0);
            table = format!("{name}[{n}]");
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            let name = name.trim();
            // A sub-table of an array element, e.g. [peers.budget] after [[peers]].
            let parent = arrays.keys().filter(|a| name.starts_with(&format!("{a}."))).max_by_key(|a| a.len()).cloned();
            table = match parent {
                Some(a) => format!("{a}[{}]{}", arrays[&a], &name[a.len()..]),
                None => name.to_string(),
            };
        }
    }
    let line = src[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.starts_with('['));
    match (table.is_empty(), key) {
        (_, Some(k)) if !k.is_empty() && !table.is_empty() => format!("{table}.{k}"),
        (_, Some(k)) if !k.is_empty() => k.to_string(),
        _ => table,
    }
}

/// A syntax error: where it is, what is wrong, and the file's line as written (never a
/// fragment of a parsed value).
fn syntax_error(file: &str, src: &str, offset: usize, message: &str) -> TeamError {
    let (line, col) = line_col(src, offset);
    let text = src.lines().nth(line - 1).unwrap_or("");
    let shown: String = text.chars().take(120).collect();
    let more = if text.chars().count() > 120 { " …" } else { "" };
    let message = message.trim().replace('\n', " ");
    TeamError {
        file: file.into(),
        line,
        col,
        key: String::new(),
        message: format!(
            "invalid TOML: {message}\n    {line} | {shown}{more}\n    {}^",
            " ".repeat(line.to_string().len() + 3 + col - 1)
        ),
    }
}

fn choices<I: IntoIterator<Item = S>, S: fmt::Display>(it: I) -> String {
    let v: Vec<String> = it.into_iter().map(|s| format!("`{s}`")).collect();
    if v.is_empty() { "(none defined)".into() } else { v.join(", ") }
}

/// Parse and validate a team file. `file` is the name used in error messages.
///
/// Every problem is reported at once: syntax errors (each quoting its line), then the
/// structural check against the schema (unknown keys, types, ranges, choices, missing
/// keys; see [`schema`]) and the checks that need the whole file (peer and model
/// references, roles, tasks, API-key variables).
pub fn parse_team(file: &str, src: &str, env: &dyn PlanEnv) -> Result<TeamPlan, TeamErrors> {
    let (mut doc, syntax) = toml::de::DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        let errors = syntax.iter().map(|e| syntax_error(file, src, e.span().map_or(0, |s| s.start), e.message()));
        return Err(TeamErrors(errors.collect()));
    }
    let problems = schema::check_document(&mut doc, schema::cached());
    let mut errors: Vec<TeamError> = problems
        .into_iter()
        .map(|p| {
            let (line, col) = line_col(src, p.at);
            TeamError { file: file.into(), line, col, key: p.key, message: p.message }
        })
        .collect();
    let raw = match RawTeam::deserialize(toml::de::Deserializer::from(doc)) {
        Ok(r) => r,
        Err(_) if !errors.is_empty() => {
            errors.sort_by_key(|e| (e.line, e.col));
            return Err(TeamErrors(errors));
        }
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, col) = line_col(src, offset);
            let key = key_path_at(src, offset);
            let message = e.message().trim().replace('\n', " ");
            return Err(TeamErrors(vec![TeamError { file: file.into(), line, col, key, message }]));
        }
    };
    let structural = errors.len();
    let mut cx = Ctx { file, src, errors };

    // Models.
    let mut models = BTreeMap::new();
    for (key, m) in raw.models {
        let span = m.span();
        let m = m.into_inner();
        if let Some(spec) = validate_model(&mut cx, &key, span.start, m, env) {
            models.insert(key, spec);
        }
    }

    // Tools.
    let declared_tools: Vec<String> = raw.tools.keys().cloned().collect();
    let raw_peer_ids: Vec<PeerId> = raw.peers.iter().map(|p| PeerId::from(p.get_ref().id.get_ref().trim())).collect();
    let tools = tools::validate_tools(&mut cx, raw.tools, &raw_peer_ids, env);
    let conversation = raw.protocol.as_ref().is_some_and(|p| p.get_ref().kind.get_ref() == "conversation");

    // Peers.
    let mut peers = Vec::new();
    let mut ids = BTreeSet::new();
    if raw.peers.is_empty() {
        cx.err_at(src.len(), "peers", "a team needs at least one [[peers]] entry");
    }
    for (i, p) in raw.peers.into_iter().enumerate() {
        let peer_at = p.span().start;
        let p = p.into_inner();
        let id = p.id.get_ref().trim().to_string();
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && id != "user"
            && id != "*";
        if !id_ok {
            cx.err_at(
                p.id.span().start,
                format!("peers[{i}].id"),
                format!("peer id {id:?} must be 1-64 letters, digits, '-' or '_' (and not `user`)"),
            );
        } else if !ids.insert(id.clone()) {
            cx.err_at(p.id.span().start, format!("peers[{i}].id"), format!("peer id `{id}` is used twice"));
        }
        let kind = match p.kind.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("model") => PeerKind::Model,
            Some("human") => PeerKind::Human,
            Some(other) => {
                let at = p.kind.as_ref().map_or(0, |k| k.span().start);
                cx.err_at(at, format!("peers[{i}].kind"), format!("unknown peer kind `{other}`; valid: model, human"));
                PeerKind::Model
            }
        };
        let model = match (&p.model, kind) {
            (Some(m), PeerKind::Model) => {
                let model = m.get_ref().clone();
                if !models.contains_key(&model)
                    && !cx.errors.iter().any(|e| e.key.starts_with(&format!("models.{model}")))
                {
                    let defined = choices(models.keys());
                    cx.err_at(
                        m.span().start,
                        format!("peers[{i}].model"),
                        format!("unknown model `{model}`; defined models: {defined}"),
                    );
                }
                model
            }
            (None, PeerKind::Model) => {
                let defined = choices(models.keys());
                cx.err_at(
                    peer_at,
                    format!("peers[{i}].model"),
                    format!(
                        "missing `model`: name a [models.NAME] table (defined: {defined}), or set kind = \"human\""
                    ),
                );
                String::new()
            }
            (_, PeerKind::Human) => String::new(),
        };
        if kind == PeerKind::Human {
            let person = |key: &str| {
                format!(
                    "`{key}` is for model peers; peer `{id}` is kind = \"human\" (a person answers for it): remove `{key}`"
                )
            };
            if let Some(m) = &p.model {
                cx.err_at(m.span().start, format!("peers[{i}].model"), person("model"));
            }
            if let Some(t) = &p.temperature {
                cx.err_at(t.span().start, format!("peers[{i}].temperature"), person("temperature"));
            }
            if let Some(a) = &p.agreement {
                cx.err_at(a.span().start, format!("peers[{i}].agreement"), person("agreement"));
            }
            if let Some(t) = p.tools.as_ref().and_then(|t| t.first()) {
                cx.err_at(
                    t.span().start,
                    format!("peers[{i}].tools"),
                    format!(
                        "peer `{id}` is kind = \"human\": a person does not call tools; grant them to a model peer"
                    ),
                );
            }
        } else if let Some(w) = &p.answer_within_secs {
            cx.err_at(
                w.span().start,
                format!("peers[{i}].answer_within_secs"),
                format!("`answer_within_secs` is for human peers (kind = \"human\"); peer `{id}` is a model peer (its model's `timeout_secs` bounds its calls)"),
            );
        }
        let answer_within_ms = if kind == PeerKind::Human {
            cx.real(p.answer_within_secs, &format!("peers[{i}].answer_within_secs"), ranges::SECS).map(ranges::millis)
        } else {
            None
        };
        if let Some(t) = &p.temperature
            && !(0.0..=2.0).contains(t.get_ref())
        {
            cx.err_at(t.span().start, format!("peers[{i}].temperature"), "temperature must be between 0.0 and 2.0");
        }
        if let Some(a) = &p.agreement
            && !(0.0..=1.0).contains(a.get_ref())
        {
            cx.err_at(a.span().start, format!("peers[{i}].agreement"), "agreement must be between 0.0 and 1.0");
        }
        let mut granted = Vec::new();
        for (j, name) in p.tools.iter().flatten().enumerate() {
            let key = format!("peers[{i}].tools[{j}]");
            let n = name.get_ref().as_str();
            if !tools::check_grant(&mut cx, name.span().start, &key, n, &tools, &declared_tools) {
                continue;
            }
            if let Some(b) = crate::tool::Builtin::parse(n)
                && !conversation
                && !matches!(b, crate::tool::Builtin::BoardRead | crate::tool::Builtin::BoardWrite)
            {
                cx.err_at(
                    name.span().start,
                    &key,
                    format!(
                        "the built-in `{n}` needs [protocol] kind = \"conversation\" (there the peers decide the flow); with other protocols only `board_read` and `board_write` may be granted"
                    ),
                );
                continue;
            }
            if granted.contains(&n.to_string()) {
                cx.err_at(name.span().start, &key, format!("tool `{n}` is granted twice"));
                continue;
            }
            granted.push(n.to_string());
        }
        if let Some(k) = &p.public_key
            && let Err(why) = crate::trust::PublicKey::parse(k.get_ref())
        {
            cx.err_at(k.span().start, format!("peers[{i}].public_key"), why);
        }
        let public_key = p.public_key.map(Spanned::into_inner);
        peers.push(PeerSpec {
            tools: granted,
            id: PeerId::from(id),
            persona: p.persona.unwrap_or_else(|| "You are a thoughtful member of a team.".into()),
            model,
            group: p.group,
            temperature: p.temperature.map(Spanned::into_inner),
            stance: p.stance,
            agreement: p.agreement.map(Spanned::into_inner),
            public_key,
            kind,
            answer_within_ms,
        });
    }
    let keyed = peers.iter().filter(|p| p.public_key.is_some()).count();
    if keyed > 0 && keyed < peers.len() {
        let missing: Vec<&str> = peers.iter().filter(|p| p.public_key.is_none()).map(|p| p.id.as_str()).collect();
        cx.err_at(
            src.len(),
            "peers",
            format!(
                "some peers have a public_key and {} do not: give every peer one (`roundtable keys new --peer ID`) or none",
                missing.join(", ")
            ),
        );
    }

    // Protocol.
    let peer_ids: Vec<PeerId> = peers.iter().map(|p| p.id.clone()).collect();
    let protocol = match raw.protocol {
        None => {
            cx.err_at(
                src.len(),
                "protocol",
                format!("missing [protocol] table; kind is one of {}", choices(ProtocolSpec::KINDS)),
            );
            None
        }
        Some(p) => protocols::validate_protocol(&mut cx, p.into_inner(), &peer_ids),
    };

    let context = match raw.context {
        None => ContextPolicy::Full,
        Some(c) => {
            let c = c.into_inner();
            let policy = c.policy.get_ref().as_str();
            let keys: &[&str] = match policy {
                "full" => &[],
                "last_k" => &["k"],
                "summary" => &["keep_rounds", "summarizer", "instruction"],
                _ => &["k", "keep_rounds", "summarizer", "instruction"],
            };
            let given = [
                ("k", c.k.as_ref().map(|x| x.span().start)),
                ("keep_rounds", c.keep_rounds.as_ref().map(|x| x.span().start)),
                ("summarizer", c.summarizer.as_ref().map(|x| x.span().start)),
                ("instruction", c.instruction.as_ref().map(|x| x.span().start)),
            ];
            for (key, at) in given {
                if let Some(at) = at
                    && !keys.contains(&key)
                {
                    let valid = if keys.is_empty() { "none".to_string() } else { choices(keys) };
                    cx.err_at(
                        at,
                        format!("context.{key}"),
                        format!("`{key}` does not apply to policy `{policy}`; its keys: {valid}"),
                    );
                }
            }
            match policy {
                "full" => ContextPolicy::Full,
                "last_k" => ContextPolicy::LastK { k: cx.size(c.k, "context.k", ranges::CONTEXT).unwrap_or(6) },
                "summary" => {
                    let summarizer = c.summarizer.as_ref().and_then(|s| {
                        if peer_ids.iter().any(|p| p.as_str() == s.get_ref()) {
                            Some(PeerId::from(s.get_ref().as_str()))
                        } else {
                            cx.err_at(
                                s.span().start,
                                "context.summarizer",
                                format!("unknown peer `{}`; peers: {}", s.get_ref(), choices(&peer_ids)),
                            );
                            None
                        }
                    });
                    ContextPolicy::Summary {
                        keep_rounds: cx.count(c.keep_rounds, "context.keep_rounds", ranges::CONTEXT).unwrap_or(1),
                        summarizer,
                        instruction: c.instruction.map(Spanned::into_inner),
                    }
                }
                other => {
                    cx.err_at(
                        c.policy.span().start,
                        "context.policy",
                        format!("unknown context policy `{other}`; valid: {}", choices(ContextPolicy::KINDS)),
                    );
                    ContextPolicy::Full
                }
            }
        }
    };

    let budget = raw.budget.map_or_else(Budget::default, |b| {
        let pp = b.per_peer.unwrap_or_default();
        Budget {
            max_tokens: cx.count(b.max_tokens, "budget.max_tokens", ranges::COUNT),
            max_cost_usd: cx.real(b.max_cost_usd, "budget.max_cost_usd", ranges::USD),
            max_calls: cx.count(b.max_calls, "budget.max_calls", ranges::COUNT),
            max_wall_ms: cx.real(b.max_wall_secs, "budget.max_wall_secs", ranges::SECS).map(ranges::millis),
            max_tool_calls: cx.count(b.max_tool_calls, "budget.max_tool_calls", ranges::COUNT),
            max_tool_ms: cx.real(b.max_tool_secs, "budget.max_tool_secs", ranges::SECS).map(ranges::millis),
            per_peer: PeerBudget {
                max_tokens: cx.count(pp.max_tokens, "budget.per_peer.max_tokens", ranges::COUNT),
                max_cost_usd: cx.real(pp.max_cost_usd, "budget.per_peer.max_cost_usd", ranges::USD),
                max_calls: cx.count(pp.max_calls, "budget.per_peer.max_calls", ranges::COUNT),
                max_tool_calls: cx.count(pp.max_tool_calls, "budget.per_peer.max_tool_calls", ranges::COUNT),
            },
        }
    });
    let mut trust = TrustSpec::default();
    for (i, k) in raw.trust.map(|t| t.plan_signers).unwrap_or_default().into_iter().enumerate() {
        match crate::trust::PublicKey::parse(k.get_ref().trim()) {
            Ok(key) => trust.plan_signers.push(key.to_hex()),
            Err(why) => cx.err_at(k.span().start, format!("trust.plan_signers[{i}]"), why),
        }
    }
    let presence = raw.presence.map_or_else(PresenceSpec::default, |p| {
        let d = PresenceSpec::default();
        let after_at = p.absent_after_secs.as_ref().map(|a| a.span().start);
        let heartbeat = cx.real(p.heartbeat_secs, "presence.heartbeat_secs", ranges::PRESENCE_SECS);
        let after = cx.real(p.absent_after_secs, "presence.absent_after_secs", ranges::PRESENCE_SECS);
        let spec = PresenceSpec {
            heartbeat_ms: heartbeat.map_or(d.heartbeat_ms, ranges::millis),
            absent_after_ms: after.map_or(d.absent_after_ms, ranges::millis),
        };
        if let Some(at) = after_at
            && after.is_some()
            && spec.absent_after_ms <= spec.heartbeat_ms
        {
            cx.err_at(at, "presence.absent_after_secs", "absent_after_secs must be longer than heartbeat_secs");
        }
        spec
    });
    let termination = raw.termination.map_or_else(Termination::default, |t| t.into_termination(&mut cx, "termination"));

    if !cx.errors.is_empty() {
        // A key the structural check reported is not reported again by a later check.
        let reported: BTreeSet<String> = cx.errors[..structural].iter().map(|e| e.key.clone()).collect();
        let mut i = 0;
        cx.errors.retain(|e| {
            i += 1;
            i <= structural || !reported.contains(&e.key)
        });
        cx.errors.sort_by_key(|e| (e.line, e.col));
        return Err(TeamErrors(cx.errors));
    }
    Ok(TeamPlan {
        trust,
        name: raw.name.unwrap_or_else(|| file.rsplit('/').next().unwrap_or(file).trim_end_matches(".toml").to_string()),
        topic: raw.topic,
        models,
        peers,
        protocol: protocol.expect("no errors means a protocol"),
        termination,
        budget,
        context,
        presence,
        tools,
    })
}

fn validate_model(cx: &mut Ctx<'_>, key: &str, at: usize, m: RawModel, env: &dyn PlanEnv) -> Option<ModelSpec> {
    let path = format!("models.{key}");
    let before = cx.errors.len();
    let need = |cx: &mut Ctx<'_>, v: &Option<String>, field: &str, what: &str| {
        if v.as_deref().is_none_or(str::is_empty) {
            cx.err_at(at, format!("{path}.{field}"), format!("provider `{what}` needs `{field}`"));
        }
    };
    let check_key = |cx: &mut Ctx<'_>, k: &Option<Spanned<String>>| {
        if let Some(k) = k
            && !env.var_is_set(k.get_ref())
        {
            cx.err_at(
                    k.span().start,
                    format!("{path}.api_key_env"),
                    format!("environment variable `{}` is not set; export it with your API key (the key itself never goes in the team file)", k.get_ref()),
                );
        }
    };
    let provider = match m.provider {
        ProviderKind::Openai => {
            need(cx, &m.model, "model", "openai");
            check_key(cx, &m.api_key_env);
            ProviderSpec::Openai {
                model: m.model.clone().unwrap_or_default(),
                base_url: m.base_url.clone().unwrap_or_else(|| "https://api.openai.com/v1".into()),
                api_key_env: m.api_key_env.map(Spanned::into_inner),
                headers: m.headers,
                query: m.query,
            }
        }
        ProviderKind::Anthropic => {
            need(cx, &m.model, "model", "anthropic");
            check_key(cx, &m.api_key_env);
            ProviderSpec::Anthropic {
                model: m.model.clone().unwrap_or_default(),
                base_url: m.base_url.clone().unwrap_or_else(|| "https://api.anthropic.com".into()),
                api_key_env: m.api_key_env.map(Spanned::into_inner),
            }
        }
        ProviderKind::Scripted => {
            let mut replies = m.replies.unwrap_or_default();
            let mut per_peer = m.per_peer;
            let mut summary_replies = m.summary_replies.unwrap_or_default();
            if let Some(f) = &m.replies_file {
                match env.read(f.get_ref()) {
                    Ok(text) => match parse_replies_file(f.get_ref(), &text) {
                        Ok((r, p, sr)) => {
                            replies.extend(r);
                            summary_replies.extend(sr);
                            for (k, v) in p {
                                per_peer.entry(k).or_default().extend(v);
                            }
                        }
                        Err(e) => cx.err_at(f.span().start, format!("{path}.replies_file"), e),
                    },
                    Err(e) => cx.err_at(
                        f.span().start,
                        format!("{path}.replies_file"),
                        format!("cannot read {:?}: {e}", f.get_ref()),
                    ),
                }
            }
            if replies.is_empty() && per_peer.is_empty() && cx.errors.len() == before {
                cx.err_at(
                    at,
                    format!("{path}.replies"),
                    "a scripted model needs `replies`, `per_peer` or `replies_file`",
                );
            }
            let delay = cx.real(m.delay_secs, &format!("{path}.delay_secs"), ranges::SCRIPTED_DELAY_SECS);
            ProviderSpec::Scripted {
                replies,
                per_peer,
                summary_replies,
                cycle: m.cycle.unwrap_or(false),
                delay_ms: delay.map_or(0, ranges::millis),
            }
        }
        ProviderKind::Simulated => {
            let p = m.p_correct.unwrap_or(0.7);
            let s = m.susceptibility.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&p) {
                cx.err_at(at, format!("{path}.p_correct"), "p_correct must be between 0 and 1");
            }
            if !(0.0..=1.0).contains(&s) {
                cx.err_at(at, format!("{path}.susceptibility"), "susceptibility must be between 0 and 1");
            }
            ProviderSpec::Simulated { p_correct: p, susceptibility: s, seed: m.seed.unwrap_or(0) }
        }
        ProviderKind::Program => {
            let command = match &m.command {
                Some(c) if c.get_ref().first().is_some_and(|p| !p.trim().is_empty()) => {
                    if !env.program_exists(&c.get_ref()[0]) {
                        cx.err_at(
                            c.span().start,
                            format!("{path}.command"),
                            format!("program `{}` is not on PATH (or not an executable file)", c.get_ref()[0]),
                        );
                    }
                    c.get_ref().clone()
                }
                Some(c) => {
                    cx.err_at(
                        c.span().start,
                        format!("{path}.command"),
                        "command needs a program as its first element",
                    );
                    Vec::new()
                }
                None => {
                    cx.err_at(
                        at,
                        format!("{path}.command"),
                        "provider `program` needs `command` (program and arguments)",
                    );
                    Vec::new()
                }
            };
            ProviderSpec::Program { command, cwd: m.cwd.as_deref().map(|c| env.resolve(c)) }
        }
    };
    let timeout_ms = cx.real(m.timeout_secs, &format!("{path}.timeout_secs"), ranges::SECS).map(ranges::millis);
    let max_retries = cx.count(m.max_retries, &format!("{path}.max_retries"), ranges::RETRIES);
    let max_concurrency = cx.size(m.max_concurrency, &format!("{path}.max_concurrency"), ranges::CONCURRENCY);
    let max_tokens = cx.count(m.max_tokens, &format!("{path}.max_tokens"), ranges::ANSWER_TOKENS);
    let price = m.price.map(|p| {
        let (span, price) = (p.span(), p.into_inner());
        let at = |x| Some(Spanned::new(span.clone(), x));
        cx.real(at(price.prompt_per_mtok), &format!("{path}.price.prompt_per_mtok"), ranges::PRICE);
        cx.real(at(price.completion_per_mtok), &format!("{path}.price.completion_per_mtok"), ranges::PRICE);
        price
    });
    if cx.errors.len() > before {
        return None;
    }
    Some(ModelSpec {
        provider,
        timeout_ms: timeout_ms.unwrap_or(120_000),
        max_retries: max_retries.unwrap_or(3),
        max_concurrency: max_concurrency.unwrap_or(8),
        price: price.unwrap_or_default(),
        max_tokens,
    })
}

/// A replies file: TOML with `replies = [...]`, `summary_replies = [...]` and
/// `[per_peer]`, or plain text with replies separated by lines holding only `---`.
type Replies = (Vec<String>, BTreeMap<String, Vec<String>>, Vec<String>);
fn parse_replies_file(name: &str, text: &str) -> Result<Replies, String> {
    if name.ends_with(".toml") {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct F {
            #[serde(default)]
            replies: Vec<String>,
            #[serde(default)]
            per_peer: BTreeMap<String, Vec<String>>,
            #[serde(default)]
            summary_replies: Vec<String>,
        }
        let f: F = toml::from_str(text).map_err(|e| {
            let (l, c) = line_col(text, e.span().map_or(0, |s| s.start));
            format!("{name}:{l}:{c}: {}", e.message().trim())
        })?;
        Ok((f.replies, f.per_peer, f.summary_replies))
    } else {
        let replies: Vec<String> =
            text.split("\n---\n").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        Ok((replies, BTreeMap::new(), Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env(Vec<&'static str>);
    impl PlanEnv for Env {
        fn var_is_set(&self, name: &str) -> bool {
            self.0.contains(&name)
        }
        fn read(&self, path: &str) -> Result<String, String> {
            Err(format!("no such file {path}"))
        }
    }

    const GOOD: &str = r#"
name = "trio"
topic = "Design GET /orders"

[models.script]
provider = "scripted"
replies = ["a", "b"]

[models.gpt]
provider = "openai"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"

[[peers]]
id = "frontend"
model = "script"

[[peers]]
id = "backend"
model = "gpt"
temperature = 0.3

[protocol]
kind = "round_robin"
rounds = 2

[termination]
max_messages = 10
any = [{ text_mention = "AGREED" }]

[budget]
max_calls = 20
"#;

    #[test]
    fn good_file_becomes_a_plan() {
        let plan = parse_team("t.toml", GOOD, &Env(vec!["OPENAI_API_KEY"])).unwrap();
        assert_eq!(plan.name, "trio");
        assert_eq!(plan.peers.len(), 2);
        let ProtocolSpec::RoundRobin(rr) = &plan.protocol else { panic!("round robin") };
        assert_eq!(rr.order, vec![PeerId::from("frontend"), PeerId::from("backend")]);
        assert_eq!(
            plan.termination,
            Termination::Any(vec![
                Termination::MaxMessages(10),
                Termination::Any(vec![Termination::Any(vec![Termination::TextMention("AGREED".into())])])
            ])
        );
        assert_eq!(plan.budget.max_calls, Some(20));
        // The plan round-trips through JSON (it is stored in the task envelope).
        let j = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<TeamPlan>(&j).unwrap(), plan);
    }

    #[test]
    fn missing_key_variable_is_named() {
        let e = parse_team("t.toml", GOOD, &Env(vec![])).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        let e = &e.0[0];
        assert_eq!((e.line, e.key.as_str()), (12, "models.gpt.api_key_env"));
        assert!(e.message.contains("OPENAI_API_KEY"), "{}", e.message);
    }

    #[test]
    fn unknown_model_lists_the_defined_ones() {
        let src = GOOD.replace("model = \"script\"", "model = \"scirpt\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        let e = &e.0[0];
        assert_eq!(e.key, "peers[0].model");
        assert_eq!(e.line, 16);
        assert!(e.message.contains("`gpt`, `script`"), "{}", e.message);
        assert!(e.to_string().starts_with("t.toml:16:9: `peers[0].model`"), "{e}");
    }

    #[test]
    fn serde_errors_name_line_key_and_choices() {
        let src = GOOD.replace("provider = \"scripted\"", "provider = \"scriptd\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        let e = &e.0[0];
        assert_eq!((e.line, e.key.as_str()), (6, "models.script.provider"));
        assert!(e.message.contains("openai") && e.message.contains("simulated"), "{}", e.message);

        let src = GOOD.replace("temperature = 0.3", "temprature = 0.3");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        let e = &e.0[0];
        assert_eq!((e.line, e.key.as_str()), (21, "peers[1].temprature"));
        assert!(e.message.contains("temperature"), "{}", e.message);

        let e = parse_team("t.toml", "name = \"x\"\n[[peers]\n", &Env(vec![])).unwrap_err();
        assert_eq!(e.0[0].line, 2);
    }

    #[test]
    fn unknown_protocol_and_peer_references() {
        let src = GOOD.replace("kind = \"round_robin\"", "kind = \"round_robbin\"\nsummarizer = \"cfo\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        assert!(e.0.iter().any(|e| e.key == "protocol.kind" && e.message.contains("`round_robin`")), "{e}");
        let src = GOOD.replace("rounds = 2", "rounds = 2\nsummarizer = \"cfo\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        assert_eq!(e.0[0].key, "protocol.summarizer");
        assert!(e.0[0].message.contains("`backend`, `frontend`"), "{}", e.0[0].message);
    }

    #[test]
    fn duplicate_peer_ids_and_bad_values() {
        let src =
            GOOD.replace("id = \"backend\"", "id = \"frontend\"").replace("temperature = 0.3", "temperature = 7.0");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["peers[1].id", "peers[1].temperature"]);
    }

    #[test]
    fn key_paths() {
        let src = "[a]\nx = 1\n[[p]]\ny = 2\n[[p]]\nz = 3\n";
        assert_eq!(key_path_at(src, src.find("x").unwrap()), "a.x");
        assert_eq!(key_path_at(src, src.find("y").unwrap()), "p[0].y");
        assert_eq!(key_path_at(src, src.find("z").unwrap()), "p[1].z");
    }

    const TRIO: &str = "[models.s]\nprovider = \"simulated\"\n[[peers]]\nid = \"a\"\nmodel = \"s\"\n[[peers]]\nid = \"b\"\nmodel = \"s\"\n[[peers]]\nid = \"c\"\nmodel = \"s\"\n";

    fn errors(protocol: &str) -> Vec<TeamError> {
        let src = format!("{TRIO}[protocol]\n{protocol}\n");
        parse_team("t.toml", &src, &Env(vec![])).expect_err("invalid").0
    }

    #[test]
    fn nonsense_in_the_keys_of_people_approvals_and_slow_scripts_is_refused_by_key() {
        let team = |peers: &str, extra: &str| {
            format!(
                "topic = \"t\"\n[models.s]\nprovider = \"scripted\"\nreplies = [\"x\"]\n{extra}\n\
                 [[peers]]\nid = \"a\"\nmodel = \"s\"\n{peers}[protocol]\nkind = \"round_robin\"\n"
            )
        };
        let keys = |src: String| -> Vec<String> {
            parse_team("t.toml", &src, &Env(vec![])).expect_err("refused").0.into_iter().map(|e| e.key).collect()
        };
        for bad in ["-1", "nan", "0", "1e12"] {
            let src = team(&format!("[[peers]]\nid = \"p\"\nkind = \"human\"\nanswer_within_secs = {bad}\n"), "");
            assert_eq!(keys(src), ["peers[1].answer_within_secs"], "{bad}");
            let src = team("[[peers]]\nid = \"p\"\nkind = \"human\"\n", &format!("delay_secs = {bad}"));
            if bad != "0" {
                assert_eq!(keys(src), ["models.s.delay_secs"], "{bad}");
            }
        }
        // A person has no model, and an unknown kind is no kind.
        let src = team("[[peers]]\nid = \"p\"\nkind = \"human\"\nmodel = \"s\"\n", "");
        assert_eq!(keys(src), ["peers[1].model"]);
        let src = team("[[peers]]\nid = \"p\"\nkind = \"person\"\n", "");
        assert!(keys(src).contains(&"peers[1].kind".to_string()));
        // An approver who is not at the table.
        let src = team("", "") + "[tools.deploy]\nkind = \"command\"\ncommand = [\"true\"]\napprove_by = \"nobody\"\n";
        let e = parse_team("t.toml", &src, &Env(vec![])).expect_err("refused").0;
        assert!(e.iter().any(|e| e.key == "tools.deploy.approve_by" && e.message.contains("`a`")), "{e:?}");
    }

    #[test]
    fn every_protocol_kind_parses_with_its_defaults() {
        let with = |k: &str, extra: &str| {
            let src = format!("{TRIO}[protocol]\nkind = \"{k}\"\n{extra}\n");
            parse_team("t.toml", &src, &Env(vec![])).unwrap_or_else(|e| panic!("{k}: {e}"))
        };
        let ProtocolSpec::Debate(d) = with("debate", "").protocol else { panic!() };
        assert_eq!((d.members.len(), d.rounds, d.vote), (3, 2, VoteRule::Plurality), "Du et al.: N=3, R=2");
        let ProtocolSpec::ProposerCritic(pc) = with("proposer_critic", "").protocol else { panic!() };
        assert_eq!((pc.proposer.as_str(), pc.critics.len(), pc.satisfied_phrase.as_str()), ("a", 2, "SATISFIED"));
        let ProtocolSpec::Jury(j) = with("jury", "aggregation = \"approval\"").protocol else { panic!() };
        assert_eq!(j.rule, crate::protocol::answers::Rule::Approval { threshold: 0.6 });
        let ProtocolSpec::Consensus(c) = with("consensus", "").protocol else { panic!() };
        assert!((c.threshold - 2.0 / 3.0).abs() < 1e-9);
        let ProtocolSpec::Hybrid(h) = with("hybrid", "leader = \"c\"").protocol else { panic!() };
        assert_eq!((h.members.len(), h.deadlock_rounds, h.threshold), (2, 2, 1.0));
        with("judged_debate", "judge = \"c\"");
        with("emergent", "");
        with("adversarial", "advocate = \"b\"");
        with("blackboard", "[[protocol.sources]]\npeer = \"a\"\nreads = [\"task\"]\nwrites = \"notes\"");
        let w = with("work_queue", "[[protocol.tasks]]\nid = \"t\"\ndescription = \"x\"");
        assert_eq!(w.protocol.queue_config().unwrap().lease, std::time::Duration::from_secs(30));
        with(
            "contract_net",
            "capabilities = { a = [\"sql\"] }\n[[protocol.tasks]]\nid = \"t\"\ndescription = \"x\"\nneeds = [\"sql\"]",
        );
        let ProtocolSpec::Conversation(cv) = with("conversation", "").protocol else { panic!() };
        assert_eq!((cv.start.len(), cv.finish.clone(), cv.max_turns), (0, FinishRule::Any, 10));
        let ProtocolSpec::Conversation(cv) = with("conversation", "start = [\"b\"]\nfinish = \"c\"").protocol else {
            panic!()
        };
        assert_eq!((cv.start, cv.finish), (vec![PeerId::from("b")], FinishRule::Peer("c".into())));
        assert_eq!(ProtocolSpec::KINDS.len(), 13);
        // A plan survives the trip through the task envelope.
        let plan = with("contract_net", "[[protocol.tasks]]\nid = \"t\"\ndescription = \"x\"");
        assert_eq!(serde_json::from_str::<TeamPlan>(&serde_json::to_string(&plan).unwrap()).unwrap(), plan);
    }

    #[test]
    fn a_key_of_another_protocol_names_the_kinds_keys() {
        let e = errors("kind = \"debate\"\njudge = \"a\"");
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].key.as_str()), (14, "protocol.judge"));
        assert!(
            e[0].message.contains("not a key of protocol `debate`")
                && e[0].message.contains("`rounds`, `members`, `vote`"),
            "{}",
            e[0].message
        );
        // A key no protocol has: named with the chosen kind's keys too.
        let e = errors("kind = \"jury\"\nrouns = 2");
        assert_eq!((e[0].line, e[0].key.as_str()), (14, "protocol.rouns"));
        assert!(e[0].message.contains("protocol `jury`") && e[0].message.contains("`aggregation`"), "{}", e[0].message);
        let e = errors("kind = \"voting\"");
        assert!(
            e[0].message.contains("unknown protocol `voting`") && e[0].message.contains("`jury`"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn protocol_values_roles_and_peers_are_checked() {
        let e = errors("kind = \"jury\"\naggregation = \"mean\"");
        assert_eq!(e[0].key, "protocol.aggregation");
        assert!(e[0].message.contains("`plurality`, `approval`, `confidence`"), "{}", e[0].message);
        let e = errors("kind = \"jury\"\nthreshold = 0.5");
        assert!(e[0].message.contains("applies to aggregation = \"approval\" only"), "{}", e[0].message);
        let e = errors("kind = \"adversarial\"");
        assert_eq!(e[0].key, "protocol.advocate");
        assert!(
            e[0].message.contains("needs `advocate`") && e[0].message.contains("`a`, `b`, `c`"),
            "{}",
            e[0].message
        );
        let e = errors("kind = \"judged_debate\"\njudge = \"z\"");
        assert_eq!((e[0].line, e[0].key.as_str()), (14, "protocol.judge"));
        assert!(e[0].message.contains("unknown peer `z`"), "{}", e[0].message);
        let e = errors("kind = \"debate\"\nrounds = 0");
        assert_eq!(e[0].key, "protocol.rounds");
        let e = errors("kind = \"consensus\"\nthreshold = 1.5");
        assert_eq!(e[0].key, "protocol.threshold");
        let e = errors("kind = \"proposer_critic\"\nproposer = \"a\"\ncritics = [\"a\"]");
        assert!(e[0].message.contains("cannot also be a critic"), "{}", e[0].message);
    }

    #[test]
    fn tasks_and_sources_are_checked() {
        let e = errors(
            "kind = \"work_queue\"\n[[protocol.tasks]]\nid = \"a\"\ndescription = \"x\"\ndepends_on = [\"b\"]\n[[protocol.tasks]]\nid = \"b\"\ndescription = \"y\"\ndepends_on = [\"a\"]",
        );
        assert!(e.iter().any(|e| e.message.contains("cycle")), "{e:?}");
        let e =
            errors("kind = \"work_queue\"\n[[protocol.tasks]]\nid = \"a\"\ndescription = \"x\"\ndepends_on = [\"zz\"]");
        assert_eq!((e[0].line, e[0].key.as_str()), (17, "protocol.tasks[0].depends_on"));
        let e = errors("kind = \"work_queue\"");
        assert!(e[0].message.contains("[[protocol.tasks]]"), "{}", e[0].message);
        let e =
            errors("kind = \"blackboard\"\n[[protocol.sources]]\npeer = \"a\"\nreads = [\"plan\"]\nwrites = \"notes\"");
        assert_eq!(e[0].key, "protocol.sources[0].reads");
        assert!(
            e[0].message.contains("no source writes `plan`") && e[0].message.contains("`notes`, `task`"),
            "{}",
            e[0].message
        );
        let e = errors("kind = \"blackboard\"\n[[protocol.sources]]\npeer = \"a\"\nwrites = \"bad key!\"");
        assert!(e[0].message.contains("letters, digits"), "{}", e[0].message);
        let e = errors("kind = \"blackboard\"\n[[protocol.sources]]\npeer = \"a\"\nwrite = \"x\"");
        assert_eq!(e[0].key, "protocol.sources[0].write");
        assert!(e[0].message.contains("`writes`"), "{}", e[0].message);
    }

    #[test]
    fn context_policies_and_their_keys() {
        let ok = |ctx: &str| {
            parse_team("t.toml", &format!("{TRIO}[protocol]\nkind = \"debate\"\n[context]\n{ctx}\n"), &Env(vec![]))
        };
        assert_eq!(
            ok("policy = \"summary\"\nsummarizer = \"b\"").unwrap().context,
            ContextPolicy::Summary { keep_rounds: 1, summarizer: Some(PeerId::from("b")), instruction: None }
        );
        let e = ok("policy = \"full\"\nk = 3").unwrap_err().0;
        assert_eq!((e[0].line, e[0].key.as_str()), (16, "context.k"));
        assert!(e[0].message.contains("does not apply to policy `full`"), "{}", e[0].message);
        let e = ok("policy = \"summary\"\nsummarizer = \"zed\"").unwrap_err().0;
        assert_eq!(e[0].key, "context.summarizer");
        let e = ok("policy = \"sumary\"").unwrap_err().0;
        assert!(e[0].message.contains("`full`, `last_k`, `summary`"), "{}", e[0].message);
        let src = format!("{TRIO}[protocol]\nkind = \"debate\"\n")
            .replace("id = \"a\"\nmodel = \"s\"", "id = \"a\"\nmodel = \"s\"\nagreement = 1.5");
        let e = parse_team("t.toml", &src, &Env(vec![])).unwrap_err().0;
        assert_eq!(e[0].key, "peers[0].agreement");
    }

    #[test]
    fn every_unknown_key_at_once_with_a_guess() {
        let src = GOOD
            .replace("rounds = 2", "round = 2")
            .replace("max_messages = 10", "max_mesages = 10")
            .replace("max_calls = 20", "max_calls = 20\nmax_cost = 1.0");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err().0;
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["protocol.round", "termination.max_mesages", "budget.max_cost"], "{e:?}");
        assert!(e[0].message.contains("did you mean `rounds`?") && e[0].message.contains("protocol `round_robin`"));
        assert!(e[1].message.contains("did you mean `max_messages`?"), "{}", e[1].message);
        assert!(e[2].message.contains("did you mean `max_cost_usd`?"), "{}", e[2].message);
        // A misspelled key and a problem only the whole file shows come in one run.
        let src = src.replace("model = \"script\"", "model = \"scirpt\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err().0;
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|e| e.key == "peers[0].model" && e.message.contains("unknown model `scirpt`")));
    }

    #[test]
    fn ranges_types_and_nan_come_from_the_schema() {
        let src = GOOD.replace("temperature = 0.3", "temperature = nan").replace("max_calls = 20", "max_calls = -1");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err().0;
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].key, "peers[1].temperature");
        assert!(e[0].message.contains("not a finite number; valid 0 to 2"), "{}", e[0].message);
        assert_eq!(e[1].key, "budget.max_calls");
        assert!(e[1].message.contains("valid 1 to 1000000000000"), "{}", e[1].message);
        let src = GOOD.replace("rounds = 2", "rounds = \"two\"");
        let e = parse_team("t.toml", &src, &Env(vec!["OPENAI_API_KEY"])).unwrap_err().0;
        assert_eq!(
            (e[0].key.as_str(), e[0].message.as_str()),
            ("protocol.rounds", "expected an integer, found a string")
        );
        let e =
            parse_team("t.toml", "[[peers]]\nid = \"a\"\n[protocol]\nkind = \"debate\"\n", &Env(vec![])).unwrap_err().0;
        assert_eq!((e[0].key.as_str(), e[0].line), ("peers[0].model", 1), "{e:?}");
    }

    #[test]
    fn a_syntax_error_quotes_the_files_line() {
        let src = "[models.m]\nprovider = \"scripted\"\nper_peer.a = ['{\"approve\": false, \"reason\": \"SQL: username' \"x\"]\n";
        let e = parse_team("t.toml", src, &Env(vec![])).unwrap_err().0;
        assert_eq!((e[0].line, e[0].key.as_str()), (3, ""), "{e:?}");
        assert!(e[0].message.starts_with("invalid TOML: "), "{}", e[0].message);
        assert!(e[0].message.contains("3 | per_peer.a = ['{\"approve\""), "{}", e[0].message);
        assert!(!e[0].to_string().contains("`models.m.per_peer"), "{}", e[0]);
    }

    #[test]
    fn the_schema_knows_every_key_the_validator_reads() {
        let s = team_schema();
        let props = |d: &str| -> Vec<String> {
            s["definitions"][d]["properties"].as_object().unwrap().keys().cloned().collect()
        };
        let protocol = props("RawProtocol");
        for kind in ProtocolSpec::KINDS {
            for key in ProtocolSpec::keys(kind).unwrap() {
                assert!(protocol.contains(&key.to_string()), "{kind}.{key}");
            }
        }
        assert!(props("RawPeer").contains(&"group".to_string()));
        assert_eq!(s["definitions"]["RawPeer"]["properties"]["temperature"]["maximum"], 2.0);
        assert_eq!(
            s["definitions"]["RawContext"]["properties"]["policy"]["enum"],
            serde_json::json!(ContextPolicy::KINDS)
        );
        assert_eq!(
            s["definitions"]["RawProtocol"]["properties"]["kind"]["enum"],
            serde_json::json!(ProtocolSpec::KINDS)
        );
    }

    #[test]
    fn documented_round_defaults_are_the_validators() {
        let s = team_schema();
        let d = s["definitions"]["RawProtocol"]["properties"]["rounds"]["x-defaults"].as_object().unwrap().clone();
        for (kind, n) in d {
            let extra = match kind.as_str() {
                "judged_debate" => "judge = \"c\"",
                "adversarial" => "advocate = \"b\"",
                _ => "",
            };
            let src = format!("{TRIO}[protocol]\nkind = \"{kind}\"\n{extra}\n");
            let plan = parse_team("t.toml", &src, &Env(vec![])).unwrap();
            let rounds = serde_json::to_value(&plan.protocol).unwrap()["rounds"].clone();
            assert_eq!(rounds, n, "{kind}");
        }
    }

    /// One value of the file replaced: the error it gives, as (line, key, message).
    fn refused(src: &str) -> Vec<(usize, String, String)> {
        let e = parse_team("t.toml", src, &Env(vec![])).expect_err("out of range");
        e.0.into_iter().map(|e| (e.line, e.key, e.message)).collect()
    }

    #[test]
    fn issue_12_every_number_has_a_range_named_with_file_line_and_key() {
        let debate = format!("{TRIO}[protocol]\nkind = \"debate\"\n");
        // (the line to add to a table, its table, the key the error must name, the range's text)
        let cases: &[(&str, &str, &str, &str)] = &[
            ("max_concurrency = 18446744073709551615", "models.s", "models.s.max_concurrency", "1 to 1024"),
            ("max_concurrency = 0", "models.s", "models.s.max_concurrency", "1 to 1024"),
            ("timeout_secs = -1.0", "models.s", "models.s.timeout_secs", "0.001 to 604800"),
            ("timeout_secs = nan", "models.s", "models.s.timeout_secs", "0.001 to 604800"),
            ("timeout_secs = inf", "models.s", "models.s.timeout_secs", "0.001 to 604800"),
            ("max_retries = 1000", "models.s", "models.s.max_retries", "0 to 100"),
            ("max_tokens = 0", "models.s", "models.s.max_tokens", "1 to 10000000"),
            (
                "price = { prompt_per_mtok = 1.0, completion_per_mtok = nan }",
                "models.s",
                "models.s.price.completion_per_mtok",
                "0 to 100000",
            ),
            (
                "price = { prompt_per_mtok = -1.0, completion_per_mtok = 1.0 }",
                "models.s",
                "models.s.price.prompt_per_mtok",
                "0 to 100000",
            ),
            ("timeout_secs = -5.0", "termination", "termination.timeout_secs", "0.001 to 604800"),
            ("timeout_secs = nan", "termination", "termination.timeout_secs", "0.001 to 604800"),
            ("confidence = 5.0", "termination", "termination.confidence", "0 to 1"),
            ("convergence = -3.0", "termination", "termination.convergence", "0 to 1"),
            ("max_rounds = 0", "termination", "termination.max_rounds", "1 to 10000"),
            ("cost_budget = -1.0", "termination", "termination.cost_budget", "0.000001 to 1000000"),
            ("text_mention = \"\"", "termination", "termination.text_mention", "must not be empty"),
            ("any = [{ confidence = nan }]", "termination", "termination.any[0].confidence", "0 to 1"),
            ("max_cost_usd = -2.0", "budget", "budget.max_cost_usd", "0.000001 to 1000000"),
            ("max_wall_secs = nan", "budget", "budget.max_wall_secs", "0.001 to 604800"),
            ("max_tokens = 0", "budget", "budget.max_tokens", "1 to 1000000000000"),
            ("heartbeat_secs = -1.0", "presence", "presence.heartbeat_secs", "0.01 to 86400"),
            ("k = 0\npolicy = \"last_k\"", "context", "context.k", "1 to 10000"),
            ("keep_rounds = 0\npolicy = \"summary\"", "context", "context.keep_rounds", "1 to 10000"),
        ];
        for (line, table, key, range) in cases {
            let src = if table.starts_with("models.") {
                debate.replace("provider = \"simulated\"\n", &format!("provider = \"simulated\"\n{line}\n"))
            } else {
                format!("{debate}[{table}]\n{line}\n")
            };
            let want = src.lines().position(|l| l == line.lines().next().unwrap()).unwrap() + 1;
            let e = refused(&src);
            assert!(
                e.iter().any(|(l, k, m)| *l == want && k == key && m.contains(range)),
                "{line}: expected line {want} `{key}` with {range:?}, got {e:?}"
            );
        }
        // The values that would run for ever or never stop.
        let e = refused(&format!("{TRIO}[protocol]\nkind = \"round_robin\"\nrounds = 4294967295\n"));
        assert_eq!((e[0].0, e[0].1.as_str()), (14, "protocol.rounds"), "{e:?}");
        assert!(e[0].2.contains("1 to 10000"), "{e:?}");
        let e = refused(&format!(
            "{TRIO}[presence]\nheartbeat_secs = 2.0\nabsent_after_secs = 1.0\n[protocol]\nkind = \"debate\"\n"
        ));
        assert_eq!(e[0].1, "presence.absent_after_secs", "{e:?}");
        // And the edges of each range are valid.
        let ok = format!(
            "{}[termination]\nconfidence = 1.0\nconvergence = 0.0\nmax_rounds = 10000\n[budget]\nmax_cost_usd = 0.5\n",
            debate.replace("provider = \"simulated\"\n", "provider = \"simulated\"\nmax_concurrency = 1024\ntimeout_secs = 0.001\nprice = { prompt_per_mtok = 0.0, completion_per_mtok = 100000.0 }\n")
        );
        let plan = parse_team("t.toml", &ok, &Env(vec![])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((plan.models["s"].max_concurrency, plan.models["s"].timeout_ms), (1024, 1));
    }

    #[test]
    fn issue_12_roles_that_would_silence_a_peer_are_refused() {
        // An order that repeats a peer: another never speaks.
        let e = errors("kind = \"round_robin\"\norder = [\"a\", \"b\", \"a\"]");
        assert_eq!((e[0].line, e[0].key.as_str()), (14, "protocol.order"), "{e:?}");
        assert!(e[0].message.contains("`a` is listed twice"), "{}", e[0].message);
        let e = errors("kind = \"consensus\"\nproposer = \"a\"\nvoters = [\"a\", \"b\"]");
        assert!(e[0].message.contains("cannot vote on its own proposal"), "{e:?}");
        let e = errors("kind = \"jury\"\nmembers = [\"a\"]");
        assert_eq!(e[0].key, "protocol.members", "{e:?}");
        assert!(e[0].message.contains("at least 2"), "{}", e[0].message);
        // A debate of one is defined: one answer (the single-agent baseline), one round.
        let e = errors("kind = \"debate\"\nmembers = [\"a\"]\nrounds = 3");
        assert_eq!((e[0].line, e[0].key.as_str()), (15, "protocol.rounds"), "{e:?}");
        assert!(e[0].message.contains("rounds must be 1"), "{}", e[0].message);
        parse_team(
            "t.toml",
            &format!("{TRIO}[protocol]\nkind = \"debate\"\nmembers = [\"a\"]\nrounds = 1\n"),
            &Env(vec![]),
        )
        .expect("a debate of one, one round");
        let e = errors("kind = \"work_queue\"\nlease_secs = nan\n[[protocol.tasks]]\nid = \"t\"\ndescription = \"x\"");
        assert_eq!(e[0].key, "protocol.lease_secs", "{e:?}");
        let e = errors("kind = \"blackboard\"\nmax_writes = 0\n[[protocol.sources]]\npeer = \"a\"\nwrites = \"x\"");
        assert_eq!((e[0].line, e[0].key.as_str()), (14, "protocol.max_writes"), "{e:?}");
    }

    #[test]
    fn issue_12_a_valid_plan_is_always_writable_and_reads_back_the_same() {
        // What validation accepts, the task envelope can hold: no NaN becomes `null`.
        let src = format!(
            "{}[termination]\nconfidence = 0.5\ntimeout_secs = 3.5\n[budget]\nmax_cost_usd = 0.25\n",
            TRIO.replace(
                "provider = \"simulated\"\n",
                "provider = \"simulated\"\nprice = { prompt_per_mtok = 0.15, completion_per_mtok = 0.6 }\n"
            )
        ) + "[protocol]\nkind = \"debate\"\n";
        let plan = parse_team("t.toml", &src, &Env(vec![])).unwrap();
        let back: TeamPlan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!(back, plan);
    }
}
