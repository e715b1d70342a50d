//! The OpenAI-compatible dialect: streamed chat completions and embeddings, as spoken by
//! OpenAI, Azure OpenAI, OpenRouter, Ollama (`/v1`), vLLM, llama.cpp's server and LM
//! Studio.
//!
//! Tools go out as `tools` (`{"type":"function","function":{...}}`) and `tool_choice`,
//! only when the request offers some; streamed `tool_calls` deltas are assembled by
//! their `index` (id and name in a call's first delta, its `arguments` in pieces, several
//! calls interleaved). An answer with calls and no text is an answer, not an empty one.
//! A request's tool calls and results are written as an assistant message with
//! `tool_calls` (content `null` when it has no text) followed by `role: "tool"` messages,
//! arranged as [`crate::tools`] describes.
//!
//! Structured output: a request with a JSON schema asks for `response_format:
//! {"type":"json_schema",...}` (not strict: the protocol checks the answer anyway). A
//! server that rejects that with a 400 or 422 naming `response_format` or `json_schema`
//! is asked again, once, with `{"type":"json_object"}`, and the provider remembers not to
//! send a schema to it again; the answer is then checked by the protocol's parsing as
//! for any JSON answer.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Client, Url};
use roundtable_core::model::{
    ChatModel, ChatRequest, ChatResponse, Embedder, ModelError, ModelErrorKind, Role, estimate_tokens, tool_call_tokens,
};
use roundtable_core::tool::{ToolCall, ToolChoice};
use serde_json::{Map, Value, json};

use crate::http::{self, Ctx, Redactor, Reply};
use crate::secret::Secret;
use crate::tools;

/// Where and how to reach an OpenAI-compatible server.
#[derive(Clone)]
pub struct OpenAiConfig {
    /// Up to, not including, `/chat/completions`: `https://api.openai.com/v1`,
    /// `http://localhost:11434/v1`, `https://{resource}.openai.azure.com/openai/deployments/{deployment}`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    /// Send the key as `api-key: <key>` (Azure OpenAI) instead of
    /// `Authorization: Bearer <key>`.
    pub azure: bool,
    /// Extra headers (OpenRouter's `HTTP-Referer`, a gateway's token). Their values are
    /// treated as credentials: never logged, never in errors.
    pub headers: Vec<(String, String)>,
    /// Extra query parameters (Azure's `api-version`).
    pub query: Vec<(String, String)>,
    /// Ask for usage in the stream (`stream_options.include_usage`). Turn off for a
    /// server that rejects the field; usage is then estimated.
    pub include_usage: bool,
    /// Send the limit as `max_completion_tokens` (required by OpenAI's reasoning models)
    /// rather than `max_tokens` (understood by every compatible server).
    pub max_completion_tokens: bool,
    /// Fields merged into every request body (`top_p`, `seed`, a server's own options).
    /// The fields this crate sets take precedence.
    pub extra_body: Map<String, Value>,
    pub connect_timeout: Duration,
}

impl OpenAiConfig {
    pub const OPENAI_BASE_URL: &'static str = "https://api.openai.com/v1";

