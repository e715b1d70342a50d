//! `scripted`: replies listed in the team file or a file, for demos and tests.
//!
//! The reply for a call is chosen from the log, not from the model's own state: the
//! calling peer's list (or the shared list) at index `ordinal % len`, where `ordinal`
//! counts the peer's earlier calls in the session. So a resumed or replayed session
//! gets the same replies. `{peer}`, `{step}` and `{n}` (ordinal + 1) are substituted.
//!
//! A reply of the form `!error KIND message` fails the call with that error kind
//! (`server`, `rate_limited`, `timeout`, `empty`, `auth`, …), to rehearse failures
//! offline.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind, estimate_tokens};
use crate::envelope::PeerId;

/// A model that answers from a script.
#[derive(Clone, Debug)]
pub struct Scripted {
    name: String,
    shared: Vec<String>,
    per_peer: HashMap<PeerId, Vec<String>>,
}

impl Scripted {
    pub fn new(name: impl Into<String>, shared: Vec<String>, per_peer: HashMap<PeerId, Vec<String>>) -> Self {
        Scripted { name: name.into(), shared, per_peer }
    }

    fn pick(&self, req: &ChatRequest) -> Option<&str> {
        let list = self.per_peer.get(&req.peer).filter(|l| !l.is_empty()).unwrap_or(&self.shared);
        if list.is_empty() {
            return None;
        }
        Some(&list[req.ordinal as usize % list.len()])
    }
}

pub(crate) fn parse_error_directive(reply: &str) -> Option<ModelError> {
    let rest = reply.strip_prefix("!error ")?;
    let (kind, msg) = rest.split_once(' ').unwrap_or((rest, "scripted failure"));
    let kind = match kind {
        "auth" => ModelErrorKind::Auth,
        "bad_request" => ModelErrorKind::BadRequest,
        "rate_limited" => ModelErrorKind::RateLimited,
        "timeout" => ModelErrorKind::Timeout,
        "transport" => ModelErrorKind::Transport,
        "truncated" => ModelErrorKind::Truncated,
        "empty" => ModelErrorKind::Empty,
        "malformed" => ModelErrorKind::Malformed,
        _ => ModelErrorKind::Server,
    };
    Some(ModelError::new(kind, msg))
}

#[async_trait]
impl ChatModel for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let Some(template) = self.pick(req) else {
            return Err(ModelError::new(
                ModelErrorKind::Config,
                format!("scripted model {:?} has no replies for peer {}", self.name, req.peer),
            ));
        };
        if let Some(e) = parse_error_directive(template) {
            return Err(e);
        }
        let text = template
            .replace("{peer}", req.peer.as_str())
            .replace("{step}", &req.step)
            .replace("{n}", &(req.ordinal + 1).to_string());
        if req.on_token.is_some() {
            for piece in text.split_inclusive(' ') {
                req.emit(piece);
            }
        }
        Ok(ChatResponse {
            completion_tokens: u64::from(estimate_tokens(&text)),
            prompt_tokens: req.estimated_prompt_tokens(),
            model: self.name.clone(),
            finish_reason: Some("stop".into()),
            text,
            tool_calls: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn picks_by_peer_and_ordinal_and_substitutes() {
        let mut per = HashMap::new();
        per.insert(PeerId::from("cfo"), vec!["money {n}".to_string()]);
        let m = Scripted::new("s", vec!["a from {peer}".into(), "b at {step}".into()], per);
        let mut r = ChatRequest::simple("pm", "go");
        assert_eq!(m.chat(&r).await.unwrap().text, "a from pm");
        r.ordinal = 1;
        r.step = "turn/4".into();
        assert_eq!(m.chat(&r).await.unwrap().text, "b at turn/4");
        r.ordinal = 2;
        assert_eq!(m.chat(&r).await.unwrap().text, "a from pm");
        r.peer = "cfo".into();
        assert_eq!(m.chat(&r).await.unwrap().text, "money 3");
    }

    #[tokio::test]
    async fn error_directive_fails_the_call() {
        let m = Scripted::new("s", vec!["!error rate_limited too fast".into()], HashMap::new());
        let e = m.chat(&ChatRequest::simple("p", "x")).await.unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::RateLimited);
        assert_eq!(e.message, "too fast");
    }

    #[tokio::test]
    async fn streams_the_reply_in_pieces() {
        let m = Scripted::new("s", vec!["one two three".into()], HashMap::new());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let g = got.clone();
        let mut r = ChatRequest::simple("p", "x");
        r.on_token = Some(std::sync::Arc::new(move |t: &str| g.lock().unwrap().push(t.to_string())));
        m.chat(&r).await.unwrap();
        assert_eq!(*got.lock().unwrap(), ["one ", "two ", "three"]);
    }
}
