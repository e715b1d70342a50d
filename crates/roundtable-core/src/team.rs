//! Team files: a raw TOML file becomes a validated [`TeamPlan`] before anything runs.
//!
//! Every error names the file, the line and column, the key, and where there is a fixed
//! set of valid values, the choices. All errors are reported at once. The plan is
//! serializable: it is stored in the session's task envelope, so a session resumes from
//! its log alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::envelope::PeerId;
use crate::model::Price;
use crate::termination::{Budget, PeerBudget, Termination};

mod protocols;
pub mod tools;
pub use protocols::*;

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
    /// Read a file named in the team file, relative to the team file's directory.
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
}

impl PeerSpec {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
    #[serde(default)]
    peers: Vec<Spanned<RawPeer>>,
    protocol: Option<Spanned<protocols::RawProtocol>>,
    termination: Option<RawTermination>,
    budget: Option<RawBudget>,
    context: Option<Spanned<RawContext>>,
    presence: Option<RawPresence>,
    #[serde(default)]
    tools: BTreeMap<String, Spanned<tools::RawTool>>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum ProviderKind {
    Openai,
    Anthropic,
    Scripted,
    Simulated,
    Program,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: ProviderKind,
    model: Option<String>,
    base_url: Option<String>,
    api_key_env: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
    timeout_secs: Option<f64>,
    max_retries: Option<u32>,
    max_concurrency: Option<usize>,
    max_tokens: Option<u32>,
    price: Option<Price>,
    // scripted
    replies: Option<Vec<String>>,
    #[serde(default)]
    per_peer: BTreeMap<String, Vec<String>>,
    replies_file: Option<Spanned<String>>,
    // simulated
    p_correct: Option<f64>,
    susceptibility: Option<f64>,
    seed: Option<u64>,
    // program
    command: Option<Spanned<Vec<String>>>,
    cwd: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: Spanned<String>,
    persona: Option<String>,
    model: Spanned<String>,
    group: Option<String>,
    temperature: Option<Spanned<f32>>,
    stance: Option<String>,
    agreement: Option<Spanned<f32>>,
    tools: Option<Vec<Spanned<String>>>,
    public_key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTermination {
    max_rounds: Option<u32>,
    max_messages: Option<u64>,
    token_budget: Option<u64>,
    cost_budget: Option<f64>,
    max_calls: Option<u64>,
    timeout_secs: Option<f64>,
    text_mention: Option<String>,
    judge_verdict: Option<bool>,
    confidence: Option<f64>,
    convergence: Option<f64>,
    consensus_reached: Option<bool>,
    no_progress: Option<u32>,
    any: Option<Vec<RawTermination>>,
    all: Option<Vec<RawTermination>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
    max_calls: Option<u64>,
    max_wall_secs: Option<f64>,
    max_tool_calls: Option<u64>,
    max_tool_secs: Option<f64>,
    per_peer: Option<RawPeerBudget>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPeerBudget {
    max_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
    max_calls: Option<u64>,
    max_tool_calls: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContext {
    policy: Spanned<String>,
    k: Option<Spanned<usize>>,
    keep_rounds: Option<Spanned<u32>>,
    summarizer: Option<Spanned<String>>,
    instruction: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPresence {
    heartbeat_secs: Option<f64>,
    absent_after_secs: Option<f64>,
}

impl RawTermination {
    fn into_termination(self) -> Termination {
        let mut cs = Vec::new();
        if let Some(n) = self.max_rounds {
            cs.push(Termination::MaxRounds(n));
        }
        if let Some(n) = self.max_messages {
            cs.push(Termination::MaxMessages(n));
        }
        if let Some(n) = self.token_budget {
            cs.push(Termination::TokenBudget(n));
        }
        if let Some(c) = self.cost_budget {
            cs.push(Termination::CostBudget(c));
        }
        if let Some(n) = self.max_calls {
            cs.push(Termination::MaxCalls(n));
        }
        if let Some(s) = self.timeout_secs {
            cs.push(Termination::TimeoutMs((s * 1000.0) as u64));
        }
        if let Some(m) = self.text_mention {
            cs.push(Termination::TextMention(Arc::from(m)));
        }
        if self.judge_verdict == Some(true) {
            cs.push(Termination::JudgeVerdict);
        }
        if let Some(c) = self.confidence {
            cs.push(Termination::Confidence(c));
        }
        if let Some(c) = self.convergence {
            cs.push(Termination::Convergence(c));
        }
        if self.consensus_reached == Some(true) {
            cs.push(Termination::ConsensusReached);
        }
        if let Some(k) = self.no_progress {
            cs.push(Termination::NoProgress(k));
        }
        if let Some(any) = self.any {
            cs.push(Termination::Any(any.into_iter().map(RawTermination::into_termination).collect()));
        }
        if let Some(all) = self.all {
            cs.push(Termination::All(all.into_iter().map(RawTermination::into_termination).collect()));
        }
        Termination::Any(cs)
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

fn choices<I: IntoIterator<Item = S>, S: fmt::Display>(it: I) -> String {
    let v: Vec<String> = it.into_iter().map(|s| format!("`{s}`")).collect();
    if v.is_empty() { "(none defined)".into() } else { v.join(", ") }
}

/// Parse and validate a team file. `file` is the name used in error messages.
pub fn parse_team(file: &str, src: &str, env: &dyn PlanEnv) -> Result<TeamPlan, TeamErrors> {
    let raw: RawTeam = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, col) = line_col(src, offset);
            let key = key_path_at(src, offset);
            let mut message = e.message().trim().replace('\n', " ");
            // An unknown key of [protocol]: name the keys of the kind chosen, not the
            // union of every kind's keys.
            if let Some(name) = key.strip_prefix("protocol.").filter(|k| !k.contains(['.', '[']))
                && message.starts_with("unknown field")
                && let Some(kind) = protocols::kind_in(src)
            {
                message = match ProtocolSpec::keys(&kind) {
                    Some(keys) => format!(
                        "`{name}` is not a key of protocol `{kind}`; its keys: {}",
                        choices(std::iter::once(&"kind").chain(keys.iter()))
                    ),
                    None => format!("unknown protocol `{kind}`; valid: {}", choices(ProtocolSpec::KINDS)),
                };
            }
            return Err(TeamErrors(vec![TeamError { file: file.into(), line, col, key, message }]));
        }
    };
    let mut cx = Ctx { file, src, errors: Vec::new() };

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
        let model = p.model.get_ref().clone();
        if !models.contains_key(&model) && !cx.errors.iter().any(|e| e.key.starts_with(&format!("models.{model}"))) {
            let defined = choices(models.keys());
            cx.err_at(
                p.model.span().start,
                format!("peers[{i}].model"),
                format!("unknown model `{model}`; defined models: {defined}"),
            );
        }
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
                "last_k" => ContextPolicy::LastK { k: c.k.map_or(6, Spanned::into_inner).max(1) },
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
                        keep_rounds: c.keep_rounds.map_or(1, Spanned::into_inner),
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
            max_tokens: b.max_tokens,
            max_cost_usd: b.max_cost_usd,
            max_calls: b.max_calls,
            max_wall_ms: b.max_wall_secs.map(|s| (s * 1000.0) as u64),
            max_tool_calls: b.max_tool_calls,
            max_tool_ms: b.max_tool_secs.map(|s| (s * 1000.0) as u64),
            per_peer: PeerBudget {
                max_tokens: pp.max_tokens,
                max_cost_usd: pp.max_cost_usd,
                max_calls: pp.max_calls,
                max_tool_calls: pp.max_tool_calls,
            },
        }
    });
    let presence = raw.presence.map_or_else(PresenceSpec::default, |p| {
        let d = PresenceSpec::default();
        PresenceSpec {
            heartbeat_ms: p.heartbeat_secs.map_or(d.heartbeat_ms, |s| (s * 1000.0).max(10.0) as u64),
            absent_after_ms: p.absent_after_secs.map_or(d.absent_after_ms, |s| (s * 1000.0).max(50.0) as u64),
        }
    });

    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.col));
        return Err(TeamErrors(cx.errors));
    }
    Ok(TeamPlan {
        name: raw.name.unwrap_or_else(|| file.rsplit('/').next().unwrap_or(file).trim_end_matches(".toml").to_string()),
        topic: raw.topic,
        models,
        peers,
        protocol: protocol.expect("no errors means a protocol"),
        termination: raw.termination.map_or_else(Termination::default, RawTermination::into_termination),
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
            if let Some(f) = &m.replies_file {
                match env.read(f.get_ref()) {
                    Ok(text) => match parse_replies_file(f.get_ref(), &text) {
                        Ok((r, p)) => {
                            replies.extend(r);
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
            ProviderSpec::Scripted { replies, per_peer }
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
    if cx.errors.len() > before {
        return None;
    }
    Some(ModelSpec {
        provider,
        timeout_ms: m.timeout_secs.map_or(120_000, |s| (s * 1000.0) as u64),
        max_retries: m.max_retries.unwrap_or(3),
        max_concurrency: m.max_concurrency.unwrap_or(8).max(1),
        price: m.price.unwrap_or_default(),
        max_tokens: m.max_tokens,
    })
}

/// A replies file: TOML with `replies = [...]` and `[per_peer]`, or plain text with
/// replies separated by lines holding only `---`.
fn parse_replies_file(name: &str, text: &str) -> Result<(Vec<String>, BTreeMap<String, Vec<String>>), String> {
    if name.ends_with(".toml") {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct F {
            #[serde(default)]
            replies: Vec<String>,
            #[serde(default)]
            per_peer: BTreeMap<String, Vec<String>>,
        }
        let f: F = toml::from_str(text).map_err(|e| {
            let (l, c) = line_col(text, e.span().map_or(0, |s| s.start));
            format!("{name}:{l}:{c}: {}", e.message().trim())
        })?;
        Ok((f.replies, f.per_peer))
    } else {
        let replies: Vec<String> =
            text.split("\n---\n").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        Ok((replies, BTreeMap::new()))
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
}
