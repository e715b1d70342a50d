//! Replay: re-execute a session from its recorded model outputs, with no model calls,
//! and check that every protocol decision comes out the same.
//!
//! # How
//! The session's peers run for real (`run_peer`, the same code as a live session) on a
//! fresh in-memory log that starts with the recorded task envelope. Each peer's model is
//! a [`ReplayModel`] that answers a call for `(peer, step)` with what the log recorded
//! for that step: the text and usage, or the recorded error. Everything else — whose turn
//! it is, what each peer is asked, votes, tallies, the stop — is decided again by the
//! reducers.
//!
//! # Inputs that are not model outputs
//! Some decisions depend on the outside world and are recorded rather than re-derived:
//! the clock (a `timeout` or wall-time budget stop), liveness (an `absent` notice) and
//! what an MCP server listed when it started (a `tool_list`: replay starts no server,
//! and offers the models the listed tools).
//! Replay removes the clock conditions from the plan and feeds the recorded envelopes in
//! at the same place in the log. The work queue is an input too: each claim hands the
//! claimer the task the log says it claimed, when the log says so. The blackboard is a
//! fresh one: writes happen in the recorded order, so the same writes win.
//!
//! A commit-reveal vote's answer is sealed with the juror's secret, which is never on
//! the log; the replayed juror commits to the answer its recorded reveal shows, under a
//! secret of the replay's own, so the commitment, seal and salt (derived from the
//! secret) differ and are not compared, while the revealed answers and the tally are.
//! A similarity measured with an embedder is not reproducible without that embedder;
//! replay runs without one, as the CLI does.
//!
//! # Order
//! The log's order is part of the truth: a reducer may legitimately decide differently
//! when two independent envelopes (two simultaneous debaters' answers, a late message
//! and a close-of-round decision) land the other way round. So replay reproduces the
//! recorded order: a model call returns its recorded answer, and an envelope the
//! original log has is appended, only once every envelope before it in the original is
//! on the replay log. Envelopes the original does not have are held back and reported.
//!
//! # What must match
//! Envelopes are matched by `(peer, step)` (by step alone for collective decisions,
//! which any peer may record), and must agree on kind, recipient, text, JSON, causal
//! parents (as a set) and usage (model, tokens, cost, calls). The stop must agree on its
//! reason, answer and the envelopes it was decided by. Incidental differences are
//! ignored: timestamps, latency, Lamport clocks, trace context, which peer won the race
//! to record a collective decision, the running totals in the stop's JSON (computed
//! from whatever the recording peer had folded), envelopes that landed after the stop in
//! the original (a straggler the replay's peers did not get to before they saw the
//! stop), and the `round` stamped on an envelope: it is the round the peer's state
//! showed when it took up the duty, which for protocols whose rounds advance with
//! concurrent work (contract net counts resolved tasks) depends on how much of the log
//! the peer had folded by then, while the step — which names the protocol position — is
//! part of the match.
//!
//! The first divergence is reported with what was expected and what came out, which
//! exposes non-determinism (a reducer reading the clock, a random draw, a hash map's
//! order) or a behaviour change between the recording build and this one.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use roundtable_core::log::{Appended, Entry, EntryStream, LogError, LogErrorKind, MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind};
use roundtable_core::peer::{PeerConfig, PeerExtras, run_peer_with};
use roundtable_core::session::plan_of;
use roundtable_core::team::TeamPlan;
use roundtable_core::termination::Termination;
use roundtable_core::tool::{
    Builtin, Tool, ToolBox, ToolCall, ToolCallBody, ToolContext, ToolDef, ToolKind, ToolListBody, ToolOutput,
    ToolResultBody,
};
use roundtable_core::workqueue::{Claim, DeadLetter, QueueConfig, QueueError, QueueStats, WorkQueue};
use roundtable_core::{Envelope, EnvelopeId, Kind, PeerId, SessionId};
use serde::Serialize;
use tokio::sync::watch;

/// How an envelope is matched between the original and the replay.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The producing peer, or `*` for a collective decision.
    pub peer: String,
    pub step: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.peer, self.step)
    }
}

/// The matching key of an envelope of `session`.
pub fn key_of(session: &SessionId, env: &Envelope) -> Key {
    let collective = env.id == EnvelopeId::derive(session, &PeerId::from("*"), &env.step);
    Key { peer: if collective { "*".into() } else { env.from.to_string() }, step: env.step.to_string() }
}

