//! Model access: the [`ChatModel`] trait (messages in, streamed text and usage out), the
//! offline providers (`scripted`, `simulated`), and layers that wrap any model (retry,
//! timeout, concurrency limit). HTTP providers live in `roundtable-models`.
//!
//! Provider wire types never leave the provider: what goes in is a [`ChatRequest`], what
//! comes out is a [`ChatResponse`], and the peer stores the text and [`Usage`] in the
//! envelope the call produced.

pub mod layers;
pub mod program;
pub mod scripted;
pub mod simulated;
mod transcript;

pub use transcript::{History, Transcript};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::{Envelope, Kind, PeerId};
use crate::tool::{Outcome, ToolCall, ToolCallBody, ToolChoice, ToolDef, ToolResultBody};

/// Who said a message, from the point of view of the peer that calls the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    /// The result of a tool call the model asked for (`tool_call_id` names the call).
    Tool,
}

/// One message of a model's context. Content is shared with the envelope it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    /// The peer that said it (`None` for the task and for instructions).
    pub name: Option<PeerId>,
    pub content: Arc<str>,
    /// Estimated tokens of this message (see [`estimate_tokens`]).
    pub tokens: u32,
    /// Tool calls the model made in this (assistant) message.
    pub tool_calls: Arc<[ToolCall]>,
    /// For a [`Role::Tool`] message: the call it answers.
    pub tool_call_id: Option<Arc<str>>,
    /// For a [`Role::Tool`] message: the call did not succeed (an error, a refusal, a
    /// denial, an unknown outcome). Providers that can say so tell the model
    /// (Anthropic's `is_error`).
    pub tool_error: bool,
}

impl ChatMessage {
    pub fn new(role: Role, name: Option<PeerId>, content: Arc<str>) -> Self {
        let tokens = estimate_tokens(&content) + 4;
        ChatMessage { role, name, content, tokens, tool_calls: Arc::from([]), tool_call_id: None, tool_error: false }
    }

    /// An assistant message that asks for tool calls.
    pub fn tool_calls(name: Option<PeerId>, content: Arc<str>, calls: Vec<ToolCall>) -> Self {
        let mut m = ChatMessage::new(Role::Assistant, name, content);
        m.tokens += tool_call_tokens(&calls);
        m.tool_calls = calls.into();
        m
    }

    /// The result of tool call `call_id`.
    pub fn tool_result(call_id: Arc<str>, content: Arc<str>) -> Self {
        let mut m = ChatMessage::new(Role::Tool, None, content);
        m.tool_call_id = Some(call_id);
        m
    }

    /// The result of tool call `call_id`, which did not succeed.
    pub fn tool_failure(call_id: Arc<str>, content: Arc<str>) -> Self {
        let mut m = ChatMessage::tool_result(call_id, content);
        m.tool_error = true;
        m
    }
}

/// Estimated tokens of tool calls: their names and arguments.
pub fn tool_call_tokens(calls: &[ToolCall]) -> u32 {
    calls.iter().map(|c| estimate_tokens(&c.arguments) + estimate_tokens(&c.name)).sum()
}

/// An envelope as a chat message seen by `viewer`.
pub fn message_of(env: &Envelope, viewer: &PeerId) -> ChatMessage {
    if env.kind == Kind::Task {
        return ChatMessage::new(Role::User, None, env.body.text.clone());
    }
    if &env.from == viewer {
        match env.kind {
            Kind::ToolCall => {
                if let Some(call) =
                    env.body.json.as_ref().and_then(|j| serde_json::from_value::<ToolCallBody>(j.clone()).ok())
                {
                    let said = Arc::from(call.said.as_str());
                    let call = ToolCall { id: call.call_id, name: call.tool, arguments: call.arguments };
                    return ChatMessage::tool_calls(Some(env.from.clone()), said, vec![call]);
                }
            }
            Kind::ToolResult => {
                if let Some(r) =
                    env.body.json.as_ref().and_then(|j| serde_json::from_value::<ToolResultBody>(j.clone()).ok())
                {
                    let id = Arc::from(r.call_id);
                    return match r.outcome {
                        Outcome::Ok => ChatMessage::tool_result(id, env.body.text.clone()),
                        _ => ChatMessage::tool_failure(id, env.body.text.clone()),
                    };
                }
            }
            _ => {}
        }
    }
    let role = if &env.from == viewer { Role::Assistant } else { Role::User };
    ChatMessage::new(role, Some(env.from.clone()), env.body.text.clone())
}

