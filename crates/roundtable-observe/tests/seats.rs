//! Seats taken from the web view, over HTTP: acting needs the token even on loopback,
//! writes must be same-origin JSON with the CSRF header, a seat has one holder (page or
//! terminal), answers are checked against the duty's form, and a finished session
//! takes no answer. The envelopes on the log are the person's.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use roundtable_core::log::{LogStore, MemStore};
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::sitting::SitError;
use roundtable_core::{Kind, PeerId, SessionId};
use roundtable_observe::ui::{Access, Acting, serve_acting};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A guard against hanging, not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(120);
const TOKEN: &str = "sesame-0123";

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 request, written by hand so that every header is the test's choice.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_string(), body: body.to_string() }
}

/// The view, a session of the human-review example running on it (the reviewer's seat
/// empty), and the seats.
async fn start() -> (SocketAddr, MemStore, Arc<MemSeats>, SessionId, tokio::task::JoinHandle<()>) {
    start_idle(roundtable_observe::ui::IDLE).await
}

/// [`start`], leaving a seat whose page has been quiet for `idle`.
async fn start_idle(idle: Duration) -> (SocketAddr, MemStore, Arc<MemSeats>, SessionId, tokio::task::JoinHandle<()>) {
    let store = MemStore::new();
    let seats = Arc::new(MemSeats::new(store.clone()));
    let acting = Acting::with_idle(seats.clone(), Arc::from(TOKEN), idle);
    let addr = serve_acting("127.0.0.1:0".parse().unwrap(), Arc::new(store.clone()), Access::Open, Some(acting))
        .await
        .unwrap();
    let mut plan = example("human-review.toml");
    // The team waits for the person.
    plan.peers.iter_mut().for_each(|p| p.answer_within_ms = None);
    let session = new_session_id();
    let log = store.open(&session, true).await.unwrap();
    open_session(log.as_ref(), &plan, plan.topic.as_deref().unwrap()).await.unwrap();
    let running = tokio::spawn({
        let plan = plan.clone();
        async move {
            run_peers(log, &plan, offline_models(&plan), None, None).await.unwrap();
        }
    });
    (addr, store, seats, session, running)
}

/// The headers of a well-formed write from the page.
fn page_write<'a>(csrf: &'a str, addr: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Cookie", "rt_token=sesame-0123"),
        ("Content-Type", "application/json"),
        ("X-Roundtable-Csrf", csrf),
        ("Origin", addr),
        ("Sec-Fetch-Site", "same-origin"),
    ]
}

