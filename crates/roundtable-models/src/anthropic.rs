//! The Anthropic Messages dialect, streamed.
//!
//! Anthropic has no `name` on messages and wants strictly alternating turns that start
//! with the user, while a peer's history is many speakers in any order. So other peers'
//! words are prefixed with `name: `, consecutive same-role messages are merged, and a
//! placeholder user turn opens a history that starts with the peer's own words.
//!
//! Tools go out as `tools` (`{name, description, input_schema}`) and `tool_choice`
//! (`auto`, `any`, `tool` with a name, `none`), only when the request offers some. A
//! streamed `tool_use` block opens with its id and name; its input arrives as
//! `input_json_delta` pieces, put together per block index into the call's arguments.
//! An answer with calls and no text (`stop_reason: "tool_use"`) is an answer.
//!
//! In a request, the model's calls are `tool_use` blocks of its assistant turn, their
//! input the call's arguments parsed as a JSON object; arguments the model wrote that
//! are not a JSON object are sent as `{}` (the API takes nothing else, and the call's
//! result already told the model what was wrong). Results are `tool_result` blocks
//! (`is_error` when the call did not succeed) opening the next user turn, before any
//! text of that turn, arranged as [`crate::tools`] describes. The API has no structured
//! output of its own here: a request's JSON schema is given to the model in the system
//! prompt.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use reqwest::{Client, Url};
use roundtable_core::model::{
    ChatMessage, ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind, Role, estimate_tokens,
    tool_call_tokens,
};
use roundtable_core::tool::{ToolCall, ToolChoice};
use serde_json::{Map, Value, json};

use crate::http::{self, Ctx, Redactor, Reply};
use crate::openai::names;
use crate::secret::Secret;
use crate::tools;

/// Where and how to reach the Anthropic Messages API.
#[derive(Clone)]
pub struct AnthropicConfig {
    /// Up to, not including, `/v1/messages`. A base that already ends in `/v1` is
    /// accepted too.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    /// The `anthropic-version` header.
    pub version: String,
    /// `max_tokens` when the request has none: Anthropic requires one.
    pub default_max_tokens: u32,
    /// Extra headers (`anthropic-beta`, a gateway's token). Values are treated as
    /// credentials.
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    /// Fields merged into every request body (`top_k`, `metadata`). The fields this
    /// crate sets take precedence.
    pub extra_body: Map<String, Value>,
    pub connect_timeout: Duration,
}

impl AnthropicConfig {
    pub const BASE_URL: &'static str = "https://api.anthropic.com";
    pub const VERSION: &'static str = "2023-06-01";

