//! Every protocol's decisions: hand-folded logs for the exact rules (ties, malformed
//! votes, failures, absent peers, reveals that do not match), and in-memory runs with
//! offline models for the whole path through peers, models and the log.

mod common;

use std::sync::Arc;

use common::*;
use roundtable_core::envelope::{Kind, PeerId};
use roundtable_core::eval::offline_models;
use roundtable_core::peer::PeerExtras;
use roundtable_core::protocol::{Action, View};

// ---------------------------------------------------------------------------------
// Debate.

fn debate(extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\n{extra}\n",
        simulated(0.6, 0.0, 1),
        peers(&["a", "b", "c"])
    ))
}

#[tokio::test]
async fn debate_rounds_see_only_the_previous_round_and_end_with_a_vote() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\n",
        scripted(&[
            ("a", &["a at {step}. Answer: 1"]),
            ("b", &["b at {step}. Answer: 2"]),
            ("c", &["c at {step}. Answer: 1"]),
        ]),
        peers(&["a", "b", "c"])
    ));
    let (models, calls) = recorded(&p);
    let (log, summary) = run_with(&p, QUESTION, models, PeerExtras::default(), None, None).await;
    let answers = steps_of(&log, Kind::Message);
    assert_eq!(
        answers.len(),
        6,
        "3 members × 2 rounds (the default): {answers:?}"
    );
    // Every round-0 answer is on the log before any round-1 answer.
    let first_r1 = log.iter().position(|e| &*e.step == "r1/answer").unwrap();
    assert_eq!(
        log[..first_r1]
            .iter()
            .filter(|e| &*e.step == "r0/answer")
            .count(),
        3
    );
    for c in calls.lock().unwrap().iter() {
        let texts: Vec<&str> = c.messages.iter().map(|m| m.1.as_str()).collect();
        if c.step == "r0/answer" {
            assert_eq!(texts, [QUESTION], "round 0 sees the task alone");
        } else {
            assert!(
                texts.iter().all(|t| !t.contains("r1/answer")),
                "no same-round answer in view: {texts:?}"
            );
            for peer in ["a", "b", "c"] {
                assert!(
                    texts.contains(
                        &format!(
                            "{peer} at r0/answer. Answer: {}",
                            if peer == "b" { 2 } else { 1 }
                        )
                        .as_str()
                    )
                );
            }
        }
    }
    // Round-1 answers are caused by the three round-0 answers.
    let r0: Vec<_> = log
        .iter()
        .filter(|e| &*e.step == "r0/answer")
        .map(|e| e.id.clone())
        .collect();
    for e in log.iter().filter(|e| &*e.step == "r1/answer") {
        let mut parents = e.parents.clone();
        parents.sort();
        let mut want = r0.clone();
        want.sort();
        assert_eq!(parents, want);
    }
    assert_eq!(summary.final_answer.as_deref(), Some("1"));
    assert!(
        summary
            .stop_reason
            .as_deref()
            .unwrap()
            .starts_with("vote after 2 rounds (plurality): 1 with 2 of 3"),
        "{:?}",
        summary.stop_reason
    );
    stop_of(&log);
}

#[test]
fn debate_ties_go_to_team_order_and_a_failed_round_keeps_the_earlier_answer() {
    let p = debate("rounds = 2");
    let mut f = Fold::new(&p, QUESTION);
    assert_eq!(f.steps("a"), ["r0/answer"]);
    f.say("b", "r0/answer", Kind::Message, "Answer: 5");
    f.say("a", "r0/answer", Kind::Message, "Answer: 7");
    assert!(f.steps("a").is_empty(), "a waits for the round to close");
    f.say("c", "r0/answer", Kind::Message, "Answer: 9");
    let d = &f.duties("a")[0];
    let Action::Speak {
        view: View::Shown(shown),
        ..
    } = &d.action
    else {
        panic!("{d:?}")
    };
    let shown: Vec<(&str, &str)> = shown.iter().map(|s| (s.from.as_str(), &*s.text)).collect();
    assert_eq!(
        shown,
        [("a", "Answer: 7"), ("b", "Answer: 5"), ("c", "Answer: 9")],
        "own answer first, then the others in team order"
    );
    f.fail("a", "r1/answer");
    f.say("c", "r1/answer", Kind::Message, "Answer: 5");
    assert!(f.stop().is_none());
    f.say("b", "r1/answer", Kind::Message, "Answer: 9");
    // Latest: a = 7 (round 0: its round-1 answer failed), b = 9, c = 5: a three-way tie,
    // won by the answer of the first peer in team order, whatever order they landed in.
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("7"));
    assert!(reason.contains("tie broken by team order"), "{reason}");
}

