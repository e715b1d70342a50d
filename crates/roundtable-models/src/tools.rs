//! Tool calls in a conversation, arranged the way both dialects need them.
//!
//! Both APIs insist that every tool call the model made is answered, immediately after
//! the message that made it, and that no result stands without its call. A peer's
//! history does not promise that: other peers' messages may land on the log between a
//! call and its result, a context window may begin between them, and parallel calls are
//! recorded one envelope each. So before a request is written, [`arrange`]:
//!
//! - merges consecutive assistant tool-call messages with no text of their own into one
//!   (the model's parallel calls), with the assistant text right before them (the
//!   answer's text, when it was recorded apart from its calls);
//! - moves each call's result right after the message that made it, in call order, and
//!   whatever came between after them;
//! - answers a call with no result in the conversation with an error result saying so
//!   (the runtime records `outcome unknown` for a call cut off by a crash, so this is
//!   only a call whose result is outside the window or not written yet);
//! - turns a result whose call is not in the conversation into a plain user message,
//!   and drops a repeated call or result (one id given twice, in the history and in
//!   this turn's tool messages).
//!
//! When the request offers no tools, calls and results are written as text instead:
//! Anthropic refuses tool blocks in a request without tools, and a text form reads the
//! same to every server.

use std::collections::HashSet;
use std::sync::Arc;

use roundtable_core::model::{ChatMessage, ChatRequest, Role};
use roundtable_core::tool::ToolCall;

/// What the model is told for a call whose result is not in the conversation.
pub(crate) const NO_RESULT: &str = "(no result was recorded for this call)";

/// The request's messages (without the system prompt) with every tool call followed by
/// its results, as described in the module documentation.
pub(crate) fn arrange(req: &ChatRequest) -> Vec<ChatMessage> {
    let native = !req.tools.is_empty();
    let msgs: Vec<ChatMessage> = req.messages().collect();
    let mut used = vec![false; msgs.len()];
    let mut seen: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(msgs.len());
    for i in 0..msgs.len() {
        if used[i] {
            continue;
        }
        used[i] = true;
        let m = &msgs[i];
        if m.role == Role::Tool {
            // Its call was not before it (that would have taken it): a repeat, or an
            // orphan.
            if !m.tool_call_id.as_deref().is_some_and(|id| seen.contains(id)) {
                out.push(result_as_text(m, None));
            }
            continue;
        }
        if m.role != Role::Assistant || m.tool_calls.is_empty() {
            out.push(m.clone());
            continue;
        }
        let mut calls: Vec<ToolCall> = Vec::new();
        fresh_calls(m, &mut seen, &mut calls);
        for j in i + 1..msgs.len() {
            if used[j] {
                continue;
            }
            let next = &msgs[j];
            if next.role != Role::Assistant || next.tool_calls.is_empty() || !next.content.trim().is_empty() {
                break;
            }
            used[j] = true;
            fresh_calls(next, &mut seen, &mut calls);
        }
        let mut group = m.clone();
        // The answer's text, recorded before its calls, is the calls' message's text.
        if group.content.trim().is_empty()
            && !calls.is_empty()
            && let Some(prev) = out.last()
            && prev.role == Role::Assistant
            && prev.tool_calls.is_empty()
            && prev.name == group.name
        {
            group.content = prev.content.clone();
            out.pop();
        }
        if calls.is_empty() {
            if !group.content.trim().is_empty() {
                group.tool_calls = Arc::from([]);
                out.push(group);
            }
            continue;
        }
        let results: Vec<ChatMessage> = calls
            .iter()
            .map(|c| {
                let found = (i + 1..msgs.len()).find(|&k| {
                    !used[k] && msgs[k].role == Role::Tool && msgs[k].tool_call_id.as_deref() == Some(c.id.as_str())
                });
                match found {
                    Some(k) => {
                        used[k] = true;
                        msgs[k].clone()
                    }
                    None => ChatMessage::tool_failure(Arc::from(c.id.as_str()), Arc::from(NO_RESULT)),
                }
            })
            .collect();
        if native {
            group.tool_calls = calls.into();
            out.push(group);
            out.extend(results);
        } else {
            out.push(calls_as_text(&group, &calls));
            out.extend(results.iter().zip(&calls).map(|(r, c)| result_as_text(r, Some(&c.name))));
        }
    }
    out
}

/// Adds the calls of `m` not seen before to `calls`.
fn fresh_calls<'a>(m: &'a ChatMessage, seen: &mut HashSet<&'a str>, calls: &mut Vec<ToolCall>) {
    for c in m.tool_calls.iter() {
        if seen.insert(c.id.as_str()) {
            calls.push(c.clone());
        }
    }
}

/// An assistant message's calls written into its text.
fn calls_as_text(m: &ChatMessage, calls: &[ToolCall]) -> ChatMessage {
    let mut text = m.content.trim().to_owned();
    for c in calls {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!("(tool call {} {})", c.name, c.arguments.trim()));
    }
    ChatMessage::new(Role::Assistant, m.name.clone(), Arc::from(text))
}

/// A tool result as a user message.
fn result_as_text(m: &ChatMessage, tool: Option<&str>) -> ChatMessage {
    let what = match tool {
        Some(name) => format!("tool result of {name}"),
        None => "tool result".to_owned(),
    };
    let failed = if m.tool_error { ", failed" } else { "" };
    let text = format!("({what}{failed}) {}", m.content.trim());
    ChatMessage::new(Role::User, None, Arc::from(text))
}

