//! A peer acting through tools, with side effects recorded once.
//!
//! A duty whose peer has tools is a loop: call the model with the tools offered; when it
//! answers with calls, record each as a `tool_call` envelope (step `{duty}/call/{k}`)
//! *before* running it, run it, and record its `tool_result` (`{duty}/result/{k}`);
//! then call the model again with the calls and results, until it answers without a
//! call (or `MAX_MODEL_CALLS_PER_DUTY` calls were made; the last is offered no tools).
//!
//! The effect rule. A peer redoing a duty (after a restart, or on `resume`) rebuilds the
//! loop from its own tool envelopes on the log: a call with a result is never run again
//! (its result is given to the model as recorded); a call without one is run again only
//! if its tool is idempotent, otherwise its result is recorded as `outcome unknown` and
//! the model decides what to do (check the state first, say). The model call that asked
//! for the calls is not made again either: its usage is on the first call's envelope.
//!
//! Refusals are results too, on the log and told to the model: a tool the peer was not
//! granted, arguments that are not JSON or do not fit the schema, a tool budget reached
//! (a session's tool budget also stops the session, as a model budget does).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Called, Me, PeerView, append, call_model, envelope};
use crate::blackboard::BoardErrorKind;
use crate::envelope::{Body, Envelope, Kind, PeerId, Recipient};
use crate::log::LogError;
use crate::model::ChatMessage;
use crate::protocol::{Duty, View};
use crate::session::Snapshot;
use crate::team::{PeerSpec, TeamPlan};
use crate::termination::{BudgetScope, Tally};
use crate::tool::{
    ApprovalAnswer, ApprovalRequest, Builtin, Outcome, Tool, ToolBox, ToolCall, ToolCallBody, ToolChoice, ToolContext,
    ToolDef, ToolOutput, ToolResultBody,
};

/// Model calls one duty may make while it works through tool calls.
pub(super) const MAX_MODEL_CALLS_PER_DUTY: u32 = 16;

/// Characters of a tool's output kept in the result envelope's text (the tool's own
/// caps bound what it returns; this bounds one envelope).
const MAX_RESULT_CHARS: usize = 256 * 1024;

#[derive(Clone)]
pub(super) enum PeerTool {
    Builtin(Builtin),
    External(Arc<dyn Tool>),
    /// Granted, but this process has no tool under that name.
    Missing(String),
}

/// The tools a peer may call: what the model is offered, and how each name runs.
#[derive(Clone, Default)]
pub(super) struct Granted {
    pub(super) defs: Arc<[ToolDef]>,
    pub(super) by_name: HashMap<String, PeerTool>,
    /// The peer that must approve each call of a tool (`approve_by`), by tool name.
    pub(super) approvers: HashMap<String, PeerId>,
}

impl Granted {
    pub(super) fn of(spec: &PeerSpec, plan: &TeamPlan, tools: Option<&ToolBox>) -> Self {
        let mut names: Vec<String> = Vec::new();
        if matches!(plan.protocol, crate::team::ProtocolSpec::Conversation(_)) {
            for b in [Builtin::Send, Builtin::Broadcast, Builtin::Finish] {
                names.push(b.as_str().to_string());
            }
        }
        for t in &spec.tools {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
        let mut defs = Vec::new();
        let mut by_name = HashMap::new();
        let mut approvers = HashMap::new();
        for grant in names {
            if let Some(b) = Builtin::parse(&grant) {
                defs.push(b.def());
                by_name.insert(grant, PeerTool::Builtin(b));
                continue;
            }
            let built = tools.map_or(&[][..], |t| t.get(&grant));
            if built.is_empty() {
                // Offer what the plan declares, so the model can ask and be told why not.
                if let Some(declared) = plan.tools.get(&grant)
                    && !matches!(declared.kind, crate::tool::ToolKind::Mcp(_))
                {
                    let parameters = match &declared.kind {
                        crate::tool::ToolKind::Command(c) => c.parameters.clone(),
                        crate::tool::ToolKind::Http(h) => h.parameters.clone(),
                        _ => serde_json::json!({"type": "object"}),
                    };
                    defs.push(ToolDef { name: grant.clone(), description: declared.description.clone(), parameters });
                }
                by_name.insert(grant.clone(), PeerTool::Missing(grant));
                continue;
            }
            let approver = plan.tools.get(&grant).and_then(|s| s.approve_by.clone());
            for tool in built {
                let def = tool.def().clone();
                if let Some(a) = &approver {
                    approvers.insert(def.name.clone(), a.clone());
                }
                by_name.insert(def.name.clone(), PeerTool::External(tool.clone()));
                defs.push(def);
            }
        }
        Granted { defs: defs.into(), by_name, approvers }
    }

    fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    fn idempotent(&self, name: &str) -> bool {
        match self.by_name.get(name) {
            // Built-ins append envelopes with ids derived from the call: running one
            // again lands nothing new.
            Some(PeerTool::Builtin(b)) => !matches!(b, Builtin::QueueClaim),
            Some(PeerTool::External(t)) => t.idempotent(),
            _ => true,
        }
    }
}

/// This peer's own tool envelopes, by the duty step they belong to.
#[derive(Default)]
pub(super) struct Ledger {
    by_duty: HashMap<Arc<str>, Vec<Arc<Envelope>>>,
}

impl Ledger {
    pub(super) fn observe(&mut self, me: &PeerId, env: &Arc<Envelope>) {
        if !matches!(env.kind, Kind::ToolCall | Kind::ToolResult) || &env.from != me {
            return;
        }
        let Some((duty, _)) = env.step.rsplit_once("/call/").or_else(|| env.step.rsplit_once("/result/")) else {
            return;
        };
        self.by_duty.entry(Arc::from(duty)).or_default().push(env.clone());
    }