#[test]
fn debate_majority_rule_gives_no_answer_without_a_majority_and_absent_members_are_not_waited_for() {
    let p = debate("rounds = 1\nvote = \"majority\"");
    let mut f = Fold::new(&p, QUESTION);
    f.say("a", "r0/answer", Kind::Message, "Answer: 7");
    f.say("b", "r0/answer", Kind::Message, "Answer: 8");
    assert!(f.stop().is_none(), "c has not answered");
    f.absent("c");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None);
    assert!(reason.starts_with("no majority after 1 rounds"), "{reason}");

    let mut f = Fold::new(&p, QUESTION);
    f.say("a", "r0/answer", Kind::Message, "Answer: 7");
    f.say(
        "b",
        "r0/answer",
        Kind::Message,
        "I think it is seven. Answer: 7.0",
    );
    f.say("c", "r0/answer", Kind::Message, "Answer: 8");
    assert_eq!(
        f.stop().unwrap().1.as_deref(),
        Some("7"),
        "7 and 7.0 are one answer, with 2 of 3"
    );
}

// ---------------------------------------------------------------------------------
// Context: summaries of older rounds keep prompts flat.

fn long_discussion(context: &str) -> roundtable_core::team::TeamPlan {
    let reply = "This is a contribution of a fixed length so that every turn adds the same number of tokens to the history.";
    plan(&format!(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"{reply}\"]\n{}[protocol]\nkind = \"round_robin\"\nrounds = 8\n{context}\n",
        peers(&["a", "b"])
    ))
}

/// Prompt tokens of the turns of each round, from the usage on the log.
fn prompt_tokens_per_round(log: &[Arc<roundtable_core::Envelope>]) -> Vec<u64> {
    let mut per = vec![0u64; 8];
    for e in log.iter().filter(|e| e.step.starts_with("turn/")) {
        per[e.round as usize] += e.usage.as_ref().unwrap().prompt_tokens;
    }
    per
}

