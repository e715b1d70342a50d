//! Structured output for the protocols' JSON answers, end to end through the binary: a
//! consensus team on a local OpenAI-compatible server. A vote asks for
//! `response_format: json_schema` with the schema of a vote; a proposal asks for no
//! format; a server without structured output refuses the schema, is asked for a JSON
//! object instead, and the session still decides.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode};
use serde_json::{Value, json};

struct Server {
    base: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    _rt: tokio::runtime::Runtime,
}

fn sse(text: &str) -> Response<Body> {
    let stream = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": text}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 8}})
    );
    Response::builder().header("content-type", "text/event-stream").body(Body::from(Bytes::from(stream))).unwrap()
}

/// A server that proposes Postgres and approves it; with `refuse_schema` it answers a
/// request for `json_schema` as servers without structured output do (400, naming
/// `response_format`).
fn serve(refuse_schema: bool) -> Server {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap();
                seen.lock().unwrap().push(body.clone());
                let format = body["response_format"]["type"].as_str().map(str::to_owned);
                match format.as_deref() {
                    Some("json_schema") if refuse_schema => Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .header("content-type", "application/json")
                        .body(Body::from(
                            json!({"error": {
                                "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                                "type": "invalid_request_error", "param": "response_format", "code": null}})
                            .to_string(),
                        ))
                        .unwrap(),
                    Some(_) => sse(r#"{"approve": true, "reason": "Transactions across orders and payments."}"#),
                    None => sse("Postgres for the order store. Answer: Postgres"),
                }
            }
        }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server { base, bodies, _rt: rt }
}

fn team(dir: &Path, base: &str) -> PathBuf {
    let src = format!(
        r#"name = "order-store"
topic = "Which database should store orders?"
[models.g]
provider = "openai"
model = "m"
base_url = "{base}"
api_key_env = "RT_TEST_KEY"
[[peers]]
id = "lead"
model = "g"
[[peers]]
id = "dba"
model = "g"
[[peers]]
id = "analyst"
model = "g"
[protocol]
kind = "consensus"
proposer = "lead"
threshold = 1.0
rounds = 2
"#
    );
    let path = dir.join("team.toml");
    std::fs::write(&path, src).unwrap();
    path
}

fn run(team: &Path, data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roundtable"))
        .args(["run", team.to_str().unwrap(), "--json", "--data-dir"])
        .arg(data)
        .env_remove("ROUNDTABLE_DIR")
        .env_remove("ROUNDTABLE_NATS")
        .env("RT_TEST_KEY", "k")
        .output()
        .expect("the binary runs")
}

fn summary(o: &Output) -> Value {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// The schema of a consensus vote, as the voters' instruction describes it.
fn vote_schema() -> Value {
    json!({
        "title": "vote",
        "type": "object",
        "properties": {"approve": {"type": "boolean"}, "reason": {"type": "string"}},
        "required": ["approve"],
    })
}

/// Whether a request is a vote (its instruction asks for one).
fn is_vote(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["content"].as_str().is_some_and(|c| c.contains("Vote on the latest proposal")))
}

#[test]
fn a_vote_asks_an_openai_server_for_structured_output_with_the_schema_of_a_vote() {
    let server = serve(false);
    let dir = tempfile::tempdir().unwrap();
    let s = summary(&run(&team(dir.path(), &server.base), dir.path()));
    assert_eq!(s["answer_accepted"], true, "{s}");
    assert!(s["final_answer"].as_str().unwrap().contains("Postgres"), "{s}");
    let bodies = server.bodies.lock().unwrap().clone();
    let (votes, proposals): (Vec<&Value>, Vec<&Value>) = bodies.iter().partition(|b| is_vote(b));
    assert_eq!(votes.len(), 2, "one vote each from dba and analyst: {bodies:#?}");
    for v in &votes {
        assert_eq!(
            v["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "vote", "schema": vote_schema(), "strict": false}}),
            "{v}"
        );
    }
    assert_eq!(proposals.len(), 1, "{bodies:#?}");
    assert!(proposals[0].get("response_format").is_none(), "a proposal is free text: {}", proposals[0]);
}

#[test]
fn a_server_that_refuses_the_schema_gets_a_json_object_request_and_the_session_still_decides() {
    let server = serve(true);
    let dir = tempfile::tempdir().unwrap();
    let s = summary(&run(&team(dir.path(), &server.base), dir.path()));
    assert_eq!(s["answer_accepted"], true, "{s}");
    assert!(s["stop_reason"].as_str().unwrap().contains("consensus"), "{s}");
    let bodies = server.bodies.lock().unwrap().clone();
    let formats: Vec<&str> =
        bodies.iter().filter(|b| is_vote(b)).map(|b| b["response_format"]["type"].as_str().unwrap_or("none")).collect();
    // The first vote asked for the schema and was refused; each vote was then asked
    // for a JSON object (a model remembers the refusal and asks for the schema no more).
    assert_eq!(formats.first(), Some(&"json_schema"), "{formats:?}");
    assert_eq!(formats.iter().filter(|f| **f == "json_object").count(), 2, "{formats:?}");
    assert!(formats.iter().all(|f| *f == "json_schema" || *f == "json_object"), "{formats:?}");
}
