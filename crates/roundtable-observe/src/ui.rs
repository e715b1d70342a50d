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

/// The web view's routes over `store`.
pub fn router(store: Arc<dyn LogStore>) -> Router {
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

/// Serve the web view on `addr` in the background; returns the bound address.
pub async fn serve(addr: SocketAddr, store: Arc<dyn LogStore>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(store)).await {
            tracing::error!(error = %e, "the web view stopped");
        }
    });
    Ok(bound)
}