    pub(super) fn of(&self, duty: &str) -> &[Arc<Envelope>] {
        self.by_duty.get(duty).map_or(&[], Vec::as_slice)
    }
}

/// What a model call inside a tool loop adds to a plain one.
pub(super) struct InTurn {
    /// The folded tally plus what this duty appended since.
    pub(super) tally: Tally,
    /// Model calls this duty made that the folded state does not count yet.
    pub(super) calls: u32,
    pub(super) tools: Arc<[ToolDef]>,
    pub(super) choice: ToolChoice,
    pub(super) turns: Vec<ChatMessage>,
}

fn call_step(duty: &Duty, k: usize) -> String {
    format!("{}/call/{k}", duty.step)
}

fn result_step(duty: &Duty, k: usize) -> String {
    format!("{}/result/{k}", duty.step)
}

/// Call the model for a duty, working through the tool calls it makes. Without tools,
/// one plain call.
#[allow(clippy::too_many_arguments)]
pub(super) async fn call_with_tools(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    instruction: &Option<Arc<str>>,
    json: bool,
    v: &View,
    recorded: &[Arc<Envelope>],
) -> Result<Called, LogError> {
    if me.granted.is_empty() {
        return Ok(call_model(me, st, view, duty, instruction, json, v, None).await);
    }
    let mut turn = InTurn {
        tally: st.tally.clone(),
        calls: 0,
        tools: me.granted.defs.clone(),
        choice: ToolChoice::Auto,
        turns: Vec::new(),
    };
    // Rebuild what this duty already did.
    let mut calls: Vec<(usize, ToolCall)> = Vec::new();
    let mut answered: Vec<usize> = Vec::new();
    for env in recorded {
        let k: Option<usize> = env.step.rsplit('/').next().and_then(|k| k.parse().ok());
        let Some(k) = k else { continue };
        match env.kind {
            Kind::ToolCall => {
                if let Some(b) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolCallBody>(j).ok()) {
                    let call = ToolCall { id: b.call_id, name: b.tool, arguments: b.arguments };
                    turn.turns.push(ChatMessage::tool_calls(
                        Some(me.cfg.me.clone()),
                        Arc::from(b.said.as_str()),
                        vec![call.clone()],
                    ));
                    calls.push((k, call));
                }
            }
            Kind::ToolResult => {
                if let Some(b) = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolResultBody>(j).ok()) {
                    let (id, text) = (Arc::from(b.call_id), env.body.text.clone());
                    turn.turns.push(if b.outcome == Outcome::Ok {
                        ChatMessage::tool_result(id, text)
                    } else {
                        ChatMessage::tool_failure(id, text)
                    });
                    answered.push(k);
                }
            }
            _ => {}
        }
    }
    let mut next_k = calls.iter().map(|(k, _)| k + 1).max().unwrap_or(0);
    for (k, call) in calls.iter().filter(|(k, _)| !answered.contains(k)) {
        // A call waiting for its approval (or denied) never ran: it is safe to go on.
        let never_ran = match me.granted.approvers.get(&call.name) {
            Some(approver) => {
                let (mut cursor, mut found) = (0, Found::default());
                found.scan(me, &approve_step(duty, *k), approver, &mut cursor).await?;
                !found.answer.is_some_and(|a| a.approve)
            }
            None => false,
        };
        let result = if never_ran || me.granted.idempotent(&call.name) {
            run_call(me, st, view, duty, call, *k, &mut turn.tally).await?
        } else {
            let out = ToolOutput {
                outcome: Outcome::Unknown,
                output: format!(
                    "outcome unknown: this call of `{}` was recorded but its result never was (the process stopped while it ran), and the tool is not idempotent, so it was not run again. It may or may not have taken effect: check before repeating it.",
                    call.name
                ),
                exit_status: None,
                signal: None,
                duration_ms: None,
                truncated: false,
            };
            record_result(me, st, duty, call, *k, out, 0, &mut turn.tally).await?
        };
        turn.turns.push(result);
    }

    let mut rounds = recorded.iter().filter(|e| e.kind == Kind::ToolCall && e.usage.is_some()).count() as u32;
    let mut checked = st.last_seq;
    loop {
        // The session may have stopped while this duty worked (another peer's finish, a
        // budget): no model call and no tool call after the stop.
        if turn.calls > 0 && stopped_since(me, &mut checked).await? {
            return Ok(Called::Stopped);
        }
        if rounds + 1 >= MAX_MODEL_CALLS_PER_DUTY {
            turn.choice = ToolChoice::None;
            turn.tools = Arc::from([]);
        }
        let called = call_model(me, st, view, duty, instruction, json, v, Some(&turn)).await;
        rounds += 1;
        // The answer came back after the session stopped: it is not recorded.
        if stopped_since(me, &mut checked).await? {
            return Ok(Called::Stopped);
        }
        let (text, usage, span, asked) = match called {
            Called::Answer { calls, text, usage, turn: span } if !calls.is_empty() && !turn.tools.is_empty() => {
                (text, usage, span, calls)
            }
            other => return Ok(other),
        };
        // What the model said along with its calls is kept on the first call's envelope.
        let mut said = Some(text);
        turn.calls += 1;
        // Record every call before running any.
        let mut to_run = Vec::new();
        for (i, call) in asked.into_iter().enumerate() {
            // A stop that lands while the calls are recorded ends the turn: at most one
            // envelope of this peer follows a stop (as an import checks).
            if i > 0 && stopped_since(me, &mut checked).await? {
                return Ok(Called::Stopped);
            }
            let k = next_k;
            next_k += 1;
            let said = said.take().filter(|t| !t.trim().is_empty()).unwrap_or_default();
            let body = ToolCallBody {
                tool: call.name.clone(),
                call_id: call.id.clone(),
                arguments: call.arguments.clone(),
                said: said.clone(),
            };
            let called = format!("{}({})", call.name, preview(&call.arguments, 200));
            let text = if said.is_empty() { called } else { format!("{said}\n→ {called}") };
            let d = Duty { step: Arc::from(call_step(duty, k)), ..duty.clone() };
            let mut env = envelope(me, st, &d, Kind::ToolCall, Body::text(text).with_json(json_of(&body)));
            env.to = Recipient::Peer(me.cfg.me.clone());
            if i == 0 {
                env = env.with_usage(usage.clone());
                env.trace = crate::telemetry::traceparent(&span);
            }
            turn.tally.observe(0, &env, None);
            append(me, env).await?;
            turn.turns.push(ChatMessage::tool_calls(
                Some(me.cfg.me.clone()),
                Arc::from(said.as_str()),
                vec![call.clone()],
            ));
            to_run.push((k, call));
        }
        let mut finished = false;
        for (k, call) in &to_run {
            // No tool runs once the session has stopped (a finish, a budget, another
            // peer's decision landed while the calls before this one ran).
            if stopped_since(me, &mut checked).await? {
                return Ok(Called::Stopped);
            }
            if let Err((BudgetScope::Session, why)) = me.plan.budget.allows_tool(&turn.tally, &me.cfg.me) {
                let out = ToolOutput::refused(format!("not run: {why}"));
                record_result(me, st, duty, call, *k, out, 0, &mut turn.tally).await?;
                return Ok(Called::Refused { scope: BudgetScope::Session, why });
            }
            let result = run_call(me, st, view, duty, call, *k, &mut turn.tally).await?;
            finished |= call.name == Builtin::Finish.as_str() && !result.content.starts_with('[');
            turn.turns.push(result);
        }
        if finished {
            // Proposing the answer ends the turn: nothing is left to say.
            return Ok(Called::Finished);
        }
    }
}

