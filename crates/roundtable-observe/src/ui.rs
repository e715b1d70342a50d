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
//! `GET /api/sessions/{id}/events` (the stream; `?from=SEQ` to start elsewhere; each
//! event is `{"seq", "env", "step"}`, `step` being the envelope's step as people read
//! it, rounds counted from 1: [`roundtable_core::readable::step`]).
//!
//! # Access
//! The page shows everything the sessions said. Served on a loopback address it may be
//! open ([`Access::Open`]); anywhere else the command line gives it a token
//! ([`Access::Token`]; generated and printed at start, as Jupyter does) and every
//! request must carry it: `?token=…` in the URL (the page's own URL, as printed), an
//! `Authorization: Bearer …` header, or the `rt_token` cookie that a page opened with
//! the right `?token=` sets (`HttpOnly`, `SameSite=Strict`) so that its script's
//! requests and event stream carry it. Anything else is `401` with no content.
//!
//! # Acting
//! With an [`Acting`] (the command line gives one when asked, `roundtable ui --act`), a
//! person can also take a human peer's seat from the page, see what the peer is asked,
//! answer, interject and leave: the seat is held by a
//! [`roundtable_core::sitting::Sitting`] in this process, taken as `roundtable join`
//! takes it (the same lease, so a second holder, terminal or browser, is refused).
//! Without one those routes do not exist and the server only reads.
//!
//! Everything that acts needs the token, even on loopback where reading may be open: a
//! bearer header or the `rt_token` cookie (set by opening the page with `?token=`; never
//! taken from a URL on a write). Writes are `POST` with a JSON body and must also carry
//! the `X-Roundtable-Csrf` header with the value `GET /api/act` returns (a cross-site
//! page can neither read that answer nor send a custom header without a preflight this
//! server never grants); a request whose `Origin` is not this server's own or whose
//! `Sec-Fetch-Site` is not `same-origin` is refused, as is any body that is not
//! `application/json` (so no HTML form can post). The browser names only a session, a
//! seat and its answers: never a file, an endpoint, a command or a secret.
//!
//! Routes: `GET /api/act` (`{"csrf": …}`), `POST /api/seats` (`{"session", "peer"}`:
//! take a seat, answers `{"seat": HANDLE}`), `GET /api/seats/{seat}` (the question
//! asked now — its `step` as the log names it, which an answer gives back, and its
//! `label` for people — notices, whether the session is over), and `POST
//! /api/seats/{seat}/answer | say | leave`. A seat whose page stopped asking for its
//! idle time ([`IDLE`] unless set) is left. Seats end with the server: a page reloaded
//! after a restart is told so and takes its seat again (once the old holder's lease has
//! lapsed); the token is the same only when the command line gave it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use roundtable_core::human::{Field, Form, Question, check_approval, check_text};
use roundtable_core::log::{LogError, LogErrorKind, LogStore};
use roundtable_core::readable;
use roundtable_core::sitting::{SeatEvent, SitError, Sitting};
use roundtable_core::{PeerId, Recipient, SessionId};
use tokio::sync::mpsc::UnboundedReceiver;

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
            if by_url && let Some(v) = token_cookie(&token) {
                resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
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
    router_acting(store, access, None)
}

/// The web view's routes over `store`, with `access` enforced on every route, and the
/// routes that act when `acting` is given (see the module docs).
pub fn router_acting(store: Arc<dyn LogStore>, access: Access, acting: Option<Acting>) -> Router {
    let mut routes = routes(store);
    if let Some(acting) = acting {
        let token = acting.desks.token.clone();
        routes = routes.merge(acting.routes());
        if matches!(access, Access::Open) {
            // Reading is open, acting is not: the page opened with the token keeps it.
            routes = routes.layer(axum::middleware::from_fn_with_state(token, remember_token));
        }
    }
    match access {
        Access::Open => routes,
        Access::Token(token) => routes.layer(axum::middleware::from_fn_with_state(token, require_token)),
    }
}

fn token_cookie(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")).ok()
}

