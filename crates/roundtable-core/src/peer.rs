//! A peer: one task with its own view of the log.
//!
//! A peer tails the session log from the start, folds every entry into its own
//! [`SessionState`], and does what that state says is its duty — call its model and
//! append the answer, or append a decision. Then it waits until its own envelope comes
//! back through the log before it looks for the next duty, so a duty is never done
//! twice. Nothing that matters lives only in the peer's memory: a peer that restarts
//! reads the log again and reaches the same state.
//!
//! # When a peer dies mid-call
//! The model call's result was not on the log, so the step is not done; whoever runs
//! the peer again (a restart, `roundtable resume`) redoes it, and the id derived from
//! (session, peer, step) keeps the log free of duplicates if the first append did land.
//! Other peers notice the missing heartbeats after the configured time and record an
//! `absent` envelope; protocols skip an absent peer's turns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::bus::Presence;
use crate::envelope::{Body, Envelope, Kind, PeerId, Recipient, Usage, now_ms};
use crate::log::{LogError, SessionLog};
use crate::model::{ChatMessage, ChatModel, ChatRequest, ModelError, Role, Transcript};
use crate::protocol::{Action, Duty};
use crate::session::{SessionState, plan_of};
use crate::team::{ContextPolicy, TeamPlan};
use crate::termination::BudgetScope;

/// What a peer tells the outside world while it works (not on the log: streaming text
/// and progress are for display only).
#[derive(Clone, Debug)]
pub enum PeerEvent {
    /// The peer started a model call for a step.
    Thinking { peer: PeerId, step: Arc<str>, round: u32 },
    /// A piece of streamed text.
    Token { peer: PeerId, step: Arc<str>, text: String },
}

pub type EventSink = Arc<dyn Fn(PeerEvent) + Send + Sync>;

/// How a peer ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerExit {
    /// The session has a stop envelope.
    Stopped,
}

/// Everything a peer needs to run.
#[derive(Clone)]
pub struct PeerConfig {
    pub me: PeerId,
    pub log: Arc<dyn SessionLog>,
    /// The peer's model, already wrapped in its layers.
    pub model: Arc<dyn ChatModel>,
    pub presence: Option<Arc<dyn Presence>>,
    pub events: Option<EventSink>,
}

