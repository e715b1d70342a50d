//! Mock models for benchmarks: instant, or with a fixed latency.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};

/// The fixed reply: 50 bytes.
pub const REPLY: &str = "I agree with the previous point and add one more.";

/// Returns [`REPLY`] at once (or after `latency`), recording when each call started.
///
/// With `walk_history` it also reads every message of the history it was given (as a
/// provider serializing the request would), so the cost of a long history shows.
pub struct MockModel {
    pub latency: Option<Duration>,
    pub walk_history: bool,
    pub calls: Arc<Mutex<Vec<Instant>>>,
}

impl MockModel {
    pub fn new(latency: Option<Duration>, walk_history: bool, expected_calls: usize) -> Self {
        MockModel { latency, walk_history, calls: Arc::new(Mutex::new(Vec::with_capacity(expected_calls))) }
    }
}

#[async_trait]
impl ChatModel for MockModel {
    fn name(&self) -> &str {
        "mock"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.calls.lock().expect("calls lock").push(Instant::now());
        let mut prompt_tokens = req.estimated_prompt_tokens();
        if self.walk_history {
            // Touch every byte a provider would serialize.
            let bytes: usize = req.messages().map(|m| m.content.len()).sum();
            prompt_tokens = prompt_tokens.max(bytes as u64 / 4);
        }
        if let Some(l) = self.latency {
            tokio::time::sleep(l).await;
        }
        Ok(ChatResponse {
            text: REPLY.to_string(),
            model: "mock".into(),
            prompt_tokens,
            completion_tokens: 12,
            finish_reason: Some("stop".into()),
            tool_calls: Vec::new(),
        })
    }
}
