//! The OpenAI-compatible providers against a local server replaying recorded bodies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{collecting, dead_url, debate_request, fixture, json_body, sse, tool_defs, tool_request};
use roundtable_core::model::layers::{Retry, RetryPolicy};
use roundtable_core::model::{ChatModel, ChatRequest, Embedder, ModelErrorKind, estimate_tokens};
use roundtable_core::tool::ToolChoice;
use roundtable_models::{OpenAiChat, OpenAiConfig, OpenAiEmbedder, Secret};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const KEY: &str = "sk-test-DO-NOT-LEAK-0123456789";

fn config(server: &MockServer) -> OpenAiConfig {
    let mut cfg = OpenAiConfig::new(format!("{}/v1", server.uri()), "gpt-4o-mini");
    cfg.api_key = Some(Secret::new(KEY));
    cfg
}

fn chat(server: &MockServer) -> OpenAiChat {
    OpenAiChat::new(config(server)).unwrap()
}

async fn serve(template: impl Respond + 'static) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(template).mount(&server).await;
    server
}

async fn only_body(server: &MockServer) -> Value {
    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    serde_json::from_slice(&reqs[0].body).unwrap()
}

#[tokio::test]
async fn streams_text_in_order_and_reports_usage() {
    let server = serve(sse("openai_stream.sse")).await;
    let (req, got) = collecting(debate_request());
    let r = chat(&server).chat(&req).await.unwrap();

    assert_eq!(*got.lock().unwrap(), ["The", " answer", " is", " 42", ",", " Bob", "."]);
    assert_eq!(r.text, "The answer is 42, Bob.");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (57, 9));
    assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));

    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 1);
    let sent = &reqs[0];
    assert_eq!(sent.url.path(), "/v1/chat/completions");
    assert_eq!(sent.headers.get("authorization").unwrap(), &format!("Bearer {KEY}"));
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["temperature"], json!(0.3));
    assert_eq!(body["max_tokens"], 256);
    assert!(body.get("response_format").is_none());
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You are Alice, a careful peer."},
            {"role": "user", "content": "What is 6 x 7?"},
            {"role": "user", "content": "I think 42.", "name": "bob"},
            {"role": "assistant", "content": "Probably 42.", "name": "alice"},
            {"role": "user", "content": "Agreed: 42.", "name": "carol_v2"},
            {"role": "user", "content": "Give your final answer."},
        ])
    );
}

#[tokio::test]
async fn json_mode_asks_for_a_json_object() {
    let server = serve(sse("openai_stream.sse")).await;
    let mut req = ChatRequest::simple("alice", "Reply in JSON: {\"answer\": n}");
    req.json = true;
    chat(&server).chat(&req).await.unwrap();
    let body = only_body(&server).await;
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    assert!(body.get("temperature").is_none());
}

#[tokio::test]
async fn usage_is_estimated_when_the_server_sends_none() {
    let server = serve(sse("openai_stream_no_usage.sse")).await;
    let req = debate_request();
    let r = chat(&server).chat(&req).await.unwrap();
    assert_eq!(r.text, "Four.");
    assert_eq!(r.prompt_tokens, req.estimated_prompt_tokens());
    assert!(r.prompt_tokens > 0 && r.completion_tokens > 0);
}

#[tokio::test]
async fn a_non_streamed_completion_is_accepted() {
    let server = serve(json_body(200, "openai_completion.json")).await;
    let (req, got) = collecting(ChatRequest::simple("alice", "Capital of France?"));
    let r = chat(&server).chat(&req).await.unwrap();
    assert_eq!(r.text, "Paris.");
    assert_eq!(*got.lock().unwrap(), ["Paris."]);
    assert_eq!((r.prompt_tokens, r.completion_tokens), (14, 2));
}

#[tokio::test]
async fn unauthorized_is_auth_and_the_key_never_shows() {
    let server = serve(json_body(401, "openai_401.json")).await;
    let cfg = config(&server);
    let model = OpenAiChat::new(cfg.clone()).unwrap();
    let e = model.chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Auth);
    assert_eq!(e.status, Some(401));
    assert!(e.message.contains("invalid_api_key: Incorrect API key provided"), "{}", e.message);
    assert!(e.message.chars().count() <= 360, "{}", e.message);
    for shown in [e.message.clone(), e.to_string(), format!("{e:?}"), format!("{model:?}"), format!("{cfg:?}")] {
        assert!(!shown.contains(KEY), "key leaked: {shown}");
        assert!(!shown.contains("DO-NOT-LEAK"), "key leaked: {shown}");
    }
    assert!(format!("{cfg:?}").contains("api_key: Some(***)"));
}

