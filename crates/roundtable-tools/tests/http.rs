//! The `http` tool against a local axum server: method, URL encoding, body, a header
//! secret from the environment that never reaches the output, the response cap, the
//! timeout, non-2xx statuses and redirects.

mod common;

use std::collections::BTreeMap;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get};
use common::ctx;
use roundtable_core::tool::{HeaderValue, HttpSpec, Outcome, Tool, ToolKind, ToolOutput, ToolSpec};
use roundtable_tools::http::{HttpTool, http_client, validate};
use serde_json::{Value, json};

/// Cargo sets this for the test process; it stands for a secret in the environment.
const SECRET_VAR: &str = "CARGO_PKG_DESCRIPTION";

/// Echoes the request: method, raw path and query, the Authorization header, the body.
async fn echo(req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let plain = req.headers().get("x-plain").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    axum::Json(
        json!({"method": method, "path": path, "query": query, "authorization": auth, "plain": plain, "body": body}),
    )
    .into_response()
}

async fn server() -> String {
    let app = Router::new()
        .route("/echo/{*rest}", any(echo))
        .route("/echo", any(echo))
        .route(
            "/forever",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
                let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
                Body::from_stream(stream)
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                "late"
            }),
        )
        .route("/missing", get(|| async { (StatusCode::NOT_FOUND, "no such thing") }))
        .route("/moved", get(|| async { Redirect::temporary("http://198.51.100.1/elsewhere") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn spec(method: &str, url: String, parameters: Value) -> HttpSpec {
    HttpSpec {
        method: method.into(),
        url,
        headers: BTreeMap::new(),
        parameters,
        timeout_secs: 10.0,
        max_response_bytes: 1 << 20,
    }
}

fn tool(spec: HttpSpec) -> HttpTool {
    let decl = ToolSpec {
        name: "h".into(),
        description: "an HTTP tool".into(),
        idempotent: false,
        approve_by: None,
        kind: ToolKind::Http(spec.clone()),
    };
    HttpTool::new(&decl, &spec, http_client().unwrap()).unwrap_or_else(|p| panic!("spec refused: {p:?}"))
}

fn body(out: &ToolOutput) -> Value {
    assert_eq!(out.outcome, Outcome::Ok, "{}", out.output);
    serde_json::from_str(&out.output).unwrap_or_else(|e| panic!("{e}: {}", out.output))
}

fn id_schema() -> Value {
    json!({"type": "object", "properties": {"id": {"type": "string"}, "q": {"type": "string"}, "note": {"type": "string"}, "n": {"type": "integer"}}})
}

#[tokio::test]
async fn placeholders_are_percent_encoded_into_path_and_query() {
    let base = server().await;
    let t = tool(spec("GET", format!("{base}/echo/items/{{id}}?q={{q}}&fixed=1"), id_schema()));
    let out = t.call(&json!({"id": "a/../b c?x=1#f", "q": "1&admin=true"}), &ctx()).await;
    let got = body(&out);
    assert_eq!(got["method"], "GET");
    assert_eq!(got["path"], "/echo/items/a%2F..%2Fb%20c%3Fx%3D1%23f");
    assert_eq!(got["query"], "q=1%26admin%3Dtrue&fixed=1");
    assert_eq!(got["body"], Value::Null, "GET sends no body");
}

#[tokio::test]
async fn arguments_not_in_the_url_are_the_json_body_of_a_post() {
    let base = server().await;
    for method in ["POST", "PUT", "PATCH"] {
        let t = tool(spec(method, format!("{base}/echo/{{id}}"), id_schema()));
        let got = body(&t.call(&json!({"id": "7", "note": "hello", "n": 3}), &ctx()).await);
        assert_eq!(got["method"], method);
        assert_eq!(got["path"], "/echo/7");
        assert_eq!(got["body"], json!({"note": "hello", "n": 3}));
    }
    let t = tool(spec("DELETE", format!("{base}/echo/{{id}}"), id_schema()));
    let got = body(&t.call(&json!({"id": "7", "note": "x"}), &ctx()).await);
    assert_eq!(got["method"], "DELETE");
    assert_eq!(got["body"], Value::Null);
}

#[tokio::test]
async fn a_header_from_the_environment_is_sent_and_never_shown() {
    let secret = std::env::var(SECRET_VAR).expect("cargo sets CARGO_PKG_DESCRIPTION for tests");
    let base = server().await;
    let mut s = spec("GET", format!("{base}/echo"), json!({"type": "object"}));
    s.headers.insert("Authorization".into(), HeaderValue::Env(SECRET_VAR.into()));
    s.headers.insert("X-Plain".into(), HeaderValue::Value("visible".into()));
    let out = tool(s).call(&json!({}), &ctx()).await;
    // The server echoed the header back; the tool replaced it.
    assert!(!out.output.contains(&secret), "the secret reached the output: {}", out.output);
    let got = body(&out);
    assert_eq!(got["authorization"], "[redacted]");
    assert_eq!(got["plain"], "visible");
}

#[tokio::test]
async fn a_missing_variable_is_an_error_naming_it() {
    let base = server().await;
    let mut s = spec("GET", format!("{base}/echo"), json!({"type": "object"}));
    s.headers.insert("Authorization".into(), HeaderValue::Env("ROUNDTABLE_SURELY_UNSET_TOKEN".into()));
    let out = tool(s).call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.output, "header Authorization: environment variable ROUNDTABLE_SURELY_UNSET_TOKEN is not set");
}

#[tokio::test]
async fn an_endless_response_stops_at_the_cap() {
    let base = server().await;
    let mut s = spec("GET", format!("{base}/forever"), json!({"type": "object"}));
    s.max_response_bytes = 100_000;
    let out = tool(s).call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Ok);
    assert!(out.truncated);
    assert_eq!(out.output, format!("{}\n[response cut at 100000 bytes]", "x".repeat(100_000)));
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let base = server().await;
    let mut s = spec("GET", format!("{base}/slow"), json!({"type": "object"}));
    s.timeout_secs = 0.3;
    let out = tool(s).call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.output, "timed out after 0.3s");
}

