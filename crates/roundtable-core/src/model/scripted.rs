//! `scripted`: replies listed in the team file or a file, for demos and tests.
//!
//! The reply for a call is chosen from the log, not from the model's own state: the
//! calling peer's list (or the shared list) at index `ordinal`, where `ordinal` counts
//! the peer's earlier turns in the session. So a resumed or replayed session gets the
//! same replies. A summary of older rounds (step `summary/…`) takes the n-th of the
//! `summary_replies` instead (n counting the session's summaries), so summaries never
//! consume a turn's reply; without summary replies it is a fixed sentence naming the
//! rounds it covers.
//!
//! A list that runs out is an error naming the peer and the call, unless the model
//! cycles (`cycle = true`), when it starts over. Placeholders filled in: `{peer}`,
//! `{step}`, `{n}` (the call's number for this peer, from 1) and `{round}` (the
//! protocol round, from 1).
//!
//! `delay_secs` makes every call take that long before it answers, so that a demo or
//! a test can kill a peer or a server in the middle of a call, offline.
//!
//! A reply of the form `!error KIND message` fails the call with that error kind
//! (`server`, `rate_limited`, `timeout`, `empty`, `auth`, …), to rehearse failures
//! offline.
//!
//! A reply whose lines include `!tool NAME {json arguments}` asks for tool calls, one a
//! line, in order; plain lines before the first of them are the answer's text (blank
//! lines anywhere are ignored, text after a `!tool` line is a configuration error). The
//! arguments are the rest of the line, kept as written (invalid JSON included, to
//! rehearse a model that writes it; nothing means `{}`). A call's id is derived from
//! the peer, step, ordinal and the call's index in the reply
//! (`call-{peer}-{step}-{ordinal}-{index}`, characters other than `[A-Za-z0-9_-]`
//! replaced by `_`), so a resumed or replayed session sees the same ids.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind, estimate_tokens, tool_call_tokens};
use crate::envelope::PeerId;
use crate::tool::ToolCall;

/// A model that answers from a script.
#[derive(Clone, Debug)]
pub struct Scripted {
    name: String,
    shared: Vec<String>,
    per_peer: HashMap<PeerId, Vec<String>>,
    summaries: Vec<String>,
    cycle: bool,
    delay: std::time::Duration,
}

/// What a call gets from the script.
enum Pick<'a> {
    Reply(&'a str),
    /// A summary with no summary replies scripted.
    DefaultSummary,
    /// No list for the peer.
    Nothing,
    /// The list ran out (and the model does not cycle): its length.
    RanOut(usize),
}

impl Scripted {
    /// A script that cycles through its lists (see [`Scripted::cycling`]).
    pub fn new(name: impl Into<String>, shared: Vec<String>, per_peer: HashMap<PeerId, Vec<String>>) -> Self {
        Scripted {
            name: name.into(),
            shared,
            per_peer,
            summaries: Vec::new(),
            cycle: true,
            delay: std::time::Duration::ZERO,
        }
    }

    /// The scripted model of a team file's `[models.NAME]`, if it is one.
    pub fn from_spec(name: impl Into<String>, spec: &crate::team::ProviderSpec) -> Option<Self> {
        let crate::team::ProviderSpec::Scripted { replies, per_peer, summary_replies, cycle, delay_ms } = spec else {
            return None;
        };
        let per_peer = per_peer.iter().map(|(k, v)| (PeerId::from(k.as_str()), v.clone())).collect();
        Some(
            Scripted::new(name, replies.clone(), per_peer)
                .with_summaries(summary_replies.clone())
                .cycling(*cycle)
                .delayed(std::time::Duration::from_millis(*delay_ms)),
        )
    }