/// The first place where the replay differs from the recording.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Divergence {
    /// The envelope's place in the original log (for an envelope the original does not
    /// have: the place it would have taken).
    pub seq: u64,
    /// `peer@step` of the envelope.
    pub key: String,
    /// What differs: `missing`, `unexpected`, or a field (`text`, `kind`, `parents`, `stop
    /// reason`, …).
    pub field: String,
    pub expected: String,
    pub got: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // For people: the step with rounds counted from 1 (the JSON keeps the log's name).
        let key = match self.key.split_once('@') {
            Some((peer, step)) => format!("{peer}@{}", roundtable_core::readable::step(step)),
            None => self.key.clone(),
        };
        match self.field.as_str() {
            "missing" => {
                write!(f, "#{} {key}: the replay never produced it (expected {})", self.seq, self.expected)
            }
            "unexpected" => write!(
                f,
                "#{} {key}: the replay produced an envelope the recording does not have: {}",
                self.seq, self.got
            ),
            field => write!(
                f,
                "#{} {key}: {field} differs\n  recorded: {}\n  replayed: {}",
                self.seq, self.expected, self.got
            ),
        }
    }
}

/// What a replay found.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub session: String,
    /// Envelopes on the recorded log.
    pub recorded: usize,
    /// Envelopes on the replay log.
    pub replayed: usize,
    /// Recorded envelopes the replay reproduced identically.
    pub matched: usize,
    /// Model calls answered from the recording.
    pub model_calls: usize,
    /// Recorded envelopes fed in as inputs (absence notices, clock stops), by sequence.
    pub inputs: Vec<u64>,
    /// Recorded envelopes after the stop that the replay did not reproduce (harmless).
    pub stragglers: Vec<u64>,
    /// Model calls the recording had no answer for (the replay's peers wanted to go on
    /// where the recording ended).
    pub unrecorded_calls: Vec<String>,
    pub stop_reason: Option<String>,
    pub divergence: Option<Divergence>,
}

impl ReplayReport {
    pub fn ok(&self) -> bool {
        self.divergence.is_none()
    }
}

/// Why a replay could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the log has no task envelope")]
    NoTask,
    #[error("{0}")]
    Plan(String),
    #[error("replay log: {0}")]
    Log(#[from] LogError),
}

/// Replay settings.
#[derive(Clone, Copy, Debug)]
pub struct ReplayOptions {
    /// How long the replay may sit with nothing happening before it is judged stalled
    /// (every recorded step is replayed long before this in practice).
    pub idle: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { idle: Duration::from_secs(3) }
    }
}

/// What the recording says a model call returned.
#[derive(Clone, Debug)]
enum Recorded {
    Answer(ChatResponse),
    Failed(ModelError),
}

const MODEL_ERROR_KINDS: [ModelErrorKind; 11] = [
    ModelErrorKind::Auth,
    ModelErrorKind::BadRequest,
    ModelErrorKind::RateLimited,
    ModelErrorKind::Server,
    ModelErrorKind::Timeout,
    ModelErrorKind::Transport,
    ModelErrorKind::Truncated,
    ModelErrorKind::Empty,
    ModelErrorKind::Malformed,
    ModelErrorKind::Config,
    ModelErrorKind::Budget,
];