#[tokio::test]
async fn a_non_2xx_status_is_an_error_with_the_status() {
    let base = server().await;
    let out = tool(spec("GET", format!("{base}/missing"), json!({"type": "object"}))).call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert_eq!(out.output, "HTTP 404 Not Found\nno such thing");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let base = server().await;
    let out = tool(spec("GET", format!("{base}/moved"), json!({"type": "object"}))).call(&json!({}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Error);
    assert!(out.output.starts_with("HTTP 307"), "{}", out.output);
}

#[tokio::test]
async fn arguments_that_do_not_match_are_refused_before_any_request() {
    let base = server().await;
    let t = tool(spec("GET", format!("{base}/echo/{{id}}"), id_schema()));
    let out = t.call(&json!({"id": 5}), &ctx()).await;
    assert_eq!(out.outcome, Outcome::Refused);
    assert!(out.output.contains("/id"), "{}", out.output);
}

#[test]
fn validation_keeps_scheme_and_host_literal() {
    let params = json!({"type": "object", "properties": {"host": {"type": "string"}, "x": {"type": "string"}}});
    let cases = [
        ("http://{host}/a", "url", "literal"),
        ("{x}://example.com/", "url", "literal"),
        ("example.com/{x}", "url", "not an absolute"),
        ("https://example.com:{x}/", "url", "literal"),
        ("https://example.com/a#{x}", "url", "fragment"),
        ("ftp://example.com/{x}", "url", "scheme"),
        ("https://example.com/{nope}", "url", "{nope}"),
    ];
    for (url, key, words) in cases {
        let problems = validate(&spec("GET", url.into(), params.clone()));
        assert_eq!(problems.len(), 1, "{url}: {problems:?}");
        assert_eq!(problems[0].key, key);
        assert!(problems[0].message.contains(words), "{url}: {}", problems[0]);
    }
    let problems = validate(&spec("FETCH", "https://example.com/{x}?y={host}".into(), params.clone()));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "method");
    assert!(problems[0].message.contains("GET, POST, PUT, PATCH, DELETE"));
    let mut s = spec("get", "https://example.com/{x}".into(), params);
    s.headers.insert("Bad Header".into(), HeaderValue::Value("v".into()));
    s.max_response_bytes = 0;
    let keys: Vec<String> = validate(&s).into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec!["headers.Bad Header", "max_response_bytes"]);
}