#[tokio::test]
async fn summaries_keep_prompt_tokens_per_round_flat() {
    let (full_log, _) = run(&long_discussion(""), "Discuss the plan.").await;
    let full_per = prompt_tokens_per_round(&full_log);
    assert!(
        full_per.windows(2).all(|w| w[1] > w[0]),
        "full history grows every round: {full_per:?}"
    );

    let p = long_discussion("[context]\npolicy = \"summary\"\nkeep_rounds = 1\nsummarizer = \"b\"");
    let (models, calls) = recorded(&p);
    let (log, summary) = run_with(
        &p,
        "Discuss the plan.",
        models,
        PeerExtras::default(),
        None,
        None,
    )
    .await;
    let per = prompt_tokens_per_round(&log);
    assert!(
        per[2..].iter().all(|t| *t == per[2]),
        "flat from round 3 on: {per:?}"
    );
    assert!(per[7] < full_per[7] / 2, "{per:?} vs {full_per:?}");
    // One summary per round from round 3 on, each written by the summarizer, before the
    // round's first turn, and counted in the session's calls and tokens.
    let summaries: Vec<_> = log.iter().filter(|e| e.kind == Kind::Summary).collect();
    assert_eq!(
        summaries
            .iter()
            .map(|e| e.step.to_string())
            .collect::<Vec<_>>(),
        (0..6).map(|u| format!("summary/{u}")).collect::<Vec<_>>()
    );
    assert!(
        summaries
            .iter()
            .all(|e| e.from.as_str() == "b" && e.usage.is_some())
    );
    for s in &summaries {
        let upto: u32 = s.step.trim_start_matches("summary/").parse().unwrap();
        let pos = log.iter().position(|e| Arc::ptr_eq(e, s)).unwrap();
        assert!(
            log[..pos]
                .iter()
                .all(|e| e.round <= upto + 1 || !e.step.starts_with("turn/")),
            "no turn of round {} before its summary",
            upto + 2
        );
    }
    assert_eq!(summary.calls, 16 + 6);
    // A late turn's prompt holds the task, the latest summary and the last rounds only.
    let calls = calls.lock().unwrap();
    let last = calls.iter().find(|c| c.step == "turn/15").unwrap();
    assert_eq!(last.messages[0].1, "Discuss the plan.");
    assert!(
        last.messages[1]
            .1
            .starts_with("Summary of rounds 1 to 6 (by b)"),
        "{:?}",
        last.messages[1]
    );
    assert_eq!(
        last.messages.len(),
        2 + 3,
        "task, summary, round 7 (2) and round 8 so far (1)"
    );
    // The summarizer's own prompt is flat too: the previous summary and one round.
    let sums: Vec<u64> = calls
        .iter()
        .filter(|c| c.step.starts_with("summary/"))
        .map(|c| c.prompt_tokens)
        .collect();
    assert!(sums[1..].iter().all(|t| *t == sums[1]), "{sums:?}");
}

#[tokio::test]
async fn agreement_intensity_and_stance_are_in_the_system_prompt() {
    let p = plan(&format!(
        "{}[[peers]]\nid = \"a\"\nmodel = \"m\"\nstance = \"against\"\nagreement = 0.9\n[[peers]]\nid = \"b\"\nmodel = \"m\"\nagreement = 0.1\n[protocol]\nkind = \"debate\"\nrounds = 1\n",
        simulated(1.0, 0.0, 1)
    ));
    let (models, calls) = recorded(&p);
    run_with(&p, QUESTION, models, PeerExtras::default(), None, None).await;
    let calls = calls.lock().unwrap();
    let a = calls.iter().find(|c| c.peer == "a").unwrap();
    assert!(
        a.system.contains("Your assigned stance: against")
            && a.system
                .contains("Agreement intensity: 90%. When the other agents' answers differ"),
        "{}",
        a.system
    );
    let b = calls.iter().find(|c| c.peer == "b").unwrap();
    assert!(
        b.system
            .contains("Agreement intensity: 10%. Hold your position"),
        "{}",
        b.system
    );
}

// ---------------------------------------------------------------------------------
// Proposer / critic.

#[tokio::test]
async fn proposer_critic_stops_when_the_critic_is_satisfied_and_the_proposer_writes_the_answer() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"proposer_critic\"\n",
        scripted(&[
            (
                "prop",
                &[
                    "Cache order lists in Redis with a 60 s TTL. Answer: redis, 60 s TTL",
                    "Keep the 60 s TTL and delete the customer's key on every write. Answer: redis, 60 s TTL, invalidate on write",
                    "Final: cache order lists in Redis, 60 s TTL, invalidated on every write. Answer: redis, 60 s TTL, invalidate on write",
                ]
            ),
            (
                "crit",
                &[
                    r#"{"satisfied": false, "critique": "A customer who just ordered sees a stale list for a minute."}"#,
                    r#"{"satisfied": true, "critique": "Invalidation on write removes the stale reads."}"#,
                ]
            ),
        ]),
        peers(&["prop", "crit"])
    ));
    let (log, s) = run(&p, "How should we cache order lists?").await;
    let said: Vec<String> = log
        .iter()
        .filter(|e| e.usage.is_some())
        .map(|e| format!("{}:{}:{}", e.from, e.step, e.kind))
        .collect();
    assert_eq!(
        said,
        [
            "prop:r0/propose:proposal",
            "crit:r0/critique:verdict",
            "prop:r1/propose:proposal",
            "crit:r1/critique:verdict",
            "prop:final:message"
        ]
    );
    assert_eq!(
        s.stop_reason.as_deref(),
        Some("the critics are satisfied in round 2; the proposer wrote the final answer")
    );
    assert!(
        s.final_answer
            .as_deref()
            .unwrap()
            .starts_with("Final: cache order lists")
    );
    assert_eq!(
        log.iter()
            .find(|e| &*e.step == "r0/critique")
            .unwrap()
            .body
            .json
            .as_ref()
            .unwrap()["satisfied"],
        false
    );
}