fn approve_step(duty: &Duty, k: usize) -> String {
    format!("{}/approve/{k}", duty.step)
}

/// What the log holds about one approval request.
#[derive(Default)]
struct Found {
    /// When the request was recorded (ms since the epoch).
    asked_at: Option<u64>,
    /// The first answer before the session's stop: the approver's, or the caller's
    /// record that the approver's answer limit passed. Answers by anyone else are
    /// ignored, and so is an answer written after the stop: it decides nothing, since
    /// nothing runs after a stop.
    answer: Option<ApprovalAnswer>,
    stopped: bool,
    /// Requests addressed to this peer with no answer yet: a peer waiting for its own
    /// approval answers them, so two peers that wait for each other both go on.
    asked: Asked,
}

impl Found {
    /// Read the log after `cursor` (which moves on) for the request at `step`.
    async fn scan(&mut self, me: &Me, step: &str, approver: &PeerId, cursor: &mut u64) -> Result<(), LogError> {
        let answer_step = format!("{step}/answer");
        loop {
            let entries = me.cfg.log.read(*cursor + 1, 256).await?;
            let Some(last) = entries.last() else { return Ok(()) };
            *cursor = last.seq;
            for e in &entries {
                let env = &e.env;
                if env.kind == Kind::Stop {
                    self.stopped = true;
                }
                if env.kind != Kind::Approval {
                    continue;
                }
                self.asked.observe(&me.cfg.me, env);
                if &*env.step == step && env.from == me.cfg.me {
                    self.asked_at.get_or_insert(env.time_ms);
                } else if &*env.step == answer_step.as_str() && self.answer.is_none() && !self.stopped {
                    let Some(a) = env.body.json.clone().and_then(|j| serde_json::from_value::<ApprovalAnswer>(j).ok())
                    else {
                        continue;
                    };
                    if &env.from == approver || (env.from == me.cfg.me && a.timeout && !a.approve) {
                        self.answer = Some(a);
                    }
                }
            }
        }
    }
}