#[tokio::test]
async fn bad_request_quotes_the_provider() {
    let body = json!({"error": {"message": "Invalid value for 'temperature': must be <= 2.", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}});
    let server = serve(ResponseTemplate::new(400).set_body_json(body)).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::BadRequest, Some(400)));
    assert!(e.message.contains("must be <= 2"), "{}", e.message);
}

#[tokio::test]
async fn rate_limited_carries_retry_after() {
    let server = serve(json_body(429, "openai_429.json").insert_header("retry-after", "7")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::RateLimited);
    assert_eq!(e.status, Some(429));
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    assert!(e.message.contains("Rate limit reached"), "{}", e.message);
}

#[tokio::test]
async fn retry_layer_gets_past_a_429() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(json_body(429, "openai_429.json").insert_header("retry-after-ms", "5"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(sse("openai_stream.sse"))
        .mount(&server)
        .await;
    let policy =
        RetryPolicy { max_retries: 2, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(10) };
    let model = Retry::new(chat(&server), policy);
    let r = model.chat(&ChatRequest::simple("alice", "hi")).await.unwrap();
    assert_eq!(r.text, "The answer is 42, Bob.");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn server_error_is_server() {
    let server = serve(json_body(500, "openai_500.json")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::Server, Some(500)));
    assert!(e.kind.is_retryable());
}

#[tokio::test]
async fn a_stream_without_done_is_truncated() {
    let server = serve(sse("openai_stream_cut.sse")).await;
    let (req, got) = collecting(ChatRequest::simple("alice", "hi"));
    let e = chat(&server).chat(&req).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Truncated, "{e}");
    // What did arrive was still streamed.
    assert_eq!(*got.lock().unwrap(), ["The", " answer", " is"]);
}

#[tokio::test]
async fn a_stream_cut_inside_a_chunk_is_truncated() {
    let mut body = fixture("openai_stream.sse");
    body.truncate(body.len() / 2);
    let server = serve(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Truncated, "{e}");
}

#[tokio::test]
async fn an_answer_without_text_is_empty() {
    let server = serve(sse("openai_stream_empty.sse")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Empty, "{e}");
    assert!(e.message.contains("finish_reason stop"), "{}", e.message);
}

#[tokio::test]
async fn a_non_json_body_is_malformed() {
    let page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n";
    let server = serve(ResponseTemplate::new(200).set_body_raw(page, "text/html")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Malformed, "{e}");
    assert!(e.message.contains("502 Bad Gateway"), "{}", e.message);

    let server = serve(ResponseTemplate::new(200).set_body_raw("data: {not json}\n\n", "text/event-stream")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Malformed, "{e}");
}

#[tokio::test]
async fn an_error_inside_the_stream_fails_the_call() {
    let server = serve(sse("openai_stream_error.sse")).await;
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Server, "{e}");
    assert!(e.message.contains("Upstream provider returned an error"), "{}", e.message);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transport() {
    let model = OpenAiChat::new(OpenAiConfig::new(dead_url("/v1"), "m")).unwrap();
    let e = model.chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Transport, "{e}");
    assert_eq!(e.status, None);
}

#[tokio::test]
async fn a_refused_connection_names_the_host_and_path() {
    let base = dead_url("/v1");
    let model = OpenAiChat::new(OpenAiConfig::new(base.clone(), "m")).unwrap();
    let e = model.chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Transport, "{e}");
    assert!(e.message.contains(&format!("cannot connect to {base}/chat/completions")), "{e}");
}

#[tokio::test]
async fn a_404_from_a_base_url_without_v1_names_the_url_and_suggests_v1() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_string("{\"detail\":\"Not Found\"}"))
        .mount(&server)
        .await;
    let mut cfg = config(&server);
    cfg.base_url = server.uri();
    let e = OpenAiChat::new(cfg).unwrap().chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ModelErrorKind::BadRequest, Some(404)), "{e}");
    let uri = server.uri();
    assert!(e.message.contains(&format!("POST {uri}/chat/completions")), "{e}");
    assert!(e.message.contains(&format!("did you mean base_url = \"{uri}/v1\"?")), "{e}");
    assert!(e.message.contains("Not Found"), "{e}");

    // With `/v1` already there, the path is named and nothing is suggested.
    let e = chat(&server).chat(&ChatRequest::simple("alice", "hi")).await.unwrap_err();
    assert!(e.message.contains(&format!("POST {uri}/v1/chat/completions")), "{e}");
    assert!(!e.message.contains("did you mean"), "{e}");
}