/// Estimated tokens of an envelope in a model's context: its text, or for a
/// `tool_call` what the caller's model is sent, the tool's name and arguments (as
/// [`ChatMessage::tool_calls`] counts them).
pub(crate) fn envelope_tokens(env: &Envelope) -> u32 {
    let call = match env.kind {
        Kind::ToolCall => env.body.json.as_ref().and_then(|j| serde_json::from_value::<ToolCallBody>(j.clone()).ok()),
        _ => None,
    };
    match call {
        Some(c) => estimate_tokens(&c.said) + 4 + estimate_tokens(&c.arguments) + estimate_tokens(&c.tool),
        None => estimate_tokens(&env.body.text) + 4,
    }
}

/// Called with each piece of text as it streams in.
pub type TokenSink = Arc<dyn Fn(&str) + Send + Sync>;

/// What the retry layer tells the caller about the attempts of one call.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptNotice {
    /// Attempt `attempt` of at most `of` failed; the next starts after `wait`. Any text
    /// it streamed is not part of the answer.
    Failed {
        attempt: u32,
        of: u32,
        error: String,
        wait: Duration,
        /// The wait is the provider's `Retry-After`.
        retry_after: bool,
    },
    /// Attempt `attempt` (2 or more) of at most `of` starts now.
    Started { attempt: u32, of: u32 },
}

/// Called by the retry layer around each retry.
pub type AttemptSink = Arc<dyn Fn(AttemptNotice) + Send + Sync>;

/// A model call.
#[derive(Clone)]
pub struct ChatRequest {
    /// The calling peer and the protocol step this call is for (for scripted replies,
    /// seeding, tracing).
    pub peer: PeerId,
    pub step: Arc<str>,
    /// How many calls of this kind (turns, or summaries of older rounds) this peer made
    /// before this one in the session (from the log).
    pub ordinal: u32,
    /// The protocol round the call is for, counted from 1 (0 when there is none).
    pub round: u32,
    pub system: Option<Arc<str>>,
    /// Messages before the window (a summary of older rounds).
    pub prelude: Vec<ChatMessage>,
    /// The peer's visible history, shared; only `window` of it is sent.
    pub history: Arc<Transcript>,
    pub window: std::ops::Range<usize>,
    /// A final user message: what the protocol asks of the peer now.
    pub instruction: Option<Arc<str>>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Ask for a JSON object as the answer.
    pub json: bool,
    /// The JSON Schema the answer must match, for providers that enforce one
    /// (structured output); the answer is still parsed and checked by the protocol.
    pub json_schema: Option<Arc<serde_json::Value>>,
    /// Tools the model may call (empty: none offered).
    pub tools: Arc<[ToolDef]>,
    pub tool_choice: ToolChoice,
    /// Messages after the instruction: this turn's tool calls and their results, in
    /// order, while the model works through them.
    pub tool_turns: Vec<ChatMessage>,
    pub on_token: Option<TokenSink>,
    /// Told of each failed attempt and each retry (by [`layers::Retry`]).
    pub on_attempt: Option<AttemptSink>,
}

impl fmt::Debug for ChatRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatRequest")
            .field("peer", &self.peer)
            .field("step", &self.step)
            .field("messages", &self.message_count())
            .finish_non_exhaustive()
    }
}

impl ChatRequest {
    /// A request with only an instruction (for tests and one-off calls).
    pub fn simple(peer: &str, instruction: &str) -> Self {
        ChatRequest {
            peer: PeerId::from(peer),
            step: Arc::from("call"),
            ordinal: 0,
            round: 0,
            system: None,
            prelude: Vec::new(),
            history: Arc::new(Transcript::default()),
            window: 0..0,
            instruction: Some(Arc::from(instruction)),
            temperature: None,
            max_tokens: None,
            json: false,
            json_schema: None,
            tools: Arc::from([]),
            tool_choice: ToolChoice::Auto,
            tool_turns: Vec::new(),
            on_token: None,
            on_attempt: None,
        }
    }