    /// A config with no key and the defaults: usage requested, `max_tokens`, 10 s to
    /// connect.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            azure: false,
            headers: Vec::new(),
            query: Vec::new(),
            include_usage: true,
            max_completion_tokens: false,
            extra_body: Map::new(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// OpenAI itself.
    pub fn openai(model: impl Into<String>, api_key: Secret) -> Self {
        OpenAiConfig { api_key: Some(api_key), ..OpenAiConfig::new(Self::OPENAI_BASE_URL, model) }
    }

    /// An Azure OpenAI deployment: `endpoint` is `https://{resource}.openai.azure.com`.
    pub fn azure(endpoint: &str, deployment: &str, api_version: &str, api_key: Secret) -> Self {
        let base = format!("{}/openai/deployments/{deployment}", endpoint.trim_end_matches('/'));
        OpenAiConfig {
            api_key: Some(api_key),
            azure: true,
            query: vec![("api-version".to_owned(), api_version.to_owned())],
            ..OpenAiConfig::new(base, deployment)
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .field("azure", &self.azure)
            .field("headers", &names(&self.headers))
            .field("query", &names(&self.query))
            .field("include_usage", &self.include_usage)
            .field("max_completion_tokens", &self.max_completion_tokens)
            .field("extra_body", &self.extra_body.keys().collect::<Vec<_>>())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Names of name/value pairs, values hidden (they may be credentials).
pub(crate) fn names(pairs: &[(String, String)]) -> Vec<String> {
    pairs.iter().map(|(k, _)| format!("{k}: ***")).collect()
}

/// What both OpenAI providers need to make a call.
struct Conn {
    model: String,
    client: Client,
    headers: HeaderMap,
    redact: Redactor,
}

impl Conn {
    fn new(cfg: &OpenAiConfig, client: Client) -> Result<Self, ModelError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = cfg.api_key.as_ref().filter(|k| !k.is_empty()) {
            if cfg.azure {
                headers.insert("api-key", http::sensitive(key.expose(), "api-key")?);
            } else {
                headers.insert(AUTHORIZATION, http::sensitive(&format!("Bearer {}", key.expose()), "authorization")?);
            }
        }
        http::extra_headers(&mut headers, &cfg.headers)?;
        Ok(Conn {
            model: cfg.model.clone(),
            client,
            headers,
            redact: Redactor::new(cfg.api_key.as_ref(), &cfg.headers, &cfg.query),
        })
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx { provider: "openai", model: &self.model, redact: &self.redact }
    }
}

/// Chat through `POST {base_url}/chat/completions`, streamed.
pub struct OpenAiChat {
    conn: Conn,
    url: Url,
    include_usage: bool,
    max_completion_tokens: bool,
    extra_body: Map<String, Value>,
    /// The server refused `response_format: json_schema` once: ask for `json_object`.
    no_json_schema: AtomicBool,
}

impl fmt::Debug for OpenAiChat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiChat")
            .field("model", &self.conn.model)
            .field("url", &http::display_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl OpenAiChat {
    /// A provider with a client of its own.
    pub fn new(cfg: OpenAiConfig) -> Result<Self, ModelError> {
        let client = http::http_client(cfg.connect_timeout)?;
        Self::with_client(cfg, client)
    }

    /// A provider sharing `client` (see [`crate::http_client`]); `cfg.connect_timeout`
    /// is then the client's business.
    pub fn with_client(cfg: OpenAiConfig, client: Client) -> Result<Self, ModelError> {
        let url = http::endpoint(&cfg.base_url, &["chat", "completions"], &cfg.query)?;
        Ok(OpenAiChat {
            conn: Conn::new(&cfg, client)?,
            url,
            include_usage: cfg.include_usage,
            max_completion_tokens: cfg.max_completion_tokens,
            extra_body: cfg.extra_body,
            no_json_schema: AtomicBool::new(false),
        })
    }

    /// The request body; `schema`: ask for `json_schema` output when the request has a
    /// schema (else `json_object`).
    fn body(&self, req: &ChatRequest, schema: bool) -> Value {
        let wants_json = req.json || req.json_schema.is_some();
        let mut messages = Vec::with_capacity(req.message_count() + 1);
        let mut system = req.system.as_deref().unwrap_or("").to_owned();
        // OpenAI refuses json_object mode unless the word "JSON" appears in the messages.
        if wants_json && !mentions_json(&system) && !req.messages().any(|m| mentions_json(&m.content)) {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str("Answer with a single JSON object.");
        }
        if !system.is_empty() {
            messages.push(json!({"role": "system", "content": system}));
        }
        for m in tools::arrange(req) {
            let mut msg = Map::new();
            msg.insert("role".into(), json!(role(m.role)));
            match m.role {
                Role::Tool => {
                    msg.insert("tool_call_id".into(), json!(m.tool_call_id.as_deref().unwrap_or("")));
                    msg.insert("content".into(), json!(&*m.content));
                }
                Role::Assistant if !m.tool_calls.is_empty() => {
                    let content = if m.content.trim().is_empty() { Value::Null } else { json!(&*m.content) };
                    msg.insert("content".into(), content);
                    let calls: Vec<Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
                        })
                        .collect();
                    msg.insert("tool_calls".into(), Value::Array(calls));
                }
                _ => {
                    msg.insert("content".into(), json!(&*m.content));
                }
            }
            if m.role != Role::Tool
                && let Some(name) = m.name.as_ref().and_then(|n| sanitize_name(n.as_str()))
            {
                msg.insert("name".into(), json!(name));
            }
            messages.push(Value::Object(msg));
        }

        let mut body = self.extra_body.clone();
        body.insert("model".into(), json!(self.conn.model));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("stream".into(), json!(true));
        if self.include_usage {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if let Some(t) = req.temperature.filter(|t| t.is_finite()) {
            body.insert("temperature".into(), http::f32_json(t));
        }
        if let Some(n) = req.max_tokens {
            let field = if self.max_completion_tokens { "max_completion_tokens" } else { "max_tokens" };
            body.insert(field.into(), json!(n));
        }
        if !req.tools.is_empty() {
            let defs: Vec<Value> = req
                .tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                        "name": t.name, "description": t.description, "parameters": t.parameters,
                    }})
                })
                .collect();
            body.insert("tools".into(), Value::Array(defs));
            let choice = match &req.tool_choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
            };
            body.insert("tool_choice".into(), choice);
        }
        match req.json_schema.as_deref() {
            Some(s) if schema => {
                let format = json!({"name": schema_name(s), "schema": s, "strict": false});
                body.insert("response_format".into(), json!({"type": "json_schema", "json_schema": format}));
            }
            _ if wants_json => {
                body.insert("response_format".into(), json!({"type": "json_object"}));
            }
            _ => {}
        }
        Value::Object(body)
    }
}

