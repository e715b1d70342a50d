//! The `http` tool: one HTTP request per call.
//!
//! - **URL.** `{name}` placeholders are allowed in the path and the query only, and
//!   are filled percent-encoded (everything but `A-Z a-z 0-9 - . _ ~`), so a value can
//!   never add a path segment, a query pair or a fragment. The scheme and host are
//!   literal (checked by [`validate`]); redirects are not followed, so nothing from
//!   the wire chooses where a request goes (a 3xx is an error result).
//! - **Body.** For POST, PUT and PATCH, the arguments not used in the URL are sent as
//!   a JSON object. GET and DELETE send no body.
//! - **Headers.** A literal value, or an environment variable read when the call is
//!   made. A variable that is not set is an error result naming the variable. Values
//!   from the environment are secrets: marked sensitive, and replaced by `[redacted]`
//!   in anything the model is told (a server that echoes them back included).
//! - **Limits.** The whole call (connect, send, read) has the spec's timeout; the
//!   response body is streamed and reading stops at the cap (`truncated` is set).
//! - **Outcome.** A 2xx is `ok` with the body; anything else is `error`, starting with
//!   the status.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{HeaderMap, HeaderName};
use reqwest::{Client, Method, Url};
use roundtable_core::tool::{HeaderValue, HttpSpec, Outcome, Tool, ToolContext, ToolDef, ToolOutput, ToolSpec};
use serde_json::Value;

use crate::capture;
use crate::schema::ArgumentSchema;
use crate::template::{self, Piece};
use crate::{Problem, check_limits, duration_from_secs};

/// What a placeholder's value may keep unencoded: RFC 3986's unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Installs rustls' `ring` provider as the process default, once (reqwest is built
/// without a provider of its own). If another provider was installed first, it stays.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The client the HTTP and MCP tools share: rustls with `ring`, no redirects, no
/// overall timeout (each call sets its own).
pub fn http_client() -> Result<Client, String> {
    ensure_crypto_provider();
    Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("roundtable/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// An `http` tool, checked and ready to call.
#[derive(Debug)]
pub struct HttpTool {
    def: ToolDef,
    idempotent: bool,
    spec: HttpSpec,
    method: Method,
    schema: ArgumentSchema,
    timeout: Duration,
    client: Client,
    url_names: Vec<String>,
}

impl HttpTool {
    /// Builds the tool for `tool` (whose kind is `http`), or every problem of its spec.
    pub fn new(tool: &ToolSpec, spec: &HttpSpec, client: Client) -> Result<Self, Vec<Problem>> {
        let problems = validate(spec);
        if !problems.is_empty() {
            return Err(problems);
        }
        let schema = ArgumentSchema::new(&spec.parameters).map_err(|m| vec![Problem::new("parameters", m)])?;
        let method = Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| vec![Problem::new("method", "not an HTTP method")])?;
        let timeout = duration_from_secs(spec.timeout_secs)
            .ok_or_else(|| vec![Problem::new("timeout_secs", "must be a positive number of seconds")])?;
        Ok(HttpTool {
            def: ToolDef {
                name: tool.name.clone(),
                description: tool.description.clone(),
                parameters: spec.parameters.clone(),
            },
            idempotent: tool.idempotent,
            url_names: template::names(&spec.url).map(str::to_owned).collect(),
            spec: spec.clone(),
            method,
            schema,
            timeout,
            client,
        })
    }

    /// The URL a call with `arguments` would request, or why it is refused.
    pub fn url(&self, arguments: &Value) -> Result<Url, String> {
        self.schema.check(arguments)?;
        fill_url(&self.spec.url, arguments)
    }

    fn body(&self, arguments: &Value) -> Option<Value> {
        if !matches!(self.method, Method::POST | Method::PUT | Method::PATCH) {
            return None;
        }
        let mut body = serde_json::Map::new();
        if let Value::Object(args) = arguments {
            for (k, v) in args {
                if !self.url_names.iter().any(|n| n == k) {
                    body.insert(k.clone(), v.clone());
                }
            }
        }
        Some(Value::Object(body))
    }

    /// The headers, and the secret values to keep out of outputs; or the error result
    /// for a variable that is not set.
    fn headers(&self) -> Result<(HeaderMap, Vec<String>), String> {
        let mut map = HeaderMap::new();
        let mut secrets = Vec::new();
        for (name, value) in &self.spec.headers {
            let header =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("header {name:?} is not a header name"))?;
            let (text, secret) = match value {
                HeaderValue::Value(v) => (v.clone(), false),
                HeaderValue::Env(var) => match std::env::var(var) {
                    Ok(v) => (v, true),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(format!("header {name}: environment variable {var} is not set"));
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(format!("header {name}: environment variable {var} is not valid UTF-8"));
                    }
                },
            };
            let mut hv = reqwest::header::HeaderValue::from_str(&text).map_err(|_| match value {
                HeaderValue::Env(var) => {
                    format!("header {name}: environment variable {var} holds characters a header cannot carry")
                }
                HeaderValue::Value(_) => format!("header {name}: the value holds characters a header cannot carry"),
            })?;
            if secret {
                hv.set_sensitive(true);
                if !text.is_empty() {
                    secrets.push(text);
                }
            }
            map.insert(header, hv);
        }
        Ok((map, secrets))
    }
}

