//! HTTP model providers for Roundtable: the [`ChatModel`] and [`Embedder`] traits of
//! `roundtable-core`, spoken over the network.
//!
//! - [`OpenAiChat`] and [`OpenAiEmbedder`]: the OpenAI-compatible dialect (OpenAI, Azure
//!   OpenAI, OpenRouter, Ollama, vLLM, llama.cpp, LM Studio).
//! - [`AnthropicChat`]: the Anthropic Messages API.
//!
//! Providers stream: text reaches `ChatRequest::on_token` as it arrives, and the call
//! returns the whole answer with its token usage and the tool calls it asked for (core
//! [`ToolCall`]s; the dialects' wire types stay in here). Failures come back as [`ModelError`]s
//! whose kind says whether a retry can help; retrying, timeouts and concurrency limits
//! are the core layers' job, not the providers'.
//!
//! Credentials are held in [`Secret`]s and never appear in errors, Debug output or logs.
//! TLS is rustls with the `ring` provider ([`ensure_crypto_provider`]), so the binary
//! carries no second crypto library.
//!
//! [`ChatModel`]: roundtable_core::model::ChatModel
//! [`Embedder`]: roundtable_core::model::Embedder
//! [`ModelError`]: roundtable_core::model::ModelError
//! [`ToolCall`]: roundtable_core::tool::ToolCall

mod anthropic;
mod http;
mod openai;
mod program;
mod secret;
mod sse;
mod tools;

pub use anthropic::{AnthropicChat, AnthropicConfig};
pub use http::{ensure_crypto_provider, http_client};
pub use openai::{OpenAiChat, OpenAiConfig, OpenAiEmbedder};
pub use program::CommandProgram;
pub use reqwest;
pub use secret::Secret;