fn recorded_output(env: &Envelope, reveals: &HashMap<&str, &str>) -> Option<Recorded> {
    let usage = env.usage.as_ref()?;
    if env.kind == Kind::Commit {
        // The sealed answer, as its reveal shows it.
        let text = reveals.get(env.id.as_str())?;
        return Some(Recorded::Answer(ChatResponse {
            text: text.to_string(),
            model: usage.model.to_string(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            finish_reason: None,
            tool_calls: Vec::new(),
        }));
    }
    if env.kind == Kind::Failure {
        let j = env.body.json.as_ref()?;
        let kind_text = j.get("error")?.as_str()?;
        let kind = MODEL_ERROR_KINDS.iter().copied().find(|k| k.to_string() == kind_text)?;
        let mut e = ModelError::new(kind, j.get("message").and_then(|m| m.as_str()).unwrap_or_default());
        e.status = j.get("status").and_then(serde_json::Value::as_u64).map(|s| s as u16);
        e.attempts = j.get("attempts").and_then(serde_json::Value::as_u64).map_or(1, |a| a as u32);
        Some(Recorded::Failed(e))
    } else {
        Some(Recorded::Answer(ChatResponse {
            text: env.body.text.to_string(),
            model: usage.model.to_string(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            finish_reason: None,
            tool_calls: Vec::new(),
        }))
    }
}

/// A model that answers from a session's recording, when everything before the answer
/// in the original log is on the replay log. A call the recording has no answer for
/// never returns (the replay notes it; a live model would have been needed).
pub struct ReplayModel {
    name: String,
    /// By peer, duty step and the model call's index within the duty (a duty working
    /// through tool calls makes several).
    answers: Arc<HashMap<(PeerId, String, usize), (Recorded, u64)>>,
    asked: Arc<Mutex<ReplayCalls>>,
    next_missing: watch::Receiver<u64>,
}

#[derive(Default)]
struct ReplayCalls {
    answered: usize,
    unrecorded: Vec<String>,
    /// Peers waiting in a call the recording has no answer for.
    parked: BTreeSet<PeerId>,
}

#[async_trait]
impl ChatModel for ReplayModel {
    fn name(&self) -> &str {
        &self.name
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        match self.answers.get(&(req.peer.clone(), req.step.to_string(), model_calls_before(req))) {
            Some((rec, seq)) => {
                let _ = self.next_missing.clone().wait_for(|&m| m >= *seq).await;
                self.asked.lock().expect("replay calls").answered += 1;
                match rec {
                    Recorded::Answer(r) => Ok(r.clone()),
                    Recorded::Failed(e) => Err(e.clone()),
                }
            }
            None => {
                {
                    let mut asked = self.asked.lock().expect("replay calls");
                    asked.unrecorded.push(format!("{}@{}", req.peer, req.step));
                    asked.parked.insert(req.peer.clone());
                }
                futures::future::pending().await
            }
        }
    }
}

/// How many model calls of this duty came before this one: one for each run of
/// assistant tool-call messages among this turn's tool messages.
fn model_calls_before(req: &ChatRequest) -> usize {
    let mut n = 0;
    let mut in_run = false;
    for m in &req.tool_turns {
        let calls = m.role == roundtable_core::model::Role::Assistant && !m.tool_calls.is_empty();
        if calls && !in_run {
            n += 1;
        }
        in_run = calls;
    }
    n
}

/// The duty step of a tool envelope (`{duty}/call/{k}` or `{duty}/result/{k}`).
fn tool_duty(step: &str) -> Option<&str> {
    step.rsplit_once("/call/").or_else(|| step.rsplit_once("/result/")).map(|(d, _)| d)
}

/// A tool that answers from the recording: the result recorded for the call's step.
/// Replay runs no tool.
struct RecordedTool {
    def: ToolDef,
    results: Arc<HashMap<(PeerId, String), ToolResultBody>>,
}

#[async_trait]
impl Tool for RecordedTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, _: &serde_json::Value, cx: &ToolContext) -> ToolOutput {
        let result_step = cx.step.replacen("/call/", "/result/", 1);
        match self.results.get(&(cx.peer.clone(), result_step)) {
            Some(r) => ToolOutput {
                outcome: r.outcome,
                output: r.output.clone(),
                exit_status: r.exit_status,
                signal: r.signal,
                duration_ms: Some(r.duration_ms),
                truncated: r.truncated,
            },
            // The recording has no result for this call: never answer (the replay is
            // judged stalled, and reports the difference).
            None => futures::future::pending().await,
        }
    }
}

/// Every tool of the plan, answering from the recording. An MCP server's tools are
/// the ones its latest `tool_list` envelope shows (as the models were offered them),
/// or, on a log recorded before listings were, the ones the log shows called.
fn recorded_toolbox(
    plan: &TeamPlan,
    results: HashMap<(PeerId, String), ToolResultBody>,
    called: &BTreeSet<String>,
    listed: &HashMap<String, Vec<ToolDef>>,
) -> ToolBox {
    // A tool the recording's process did not have stays missing in the replay (a
    // present one would first ask for its approval, which the recording never did).
    let missing: BTreeSet<String> = results
        .values()
        .filter(|r| {
            r.outcome == roundtable_core::tool::Outcome::Refused
                && r.output.contains("is granted but not available in this process")
        })
        .map(|r| r.tool.clone())
        .collect();
    let results = Arc::new(results);
    let mut b = ToolBox::new();
    let tool = |name: &str, description: &str, parameters: serde_json::Value| {
        Arc::new(RecordedTool {
            def: ToolDef { name: name.to_string(), description: description.to_string(), parameters },
            results: results.clone(),
        }) as Arc<dyn Tool>
    };
    for (grant, spec) in &plan.tools {
        if missing.contains(grant) {
            continue;
        }
        match &spec.kind {
            ToolKind::Command(c) => b.insert(grant, tool(grant, &spec.description, c.parameters.clone())),
            ToolKind::Http(h) => b.insert(grant, tool(grant, &spec.description, h.parameters.clone())),
            ToolKind::Mcp(_) if listed.contains_key(grant) => {
                for def in &listed[grant] {
                    b.insert(grant, tool(&def.name, &def.description, def.parameters.clone()));
                }
            }
            _ => {
                for name in called {
                    let declared = plan.tools.get(name).is_some_and(|t| !matches!(t.kind, ToolKind::Mcp(_)));
                    if Builtin::parse(name).is_none() && !declared {
                        b.insert(grant, tool(name, "", serde_json::json!({"type": "object"})));
                    }
                }
            }
        }
    }
    b
}