#[test]
fn proposer_critic_satisfaction_by_field_or_phrase_failures_and_absent_critics() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"proposer_critic\"\nrounds = 2\nsatisfied_phrase = \"LGTM\"\n",
        simulated(0.5, 0.0, 1),
        peers(&["p", "c1", "c2"])
    ));
    // The phrase counts when the reply has no structured field; a failed critique is no verdict.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    assert_eq!(f.steps("c1"), ["r0/critique"]);
    f.say("c1", "r0/critique", Kind::Verdict, "Reads well. lgtm.");
    f.fail("c2", "r0/critique");
    assert_eq!(
        f.steps("p"),
        ["final"],
        "satisfied: the proposer writes the final answer"
    );
    f.say("p", "final", Kind::Message, "Final answer: x");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("Final answer: x"));
    assert!(
        reason.starts_with("the critics are satisfied in round 1"),
        "{reason}"
    );
    assert!(
        f.st.duties(&"p".into(), 0)
            .iter()
            .all(|d| d.kind == Kind::Stop)
    );

    // The structured field wins over the phrase; never satisfied: final after the last round.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json(
        "c1",
        "r0/critique",
        Kind::Verdict,
        serde_json::json!({"satisfied": false, "critique": "not LGTM at all"}),
    );
    f.say_json(
        "c2",
        "r0/critique",
        Kind::Verdict,
        serde_json::json!({"satisfied": true}),
    );
    assert_eq!(f.steps("p"), ["r1/propose"]);
    f.say("p", "r1/propose", Kind::Proposal, "Answer: y");
    f.say_json(
        "c1",
        "r1/critique",
        Kind::Verdict,
        serde_json::json!({"satisfied": "no"}),
    );
    f.absent("c2");
    f.fail("p", "final");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(
        answer.as_deref(),
        Some("Answer: y"),
        "the final answer failed: the latest proposal stands"
    );
    assert!(
        reason.starts_with("2 rounds without satisfying the critics"),
        "{reason}"
    );

    // Every critic absent: the proposer writes the final answer at once.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.absent("c1");
    f.absent("c2");
    assert_eq!(f.steps("p"), ["final"]);
}

// ---------------------------------------------------------------------------------
// Debaters and a judge.

fn judged(model: &str, extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "{model}[[peers]]\nid = \"pro\"\nmodel = \"m\"\nstance = \"for\"\n[[peers]]\nid = \"con\"\nmodel = \"m\"\nstance = \"against\"\n[[peers]]\nid = \"judge\"\nmodel = \"m\"\n[protocol]\nkind = \"judged_debate\"\njudge = \"judge\"\n{extra}\n"
    ))
}