    /// Take `delay` over each call before answering, like a slow model.
    pub fn delayed(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Whether a list that runs out starts over (true) or fails the call (false).
    pub fn cycling(mut self, cycle: bool) -> Self {
        self.cycle = cycle;
        self
    }

    /// Replies for summaries of older rounds.
    pub fn with_summaries(mut self, summaries: Vec<String>) -> Self {
        self.summaries = summaries;
        self
    }

    fn pick(&self, req: &ChatRequest) -> Pick<'_> {
        let list = if crate::session::summary_upto(&req.step).is_some() {
            if self.summaries.is_empty() {
                return Pick::DefaultSummary;
            }
            &self.summaries
        } else {
            self.per_peer.get(&req.peer).filter(|l| !l.is_empty()).unwrap_or(&self.shared)
        };
        let i = req.ordinal as usize;
        match (list.len(), self.cycle) {
            (0, _) => Pick::Nothing,
            (n, true) => Pick::Reply(&list[i % n]),
            (n, false) if i < n => Pick::Reply(&list[i]),
            (n, false) => Pick::RanOut(n),
        }
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

/// The text and tool calls of a reply with `!tool` lines; `None` when it has none.
pub(crate) fn parse_tool_directives(
    reply: &str,
    req: &ChatRequest,
) -> Result<Option<(String, Vec<ToolCall>)>, ModelError> {
    const TOOL: &str = "!tool";
    let is_directive =
        |l: &str| l.trim_start().strip_prefix(TOOL).is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']));
    if !reply.lines().any(is_directive) {
        return Ok(None);
    }
    let bad = |n: usize, why: &str| {
        ModelError::new(ModelErrorKind::Config, format!("scripted reply for peer {}, line {n}: {why}", req.peer))
    };
    let mut text: Vec<&str> = Vec::new();
    let mut calls = Vec::new();
    for (i, line) in reply.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !is_directive(line) {
            if !calls.is_empty() {
                return Err(bad(i + 1, "text after a `!tool` line (text goes before the calls)"));
            }
            text.push(line);
            continue;
        }
        let rest = line.trim_start()[TOOL.len()..].trim();
        let (name, arguments) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if name.is_empty() {
            return Err(bad(i + 1, "`!tool` needs a tool name: `!tool NAME {json arguments}`"));
        }
        let arguments = arguments.trim();
        let id = format!("call-{}-{}-{}-{}", req.peer, req.step, req.ordinal, calls.len());
        let id = id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        calls.push(ToolCall {
            id,
            name: name.to_owned(),
            arguments: if arguments.is_empty() { "{}".to_owned() } else { arguments.to_owned() },
        });
    }
    Ok(Some((text.join("\n"), calls)))
}

#[async_trait]
impl ChatModel for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let default_summary;
        let template = match self.pick(req) {
            Pick::Reply(t) => t,
            Pick::DefaultSummary => {
                let upto = crate::session::summary_upto(&req.step).unwrap_or(0) + 1;
                default_summary = format!("Summary of rounds 1 to {upto}.");
                &default_summary
            }
            Pick::Nothing => {
                return Err(ModelError::new(
                    ModelErrorKind::Config,
                    format!("scripted model {:?} has no replies for peer {}", self.name, req.peer),
                ));
            }
            Pick::RanOut(n) => {
                let what =
                    if crate::session::summary_upto(&req.step).is_some() { "summary replies" } else { "replies" };
                return Err(ModelError::new(
                    ModelErrorKind::Config,
                    format!(
                        "scripted model {:?} ran out of {what} for peer {} at step {} (call {} of a list of {n}); \
                         add replies, or set `cycle = true` to start the list over",
                        self.name,
                        req.peer,
                        req.step,
                        req.ordinal + 1
                    ),
                ));
            }
        };
        if let Some(e) = parse_error_directive(template) {
            return Err(e);
        }
        let text = template
            .replace("{peer}", req.peer.as_str())
            .replace("{step}", &req.step)
            .replace("{n}", &(req.ordinal + 1).to_string())
            .replace("{round}", &req.round.to_string());
        let (text, tool_calls) = match parse_tool_directives(&text, req)? {
            Some(answer) => answer,
            None => (text, Vec::new()),
        };
        if req.on_token.is_some() {
            for piece in text.split_inclusive(' ') {
                req.emit(piece);
            }
        }
        Ok(ChatResponse {
            completion_tokens: u64::from(estimate_tokens(&text) + tool_call_tokens(&tool_calls)),
            prompt_tokens: req.estimated_prompt_tokens(),
            model: self.name.clone(),
            finish_reason: Some(if tool_calls.is_empty() { "stop" } else { "tool_calls" }.into()),
            text,
            tool_calls,
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
    async fn running_out_is_an_error_unless_the_script_cycles_and_summaries_are_apart() {
        let m = Scripted::new("s", vec!["one at round {round}".into()], HashMap::new()).cycling(false);
        let mut r = ChatRequest::simple("pm", "go");
        r.round = 3;
        assert_eq!(m.chat(&r).await.unwrap().text, "one at round 3");
        r.ordinal = 1;
        let e = m.chat(&r).await.unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::Config);
        assert!(
            e.message.contains("ran out of replies for peer pm") && e.message.contains("cycle = true"),
            "{}",
            e.message
        );
        let m = m.cycling(true).with_summaries(vec!["S{n}".into()]);
        assert_eq!(m.chat(&r).await.unwrap().text, "one at round 3");
        r.step = "summary/4".into();
        r.ordinal = 0;
        assert_eq!(m.chat(&r).await.unwrap().text, "S1");
        let plain = Scripted::new("s", vec!["turn".into()], HashMap::new());
        assert_eq!(
            plain.chat(&r).await.unwrap().text,
            "Summary of rounds 1 to 5.",
            "a summary never takes a turn's reply"
        );
    }

    #[tokio::test]
    async fn error_directive_fails_the_call() {
        let m = Scripted::new("s", vec!["!error rate_limited too fast".into()], HashMap::new());
        let e = m.chat(&ChatRequest::simple("p", "x")).await.unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::RateLimited);
        assert_eq!(e.message, "too fast");
    }