/// Holds each append until the original's order allows it (see the module docs).
struct Gate {
    session: SessionId,
    log: SharedMemLog,
    /// Original sequence of each key.
    original: HashMap<Key, u64>,
    /// Original envelopes fed in as inputs, by original sequence.
    inputs: HashMap<u64, Envelope>,
    last_original: u64,
    /// The original stop's sequence, if it stopped.
    original_stop: Option<u64>,
    state: Mutex<GateState>,
    /// The smallest original sequence not yet on the replay log.
    next_missing: watch::Sender<u64>,
}

#[derive(Default)]
struct GateState {
    present: BTreeSet<u64>,
    next_missing: u64,
    /// Appends the original does not have: (would-be place, envelope).
    unexpected: Vec<(u64, Envelope)>,
    replay_stopped: bool,
}

impl Gate {
    /// Append `env` (whose original place is `seq`, if any) and feed in any inputs that
    /// are now due. Called with the state lock held, so the order is exact.
    fn append_locked(&self, st: &mut GateState, env: Envelope, seq: Option<u64>) -> Result<Appended, LogError> {
        let is_stop = env.kind == Kind::Stop;
        let r = self.log.0.append_now(env)?;
        if is_stop {
            st.replay_stopped = true;
        }
        if let Some(s) = seq {
            st.present.insert(s);
        }
        loop {
            while st.present.contains(&st.next_missing) {
                st.next_missing += 1;
            }
            let due = st.next_missing;
            match self.inputs.get(&due) {
                Some(input) if !st.present.contains(&due) => {
                    if input.kind == Kind::Stop {
                        st.replay_stopped = true;
                    }
                    self.log.0.append_now(input.clone())?;
                    st.present.insert(due);
                }
                _ => break,
            }
        }
        self.next_missing.send_replace(st.next_missing);
        Ok(r)
    }

    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        let key = key_of(&self.session, &env);
        match self.original.get(&key).copied() {
            Some(seq) => {
                let mut rx = self.next_missing.subscribe();
                // Already there (a racing collective decision): a plain duplicate.
                let present = self.state.lock().expect("gate").present.contains(&seq);
                if present {
                    return self.log.0.append_now(env);
                }
                let _ = rx.wait_for(|&m| m >= seq).await;
                let mut st = self.state.lock().expect("gate");
                if st.present.contains(&seq) {
                    drop(st);
                    return self.log.0.append_now(env);
                }
                self.append_locked(&mut st, env, Some(seq))
            }
            None => {
                {
                    let mut st = self.state.lock().expect("gate");
                    if st.replay_stopped {
                        // After the stop nothing counts: let it through.
                        return self.append_locked(&mut st, env, None);
                    }
                    let at = st.next_missing;
                    st.unexpected.push((at, env));
                }
                // Held back for good: the replay reports it.
                futures::future::pending().await
            }
        }
    }
}

/// The replay's log: the in-memory log behind the gate.
struct GatedLog {
    gate: Arc<Gate>,
}

#[async_trait]
impl SessionLog for GatedLog {
    fn session(&self) -> &SessionId {
        &self.gate.session
    }
    async fn append(&self, env: Envelope) -> Result<Appended, LogError> {
        self.gate.append(env).await
    }
    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>, LogError> {
        self.gate.log.read(from, max).await
    }
    async fn last_seq(&self) -> Result<u64, LogError> {
        self.gate.log.last_seq().await
    }
    async fn tail(&self, from: u64) -> Result<EntryStream, LogError> {
        self.gate.log.tail(from).await
    }
    async fn seq_of(&self, id: &EnvelopeId) -> Result<Option<u64>, LogError> {
        self.gate.log.seq_of(id).await
    }
}

/// Whether a stop reason came from the clock (recorded, not re-derived).
fn clock_stop(reason: &str) -> bool {
    reason.starts_with("timeout:") || reason.contains("wall time")
}