/// On an open view with acting: a page opened with the right `?token=` gets the cookie.
async fn remember_token(
    State(token): State<Arc<str>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let set = matches!(carried(&req), Some((t, true)) if same(&t, &token));
    let mut resp = next.run(req).await;
    if set && let Some(v) = token_cookie(&token) {
        resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
    }
    resp
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
            Ok(e) => Event::default().id(e.seq.to_string()).event("envelope").data(
                serde_json::json!({ "seq": e.seq, "env": &*e.env, "step": readable::step(&e.env.step) }).to_string(),
            ),
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
    serve_acting(addr, store, access, None).await
}

/// Like [`serve_with`], with the routes that act when `acting` is given.
pub async fn serve_acting(
    addr: SocketAddr,
    store: Arc<dyn LogStore>,
    access: Access,
    acting: Option<Acting>,
) -> std::io::Result<SocketAddr> {
    if matches!(access, Access::Open) && !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{addr} is not a loopback address: the web view needs a token there"),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router_acting(store, access, acting)).await {
            tracing::error!(error = %e, "the web view stopped");
        }
    });
    Ok(bound)
}

// ---- Acting: seats taken from the page -------------------------------------------------

/// How long a seat stays held after its page stopped asking about it (a closed tab):
/// then it is left, and the seat is free again. The page asks every 0.7 s while it is
/// shown, but a browser slows the timers of a tab left in the background (Chromium to
/// once a minute after five minutes hidden), so the default outlasts a minute: a person
/// who switched tabs keeps the seat. `roundtable ui --act --seat-idle-secs` sets it
/// (within [`IDLE_SECS`]).
pub const IDLE: Duration = Duration::from_secs(90);

/// The idle times a seat may be given, in seconds: at least a few of the page's polls,
/// at most an hour.
pub const IDLE_SECS: std::ops::RangeInclusive<u64> = 5..=3600;

/// The header a write must carry, with the value `GET /api/act` gives.
pub const CSRF_HEADER: &str = "x-roundtable-csrf";

/// Where the web view takes seats from: the command line supplies it, taking them as
/// `roundtable join` does (the same store or server, the same leases).
#[async_trait::async_trait]
pub trait SeatSource: Send + Sync {
    /// Take `peer`'s seat of `session` (refused with the reason, as for `join`).
    async fn take(
        &self,
        session: &SessionId,
        peer: &PeerId,
    ) -> Result<(Sitting, UnboundedReceiver<SeatEvent>), SitError>;
}

/// The web view's capability to act: seats taken from the page (see the module docs).
#[derive(Clone)]
pub struct Acting {
    desks: Arc<Desks>,
}

struct Desks {
    source: Arc<dyn SeatSource>,
    token: Arc<str>,
    csrf: String,
    /// This server's own mark, at the start of every seat handle it gives: a handle
    /// without it was given by an earlier run of the server (seats do not outlive it).
    boot: String,
    idle: Duration,
    held: Mutex<HashMap<String, Desk>>,
}

