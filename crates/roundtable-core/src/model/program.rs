//! Program peers: a peer whose turns come from a program instead of a model.
//!
//! A test runner, a linter or a database can sit at the table as an equal: it gets what
//! a model would get (the peer's view of the session, the instruction, this turn's tool
//! results) as an [`Inbox`] and answers with [`ProgramAction`]s — say something, send
//! to a peer or a group, broadcast, call a tool, finish. [`ProgramModel`] turns a
//! [`Program`] into a [`ChatModel`], so a program peer has the same envelopes, budgets,
//! effect rule and traces as any other: its actions become the same tool calls a model
//! would make.
//!
//! A program in another language speaks the same thing as JSON lines (see
//! [`inbox_lines`] and [`parse_action_lines`]): on stdin, a header line
//! `{"peer": …, "step": …, "tools": [names]}` then one line per message
//! `{"role": "user"|"assistant"|"tool", "from": peer or null, "text": …}`; on stdout,
//! one action a line: `{"say": "text"}`, `{"send": {"to": "peer or group", "text": …}}`,
//! `{"broadcast": "text"}`, `{"call": {"tool": "name", "arguments": {…}}}`,
//! `{"finish": "answer"}`. An empty output is a quiet turn.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind, Role};
use crate::tool::ToolCall;

/// One message a program peer is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboxMessage {
    pub role: String,
    /// The peer that said it; `None` for the task and the protocol's instructions.
    pub from: Option<String>,
    pub text: String,
}

/// What a program peer is given for one turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbox {
    pub peer: String,
    pub step: String,
    /// The tools it may call (the peer-to-peer built-ins included).
    pub tools: Vec<String>,
    pub messages: Vec<InboxMessage>,
    /// Whether this turn already made calls (their results are the last messages).
    pub in_turn: bool,
}

/// Something a program peer does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramAction {
    /// Text: the turn's answer (in a conversation, a reply to whoever wrote).
    Say(String),
    Send {
        to: String,
        text: String,
    },
    Broadcast(String),
    Call {
        tool: String,
        arguments: serde_json::Value,
    },
    Finish(String),
}

/// A program that takes a peer's turns.
#[async_trait]
pub trait Program: Send + Sync + 'static {
    /// What to do this turn. An empty list is a quiet turn. An `Err` is recorded as the
    /// turn's failure, like a model error.
    async fn act(&self, inbox: &Inbox) -> Result<Vec<ProgramAction>, String>;
}

/// The inbox of a model request.
pub fn inbox_of(req: &ChatRequest) -> Inbox {
    let messages = req
        .messages()
        .map(|m| InboxMessage {
            role: match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            }
            .to_string(),
            from: m.name.as_ref().map(|n| n.to_string()),
            text: if m.tool_calls.is_empty() {
                m.content.to_string()
            } else {
                m.tool_calls.iter().map(|c| format!("{}({})", c.name, c.arguments)).collect::<Vec<_>>().join("; ")
            },
        })
        .collect();
    Inbox {
        peer: req.peer.to_string(),
        step: req.step.to_string(),
        tools: req.tools.iter().map(|t| t.name.clone()).collect(),
        messages,
        in_turn: !req.tool_turns.is_empty(),
    }
}

/// The inbox as JSON lines, for a program on the other end of a pipe.
pub fn inbox_lines(inbox: &Inbox) -> String {
    let mut out =
        serde_json::json!({ "peer": inbox.peer, "step": inbox.step, "tools": inbox.tools, "in_turn": inbox.in_turn })
            .to_string();
    out.push('\n');
    for m in &inbox.messages {
        out.push_str(&serde_json::to_string(m).expect("messages serialize"));
        out.push('\n');
    }
    out
}

