//! Outcomes never claim more than the team decided: a session stopped by a budget, a
//! termination condition or a timeout before its protocol accepted an answer reports
//! its leading candidate as not accepted, and the stop names the envelope it was
//! decided by.

mod common;

use common::*;
use roundtable_core::Kind;

/// A code-review board: two of three reviewers reject the patch in every round.
fn review(extra: &str) -> roundtable_core::team::TeamPlan {
    let model = scripted(&[
        ("author", &["Approve the patch as written."]),
        ("security", &[r#"{"approve": false, "reason": "SQL built by string concatenation"}"#]),
        ("perf", &[r#"{"approve": false, "reason": "N+1 queries"}"#]),
        ("style", &[r#"{"approve": true, "reason": "fine"}"#]),
    ]);
    plan(&format!(
        "{model}{}[protocol]\nkind = \"consensus\"\nproposer = \"author\"\nrounds = 3\n{extra}\n",
        peers(&["author", "security", "perf", "style"])
    ))
}

#[tokio::test]
async fn a_budget_stop_leaves_the_leading_candidate_not_accepted_and_names_the_last_call() {
    let (log, s) = run(&review("[budget]\nmax_calls = 6\n"), "Review PR 42").await;
    assert!(s.stop_reason.as_deref().unwrap().starts_with("budget:"), "{:?}", s.stop_reason);
    assert!(!s.answer_accepted, "two of three reviewers rejected it");
    assert_eq!(s.final_answer.as_deref(), Some("Approve the patch as written."), "the leading candidate is shown");
    let at = log.iter().position(|e| e.kind == Kind::Stop).unwrap();
    let stop = &log[at];
    let json = stop.body.json.as_ref().unwrap();
    assert_eq!(json["accepted"], false);
    let last_call = log[..at].iter().rfind(|e| e.usage.is_some()).unwrap();
    assert_eq!(json["decided_by"], serde_json::json!([last_call.id.as_str()]), "the call that reached the limit");
    assert_eq!(stop.parents, vec![last_call.id.clone()]);
    let summary = serde_json::to_value(&s).unwrap();
    assert_eq!(summary["answer_accepted"], false);
}

#[tokio::test]
async fn a_termination_stop_is_not_an_acceptance_and_the_protocols_rule_is() {
    let (log, s) = run(&review("[termination]\nmax_messages = 3\n"), "Review PR 42").await;
    assert!(s.stop_reason.as_deref().unwrap().starts_with("max_messages"), "{:?}", s.stop_reason);
    assert!(!s.answer_accepted);
    let stop = log.iter().find(|e| e.kind == Kind::Stop).unwrap();
    assert!(!stop.parents.is_empty(), "a termination stop names the envelope it was decided by");

    // Without the limit, the protocol's own rule decides: no consensus, no answer.
    let (_, s) = run(&review(""), "Review PR 42").await;
    assert!(!s.answer_accepted);
    assert_eq!(s.final_answer, None, "{:?}", s.stop_reason);
    assert_eq!(s.rounds, 3, "rounds are counted from 1: {:?}", s.stop_reason);

    // With the threshold met, the answer is accepted.
    let (_, s) = run(&review("threshold = 0.3"), "Review PR 42").await;
    assert!(s.answer_accepted, "{:?}", s.stop_reason);
    assert_eq!((s.stop_reason.as_deref().unwrap().contains("in round 1"), s.rounds), (true, 1), "{:?}", s.stop_reason);
    assert_eq!(s.final_answer.as_deref(), Some("Approve the patch as written."));
}

/// Scripted models are predictable: a summarizer's summaries come from its own list
/// and never consume its turns' replies, `{round}` is filled in (from 1), and a list
/// that runs out fails the call instead of starting over.
#[tokio::test]
async fn scripted_summaries_are_apart_rounds_are_filled_in_and_running_out_is_an_error() {
    let src = |rounds: u32| {
        format!(
            "[models.m]\nprovider = \"scripted\"\nsummary_replies = [\"S{{n}} (round {{round}})\", \"S{{n}} (round {{round}})\"]\n\
             [models.m.per_peer]\na = [\"a1 r{{round}}\", \"a2 r{{round}}\", \"a3 r{{round}}\"]\n\
             b = [\"b1 r{{round}}\", \"b2 r{{round}}\", \"b3 r{{round}}\"]\n{}\
             [protocol]\nkind = \"round_robin\"\nrounds = {rounds}\n\
             [context]\npolicy = \"summary\"\nkeep_rounds = 1\nsummarizer = \"b\"\n",
            peers(&["a", "b"])
        )
    };
    let plan = common::plan(&src(3));
    let (log, s) = run(&plan, "topic").await;
    assert_eq!(s.failures, 0, "{:?}", s.stop_reason);
    let texts = |kind: Kind| -> Vec<String> {
        log.iter().filter(|e| e.kind == kind).map(|e| e.body.text.to_string()).collect()
    };
    assert_eq!(texts(Kind::Message), ["a1 r1", "b1 r1", "a2 r2", "b2 r2", "a3 r3", "b3 r3"]);
    assert_eq!(texts(Kind::Summary), ["S1 (round 3)"], "one summary, before round 3, from its own list");

    // A fourth round needs a fourth reply: the call fails, naming the peer.
    let (log, _) = run(&common::plan(&src(4)), "topic").await;
    let failure = log.iter().find(|e| e.kind == Kind::Failure && e.usage.is_some()).expect("a failed call");
    assert!(failure.body.text.contains("ran out of replies for peer a"), "{}", failure.body.text);
}