    /// The conversation, without the system prompt: prelude, window, instruction, then
    /// this turn's tool calls and results.
    pub fn messages(&self) -> impl Iterator<Item = ChatMessage> + '_ {
        self.prelude
            .iter()
            .cloned()
            .chain(self.history.iter(self.window.clone()).map(|e| message_of(e, &self.peer)))
            .chain(self.instruction.iter().map(|i| ChatMessage::new(Role::User, None, i.clone())))
            .chain(self.tool_turns.iter().cloned())
    }

    pub fn message_count(&self) -> usize {
        self.prelude.len() + self.window.len() + usize::from(self.instruction.is_some()) + self.tool_turns.len()
    }

    /// The last message of the conversation.
    pub fn last_message(&self) -> Option<ChatMessage> {
        if let Some(m) = self.tool_turns.last() {
            return Some(m.clone());
        }
        if let Some(i) = &self.instruction {
            return Some(ChatMessage::new(Role::User, None, i.clone()));
        }
        if !self.window.is_empty() {
            return self.history.message(self.window.end - 1, &self.peer);
        }
        self.prelude.last().cloned()
    }

    /// Estimated prompt tokens, in O(prelude) time.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        let sys = self.system.as_deref().map_or(0, |s| u64::from(estimate_tokens(s)));
        let pre: u64 = self.prelude.iter().map(|m| u64::from(m.tokens)).sum();
        let ins = self.instruction.as_deref().map_or(0, |s| u64::from(estimate_tokens(s) + 4));
        let tools: u64 = self
            .tools
            .iter()
            .map(|t| u64::from(estimate_tokens(&t.description) + estimate_tokens(&t.parameters.to_string())))
            .sum();
        let turns: u64 = self.tool_turns.iter().map(|m| u64::from(m.tokens)).sum();
        sys + pre + self.history.tokens(self.window.clone()) + ins + tools + turns
    }

    pub(crate) fn emit(&self, text: &str) {
        if let Some(sink) = &self.on_token {
            sink(text);
        }
    }
}

/// A model's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatResponse {
    pub text: String,
    /// The model that answered, as the provider names it.
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish_reason: Option<String>,
    /// Tool calls the model asked for, in the order it gave them (an answer may have
    /// both text and calls, or calls only).
    pub tool_calls: Vec<ToolCall>,
}

crate::error_kind! {
    /// What went wrong with a model call.
    pub enum ModelErrorKind {
        /// Credentials missing or refused (401/403). Not retried.
        Auth => "authentication failed",
        /// The request itself is wrong (400/404/422). Not retried.
        BadRequest => "request rejected",
        /// 429: too many requests. Retried after Retry-After.
        RateLimited => "rate limited",
        /// 5xx from the provider. Retried.
        Server => "provider error",
        /// No answer within the per-call timeout. Retried.
        Timeout => "timed out",
        /// The endpoint could not be reached. Retried.
        Transport => "endpoint unreachable",
        /// The stream ended before the answer was complete. Retried.
        Truncated => "stream cut off",
        /// The answer was empty. Retried.
        Empty => "empty answer",
        /// The answer could not be parsed. Retried.
        Malformed => "unparseable answer",
        /// The configuration is wrong (a missing API-key variable). Not retried.
        Config => "configuration error",
        /// The budget does not allow another call. Not retried.
        Budget => "budget exhausted",
    }
}

impl ModelErrorKind {
    /// Whether a retry may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ModelErrorKind::RateLimited
                | ModelErrorKind::Server
                | ModelErrorKind::Timeout
                | ModelErrorKind::Transport
                | ModelErrorKind::Truncated
                | ModelErrorKind::Empty
                | ModelErrorKind::Malformed
        )
    }
}

/// A failed model call. Messages never contain credentials.
#[derive(Clone, Debug)]
pub struct ModelError {
    pub kind: ModelErrorKind,
    pub message: String,
    /// HTTP status, when there was one.
    pub status: Option<u16>,
    /// The provider's Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
    /// Attempts made (set by the retry layer).
    pub attempts: u32,
}

impl ModelError {
    pub fn new(kind: ModelErrorKind, message: impl Into<String>) -> Self {
        ModelError { kind, message: message.into(), status: None, retry_after: None, attempts: 1 }
    }
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
    pub fn with_retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }
    pub fn kind(&self) -> ModelErrorKind {
        self.kind
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(s) = self.status {
            write!(f, " (HTTP {s})")?;
        }
        write!(f, ": {}", self.message)?;
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}

impl std::error::Error for ModelError {}

/// A chat model: messages in, streamed text and usage out.
///
/// Implementations stream text through `req.on_token` as it arrives and return the
/// whole answer with its usage. They do not retry, time out or limit concurrency: the
/// layers in [`layers`] do that around any model.
#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// The model's name as configured (for usage records and price lookup).
    fn name(&self) -> &str;
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError>;
}

#[async_trait]
impl<M: ChatModel + ?Sized> ChatModel for Arc<M> {
    fn name(&self) -> &str {
        (**self).name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        (**self).chat(req).await
    }
}

/// Turns texts into vectors (for emergent consensus by answer similarity).
#[async_trait]
pub trait Embedder: Send + Sync + 'static {
    fn name(&self) -> &str;
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// A cheap token estimate (≈ 4 characters a token) for offline models and budgets.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4).max(1)
}

/// Price per million tokens, for turning usage into money.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// US dollars per million prompt tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub prompt_per_mtok: f64,
    /// US dollars per million completion tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub completion_per_mtok: f64,
}

impl Price {
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.prompt_per_mtok + completion as f64 * self.completion_per_mtok) / 1e6
    }
}