/// Run one peer until the session is stopped.
pub async fn run_peer(cfg: PeerConfig) -> Result<PeerExit, LogError> {
    let mut tail = cfg.log.tail(1).await?;
    let session = cfg.log.session().clone();
    let started = Instant::now();

    // The first entry is the task, which carries the plan.
    let first = match tail.next().await {
        Some(e) => e?,
        None => return Err(LogError::new(crate::log::LogErrorKind::NotFound, "the log ended before its task")),
    };
    let plan = Arc::new(plan_of(&first.env).map_err(|e| LogError::new(crate::log::LogErrorKind::Corrupt, e))?);
    let spec = plan
        .peer(&cfg.me)
        .ok_or_else(|| LogError::new(crate::log::LogErrorKind::Rejected, format!("{} is not a peer of this team", cfg.me)))?
        .clone();
    let system: Arc<str> = Arc::from(spec.system_prompt());
    let model_spec = plan.models.get(&spec.model).cloned();
    let price = model_spec.as_ref().map(|m| m.price).unwrap_or_default();

    let mut st = SessionState::new(plan.clone(), session.clone());
    let mut view = PeerView::new(cfg.me.clone(), spec.group.clone());
    st.apply(&first);
    view.observe(&first.env);

    let hb = Duration::from_millis(plan.presence.heartbeat_ms.max(10));
    let mut tick = tokio::time::interval(hb);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wait_for_seq = 0u64;

    loop {
        // Take everything that is ready, then act once.
        tokio::select! {
            biased;
            next = tail.next() => {
                let Some(e) = next else { return Err(LogError::new(crate::log::LogErrorKind::Unavailable, "the log's tail ended")) };
                let e = e?;
                st.apply(&e);
                view.observe(&e.env);
                while let Some(Some(more)) = tail.next().now_or_never() {
                    let more = more?;
                    st.apply(&more);
                    view.observe(&more.env);
                }
            }
            _ = tick.tick() => {
                if let Some(p) = &cfg.presence {
                    if let Err(e) = p.beat(&cfg.me).await {
                        tracing::warn!(peer = %cfg.me, error = %e, "heartbeat failed");
                    }
                }
                if st.last_seq >= wait_for_seq && !st.is_stopped() {
                    if let Some(duty) = absence_duty(&st, &cfg, started, &plan).await {
                        wait_for_seq = perform_post(&cfg, &st, &duty).await?;
                        continue;
                    }
                }
            }
        }
        if st.is_stopped() {
            return Ok(PeerExit::Stopped);
        }
        if st.last_seq < wait_for_seq {
            continue;
        }
        let Some(duty) = st.duties(&cfg.me, now_ms()).into_iter().next() else { continue };
        wait_for_seq = match &duty.action {
            Action::Post { .. } => perform_post(&cfg, &st, &duty).await?,
            Action::Speak { instruction, json } => {
                let req = ChatRequest {
                    peer: cfg.me.clone(),
                    step: duty.step.clone(),
                    ordinal: st.ordinal(&cfg.me),
                    system: Some(system.clone()),
                    prelude: view.prelude(&plan.context),
                    history: view.transcript.clone(),
                    window: view.window(&plan.context),
                    instruction: instruction.clone(),
                    temperature: spec.temperature,
                    max_tokens: model_spec.as_ref().and_then(|m| m.max_tokens),
                    json: *json,
                    on_token: cfg.events.as_ref().map(|ev| {
                        let ev = ev.clone();
                        let (peer, step) = (cfg.me.clone(), duty.step.clone());
                        Arc::new(move |t: &str| ev(PeerEvent::Token { peer: peer.clone(), step: step.clone(), text: t.to_string() }))
                            as crate::model::TokenSink
                    }),
                };
                let est = req.estimated_prompt_tokens();
                match plan.budget.allows(&st.tally, &cfg.me, est, price.cost(est, 0), st.elapsed_ms(now_ms())) {
                    Err((BudgetScope::Session, why)) => {
                        let best = st.best_answer();
                        let stop = st.stop_duty(why, best, Vec::new());
                        perform_post(&cfg, &st, &stop).await?
                    }
                    Err((BudgetScope::Peer, why)) => {
                        let env = failure_envelope(&st, &cfg.me, &duty, &why, serde_json::json!({"error": "budget", "scope": "peer"}), None);
                        cfg.log.append(env).await?.seq
                    }
                    Ok(()) => {
                        if let Some(ev) = &cfg.events {
                            ev(PeerEvent::Thinking { peer: cfg.me.clone(), step: duty.step.clone(), round: duty.round });
                        }
                        let turn = turn_span(&cfg, &st, &duty).await;
                        let chat = chat_span(&turn, &cfg, &spec, model_spec.as_ref(), &req);
                        let t0 = Instant::now();
                        let result = cfg.model.chat(&req).instrument(chat.clone()).await;
                        drop(req);
                        let latency_ms = t0.elapsed().as_millis() as u64;
                        record_chat(&chat, &result, latency_ms);
                        drop(chat);
                        let model_name = cfg.model.name().to_string();
                        let mut env = match result {
                            Ok(resp) => {
                                let cost = price.cost(resp.prompt_tokens, resp.completion_tokens);
                                let usage = Usage {
                                    model: Arc::from(if resp.model.is_empty() { model_name } else { resp.model.clone() }),
                                    prompt_tokens: resp.prompt_tokens,
                                    completion_tokens: resp.completion_tokens,
                                    latency_ms,
                                    cost_usd: cost,
                                    calls: 1,
                                };
                                let mut body = Body::text(resp.text.as_str());
                                if *json {
                                    body.json = parse_json_answer(&resp.text);
                                }
                                let mut env = Envelope::new(&session, &cfg.me, duty.step.clone(), duty.kind, duty.to.clone(), body)
                                    .with_round(duty.round)
                                    .with_parents(duty.parents.clone())
                                    .with_usage(usage);
                                env.lamport = st.lamport + 1;
                                env
                            }
                            Err(e) => model_failure(&st, &cfg.me, &duty, &model_name, &e, latency_ms),
                        };
                        env.trace = crate::telemetry::traceparent(&turn);
                        cfg.log.append(env).instrument(turn).await?.seq
                    }
                }
            }
        };
    }
}

