//! What both dialects share: the client, endpoints, sending, reading a reply that may be
//! an event stream or a plain JSON body, and turning HTTP failures into [`ModelError`]s
//! with a short, credential-free excerpt of what the provider said.

use std::pin::Pin;
use std::sync::Once;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use roundtable_core::model::{ModelError, ModelErrorKind};
use serde_json::Value;

use crate::secret::Secret;
use crate::sse::{SseEvent, SseParser};

/// Longest provider text quoted in an error message, in characters.
const EXCERPT_CHARS: usize = 300;
/// Most of an error body read (the rest is not worth waiting for).
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// Installs rustls' `ring` provider as the process default, once. reqwest is built
/// without a provider of its own (so aws-lc-rs is never linked) and panics when it
/// builds a client without one. Safe to call any number of times; if another provider
/// was installed first, that one stays.
pub fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means some other part of the process installed one already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client for model calls: rustls with `ring`, the platform's roots, HTTP/2 when
/// the server offers it. Build one and pass it to several providers to share its
/// connection pool. No overall timeout: the `Timeout` layer owns that, since a streamed
/// answer may rightly take minutes.
pub fn http_client(connect_timeout: Duration) -> Result<Client, ModelError> {
    ensure_crypto_provider();
    Client::builder()
        .connect_timeout(connect_timeout)
        .user_agent(concat!("roundtable/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ModelError::new(ModelErrorKind::Config, format!("cannot build HTTP client: {}", chain(&e))))
}

/// `base` with `path` appended to its path (keeping any query `base` has) and `query`
/// added.
pub(crate) fn endpoint(base: &str, path: &[&str], query: &[(String, String)]) -> Result<Url, ModelError> {
    let bad = |why: &str| ModelError::new(ModelErrorKind::Config, format!("base URL {:?}: {why}", safe_url_str(base)));
    let mut url = Url::parse(base.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("not an http(s) URL"));
    }
    url.path_segments_mut().map_err(|()| bad("cannot have a path"))?.pop_if_empty().extend(path);
    if !query.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in query {
            q.append_pair(k, v);
        }
    }
    Ok(url)
}

/// A URL as it may appear in Debug output and logs: no credentials, no query.
pub(crate) fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

fn safe_url_str(s: &str) -> String {
    match Url::parse(s.trim()) {
        Ok(u) => display_url(&u),
        Err(_) => "(unparseable)".to_owned(),
    }
}

/// Headers from config. Values are marked sensitive: they may hold credentials (Azure's
/// `api-key`), and sensitive values are never indexed by HTTP/2 header compression.
pub(crate) fn extra_headers(into: &mut HeaderMap, pairs: &[(String, String)]) -> Result<(), ModelError> {
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| ModelError::new(ModelErrorKind::Config, format!("invalid header name {k:?}")))?;
        into.insert(name, sensitive(v, k)?);
    }
    Ok(())
}

pub(crate) fn sensitive(value: &str, what: &str) -> Result<HeaderValue, ModelError> {
    let mut v = HeaderValue::from_str(value.trim())
        .map_err(|_| ModelError::new(ModelErrorKind::Config, format!("invalid value for header {what:?}")))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Strings that must never appear in an error message: the key, header values, and query
/// values whose name suggests a credential.
#[derive(Clone, Default)]
pub(crate) struct Redactor(Vec<Secret>);

impl Redactor {
    pub(crate) fn new(key: Option<&Secret>, headers: &[(String, String)], query: &[(String, String)]) -> Self {
        let mut v: Vec<Secret> = key.into_iter().cloned().collect();
        v.extend(headers.iter().map(|(_, v)| Secret::new(v.trim())));
        let credential_like = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["key", "token", "secret", "sig", "auth", "password"].iter().any(|w| k.contains(w))
        };
        v.extend(query.iter().filter(|(k, _)| credential_like(k)).map(|(_, v)| Secret::new(v)));
        // Very short values would blank out ordinary words.
        v.retain(|s| s.expose().len() >= 6);
        Redactor(v)
    }

    pub(crate) fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.expose()) {
                out = out.replace(s.expose(), "***");
            }
        }
        out
    }
}

/// Who is calling, for error messages and logs.
pub(crate) struct Ctx<'a> {
    pub(crate) provider: &'static str,
    pub(crate) model: &'a str,
    pub(crate) redact: &'a Redactor,
}

impl Ctx<'_> {
    pub(crate) fn error(&self, kind: ModelErrorKind, detail: &str) -> ModelError {
        ModelError::new(kind, format!("{} {}: {}", self.provider, self.model, excerpt(&self.redact.apply(detail))))
    }
}

