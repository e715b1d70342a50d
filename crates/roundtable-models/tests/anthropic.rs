//! The Anthropic provider against a local server replaying recorded event streams.

mod common;

use std::time::Duration;

use common::{collecting, dead_url, debate_request, fixture, json_body, sse, tool_defs, tool_request};
use roundtable_core::model::layers::{Retry, RetryPolicy};
use roundtable_core::model::{ChatModel, ChatRequest, ModelErrorKind};
use roundtable_core::tool::ToolChoice;
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

// Tool calls.

fn only_body(reqs: &[wiremock::Request]) -> Value {
    assert_eq!(reqs.len(), 1);
    serde_json::from_slice(&reqs[0].body).unwrap()
}

#[tokio::test]
async fn tool_use_blocks_streamed_in_pieces_come_back_as_calls_after_the_text() {
    let server = serve(sse("anthropic_stream_tools.sse")).await;
    let (mut req, got) = collecting(tool_request());
    req.tool_choice = ToolChoice::Named("read_file".into());
    let r = chat(&server).chat(&req).await.unwrap();

    assert_eq!(r.text, "I'll run the tests and read the spec.");
    assert_eq!(got.lock().unwrap().concat(), r.text);
    let calls: Vec<(&str, &str, &str)> =
        r.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(
        calls,
        [
            ("toolu_01D7FLrfh4GYq7yT1ULFeyMV", "run_tests", r#"{"suite": "api", "fail_fast": true}"#),
            ("toolu_01Q9mVbXw3ZkP8sNcR5tYhJa", "read_file", r#"{"path": "docs/api.md"}"#),
        ]
    );
    assert_eq!(r.finish_reason.as_deref(), Some("tool_use"));
    assert_eq!((r.prompt_tokens, r.completion_tokens), (639, 112));

    let body = only_body(&server.received_requests().await.unwrap());
    assert_eq!(
        body["tools"],
        json!([
            {"name": "run_tests", "description": "Run a test suite.", "input_schema": tool_defs()[0].parameters},
            {"name": "read_file", "description": "Read a file of the project.", "input_schema": tool_defs()[1].parameters},
        ])
    );
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "read_file"}));
    // The calls are one assistant turn (arguments that are not JSON sent as {}); the
    // results open the next user turn, before the text that came with it.
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Check the API."},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_A", "name": "run_tests", "input": {}},
                {"type": "tool_use", "id": "call_B", "name": "read_file", "input": {"path": "docs/api.md"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_A", "content": "arguments are not valid JSON", "is_error": true},
                {"type": "tool_result", "tool_use_id": "call_B", "content": "# API\nGET /users"},
                {"type": "text", "text": "backend: Pushed a fix.\n\nYour turn."},
            ]},
        ])
    );
}

#[tokio::test]
async fn an_answer_of_only_a_tool_call_through_the_retry_layer_is_one_call() {
    let server = serve(sse("anthropic_stream_tool_only.sse")).await;
    let policy =
        RetryPolicy { max_retries: 3, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(10) };
    let model = Retry::new(chat(&server), policy);
    let mut req = ChatRequest::simple("qa", "Tell backend.");
    req.tools = tool_defs();
    let r = model.chat(&req).await.unwrap();
    assert_eq!(r.text, "");
    assert_eq!(r.tool_calls.len(), 1);
    // Input that is not valid JSON is passed on as written: the runtime tells the model.
    let c = &r.tool_calls[0];
    assert_eq!(
        (c.id.as_str(), c.name.as_str(), c.arguments.as_str()),
        ("toolu_01Hc3XkLq8Wz5RtV2nYb7mPd", "send", r#"{"to": "backend", "text": 2 tests fail"#)
    );
    assert_eq!((r.prompt_tokens, r.completion_tokens), (388, 41));
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(only_body(&server.received_requests().await.unwrap())["tool_choice"], json!({"type": "auto"}));
}

#[tokio::test]
async fn tool_choices_are_spelled_as_the_api_wants() {
    for (choice, want) in [(ToolChoice::Required, json!({"type": "any"})), (ToolChoice::None, json!({"type": "none"}))]
    {
        let server = serve(sse("anthropic_stream.sse")).await;
        let mut req = ChatRequest::simple("qa", "Go.");
        req.tools = tool_defs();
        req.tool_choice = choice;
        chat(&server).chat(&req).await.unwrap();
        assert_eq!(only_body(&server.received_requests().await.unwrap())["tool_choice"], want);
    }
}

#[tokio::test]
async fn without_tools_offered_past_calls_and_results_are_text() {
    let server = serve(sse("anthropic_stream.sse")).await;
    let mut req = tool_request();
    req.tools = std::sync::Arc::from([]);
    req.json_schema = Some(std::sync::Arc::new(json!({"type": "object", "required": ["answer"]})));
    chat(&server).chat(&req).await.unwrap();
    let body = only_body(&server.received_requests().await.unwrap());
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none(), "{body}");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Check the API."},
            {"role": "assistant", "content": "(tool call run_tests {\"suite\": \"api\")\n(tool call read_file {\"path\": \"docs/api.md\"})"},
            {"role": "user", "content": "(tool result of run_tests, failed) arguments are not valid JSON\n\n(tool result of read_file) # API\nGET /users\n\nbackend: Pushed a fix.\n\nYour turn."},
        ])
    );
    // No structured output here: the schema goes to the model in the system prompt.
    let system = body["system"].as_str().unwrap();
    assert!(system.contains("JSON object") && system.contains(r#""required":["answer"]"#), "{system}");
}