/// Tool-call arguments as a JSON object, for dialects that send them parsed. Arguments
/// that are not a JSON object (invalid JSON included) become `{}`: the model was told
/// so by the call's error result, and the API takes nothing but an object here.
pub(crate) fn arguments_object(arguments: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::Value::Object(serde_json::Map::new()),
    }
}

#[cfg(test)]
mod tests {
    use roundtable_core::PeerId;
    use roundtable_core::tool::ToolDef;

    use super::*;

    fn call(id: &str, name: &str) -> ToolCall {
        ToolCall { id: id.into(), name: name.into(), arguments: format!("{{\"id\":\"{id}\"}}") }
    }

    fn calls(ids: &[&str]) -> ChatMessage {
        ChatMessage::tool_calls(Some(PeerId::from("me")), Arc::from(""), ids.iter().map(|i| call(i, "t")).collect())
    }

    fn result(id: &str) -> ChatMessage {
        ChatMessage::tool_result(Arc::from(id), Arc::from(format!("out {id}")))
    }

    fn user(name: &str, text: &str) -> ChatMessage {
        ChatMessage::new(Role::User, Some(PeerId::from(name)), Arc::from(text))
    }

    fn request(history: Vec<ChatMessage>, tools: bool) -> ChatRequest {
        let mut r = ChatRequest::simple("me", "");
        r.instruction = None;
        r.prelude = history;
        if tools {
            r.tools = Arc::from([ToolDef {
                name: "t".into(),
                description: "a tool".into(),
                parameters: serde_json::json!({"type": "object"}),
            }]);
        }
        r
    }

    /// (role, content, call ids, answered call id) of each message.
    fn shape(ms: &[ChatMessage]) -> Vec<(Role, String, Vec<String>, Option<String>)> {
        ms.iter()
            .map(|m| {
                (
                    m.role,
                    m.content.to_string(),
                    m.tool_calls.iter().map(|c| c.id.clone()).collect(),
                    m.tool_call_id.as_deref().map(str::to_owned),
                )
            })
            .collect()
    }

    #[test]
    fn parallel_calls_merge_and_results_follow_them_in_call_order() {
        // The log of a peer's turn with two calls, and a message from bob that landed
        // between the calls and the results, which came back in the other order.
        let r = request(vec![calls(&["a"]), calls(&["b"]), user("bob", "hi"), result("b"), result("a")], true);
        let s = shape(&arrange(&r));
        assert_eq!(
            s,
            vec![
                (Role::Assistant, String::new(), vec!["a".into(), "b".into()], None),
                (Role::Tool, "out a".into(), vec![], Some("a".into())),
                (Role::Tool, "out b".into(), vec![], Some("b".into())),
                (Role::User, "hi".into(), vec![], None),
            ]
        );
    }

    #[test]
    fn the_text_recorded_before_the_calls_is_their_message_s_text() {
        let text = ChatMessage::new(Role::Assistant, Some(PeerId::from("me")), Arc::from("Checking."));
        let r = request(vec![user("bob", "go"), text, calls(&["a"]), result("a")], true);
        let s = shape(&arrange(&r));
        assert_eq!(s[1], (Role::Assistant, "Checking.".into(), vec!["a".into()], None));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_call_without_result_is_answered_and_an_orphan_result_becomes_text() {
        let r = request(vec![result("gone"), calls(&["a"]), user("bob", "next")], true);
        let out = arrange(&r);
        let s = shape(&out);
        assert_eq!(s[0], (Role::User, "(tool result) out gone".into(), vec![], None));
        assert_eq!(s[1].2, vec!["a".to_owned()]);
        assert_eq!(s[2], (Role::Tool, NO_RESULT.into(), vec![], Some("a".into())));
        assert!(out[2].tool_error);
        assert_eq!(s[3].1, "next");
    }

    #[test]
    fn a_call_repeated_in_this_turns_messages_is_sent_once() {
        let mut r = request(vec![calls(&["a"]), result("a")], true);
        r.tool_turns = vec![calls(&["a"]), result("a"), calls(&["c"]), result("c")];
        let s = shape(&arrange(&r));
        let ids: Vec<_> = s.iter().map(|m| (m.0, m.2.clone(), m.3.clone())).collect();
        assert_eq!(
            ids,
            vec![
                (Role::Assistant, vec!["a".to_owned()], None),
                (Role::Tool, vec![], Some("a".to_owned())),
                (Role::Assistant, vec!["c".to_owned()], None),
                (Role::Tool, vec![], Some("c".to_owned())),
            ]
        );
    }

    #[test]
    fn without_tools_offered_calls_and_results_are_text() {
        let mut failed = result("a");
        failed.tool_error = true;
        let r = request(vec![calls(&["a"]), failed], false);
        let s = shape(&arrange(&r));
        assert_eq!(
            s,
            vec![
                (Role::Assistant, "(tool call t {\"id\":\"a\"})".into(), vec![], None),
                (Role::User, "(tool result of t, failed) out a".into(), vec![], None),
            ]
        );
    }

    #[test]
    fn arguments_that_are_not_an_object_become_an_empty_object() {
        assert_eq!(arguments_object("{\"a\": [1]}"), serde_json::json!({"a": [1]}));
        assert_eq!(arguments_object("{\"a\": "), serde_json::json!({}));
        assert_eq!(arguments_object("[1, 2]"), serde_json::json!({}));
        assert_eq!(arguments_object(""), serde_json::json!({}));
    }
}
