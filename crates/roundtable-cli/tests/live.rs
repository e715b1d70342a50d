//! The live transcript of `roundtable run` in a terminal (issue 14, part 7), seen
//! through a pseudo-terminal against a local OpenAI-compatible server that streams
//! slowly, stalls, and asks to be retried later.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode};

/// What the server does with request number `n` (from 0).
#[derive(Clone, Copy)]
enum Reply {
    /// Stream these words, one every `WORD_GAP`, then finish.
    Words(usize),
    /// Stream two words, then stall until the client gives up.
    Stall,
    /// 429 with `Retry-After: 1`.
    RateLimited,
}

const WORD_GAP: Duration = Duration::from_millis(60);

fn chunk(text: &str) -> String {
    format!("data: {}\n\n", serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}}]}))
}

/// The words of the answer to request `n`: distinct for every request.
fn word(n: usize, i: usize) -> String {
    format!("r{n}w{i} ")
}

struct Server {
    base: String,
    requests: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

fn serve(plan: fn(usize) -> Reply) -> Server {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let (words, stall) = match plan(n) {
                    Reply::Words(k) => (k, false),
                    Reply::Stall => (2, true),
                    Reply::RateLimited => {
                        return Response::builder()
                            .status(StatusCode::TOO_MANY_REQUESTS)
                            .header("retry-after", "1")
                            .body(Body::from("{\"error\":{\"message\":\"slow down\"}}"))
                            .unwrap();
                    }
                };
                let stream = futures::stream::unfold(0usize, move |i| async move {
                    if i > 0 {
                        tokio::time::sleep(WORD_GAP).await;
                    }
                    if i < words {
                        return Some((Ok::<_, std::io::Error>(Bytes::from(chunk(&word(n, i)))), i + 1));
                    }
                    if stall {
                        futures::future::pending::<()>().await;
                    }
                    if i == words {
                        let end = format!(
                            "data: {}\n\ndata: [DONE]\n\n",
                            serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 10, "completion_tokens": words}})
                        );
                        return Some((Ok(Bytes::from(end)), i + 1));
                    }
                    None
                });
                Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
            }
        }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server { base, requests, _rt: rt }
}

fn team(dir: &Path, base: &str, peers: &[&str], rounds: u32, extra: &str) -> PathBuf {
    let mut src = format!(
        "name = \"live\"\ntopic = \"Pick a name\"\n[models.g]\nprovider = \"openai\"\nmodel = \"m\"\nbase_url = \"{base}\"\napi_key_env = \"RT_TEST_KEY\"\n{extra}\n"
    );
    for p in peers {
        src.push_str(&format!("[[peers]]\nid = \"{p}\"\nmodel = \"g\"\n"));
    }
    src.push_str(&format!("[protocol]\nkind = \"round_robin\"\nrounds = {rounds}\n"));
    let path = dir.join("team.toml");
    std::fs::write(&path, src).unwrap();
    path
}

