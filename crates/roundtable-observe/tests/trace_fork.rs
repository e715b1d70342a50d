//! The causal trace of a session, and forks of it.

mod common;

use common::*;
use roundtable_core::log::Entry;
use roundtable_core::runner::run_peers;
use roundtable_core::session::{SessionSummary, new_session_id, plan_of};
use roundtable_core::{Kind, SessionId};
use roundtable_observe::fork::{Edit, ForkError, fork_envelopes};
use roundtable_observe::trace::Trace;

fn session_of(entries: &[Entry]) -> SessionId {
    entries[0].env.session.clone()
}

#[tokio::test]
async fn the_trace_explains_who_answered_whom_what_it_cost_and_why_it_stopped() {
    let plan = example("product-debate.toml");
    let entries = run(&plan).await;
    let s = session_of(&entries);
    let t = Trace::build(&s, &entries);
    assert_eq!((t.team.as_str(), t.protocol.as_str()), ("product-debate", "round_robin"));
    assert_eq!(t.nodes.len(), 12, "task, 9 turns, the summary, the stop");

    // Round robin: each turn answers the one before; the facilitator answers the last.
    assert!(t.nodes[1].parents.is_empty(), "the first turn opens the discussion");
    for n in &t.nodes[2..11] {
        assert_eq!(n.parents, vec![n.seq - 1], "#{} answers #{}", n.seq, n.seq - 1);
    }
    let pair = |from: &str, to: &str| t.interactions.iter().find(|i| i.from == from && i.to == to).map(|i| i.answers);
    assert_eq!(pair("eng", "pm"), Some(3));
    assert_eq!(pair("cfo", "eng"), Some(3));
    assert_eq!(pair("pm", "cfo"), Some(2));
    assert_eq!(pair("facilitator", "cfo"), Some(1));
    assert_eq!(pair("pm", "eng"), None);

    // Why it stopped: the facilitator's summary decided it, and the whole debate led there.
    let stop = t.stop.as_ref().expect("stopped");
    assert_eq!(stop.seq, 12);
    assert!(stop.reason.starts_with("completed: 3 rounds, then facilitator's summary"), "{}", stop.reason);
    assert_eq!(stop.decided_by, vec![11]);
    assert_eq!(stop.led_by, (2..=11).collect::<Vec<u64>>());
    assert!(stop.answer.as_deref().unwrap().contains("staged plan"));
    assert!(t.nodes.iter().filter(|n| n.led_to_decision).count() == 10);

    // Cost per peer adds up to the session's totals.
    let summary = SessionSummary::from_entries(&s, &entries).unwrap();
    let peers: Vec<&str> = t.peers.iter().map(|p| p.peer.as_str()).collect();
    assert_eq!(peers, ["pm", "eng", "cfo", "facilitator"], "in the team's order");
    assert_eq!(t.total.tokens, summary.tokens);
    assert_eq!(t.total.calls, summary.calls);
    assert_eq!(t.peers[0].messages, 3);
    assert_eq!(t.peers[3].messages, 1);
    for p in &t.peers {
        let tally = &summary.per_peer[&roundtable_core::PeerId::from(p.peer.as_str())];
        assert_eq!(p.tokens, tally.prompt_tokens + tally.completion_tokens, "{}", p.peer);
    }

    let text = t.to_text();
    for needle in [
        "Why it stopped",
        "#12 stop, recorded by",
        "completed: 3 rounds",
        "decided by #11 facilitator",
        "which came from 10 envelopes: #2 pm, #3 eng",
        "⤷ answers #10 cfo",
        "⤷ answers the task",
        "eng answered pm 3×",
        "Cost per peer",
        "facilitator",
        "total",
    ] {
        assert!(text.contains(needle), "text trace lacks {needle:?}:\n{text}");
    }

    let mermaid = t.to_mermaid();
    assert!(mermaid.starts_with("flowchart TD\n"));
    assert!(mermaid.contains("e1 -.-> e2"), "the first turn answers the task:\n{mermaid}");
    assert!(mermaid.contains("e10 ==> e11") && mermaid.contains("e11 ==> e12"), "{mermaid}");
    assert!(mermaid.contains("e12{{"), "the stop is drawn as a decision node");
    assert!(mermaid.contains("class e12 stop"));
    assert!(!mermaid.contains("\"Offline"), "quotes in labels are escaped");

    let dot = t.to_dot();
    assert!(dot.starts_with("digraph \""));
    assert!(dot.contains("n11 -> n12 [penwidth=2.5, color=\"#b91c1c\", label=\"decided\"];"), "{dot}");
    assert!(dot.contains("n1 -> n2 [style=dashed];"));
    assert_eq!(dot.matches(" -> ").count(), 11, "ten answers, one dashed edge from the task\n{dot}");

    let json: serde_json::Value = serde_json::to_value(&t).unwrap();
    assert_eq!(json["stop"]["decided_by"], serde_json::json!([11]));
    assert_eq!(json["nodes"][2]["parents"], serde_json::json!([2]));
    assert_eq!(json["peers"][0]["peer"], "pm");
}

