//! The OpenAI-compatible providers against a local server replaying recorded bodies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{collecting, dead_url, debate_request, fixture, json_body, sse};
use roundtable_core::model::layers::{Retry, RetryPolicy};
use roundtable_core::model::{ChatModel, ChatRequest, Embedder, ModelErrorKind};
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

async fn serve(template: ResponseTemplate) -> MockServer {
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