impl OpenAiChat {
    async fn send(&self, ctx: &Ctx<'_>, req: &ChatRequest, schema: bool) -> Result<reqwest::Response, ModelError> {
        http::post(ctx, &self.conn.client, &self.url, &self.conn.headers, &self.body(req, schema)).await
    }
}

/// The `name` of a JSON schema for `response_format`: its title as OpenAI accepts a
/// name, else `answer`.
fn schema_name(schema: &Value) -> String {
    schema.get("title").and_then(Value::as_str).and_then(sanitize_name).unwrap_or_else(|| "answer".to_owned())
}

/// Whether `e` is a server saying it does not do `response_format: json_schema`.
fn rejects_json_schema(e: &ModelError) -> bool {
    let m = e.message.to_ascii_lowercase();
    e.kind == ModelErrorKind::BadRequest
        && matches!(e.status, Some(400 | 422))
        && (m.contains("response_format") || m.contains("json_schema"))
}

fn role(r: Role) -> &'static str {
    match r {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn mentions_json(s: &str) -> bool {
    s.as_bytes().windows(4).any(|w| w.eq_ignore_ascii_case(b"json"))
}

/// A peer id as OpenAI accepts a `name`: `[A-Za-z0-9_-]{1,64}`, other characters
/// replaced by `_`. `None` when nothing is left.
pub(crate) fn sanitize_name(name: &str) -> Option<String> {
    let s: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    (!s.is_empty() && s.chars().any(|c| c != '_')).then_some(s)
}

/// A tool call being put together from deltas.
#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// The answer being put together from chunks (or from one non-streamed body).
#[derive(Default)]
struct Answer {
    text: String,
    model: Option<String>,
    finish_reason: Option<String>,
    usage: Option<(u64, u64)>,
    /// Tool calls in the order they began.
    calls: Vec<PartialCall>,
    /// Which of `calls` each delta `index` is adding to now.
    slots: HashMap<u64, usize>,
}

impl Answer {
    /// Takes in one chunk (or a whole completion). Errors sent inside a 200 (OpenRouter,
    /// vLLM) fail the call.
    fn absorb(&mut self, ctx: &Ctx<'_>, v: &Value, req: &ChatRequest) -> Result<(), ModelError> {
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(in_band_error(ctx, v, e));
        }
        if let Some(m) = v.get("model").and_then(Value::as_str).filter(|m| !m.is_empty()) {
            self.model = Some(m.to_owned());
        }
        let choices = v.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        // With n > 1 only the first choice is the answer.
        if let Some(c) = choices.iter().find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0) {
            let part =
                c.get("delta").or_else(|| c.get("message")).and_then(|d| d.get("content")).and_then(Value::as_str);
            if let Some(part) = part.filter(|p| !p.is_empty()) {
                self.text.push_str(part);
                if let Some(sink) = &req.on_token {
                    sink(part);
                }
            }
            let calls = c.get("delta").or_else(|| c.get("message")).and_then(|d| d.get("tool_calls"));
            for (pos, tc) in calls.and_then(Value::as_array).into_iter().flatten().enumerate() {
                self.tool_call_part(pos, tc);
            }
            if let Some(fr) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(fr.to_owned());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            self.usage = Some((n("prompt_tokens"), n("completion_tokens")));
        }
        Ok(())
    }

    /// One piece of a tool call: a whole call (non-streamed), or a streamed delta
    /// whose id and name come first and whose arguments come in pieces. Servers that
    /// leave out `index` (each call whole in one chunk) are placed by position; a delta
    /// with a new id at an index already taken starts a new call (Ollama gives every
    /// call index 0).
    fn tool_call_part(&mut self, pos: usize, tc: &Value) {
        let index = tc.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let id = text(tc.get("id"));
        let slot = match self.slots.get(&index) {
            Some(&k) if id.as_ref().is_none_or(|id| self.calls[k].id.is_empty() || *id == self.calls[k].id) => k,
            _ => {
                self.calls.push(PartialCall::default());
                self.slots.insert(index, self.calls.len() - 1);
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[slot];
        if let Some(id) = id {
            call.id = id;
        }
        let f = tc.get("function");
        if let Some(name) = text(f.and_then(|f| f.get("name"))).filter(|_| call.name.is_empty()) {
            call.name = name;
        }
        match f.and_then(|f| f.get("arguments")) {
            Some(Value::String(piece)) => call.arguments.push_str(piece),
            // Some servers send the arguments as an object.
            Some(v @ Value::Object(_)) => call.arguments = v.to_string(),
            _ => {}
        }
    }

    fn finish(self, ctx: &Ctx<'_>, req: &ChatRequest, configured: &str) -> Result<ChatResponse, ModelError> {
        let mut tool_calls = Vec::with_capacity(self.calls.len());
        for (index, c) in self.calls.into_iter().enumerate() {
            if c.name.is_empty() {
                return Err(ctx.error(ModelErrorKind::Malformed, &format!("tool call {index} has no function name")));
            }
            let id = if c.id.is_empty() { format!("call_{index}") } else { c.id };
            tool_calls.push(ToolCall { id, name: c.name, arguments: c.arguments });
        }
        if self.text.trim().is_empty() && tool_calls.is_empty() {
            let why = match &self.finish_reason {
                Some(fr) => format!("no text in the answer (finish_reason {fr})"),
                None => "no text in the answer".to_owned(),
            };
            return Err(ctx.error(ModelErrorKind::Empty, &why));
        }
        let (prompt_tokens, completion_tokens) = match self.usage {
            Some(u) => u,
            None => {
                tracing::debug!(
                    provider = ctx.provider,
                    model = ctx.model,
                    "server sent no usage; estimating tokens from text length"
                );
                let text = if self.text.is_empty() { 0 } else { estimate_tokens(&self.text) };
                (req.estimated_prompt_tokens(), u64::from(text + tool_call_tokens(&tool_calls)))
            }
        };
        Ok(ChatResponse {
            model: self.model.unwrap_or_else(|| configured.to_owned()),
            text: self.text,
            prompt_tokens,
            completion_tokens,
            finish_reason: self.finish_reason,
            tool_calls,
        })
    }
}

/// An `{"error": ...}` object inside a successful response.
fn in_band_error(ctx: &Ctx<'_>, whole: &Value, e: &Value) -> ModelError {
    let code = e.get("code").and_then(|c| c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())));
    let kind_str = [e.get("type"), e.get("code")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let kind = match code.and_then(|c| u16::try_from(c).ok()).and_then(|c| reqwest::StatusCode::from_u16(c).ok()) {
        Some(status) if !status.is_success() => http::status_kind(status),
        _ if kind_str.contains("rate_limit") => ModelErrorKind::RateLimited,
        _ => ModelErrorKind::Server,
    };
    let text = http::error_text(whole).unwrap_or_else(|| e.to_string());
    ctx.error(kind, &text)
}