#[tokio::test]
async fn an_open_session_has_no_stop_explanation_yet() {
    let plan = example("api-design.toml");
    let entries = run(&plan).await;
    let t = Trace::build(&session_of(&entries), &entries[..4]);
    assert!(t.stop.is_none());
    assert!(t.to_text().contains("It has not stopped"));
    assert!(t.nodes.iter().all(|n| !n.led_to_decision));
}

#[tokio::test]
async fn a_fork_copies_a_prefix_under_new_ids_records_its_origin_and_continues() {
    let plan = example("product-debate.toml");
    let entries = run(&plan).await;
    let old = session_of(&entries);
    let new = new_session_id();
    let edited_text = "The CFO says: fund offline mode in full, whatever it costs.";
    let edit = Edit { target: format!("#{}", 4), text: edited_text.into() };
    let forked = fork_envelopes(&entries, &new, 5, Some(&edit)).unwrap();
    assert_eq!(forked.len(), 5);
    for (f, o) in forked.iter().zip(&entries) {
        assert_eq!(f.session, new);
        assert_ne!(f.id, o.env.id, "ids are derived from the new session");
        assert_eq!((f.from.as_str(), &*f.step), (o.env.from.as_str(), &*o.env.step));
    }
    assert_eq!(forked[3].body.text.as_ref(), edited_text);
    assert_eq!(forked[4].parents, vec![forked[3].id.clone()], "parents are mapped to the new ids");
    let origin = &forked[0].body.json.as_ref().unwrap()["forked_from"];
    assert_eq!(origin["session"], old.as_str());
    assert_eq!(origin["at"], 5);
    assert_eq!(origin["edited"]["seq"], 4);
    assert_eq!(origin["edited"]["text"], edited_text);
    assert!(origin["edited"]["original_text"].as_str().unwrap().starts_with("Let's put numbers on it"));
    assert!(plan_of(&forked[0]).is_ok(), "the plan is still in the task");

    // Continue it: the peers take over where the prefix ends.
    let log = roundtable_core::log::SharedMemLog(std::sync::Arc::new(roundtable_core::log::MemLog::new(new.clone())));
    for env in forked {
        log.0.append_now(env).unwrap();
    }
    let log: std::sync::Arc<dyn roundtable_core::log::SessionLog> = std::sync::Arc::new(log);
    let summary = run_peers(log.clone(), &plan, offline_models(&plan), None, None).await.unwrap();
    assert!(summary.stop_reason.as_deref().unwrap().starts_with("completed: 3 rounds"));
    let all = log.read_all().await.unwrap();
    assert_eq!(all.len(), 12, "the same shape as the original");
    assert_eq!(all[3].env.body.text.as_ref(), edited_text, "the edit stands");
    assert_eq!(all[5].env.parents, vec![all[4].env.id.clone()]);
    let t = Trace::build(&new, &all);
    assert_eq!(t.forked_from.as_ref().unwrap().session, old.as_str());
    assert!(t.to_text().contains(&format!("Forked from session {old} at #5, with envelope #4 edited")));
}