/// One seat held from a page.
struct Desk {
    session: SessionId,
    peer: PeerId,
    sitting: Option<Sitting>,
    /// The question asked now, and how many were asked (so the page knows a new one).
    question: Option<Question>,
    asked: u64,
    notices: Vec<String>,
    over: bool,
    failed: Option<String>,
    seen: tokio::time::Instant,
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Acting {
    /// Seats from `source`; every request that acts must carry `token`.
    pub fn new(source: Arc<dyn SeatSource>, token: Arc<str>) -> Acting {
        Acting::with_idle(source, token, IDLE)
    }

    /// Like [`Acting::new`], leaving a seat whose page went quiet for `idle`.
    pub fn with_idle(source: Arc<dyn SeatSource>, token: Arc<str>, idle: Duration) -> Acting {
        let boot = random_hex()[..8].to_string();
        Acting {
            desks: Arc::new(Desks { source, token, csrf: random_hex(), boot, idle, held: Mutex::new(HashMap::new()) }),
        }
    }

    fn routes(&self) -> Router {
        Router::new()
            .route("/api/act", get(act_info))
            .route("/api/seats", post(take_seat))
            .route("/api/seats/{seat}", get(seat_state))
            .route("/api/seats/{seat}/answer", post(answer))
            .route("/api/seats/{seat}/say", post(interject))
            .route("/api/seats/{seat}/leave", post(leave))
            .layer(axum::middleware::from_fn_with_state(self.desks.clone(), guard))
            .with_state(self.desks.clone())
    }
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": why.into() }))).into_response()
}

/// Every acting request: the token (never from the URL); and for a write, a same-origin
/// JSON request with the CSRF header.
async fn guard(State(desks): State<Arc<Desks>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match carried(&req) {
        Some((t, false)) if same(&t, &desks.token) => {}
        _ => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "taking a seat needs the web view's token: open the URL `roundtable ui --act` printed (with ?token=)",
            );
        }
    }
    if req.method() != axum::http::Method::GET {
        let h = req.headers();
        let text = |name: &str| h.get(name).map(|v| v.to_str().unwrap_or("(not text)").to_string());
        if let Some(site) = text("sec-fetch-site")
            && site != "same-origin"
        {
            return refuse(StatusCode::FORBIDDEN, format!("refused: a {site} request may not act here"));
        }
        if let Some(origin) = text("origin") {
            let own = text("host").map(|host| format!("http://{host}"));
            if own.as_deref() != Some(origin.as_str()) {
                return refuse(StatusCode::FORBIDDEN, format!("refused: a request from {origin} may not act here"));
            }
        }
        let kind = text("content-type").unwrap_or_default();
        if kind.split(';').next().map(str::trim) != Some("application/json") {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("writes take a JSON body (Content-Type: application/json), not {kind:?}"),
            );
        }
        match text(CSRF_HEADER) {
            Some(c) if same(&c, &desks.csrf) => {}
            _ => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!("refused: a write needs the {CSRF_HEADER} header from GET /api/act"),
                );
            }
        }
    }
    next.run(req).await
}

async fn act_info(State(desks): State<Arc<Desks>>) -> Response {
    let mut resp = axum::Json(serde_json::json!({ "csrf": desks.csrf, "csrf_header": CSRF_HEADER })).into_response();
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON body of type `T`, or why not.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(bytes)
        .map_err(|e| refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("the request body: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeBody {
    session: String,
    peer: String,
}

async fn take_seat(State(desks): State<Arc<Desks>>, bytes: axum::body::Bytes) -> Response {
    let b: TakeBody = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(why) = roundtable_core::envelope::check_session_id(&b.session) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("session: {why}"));
    }
    let (session, peer) = (SessionId::from(b.session), PeerId::from(b.peer));
    let (sitting, events) = match desks.source.take(&session, &peer).await {
        Ok(t) => t,
        Err(SitError::Refused(why)) => return refuse(StatusCode::CONFLICT, why),
        Err(SitError::Store(why)) => return refuse(StatusCode::SERVICE_UNAVAILABLE, why),
    };
    let handle = format!("{}-{}", desks.boot, random_hex());
    let desk = Desk {
        session: session.clone(),
        peer: peer.clone(),
        sitting: Some(sitting),
        question: None,
        asked: 0,
        notices: Vec::new(),
        over: false,
        failed: None,
        seen: tokio::time::Instant::now(),
    };
    desks.held.lock().expect("desks").insert(handle.clone(), desk);
    tokio::spawn(pump(desks.clone(), handle.clone(), events));
    axum::Json(serde_json::json!({ "seat": handle, "session": session.as_str(), "peer": peer.as_str() }))
        .into_response()
}

/// What happens at a seat, into its desk; the seat is left when its page goes quiet.
async fn pump(desks: Arc<Desks>, handle: String, mut events: UnboundedReceiver<SeatEvent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(desks.idle));
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tick.tick() => {
                let quiet = desks.held.lock().expect("desks").get(&handle).map(|d| d.seen.elapsed() >= desks.idle);
                match quiet {
                    None => return,
                    Some(true) => {
                        vacate(&desks, &handle).await;
                        return;
                    }
                    Some(false) => continue,
                }
            }
        };
        let mut held = desks.held.lock().expect("desks");
        let Some(d) = held.get_mut(&handle) else { return };
        match ev {
            None => {
                if !d.over && d.failed.is_none() {
                    d.failed = Some("the seat stopped".into());
                }
            }
            Some(SeatEvent::Entry(_)) => {}
            Some(SeatEvent::Question(q)) => {
                d.question = Some(q);
                d.asked += 1;
            }
            Some(SeatEvent::Skipped) => {
                if d.question.take().is_some() {
                    d.notices.push("You did not answer in time; that duty was skipped. You are still seated.".into());
                }
            }
            Some(SeatEvent::NotPosted(why)) => d.notices.push(why),
            // The question stays until the seat is left: dropping it now could fail the
            // peer's call before the peer has stopped.
            Some(SeatEvent::Over) => d.over = true,
            Some(SeatEvent::Failed(why)) => d.failed = Some(why),
        }
    }
}