/// How an approval request ended for the caller.
enum Approval {
    Approved,
    /// Denied by the approver, or for want of an answer in time: why (the model is told).
    Denied(String),
    /// The session stopped before an answer: nothing was decided and nothing runs.
    Stopped(String),
}

/// Ask `approver` to approve a recorded call and wait on the log for the answer. While
/// it waits, this peer answers the approval requests addressed to it (its main loop,
/// which otherwise does, is waiting on this duty): two peers whose calls each need the
/// other's approval would otherwise wait for each other for ever.
async fn approval(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    call: &ToolCall,
    k: usize,
    approver: &PeerId,
) -> Result<Approval, LogError> {
    let step = approve_step(duty, k);
    let (mut cursor, mut found) = (0, Found::default());
    found.scan(me, &step, approver, &mut cursor).await?;
    let limit = me.plan.peer(approver).and_then(|p| p.answer_within_ms);
    if found.answer.is_none() && found.asked_at.is_none() {
        // Asked once: a restart finds this request on the log and waits for its answer.
        let req = ApprovalRequest {
            tool: call.name.clone(),
            arguments: call.arguments.clone(),
            caller: me.cfg.me.clone(),
            call_step: call_step(duty, k),
        };
        let text = format!("{} asks {approver} to approve {}({})", me.cfg.me, call.name, preview(&call.arguments, 200));
        let d = Duty { step: Arc::from(step.as_str()), ..duty.clone() };
        let mut env = envelope(me, st, &d, Kind::Approval, Body::text(text).with_json(json_of(&req)));
        env.to = Recipient::Peer(approver.clone());
        env.parents = vec![crate::envelope::EnvelopeId::derive(&st.session, &me.cfg.me, &call_step(duty, k))];
        found.asked_at = Some(env.time_ms);
        append(me, env).await?;
    }
    let mut timed_out = false;
    loop {
        found.scan(me, &step, approver, &mut cursor).await?;
        match &found.answer {
            Some(a) if !a.approve && a.timeout => return Ok(Approval::Denied(format!("denied: {}", a.reason))),
            Some(a) if !a.approve => return Ok(Approval::Denied(format!("denied by {approver}: {}", a.reason))),
            // Approved, but the session stopped since: nothing runs after a stop.
            Some(_) if found.stopped => {
                return Ok(Approval::Stopped(format!("not run: the session stopped after {approver} approved")));
            }
            Some(_) => return Ok(Approval::Approved),
            None if found.stopped => {
                return Ok(Approval::Stopped(format!("not run: the session stopped before {approver} answered")));
            }
            None => {}
        }
        if let Some(request) = found.asked.next() {
            answer_approval(me, st, view, &request).await?;
            found.asked.done(&request.step);
            continue;
        }
        if let (Some(limit), Some(at), false) = (limit, found.asked_at, timed_out)
            && crate::envelope::now_ms() >= at.saturating_add(limit)
        {
            // No answer in time is a denial, recorded: replay and resume read it.
            let secs = limit as f64 / 1000.0;
            let reason = format!("{approver} did not answer within {secs} s");
            let a = ApprovalAnswer { approve: false, reason, timeout: true };
            let text = format!("no answer from {approver} in time: denied");
            let d = Duty { step: Arc::from(format!("{step}/answer")), ..duty.clone() };
            let mut env = envelope(me, st, &d, Kind::Approval, Body::text(text).with_json(json_of(&a)));
            env.to = Recipient::Peer(approver.clone());
            env.parents = vec![crate::envelope::EnvelopeId::derive(&st.session, &me.cfg.me, &step)];
            append(me, env).await?;
            timed_out = true;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Approval requests addressed to this peer that no answer is on the log for yet.
#[derive(Default)]
pub(super) struct Asked {
    open: Vec<Arc<Envelope>>,
    answered: std::collections::HashSet<Arc<str>>,
}

impl Asked {
    pub(super) fn observe(&mut self, me: &PeerId, env: &Arc<Envelope>) {
        if env.kind != Kind::Approval {
            return;
        }
        if let Some(req) = env.step.strip_suffix("/answer") {
            self.open.retain(|e| &*e.step != req);
            self.answered.insert(Arc::from(req));
            return;
        }
        let for_me = matches!(&env.to, Recipient::Peer(p) if p == me);
        let is_request =
            env.body.json.clone().and_then(|j| serde_json::from_value::<ApprovalRequest>(j).ok()).is_some();
        if for_me && is_request && !self.answered.contains(&env.step) && !self.open.iter().any(|e| e.step == env.step) {
            self.open.push(env.clone());
        }
    }

    pub(super) fn next(&self) -> Option<Arc<Envelope>> {
        self.open.first().cloned()
    }

    /// The request at `step` was answered (its answer may not have been read back yet).
    fn done(&mut self, step: &str) {
        self.open.retain(|e| &*e.step != step);
        self.answered.insert(Arc::from(step));
    }
}

/// What an approver is asked: who asks, for which tool and arguments, and the form of
/// the answer (the template follows the arguments, so a person's seat reads the form
/// from the template, not from the arguments; see `human::Form::of`).
fn approval_instruction(req: &ApprovalRequest) -> String {
    format!(
        "{caller} asks you to approve a call of the tool `{tool}` with these arguments:\n{args}\n\
         Approve it only if it is safe and serves the task. A denial needs a reason: {caller} is told it.\n\
         Reply with a JSON object: {{\"approve\": true|false, \"reason\": \"<why>\"}}",
        caller = req.caller,
        tool = req.tool,
        args = preview(&req.arguments, 4000),
    )
}

/// Answer an approval request with this peer's model (or the person in its seat): a
/// yes/no form. Returns the answer's sequence number.
pub(super) async fn answer_approval(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    request: &Envelope,
) -> Result<u64, LogError> {
    let req = request
        .body
        .json
        .clone()
        .and_then(|j| serde_json::from_value::<ApprovalRequest>(j).ok())
        .expect("only requests are asked");
    let step = format!("{}/answer", request.step);
    let mut instruction = approval_instruction(&req);
    let mut duty = Duty::speak(step.as_str(), Kind::Approval, request.round, None, true, View::Task);
    duty.to = Recipient::Peer(req.caller.clone());
    duty.parents = vec![request.id.clone()];
    let mut asked = 0;
    let (answer, text, usage, turn) = loop {
        asked += 1;
        let ins = Some(Arc::from(instruction.as_str()));
        match call_model(me, st, view, &duty, &ins, true, &View::Task, None).await {
            Called::Answer { text, usage, turn, .. } => {
                let j = crate::peer::parse_json_answer(&text);
                let approve = j.as_ref().and_then(|j| j.get("approve")).and_then(|a| a.as_bool());
                let reason = j
                    .as_ref()
                    .and_then(|j| j.get("reason"))
                    .and_then(|r| r.as_str())
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                let person = &*usage.model == crate::human::HUMAN_MODEL;
                let a = match approve {
                    Some(true) => ApprovalAnswer { approve: true, reason, timeout: false },
                    Some(false) if reason.is_empty() && person && asked < 5 => {
                        instruction = format!("A denial needs a reason. {instruction}");
                        continue;
                    }
                    Some(false) if reason.is_empty() => {
                        ApprovalAnswer { approve: false, reason: "no reason given".into(), timeout: false }
                    }
                    Some(false) => ApprovalAnswer { approve: false, reason, timeout: false },
                    None => ApprovalAnswer {
                        approve: false,
                        reason: format!("the answer was not understood: {}", preview(&text, 200)),
                        timeout: false,
                    },
                };
                break (a, text, Some(usage), Some(turn));
            }
            Called::Failed { error, usage, turn } => {
                // A person's seat fails a question only when nobody answered it (the
                // person left, or the request was denied for want of an answer first).
                let reason = if me.spec.is_human() {
                    format!("not answered: {}", error.message)
                } else {
                    format!("the model failed: {error}")
                };
                let a = ApprovalAnswer { approve: false, reason, timeout: false };
                let text =
                    serde_json::to_string(&serde_json::json!({"approve": false, "reason": a.reason})).expect("json");
                break (a, text, Some(usage), Some(turn));
            }
            Called::Refused { why, .. } => {
                let a = ApprovalAnswer { approve: false, reason: format!("not answered: {why}"), timeout: false };
                let text = a.reason.clone();
                break (a, text, None, None);
            }
            Called::Finished | Called::Stopped => {
                let a = ApprovalAnswer { approve: false, reason: "the session stopped".into(), timeout: false };
                let text = a.reason.clone();
                break (a, text, None, None);
            }
        }
    };
    let mut env = envelope(me, st, &duty, Kind::Approval, Body::text(text).with_json(json_of(&answer)));
    env.usage = usage;
    match turn {
        Some(t) => super::append_traced(me, env, t).await,
        None => append(me, env).await,
    }
}

/// Whether the log has a stop after `checked` (which moves on to what was read).
async fn stopped_since(me: &Me, checked: &mut u64) -> Result<bool, LogError> {
    loop {
        let entries = me.cfg.log.read(*checked + 1, 256).await?;
        let Some(last) = entries.last() else { return Ok(false) };
        *checked = last.seq;
        if entries.iter().any(|e| e.env.kind == Kind::Stop) {
            return Ok(true);
        }
    }
}

/// Run one recorded call (or refuse it) and record its result.
async fn run_call(
    me: &Me,
    st: &Snapshot,
    view: &PeerView,
    duty: &Duty,
    call: &ToolCall,
    k: usize,
    tally: &mut Tally,
) -> Result<ChatMessage, LogError> {
    let mut t0 = Instant::now();
    let out = match me.plan.budget.allows_tool(tally, &me.cfg.me) {
        Err((_, why)) => ToolOutput::refused(format!("not run: {why}")),
        Ok(()) => match me.granted.by_name.get(&call.name) {
            None => ToolOutput::refused(format!(
                "tool `{}` is not granted to {}; its tools: {}",
                call.name,
                me.cfg.me,
                me.granted.defs.iter().map(|d| format!("`{}`", d.name)).collect::<Vec<_>>().join(", ")
            )),
            Some(PeerTool::Missing(name)) => ToolOutput::refused(format!(
                "tool `{name}` is granted but not available in this process (no tool was built for it)"
            )),
            Some(tool) => match parse_arguments(&call.arguments) {
                Err(why) => ToolOutput::refused(why),
                Ok(args) => match tool {
                    PeerTool::Builtin(b) => run_builtin(me, st, duty, *b, &args, k).await?,
                    PeerTool::External(t) => {
                        let decided = match me.granted.approvers.get(&call.name) {
                            Some(approver) => approval(me, st, view, duty, call, k, approver).await?,
                            None => Approval::Approved,
                        };
                        match decided {
                            Approval::Denied(why) => {
                                t0 = Instant::now();
                                ToolOutput { outcome: Outcome::Denied, ..ToolOutput::refused(why) }
                            }
                            Approval::Stopped(why) => {
                                t0 = Instant::now();
                                ToolOutput::refused(why)
                            }
                            Approval::Approved => {
                                t0 = Instant::now();
                                let cx = ToolContext { peer: me.cfg.me.clone(), step: Arc::from(call_step(duty, k)) };
                                t.call(&args, &cx).await
                            }
                        }
                    }
                    PeerTool::Missing(_) => unreachable!("matched above"),
                },
            },
        },
    };
    let ms = t0.elapsed().as_millis() as u64;
    record_result(me, st, duty, call, k, out, ms, tally).await
}

#[allow(clippy::too_many_arguments)]
async fn record_result(
    me: &Me,
    st: &Snapshot,
    duty: &Duty,
    call: &ToolCall,
    k: usize,
    mut out: ToolOutput,
    duration_ms: u64,
    tally: &mut Tally,
) -> Result<ChatMessage, LogError> {
    if out.output.len() > MAX_RESULT_CHARS {
        let mut cut = MAX_RESULT_CHARS;
        while !out.output.is_char_boundary(cut) {
            cut -= 1;
        }
        out.output.truncate(cut);
        out.truncated = true;
    }
    let text = match out.outcome {
        Outcome::Ok => out.output.clone(),
        other => format!("[{other}] {}", out.output),
    };
    let body = ToolResultBody {
        tool: call.name.clone(),
        call_id: call.id.clone(),
        outcome: out.outcome,
        output: out.output,
        exit_status: out.exit_status,
        signal: out.signal,
        duration_ms,
        truncated: out.truncated,
    };
    let d = Duty { step: Arc::from(result_step(duty, k)), ..duty.clone() };
    let mut env = envelope(me, st, &d, Kind::ToolResult, Body::text(text.as_str()).with_json(json_of(&body)));
    env.to = Recipient::Peer(me.cfg.me.clone());
    env.parents = vec![crate::envelope::EnvelopeId::derive(&st.session, &me.cfg.me, &call_step(duty, k))];
    tally.observe(0, &env, None);
    append(me, env).await?;
    let ok = matches!(body.outcome, Outcome::Ok);
    Ok(if ok {
        ChatMessage::tool_result(Arc::from(call.id.as_str()), Arc::from(text))
    } else {
        ChatMessage::tool_failure(Arc::from(call.id.as_str()), Arc::from(text))
    })
}

fn json_of<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("tool bodies serialize")
}

fn preview(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(n).collect::<String>())
    }
}