/// An `f32` as the decimal it was written as (`0.3`, not `0.30000001192092896`).
pub(crate) fn f32_json(x: f32) -> Value {
    x.to_string().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
}

/// `text` on one line, at most [`EXCERPT_CHARS`] characters.
pub(crate) fn excerpt(text: &str) -> String {
    let mut out = String::new();
    let mut n = 0;
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
            n += 1;
        }
        for c in word.chars() {
            if n >= EXCERPT_CHARS {
                out.push('…');
                return out;
            }
            out.push(c);
            n += 1;
        }
    }
    out
}

/// The causes of `e`, outermost first, without repeats (reqwest and hyper often wrap
/// the same words twice).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A reqwest failure. `in_body`: the response had started, so a broken connection cut
/// the answer short.
pub(crate) fn transport_error(ctx: &Ctx<'_>, e: reqwest::Error, in_body: bool) -> ModelError {
    // Query strings may carry credentials; the message never needs the URL.
    let e = e.without_url();
    let kind = if e.is_connect() {
        ModelErrorKind::Transport
    } else if e.is_timeout() {
        ModelErrorKind::Timeout
    } else if in_body || e.is_body() || e.is_decode() {
        ModelErrorKind::Truncated
    } else {
        ModelErrorKind::Transport
    };
    ctx.error(kind, &chain(&e))
}

/// The kind of a failed HTTP status.
pub(crate) fn status_kind(status: StatusCode) -> ModelErrorKind {
    match status.as_u16() {
        // 402: OpenRouter and others when the account has no credit left.
        401..=403 => ModelErrorKind::Auth,
        408 => ModelErrorKind::Timeout,
        429 => ModelErrorKind::RateLimited,
        // 529: Anthropic's "overloaded".
        500..=599 => ModelErrorKind::Server,
        400..=499 => ModelErrorKind::BadRequest,
        _ => ModelErrorKind::Server,
    }
}