#[tokio::test]
async fn judged_debate_ends_on_the_judges_verdict() {
    let p = judged(
        &scripted(&[
            (
                "pro",
                &[
                    "Four-day weeks raise output per hour. Answer: yes",
                    "The trials hold up. Answer: yes",
                ],
            ),
            (
                "con",
                &[
                    "Coverage suffers. Answer: no",
                    "With rotas coverage is fine; I concede. Answer: yes",
                ],
            ),
            (
                "judge",
                &[
                    r#"{"consensus_reached": false, "conclusion": "", "reason": "still split"}"#,
                    r#"{"consensus_reached": true, "conclusion": "yes", "reason": "the negative side conceded"}"#,
                ],
            ),
        ]),
        "",
    );
    let (models, calls) = recorded(&p);
    let (log, s) = run_with(
        &p,
        "Should we move to a four-day week?",
        models,
        PeerExtras::default(),
        None,
        None,
    )
    .await;
    let said: Vec<String> = log
        .iter()
        .filter(|e| e.usage.is_some())
        .map(|e| format!("{}:{}", e.from, e.step))
        .collect();
    assert_eq!(
        said,
        [
            "pro:r0/argue",
            "con:r0/argue",
            "judge:r0/judge",
            "pro:r1/argue",
            "con:r1/argue",
            "judge:r1/judge"
        ]
    );
    assert_eq!(s.final_answer.as_deref(), Some("yes"));
    assert_eq!(
        s.stop_reason.as_deref(),
        Some("judge verdict in round 2: the negative side conceded")
    );
    let calls = calls.lock().unwrap();
    let con0 = calls
        .iter()
        .find(|c| c.peer == "con" && c.step == "r0/argue")
        .unwrap();
    assert!(
        con0.messages
            .iter()
            .any(|m| m.1.starts_with("Four-day weeks")),
        "debaters speak in turn and see the arguments before them"
    );
    assert!(con0.system.contains("Your assigned stance: against"));
}

#[test]
fn judged_debate_malformed_verdicts_are_rejected_and_the_judge_picks_at_the_end() {
    let p = judged(&simulated(0.5, 0.0, 1), "rounds = 2");
    let mut f = Fold::new(&p, "topic");
    f.say("pro", "r0/argue", Kind::Message, "Answer: yes");
    assert_eq!(
        f.steps("judge"),
        Vec::<String>::new(),
        "the judge waits for the round"
    );
    f.say("con", "r0/argue", Kind::Message, "Answer: no");
    assert_eq!(f.steps("judge"), ["r0/judge"]);
    let bad = f.say_json(
        "judge",
        "r0/judge",
        Kind::Verdict,
        serde_json::json!({"verdict": "unclear"}),
    );
    // Any peer records the rejection once; the debate goes on.
    let rej: Vec<_> = f
        .duties("pro")
        .into_iter()
        .filter(|d| d.kind == Kind::Failure)
        .collect();
    assert_eq!(rej.len(), 1);
    assert!(rej[0].collective && rej[0].parents == vec![bad.id.clone()]);
    assert!(
        f.stop().is_none(),
        "the rejection is recorded before anything ends"
    );
    f.settle(&["pro", "con", "judge"]);
    assert_eq!(f.log.iter().filter(|e| e.kind == Kind::Failure).count(), 1);
    assert_eq!(f.steps("pro"), ["r1/argue"]);
    f.say("pro", "r1/argue", Kind::Message, "Answer: yes");
    f.say("con", "r1/argue", Kind::Message, "Answer: no");
    f.say_json(
        "judge",
        "r1/judge",
        Kind::Verdict,
        serde_json::json!({"consensus_reached": false, "conclusion": "yes"}),
    );
    assert_eq!(
        f.steps("judge"),
        ["final"],
        "no consensus after the last round: the judge picks"
    );
    f.say_json(
        "judge",
        "final",
        Kind::Verdict,
        serde_json::json!({"conclusion": "no", "reason": "better evidence"}),
    );
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("no"));
    assert!(
        reason.starts_with(
            "2 rounds without consensus; the judge picked the best answer: better evidence"
        ),
        "{reason}"
    );
}