async fn csrf(addr: SocketAddr) -> String {
    let r = http(addr, "GET", "/api/act", &[("Cookie", "rt_token=sesame-0123")], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["csrf"].as_str().unwrap().to_string()
}

/// Poll the seat until `pred` holds on its state.
async fn seat_until(addr: SocketAddr, seat: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let r = http(addr, "GET", &format!("/api/seats/{seat}"), &[("Cookie", "rt_token=sesame-0123")], "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        if pred(&v) {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "the seat never showed {what}; it shows {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acting_needs_the_token_and_a_same_origin_json_request_even_on_loopback() {
    let (addr, _store, _seats, session, _running) = start().await;
    let origin = format!("http://{addr}");
    let take = json!({ "session": session.as_str(), "peer": "reviewer" }).to_string();

    // Reading is open on loopback; acting is not.
    assert_eq!(http(addr, "GET", "/api/sessions", &[], "").await.status, 200);
    let r = http(addr, "POST", "/api/seats", &[("Content-Type", "application/json")], &take).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.error().contains("needs the web view's token"), "{}", r.body);
    assert_eq!(http(addr, "GET", "/api/act", &[], "").await.status, 401);
    let wrong = http(addr, "GET", "/api/act", &[("Cookie", "rt_token=guess")], "").await;
    assert_eq!(wrong.status, 401);
    // The token is never taken from the URL of a request that acts.
    assert_eq!(http(addr, "GET", &format!("/api/act?token={TOKEN}"), &[], "").await.status, 401);

    // The page opened with the printed URL gets the cookie.
    let page = http(addr, "GET", &format!("/?token={TOKEN}"), &[], "").await;
    assert_eq!(page.status, 200);
    assert!(
        page.head.to_lowercase().contains("set-cookie: rt_token=sesame-0123; httponly; samesite=strict"),
        "{}",
        page.head
    );
    let plain = http(addr, "GET", "/?token=guess", &[], "").await;
    assert!(!plain.head.to_lowercase().contains("set-cookie"), "a wrong token sets nothing: {}", plain.head);
    let csrf = csrf(addr).await;
    let good = page_write(&csrf, &origin);

    // Writes that a cross-site page could send are refused, and change nothing.
    let without = |name: &str| good.iter().copied().filter(|(k, _)| *k != name).collect::<Vec<_>>();
    let with = |name: &'static str, value: &'static str| {
        let mut h = without(name);
        h.push((name, value));
        h
    };
    let r = http(addr, "POST", "/api/seats", &without("X-Roundtable-Csrf"), &take).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.error().contains("x-roundtable-csrf"), "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &with("X-Roundtable-Csrf", "0000"), &take).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &with("Origin", "http://evil.example"), &take).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.error().contains("http://evil.example"), "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &with("Sec-Fetch-Site", "cross-site"), &take).await;
    assert_eq!(r.status, 403, "{}", r.body);
    for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = http(addr, "POST", "/api/seats", &with("Content-Type", kind), &take).await;
        assert_eq!(r.status, 415, "{kind}: {}", r.body);
        assert!(r.error().contains("application/json"), "{}", r.body);
    }
    let r = http(addr, "POST", "/api/seats", &without("Cookie"), &take).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &good, "session=x&peer=reviewer").await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &good, &json!({ "session": "../../etc", "peer": "reviewer" }).to_string())
        .await;
    assert_eq!(r.status, 422, "{}", r.body);

    // None of that took the seat: the page's own request does.
    let r = http(addr, "POST", "/api/seats", &good, &take).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["peer"], "reviewer");

    // Without acting the routes do not exist: the view only reads.
    let store = MemStore::new();
    let ro = roundtable_observe::ui::serve_with("127.0.0.1:0".parse().unwrap(), Arc::new(store), Access::Open)
        .await
        .unwrap();
    let r = http(ro, "GET", "/api/act", &[("Cookie", "rt_token=sesame-0123")], "").await;
    assert_eq!(r.status, 404);
    let r = http(ro, "POST", "/api/seats", &page_write(&csrf, &format!("http://{ro}")), &take).await;
    assert!(r.status == 404 || r.status == 405, "{} {}", r.status, r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_taken_from_the_page_has_one_holder_checks_answers_and_ends_with_the_session() {
    let (addr, store, seats, session, running) = start().await;
    let origin = format!("http://{addr}");
    let csrf = csrf(addr).await;
    let w = page_write(&csrf, &origin);
    let take = |peer: &str| json!({ "session": session.as_str(), "peer": peer }).to_string();

    // Seats that are not there, or not for a person.
    let r = http(addr, "POST", "/api/seats", &w, &take("nobody")).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("has no peer \"nobody\"; its human seats are: reviewer"), "{}", r.body);
    let r = http(addr, "POST", "/api/seats", &w, &take("author")).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("is a model peer"), "{}", r.body);

    let r = http(addr, "POST", "/api/seats", &w, &take("reviewer")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seat = r.json()["seat"].as_str().unwrap().to_string();
    // A second holder, from another page or from a terminal, is refused.
    let r = http(addr, "POST", "/api/seats", &w, &take("reviewer")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("seat `reviewer` is taken"), "{}", r.body);
    match seats.take_directly(&session, &PeerId::from("reviewer")).await {
        Err(SitError::Refused(why)) => assert!(why.contains("is taken"), "{why}"),
        Err(other) => panic!("refused for the wrong reason: {other}"),
        Ok(_) => panic!("a terminal took a seat the page holds"),
    }

    // The first duty: what the peer sees, the instruction, a free-text form.
    let v = seat_until(addr, &seat, "turn/1", |v| v["question"]["step"] == "turn/1").await;
    let q = &v["question"];
    assert_eq!(q["form"], "text", "{q}");
    assert!(
        q["context"].as_array().unwrap().iter().any(|c| c["from"] == "author"
            && c["text"].as_str().unwrap().starts_with("I propose shipping the new billing page")),
        "the reviewer sees the author's turn: {q}"
    );
    let path = |what: &str| format!("/api/seats/{seat}/{what}");
    let answer = |text: &str| json!({ "step": "turn/1", "answer": text }).to_string();

    // Bad answers are refused with the reason; the duty still waits.
    let r = http(addr, "POST", &path("answer"), &w, &answer("   ")).await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("refused: an empty answer is not an answer"), "{}", r.body);
    let r = http(addr, "POST", &path("answer"), &w, &answer(&"x".repeat(4_001))).await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("the answer is 4001 characters; at most 4000"), "{}", r.body);
    let r =
        http(addr, "POST", &path("answer"), &w, &json!({ "step": "turn/1", "fields": { "answer": "x" } }).to_string())
            .await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("asks for free text"), "{}", r.body);
    let r = http(addr, "POST", &path("answer"), &w, &json!({ "step": "turn/9", "answer": "late" }).to_string()).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("duty turn/9 is no longer asked"), "{}", r.body);
    let r = http(addr, "POST", &path("answer"), &w, r#"{"step": "turn/1", "answer": "ok", "command": "rm"}"#).await;
    assert_eq!(r.status, 422, "unknown keys are refused: {}", r.body);

    // Interjections: to everyone, to one peer; an unknown peer or empty text refused.
    let say = |to: Option<&str>, text: &str| json!({ "to": to, "text": text }).to_string();
    let r = http(addr, "POST", &path("say"), &w, &say(Some("nobody"), "hello")).await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("no peer \"nobody\"; the peers are author, reviewer, eng"), "{}", r.body);
    let r = http(addr, "POST", &path("say"), &w, &say(None, "  ")).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        http(addr, "POST", &path("say"), &w, &say(None, "What do refunds look like on annual plans?")).await.status,
        200
    );
    assert_eq!(
        http(addr, "POST", &path("say"), &w, &say(Some("eng"), "Can the flag be flipped per plan type?")).await.status,
        200
    );

    // Both are on the log before the turn is answered (they are appended in the background).
    let log = store.open(&session, false).await.unwrap();
    let start = Instant::now();
    while log.read_all().await.unwrap().iter().filter(|e| e.env.step.starts_with("say/")).count() < 2 {
        assert!(start.elapsed() < DEADLINE, "the interjections never reached the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r =
        http(addr, "POST", &path("answer"), &w, &answer("Annual plans were never tested: ship to 10% first.")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    seat_until(addr, &seat, "turn/4", |v| v["question"]["step"] == "turn/4").await;
    let r = http(addr, "POST", &path("answer"), &w, &json!({ "step": "turn/4", "answer": "Fine by me." }).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    running.await.unwrap();

    // The session is over: nothing more is taken.
    let v = seat_until(addr, &seat, "the end", |v| v["over"] == true).await;
    assert!(v["question"].is_null(), "{v}");
    let r = http(addr, "POST", &path("answer"), &w, &json!({ "step": "turn/4", "answer": "again" }).to_string()).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("the session is over"), "{}", r.body);
    let r = http(addr, "POST", &path("leave"), &w, "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(addr, "GET", &format!("/api/seats/{seat}"), &[("Cookie", "rt_token=sesame-0123")], "").await;
    assert_eq!(r.status, 404);
    let r = http(addr, "POST", "/api/seats", &w, &take("reviewer")).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("is finished"), "{}", r.body);

    // On the log: the person's two interjections and two turns, authored by the seat.
    let mine: Vec<_> = log
        .read_all()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.env.from.as_str() == "reviewer" && e.env.kind != Kind::Stop)
        .collect();
    let steps: Vec<&str> = mine.iter().map(|e| &*e.env.step).collect();
    assert_eq!(steps, ["say/0", "say/1", "turn/1", "turn/4"]);
    assert!(mine.iter().all(|e| e.env.kind == Kind::Message));
    assert_eq!(&*mine[2].env.body.text, "Annual plans were never tested: ship to 10% first.");
    assert_eq!(serde_json::to_value(&mine[1].env.to).unwrap(), json!({"type": "peer", "id": "eng"}));
}

/// Regression (issue 14): a page closed without leaving held its seat for good as far
/// as a test could tell. A seat whose page stops asking is left after the idle time, and
/// another person (here at a terminal) takes it and answers the duty the page never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_whose_page_went_quiet_is_left_and_another_person_takes_it() {
    let (addr, store, seats, session, running) = start_idle(Duration::from_millis(300)).await;
    let origin = format!("http://{addr}");
    let csrf = csrf(addr).await;
    let w = page_write(&csrf, &origin);
    let take = json!({ "session": session.as_str(), "peer": "reviewer" }).to_string();
    let r = http(addr, "POST", "/api/seats", &w, &take).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seat = r.json()["seat"].as_str().unwrap().to_string();

    // The page is closed: nothing asks about the seat any more. Until the desk is left,
    // the seat is refused as taken; then a person at a terminal gets it.
    let reviewer = PeerId::from("reviewer");
    let start = Instant::now();
    let (sitting, mut events) = loop {
        match seats.take_directly(&session, &reviewer).await {
            Ok(taken) => break taken,
            Err(SitError::Refused(why)) => assert!(why.contains("is taken"), "{why}"),
            Err(other) => panic!("{other}"),
        }
        assert!(start.elapsed() < DEADLINE, "the quiet page's seat was never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The page, back, is told why it no longer holds the seat.
    let r = http(addr, "GET", &format!("/api/seats/{seat}"), &[("Cookie", "rt_token=sesame-0123")], "").await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.error().contains("you do not hold this seat (you left, or the page was away longer than 0.3 s)"),
        "{}",
        r.body
    );
    let r = http(
        addr,
        "POST",
        &format!("/api/seats/{seat}/answer"),
        &w,
        &json!({ "step": "turn/1", "answer": "late" }).to_string(),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // The new holder is asked the duty and answers it; the answer is the reviewer's.
    let q = loop {
        match tokio::time::timeout(DEADLINE, events.recv()).await.expect("a question within the deadline") {
            Some(roundtable_core::sitting::SeatEvent::Question(q)) => break q,
            Some(_) => {}
            None => panic!("the seat ended before asking"),
        }
    };
    assert_eq!(&*q.step, "turn/1");
    q.answer("Taken over from a closed tab: ship to 10% first.".into());
    let log = store.open(&session, false).await.unwrap();
    let start = Instant::now();
    loop {
        let entries = log.read_all().await.unwrap();
        if let Some(e) = entries.iter().find(|e| e.env.from.as_str() == "reviewer" && &*e.env.step == "turn/1") {
            assert_eq!(&*e.env.body.text, "Taken over from a closed tab: ship to 10% first.");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the answer never reached the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sitting.leave().await;
    running.abort();
}