/// Actions from a program's output, one JSON object a line (blank lines skipped). A
/// line that is not an action is an error naming it.
pub fn parse_action_lines(out: &str) -> Result<Vec<ProgramAction>, String> {
    let mut actions = Vec::new();
    for (i, line) in out.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let a: ProgramAction = serde_json::from_str(line).map_err(|e| {
            let shown: String = line.chars().take(120).collect();
            format!(
                "line {} of the program's output is not an action ({e}): {shown}; valid: {{\"say\": …}}, {{\"send\": {{\"to\", \"text\"}}}}, {{\"broadcast\": …}}, {{\"call\": {{\"tool\", \"arguments\"}}}}, {{\"finish\": …}}",
                i + 1
            )
        })?;
        actions.push(a);
    }
    Ok(actions)
}

/// A model answer made of a program's actions.
pub fn response_of(req: &ChatRequest, name: &str, actions: Vec<ProgramAction>) -> ChatResponse {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (i, a) in actions.into_iter().enumerate() {
        let (tool, arguments) = match a {
            ProgramAction::Say(t) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
                continue;
            }
            ProgramAction::Send { to, text } => ("send".to_string(), serde_json::json!({ "to": to, "text": text })),
            ProgramAction::Broadcast(t) => ("broadcast".to_string(), serde_json::json!({ "text": t })),
            ProgramAction::Finish(a) => ("finish".to_string(), serde_json::json!({ "answer": a })),
            ProgramAction::Call { tool, arguments } => (tool, arguments),
        };
        calls.push(ToolCall {
            id: format!("prog-{}-{}-{}-{i}", req.peer, req.step.replace('/', "_"), req.ordinal),
            name: tool,
            arguments: arguments.to_string(),
        });
    }
    ChatResponse {
        text,
        model: name.to_string(),
        prompt_tokens: 0,
        completion_tokens: 0,
        finish_reason: Some(if calls.is_empty() { "stop" } else { "tool_calls" }.into()),
        tool_calls: calls,
    }
}

/// A [`Program`] as a [`ChatModel`].
pub struct ProgramModel<P> {
    name: String,
    program: Arc<P>,
}

impl<P: Program> ProgramModel<P> {
    pub fn new(name: impl Into<String>, program: P) -> Self {
        ProgramModel { name: name.into(), program: Arc::new(program) }
    }
}

#[async_trait]
impl<P: Program> ChatModel for ProgramModel<P> {
    fn name(&self) -> &str {
        &self.name
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let inbox = inbox_of(req);
        // A program's error is its own: retrying it would give the same answer.
        let actions = self
            .program
            .act(&inbox)
            .await
            .map_err(|e| ModelError::new(ModelErrorKind::BadRequest, format!("program: {e}")))?;
        Ok(response_of(req, &self.name, actions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_from_json_lines_and_become_tool_calls() {
        let out = "{\"say\": \"looked\"}\n\n{\"send\": {\"to\": \"api\", \"text\": \"2 failures\"}}\n{\"call\": {\"tool\": \"run\", \"arguments\": {\"x\": 1}}}\n{\"finish\": \"done\"}\n";
        let actions = parse_action_lines(out).unwrap();
        assert_eq!(actions.len(), 4);
        let req = ChatRequest::simple("lint", "go");
        let r = response_of(&req, "p", actions);
        assert_eq!(r.text, "looked");
        let names: Vec<&str> = r.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["send", "run", "finish"]);
        assert_eq!(r.tool_calls[0].arguments, "{\"text\":\"2 failures\",\"to\":\"api\"}");
        let e = parse_action_lines("{\"say\": \"ok\"}\nrm -rf /\n").unwrap_err();
        assert!(e.starts_with("line 2 "), "{e}");
    }

    #[test]
    fn the_inbox_goes_out_as_a_header_and_one_line_a_message() {
        let req = ChatRequest::simple("lint", "Check the patch");
        let lines = inbox_lines(&inbox_of(&req));
        let v: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["peer"], "lint");
        assert_eq!(v[1]["role"], "user");
        assert_eq!(v[1]["text"], "Check the patch");
        assert_eq!(v.len(), 2);
    }
}