#[test]
fn judged_debate_without_its_judge_ends_with_the_debaters_vote() {
    let p = judged(&simulated(0.5, 0.0, 1), "rounds = 2");
    let mut f = Fold::new(&p, "topic");
    f.absent("judge");
    f.say("pro", "r0/argue", Kind::Message, "Answer: yes");
    f.fail("con", "r0/argue");
    assert_eq!(f.steps("pro"), ["r1/argue"], "unjudged rounds go on");
    f.say("pro", "r1/argue", Kind::Message, "Answer: no");
    f.say("con", "r1/argue", Kind::Message, "Answer: yes");
    let (reason, answer) = f.stop().unwrap();
    // pro: no, con: yes: a tie, won by pro (first in team order).
    assert_eq!(answer.as_deref(), Some("no"));
    assert!(
        reason.starts_with("the judge judge is absent; the debaters' latest answers decide"),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------------
// Jury: commit-reveal.

fn jury(n: usize, extra: &str, model: &str) -> roundtable_core::team::TeamPlan {
    let ids: Vec<String> = (1..=n).map(|i| format!("j{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    plan(&format!(
        "{model}{}[protocol]\nkind = \"jury\"\n{extra}\n",
        peers(&ids)
    ))
}

#[tokio::test]
async fn jury_commits_before_anyone_reveals_and_every_reveal_matches_its_commitment() {
    let p = jury(5, "", &simulated(0.8, 0.0, 4));
    let (log, s) = run(&p, QUESTION).await;
    let commits: Vec<_> = log.iter().filter(|e| e.kind == Kind::Commit).collect();
    let reveals: Vec<_> = log.iter().filter(|e| e.kind == Kind::Reveal).collect();
    assert_eq!((commits.len(), reveals.len()), (5, 5));
    let last_commit = log.iter().rposition(|e| e.kind == Kind::Commit).unwrap();
    let first_reveal = log.iter().position(|e| e.kind == Kind::Reveal).unwrap();
    assert!(
        last_commit < first_reveal,
        "no answer is on the log before every juror committed"
    );
    for c in &commits {
        assert!(
            !c.body.text.contains("Answer")
                && !c.body.json.as_ref().unwrap().to_string().contains("Answer"),
            "sealed"
        );
        assert!(
            c.usage.is_some(),
            "the model call is accounted to the commit"
        );
        let r = reveals.iter().find(|r| r.from == c.from).unwrap();
        let j = r.body.json.as_ref().unwrap();
        assert!(roundtable_core::protocol::seal::verify(
            c.body.json.as_ref().unwrap()["commitment"]
                .as_str()
                .unwrap(),
            j["salt"].as_str().unwrap(),
            &r.body.text
        ));
        assert!(r.usage.is_none(), "revealing calls no model");
    }
    assert_eq!(s.calls, 5);
    assert!(
        s.stop_reason
            .as_deref()
            .unwrap()
            .starts_with("jury verdict (plurality) in round 1:"),
        "{:?}",
        s.stop_reason
    );
    assert_eq!(s.final_answer.as_deref(), Some(RIGHT));
}

/// A commit envelope as juror `who` makes it with `secret`, for an answer.
fn commit_env(f: &Fold, who: &str, secret: &[u8], answer: &str) -> roundtable_core::Envelope {
    use roundtable_core::protocol::seal;
    let (s, p) = (&f.session, PeerId::from(who));
    let salt = seal::salt(secret, s, &p, "jury/r0/commit");
    let json = serde_json::json!({ "commitment": seal::commitment(&salt, answer), "sealed": seal::seal(secret, s, &p, "jury/r0/commit", answer) });
    f.env(
        who,
        "jury/r0/commit",
        Kind::Commit,
        roundtable_core::Body::text(format!("{who} committed")).with_json(json),
    )
}

fn reveal_env(f: &Fold, who: &str, secret: &[u8], text: &str) -> roundtable_core::Envelope {
    use roundtable_core::protocol::seal;
    let salt = hex::encode(seal::salt(
        secret,
        &f.session,
        &PeerId::from(who),
        "jury/r0/commit",
    ));
    let body = roundtable_core::protocol::jury::reveal_body(text, &salt, &"x".into());
    f.env(who, "jury/r0/reveal", Kind::Reveal, body)
}

#[test]
fn jury_rejects_reveals_that_do_not_match_malformed_votes_and_early_reveals() {
    let p = jury(4, "", &simulated(0.8, 0.0, 4));
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 8"),
        ("j3", "I would rather not say."),
        ("j4", "Answer: 8"),
    ] {
        assert_eq!(f.steps(who), ["jury/r0/commit"]);
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    assert_eq!(f.steps("j1"), ["jury/r0/reveal"]);
    let e = reveal_env(&f, "j1", b"k", "Answer: 7");
    f.push(e);
    let e = reveal_env(&f, "j2", b"k", "Answer: 7"); // committed to 8: a mismatch
    f.push(e);
    let e = reveal_env(&f, "j3", b"k", "I would rather not say."); // matches, but states no answer
    f.push(e);
    assert!(f.stop().is_none(), "j4 has not revealed");
    let e = reveal_env(&f, "j4", b"k", "Answer: 8");
    f.push(e);
    assert!(f.stop().is_none(), "rejections are recorded first");
    f.settle(&["j1", "j2", "j3", "j4"]);
    let rejections: Vec<String> = f
        .log
        .iter()
        .filter(|e| e.kind == Kind::Failure)
        .map(|e| format!("{} {}", e.step, e.body.json.as_ref().unwrap()["error"]))
        .collect();
    assert_eq!(
        rejections,
        [
            "jury/r0/reject/j2 \"reveal_mismatch\"",
            "jury/r0/reject/j3 \"malformed_vote\""
        ]
    );
    // Valid: j1 → 7, j4 → 8: a tie, won by j1 (first in team order).
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("7"));
    assert!(
        reason.contains("rejected j2: reveal_mismatch, j3: malformed_vote")
            && reason.contains("tie broken by team order"),
        "{reason}"
    );

    // A reveal before every juror committed is rejected.
    let mut f = Fold::new(&p, QUESTION);
    let e = commit_env(&f, "j1", b"k", "Answer: 7");
    f.push(e);
    let e = reveal_env(&f, "j1", b"k", "Answer: 7");
    f.push(e);
    assert_eq!(
        f.duties("j2")
            .iter()
            .filter(|d| d.kind == Kind::Failure)
            .count(),
        1
    );
    f.settle(&["j2"]);
    assert_eq!(
        f.log.last().unwrap().body.json.as_ref().unwrap()["error"],
        "early_reveal"
    );
}

#[test]
fn jury_approval_threshold_and_confidence_weighting() {
    // Approval: 2 of 3 (67%) is below 70%: a hung jury, and without rounds left, no answer.
    let p = jury(
        3,
        "aggregation = \"approval\"\nthreshold = 0.7",
        &simulated(0.8, 0.0, 4),
    );
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        let e = reveal_env(&f, who, b"k", ans);
        f.push(e);
    }
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None);
    assert!(
        reason.starts_with("hung jury (approval ≥ 70%) after 1 rounds"),
        "{reason}"
    );

    // With a second round the jurors deliberate: the next commit sees the reveals.
    let p = jury(
        3,
        "aggregation = \"approval\"\nthreshold = 0.7\nrounds = 2",
        &simulated(0.8, 0.0, 4),
    );
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        let e = reveal_env(&f, who, b"k", ans);
        f.push(e);
    }
    assert!(f.stop().is_none());
    let d = &f.duties("j3")[0];
    let Action::Commit {
        view: View::Shown(shown),
        ..
    } = &d.action
    else {
        panic!("{d:?}")
    };
    assert_eq!(shown.len(), 3);
    assert_eq!(&*d.step, "jury/r1/commit");

    // Confidence: one sure vote outweighs two unsure ones (ReConcile buckets).
    let p = jury(3, "aggregation = \"confidence\"", &simulated(0.8, 0.0, 4));
    let mut f = Fold::new(&p, QUESTION);
    let votes = [
        ("j1", r#"{"answer": "7", "confidence": 0.65}"#),
        ("j2", r#"{"answer": "7", "confidence": 0.7}"#),
        ("j3", r#"{"answer": "9", "confidence": 0.95}"#),
    ];
    for (who, ans) in votes {
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    for (who, ans) in votes {
        let e = reveal_env(&f, who, b"k", ans);
        f.push(e);
    }
    assert_eq!(f.stop().unwrap().1.as_deref(), Some("9"), "0.3 + 0.3 < 0.8");
}

#[tokio::test]
async fn a_juror_that_crashed_between_commit_and_reveal_reveals_from_the_log() {
    use roundtable_core::runner::peer_secret;
    let p = jury(3, "", &simulated(0.8, 0.0, 4));
    let master: Arc<[u8]> = Arc::from(b"master secret".to_vec());
    // The jurors committed, then every process died before revealing.
    let session = roundtable_core::SessionId::from("crashed-jury");
    let mut f = Fold::new(&p, QUESTION);
    f.session = session.clone();
    let log: Arc<dyn roundtable_core::log::SessionLog> =
        Arc::new(roundtable_core::log::SharedMemLog(Arc::new(
            roundtable_core::log::MemLog::new(session.clone()),
        )));
    roundtable_core::runner::open_session(log.as_ref(), &p, QUESTION)
        .await
        .unwrap();
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        log.append(commit_env(
            &f,
            who,
            &peer_secret(&master, &PeerId::from(who)),
            ans,
        ))
        .await
        .unwrap();
    }
    // Restarted with the same secret: they open their seals without calling a model.
    let never = |plan: &roundtable_core::team::TeamPlan| -> std::collections::HashMap<
        PeerId,
        Arc<dyn roundtable_core::model::ChatModel>,
    > {
        offline_models(plan, None)
            .into_iter()
            .map(|(id, m)| {
                (
                    id,
                    Arc::new(FailWhen {
                        inner: m,
                        when: Box::new(|_| panic!("no model call on reveal")),
                    }) as Arc<dyn roundtable_core::model::ChatModel>,
                )
            })
            .collect()
    };
    let extras = PeerExtras {
        secret: Some(master.clone()),
        ..Default::default()
    };
    let (entries, s) = run_with(&p, QUESTION, never(&p), extras, None, Some(log)).await;
    assert_eq!(entries.iter().filter(|e| e.kind == Kind::Reveal).count(), 3);
    assert_eq!(s.final_answer.as_deref(), Some("7"));

    // Restarted without it: they cannot open their seals, say so, and forfeit.
    let session = roundtable_core::SessionId::from("crashed-jury-2");
    f.session = session.clone();
    let log: Arc<dyn roundtable_core::log::SessionLog> = Arc::new(
        roundtable_core::log::SharedMemLog(Arc::new(roundtable_core::log::MemLog::new(session))),
    );
    roundtable_core::runner::open_session(log.as_ref(), &p, QUESTION)
        .await
        .unwrap();
    for (who, ans) in [
        ("j1", "Answer: 7"),
        ("j2", "Answer: 7"),
        ("j3", "Answer: 9"),
    ] {
        log.append(commit_env(
            &f,
            who,
            &peer_secret(&master, &PeerId::from(who)),
            ans,
        ))
        .await
        .unwrap();
    }
    let extras = PeerExtras {
        secret: Some(Arc::from(b"another secret".to_vec())),
        ..Default::default()
    };
    let (entries, s) = run_with(&p, QUESTION, never(&p), extras, None, Some(log)).await;
    let forfeits = entries
        .iter()
        .filter(|e| {
            e.kind == Kind::Failure && e.body.json.as_ref().unwrap()["error"] == "unsealable"
        })
        .count();
    assert_eq!(forfeits, 3);
    assert_eq!(s.final_answer, None);
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("hung jury"),
        "{:?}",
        s.stop_reason
    );
}