#[tokio::test]
async fn azure_style_sends_api_key_header_and_version() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/openai/deployments/gpt4o-prod/chat/completions"))
        .respond_with(sse("openai_stream.sse"))
        .mount(&server)
        .await;
    let mut cfg = OpenAiConfig::azure(&server.uri(), "gpt4o-prod", "2024-10-21", Secret::new(KEY));
    cfg.headers.push(("x-ms-client-request-id".into(), "run-17".into()));
    let r = OpenAiChat::new(cfg).unwrap().chat(&ChatRequest::simple("alice", "hi")).await.unwrap();
    assert_eq!(r.text, "The answer is 42, Bob.");
    let reqs = server.received_requests().await.unwrap();
    let sent = &reqs[0];
    assert_eq!(sent.url.query(), Some("api-version=2024-10-21"));
    assert_eq!(sent.headers.get("api-key").unwrap(), KEY);
    assert_eq!(sent.headers.get("x-ms-client-request-id").unwrap(), "run-17");
    assert!(sent.headers.get("authorization").is_none());
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["model"], "gpt4o-prod");
}

#[tokio::test]
async fn embeddings_come_back_in_input_order() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/embeddings"))
        .respond_with(json_body(200, "openai_embeddings.json"))
        .mount(&server)
        .await;
    let mut cfg = config(&server);
    cfg.model = "text-embedding-3-small".into();
    let e = OpenAiEmbedder::new(cfg).unwrap();
    let texts = vec!["first".to_owned(), "second".to_owned(), "third".to_owned()];
    let v = e.embed(&texts).await.unwrap();
    assert_eq!(
        v,
        vec![vec![0.0023064255, -0.009327292, -0.0028842222], vec![-0.011, 0.02, 0.7], vec![0.5, -0.25, 0.125]]
    );
    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs[0].headers.get("authorization").unwrap(), &format!("Bearer {KEY}"));
    let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(body, json!({"model": "text-embedding-3-small", "input": ["first", "second", "third"]}));
}

/// Answers each input with `[len, position]`, listed in reverse order.
struct Reversed;

impl Respond for Reversed {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        let input = body["input"].as_array().unwrap();
        let data: Vec<Value> = input
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.as_str().unwrap().len(), i]}))
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({"object": "list", "data": data, "model": "m"}))
    }
}