async fn perform_post(cfg: &PeerConfig, st: &SessionState, duty: &Duty) -> Result<u64, LogError> {
    let Action::Post { body } = &duty.action else { unreachable!("perform_post takes post duties") };
    let mut env = Envelope::new(&st.session, &cfg.me, duty.step.clone(), duty.kind, duty.to.clone(), body.clone())
        .with_round(duty.round)
        .with_parents(duty.parents.clone());
    env.id = duty.envelope_id(&st.session, &cfg.me);
    env.lamport = st.lamport + 1;
    Ok(cfg.log.append(env).await?.seq)
}

/// A peer that has not beaten within the absence timeout, if any (and it is not this
/// peer and not already recorded absent).
async fn absence_duty(st: &SessionState, cfg: &PeerConfig, started: Instant, plan: &TeamPlan) -> Option<Duty> {
    let presence = cfg.presence.as_ref()?;
    let seen = presence.last_seen().await.ok()?;
    let limit = Duration::from_millis(plan.presence.absent_after_ms);
    for p in &plan.peers {
        if p.id == cfg.me || st.absent.contains(&p.id) {
            continue;
        }
        let gone = match seen.get(&p.id) {
            Some(since) => *since > limit,
            // Never heard from: give it the timeout from when this peer started.
            None => started.elapsed() > limit,
        };
        if gone {
            return Some(st.absent_duty(&p.id));
        }
    }
    None
}

fn model_failure(st: &SessionState, me: &PeerId, duty: &Duty, model: &str, e: &ModelError, latency_ms: u64) -> Envelope {
    let json = serde_json::json!({
        "error": e.kind.to_string(),
        "status": e.status,
        "attempts": e.attempts,
        "message": e.message,
    });
    let usage = Usage { model: Arc::from(model), latency_ms, calls: e.attempts.max(1), ..Default::default() };
    failure_envelope(st, me, duty, &format!("model call failed: {e}"), json, Some(usage))
}

/// A failure recorded for a duty's step: it consumes the step, so the protocol moves on.
fn failure_envelope(
    st: &SessionState,
    me: &PeerId,
    duty: &Duty,
    text: &str,
    json: serde_json::Value,
    usage: Option<Usage>,
) -> Envelope {
    let mut env = Envelope::new(&st.session, me, duty.step.clone(), Kind::Failure, Recipient::All, Body::text(text).with_json(json))
        .with_round(duty.round)
        .with_parents(duty.parents.clone());
    env.usage = usage;
    env.lamport = st.lamport + 1;
    env
}

/// The span of one turn (GenAI `invoke_agent`): a child of the session's span named in
/// the task envelope, linked to the spans of the envelopes the turn answers, so one trace
/// spans peers in different processes.
async fn turn_span(cfg: &PeerConfig, st: &SessionState, duty: &Duty) -> tracing::Span {
    let span = tracing::info_span!(
        "turn",
        otel.name = %format!("invoke_agent {}", cfg.me),
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = %cfg.me,
        gen_ai.conversation.id = %st.session,
        roundtable.step = %duty.step,
        roundtable.round = duty.round,
    );
    if crate::telemetry::enabled() && !span.is_disabled() {
        crate::telemetry::set_parent(&span, st.task.as_ref().and_then(|t| t.trace.as_deref()));
        for parent in &duty.parents {
            if let Ok(Some(seq)) = cfg.log.seq_of(parent).await {
                for e in cfg.log.read(seq, 1).await.unwrap_or_default() {
                    crate::telemetry::add_link(&span, e.env.trace.as_deref());
                }
            }
        }
    }
    span
}