#[async_trait]
impl ChatModel for OpenAiChat {
    fn name(&self) -> &str {
        &self.conn.model
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let ctx = self.conn.ctx();
        tracing::debug!(
            provider = "openai",
            model = %self.conn.model,
            url = %http::display_url(&self.url),
            peer = %req.peer,
            step = %req.step,
            messages = req.message_count(),
            "model call"
        );
        let schema = req.json_schema.is_some() && !self.no_json_schema.load(Ordering::Relaxed);
        let resp = match self.send(&ctx, req, schema).await {
            Err(e) if schema && rejects_json_schema(&e) => {
                tracing::warn!(
                    provider = "openai",
                    model = %self.conn.model,
                    error = %e,
                    "server refused a JSON schema; asking for a JSON object instead from now on"
                );
                self.no_json_schema.store(true, Ordering::Relaxed);
                self.send(&ctx, req, false).await?
            }
            r => r?,
        };
        let mut answer = Answer::default();
        match http::open_reply(&ctx, resp).await? {
            Reply::Json(v) => answer.absorb(&ctx, &v, req)?,
            Reply::Events(mut events) => {
                let mut done = false;
                while let Some(ev) = events.next(&ctx).await? {
                    if ev.data.trim() == "[DONE]" {
                        done = true;
                        break;
                    }
                    answer.absorb(&ctx, &http::event_json(&ctx, &ev)?, req)?;
                }
                if !done {
                    return Err(events.ended_early(&ctx, "[DONE]"));
                }
            }
        }
        let r = answer.finish(&ctx, req, &self.conn.model)?;
        tracing::debug!(
            provider = "openai",
            model = %r.model,
            prompt_tokens = r.prompt_tokens,
            completion_tokens = r.completion_tokens,
            finish_reason = ?r.finish_reason,
            "model answered"
        );
        Ok(r)
    }
}

