//! The web view: a page that lists sessions and shows one live — the transcript by
//! round, the interaction graph between peers, tokens and cost per peer over time, votes,
//! and the decision that stopped it.
//!
//! The server reads only logs, through any [`LogStore`] (SQLite in another process, NATS,
//! memory). The page, its script and its styles are compiled into the binary: nothing
//! is fetched from another host. Live updates are server-sent events, one per envelope,
//! with the envelope's sequence number as the event id; a browser that reconnects sends
//! `Last-Event-ID` and the stream resumes right after it, so nothing is lost or repeated.
//!
//! Routes: `GET /` (the page), `GET /assets/*`, `GET /api/sessions`,
//! `GET /api/sessions/{id}/trace` (the causal trace as JSON), and
//! `GET /api/sessions/{id}/events` (the stream; `?from=SEQ` to start elsewhere).
//!
//! # Access
//! The page shows everything the sessions said. Served on a loopback address it may be
//! open ([`Access::Open`]); anywhere else the command line gives it a token
//! ([`Access::Token`]; generated and printed at start, as Jupyter does) and every
//! request must carry it: `?token=…` in the URL (the page's own URL, as printed), an
//! `Authorization: Bearer …` header, or the `rt_token` cookie that a page opened with
//! the right `?token=` sets (`HttpOnly`, `SameSite=Strict`) so that its script's
//! requests and event stream carry it. Anything else is `401` with no content.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use roundtable_core::SessionId;
use roundtable_core::log::{LogError, LogErrorKind, LogStore};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

#[derive(Clone)]
struct Ui {
    store: Arc<dyn LogStore>,
}

/// Who may read the web view (see the module docs).
#[derive(Clone, Debug)]
pub enum Access {
    /// Anyone who reaches the address: for loopback addresses only.
    Open,
    /// Only requests that carry this token.
    Token(Arc<str>),
}

const TOKEN_COOKIE: &str = "rt_token";

/// Equal strings, compared in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries, by URL, header or cookie, and whether it came by URL.
fn carried(req: &axum::extract::Request) -> Option<(String, bool)> {
    let by_query = req.uri().query().into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("token="));
    if let Some(t) = by_query {
        return Some((t.to_owned(), true));
    }
    let headers = req.headers();
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        return Some((t.trim().to_owned(), false));
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(TOKEN_COOKIE).and_then(|r| r.strip_prefix('=')))
        .map(|t| (t.to_owned(), false))
}

async fn require_token(
    State(token): State<Arc<str>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match carried(&req) {
        Some((t, by_url)) if same(&t, &token) => {
            let mut resp = next.run(req).await;
            if by_url {
                let cookie = format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
                }
            }
            resp
        }
        _ => (StatusCode::UNAUTHORIZED, "this web view needs its token: open the URL it printed at start\n")
            .into_response(),
    }
}

/// The web view's routes over `store`, open to anyone who reaches them.
pub fn router(store: Arc<dyn LogStore>) -> Router {
    router_with(store, Access::Open)
}

/// The web view's routes over `store`, with `access` enforced on every route.
pub fn router_with(store: Arc<dyn LogStore>, access: Access) -> Router {
    let routes = routes(store);
    match access {
        Access::Open => routes,
        Access::Token(token) => routes.layer(axum::middleware::from_fn_with_state(token, require_token)),
    }
}

fn routes(store: Arc<dyn LogStore>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/api/sessions", get(sessions))
        .route("/api/sessions/{id}/trace", get(trace))
        .route("/api/sessions/{id}/events", get(events))
        .with_state(Ui { store })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

fn problem(e: &LogError) -> Response {
    let status = match e.kind() {
        LogErrorKind::NotFound => StatusCode::NOT_FOUND,
        LogErrorKind::Corrupt | LogErrorKind::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        LogErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        LogErrorKind::Storage => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn sessions(State(ui): State<Ui>) -> Response {
    match ui.store.sessions().await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => problem(&e),
    }
}

async fn trace(State(ui): State<Ui>, Path(id): Path<String>) -> Response {
    let session = SessionId::from(id);
    let log = match ui.store.open(&session, false).await {
        Ok(l) => l,
        Err(e) => return problem(&e),
    };
    match log.read_all().await {
        Ok(entries) => axum::Json(crate::trace::Trace::build(&session, &entries)).into_response(),
        Err(e) => problem(&e),
    }
}

#[derive(serde::Deserialize)]
struct From {
    from: Option<u64>,
}

async fn events(State(ui): State<Ui>, Path(id): Path<String>, Query(q): Query<From>, headers: HeaderMap) -> Response {
    let session = SessionId::from(id);
    // A reconnecting browser names the last event it has; go on right after it.
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|last| last + 1)
        .or(q.from)
        .unwrap_or(1);
    let log = match ui.store.open(&session, false).await {
        Ok(l) => l,
        Err(e) => return problem(&e),
    };
    let tail = match log.tail(from).await {
        Ok(t) => t,
        Err(e) => return problem(&e),
    };
    let stream = tail.map(|r| {
        Ok::<_, Infallible>(match r {
            Ok(e) => Event::default()
                .id(e.seq.to_string())
                .event("envelope")
                .data(serde_json::json!({ "seq": e.seq, "env": &*e.env }).to_string()),
            Err(e) => Event::default().event("problem").data(e.to_string()),
        })
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Serve the web view on `addr` in the background, open to anyone who reaches it;
/// returns the bound address.
pub async fn serve(addr: SocketAddr, store: Arc<dyn LogStore>) -> std::io::Result<SocketAddr> {
    serve_with(addr, store, Access::Open).await
}

/// Serve the web view on `addr` in the background with `access`; returns the bound
/// address. An open view is refused on an address other than loopback.
pub async fn serve_with(addr: SocketAddr, store: Arc<dyn LogStore>, access: Access) -> std::io::Result<SocketAddr> {
    if matches!(access, Access::Open) && !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{addr} is not a loopback address: the web view needs a token there"),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router_with(store, access)).await {
            tracing::error!(error = %e, "the web view stopped");
        }
    });
    Ok(bound)
}
