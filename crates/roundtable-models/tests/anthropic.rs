//! The Anthropic provider against a local server replaying recorded event streams.

mod common;

use std::time::Duration;

use common::{collecting, dead_url, debate_request, fixture, json_body, sse};
use roundtable_core::model::{ChatModel, ChatRequest, ModelErrorKind};
use roundtable_models::{AnthropicChat, AnthropicConfig, Secret};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-ant-api03-DO-NOT-LEAK-abcdefghij";

fn config(server: &MockServer) -> AnthropicConfig {
    let mut cfg = AnthropicConfig::new("claude-sonnet-4-5", Some(Secret::new(KEY)));
    cfg.base_url = server.uri();
    cfg
}

fn chat(server: &MockServer) -> AnthropicChat {
    AnthropicChat::new(config(server)).unwrap()
}

async fn serve(template: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/v1/messages")).respond_with(template).mount(&server).await;
    server
}

#[tokio::test]
async fn streams_text_in_order_and_reports_usage() {
    let server = serve(sse("anthropic_stream.sse")).await;
    let (req, got) = collecting(debate_request());
    let r = chat(&server).chat(&req).await.unwrap();

    assert_eq!(*got.lock().unwrap(), ["I agree", " with Alice", ": the answer", " is 42."]);
    assert_eq!(r.text, "I agree with Alice: the answer is 42.");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (472, 15));
    assert_eq!(r.model, "claude-sonnet-4-5-20250929");
    assert_eq!(r.finish_reason.as_deref(), Some("end_turn"));

    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    let sent = &reqs[0];
    assert_eq!(sent.url.path(), "/v1/messages");
    assert_eq!(sent.headers.get("x-api-key").unwrap(), KEY);
    assert_eq!(sent.headers.get("anthropic-version").unwrap(), "2023-06-01");
    assert!(sent.headers.get("authorization").is_none());
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(body["temperature"], json!(0.3));
    assert_eq!(body["system"], "You are Alice, a careful peer.");
    // No name field: other peers are named in the text; turns alternate, user first.
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "What is 6 x 7?\n\nbob: I think 42."},
            {"role": "assistant", "content": "Probably 42."},
            {"role": "user", "content": "carol.v2: Agreed: 42.\n\nGive your final answer."},
        ])
    );
}

#[tokio::test]
async fn unauthorized_is_auth_and_the_key_never_shows() {
    let server = serve(json_body(401, "anthropic_401.json")).await;
    let cfg = config(&server);
    let model = AnthropicChat::new(cfg.clone()).unwrap();
    let e = model.chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::Auth, Some(401)));
    assert!(e.message.contains("authentication_error: invalid x-api-key"), "{}", e.message);
    for shown in [e.to_string(), format!("{e:?}"), format!("{model:?}"), format!("{cfg:?}")] {
        assert!(!shown.contains("DO-NOT-LEAK"), "key leaked: {shown}");
    }
}

#[tokio::test]
async fn rate_limited_carries_retry_after() {
    let server = serve(json_body(429, "anthropic_429.json").insert_header("retry-after", "7")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::RateLimited, Some(429)));
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    assert!(e.message.contains("rate_limit_error"), "{}", e.message);
}

#[tokio::test]
async fn overloaded_529_is_server() {
    let server = serve(json_body(529, "anthropic_529.json")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::Server, Some(529)));
    assert!(e.message.contains("overloaded_error: Overloaded"), "{}", e.message);
}

#[tokio::test]
async fn an_error_event_mid_stream_fails_the_call() {
    let server = serve(sse("anthropic_stream_overloaded.sse")).await;
    let (req, got) = collecting(ChatRequest::simple("alice", "hi"));
    let e = chat(&server).chat(&req).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Server, "{e}");
    assert!(e.message.contains("Overloaded"), "{}", e.message);
    assert_eq!(*got.lock().unwrap(), ["I agree"]);
}

#[tokio::test]
async fn a_rate_limit_error_event_is_rate_limited() {
    let body = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"Number of request tokens has exceeded your per-minute rate limit\"}}\n\n";
    let server = serve(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::RateLimited, "{e}");
}

#[tokio::test]
async fn a_stream_without_message_stop_is_truncated() {
    let server = serve(sse("anthropic_stream_cut.sse")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Truncated, "{e}");

    let mut body = fixture("anthropic_stream.sse");
    body.truncate(body.len() - 20);
    let server = serve(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Truncated, "{e}");
}

#[tokio::test]
async fn an_answer_without_text_is_empty() {
    let server = serve(sse("anthropic_stream_empty.sse")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Empty, "{e}");
}

#[tokio::test]
async fn a_non_json_body_is_malformed() {
    let server = serve(
        ResponseTemplate::new(200)
            .set_body_raw("upstream connect error or disconnect/reset before headers", "text/plain"),
    )
    .await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Malformed, "{e}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transport() {
    let mut cfg = AnthropicConfig::new("claude-sonnet-4-5", None);
    cfg.base_url = dead_url("");
    let e = AnthropicChat::new(cfg).unwrap().chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Transport, "{e}");
}

#[tokio::test]
async fn a_history_that_opens_with_the_peers_own_words_starts_with_a_user_turn() {
    let server = serve(sse("anthropic_stream.sse")).await;
    let mut req = debate_request();
    req.window = 2..4; // Alice's own message, then Carol's.
    req.json = true;
    chat(&server).chat(&req).await.unwrap();
    let reqs = server.received_requests().await.unwrap();
    let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
    let msgs = body["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(msgs[1]["content"], "Probably 42.");
    assert!(body["system"].as_str().unwrap().contains("JSON object"));
}