#[tokio::test]
async fn bad_fork_requests_are_refused_with_the_reason() {
    let plan = example("api-design.toml");
    let entries = run(&plan).await;
    let s = new_session_id();
    let len = entries.len() as u64;
    let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).unwrap().seq;
    assert_eq!(fork_envelopes(&entries, &s, 0, None).unwrap_err(), ForkError::AtZero);
    let e = fork_envelopes(&entries, &s, len + 5, None).unwrap_err();
    assert!(matches!(e, ForkError::PastEnd { at, len: l, .. } if at == len + 5 && l == len), "{e}");
    assert!(e.to_string().contains("past the end"));
    let e = fork_envelopes(&entries, &s, stop, None).unwrap_err();
    assert!(matches!(e, ForkError::IncludesStop { .. }), "{e}");
    assert!(e.to_string().contains(&format!("fork at {} or earlier", stop - 1)), "{e}");

    let edit = |t: &str| Edit { target: t.into(), text: "x".into() };
    let e = fork_envelopes(&entries, &s, 3, Some(&edit("0123456789abcdef0123456789abcdef"))).unwrap_err();
    assert!(matches!(e, ForkError::UnknownEnvelope(..)), "{e}");
    let e = fork_envelopes(&entries, &s, 3, Some(&edit("#999"))).unwrap_err();
    assert!(matches!(e, ForkError::UnknownEnvelope(..)), "{e}");
    let late = entries[5].env.id.to_string();
    let e = fork_envelopes(&entries, &s, 3, Some(&edit(&late))).unwrap_err();
    assert!(matches!(e, ForkError::EditAfterFork { seq: 6, at: 3, .. }), "{e}");
    // A unique prefix of an id names the envelope.
    let id2 = entries[1].env.id.to_string();
    let forked = fork_envelopes(&entries, &s, 3, Some(&edit(&id2[..10]))).unwrap();
    assert_eq!(forked[1].body.text.as_ref(), "x");
    assert!("no-equals-sign".parse::<Edit>().is_err());
    assert_eq!("abc=d=e".parse::<Edit>().unwrap(), Edit { target: "abc".into(), text: "d=e".into() });
}

fn consensus(b_second: &str) -> roundtable_core::team::TeamPlan {
    plan_from(&format!(
        r#"
name = "db-choice"
[models.m]
provider = "scripted"
cycle = true
replies = ["(no script)"]
[models.m.per_peer]
lead = ["Use Postgres. Answer: postgres", "Use Postgres with a replica. Answer: postgres"]
a = ['{{"approve": true, "answer": "postgres", "reason": "Fits."}}']
b = ['{{"approve": false, "answer": "mysql", "reason": "We know MySQL."}}', '{b_second}']
[[peers]]
id = "lead"
model = "m"
[[peers]]
id = "a"
model = "m"
[[peers]]
id = "b"
model = "m"
[protocol]
kind = "consensus"
proposer = "lead"
threshold = 1.0
rounds = 2
"#
    ))
}