/// Embeddings through `POST {base_url}/embeddings`.
pub struct OpenAiEmbedder {
    conn: Conn,
    url: Url,
    batch: usize,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("model", &self.conn.model)
            .field("url", &http::display_url(&self.url))
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl OpenAiEmbedder {
    pub fn new(cfg: OpenAiConfig) -> Result<Self, ModelError> {
        let client = http::http_client(cfg.connect_timeout)?;
        Self::with_client(cfg, client)
    }

    pub fn with_client(cfg: OpenAiConfig, client: Client) -> Result<Self, ModelError> {
        let url = http::endpoint(&cfg.base_url, &["embeddings"], &cfg.query)?;
        Ok(OpenAiEmbedder { conn: Conn::new(&cfg, client)?, url, batch: 128 })
    }

    /// At most `n` texts per request (OpenAI takes up to 2048; local servers often
    /// fewer). Default 128.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let ctx = self.conn.ctx();
        let body = json!({"model": self.conn.model, "input": texts});
        let resp = http::post(&ctx, &self.conn.client, &self.url, &self.conn.headers, &body).await?;
        let v = match http::open_reply(&ctx, resp).await? {
            Reply::Json(v) => v,
            Reply::Events(_) => {
                return Err(ctx.error(ModelErrorKind::Malformed, "expected a JSON body, got an event stream"));
            }
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(in_band_error(&ctx, &v, e));
        }
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| ctx.error(ModelErrorKind::Malformed, "no `data` array in the response"))?;
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for (pos, item) in data.iter().enumerate() {
            let index = item.get("index").and_then(Value::as_u64).map_or(pos, |i| i as usize);
            let vector: Option<Vec<f32>> = item
                .get("embedding")
                .and_then(Value::as_array)
                .and_then(|xs| xs.iter().map(|x| x.as_f64().map(|f| f as f32)).collect());
            let vector = vector.filter(|v| !v.is_empty()).ok_or_else(|| {
                ctx.error(ModelErrorKind::Malformed, &format!("embedding {index} is not a list of numbers"))
            })?;
            match slots.get_mut(index) {
                Some(slot @ None) => *slot = Some(vector),
                _ => {
                    return Err(ctx
                        .error(ModelErrorKind::Malformed, &format!("unexpected or repeated embedding index {index}")));
                }
            }
        }
        slots.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| {
            ctx.error(
                ModelErrorKind::Malformed,
                &format!("{} texts sent, {} embeddings received", texts.len(), data.len()),
            )
        })
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn name(&self) -> &str {
        &self.conn.model
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch) {
            out.extend(self.embed_batch(batch).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("alice").as_deref(), Some("alice"));
        assert_eq!(sanitize_name("Dr. Who (2)").as_deref(), Some("Dr__Who__2_"));
        assert_eq!(sanitize_name("élan").as_deref(), Some("_lan"));
        assert_eq!(sanitize_name("..."), None);
        assert_eq!(sanitize_name(""), None);
        assert_eq!(sanitize_name(&"x".repeat(100)).map(|s| s.len()), Some(64));
    }

    #[test]
    fn json_mode_adds_the_word_json_only_when_missing() {
        let chat = OpenAiChat::new(OpenAiConfig::new("http://127.0.0.1:1/v1", "m")).unwrap();
        let mut req = ChatRequest::simple("p", "Pick a number.");
        req.json = true;
        let body = chat.body(&req, true);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["response_format"]["type"], "json_object");
        req.instruction = Some("Reply in JSON.".into());
        let body = chat.body(&req, true);
        assert_eq!(body["messages"][0]["role"], "user");
    }

    #[test]
    fn extra_body_does_not_override_own_fields() {
        let mut cfg = OpenAiConfig::new("http://127.0.0.1:1/v1", "m");
        cfg.extra_body.insert("seed".into(), json!(7));
        cfg.extra_body.insert("stream".into(), json!(false));
        cfg.max_completion_tokens = true;
        let chat = OpenAiChat::new(cfg).unwrap();
        let mut req = ChatRequest::simple("p", "hi");
        req.max_tokens = Some(50);
        let body = chat.body(&req, true);
        assert_eq!((body["seed"].clone(), body["stream"].clone()), (json!(7), json!(true)));
        assert_eq!(body["max_completion_tokens"], 50);
        assert!(body.get("max_tokens").is_none());
    }
}