/// Run `roundtable run TEAM` with its standard output on a pseudo-terminal (standard
/// error a pipe, so no progress line); returns what the terminal showed and the exit
/// code.
fn run_on_a_terminal(team: &Path, data: &Path) -> (String, Option<i32>) {
    let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal (openpty)");
    let child = Command::new(env!("CARGO_BIN_EXE_roundtable"))
        .args(["run", team.to_str().unwrap(), "--data-dir"])
        .arg(data)
        .env_remove("ROUNDTABLE_DIR")
        .env_remove("ROUNDTABLE_NATS")
        .env("NO_COLOR", "1")
        .env("RT_TEST_KEY", "k")
        .stdin(Stdio::null())
        .stdout(Stdio::from(pty.slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The parent's copy of the slave end went into the child's `Stdio` and is closed
    // now, so the master reads end (EIO) when the child exits.
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        seen
    });
    let out = child.wait_with_output().unwrap();
    let seen = reader.join().unwrap();
    let text = String::from_utf8_lossy(&seen).replace("\r\n", "\n");
    eprintln!("--- terminal ---\n{text}\n--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    (text, out.status.code())
}

/// Regression (issue 14, part 7): a turn after the first showed no header and no
/// streamed tokens, then appeared whole. Every turn now shows its header as it starts
/// and its text as it streams, one block under the header.
#[test]
fn issue_14_every_turn_shows_its_header_and_streams_its_tokens() {
    const WORDS: usize = 5;
    let server = serve(|_| Reply::Words(WORDS));
    let dir = tempfile::tempdir().unwrap();
    let team = team(dir.path(), &server.base, &["a", "b"], 2, "max_retries = 0\ntimeout_secs = 30");
    let (screen, code) = run_on_a_terminal(&team, &dir.path().join("data"));
    assert_eq!(code, Some(0), "{screen}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 4);
    // Turn n went to request n (round robin: one call at a time, in order).
    for (n, (round, peer)) in [(1, "a"), (1, "b"), (2, "a"), (2, "b")].into_iter().enumerate() {
        let text: String = (0..WORDS).map(|i| word(n, i)).collect();
        let block = format!("     [round {round}] {peer} …\n  {text}\n  (m · 10+{WORDS} tokens");
        assert!(screen.contains(&block), "turn {n}: expected\n{block}\nin\n{screen}");
    }
    // None of them was printed whole instead (the header of a whole envelope).
    assert!(!screen.contains("→ all"), "{screen}");
    assert!(screen.contains(" · 4 messages · 2 rounds · 4 model calls · "), "{screen}");
}

/// Regression (issue 14, part 7): through three timed-out attempts the screen stayed
/// blank, and a failed attempt's text was glued to the next attempt's. Every attempt
/// and every wait is shown, and a failed attempt's text is marked discarded.
#[test]
fn issue_14_timed_out_and_rate_limited_attempts_are_shown_and_their_text_discarded() {
    // Attempt 1 stalls, 2 is told to wait, 3 and 4 stall: three timeouts, one 429.
    let server = serve(|n| if n == 1 { Reply::RateLimited } else { Reply::Stall });
    let dir = tempfile::tempdir().unwrap();
    let team = team(dir.path(), &server.base, &["a"], 1, "max_retries = 3\ntimeout_secs = 1");
    let (screen, code) = run_on_a_terminal(&team, &dir.path().join("data"));
    assert_eq!(code, Some(1), "the session failed: {screen}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 4);
    let expect = [
        "     [round 1] a …\n  r0w0 r0w1 \n".to_string(),
        "  ✗ a: attempt 1 of 4 failed: timed out: no complete answer within 1000 ms (its text above is discarded)\n"
            .to_string(),
        "  a: waiting ".to_string(),
        " s before attempt 2\n     [round 1] a … attempt 2 of 4\n".to_string(),
        "  ✗ a: attempt 2 of 4 failed: rate limited (HTTP 429): ".to_string(),
        "  a: waiting 1.0 s for Retry-After\n     [round 1] a … attempt 3 of 4\n  r2w0 r2w1 \n".to_string(),
        "  ✗ a: attempt 3 of 4 failed: timed out".to_string(),
        "     [round 1] a … attempt 4 of 4\n  r3w0 r3w1 \n  (the text above is discarded: the call failed)\n"
            .to_string(),
        "failure a: model call failed: timed out".to_string(),
    ];
    let mut at = 0;
    for want in &expect {
        match screen[at..].find(want.as_str()) {
            Some(i) => at += i + want.len(),
            None => panic!("expected, in this order, {want:?} after byte {at} of\n{screen}"),
        }
    }
    // No attempt's text runs into another's.
    for (a, b) in [("r0w1 ", "r2w0"), ("r2w1 ", "r3w0")] {
        assert!(!screen.contains(&format!("{a}{b}")), "{screen}");
    }
}