#[tokio::test]
async fn the_ballots_behind_a_consensus_are_named_and_a_stop_without_parents_shows_its_last_round() {
    let entries = run(&consensus(r#"{"approve": true, "answer": "postgres", "reason": "With a replica, yes."}"#)).await;
    let t = Trace::build(&session_of(&entries), &entries);
    let stop = t.stop.as_ref().unwrap();
    assert!(stop.reason.starts_with("consensus"), "{}", stop.reason);
    assert_eq!(stop.ballots.len(), 2, "both approving votes on the adopted proposal");
    for &b in &stop.ballots {
        let n = &t.nodes[b as usize - 1];
        assert_eq!((n.kind, n.round), ("vote", 1));
        assert!(n.parents.iter().any(|p| stop.decided_by.contains(p)));
    }
    let text = t.to_text();
    assert!(
        text.contains("ballot on it: #")
            && text.contains("(vote): approves · answer: postgres · reason: With a replica, yes."),
        "{text}"
    );
    assert!(text.contains("(vote): rejects · answer: mysql · reason: We know MySQL."), "{text}");

    let entries = run(&consensus(r#"{"approve": false, "answer": "mysql", "reason": "Still MySQL."}"#)).await;
    let t = Trace::build(&session_of(&entries), &entries);
    let stop = t.stop.as_ref().unwrap();
    assert!(stop.reason.starts_with("no consensus after 2 rounds"), "{}", stop.reason);
    assert!(stop.decided_by.is_empty(), "the protocol names no deciding envelope here");
    assert_eq!(stop.last_round, vec![5, 6, 7], "round 2's proposal and its two votes");
    assert!(t.to_text().contains("the last round before it: #5 lead (proposal), #"), "{}", t.to_text());
}

/// An approval answered after the session's stop (a seat answered late, or the
/// approver's model call outlasted the session): the trace shows it after the stop and
/// counts it as no decision; the call it answers did not run.
#[test]
fn an_approval_answered_after_the_stop_is_shown_after_it_and_is_no_decision() {
    use roundtable_core::envelope::{Body, Envelope, EnvelopeId, PeerId, Recipient, Usage};
    use roundtable_core::session::task_envelope;
    let plan = plan_from(
        "name = \"late\"\n[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n\
         [[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[[peers]]\nid = \"lead\"\nmodel = \"m\"\n\
         [protocol]\nkind = \"conversation\"\n\
         [tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"lead\"\n",
    );
    let s = SessionId::from("late-approval");
    let env = |from: &str, step: &str, kind: Kind, to: Recipient, text: &str, json: serde_json::Value| {
        let mut e = Envelope::new(&s, &PeerId::from(from), step, kind, to, Body::text(text).with_json(json));
        e.parents = Vec::new();
        e
    };
    let call = env(
        "ops",
        "conv/ops/1/call/0",
        Kind::ToolCall,
        Recipient::Peer("ops".into()),
        "deploy({})",
        serde_json::json!({"tool": "deploy", "call_id": "c0", "arguments": "{}", "said": ""}),
    );
    let mut request = env(
        "ops",
        "conv/ops/1/approve/0",
        Kind::Approval,
        Recipient::Peer("lead".into()),
        "ops asks lead to approve deploy({})",
        serde_json::json!({"tool": "deploy", "arguments": "{}", "caller": "ops", "call_step": "conv/ops/1/call/0"}),
    );
    request.parents = vec![call.id.clone()];
    let stop_id = EnvelopeId::derive(&s, &PeerId::from("*"), "stop");
    let mut stop = env(
        "ops",
        "stop",
        Kind::Stop,
        Recipient::All,
        "",
        serde_json::json!({"reason": "quiescent: no unread messages", "accepted": false}),
    );
    stop.id = stop_id;
    let mut answer = env(
        "lead",
        "conv/ops/1/approve/0/answer",
        Kind::Approval,
        Recipient::Peer("ops".into()),
        "{\"approve\": true, \"reason\": \"fine\"}",
        serde_json::json!({"approve": true, "reason": "fine", "timeout": false}),
    )
    .with_usage(Usage { model: "m".into(), calls: 1, ..Default::default() });
    answer.parents = vec![request.id.clone()];
    // The same answer without usage reads as a derived decision, were it before the stop.
    let mut timeout = answer.clone();
    timeout.usage = None;
    let entries: Vec<Entry> = [task_envelope(&s, &plan, "ship"), call, request, stop, timeout]
        .into_iter()
        .enumerate()
        .map(|(i, e)| Entry { seq: i as u64 + 1, env: std::sync::Arc::new(e) })
        .collect();
    let t = Trace::build(&s, &entries);
    let late = t.nodes.iter().find(|n| n.step.ends_with("/answer")).unwrap();
    assert!(late.after_stop && !late.led_to_decision, "{late:?}");
    assert!(t.nodes.iter().filter(|n| n.seq <= 4).all(|n| !n.after_stop));
    assert!(!t.decisions.contains(&late.seq), "an answer after the stop decides nothing: {:?}", t.decisions);
    let text = t.to_text();
    let line = text.lines().find(|l| l.contains(&format!("#{}", late.seq)) && l.contains("lead")).unwrap();
    assert!(line.contains("(approval, after the stop: decides nothing)"), "{text}");
    let json = serde_json::to_value(&t).unwrap();
    assert_eq!(json["nodes"][4]["after_stop"], true);
    assert!(json["nodes"][3].get("after_stop").is_none(), "only what came after is marked");
}