#[async_trait]
impl Tool for HttpTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    async fn call(&self, arguments: &Value, _ctx: &ToolContext) -> ToolOutput {
        let url = match self.url(arguments) {
            Ok(u) => u,
            Err(why) => return ToolOutput::refused(why),
        };
        let (headers, secrets) = match self.headers() {
            Ok(h) => h,
            Err(why) => return ToolOutput::error(why),
        };
        let start = Instant::now();
        let mut request = self.client.request(self.method.clone(), url).headers(headers);
        if let Some(body) = self.body(arguments) {
            request = request.json(&body);
        }
        let cap = self.spec.max_response_bytes;
        let exchange = async {
            let response = request.send().await.map_err(|e| describe(&e))?;
            let status = response.status();
            let mut stream = response.bytes_stream();
            let mut kept = Vec::new();
            let mut truncated = false;
            let limit = usize::try_from(cap).unwrap_or(usize::MAX);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| describe(&e))?;
                let room = limit.saturating_sub(kept.len());
                if chunk.len() > room {
                    kept.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                kept.extend_from_slice(&chunk);
            }
            Ok::<_, String>((status, kept, truncated))
        };
        let result = tokio::time::timeout(self.timeout, exchange).await;
        let duration_ms = Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        let mut out = match result {
            Err(_) => ToolOutput::error(format!("timed out after {}s", self.spec.timeout_secs)),
            Ok(Err(why)) => ToolOutput::error(why),
            Ok(Ok((status, body, truncated))) => {
                let mut text = capture::text(&body, truncated);
                if truncated {
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&format!("[response cut at {cap} bytes]"));
                }
                let (outcome, text) = if status.is_success() {
                    (Outcome::Ok, text)
                } else {
                    (Outcome::Error, format!("HTTP {status}\n{text}"))
                };
                ToolOutput { outcome, output: text, exit_status: None, signal: None, duration_ms: None, truncated }
            }
        };
        out.duration_ms = duration_ms;
        out.output = redact(out.output, &secrets);
        out
    }
}

/// `text` with every secret replaced.
fn redact(mut text: String, secrets: &[String]) -> String {
    for s in secrets {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), "[redacted]");
        }
    }
    text
}

/// A transport error without headers (reqwest never puts them in its messages) and
/// without the URL's query.
fn describe(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Everything wrong with an HTTP spec, each with the key it concerns.
pub fn validate(spec: &HttpSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let schema = match ArgumentSchema::new(&spec.parameters) {
        Ok(s) => Some(s),
        Err(m) => {
            problems.push(Problem::new("parameters", m));
            None
        }
    };
    if !METHODS.iter().any(|m| m.eq_ignore_ascii_case(&spec.method)) {
        problems.push(Problem::new("method", format!("{:?} is not one of {}", spec.method, METHODS.join(", "))));
    }
    if let Err(m) = check_url_template(&spec.url) {
        problems.push(Problem::new("url", m));
    }
    if let Some(schema) = &schema {
        for name in template::names(&spec.url) {
            if !schema.properties().iter().any(|p| p == name) {
                problems.push(Problem::new(
                    "url",
                    format!(
                        "placeholder {{{name}}} names no property of parameters (declared: {})",
                        schema.properties().join(", ")
                    ),
                ));
            }
        }
    }
    for (name, value) in &spec.headers {
        let key = format!("headers.{name}");
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(Problem::new(key.clone(), "is not a valid header name"));
        }
        match value {
            HeaderValue::Value(v) => {
                if reqwest::header::HeaderValue::from_str(v).is_err() {
                    problems.push(Problem::new(key, "the value holds characters a header cannot carry"));
                }
            }
            HeaderValue::Env(var) => {
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    problems.push(Problem::new(key, format!("{var:?} is not an environment variable name")));
                }
            }
        }
    }
    check_limits(&mut problems, spec.timeout_secs, &[("max_response_bytes", spec.max_response_bytes)]);
    problems
}

/// Checks that the scheme and host are literal, placeholders appear only in the path
/// and query, and the URL (with placeholders filled) is an http(s) URL.
fn check_url_template(url: &str) -> Result<(), String> {
    let Some(scheme_end) = url.find("://") else {
        return Err(format!("{url:?} is not an absolute http(s) URL"));
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find(['/', '?', '#']).map_or(url.len(), |i| scheme_end + 3 + i);
    if template::names(&url[..authority_end]).next().is_some() {
        return Err("the scheme and host must be literal: placeholders go in the path and query only".to_owned());
    }
    if let Some(hash) = url[authority_end..].find('#')
        && template::names(&url[authority_end + hash..]).next().is_some()
    {
        return Err("placeholders go in the path and query only, not the fragment".to_owned());
    }
    let sample: String = template::pieces(url)
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => t,
            Piece::Arg(_) => "x",
        })
        .collect();
    let parsed = Url::parse(&sample).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// The URL for `arguments`: each placeholder percent-encoded. A placeholder whose
/// argument is absent is filled with nothing.
pub fn fill_url(url: &str, arguments: &Value) -> Result<Url, String> {
    let mut filled = String::with_capacity(url.len());
    for piece in template::pieces(url) {
        match piece {
            Piece::Text(t) => filled.push_str(t),
            Piece::Arg(name) => {
                let text = match arguments.get(name) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                    Some(_) => {
                        return Err(format!(
                            "argument {name:?} must be a string, a number or a boolean to fill the URL"
                        ));
                    }
                };
                filled.extend(utf8_percent_encode(&text, COMPONENT));
            }
        }
    }
    Url::parse(&filled).map_err(|e| format!("the filled URL is not valid: {e}"))
}