#[tokio::test]
async fn embeddings_are_batched_and_stay_in_order() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/v1/embeddings")).respond_with(Reversed).mount(&server).await;
    let e = OpenAiEmbedder::new(config(&server)).unwrap().with_batch_size(2);
    let texts: Vec<String> = ["a", "bb", "ccc", "dddd", "eeeee"].map(String::from).to_vec();
    let v = e.embed(&texts).await.unwrap();
    let lens: Vec<f32> = v.iter().map(|x| x[0]).collect();
    assert_eq!(lens, [1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    assert!(e.embed(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn embeddings_with_a_missing_vector_are_malformed() {
    let server = MockServer::start().await;
    let body =
        json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}], "model": "m"});
    Mock::given(method("POST"))
        .and(path("/v1/embeddings"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    let e = OpenAiEmbedder::new(config(&server)).unwrap();
    let err = e.embed(&["x".to_owned(), "y".to_owned()]).await.unwrap_err();
    assert_eq!(err.kind, ModelErrorKind::Malformed, "{err}");
}

#[tokio::test]
async fn providers_share_one_client() {
    let server = serve(sse("openai_stream.sse")).await;
    let client = roundtable_models::http_client(Duration::from_secs(5)).unwrap();
    let a: Arc<dyn ChatModel> = Arc::new(OpenAiChat::with_client(config(&server), client.clone()).unwrap());
    let b: Arc<dyn ChatModel> = Arc::new(OpenAiChat::with_client(config(&server), client).unwrap());
    let req = ChatRequest::simple("alice", "hi");
    let (ra, rb) = tokio::join!(a.chat(&req), b.chat(&req));
    assert_eq!(ra.unwrap().text, rb.unwrap().text);
    assert_eq!(a.name(), "gpt-4o-mini");
}

// Tool calls and structured output.

fn call_triples(r: &roundtable_core::model::ChatResponse) -> Vec<(&str, &str, &str)> {
    r.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect()
}

#[tokio::test]
async fn parallel_tool_calls_streamed_in_pieces_come_back_whole_after_the_text() {
    let server = serve(sse("openai_stream_tools.sse")).await;
    let (req, got) = collecting(tool_request());
    let r = chat(&server).chat(&req).await.unwrap();

    assert_eq!(r.text, "I'll run the tests and read the spec.");
    // Only the text streams; arguments are not words for the reader.
    assert_eq!(got.lock().unwrap().concat(), r.text);
    assert_eq!(
        call_triples(&r),
        [
            ("call_Xq3bWm8KfV2nR7tYpL0sJ4aD", "run_tests", r#"{"suite":"api","fail_fast":true}"#),
            ("call_9TfHc2LpQ6zN1vEwR8kBy3Ms", "read_file", r#"{"path":"docs/api.md"}"#),
        ]
    );
    assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!((r.prompt_tokens, r.completion_tokens), (212, 58));

    let body = only_body(&server).await;
    assert_eq!(
        body["tools"],
        json!([
            {"type": "function", "function": {"name": "run_tests", "description": "Run a test suite.",
                "parameters": tool_defs()[0].parameters}},
            {"type": "function", "function": {"name": "read_file", "description": "Read a file of the project.",
                "parameters": tool_defs()[1].parameters}},
        ])
    );
    assert_eq!(body["tool_choice"], "auto");
    // The two calls (one envelope each) are one assistant message; their results follow
    // it in call order; backend's message, which landed between, comes after them.
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Check the API."},
            {"role": "assistant", "content": null, "name": "qa", "tool_calls": [
                {"id": "call_A", "type": "function", "function": {"name": "run_tests", "arguments": "{\"suite\": \"api\""}},
                {"id": "call_B", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\": \"docs/api.md\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_A", "content": "arguments are not valid JSON"},
            {"role": "tool", "tool_call_id": "call_B", "content": "# API\nGET /users"},
            {"role": "user", "content": "Pushed a fix.", "name": "backend"},
            {"role": "user", "content": "Your turn."},
        ])
    );
}

#[tokio::test]
async fn interleaved_calls_are_assembled_by_index_and_invalid_arguments_kept_as_written() {
    let server = serve(sse("openai_stream_tools_interleaved.sse")).await;
    let mut req = ChatRequest::simple("qa", "Tell backend.");
    req.tools = tool_defs();
    req.tool_choice = ToolChoice::Named("send".into());
    let r = chat(&server).chat(&req).await.unwrap();
    assert_eq!(r.text, "");
    assert_eq!(
        call_triples(&r),
        [
            ("Kp3sV9aQ1xLm", "send", r#"{"to": "backend", "text": "2 tests fail in auth"}"#),
            ("Zr8TbN2yWq5e", "board_write", r#"{"key": "status", "value": tests failing}"#),
        ]
    );
    assert_eq!(r.model, "qwen2.5-7b-instruct");
    // No usage from this server: the estimate counts the calls' names and arguments.
    let args: u64 =
        r.tool_calls.iter().map(|c| u64::from(estimate_tokens(&c.arguments) + estimate_tokens(&c.name))).sum();
    assert_eq!(r.completion_tokens, args);
    assert_eq!(r.prompt_tokens, req.estimated_prompt_tokens());
    let body = only_body(&server).await;
    assert_eq!(body["tool_choice"], json!({"type": "function", "function": {"name": "send"}}));
}

#[tokio::test]
async fn an_answer_of_only_tool_calls_through_the_retry_layer_is_one_call() {
    let server = serve(sse("openai_stream_tools_interleaved.sse")).await;
    let policy =
        RetryPolicy { max_retries: 3, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(10) };
    let model = Retry::new(chat(&server), policy);
    let mut req = ChatRequest::simple("qa", "Tell backend.");
    req.tools = tool_defs();
    let r = model.chat(&req).await.unwrap();
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_non_streamed_completion_with_tool_calls_is_accepted() {
    let server = serve(json_body(200, "openai_completion_tools.json")).await;
    let mut req = ChatRequest::simple("qa", "Plan?");
    req.tools = tool_defs();
    let r = chat(&server).chat(&req).await.unwrap();
    assert_eq!(call_triples(&r), [("call_Hn4kQ0rT7vBz2mXc5yLp8sWd", "board_read", r#"{"key":"plan"}"#)]);
    assert_eq!((r.text.as_str(), r.prompt_tokens, r.completion_tokens), ("", 140, 17));
}

#[tokio::test]
async fn tool_choices_are_spelled_as_the_api_wants() {
    for (choice, want) in [(ToolChoice::Required, json!("required")), (ToolChoice::None, json!("none"))] {
        let server = serve(sse("openai_stream.sse")).await;
        let mut req = ChatRequest::simple("qa", "Go.");
        req.tools = tool_defs();
        req.tool_choice = choice;
        chat(&server).chat(&req).await.unwrap();
        assert_eq!(only_body(&server).await["tool_choice"], want);
    }
}

#[tokio::test]
async fn without_tools_offered_no_tool_fields_are_sent_and_past_calls_are_text() {
    let server = serve(sse("openai_stream.sse")).await;
    let mut req = tool_request();
    req.tools = Arc::from([]);
    req.tool_choice = ToolChoice::Required;
    chat(&server).chat(&req).await.unwrap();
    let body = only_body(&server).await;
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none(), "{body}");
    let msgs = body["messages"].as_array().unwrap();
    assert!(msgs.iter().all(|m| m.get("tool_calls").is_none() && m["role"] != "tool"), "{body}");
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(
        msgs[1]["content"],
        "(tool call run_tests {\"suite\": \"api\")\n(tool call read_file {\"path\": \"docs/api.md\"})"
    );
    assert_eq!(msgs[2]["content"], "(tool result of run_tests, failed) arguments are not valid JSON");
}

fn verdict_schema() -> Arc<Value> {
    Arc::new(json!({
        "title": "Verdict",
        "type": "object",
        "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
        "required": ["answer"],
    }))
}

#[tokio::test]
async fn a_json_schema_asks_for_structured_output() {
    let server = serve(sse("openai_stream.sse")).await;
    let mut req = ChatRequest::simple("alice", "Your verdict?");
    req.json = true;
    req.json_schema = Some(verdict_schema());
    chat(&server).chat(&req).await.unwrap();
    let body = only_body(&server).await;
    assert_eq!(
        body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "Verdict", "schema": *verdict_schema(), "strict": false}})
    );
    // The word JSON is there for the fallback's sake.
    assert_eq!(body["messages"][0], json!({"role": "system", "content": "Answer with a single JSON object."}));
}

/// A server without structured output: refuses `json_schema`, answers `json_object`.
struct NoSchemas;

impl Respond for NoSchemas {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        if body["messages"].to_string().contains("too long") {
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}))
        } else if body["response_format"]["type"] == "json_schema" {
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                "type": "invalid_request_error", "param": "response_format", "code": null}}))
        } else {
            sse("openai_stream.sse")
        }
    }
}