fn stop_reason(env: &Envelope) -> String {
    env.body.json.as_ref().and_then(|j| j.get("reason")?.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The plan without clock conditions: replay reads their decisions from the log.
fn without_clock(plan: &TeamPlan) -> TeamPlan {
    fn strip(t: &Termination) -> Termination {
        match t {
            Termination::Any(cs) => Termination::Any(cs.iter().map(strip).collect()),
            Termination::All(cs) => Termination::All(cs.iter().map(strip).collect()),
            // `any` of nothing never holds.
            Termination::TimeoutMs(_) => Termination::Any(Vec::new()),
            other => other.clone(),
        }
    }
    let mut p = plan.clone();
    p.termination = strip(&plan.termination);
    p.budget.max_wall_ms = None;
    // A person's time to answer is the clock's too: the absences it caused are inputs.
    for peer in &mut p.peers {
        peer.answer_within_ms = None;
    }
    p
}

/// Replay a recorded session (all its entries, in order).
pub async fn replay(entries: &[Entry], opts: ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let task = entries.first().filter(|e| e.env.kind == Kind::Task).ok_or(ReplayError::NoTask)?;
    let session = task.env.session.clone();
    let plan = plan_of(&task.env).map_err(ReplayError::Plan)?;

    let original_stop = entries.iter().find(|e| e.env.kind == Kind::Stop);
    let mut original = HashMap::new();
    let mut inputs = HashMap::new();
    let mut answers = HashMap::new();
    let mut failure_model: HashMap<PeerId, String> = HashMap::new();
    let mut absent_then_silent: BTreeSet<PeerId> = BTreeSet::new();
    let reveals: HashMap<&str, &str> = entries
        .iter()
        .filter(|e| e.env.kind == Kind::Reveal)
        .filter_map(|e| Some((e.env.body.json.as_ref()?.get("commit")?.as_str()?, &*e.env.body.text)))
        .collect();
    let mut claims: HashMap<PeerId, std::collections::VecDeque<(u64, Claim)>> = HashMap::new();
    // Model calls per (peer, duty) so far, and the answer being built from a batch of
    // tool calls.
    let mut duty_calls: HashMap<(PeerId, String), usize> = HashMap::new();
    let mut tool_results: HashMap<(PeerId, String), ToolResultBody> = HashMap::new();
    let mut tool_names: BTreeSet<String> = BTreeSet::new();
    let mut listed: HashMap<String, Vec<ToolDef>> = HashMap::new();
    for e in entries.iter().skip(1) {
        let env = &e.env;
        // A listing no process of the team could have recorded is no input.
        if env.kind == Kind::ToolList
            && roundtable_core::tool::listing_rejected(&plan, env).is_none()
            && let Some(b) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolListBody>(j).ok())
            && b.error.is_none()
        {
            listed.insert(b.server, b.tools);
        }
        if env.kind == Kind::ToolResult
            && let Some(b) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolResultBody>(j).ok())
        {
            tool_results.insert((env.from.clone(), env.step.to_string()), b);
        }
        if env.kind == Kind::ToolCall
            && let Some(duty) = tool_duty(&env.step)
            && let Some(b) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolCallBody>(j).ok())
        {
            tool_names.insert(b.tool.clone());
            let call = ToolCall { id: b.call_id, name: b.tool, arguments: b.arguments };
            let key = (env.from.clone(), duty.to_string());
            let n = duty_calls.entry(key.clone()).or_default();
            if let Some(u) = &env.usage {
                // The first call of a model answer carries the answer's usage.
                let answer = ChatResponse {
                    text: String::new(),
                    model: u.model.to_string(),
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    finish_reason: Some("tool_calls".into()),
                    tool_calls: vec![call],
                };
                answers.insert((key.0, key.1, *n), (Recorded::Answer(answer), e.seq));
                *n += 1;
            } else if *n > 0
                && let Some((Recorded::Answer(a), _)) = answers.get_mut(&(key.0, key.1, *n - 1))
            {
                a.tool_calls.push(call);
            }
        }
        original.insert(key_of(&session, env), e.seq);
        if let Some(c) = recorded_claim(env) {
            claims.entry(env.from.clone()).or_default().push_back((e.seq, c));
        }
        // A person's interjection comes when they type it: an input, like an absence.
        // What an MCP server listed depends on the server, not the peers: an input.
        let is_input = env.kind == Kind::Absent
            || env.kind == Kind::ToolList
            || (env.kind == Kind::Stop && clock_stop(&stop_reason(env)))
            || roundtable_core::human::is_interjection(env)
            // An approval nobody gave in time is a denial the clock made.
            || (env.kind == Kind::Approval
                && env.body.json.as_ref().and_then(|j| j.get("timeout")).and_then(|t| t.as_bool()) == Some(true));
        if is_input {
            inputs.insert(e.seq, (*env.as_ref()).clone());
        }
        if env.kind != Kind::ToolCall
            && let Some(rec) = recorded_output(env, &reveals)
        {
            let n = duty_calls.get(&(env.from.clone(), env.step.to_string())).copied().unwrap_or(0);
            answers.insert((env.from.clone(), env.step.to_string(), n), (rec, e.seq));
            if env.kind == Kind::Failure
                && let Some(u) = &env.usage
            {
                failure_model.insert(env.from.clone(), u.model.to_string());
            }
        }
        if env.kind == Kind::Absent {
            if let Some(p) = env.body.json.as_ref().and_then(|j| j.get("peer")?.as_str().map(PeerId::from)) {
                absent_then_silent.insert(p);
            }
        } else {
            absent_then_silent.remove(&env.from);
        }
    }

    // The task as recorded, without clock conditions, its clock starting now.
    let mut task_env = (*task.env).clone();
    let replay_plan = without_clock(&plan);
    if let Some(j) = task_env.body.json.as_mut() {
        j["plan"] = serde_json::to_value(&replay_plan).expect("plan serializes");
    }
    task_env.time_ms = roundtable_core::envelope::now_ms();

    let mem = SharedMemLog(Arc::new(MemLog::new(session.clone())));
    let gate = Arc::new(Gate {
        session: session.clone(),
        log: mem.clone(),
        original,
        inputs,
        last_original: entries.last().map_or(1, |e| e.seq),
        original_stop: original_stop.map(|e| e.seq),
        state: Mutex::new(GateState { next_missing: 1, ..Default::default() }),
        next_missing: watch::channel(1).0,
    });
    {
        let mut st = gate.state.lock().expect("gate");
        gate.append_locked(&mut st, task_env, Some(task.seq))?;
    }
    let log: Arc<dyn SessionLog> = Arc::new(GatedLog { gate: gate.clone() });

    let answers = Arc::new(answers);
    let calls = Arc::new(Mutex::new(ReplayCalls::default()));
    // A fresh blackboard, and a queue that hands out what the recording says.
    let parts = roundtable_core::bus::MemParts::default();
    let queue: Arc<dyn WorkQueue> = Arc::new(ReplayQueue {
        config: plan.protocol.queue_config().unwrap_or_default(),
        claims: Mutex::new(claims),
        next_missing: gate.next_missing.subscribe(),
    });
    // One history for every peer of the replay, restarted ones included.
    let history = roundtable_core::model::History::new();
    let recorded_tools = Arc::new(recorded_toolbox(&plan, tool_results, &tool_names, &listed));
    let extras = |p: &PeerId| PeerExtras {
        board: Some(parts.blackboard(&session)),
        queue: Some(queue.clone()),
        embedder: None,
        secret: Some(Arc::from(format!("replay secret of {p}").into_bytes())),
        plan: None,
        history: Some(history.clone()),
        tools: Some(recorded_tools.clone()),
        fold: None,
    };
    let mut peers = tokio::task::JoinSet::new();
    let mut configs = HashMap::new();
    let mut handles = HashMap::new();
    for p in &plan.peers {
        let name = failure_model.get(&p.id).cloned().unwrap_or_else(|| {
            plan.models.get(&p.model).map_or_else(|| p.model.clone(), |m| m.provider.model_name(&p.model))
        });
        let model = Arc::new(ReplayModel {
            name,
            answers: answers.clone(),
            asked: calls.clone(),
            next_missing: gate.next_missing.subscribe(),
        });
        let cfg = PeerConfig { me: p.id.clone(), log: log.clone(), model, presence: None, events: None };
        handles.insert(p.id.clone(), peers.spawn(run_peer_with(cfg.clone(), extras(&p.id))));
        configs.insert(p.id.clone(), cfg);
    }

    // Wait until every recorded envelope is back (or the replay has stopped and gone
    // quiet), or until nothing happens for `idle`.
    let mut tail = mem.tail(1).await?;
    let done = |g: &Gate| {
        let st = g.state.lock().expect("gate");
        st.next_missing > g.last_original
    };
    loop {
        if done(&gate) {
            break;
        }
        tokio::select! {
            next = tail.next() => {
                let Some(Ok(entry)) = next else { break };
                // A peer recorded absent while the replay's copy of it waits for a call
                // the recording never answered: in the original it died there. It comes
                // back as a restarted peer does, reading the log from the start.
                if entry.env.kind == Kind::Absent {
                    let who = entry.env.body.json.as_ref().and_then(|j| j.get("peer")?.as_str().map(PeerId::from));
                    if let Some(who) = who
                        && calls.lock().expect("replay calls").parked.remove(&who)
                        && let (Some(h), Some(cfg)) = (handles.get(&who), configs.get(&who))
                    {
                        h.abort();
                        let h = peers.spawn(run_peer_with(cfg.clone(), extras(&who)));
                        handles.insert(who, h);
                    }
                }
            }
            joined = peers.join_next() => {
                if joined.is_none() {
                    // Every peer has finished; give the tail a moment to deliver.
                    if tokio::time::timeout(Duration::from_millis(50), tail.next()).await.is_err() {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(opts.idle) => break,
        }
        let quiet_after_stop = {
            let st = gate.state.lock().expect("gate");
            st.replay_stopped && gate.original_stop.is_some_and(|s| st.next_missing > s)
        };
        if quiet_after_stop {
            // Stragglers after the stop: take what comes promptly.
            let grace = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(grace);
            loop {
                if done(&gate) {
                    break;
                }
                tokio::select! {
                    next = tail.next() => if next.is_none() { break },
                    _ = &mut grace => break,
                }
            }
            break;
        }
    }
    peers.abort_all();
    while peers.join_next().await.is_some() {}

    let replayed = mem.read_all().await?;
    let st = gate.state.lock().expect("gate");
    let calls = calls.lock().expect("replay calls");
    Ok(compare(
        &session,
        entries,
        &replayed,
        &st.unexpected,
        &absent_then_silent,
        gate.inputs.keys().copied().collect(),
        calls.answered,
        calls.unrecorded.clone(),
    ))
}

fn compare(
    session: &SessionId,
    original: &[Entry],
    replayed: &[Entry],
    unexpected: &[(u64, Envelope)],
    absent_then_silent: &BTreeSet<PeerId>,
    mut inputs: Vec<u64>,
    model_calls: usize,
    unrecorded_calls: Vec<String>,
) -> ReplayReport {
    inputs.sort_unstable();
    let by_key: HashMap<Key, &Entry> = replayed.iter().map(|e| (key_of(session, &e.env), e)).collect();
    let stop_seq = original.iter().find(|e| e.env.kind == Kind::Stop).map(|e| e.seq);
    let mut divergences: Vec<Divergence> = Vec::new();
    let mut matched = 0;
    let mut stragglers = Vec::new();
    for e in original {
        let key = key_of(session, &e.env);
        match by_key.get(&key) {
            None => {
                if stop_seq.is_some_and(|s| e.seq > s) {
                    stragglers.push(e.seq);
                } else {
                    divergences.push(Divergence {
                        seq: e.seq,
                        key: key.to_string(),
                        field: "missing".into(),
                        expected: describe(&e.env),
                        got: String::new(),
                    });
                }
            }
            Some(r) => match first_difference(&e.env, &r.env) {
                None => matched += 1,
                Some((field, expected, got)) => {
                    divergences.push(Divergence { seq: e.seq, key: key.to_string(), field, expected, got })
                }
            },
        }
    }
    for (at, env) in unexpected {
        // A peer the recording lost for good is alive in the replay: its return is not a
        // decision.
        if env.kind == Kind::Join && absent_then_silent.contains(&env.from) {
            continue;
        }
        divergences.push(Divergence {
            seq: *at,
            key: key_of(session, env).to_string(),
            field: "unexpected".into(),
            expected: String::new(),
            got: describe(env),
        });
    }
    divergences.sort_by_key(|d| (d.seq, d.field == "unexpected"));
    ReplayReport {
        session: session.to_string(),
        recorded: original.len(),
        replayed: replayed.len(),
        matched,
        model_calls,
        inputs,
        stragglers,
        unrecorded_calls,
        stop_reason: replayed.iter().find(|e| e.env.kind == Kind::Stop).map(|e| stop_reason(&e.env)),
        divergence: divergences.into_iter().next(),
    }
}

fn describe(env: &Envelope) -> String {
    format!("{} from {}: {:?}", env.kind, env.from, crate::trace::one_line(&env.body.text, 80))
}

/// An envelope's JSON without what is derived from a peer's secret (never on the log,
/// so not reproducible): a commitment's hash and seal, a reveal's salt.
fn comparable_json(env: &Envelope) -> Option<serde_json::Value> {
    let mut j = env.body.json.clone()?;
    let secret_derived: &[&str] = match env.kind {
        Kind::Commit => &["commitment", "sealed"],
        Kind::Reveal => &["salt"],
        // How long a tool took is the clock's, not a decision.
        Kind::ToolResult => &["duration_ms"],
        _ => &[],
    };
    if let Some(m) = j.as_object_mut() {
        for k in secret_derived {
            m.remove(*k);
        }
    }
    Some(j)
}

/// A claim the log records (`work` envelope, `op: claim`).
fn recorded_claim(env: &Envelope) -> Option<Claim> {
    let j = env.body.json.as_ref()?;
    if env.kind != Kind::Work || j.get("op")?.as_str()? != "claim" {
        return None;
    }
    let item = j.get("item")?.as_str()?.to_string();
    Some(Claim {
        payload: serde_json::json!({ "task": j.get("task").cloned().unwrap_or_default() }),
        delivery: j.get("delivery").and_then(serde_json::Value::as_u64).map_or(1, |d| d as u32),
        lease: format!("replay/{item}"),
        claimer: env.from.clone(),
        task_id: item,
    })
}

/// The work queue as the recording saw it: each peer gets the tasks it claimed, in
/// order, once everything before the claim in the original is on the replay log.
struct ReplayQueue {
    config: QueueConfig,
    claims: Mutex<HashMap<PeerId, std::collections::VecDeque<(u64, Claim)>>>,
    next_missing: watch::Receiver<u64>,
}

#[async_trait]
impl WorkQueue for ReplayQueue {
    fn config(&self) -> QueueConfig {
        self.config
    }
    async fn push(&self, _task_id: &str, _payload: serde_json::Value) -> Result<(), QueueError> {
        Ok(())
    }
    async fn claim(&self, claimer: &PeerId, wait: Duration) -> Result<Option<Claim>, QueueError> {
        let next = self.claims.lock().expect("replay queue").get_mut(claimer).and_then(|q| q.pop_front());
        match next {
            Some((seq, claim)) => {
                let _ = self.next_missing.clone().wait_for(|&m| m >= seq).await;
                Ok(Some(claim))
            }
            None => {
                tokio::time::sleep(wait).await;
                Ok(None)
            }
        }
    }
    async fn ack(&self, _claim: &Claim) -> Result<(), QueueError> {
        Ok(())
    }
    async fn nack(&self, _claim: &Claim, _delay: Duration) -> Result<(), QueueError> {
        Ok(())
    }
    async fn progress(&self, _claim: &Claim) -> Result<(), QueueError> {
        Ok(())
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(Vec::new())
    }
    async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(QueueStats::default())
    }
}

fn parents_set(env: &Envelope) -> BTreeSet<&str> {
    env.parents.iter().map(EnvelopeId::as_str).collect()
}

/// The first field on which two envelopes for the same key disagree.
fn first_difference(a: &Envelope, b: &Envelope) -> Option<(String, String, String)> {
    let diff = |f: &str, x: String, y: String| (x != y).then(|| (f.to_string(), x, y));
    if let Some(d) = diff("kind", a.kind.to_string(), b.kind.to_string()) {
        return Some(d);
    }
    if a.kind == Kind::Stop {
        let field = |e: &Envelope, k: &str| {
            e.body.json.as_ref().and_then(|j| j.get(k)).cloned().unwrap_or_default().to_string()
        };
        for k in ["reason", "answer"] {
            if let Some(d) = diff(&format!("stop {k}"), field(a, k), field(b, k)) {
                return Some(d);
            }
        }
        return diff("stop decided_by", format!("{:?}", parents_set(a)), format!("{:?}", parents_set(b)));
    }
    if a.kind == Kind::Task {
        return diff("text", a.body.text.to_string(), b.body.text.to_string());
    }
    diff("recipient", format!("{:?}", a.to), format!("{:?}", b.to))
        .or_else(|| diff("text", a.body.text.to_string(), b.body.text.to_string()))
        .or_else(|| diff("json", format!("{:?}", comparable_json(a)), format!("{:?}", comparable_json(b))))
        .or_else(|| diff("parents", format!("{:?}", parents_set(a)), format!("{:?}", parents_set(b))))
        .or_else(|| {
            let u = |e: &Envelope| {
                e.usage.as_ref().map(|u| {
                    format!(
                        "{} {}+{} tokens, {} calls, ${:.9}",
                        u.model, u.prompt_tokens, u.completion_tokens, u.calls, u.cost_usd
                    )
                })
            };
            diff("usage", format!("{:?}", u(a)), format!("{:?}", u(b)))
        })
}

impl From<ReplayError> for LogError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Log(l) => l,
            other => LogError::new(LogErrorKind::Corrupt, other.to_string()),
        }
    }
}