/// Leave a seat: the peer stops first, then its question goes and the lease is given up.
async fn vacate(desks: &Desks, handle: &str) -> bool {
    let desk = desks.held.lock().expect("desks").remove(handle);
    let Some(mut desk) = desk else { return false };
    if let Some(s) = desk.sitting.take() {
        s.leave().await;
    }
    drop(desk.question.take());
    true
}

/// Why a seat handle is not held here: given by an earlier run of this server (its
/// seats ended with it), or left.
fn not_held(desks: &Desks, handle: &str) -> Response {
    let ours = handle.split_once('-').is_some_and(|(boot, _)| boot == desks.boot);
    let why = if ours {
        format!(
            "you do not hold this seat (you left, or the page was away longer than {} s): take it again",
            desks.idle.as_secs_f64()
        )
    } else {
        "the web view was restarted since this page took the seat, and a seat does not outlive the server \
         that held it: take it again"
            .to_string()
    };
    refuse(StatusCode::NOT_FOUND, why)
}

fn field_json(f: &Field) -> Option<serde_json::Value> {
    let (kind, optional) = match f {
        Field::Text { optional, .. } => ("text", *optional),
        Field::Fraction { .. } => ("fraction", false),
        Field::YesNo { .. } => ("yesno", false),
        Field::Fixed { .. } => return None,
    };
    Some(serde_json::json!({ "name": f.name(), "kind": kind, "optional": optional }))
}

async fn seat_state(State(desks): State<Arc<Desks>>, Path(seat): Path<String>) -> Response {
    let mut held = desks.held.lock().expect("desks");
    let Some(d) = held.get_mut(&seat) else { return not_held(&desks, &seat) };
    d.seen = tokio::time::Instant::now();
    let question = d.question.as_ref().filter(|_| !d.over && d.failed.is_none()).map(|q| {
        let form = match &q.form {
            Form::Text => serde_json::json!("text"),
            Form::Fields(fs) => fs.iter().filter_map(field_json).collect(),
        };
        let context: Vec<_> = q
            .context
            .iter()
            .map(|(who, text)| serde_json::json!({ "from": who.as_ref().map(|w| w.as_str()), "text": &**text }))
            .collect();
        serde_json::json!({
            "n": d.asked,
            "step": &*q.step,
            "label": readable::step(&q.step),
            "round": q.round,
            "instruction": q.instruction.as_deref(),
            "form": form,
            "context": context,
        })
    });
    let mut resp = axum::Json(serde_json::json!({
        "session": d.session.as_str(),
        "peer": d.peer.as_str(),
        "question": question,
        "notices": d.notices,
        "over": d.over,
        "failed": d.failed,
    }))
    .into_response();
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    /// The step of the duty answered (so an answer meant for a skipped duty is not
    /// taken for the next one).
    step: String,
    /// A free-text answer (a turn).
    answer: Option<String>,
    /// A form's fields by name (a vote, a verdict, a bid, an approval).
    fields: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The text of a form's answer, or why it is refused.
/// Whether a duty's step is the answer to an approval request (`…/approve/{k}/answer`).
fn is_approval_answer(step: &str) -> bool {
    step.strip_suffix("/answer").is_some_and(|s| s.contains("/approve/"))
}

fn check_form(fields: &[Field], given: &serde_json::Map<String, serde_json::Value>) -> Result<String, String> {
    let names: Vec<&str> = fields.iter().filter(|f| !matches!(f, Field::Fixed { .. })).map(Field::name).collect();
    if let Some(k) = given.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(format!("the form has no field {k:?}; its fields are {}", names.join(", ")));
    }
    let mut values = Vec::new();
    for f in fields {
        let typed = match given.get(f.name()) {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(serde_json::Value::Bool(b)) => (if *b { "yes" } else { "no" }).to_string(),
            Some(_) => return Err(format!("{}: a text, a number or true/false", f.name())),
        };
        values.push(f.check(&typed)?);
    }
    Ok(Form::answer_of(fields, &values))
}