/// A call's arguments as the JSON object a tool takes.
fn parse_arguments(raw: &str) -> Result<serde_json::Value, String> {
    let raw = if raw.trim().is_empty() { "{}" } else { raw };
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("arguments must be a JSON object".into()),
        Err(e) => Err(format!("arguments are not valid JSON ({e}): {}", preview(raw, 200))),
    }
}

fn str_arg<'a>(args: &'a serde_json::Value, key: &str) -> Result<&'a str, ToolOutput> {
    args.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| ToolOutput::refused(format!("argument `{key}` (a string) is missing")))
}

/// The runtime's own tools: they act on the session (the log, the board, the queue).
async fn run_builtin(
    me: &Me,
    st: &Snapshot,
    duty: &Duty,
    b: Builtin,
    args: &serde_json::Value,
    k: usize,
) -> Result<ToolOutput, LogError> {
    macro_rules! arg {
        ($key:expr) => {
            match str_arg(args, $key) {
                Ok(v) => v,
                Err(out) => return Ok(out),
            }
        };
    }
    let say = |step: String, kind: Kind, to: Recipient, text: &str| {
        let d = Duty { step: Arc::from(step), ..duty.clone() };
        let mut env = envelope(me, st, &d, kind, Body::text(text));
        env.to = to;
        env
    };
    Ok(match b {
        Builtin::Send | Builtin::Broadcast => {
            let text = arg!("text");
            if text.trim().is_empty() {
                return Ok(ToolOutput::refused("`text` is empty: nothing to send"));
            }
            let to = if b == Builtin::Broadcast {
                Recipient::All
            } else {
                let name = arg!("to");
                if name == me.cfg.me.as_str() {
                    return Ok(ToolOutput::refused("you cannot send a message to yourself"));
                }
                if me.plan.peers.iter().any(|p| p.id.as_str() == name) {
                    Recipient::Peer(PeerId::from(name))
                } else if me.plan.peers.iter().any(|p| p.group.as_deref() == Some(name)) {
                    Recipient::Group(Arc::from(name))
                } else {
                    let mut groups: Vec<&str> = me.plan.peers.iter().filter_map(|p| p.group.as_deref()).collect();
                    groups.sort();
                    groups.dedup();
                    return Ok(ToolOutput::refused(format!(
                        "no peer or group is called `{name}`; peers: {}; groups: {}",
                        me.plan.peers.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", "),
                        if groups.is_empty() { "none".to_string() } else { groups.join(", ") }
                    )));
                }
            };
            let who = match &to {
                Recipient::All => "everyone".to_string(),
                Recipient::Peer(p) => p.to_string(),
                Recipient::Group(g) => format!("group {g}"),
            };
            append(me, say(format!("{}/send/{k}", duty.step), Kind::Message, to, text)).await?;
            ToolOutput::ok(format!("sent to {who}"))
        }
        Builtin::Finish => {
            let answer = arg!("answer");
            if answer.trim().is_empty() {
                return Ok(ToolOutput::refused("`answer` is empty"));
            }
            append(me, say(format!("{}/finish/{k}", duty.step), Kind::Proposal, Recipient::All, answer)).await?;
            ToolOutput::ok("proposed as the team's answer")
        }
        Builtin::BoardRead => {
            let key = arg!("key");
            match me.board().get(key).await {
                Ok(Some(e)) if e.op == crate::blackboard::BoardOp::Put => {
                    ToolOutput::ok(format!("revision {}: {}", e.revision, board_text(&e.value)))
                }
                Ok(_) => ToolOutput::ok(format!("`{key}` has no value")),
                Err(e) => ToolOutput::error(format!("blackboard: {e}")),
            }
        }
        Builtin::BoardWrite => {
            let key = arg!("key");
            let value = arg!("value");
            let bytes = serde_json::to_vec(&serde_json::json!({
                "text": value, "by": me.cfg.me.as_str(), "step": format!("{}/call/{k}", duty.step)
            }))
            .expect("board value");
            let written = match args.get("expected_revision").and_then(|r| r.as_u64()) {
                Some(rev) => me.board().update(key, bytes, rev).await,
                None => me.board().create(key, bytes).await,
            };
            match written {
                Ok(rev) => ToolOutput::ok(format!("`{key}` is now at revision {rev}")),
                Err(e) if matches!(e.kind(), BoardErrorKind::WrongLastRevision | BoardErrorKind::AlreadyExists) => {
                    // Our own write, landed before a restart, is a success.
                    match me.board().get(key).await {
                        Ok(Some(cur))
                            if serde_json::from_slice::<serde_json::Value>(&cur.value).ok().is_some_and(|v| {
                                v.get("by").and_then(|b| b.as_str()) == Some(me.cfg.me.as_str())
                                    && v.get("step").and_then(|s| s.as_str())
                                        == Some(format!("{}/call/{k}", duty.step).as_str())
                            }) =>
                        {
                            ToolOutput::ok(format!("`{key}` is now at revision {}", cur.revision))
                        }
                        Ok(cur) => ToolOutput::error(format!(
                            "conflict: `{key}` is at revision {}; read it and write again with that expected_revision",
                            cur.map_or(0, |c| c.revision)
                        )),
                        Err(e) => ToolOutput::error(format!("blackboard: {e}")),
                    }
                }
                Err(e) => ToolOutput::error(format!("blackboard: {e}")),
            }
        }
        Builtin::QueuePush => {
            let id = arg!("id");
            let task = arg!("task");
            match me.queue().push(id, serde_json::json!({ "task": task, "by": me.cfg.me.as_str() })).await {
                Ok(()) => ToolOutput::ok(format!("task `{id}` is on the queue")),
                Err(e) => ToolOutput::error(format!("work queue: {e}")),
            }
        }
        Builtin::QueueClaim => match me.queue().claim(&me.cfg.me, Duration::from_millis(50)).await {
            Ok(Some(c)) => {
                let task = c.payload.get("task").and_then(|t| t.as_str()).unwrap_or("").to_string();
                let id = c.task_id.clone();
                me.claims.lock().expect("claims lock").insert(id.clone(), c);
                ToolOutput::ok(format!("you hold task `{id}`: {task}"))
            }
            Ok(None) => ToolOutput::ok("the queue has no task for you now"),
            Err(e) => ToolOutput::error(format!("work queue: {e}")),
        },
        Builtin::QueueDone => {
            let id = arg!("id");
            let result = arg!("result");
            let claim = me.claims.lock().expect("claims lock").remove(id);
            match claim {
                None => ToolOutput::refused(format!("you hold no task `{id}` (claim it first with queue_claim)")),
                Some(c) => match me.queue().ack(&c).await {
                    Ok(()) => {
                        let d = format!("{}/done/{k}", duty.step);
                        let text = format!("task {id} done: {result}");
                        append(me, say(d, Kind::Work, Recipient::All, &text)).await?;
                        ToolOutput::ok(format!("task `{id}` is done"))
                    }
                    Err(e) => ToolOutput::error(format!("work queue: {e} (the lease may have expired)")),
                },
            }
        }
    })
}

fn board_text(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::human::{Field, Form};

    #[test]
    fn a_person_is_asked_the_approval_form_not_the_arguments() {
        let req = ApprovalRequest {
            tool: "schedule_rollout".into(),
            arguments: r#"{"percent": "10", "note": "after the {freeze}"}"#.into(),
            caller: PeerId::from("eng"),
            call_step: "turn/2/call/0".into(),
        };
        let mut call = crate::model::ChatRequest::simple("reviewer", &approval_instruction(&req));
        call.json = true;
        assert_eq!(
            Form::of(&call),
            Form::Fields(vec![
                Field::YesNo { name: "approve".into() },
                Field::Text { name: "reason".into(), optional: true },
            ])
        );
    }
}