    pub fn new(model: impl Into<String>, api_key: Option<Secret>) -> Self {
        AnthropicConfig {
            base_url: Self::BASE_URL.to_owned(),
            model: model.into(),
            api_key,
            version: Self::VERSION.to_owned(),
            default_max_tokens: 4096,
            headers: Vec::new(),
            query: Vec::new(),
            extra_body: Map::new(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .field("version", &self.version)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("headers", &names(&self.headers))
            .field("query", &names(&self.query))
            .field("extra_body", &self.extra_body.keys().collect::<Vec<_>>())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Chat through `POST {base_url}/v1/messages`, streamed.
pub struct AnthropicChat {
    model: String,
    client: Client,
    url: Url,
    headers: HeaderMap,
    redact: Redactor,
    default_max_tokens: u32,
    extra_body: Map<String, Value>,
}

impl fmt::Debug for AnthropicChat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicChat")
            .field("model", &self.model)
            .field("url", &http::display_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// Opens a history that starts with the peer's own words: the API wants a user turn
/// first.
const OPENING: &str = "(The conversation so far.)";
/// The only message when there is nothing but a system prompt: the API wants at least one.
const PROCEED: &str = "Proceed.";
const JSON_HINT: &str = "Answer with a single JSON object and nothing else.";

impl AnthropicChat {
    pub fn new(cfg: AnthropicConfig) -> Result<Self, ModelError> {
        let client = http::http_client(cfg.connect_timeout)?;
        Self::with_client(cfg, client)
    }

    /// A provider sharing `client` (see [`crate::http_client`]).
    pub fn with_client(cfg: AnthropicConfig, client: Client) -> Result<Self, ModelError> {
        let has_v1 = cfg.base_url.trim().trim_end_matches('/').ends_with("/v1");
        let path: &[&str] = if has_v1 { &["messages"] } else { &["v1", "messages"] };
        let url = http::endpoint(&cfg.base_url, path, &cfg.query)?;
        let mut headers = HeaderMap::new();
        if let Some(key) = cfg.api_key.as_ref().filter(|k| !k.is_empty()) {
            headers.insert("x-api-key", http::sensitive(key.expose(), "x-api-key")?);
        }
        headers.insert(
            "anthropic-version",
            HeaderValue::from_str(cfg.version.trim())
                .map_err(|_| ModelError::new(ModelErrorKind::Config, "invalid anthropic-version"))?,
        );
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        http::extra_headers(&mut headers, &cfg.headers)?;
        Ok(AnthropicChat {
            redact: Redactor::new(cfg.api_key.as_ref(), &cfg.headers, &cfg.query),
            model: cfg.model,
            client,
            url,
            headers,
            default_max_tokens: cfg.default_max_tokens,
            extra_body: cfg.extra_body,
        })
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx { provider: "anthropic", model: &self.model, redact: &self.redact }
    }

    fn body(&self, req: &ChatRequest) -> Value {
        let mut body = self.extra_body.clone();
        body.insert("model".into(), json!(self.model));
        body.insert("max_tokens".into(), json!(req.max_tokens.unwrap_or(self.default_max_tokens).max(1)));
        body.insert("stream".into(), json!(true));
        let mut system = req.system.as_deref().unwrap_or("").trim().to_owned();
        if req.json || req.json_schema.is_some() {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(JSON_HINT);
            if let Some(schema) = &req.json_schema {
                system.push_str(&format!(" It must match this JSON Schema: {schema}"));
            }
        }
        if !system.is_empty() {
            body.insert("system".into(), json!(system));
        }
        let turns: Vec<Value> = turns(req)
            .into_iter()
            .map(|(role, blocks)| json!({"role": role_str(role), "content": content(blocks)}))
            .collect();
        body.insert("messages".into(), Value::Array(turns));
        if !req.tools.is_empty() {
            let defs: Vec<Value> = req
                .tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                .collect();
            body.insert("tools".into(), Value::Array(defs));
            let choice = match &req.tool_choice {
                ToolChoice::Auto => json!({"type": "auto"}),
                ToolChoice::None => json!({"type": "none"}),
                ToolChoice::Required => json!({"type": "any"}),
                ToolChoice::Named(name) => json!({"type": "tool", "name": name}),
            };
            body.insert("tool_choice".into(), choice);
        }
        if let Some(t) = req.temperature.filter(|t| t.is_finite()) {
            // Anthropic's range is 0..=1 where OpenAI's is 0..=2.
            body.insert("temperature".into(), http::f32_json(t.clamp(0.0, 1.0)));
        }
        Value::Object(body)
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::User | Role::Tool => "user",
        Role::Assistant => "assistant",
    }
}

/// The request's messages as alternating turns of content blocks, starting with the
/// user.
fn turns(req: &ChatRequest) -> Vec<(Role, Vec<Value>)> {
    let mut out: Vec<(Role, Vec<Value>)> = Vec::new();
    for m in tools::arrange(req) {
        let role = if m.role == Role::Tool { Role::User } else { m.role };
        let blocks = blocks(req, &m);
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((r, acc)) if *r == role => {
                for b in blocks {
                    add_block(acc, b);
                }
            }
            _ => out.push((role, blocks)),
        }
    }
    match out.first() {
        None => out.push((Role::User, vec![text_block(PROCEED)])),
        Some((Role::Assistant, _)) => out.insert(0, (Role::User, vec![text_block(OPENING)])),
        Some((Role::User | Role::Tool, _)) => {}
    }
    out
}

/// One message's blocks: its text (other peers' words prefixed with their name), then
/// its tool calls; or a tool result.
fn blocks(req: &ChatRequest, m: &ChatMessage) -> Vec<Value> {
    if m.role == Role::Tool {
        let mut b = Map::new();
        b.insert("type".into(), json!("tool_result"));
        b.insert("tool_use_id".into(), json!(m.tool_call_id.as_deref().unwrap_or("")));
        if !m.content.trim().is_empty() {
            b.insert("content".into(), json!(&*m.content));
        }
        if m.tool_error {
            b.insert("is_error".into(), json!(true));
        }
        return vec![Value::Object(b)];
    }
    let mut out = Vec::new();
    // The API rejects empty text blocks.
    let content = m.content.trim();
    if !content.is_empty() {
        out.push(text_block(&match &m.name {
            Some(name) if *name != req.peer => format!("{name}: {content}"),
            _ => content.to_owned(),
        }));
    }
    out.extend(m.tool_calls.iter().map(
        |c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": tools::arguments_object(&c.arguments)}),
    ));
    out
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// Adds `b` to a turn: text that follows text joins it.
fn add_block(acc: &mut Vec<Value>, b: Value) {
    let is_text = |v: &Value| v.get("type").and_then(Value::as_str) == Some("text");
    if let (Some(last), true) = (acc.last_mut(), is_text(&b))
        && is_text(last)
    {
        let more = b.get("text").and_then(Value::as_str).unwrap_or("");
        if let Some(Value::String(t)) = last.get_mut("text") {
            t.push_str("\n\n");
            t.push_str(more);
        }
        return;
    }
    acc.push(b);
}

/// A turn's content: a plain string when it is one text block.
fn content(blocks: Vec<Value>) -> Value {
    match blocks.as_slice() {
        [b] if b.get("type").and_then(Value::as_str) == Some("text") => b.get("text").cloned().unwrap_or(Value::Null),
        _ => Value::Array(blocks),
    }
}

/// The kind of an Anthropic error type, whether it came as an event or a body.
fn error_kind(ty: &str) -> ModelErrorKind {
    match ty {
        "rate_limit_error" => ModelErrorKind::RateLimited,
        "authentication_error" | "permission_error" | "billing_error" => ModelErrorKind::Auth,
        "invalid_request_error" | "not_found_error" | "request_too_large" => ModelErrorKind::BadRequest,
        "timeout_error" => ModelErrorKind::Timeout,
        // overloaded_error, api_error, and whatever comes next.
        _ => ModelErrorKind::Server,
    }
}

/// A `tool_use` block being put together.
#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    /// `input_json_delta` pieces.
    json: String,
    /// The block's `input` as it opened (the whole input in a non-streamed message).
    input: Option<Value>,
}

#[derive(Default)]
struct Answer {
    text: String,
    model: Option<String>,
    stop_reason: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    stopped: bool,
    /// `tool_use` blocks by index.
    calls: BTreeMap<u64, PartialCall>,
}

/// All tokens of the prompt, cached or not.
fn input_tokens(u: &Value) -> Option<u64> {
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let base = n("input_tokens")?;
    Some(base + n("cache_creation_input_tokens").unwrap_or(0) + n("cache_read_input_tokens").unwrap_or(0))
}

impl Answer {
    fn push(&mut self, req: &ChatRequest, part: &str) {
        if part.is_empty() {
            return;
        }
        self.text.push_str(part);
        if let Some(sink) = &req.on_token {
            sink(part);
        }
    }

    fn usage(&mut self, u: Option<&Value>) {
        let Some(u) = u else { return };
        if let Some(n) = input_tokens(u) {
            self.input_tokens = Some(n);
        }
        if let Some(n) = u.get("output_tokens").and_then(Value::as_u64) {
            self.output_tokens = Some(n);
        }
    }

    /// One streamed event. `name` is the SSE event name, used when the data has no
    /// `type`.
    fn event(&mut self, ctx: &Ctx<'_>, req: &ChatRequest, name: Option<&str>, v: &Value) -> Result<(), ModelError> {
        let ty = v.get("type").and_then(Value::as_str).or(name).unwrap_or("");
        match ty {
            "message_start" => {
                let m = v.get("message");
                self.model = m.and_then(|m| m.get("model")).and_then(Value::as_str).map(str::to_owned);
                self.usage(m.and_then(|m| m.get("usage")));
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(block) = v.get("content_block") {
                    self.block(req, index, block);
                }
            }
            "content_block_delta" => {
                let d = v.get("delta");
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                // Thinking and signatures are not part of the answer.
                match d.and_then(|d| d.get("type")).and_then(Value::as_str) {
                    Some("text_delta") => {
                        self.push(req, d.and_then(|d| d.get("text")).and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("input_json_delta") => {
                        if let Some(call) = self.calls.get_mut(&index) {
                            call.json
                                .push_str(d.and_then(|d| d.get("partial_json")).and_then(Value::as_str).unwrap_or(""));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(sr) = v.get("delta").and_then(|d| d.get("stop_reason")).and_then(Value::as_str) {
                    self.stop_reason = Some(sr.to_owned());
                }
                self.usage(v.get("usage"));
            }
            "message_stop" => self.stopped = true,
            "error" => {
                let e = v.get("error");
                let kind = error_kind(e.and_then(|e| e.get("type")).and_then(Value::as_str).unwrap_or(""));
                let text = http::error_text(v).unwrap_or_else(|| v.to_string());
                return Err(ctx.error(kind, &text));
            }
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(())
    }

    /// A whole, non-streamed message (from a proxy that ignored `stream: true`).
    fn message(&mut self, ctx: &Ctx<'_>, req: &ChatRequest, v: &Value) -> Result<(), ModelError> {
        match v.get("type").and_then(Value::as_str) {
            Some("message") => {}
            Some("error") => return self.event(ctx, req, None, v),
            _ => {
                if v.get("error").is_some() {
                    return self.event(ctx, req, Some("error"), v);
                }
                return Err(ctx.error(ModelErrorKind::Malformed, &format!("not a message: {v}")));
            }
        }
        self.model = v.get("model").and_then(Value::as_str).map(str::to_owned);
        for (index, block) in v.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
            self.block(req, index as u64, block);
        }
        self.stop_reason = v.get("stop_reason").and_then(Value::as_str).map(str::to_owned);
        self.usage(v.get("usage"));
        self.stopped = true;
        Ok(())
    }

    /// A content block as it opens (streamed) or whole (non-streamed): text, or a
    /// `tool_use`.
    fn block(&mut self, req: &ChatRequest, index: u64, block: &Value) {
        let field = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or("");
        match field("type") {
            "text" => self.push(req, field("text")),
            "tool_use" => {
                let call = PartialCall {
                    id: field("id").to_owned(),
                    name: field("name").to_owned(),
                    json: String::new(),
                    input: block.get("input").cloned(),
                };
                self.calls.insert(index, call);
            }
            _ => {}
        }
    }

    fn finish(self, ctx: &Ctx<'_>, req: &ChatRequest, configured: &str) -> Result<ChatResponse, ModelError> {
        let mut tool_calls = Vec::with_capacity(self.calls.len());
        for (index, c) in self.calls {
            if c.name.is_empty() || c.id.is_empty() {
                return Err(ctx.error(ModelErrorKind::Malformed, &format!("tool_use block {index} has no id or name")));
            }
            let arguments = if !c.json.trim().is_empty() {
                c.json
            } else {
                c.input.filter(|i| i.is_object()).map_or_else(|| "{}".to_owned(), |i| i.to_string())
            };
            tool_calls.push(ToolCall { id: c.id, name: c.name, arguments });
        }
        if self.text.trim().is_empty() && tool_calls.is_empty() {
            let why = match &self.stop_reason {
                Some(sr) => format!("no text in the answer (stop_reason {sr})"),
                None => "no text in the answer".to_owned(),
            };
            return Err(ctx.error(ModelErrorKind::Empty, &why));
        }
        let prompt_tokens = self.input_tokens.unwrap_or_else(|| {
            tracing::debug!(provider = ctx.provider, model = ctx.model, "no input token count; estimating");
            req.estimated_prompt_tokens()
        });
        let completion_tokens = self.output_tokens.unwrap_or_else(|| {
            tracing::debug!(provider = ctx.provider, model = ctx.model, "no output token count; estimating");
            let text = if self.text.is_empty() { 0 } else { estimate_tokens(&self.text) };
            u64::from(text + tool_call_tokens(&tool_calls))
        });
        Ok(ChatResponse {
            model: self.model.unwrap_or_else(|| configured.to_owned()),
            text: self.text,
            prompt_tokens,
            completion_tokens,
            finish_reason: self.stop_reason,
            tool_calls,
        })
    }
}

#[async_trait]
impl ChatModel for AnthropicChat {
    fn name(&self) -> &str {
        &self.model
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let ctx = self.ctx();
        tracing::debug!(
            provider = "anthropic",
            model = %self.model,
            url = %http::display_url(&self.url),
            peer = %req.peer,
            step = %req.step,
            messages = req.message_count(),
            "model call"
        );
        let resp = http::post(&ctx, &self.client, &self.url, &self.headers, &self.body(req)).await?;
        let mut answer = Answer::default();
        match http::open_reply(&ctx, resp).await? {
            Reply::Json(v) => answer.message(&ctx, req, &v)?,
            Reply::Events(mut events) => {
                while let Some(ev) = events.next(&ctx).await? {
                    let v = http::event_json(&ctx, &ev)?;
                    answer.event(&ctx, req, ev.event.as_deref(), &v)?;
                    if answer.stopped {
                        break;
                    }
                }
                if !answer.stopped {
                    return Err(events.ended_early(&ctx, "message_stop"));
                }
            }
        }
        let r = answer.finish(&ctx, req, &self.model)?;
        tracing::debug!(
            provider = "anthropic",
            model = %r.model,
            prompt_tokens = r.prompt_tokens,
            completion_tokens = r.completion_tokens,
            finish_reason = ?r.finish_reason,
            "model answered"
        );
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use roundtable_core::PeerId;
    use roundtable_core::model::{ChatMessage, Transcript};

    use super::*;

    fn msg(role: Role, name: Option<&str>, text: &str) -> ChatMessage {
        ChatMessage::new(role, name.map(PeerId::from), Arc::from(text))
    }

    fn req_with(history: Vec<ChatMessage>, instruction: Option<&str>) -> ChatRequest {
        let mut t = Transcript::default();
        for m in history {
            t.push(m);
        }
        let mut r = ChatRequest::simple("me", "");
        r.window = 0..t.len();
        r.history = Arc::new(t);
        r.instruction = instruction.map(Arc::from);
        r
    }

    #[test]
    fn turns_alternate_and_start_with_user() {
        let r = req_with(
            vec![
                msg(Role::Assistant, Some("me"), "I think 4."),
                msg(Role::User, Some("bob"), "I say 5."),
                msg(Role::User, Some("carol"), "  "),
                msg(Role::User, Some("carol"), "6!"),
                msg(Role::Assistant, Some("me"), "Still 4."),
            ],
            Some("Your final answer?"),
        );
        let t = turns(&r);
        let roles: Vec<Role> = t.iter().map(|(r, _)| *r).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::Assistant, Role::User]);
        let text = |i: usize| content(t[i].1.clone());
        assert_eq!(text(0), OPENING);
        assert_eq!(text(1), "I think 4.");
        assert_eq!(text(2), "bob: I say 5.\n\ncarol: 6!");
        assert_eq!(text(4), "Your final answer?");
    }

    #[test]
    fn nothing_but_a_system_prompt_still_sends_a_message() {
        let mut r = req_with(vec![], None);
        r.system = Some("You are terse.".into());
        assert_eq!(turns(&r), vec![(Role::User, vec![text_block(PROCEED)])]);
    }

    #[test]
    fn body_has_system_on_top_and_clamped_temperature() {
        let chat = AnthropicChat::new(AnthropicConfig::new("claude-x", None)).unwrap();
        let mut r = ChatRequest::simple("me", "hi");
        r.system = Some("Be brief.".into());
        r.temperature = Some(1.4);
        r.json = true;
        let b = chat.body(&r);
        assert_eq!(b["system"], format!("Be brief.\n\n{JSON_HINT}"));
        assert_eq!(b["temperature"], 1.0);
        assert_eq!(b["max_tokens"], 4096);
        assert_eq!(b["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(chat.url.as_str(), "https://api.anthropic.com/v1/messages");
    }

    #[test]
    fn base_with_v1_is_not_doubled() {
        let mut cfg = AnthropicConfig::new("m", None);
        cfg.base_url = "https://gw.example/anthropic/v1/".into();
        assert_eq!(AnthropicChat::new(cfg).unwrap().url.as_str(), "https://gw.example/anthropic/v1/messages");
    }
}