async fn answer(State(desks): State<Arc<Desks>>, Path(seat): Path<String>, bytes: axum::body::Bytes) -> Response {
    let b: AnswerBody = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut held = desks.held.lock().expect("desks");
    let Some(d) = held.get_mut(&seat) else { return not_held(&desks, &seat) };
    d.seen = tokio::time::Instant::now();
    if d.over {
        return refuse(StatusCode::CONFLICT, "the session is over; there is nothing left to answer");
    }
    if let Some(why) = &d.failed {
        return refuse(StatusCode::CONFLICT, format!("the seat stopped: {why}"));
    }
    let Some(q) = &d.question else {
        return refuse(StatusCode::CONFLICT, "nothing is asked of you now (your duties appear here as they come)");
    };
    if *q.step != *b.step {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "duty {} is no longer asked (it was answered or skipped); asked now: {}",
                readable::step(&b.step),
                readable::step(&q.step)
            ),
        );
    }
    let text = match (&q.form, b.answer, b.fields) {
        (Form::Text, Some(a), None) => check_text(&a),
        (Form::Text, _, _) => Err("this duty asks for free text: give \"answer\" and no \"fields\"".to_string()),
        // An approval's answer: a denial needs a reason, as at the terminal.
        (Form::Fields(fs), None, Some(given)) if is_approval_answer(&q.step) => check_form(fs, &given).and_then(|t| {
            let v: serde_json::Value = serde_json::from_str(&t).map_err(|e| e.to_string())?;
            let approve = v.get("approve").and_then(serde_json::Value::as_bool).unwrap_or(false);
            check_approval(approve, v.get("reason").and_then(serde_json::Value::as_str).unwrap_or(""))
        }),
        (Form::Fields(fs), None, Some(given)) => check_form(fs, &given),
        (Form::Fields(fs), _, _) => {
            let names: Vec<&str> = fs.iter().filter(|f| !matches!(f, Field::Fixed { .. })).map(Field::name).collect();
            Err(format!("this duty asks for a form: give \"fields\" ({}) and no \"answer\"", names.join(", ")))
        }
    };
    match text {
        Ok(text) => {
            let q = d.question.take().expect("checked above");
            q.answer(text.clone());
            axum::Json(serde_json::json!({ "answered": text })).into_response()
        }
        Err(why) => refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {why}")),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SayBody {
    /// A peer's id, or none for everyone.
    to: Option<String>,
    text: String,
}

async fn interject(State(desks): State<Arc<Desks>>, Path(seat): Path<String>, bytes: axum::body::Bytes) -> Response {
    let b: SayBody = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut held = desks.held.lock().expect("desks");
    let Some(d) = held.get_mut(&seat) else { return not_held(&desks, &seat) };
    d.seen = tokio::time::Instant::now();
    if d.over {
        return refuse(StatusCode::CONFLICT, "the session is over; nothing more can be said in it");
    }
    let Some(sitting) = &d.sitting else { return not_held(&desks, &seat) };
    let to = match b.to.as_deref().map(str::trim) {
        None | Some("") => Recipient::All,
        Some(p) => Recipient::Peer(PeerId::from(p)),
    };
    match sitting.say(to, &b.text) {
        Ok(()) => axum::Json(serde_json::json!({ "posted": true })).into_response(),
        Err(why) => refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {why}")),
    }
}

async fn leave(State(desks): State<Arc<Desks>>, Path(seat): Path<String>) -> Response {
    if vacate(&desks, &seat).await {
        axum::Json(serde_json::json!({ "left": true })).into_response()
    } else {
        not_held(&desks, &seat)
    }
}