    #[tokio::test]
    async fn tool_directives_become_tool_calls_with_stable_ids() {
        let reply = "Let me check both.\n\n!tool read_file {\"path\": \"a.txt\"}\n  !tool send {\"to\": \"{peer}\", \"text\": \"hi\"}\n!tool finish\n!tool bad {not json";
        let m = Scripted::new("s", vec![reply.into()], HashMap::new());
        let mut r = ChatRequest::simple("qa", "go");
        r.step = "turn/3".into();
        r.ordinal = 2;
        let a = m.chat(&r).await.unwrap();
        assert_eq!(a.text, "Let me check both.");
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
        let got: Vec<(&str, &str, &str)> =
            a.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str())).collect();
        assert_eq!(
            got,
            [
                ("call-qa-turn_3-2-0", "read_file", "{\"path\": \"a.txt\"}"),
                ("call-qa-turn_3-2-1", "send", "{\"to\": \"qa\", \"text\": \"hi\"}"),
                ("call-qa-turn_3-2-2", "finish", "{}"),
                ("call-qa-turn_3-2-3", "bad", "{not json"),
            ]
        );
        // The same call again (a resume, a replay) gets the same ids.
        assert_eq!(m.chat(&r).await.unwrap().tool_calls, a.tool_calls);
        // Arguments count toward the completion estimate.
        let plain = Scripted::new("s", vec!["Let me check both.".into()], HashMap::new());
        assert!(a.completion_tokens > plain.chat(&r).await.unwrap().completion_tokens + 10);
    }

    #[tokio::test]
    async fn a_reply_of_only_tool_calls_has_no_text() {
        let m = Scripted::new("s", vec!["!tool board_read".into()], HashMap::new());
        let a = m.chat(&ChatRequest::simple("p", "x")).await.unwrap();
        assert_eq!((a.text.as_str(), a.tool_calls.len()), ("", 1));
        // A word that only starts like the directive is text.
        let m = Scripted::new("s", vec!["!toolbox is a word".into()], HashMap::new());
        let a = m.chat(&ChatRequest::simple("p", "x")).await.unwrap();
        assert_eq!((a.text.as_str(), a.tool_calls.len()), ("!toolbox is a word", 0));
    }

    #[tokio::test]
    async fn bad_tool_directives_are_config_errors_naming_the_line() {
        for (reply, why) in [
            ("!tool send {}\nand then some text", "line 2: text after"),
            ("thinking\n!tool   ", "line 2: `!tool` needs a tool name"),
        ] {
            let m = Scripted::new("s", vec![reply.into()], HashMap::new());
            let e = m.chat(&ChatRequest::simple("p", "x")).await.unwrap_err();
            assert_eq!(e.kind, ModelErrorKind::Config, "{reply:?}");
            assert!(e.message.contains(why), "{reply:?}: {}", e.message);
        }
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