#[tokio::test]
async fn a_server_refusing_json_schema_is_asked_for_a_json_object_from_then_on() {
    let server = serve(NoSchemas).await;
    let model = chat(&server);
    let mut req = ChatRequest::simple("alice", "Your verdict?");
    req.json_schema = Some(verdict_schema());
    let r = model.chat(&req).await.unwrap();
    assert_eq!(r.text, "The answer is 42, Bob.");
    let formats = |reqs: Vec<Request>| -> Vec<Value> {
        reqs.iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["response_format"]["type"].clone())
            .collect()
    };
    assert_eq!(formats(server.received_requests().await.unwrap()), [json!("json_schema"), json!("json_object")]);
    // Remembered: the next call goes straight to json_object.
    model.chat(&req).await.unwrap();
    assert_eq!(formats(server.received_requests().await.unwrap())[2..], [json!("json_object")]);
}

#[tokio::test]
async fn another_bad_request_with_a_schema_is_not_asked_again() {
    let server = serve(NoSchemas).await;
    let model = chat(&server);
    let mut req = ChatRequest::simple("alice", "This prompt is too long.");
    req.json_schema = Some(verdict_schema());
    for _ in 0..2 {
        let e = model.chat(&req).await.unwrap_err();
        assert_eq!((e.kind, e.status), (ModelErrorKind::BadRequest, Some(400)));
        assert!(e.message.contains("maximum context length"), "{}", e.message);
    }
    // One request per call, each still asking for the schema.
    let reqs = server.received_requests().await.unwrap();
    let schema_asks = reqs
        .iter()
        .filter(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["response_format"]["type"] == "json_schema");
    assert_eq!((reqs.len(), schema_asks.count()), (2, 2));
}

#[tokio::test]
async fn calls_that_share_an_index_but_not_an_id_stay_apart() {
    // Ollama numbers every call of a streamed answer 0.
    let server = serve(sse("openai_stream_tools_ollama.sse")).await;
    let mut req = ChatRequest::simple("qa", "Read both.");
    req.tools = tool_defs();
    let r = chat(&server).chat(&req).await.unwrap();
    assert_eq!(
        call_triples(&r),
        [("call_u8n2kq1v", "read_file", r#"{"path":"a.rs"}"#), ("call_7hd0w3xe", "read_file", r#"{"path":"b.rs"}"#),]
    );
    assert_eq!((r.prompt_tokens, r.completion_tokens), (181, 44));
}