/// The span of one model call (GenAI `chat`), inside its turn.
fn chat_span(
    turn: &tracing::Span,
    cfg: &PeerConfig,
    spec: &crate::team::PeerSpec,
    model: Option<&crate::team::ModelSpec>,
    req: &ChatRequest,
) -> tracing::Span {
    let name = cfg.model.name();
    tracing::info_span!(
        parent: turn,
        "chat",
        otel.name = %format!("chat {name}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = model.map_or("unknown", |m| m.provider.kind()),
        gen_ai.request.model = %name,
        gen_ai.request.temperature = spec.temperature.map(f64::from),
        gen_ai.request.max_tokens = req.max_tokens,
        gen_ai.agent.name = %cfg.me,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        roundtable.latency_ms = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

fn record_chat(span: &tracing::Span, result: &Result<crate::model::ChatResponse, ModelError>, latency_ms: u64) {
    if span.is_disabled() {
        return;
    }
    span.record("roundtable.latency_ms", latency_ms);
    match result {
        Ok(r) => {
            span.record("gen_ai.response.model", r.model.as_str());
            span.record("gen_ai.usage.input_tokens", r.prompt_tokens);
            span.record("gen_ai.usage.output_tokens", r.completion_tokens);
            if let Some(f) = &r.finish_reason {
                span.record("gen_ai.response.finish_reasons", f.as_str());
            }
        }
        Err(e) => {
            span.record("error.type", e.kind.to_string().as_str());
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// A JSON object in a model's answer: the whole text, or the first `{…}` block in it
/// (models like to wrap JSON in prose or code fences).
pub fn parse_json_answer(text: &str) -> Option<serde_json::Value> {
    let t = text.trim();
    if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(t) {
        return Some(v);
    }
    let start = t.find('{')?;
    let end = t.rfind('}')?;
    (end > start).then(|| serde_json::from_str(&t[start..=end]).ok()).flatten().filter(serde_json::Value::is_object)
}

/// What one peer can see of the log, as chat messages.
pub struct PeerView {
    me: PeerId,
    group: Option<String>,
    /// Visible messages, shared with in-flight model calls.
    pub transcript: Arc<Transcript>,
}

impl PeerView {
    pub fn new(me: PeerId, group: Option<String>) -> Self {
        PeerView { me, group, transcript: Arc::new(Transcript::default()) }
    }

    /// Add an envelope if it belongs in this peer's context.
    pub fn observe(&mut self, env: &Envelope) {
        let in_context = matches!(
            env.kind,
            Kind::Task | Kind::Message | Kind::Proposal | Kind::Vote | Kind::Reveal | Kind::Verdict | Kind::Summary
        );
        if !in_context || !env.visible_to(&self.me, self.group.as_deref()) {
            return;
        }
        let msg = if env.kind == Kind::Task {
            ChatMessage::new(Role::User, None, env.body.text.clone())
        } else if env.from == self.me {
            ChatMessage::new(Role::Assistant, Some(env.from.clone()), env.body.text.clone())
        } else {
            ChatMessage::new(Role::User, Some(env.from.clone()), env.body.text.clone())
        };
        // No copy when no model call holds the transcript (calls finish before the next
        // entry is folded in).
        Arc::make_mut(&mut self.transcript).push(msg);
    }

    /// Messages before the window (the task, when the window leaves it out).
    pub fn prelude(&self, policy: &ContextPolicy) -> Vec<ChatMessage> {
        match policy {
            ContextPolicy::Full => Vec::new(),
            ContextPolicy::LastK { k } => {
                if self.transcript.len() > k + 1 {
                    self.transcript.messages().first().cloned().into_iter().collect()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The part of the transcript sent to the model.
    pub fn window(&self, policy: &ContextPolicy) -> std::ops::Range<usize> {
        let n = self.transcript.len();
        match policy {
            ContextPolicy::Full => 0..n,
            ContextPolicy::LastK { k } => {
                if n > k + 1 {
                    n - k..n
                } else {
                    0..n
                }
            }
        }
    }
}