/// `Retry-After` (seconds or an HTTP date), or `retry-after-ms` which OpenAI and
/// Anthropic send with finer resolution and which wins when both are there.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let from_secs = |s: f64| (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(86_400.0)));
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).and_then(|ms| from_secs(ms / 1000.0)) {
        return Some(ms);
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return from_secs(secs);
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// The human part of a provider's error body, with its code or type when it has one:
/// OpenAI `{"error":{"message","type","code"}}`, Anthropic `{"type":"error","error":
/// {"type","message"}}`, Ollama `{"error":"..."}`, vLLM `{"message","type"}`, FastAPI
/// `{"detail":"..."}`.
pub(crate) fn error_text(v: &Value) -> Option<String> {
    let obj = match v.get("error") {
        Some(Value::String(s)) => return Some(s.clone()),
        Some(e @ Value::Object(_)) => e,
        _ => v,
    };
    let message = obj.get("message").or_else(|| obj.get("detail")).and_then(Value::as_str)?;
    let tag = [obj.get("code"), obj.get("type")]
        .into_iter()
        .flatten()
        .find_map(|t| t.as_str().map(str::to_owned).or_else(|| t.as_i64().map(|n| n.to_string())))
        .filter(|t| !t.is_empty() && t != "error");
    Some(match tag {
        Some(t) => format!("{t}: {message}"),
        None => message.to_owned(),
    })
}

/// The error for a non-2xx response; reads (part of) the body for the provider's words.
pub(crate) async fn status_error(ctx: &Ctx<'_>, mut resp: reqwest::Response) -> ModelError {
    let status = resp.status();
    let wait = retry_after(resp.headers());
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let detail =
        serde_json::from_str::<Value>(&text).ok().and_then(|v| error_text(&v)).unwrap_or_else(|| text.into_owned());
    let detail =
        if detail.trim().is_empty() { status.canonical_reason().unwrap_or("no details").to_owned() } else { detail };
    ctx.error(status_kind(status), &detail).with_status(status.as_u16()).with_retry_after(wait)
}

/// POSTs `body` as JSON. Ok only for a 2xx response.
pub(crate) async fn post(
    ctx: &Ctx<'_>,
    client: &Client,
    url: &Url,
    headers: &HeaderMap,
    body: &Value,
) -> Result<reqwest::Response, ModelError> {
    let resp = client.post(url.clone()).headers(headers.clone()).json(body).send().await.map_err(|e| {
        if e.is_connect() {
            // Say where: a refused connection is most often a wrong host or port.
            let e = e.without_url();
            ctx.error(
                ModelErrorKind::Transport,
                &format!("cannot connect to {}: {}", ctx.redact.apply(&display_url(url)), chain(&e)),
            )
        } else {
            transport_error(ctx, e, false)
        }
    })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let mut err = status_error(ctx, resp).await;
    if err.status == Some(404) {
        // The server is there but the path is not: name it, and suggest the `/v1` a
        // base URL most often lacks.
        let hint = missing_version_hint(url);
        err.message =
            format!("{} (POST {}{})", err.message, ctx.redact.apply(&display_url(url)), ctx.redact.apply(&hint));
    }
    Err(err)
}

/// Endpoint paths the providers append to a base URL.
const ENDPOINT_PATHS: [&str; 3] = ["/chat/completions", "/embeddings", "/messages"];

/// `; did you mean base_url = "…/v1"?` when `url`'s path has no version segment
/// (`v1`, `v1beta`, …); empty otherwise.
fn missing_version_hint(url: &Url) -> String {
    let versioned = url.path_segments().into_iter().flatten().any(|seg| {
        let mut c = seg.chars();
        c.next() == Some('v') && c.next().is_some_and(|d| d.is_ascii_digit())
    });
    let path = url.path();
    let Some(base_path) = ENDPOINT_PATHS.iter().find_map(|p| path.strip_suffix(p)) else { return String::new() };
    if versioned {
        return String::new();
    }
    let mut base = url.clone();
    base.set_path(&format!("{}/v1", base_path.trim_end_matches('/')));
    let base = display_url(&base);
    format!("; did you mean base_url = \"{}\"?", base.trim_end_matches('/'))
}

/// A successful response: an event stream, or (from servers that ignore `stream: true`,
/// or that report errors with a 200) one JSON document.
pub(crate) enum Reply {
    Json(Value),
    Events(EventReader),
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// Reads a reply, deciding from the content type, or failing that from the first byte,
/// whether it is JSON or an event stream.
pub(crate) async fn open_reply(ctx: &Ctx<'_>, resp: reqwest::Response) -> Result<Reply, ModelError> {
    let is_json = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    let mut stream: ByteStream = Box::pin(resp.bytes_stream().map(|r| r.map(|b| b.to_vec())));
    let mut head = Vec::new();
    let json = loop {
        if is_json {
            break true;
        }
        if let Some(&b) = head.iter().find(|b: &&u8| !b.is_ascii_whitespace()) {
            break b == b'{' || b == b'[';
        }
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(transport_error(ctx, e, true)),
            None if head.is_empty() => {
                return Err(ctx.error(ModelErrorKind::Truncated, "empty response body"));
            }
            None => return Err(ctx.error(ModelErrorKind::Malformed, "blank response body")),
        }
    };
    if json {
        while let Some(chunk) = stream.next().await {
            head.extend_from_slice(&chunk.map_err(|e| transport_error(ctx, e, true))?);
        }
        return serde_json::from_slice(&head).map(Reply::Json).map_err(|e| {
            let kind = if e.is_eof() { ModelErrorKind::Truncated } else { ModelErrorKind::Malformed };
            ctx.error(kind, &format!("response is not valid JSON ({e}): {}", String::from_utf8_lossy(&head)))
        });
    }
    let mut parser = SseParser::new();
    parser.feed(&head);
    Ok(Reply::Events(EventReader { stream, parser }))
}

/// Events of a streamed reply, as they arrive.
pub(crate) struct EventReader {
    stream: ByteStream,
    parser: SseParser,
}

impl EventReader {
    pub(crate) async fn next(&mut self, ctx: &Ctx<'_>) -> Result<Option<SseEvent>, ModelError> {
        loop {
            if let Some(ev) = self.parser.pop() {
                return Ok(Some(ev));
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.parser.feed(&chunk),
                Some(Err(e)) => return Err(transport_error(ctx, e, true)),
                None => {
                    self.parser.finish();
                    return Ok(self.parser.pop());
                }
            }
        }
    }

    /// The error for a body that ended before the dialect's end marker.
    pub(crate) fn ended_early(&self, ctx: &Ctx<'_>, marker: &str) -> ModelError {
        if self.parser.looks_like_sse() || self.parser.bytes_seen() == 0 {
            ctx.error(ModelErrorKind::Truncated, &format!("stream ended without {marker}"))
        } else {
            ctx.error(ModelErrorKind::Malformed, &format!("response is not an event stream: {}", self.parser.head()))
        }
    }
}

/// Parses an event's data as JSON. A half object cut off by the end of the body is
/// Truncated; anything else unparseable is Malformed.
pub(crate) fn event_json(ctx: &Ctx<'_>, ev: &SseEvent) -> Result<Value, ModelError> {
    serde_json::from_str(&ev.data).map_err(|e| {
        let kind = if ev.at_eof { ModelErrorKind::Truncated } else { ModelErrorKind::Malformed };
        ctx.error(kind, &format!("event data is not JSON ({e}): {}", ev.data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_base_path_and_query() {
        let u = endpoint("http://localhost:11434/v1/", &["chat", "completions"], &[]).unwrap();
        assert_eq!(u.as_str(), "http://localhost:11434/v1/chat/completions");
        let u = endpoint(
            "https://r.openai.azure.com/openai/deployments/gpt4o?x=1",
            &["chat", "completions"],
            &[("api-version".into(), "2024-10-21".into())],
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions?x=1&api-version=2024-10-21"
        );
        assert_eq!(endpoint("ftp://x", &["a"], &[]).unwrap_err().kind, ModelErrorKind::Config);
        let e = endpoint("nonsense", &["a"], &[]).unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::Config);
    }

    #[test]
    fn a_base_url_without_a_version_gets_a_hint() {
        let hint = |base: &str| missing_version_hint(&endpoint(base, &["chat", "completions"], &[]).unwrap());
        assert_eq!(hint("http://127.0.0.1:8000"), "; did you mean base_url = \"http://127.0.0.1:8000/v1\"?");
        assert_eq!(hint("https://x.example/api/"), "; did you mean base_url = \"https://x.example/api/v1\"?");
        assert_eq!(hint("http://127.0.0.1:8000/v1"), "");
        assert_eq!(hint("https://x.example/v1beta/openai"), "");
        let u = endpoint("http://h:1/", &["other"], &[]).unwrap();
        assert_eq!(missing_version_hint(&u), "");
    }

    #[test]
    fn floats_stay_short() {
        assert_eq!(f32_json(0.3).to_string(), "0.3");
        assert_eq!(f32_json(1.0).to_string(), "1.0");
        assert_eq!(f32_json(f32::NAN), Value::Null);
    }

    #[test]
    fn display_url_drops_credentials_and_query() {
        let u = Url::parse("https://user:pw@h.example/v1?key=abc").unwrap();
        assert_eq!(display_url(&u), "https://h.example/v1");
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.remove("retry-after-ms");
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        h.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("-3"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn status_kinds() {
        let k = |n: u16| status_kind(StatusCode::from_u16(n).unwrap());
        assert_eq!(k(401), ModelErrorKind::Auth);
        assert_eq!(k(403), ModelErrorKind::Auth);
        assert_eq!(k(400), ModelErrorKind::BadRequest);
        assert_eq!(k(404), ModelErrorKind::BadRequest);
        assert_eq!(k(422), ModelErrorKind::BadRequest);
        assert_eq!(k(429), ModelErrorKind::RateLimited);
        assert_eq!(k(500), ModelErrorKind::Server);
        assert_eq!(k(503), ModelErrorKind::Server);
        assert_eq!(k(529), ModelErrorKind::Server);
    }

    #[test]
    fn error_texts_of_known_providers() {
        let t = |s: &str| error_text(&serde_json::from_str(s).unwrap());
        assert_eq!(
            t(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#)
                .as_deref(),
            Some("rate_limit_exceeded: Rate limit reached")
        );
        assert_eq!(
            t(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#).as_deref(),
            Some("overloaded_error: Overloaded")
        );
        assert_eq!(t(r#"{"error":"model 'x' not found"}"#).as_deref(), Some("model 'x' not found"));
        assert_eq!(
            t(r#"{"object":"error","message":"bad","type":"BadRequestError","code":400}"#).as_deref(),
            Some("400: bad")
        );
        assert_eq!(t(r#"{"detail":"Not Found"}"#).as_deref(), Some("Not Found"));
        assert_eq!(t(r#"{"ok":true}"#), None);
    }

    #[test]
    fn excerpts_are_short_single_lines() {
        assert_eq!(excerpt("  a\n\n b\tc "), "a b c");
        let long = "é".repeat(1000);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }

    #[test]
    fn redactor_hides_key_and_header_values() {
        let r = Redactor::new(
            Some(&Secret::new("sk-abcdef123")),
            &[("api-key".into(), "azure-key-999".into())],
            &[("api-version".into(), "2024-10-21".into()), ("key".into(), "gemini-key-1".into())],
        );
        assert_eq!(
            r.apply("bad key sk-abcdef123 / azure-key-999 / gemini-key-1 at 2024-10-21"),
            "bad key *** / *** / *** at 2024-10-21"
        );
    }
}
