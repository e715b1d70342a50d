//! Every protocol's decisions: hand-folded logs for the exact rules (ties, malformed
//! votes, failures, absent peers, reveals that do not match), and in-memory runs with
//! offline models for the whole path through peers, models and the log.

mod common;

use std::sync::Arc;

use common::*;
use roundtable_core::envelope::{Kind, PeerId, Recipient};
use roundtable_core::eval::offline_models;
use roundtable_core::peer::PeerExtras;
use roundtable_core::protocol::{Action, View};

// ---------------------------------------------------------------------------------
// Debate.

fn debate(extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!("{}{}[protocol]\nkind = \"debate\"\n{extra}\n", simulated(0.6, 0.0, 1), peers(&["a", "b", "c"])))
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
    assert_eq!(answers.len(), 6, "3 members × 2 rounds (the default): {answers:?}");
    // Every round-0 answer is on the log before any round-1 answer.
    let first_r1 = log.iter().position(|e| &*e.step == "r1/answer").unwrap();
    assert_eq!(log[..first_r1].iter().filter(|e| &*e.step == "r0/answer").count(), 3);
    for c in calls.lock().unwrap().iter() {
        let texts: Vec<&str> = c.messages.iter().map(|m| m.1.as_str()).collect();
        if c.step == "r0/answer" {
            assert_eq!(texts, [QUESTION], "round 0 sees the task alone");
        } else {
            assert!(texts.iter().all(|t| !t.contains("r1/answer")), "no same-round answer in view: {texts:?}");
            for peer in ["a", "b", "c"] {
                assert!(
                    texts.contains(
                        &format!("{peer} at r0/answer. Answer: {}", if peer == "b" { 2 } else { 1 }).as_str()
                    )
                );
            }
        }
    }
    // Round-1 answers are caused by the three round-0 answers.
    let r0: Vec<_> = log.iter().filter(|e| &*e.step == "r0/answer").map(|e| e.id.clone()).collect();
    for e in log.iter().filter(|e| &*e.step == "r1/answer") {
        let mut parents = e.parents.clone();
        parents.sort();
        let mut want = r0.clone();
        want.sort();
        assert_eq!(parents, want);
    }
    assert_eq!(summary.final_answer.as_deref(), Some("1"));
    assert!(
        summary.stop_reason.as_deref().unwrap().starts_with("vote after 2 rounds (plurality): 1 with 2 of 3"),
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
    let Action::Speak { view: View::Shown(shown), .. } = &d.action else { panic!("{d:?}") };
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
    assert!(reason.starts_with("no majority after 1 round ["), "{reason}");

    let mut f = Fold::new(&p, QUESTION);
    f.say("a", "r0/answer", Kind::Message, "Answer: 7");
    f.say("b", "r0/answer", Kind::Message, "I think it is seven. Answer: 7.0");
    f.say("c", "r0/answer", Kind::Message, "Answer: 8");
    assert_eq!(f.stop().unwrap().1.as_deref(), Some("7"), "7 and 7.0 are one answer, with 2 of 3");
}

// ---------------------------------------------------------------------------------
// Context: summaries of older rounds keep prompts flat.

fn long_discussion(context: &str) -> roundtable_core::team::TeamPlan {
    let reply =
        "This is a contribution of a fixed length so that every turn adds the same number of tokens to the history.";
    plan(&format!(
        "[models.m]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"{reply}\"]\n{}[protocol]\nkind = \"round_robin\"\nrounds = 8\n{context}\n",
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
    assert!(full_per.windows(2).all(|w| w[1] > w[0]), "full history grows every round: {full_per:?}");

    let p = long_discussion("[context]\npolicy = \"summary\"\nkeep_rounds = 1\nsummarizer = \"b\"");
    let (models, calls) = recorded(&p);
    let (log, summary) = run_with(&p, "Discuss the plan.", models, PeerExtras::default(), None, None).await;
    let per = prompt_tokens_per_round(&log);
    assert!(per[2..].iter().all(|t| *t == per[2]), "flat from round 3 on: {per:?}");
    assert!(per[7] < full_per[7] / 2, "{per:?} vs {full_per:?}");
    // One summary per round from round 3 on, each written by the summarizer, before the
    // round's first turn, and counted in the session's calls and tokens.
    let summaries: Vec<_> = log.iter().filter(|e| e.kind == Kind::Summary).collect();
    assert_eq!(
        summaries.iter().map(|e| e.step.to_string()).collect::<Vec<_>>(),
        (0..6).map(|u| format!("summary/{u}")).collect::<Vec<_>>()
    );
    assert!(summaries.iter().all(|e| e.from.as_str() == "b" && e.usage.is_some()));
    for s in &summaries {
        let upto: u32 = s.step.trim_start_matches("summary/").parse().unwrap();
        let pos = log.iter().position(|e| Arc::ptr_eq(e, s)).unwrap();
        assert!(
            log[..pos].iter().all(|e| e.round <= upto + 1 || !e.step.starts_with("turn/")),
            "no turn of round {} before its summary",
            upto + 2
        );
    }
    assert_eq!(summary.calls, 16 + 6);
    // A late turn's prompt holds the task, the latest summary and the last rounds only.
    let calls = calls.lock().unwrap();
    let last = calls.iter().find(|c| c.step == "turn/15").unwrap();
    assert_eq!(last.messages[0].1, "Discuss the plan.");
    assert!(last.messages[1].1.starts_with("Summary of rounds 1 to 6 (by b)"), "{:?}", last.messages[1]);
    assert_eq!(last.messages.len(), 2 + 3, "task, summary, round 7 (2) and round 8 so far (1)");
    // The summarizer's own prompt is flat too: the previous summary and one round.
    let sums: Vec<u64> = calls.iter().filter(|c| c.step.starts_with("summary/")).map(|c| c.prompt_tokens).collect();
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
            && a.system.contains("Agreement intensity: 90%. When the other agents' answers differ"),
        "{}",
        a.system
    );
    let b = calls.iter().find(|c| c.peer == "b").unwrap();
    assert!(b.system.contains("Agreement intensity: 10%. Hold your position"), "{}", b.system);
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
    let said: Vec<String> =
        log.iter().filter(|e| e.usage.is_some()).map(|e| format!("{}:{}:{}", e.from, e.step, e.kind)).collect();
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
    assert!(s.final_answer.as_deref().unwrap().starts_with("Final: cache order lists"));
    assert_eq!(log.iter().find(|e| &*e.step == "r0/critique").unwrap().body.json.as_ref().unwrap()["satisfied"], false);
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
    assert_eq!(f.steps("p"), ["final"], "satisfied: the proposer writes the final answer");
    f.say("p", "final", Kind::Message, "Final answer: x");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("Final answer: x"));
    assert!(reason.starts_with("the critics are satisfied in round 1"), "{reason}");
    assert!(f.st.duties(&"p".into(), 0).iter().all(|d| d.kind == Kind::Stop));

    // The structured field wins over the phrase; never satisfied: final after the last round.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json(
        "c1",
        "r0/critique",
        Kind::Verdict,
        serde_json::json!({"satisfied": false, "critique": "not LGTM at all"}),
    );
    f.say_json("c2", "r0/critique", Kind::Verdict, serde_json::json!({"satisfied": true}));
    assert_eq!(f.steps("p"), ["r1/propose"]);
    f.say("p", "r1/propose", Kind::Proposal, "Answer: y");
    f.say_json("c1", "r1/critique", Kind::Verdict, serde_json::json!({"satisfied": "no"}));
    f.absent("c2");
    f.fail("p", "final");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("Answer: y"), "the final answer failed: the latest proposal stands");
    assert!(reason.starts_with("2 rounds without satisfying the critics"), "{reason}");

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
            ("pro", &["Four-day weeks raise output per hour. Answer: yes", "The trials hold up. Answer: yes"]),
            ("con", &["Coverage suffers. Answer: no", "With rotas coverage is fine; I concede. Answer: yes"]),
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
    let (log, s) = run_with(&p, "Should we move to a four-day week?", models, PeerExtras::default(), None, None).await;
    let said: Vec<String> =
        log.iter().filter(|e| e.usage.is_some()).map(|e| format!("{}:{}", e.from, e.step)).collect();
    assert_eq!(
        said,
        ["pro:r0/argue", "con:r0/argue", "judge:r0/judge", "pro:r1/argue", "con:r1/argue", "judge:r1/judge"]
    );
    assert_eq!(s.final_answer.as_deref(), Some("yes"));
    assert_eq!(s.stop_reason.as_deref(), Some("judge verdict in round 2: the negative side conceded"));
    let calls = calls.lock().unwrap();
    let con0 = calls.iter().find(|c| c.peer == "con" && c.step == "r0/argue").unwrap();
    assert!(
        con0.messages.iter().any(|m| m.1.starts_with("Four-day weeks")),
        "debaters speak in turn and see the arguments before them"
    );
    assert!(con0.system.contains("Your assigned stance: against"));
}

#[test]
fn judged_debate_malformed_verdicts_are_rejected_and_the_judge_picks_at_the_end() {
    let p = judged(&simulated(0.5, 0.0, 1), "rounds = 2");
    let mut f = Fold::new(&p, "topic");
    f.say("pro", "r0/argue", Kind::Message, "Answer: yes");
    assert_eq!(f.steps("judge"), Vec::<String>::new(), "the judge waits for the round");
    f.say("con", "r0/argue", Kind::Message, "Answer: no");
    assert_eq!(f.steps("judge"), ["r0/judge"]);
    let bad = f.say_json("judge", "r0/judge", Kind::Verdict, serde_json::json!({"verdict": "unclear"}));
    // Any peer records the rejection once; the debate goes on.
    let rej: Vec<_> = f.duties("pro").into_iter().filter(|d| d.kind == Kind::Failure).collect();
    assert_eq!(rej.len(), 1);
    assert!(rej[0].collective && rej[0].parents == vec![bad.id.clone()]);
    assert!(f.stop().is_none(), "the rejection is recorded before anything ends");
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
    assert_eq!(f.steps("judge"), ["final"], "no consensus after the last round: the judge picks");
    f.say_json("judge", "final", Kind::Verdict, serde_json::json!({"conclusion": "no", "reason": "better evidence"}));
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("no"));
    assert!(
        reason.starts_with("2 rounds without consensus; the judge picked the best answer: better evidence"),
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
    assert!(reason.starts_with("the judge judge is absent; the debaters' latest answers decide"), "{reason}");
}

// ---------------------------------------------------------------------------------
// Jury: commit-reveal.

fn jury(n: usize, extra: &str, model: &str) -> roundtable_core::team::TeamPlan {
    let ids: Vec<String> = (1..=n).map(|i| format!("j{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    plan(&format!("{model}{}[protocol]\nkind = \"jury\"\n{extra}\n", peers(&ids)))
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
    assert!(last_commit < first_reveal, "no answer is on the log before every juror committed");
    for c in &commits {
        assert!(
            !c.body.text.contains("Answer") && !c.body.json.as_ref().unwrap().to_string().contains("Answer"),
            "sealed"
        );
        assert!(c.usage.is_some(), "the model call is accounted to the commit");
        let r = reveals.iter().find(|r| r.from == c.from).unwrap();
        let j = r.body.json.as_ref().unwrap();
        assert!(roundtable_core::protocol::seal::verify(
            c.body.json.as_ref().unwrap()["commitment"].as_str().unwrap(),
            j["salt"].as_str().unwrap(),
            &r.body.text
        ));
        assert!(r.usage.is_none(), "revealing calls no model");
    }
    assert_eq!(s.calls, 5);
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("jury verdict (plurality) in round 1:"),
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
    f.env(who, "jury/r0/commit", Kind::Commit, roundtable_core::Body::text(format!("{who} committed")).with_json(json))
}

fn reveal_env(f: &Fold, who: &str, secret: &[u8], text: &str) -> roundtable_core::Envelope {
    use roundtable_core::protocol::seal;
    let salt = hex::encode(seal::salt(secret, &f.session, &PeerId::from(who), "jury/r0/commit"));
    let body = roundtable_core::protocol::jury::reveal_body(text, &salt, &"x".into());
    f.env(who, "jury/r0/reveal", Kind::Reveal, body)
}

#[test]
fn jury_rejects_reveals_that_do_not_match_malformed_votes_and_early_reveals() {
    let p = jury(4, "", &simulated(0.8, 0.0, 4));
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 8"), ("j3", "I would rather not say."), ("j4", "Answer: 8")]
    {
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
    assert_eq!(rejections, ["jury/r0/reject/j2 \"reveal_mismatch\"", "jury/r0/reject/j3 \"malformed_vote\""]);
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
    assert_eq!(f.duties("j2").iter().filter(|d| d.kind == Kind::Failure).count(), 1);
    f.settle(&["j2"]);
    assert_eq!(f.log.last().unwrap().body.json.as_ref().unwrap()["error"], "early_reveal");
}

#[test]
fn jury_approval_threshold_and_confidence_weighting() {
    // Approval: 2 of 3 (67%) is below 70%: a hung jury, and without rounds left, no answer.
    let p = jury(3, "aggregation = \"approval\"\nthreshold = 0.7", &simulated(0.8, 0.0, 4));
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        let e = reveal_env(&f, who, b"k", ans);
        f.push(e);
    }
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None);
    assert!(reason.starts_with("hung jury (approval ≥ 70%) after 1 round:"), "{reason}");

    // With a second round the jurors deliberate: the next commit sees the reveals.
    let p = jury(3, "aggregation = \"approval\"\nthreshold = 0.7\nrounds = 2", &simulated(0.8, 0.0, 4));
    let mut f = Fold::new(&p, QUESTION);
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        let e = commit_env(&f, who, b"k", ans);
        f.push(e);
    }
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        let e = reveal_env(&f, who, b"k", ans);
        f.push(e);
    }
    assert!(f.stop().is_none());
    let d = &f.duties("j3")[0];
    let Action::Commit { view: View::Shown(shown), .. } = &d.action else { panic!("{d:?}") };
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
        Arc::new(roundtable_core::log::SharedMemLog(Arc::new(roundtable_core::log::MemLog::new(session.clone()))));
    roundtable_core::runner::open_session(log.as_ref(), &p, QUESTION).await.unwrap();
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        log.append(commit_env(&f, who, &peer_secret(&master, &PeerId::from(who)), ans)).await.unwrap();
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
    let extras = PeerExtras { secret: Some(master.clone()), ..Default::default() };
    let (entries, s) = run_with(&p, QUESTION, never(&p), extras, None, Some(log)).await;
    assert_eq!(entries.iter().filter(|e| e.kind == Kind::Reveal).count(), 3);
    assert_eq!(s.final_answer.as_deref(), Some("7"));

    // Restarted without it: they cannot open their seals, say so, and forfeit.
    let session = roundtable_core::SessionId::from("crashed-jury-2");
    f.session = session.clone();
    let log: Arc<dyn roundtable_core::log::SessionLog> =
        Arc::new(roundtable_core::log::SharedMemLog(Arc::new(roundtable_core::log::MemLog::new(session))));
    roundtable_core::runner::open_session(log.as_ref(), &p, QUESTION).await.unwrap();
    for (who, ans) in [("j1", "Answer: 7"), ("j2", "Answer: 7"), ("j3", "Answer: 9")] {
        log.append(commit_env(&f, who, &peer_secret(&master, &PeerId::from(who)), ans)).await.unwrap();
    }
    let extras = PeerExtras { secret: Some(Arc::from(b"another secret".to_vec())), ..Default::default() };
    let (entries, s) = run_with(&p, QUESTION, never(&p), extras, None, Some(log)).await;
    let forfeits = entries
        .iter()
        .filter(|e| e.kind == Kind::Failure && e.body.json.as_ref().unwrap()["error"] == "unsealable")
        .count();
    assert_eq!(forfeits, 3);
    assert_eq!(s.final_answer, None);
    assert!(s.stop_reason.as_deref().unwrap().starts_with("hung jury"), "{:?}", s.stop_reason);
}

// ---------------------------------------------------------------------------------
// Explicit consensus.

#[tokio::test]
async fn consensus_revises_below_the_threshold_and_adopts_above_it() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"consensus\"\nproposer = \"lead\"\nthreshold = 1.0\n",
        scripted(&[
            (
                "lead",
                &[
                    "Use Postgres for the order store. Answer: postgres",
                    "Use Postgres, with a read replica for reporting. Answer: postgres with a replica"
                ]
            ),
            (
                "v1",
                &[
                    r#"{"approve": true, "reason": "fits what we know"}"#,
                    r#"{"approve": true, "reason": "still fine"}"#
                ]
            ),
            (
                "v2",
                &[
                    r#"{"approve": false, "reason": "reporting queries will slow checkout"}"#,
                    r#"{"approve": true, "reason": "the replica takes the reporting load"}"#
                ]
            ),
        ]),
        peers(&["lead", "v1", "v2"])
    ));
    let (models, calls) = recorded(&p);
    let (log, s) = run_with(&p, "Where do we store orders?", models, PeerExtras::default(), None, None).await;
    assert_eq!(steps_of(&log, Kind::Proposal), ["lead:r0/propose", "lead:r1/propose"]);
    assert_eq!(steps_of(&log, Kind::Vote).len(), 4);
    assert_eq!(
        s.final_answer.as_deref(),
        Some("Use Postgres, with a read replica for reporting. Answer: postgres with a replica")
    );
    assert_eq!(s.stop_reason.as_deref(), Some("consensus in round 2: 2 of 2 voters approve (100%, threshold 100%)"));
    let calls = calls.lock().unwrap();
    let revise = calls.iter().find(|c| c.step == "r1/propose").unwrap();
    assert!(
        revise.messages.iter().any(|m| m.1.contains("reporting queries will slow checkout")),
        "the proposer revises with the reasons"
    );
}

#[test]
fn consensus_threshold_edge_malformed_votes_and_absent_peers() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"consensus\"\nrounds = 2\n",
        simulated(0.5, 0.0, 1),
        peers(&["p", "a", "b", "c"])
    ));
    // 2 of 3 at the default 2/3 threshold passes.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json("a", "r0/vote", Kind::Vote, serde_json::json!({"approve": true}));
    f.say("b", "r0/vote", Kind::Vote, "APPROVE — the plan is sound");
    f.say_json("c", "r0/vote", Kind::Vote, serde_json::json!({"vote": "reject", "reason": "too slow"}));
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("Answer: x"));
    assert!(reason.starts_with("consensus in round 1: 2 of 3 voters approve (67%"), "{reason}");

    // A malformed vote is rejected on the log and is not an approval.
    let mut f = Fold::new(&p, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json("a", "r0/vote", Kind::Vote, serde_json::json!({"approve": true}));
    f.say_json("b", "r0/vote", Kind::Vote, serde_json::json!({"opinion": "maybe"}));
    f.fail("c", "r0/vote");
    f.settle(&["p", "a", "b", "c"]);
    assert_eq!(f.log.last().unwrap().step.as_ref(), "r0/vote/b/malformed");
    assert_eq!(f.steps("p"), ["r1/propose"]);
    f.say("p", "r1/propose", Kind::Proposal, "Answer: y");
    // Absent voters are not counted: 1 of the 2 present approves (50%).
    f.absent("c");
    f.say_json("a", "r1/vote", Kind::Vote, serde_json::json!({"approve": false}));
    f.say_json("b", "r1/vote", Kind::Vote, serde_json::json!({"approve": true}));
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None, "no consensus: no answer");
    assert!(reason.starts_with("no consensus after 2 rounds: last round 1 of 2 voters approve (50%"), "{reason}");
    assert!(reason.contains("the best-supported proposal (round 2) had 50%"), "{reason}");

    // The proposer absent: no one can revise.
    let mut f = Fold::new(&p, "topic");
    f.absent("p");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!((reason.as_str(), answer), ("the proposer p is absent", None));
}

// ---------------------------------------------------------------------------------
// Emergent consensus.

#[tokio::test]
async fn emergent_consensus_converges_with_susceptible_peers() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"emergent\"\ncompare = \"answer\"\nthreshold = 0.99\nrounds = 6\n",
        simulated(0.5, 1.0, 3),
        peers(&["a", "b", "c", "d"])
    ));
    let (log, s) = run(&p, QUESTION).await;
    let reason = s.stop_reason.unwrap();
    assert!(reason.starts_with("converged in round"), "{reason}");
    assert!(reason.contains("(lexical)"));
    let answer = s.final_answer.unwrap();
    let last_round = log.iter().filter(|e| e.kind == Kind::Message).map(|e| e.round).max().unwrap();
    for e in log.iter().filter(|e| e.kind == Kind::Message && e.round == last_round) {
        assert!(e.body.text.ends_with(&format!("Answer: {answer}")), "every latest answer is the consensus");
    }
}

#[test]
fn emergent_lexical_similarity_on_whole_texts() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"emergent\"\nthreshold = 0.8\nrounds = 2\n",
        simulated(0.5, 0.0, 1),
        peers(&["a", "b", "c"])
    ));
    let mut f = Fold::new(&p, "topic");
    f.say("a", "r0/answer", Kind::Message, "Ship the API behind a feature flag this week.");
    f.say("b", "r0/answer", Kind::Message, "Rewrite the billing service first.");
    f.say("c", "r0/answer", Kind::Message, "Ship the API behind a feature flag this week");
    assert!(f.stop().is_none());
    assert_eq!(f.steps("b"), ["r1/answer"]);
    f.say("a", "r1/answer", Kind::Message, "Ship the API behind a feature flag this week.");
    f.say("b", "r1/answer", Kind::Message, "Agreed: ship the API behind a feature flag this week.");
    f.absent("c");
    let (reason, answer) = f.stop().unwrap();
    assert!(reason.starts_with("converged in round 2"), "{reason}");
    assert_eq!(
        answer.as_deref(),
        Some("Ship the API behind a feature flag this week."),
        "the medoid, ties by team order"
    );
}

/// Vectors of letter counts: a deterministic offline embedder.
struct Letters;
#[async_trait::async_trait]
impl roundtable_core::model::Embedder for Letters {
    fn name(&self) -> &str {
        "letters"
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, roundtable_core::model::ModelError> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; 26];
                for c in t.to_ascii_lowercase().bytes().filter(u8::is_ascii_lowercase) {
                    v[(c - b'a') as usize] += 1.0;
                }
                v
            })
            .collect())
    }
}

fn emergent_scripted(extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "{}{}[protocol]\nkind = \"emergent\"\nsimilarity = \"embedding\"\nthreshold = 0.99\nrounds = 3\n{extra}",
        scripted(&[
            ("a", &["alpha plan", "the shared plan"]),
            // b measures: its embedder call counts among its calls, so its script skips one.
            ("b", &["beta option", "(unused)", "the shared plan", "the shared plan"]),
            ("c", &["gamma idea", "the shared plan"]),
        ]),
        peers(&["a", "b", "c"])
    ))
}

#[tokio::test]
async fn emergent_embedding_similarity_is_measured_by_one_peer_and_recorded_with_its_usage() {
    let p = emergent_scripted("measurer = \"b\"\n");
    let extras = PeerExtras { embedder: Some(Arc::new(Letters)), ..Default::default() };
    let (log, s) = run_with(&p, "topic", offline_models(&p, None), extras, None, None).await;
    let measures: Vec<_> = log.iter().filter(|e| e.kind == Kind::Verdict).collect();
    assert_eq!(
        measures.iter().map(|e| format!("{}:{}", e.from, e.step)).collect::<Vec<_>>(),
        ["b:r0/measure", "b:r1/measure"]
    );
    assert!(measures.iter().all(|e| e.usage.as_ref().is_some_and(|u| &*u.model == "letters" && u.calls == 1)));
    assert!(measures[0].body.json.as_ref().unwrap()["similarity"]["min"].as_f64().unwrap() < 0.99);
    assert_eq!(s.calls, 6 + 2, "the embedder's calls are counted");
    assert!(
        s.stop_reason
            .as_deref()
            .unwrap()
            .starts_with("converged in round 2: least similar pair 1.00 ≥ 0.99 (embedding)"),
        "{:?}",
        s.stop_reason
    );
    assert_eq!(s.final_answer.as_deref(), Some("the shared plan"));

    // Without an embedder the measurement fails on the log and lexical similarity decides.
    let (log, s) = run(&p, "topic").await;
    assert_eq!(
        log.iter()
            .filter(|e| e.kind == Kind::Failure && e.body.json.as_ref().unwrap()["error"] == "no_embedder")
            .count(),
        2
    );
    assert!(s.stop_reason.as_deref().unwrap().contains("(lexical)"), "{:?}", s.stop_reason);

    // The embedder's call is checked against the budget like any model call.
    let p = emergent_scripted("[budget]\nmax_calls = 3\n");
    let extras = PeerExtras { embedder: Some(Arc::new(Letters)), ..Default::default() };
    let (log, s) = run_with(&p, "topic", offline_models(&p, None), extras, None, None).await;
    assert!(log.iter().all(|e| e.kind != Kind::Verdict), "the measurement was never made");
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("budget: 3 model calls made, limit 3"),
        "{:?}",
        s.stop_reason
    );
    assert!(s.final_answer.is_some(), "the best answer so far");
}

// ---------------------------------------------------------------------------------
// Adversarial consensus.

#[tokio::test]
async fn adversarial_consensus_only_when_the_objection_is_dismissed() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"adversarial\"\nproposer = \"prop\"\nadvocate = \"devil\"\n",
        scripted(&[
            ("prop", &["Ship on Friday. Answer: friday", "Ship on Monday, after the load test. Answer: monday"]),
            (
                "devil",
                &[
                    r#"{"objection": "No load test has run.", "concede": false}"#,
                    r#"{"objection": "Mondays are busy.", "concede": false}"#
                ]
            ),
            ("v1", &[r#"{"valid": true, "reason": "right"}"#, r#"{"valid": false, "reason": "Mondays are fine"}"#]),
            ("v2", &[r#"{"valid": true, "reason": "right"}"#, r#"{"valid": false, "reason": "not a real risk"}"#]),
        ]),
        peers(&["prop", "devil", "v1", "v2"])
    ));
    let (log, s) = run(&p, "When do we ship?").await;
    let said: Vec<String> =
        log.iter().filter(|e| e.usage.is_some()).map(|e| format!("{}:{}", e.from, e.step)).collect();
    assert_eq!(said.iter().filter(|s| s.contains("/object")).count(), 2);
    assert_eq!(s.final_answer.as_deref(), Some("Ship on Monday, after the load test. Answer: monday"));
    assert_eq!(s.stop_reason.as_deref(), Some("consensus in round 2: 2 of 2 voters found the objection invalid"));
}

#[test]
fn adversarial_ties_concessions_judges_and_absent_advocates() {
    let voters = plan(&format!(
        "{}{}[protocol]\nkind = \"adversarial\"\nadvocate = \"d\"\nrounds = 1\n",
        simulated(0.5, 0.0, 1),
        peers(&["p", "d", "a", "b"])
    ));
    // A tie does not dismiss the objection; a malformed vote does not either.
    let mut f = Fold::new(&voters, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    assert_eq!(f.steps("d"), ["r0/object"]);
    f.say_json("d", "r0/object", Kind::Message, serde_json::json!({"objection": "too risky", "concede": false}));
    f.say_json("a", "r0/vote", Kind::Vote, serde_json::json!({"valid": false}));
    f.say_json("b", "r0/vote", Kind::Vote, serde_json::json!({"valid": "perhaps"}));
    f.settle(&["p", "d", "a", "b"]);
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None);
    assert!(reason.contains("the last objection stood (1 of 2 found it invalid)"), "{reason}");
    assert_eq!(f.log.iter().filter(|e| e.kind == Kind::Failure).count(), 1, "the malformed vote is recorded");

    // A concession is consensus.
    let mut f = Fold::new(&voters, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json("d", "r0/object", Kind::Message, serde_json::json!({"objection": "", "concede": true}));
    assert_eq!(f.stop().unwrap().1.as_deref(), Some("Answer: x"));

    // An absent advocate raises nothing.
    let mut f = Fold::new(&voters, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.absent("d");
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer.as_deref(), Some("Answer: x"));
    assert!(reason.starts_with("the devil's advocate d is absent"), "{reason}");

    // With a judge, the judge rules.
    let judged = plan(&format!(
        "{}{}[protocol]\nkind = \"adversarial\"\nadvocate = \"d\"\njudge = \"j\"\n",
        simulated(0.5, 0.0, 1),
        peers(&["p", "d", "j"])
    ));
    let mut f = Fold::new(&judged, "topic");
    f.say("p", "r0/propose", Kind::Proposal, "Answer: x");
    f.say_json("d", "r0/object", Kind::Message, serde_json::json!({"objection": "too risky", "concede": false}));
    assert_eq!(f.steps("j"), ["r0/rule"]);
    f.say_json("j", "r0/rule", Kind::Verdict, serde_json::json!({"objection_valid": true}));
    assert_eq!(f.steps("p"), ["r1/propose"], "upheld: revise");
    f.say("p", "r1/propose", Kind::Proposal, "Answer: y");
    f.say_json("d", "r1/object", Kind::Message, serde_json::json!({"objection": "still risky", "concede": false}));
    f.say_json("j", "r1/rule", Kind::Verdict, serde_json::json!({"objection_valid": false}));
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(
        (reason.as_str(), answer.as_deref()),
        ("consensus in round 2: the judge dismissed the objection", Some("Answer: y"))
    );
}

// ---------------------------------------------------------------------------------
// Blackboard.

const BOARD_SOURCES: &str = r#"
[[protocol.sources]]
peer = "planner"
reads = ["task"]
writes = "plan"
[[protocol.sources]]
peer = "writer"
reads = ["plan"]
writes = "draft"
[[protocol.sources]]
peer = "reviewer"
reads = ["draft"]
writes = "review"
[[protocol.sources]]
peer = "editor"
reads = ["review"]
writes = "draft"
"#;

#[tokio::test]
async fn blackboard_sources_contribute_when_their_trigger_matches_until_done() {
    use roundtable_core::blackboard::Blackboard;
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"blackboard\"\nanswer_key = \"draft\"\ndone_phrase = \"APPROVED\"\n{BOARD_SOURCES}",
        scripted(&[
            ("planner", &["1) what broke 2) the fix 3) the rollout"]),
            ("writer", &["Draft 1: the cache expired early; we fixed the TTL."]),
            ("reviewer", &["Add how we roll back.", "APPROVED: ready to send."]),
            ("editor", &["Draft 2: the cache expired early; we fixed the TTL; rollback is one flag."]),
        ]),
        peers(&["planner", "writer", "reviewer", "editor"])
    ));
    let board = Arc::new(roundtable_core::mem::MemBlackboard::new());
    let extras = PeerExtras { board: Some(board.clone()), ..Default::default() };
    let (log, s) = run_with(&p, "Write the incident note.", offline_models(&p, None), extras, None, None).await;
    let writes: Vec<String> = log
        .iter()
        .filter(|e| e.kind == Kind::Board)
        .map(|e| {
            format!(
                "{}:{}:{}",
                e.from,
                e.body.json.as_ref().unwrap()["key"].as_str().unwrap(),
                e.body.json.as_ref().unwrap()["op"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        writes,
        ["planner:plan:put", "writer:draft:put", "reviewer:review:put", "editor:draft:put", "reviewer:review:put"]
    );
    assert_eq!(
        s.final_answer.as_deref(),
        Some("Draft 2: the cache expired early; we fixed the TTL; rollback is one flag.")
    );
    assert_eq!(s.stop_reason.as_deref(), Some("done: reviewer wrote \"APPROVED\" to `review`"));
    // The board and the log agree on every key's last write and its revision.
    for key in ["plan", "draft", "review"] {
        let last = log.iter().rfind(|e| e.kind == Kind::Board && e.body.json.as_ref().unwrap()["key"] == key).unwrap();
        let entry = board.get(key).await.unwrap().unwrap();
        assert_eq!(Some(entry.revision), last.body.json.as_ref().unwrap()["revision"].as_u64());
        let v: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
        assert_eq!(v["text"].as_str(), Some(&*last.body.text));
    }
    // No direct messages, no chat: only board writes carry contributions.
    assert!(log.iter().all(|e| e.kind != Kind::Message && e.to == Recipient::All));
}

/// Holds every call until `n` calls are waiting, so that peers race.
struct Barrier {
    inner: Arc<dyn roundtable_core::model::ChatModel>,
    barrier: Arc<tokio::sync::Barrier>,
}
#[async_trait::async_trait]
impl roundtable_core::model::ChatModel for Barrier {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(
        &self,
        req: &roundtable_core::model::ChatRequest,
    ) -> Result<roundtable_core::model::ChatResponse, roundtable_core::model::ModelError> {
        self.barrier.wait().await;
        self.inner.chat(req).await
    }
}

#[tokio::test]
async fn blackboard_compare_and_set_lets_one_of_two_racing_writers_win() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"blackboard\"\n[[protocol.sources]]\npeer = \"x\"\nreads = [\"task\"]\nwrites = \"answer\"\n[[protocol.sources]]\npeer = \"y\"\nreads = [\"task\"]\nwrites = \"answer\"\n",
        scripted(&[("x", &["x's answer"]), ("y", &["y's answer"])]),
        peers(&["x", "y"])
    ));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let models = offline_models(&p, None)
        .into_iter()
        .map(|(id, m)| {
            (id, Arc::new(Barrier { inner: m, barrier: barrier.clone() }) as Arc<dyn roundtable_core::model::ChatModel>)
        })
        .collect();
    let (log, s) = run_with(&p, "Answer.", models, PeerExtras::default(), None, None).await;
    let ops: Vec<&str> = log
        .iter()
        .filter(|e| e.kind == Kind::Board)
        .map(|e| e.body.json.as_ref().unwrap()["op"].as_str().unwrap())
        .collect();
    let mut sorted = ops.clone();
    sorted.sort();
    assert_eq!(sorted, ["conflict", "put"], "one write wins, the lost race is recorded");
    let winner = log.iter().find(|e| e.kind == Kind::Board && e.body.json.as_ref().unwrap()["op"] == "put").unwrap();
    let loser =
        log.iter().find(|e| e.kind == Kind::Board && e.body.json.as_ref().unwrap()["op"] == "conflict").unwrap();
    assert!(loser.usage.is_some(), "the loser's model call is still accounted");
    assert_eq!(s.final_answer.as_deref(), Some(&*winner.body.text));
    assert!(s.stop_reason.as_deref().unwrap().starts_with("quiescent"), "{:?}", s.stop_reason);
    assert_eq!(s.calls, 2);
}

#[tokio::test]
async fn blackboard_write_that_reached_the_board_but_not_the_log_is_recorded_without_a_new_call() {
    use roundtable_core::blackboard::Blackboard;
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"blackboard\"\nanswer_key = \"plan\"\n[[protocol.sources]]\npeer = \"planner\"\nreads = [\"task\"]\nwrites = \"plan\"\n",
        scripted(&[("planner", &["a new plan"])]),
        peers(&["planner"])
    ));
    // The planner wrote the board for its first step, then died before recording it.
    let board = Arc::new(roundtable_core::mem::MemBlackboard::new());
    let usage = serde_json::json!({"model": "m", "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 1, "cost_usd": 0.0, "calls": 1});
    let value = serde_json::json!({"text": "the plan from before the crash", "by": "planner", "step": "board/0/0", "usage": usage});
    board.create("plan", serde_json::to_vec(&value).unwrap()).await.unwrap();
    let (models, calls) = recorded(&p);
    let extras = PeerExtras { board: Some(board.clone()), ..Default::default() };
    let (log, s) = run_with(&p, "Plan.", models, extras, None, None).await;
    assert!(calls.lock().unwrap().is_empty(), "no model call for a step already on the board");
    let w = log.iter().find(|e| e.kind == Kind::Board).unwrap();
    assert_eq!(w.body.json.as_ref().unwrap()["reason"], "recovered");
    assert_eq!((s.final_answer.as_deref(), s.calls, s.tokens), (Some("the plan from before the crash"), 1, 15));
}

#[test]
fn blackboard_triggers_only_on_others_changes_and_stops_at_max_writes() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"blackboard\"\nmax_writes = 4\n[[protocol.sources]]\npeer = \"w\"\nreads = [\"task\", \"notes\"]\nwrites = \"notes\"\n[[protocol.sources]]\npeer = \"s\"\nreads = [\"notes\"]\nwrites = \"summary\"\n",
        simulated(0.5, 0.0, 1),
        peers(&["w", "s"])
    ));
    let f = Fold::new(&p, "topic");
    assert!(f.steps("w").is_empty(), "w reads `notes`, which nobody wrote yet");
    assert!(f.steps("s").is_empty());
    let (reason, answer) = f.stop().unwrap();
    assert_eq!((reason.as_str(), answer), ("quiescent: no source has anything to add after 0 writes", None));

    // A source that reads its own key is not triggered by its own write.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"blackboard\"\nmax_writes = 2\n[[protocol.sources]]\npeer = \"w\"\nreads = [\"task\"]\nwrites = \"notes\"\n[[protocol.sources]]\npeer = \"e\"\nreads = [\"notes\"]\nwrites = \"notes\"\n",
        simulated(0.5, 0.0, 1),
        peers(&["w", "e"])
    ));
    let mut f = Fold::new(&p, "topic");
    let task = f.log[0].id.clone();
    let d = &f.duties("w")[0];
    assert_eq!((&*d.step, d.parents.clone()), ("board/0/0", vec![task.clone()]));
    let put = |f: &mut Fold, who: &str, step: &str, parents: Vec<roundtable_core::EnvelopeId>| {
        let body = roundtable_core::Body::text(format!("{who} wrote"))
            .with_json(serde_json::json!({"op": "put", "key": "notes", "revision": 1}));
        let e = f.env(who, step, Kind::Board, body).with_parents(parents);
        f.push(e)
    };
    let w1 = put(&mut f, "w", "board/0/0", vec![task]);
    assert!(f.steps("w").is_empty(), "w saw the task and nothing else changed");
    assert_eq!(f.steps("e"), ["board/1/0"]);
    let e1 = put(&mut f, "e", "board/1/0", vec![w1.id.clone()]);
    assert!(f.steps("e").is_empty(), "e's own write does not trigger e");
    assert_eq!(f.stop().unwrap(), ("max_writes: 2 contributions (2 written)".to_string(), Some("e wrote".to_string())));
    let _ = e1;
}

// ---------------------------------------------------------------------------------
// Self-assigned work queue.

const TASKS: &str = r#"
[[protocol.tasks]]
id = "a"
description = "Compute 2+3*4."
[[protocol.tasks]]
id = "b"
description = "Compute 5*5-1."
[[protocol.tasks]]
id = "c"
description = "Compute 7*6+1."
depends_on = ["a", "b"]
[[protocol.tasks]]
id = "d"
description = "Compute 9*9+9."
depends_on = ["c"]
"#;

fn work_plan(extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "{}{}[protocol]\nkind = \"work_queue\"\n{extra}\n{TASKS}",
        simulated(1.0, 0.0, 1),
        peers(&["w1", "w2", "w3"])
    ))
}

fn position(log: &[Arc<roundtable_core::Envelope>], step: &str) -> usize {
    log.iter().position(|e| &*e.step == step).unwrap_or_else(|| panic!("no {step}"))
}

#[tokio::test]
async fn work_queue_tasks_are_claimed_done_once_each_and_in_dependency_order() {
    let p = work_plan("");
    let (log, s) = run(&p, "Compute the figures.").await;
    for t in ["a", "b", "c", "d"] {
        let results: Vec<_> = log.iter().filter(|e| *e.step == format!("work/{t}/result")).collect();
        assert_eq!(results.len(), 1, "one result for {t}");
        assert!(log.iter().any(
            |e| e.kind == Kind::Work && e.body.json.as_ref().is_some_and(|j| j["op"] == "claim" && j["task"] == t)
        ));
    }
    assert!(position(&log, "work/a/result") < position(&log, "work/c/result"));
    assert!(position(&log, "work/b/result") < position(&log, "work/c/result"));
    assert!(position(&log, "work/c/result") < position(&log, "work/d/result"));
    assert_eq!(s.stop_reason.as_deref(), Some("all 4 tasks resolved: 4 done, 0 failed, 0 skipped"));
    assert!(s.final_answer.as_deref().unwrap().ends_with("Answer: 90"), "d is the only sink: {:?}", s.final_answer);
    // Each result's model call saw its dependencies' results.
    let c = log.iter().find(|e| &*e.step == "work/c/result").unwrap();
    assert_eq!(c.parents.len(), 2);
}

#[tokio::test]
async fn work_queue_failure_notifies_the_holders_of_dependent_tasks_who_skip_them() {
    let p = work_plan("");
    let models = offline_models(&p, None)
        .into_iter()
        .map(|(id, m)| {
            let fail = FailWhen {
                inner: m,
                when: Box::new(|r| r.instruction.as_deref().is_some_and(|i| i.contains("Your task (b)"))),
            };
            (id, Arc::new(fail) as Arc<dyn roundtable_core::model::ChatModel>)
        })
        .collect();
    let (log, s) = run_with(&p, "Compute the figures.", models, PeerExtras::default(), None, None).await;
    assert_eq!(s.stop_reason.as_deref(), Some("all 4 tasks resolved: 1 done, 1 failed, 2 skipped"));
    let holder = |t: &str| -> PeerId {
        log.iter()
            .find(|e| {
                e.kind == Kind::Work && e.body.json.as_ref().is_some_and(|j| j["op"] == "claim" && j["task"] == t)
            })
            .unwrap()
            .from
            .clone()
    };
    let failer = log.iter().find(|e| &*e.step == "work/b/result").unwrap();
    assert_eq!(failer.kind, Kind::Failure);
    for (failed, dependent) in [("b", "c"), ("c", "d")] {
        let notice = log
            .iter()
            .find(|e| *e.step == format!("work/{failed}/notice/{dependent}"))
            .unwrap_or_else(|| panic!("notice {failed}→{dependent}"));
        assert_eq!(notice.to, Recipient::Peer(holder(dependent)), "a direct message to the holder");
        let skipped = log.iter().find(|e| *e.step == format!("work/{dependent}/result")).unwrap();
        assert_eq!(skipped.body.json.as_ref().unwrap()["op"], "skipped");
        assert!(
            position(&log, &notice.step) < position(&log, &skipped.step),
            "the holder re-prioritizes on the notice"
        );
    }
    assert_eq!(s.final_answer, None, "the only sink was skipped");
}

#[test]
fn work_queue_continue_policy_and_released_tasks_of_absent_holders() {
    let p = work_plan("on_dependency_failure = \"continue\"");
    let mut f = Fold::new(&p, "topic");
    let claim = |f: &mut Fold, who: &str, task: &str, item: &str| {
        let body = roundtable_core::Body::text("claim")
            .with_json(serde_json::json!({"op": "claim", "task": task, "item": item}));
        let e = f.env(who, &format!("claim/{item}"), Kind::Work, body);
        f.push(e)
    };
    let duties = f.duties("w1");
    let Action::Claim { items } = &duties[0].action else { panic!() };
    assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"], "dependencies first");
    claim(&mut f, "w1", "a", "a");
    claim(&mut f, "w2", "a", "a"); // second claim of the same item: w1 holds it
    claim(&mut f, "w2", "b", "b");
    claim(&mut f, "w3", "c", "c");
    assert_eq!(f.steps("w1"), ["work/a/result"]);
    assert!(f.steps("w3").iter().all(|s| s.starts_with("claim/")), "c waits for a and b");
    // w2 disappears holding b: b is offered again as b#1.
    f.absent("w2");
    let duties = f.duties("w3");
    let Action::Claim { items } = &duties.last().unwrap().action else { panic!() };
    assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b#1", "d"]);
    claim(&mut f, "w3", "b", "b#1");
    f.say("w1", "work/a/result", Kind::Work, "Answer: 14");
    f.fail("w3", "work/b/result");
    // The failer notifies c's holder (itself here); then c runs, told what failed.
    let notice = f.duties("w3").into_iter().find(|d| &*d.step == "work/b/notice/c").unwrap();
    assert_eq!(notice.to, Recipient::Peer("w3".into()));
    assert!(!f.steps("w3").contains(&"work/c/result".to_string()), "not before the notice");
    f.perform("w3", &notice);
    let d = f.duties("w3").into_iter().find(|d| &*d.step == "work/c/result").unwrap();
    let Action::Speak { instruction, .. } = &d.action else { panic!() };
    assert!(instruction.as_deref().unwrap().contains("Task b did not complete"), "{instruction:?}");
}

// ---------------------------------------------------------------------------------
// Contract net.

const CNET: &str = r#"
[protocol]
kind = "contract_net"
capabilities = { ana = ["sql"], bo = ["rust"], cy = ["sql", "rust"] }
[[protocol.tasks]]
id = "t1"
description = "Compute 3*3."
needs = ["sql"]
[[protocol.tasks]]
id = "t2"
description = "Compute 4*4."
needs = ["rust"]
[[protocol.tasks]]
id = "t3"
description = "Compute 5*5."
size = 2
[[protocol.tasks]]
id = "t4"
description = "Compute 6*6."
"#;

fn awards(log: &[Arc<roundtable_core::Envelope>]) -> Vec<String> {
    log.iter()
        .filter(|e| e.step.ends_with("/award"))
        .map(|e| {
            format!(
                "{}→{}",
                e.body.json.as_ref().unwrap()["task"].as_str().unwrap(),
                e.body.json.as_ref().unwrap()["to"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

#[tokio::test]
async fn contract_net_awards_by_capability_then_load_then_team_order() {
    let p = plan(&format!("{}{}{CNET}", simulated(1.0, 0.0, 1), peers(&["ana", "bo", "cy"])));
    let (log, s) = run(&p, "Share the work.").await;
    // t1: ana and cy can (tie, no load yet): ana. t2: bo and cy: bo. t3: everyone can;
    // ana and bo carry 1, cy 0: cy (now 2). t4: ana and bo carry 1: ana.
    assert_eq!(awards(&log), ["t1→ana", "t2→bo", "t3→cy", "t4→ana"]);
    for t in ["t1", "t2", "t3", "t4"] {
        let a = position(&log, &format!("cnet/{t}/a0/announce"));
        let bids = log.iter().filter(|e| *e.step == format!("cnet/{t}/a0/bid")).count();
        assert_eq!(bids, 3);
        assert!(a < position(&log, &format!("cnet/{t}/a0/award")));
        assert_eq!(log.iter().filter(|e| *e.step == format!("cnet/{t}/a0/result")).count(), 1);
    }
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("all 4 tasks resolved: 4 done (ana: 2, bo: 1, cy: 1)"),
        "{:?}",
        s.stop_reason
    );
}

#[tokio::test]
async fn contract_net_reannounces_a_failed_task_without_the_peer_that_failed_it() {
    let p = plan(&format!("{}{}{CNET}", simulated(1.0, 0.0, 1), peers(&["ana", "bo", "cy"])));
    let models = offline_models(&p, None)
        .into_iter()
        .map(|(id, m)| {
            let ana = id.as_str() == "ana";
            let fail = FailWhen {
                inner: m,
                when: Box::new(move |r| ana && r.instruction.as_deref().is_some_and(|i| i.contains("(t1)"))),
            };
            (id, Arc::new(fail) as Arc<dyn roundtable_core::model::ChatModel>)
        })
        .collect();
    let (log, s) = run_with(&p, "Share the work.", models, PeerExtras::default(), None, None).await;
    let a = awards(&log);
    assert!(a.contains(&"t1→ana".to_string()) && a.contains(&"t1→cy".to_string()), "{a:?}");
    assert_eq!(log.iter().filter(|e| &*e.step == "cnet/t1/a1/bid").count(), 2, "ana is not asked again");
    assert_eq!(log.iter().find(|e| &*e.step == "cnet/t1/a1/result").unwrap().from.as_str(), "cy");
    assert!(s.stop_reason.as_deref().unwrap().contains("4 done"), "{:?}", s.stop_reason);
}

#[test]
fn contract_net_model_bids_without_a_number_are_rejected() {
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"contract_net\"\nbids = \"model\"\n[[protocol.tasks]]\nid = \"t1\"\ndescription = \"Compute 3*3.\"\n",
        simulated(1.0, 0.0, 1),
        peers(&["ana", "bo"])
    ));
    let mut f = Fold::new(&p, "topic");
    f.settle(&["ana"]);
    assert_eq!(f.log.last().unwrap().step.as_ref(), "cnet/t1/a0/announce");
    f.say_json("ana", "cnet/t1/a0/bid", Kind::Work, serde_json::json!({"capability": "high"}));
    f.say_json("bo", "cnet/t1/a0/bid", Kind::Work, serde_json::json!({"capability": 0.4}));
    f.settle(&["ana", "bo"]);
    let steps: Vec<&str> = f.log.iter().skip(3).map(|e| &*e.step).collect();
    assert!(steps.contains(&"cnet/t1/a0/bid/ana/malformed") && steps.contains(&"cnet/t1/a0/award"), "{steps:?}");
    let award = f.log.iter().find(|e| e.step.ends_with("/award")).unwrap();
    assert_eq!(award.body.json.as_ref().unwrap()["to"], "bo", "only bo's bid counts");
}

// ---------------------------------------------------------------------------------
// Hybrid.

fn hybrid(model: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "{model}{}[protocol]\nkind = \"hybrid\"\nleader = \"lead\"\ndeadlock_rounds = 2\n",
        peers(&["lead", "a", "b", "c"])
    ))
}

#[tokio::test]
async fn hybrid_peers_agree_without_the_leader_deciding() {
    let (log, s) = run(&hybrid(&simulated(1.0, 0.0, 1)), QUESTION).await;
    assert_eq!(
        steps_of(&log, Kind::Message).iter().filter(|s| s.starts_with("lead:")).collect::<Vec<_>>(),
        ["lead:objective"]
    );
    assert_eq!(s.final_answer.as_deref(), Some(RIGHT));
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("the peers agreed in round 1 (100% ≥ 100%) without the leader"),
        "{:?}",
        s.stop_reason
    );
}

#[tokio::test]
async fn hybrid_leader_decides_on_deadlock() {
    let p = hybrid(&scripted(&[
        (
            "lead",
            &["Find the cheapest option that ships this month.", "Option B ships in time and costs least. Answer: B"],
        ),
        ("a", &["Answer: A"]),
        ("b", &["Answer: B"]),
        ("c", &["Answer: C"]),
    ]));
    let (models, calls) = recorded(&p);
    let (log, s) = run_with(&p, "Which vendor?", models, PeerExtras::default(), None, None).await;
    assert_eq!(log.iter().filter(|e| e.step.starts_with('r')).count(), 6, "two rounds of three");
    assert_eq!(s.final_answer.as_deref(), Some("B"));
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("deadlock after 2 rounds; the leader lead decided"),
        "{:?}",
        s.stop_reason
    );
    let calls = calls.lock().unwrap();
    let first = calls.iter().find(|c| c.peer == "a" && c.step == "r0/answer").unwrap();
    assert!(first.messages.iter().any(|m| m.1.starts_with("Find the cheapest option")), "members see the objective");
}

#[test]
fn hybrid_without_its_leader_ends_without_an_answer_on_deadlock() {
    let p = hybrid(&simulated(1.0, 0.0, 1));
    let mut f = Fold::new(&p, "topic");
    f.absent("lead");
    assert_eq!(f.steps("a"), ["r0/answer"], "no objective: members start with the task");
    for r in 0..2 {
        f.say("a", &format!("r{r}/answer"), Kind::Message, "Answer: A");
        f.say("b", &format!("r{r}/answer"), Kind::Message, "Answer: B");
        f.say("c", &format!("r{r}/answer"), Kind::Message, "Answer: A");
    }
    let (reason, answer) = f.stop().unwrap();
    assert_eq!(answer, None);
    assert!(reason.starts_with("deadlock after 2 rounds and the leader lead cannot decide: it is absent"), "{reason}");
}

// ---------------------------------------------------------------------------------
// Across protocols: peers that never answer, termination on protocol signals, budgets
// for judges.

/// A model that never answers.
struct Silent;
#[async_trait::async_trait]
impl roundtable_core::model::ChatModel for Silent {
    fn name(&self) -> &str {
        "silent"
    }
    async fn chat(
        &self,
        _: &roundtable_core::model::ChatRequest,
    ) -> Result<roundtable_core::model::ChatResponse, roundtable_core::model::ModelError> {
        futures::future::pending().await
    }
}

#[tokio::test]
async fn a_juror_that_never_runs_and_a_debater_that_never_answers_are_noticed_absent() {
    let presence = "[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.3\n";
    // j3 never starts: noticed absent, the jury commits and reveals without it.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"jury\"\n{presence}",
        simulated(1.0, 0.0, 1),
        peers(&["j1", "j2", "j3"])
    ));
    let mut models = offline_models(&p, None);
    models.remove(&PeerId::from("j3"));
    let pres: Arc<dyn roundtable_core::bus::Presence> = Arc::new(roundtable_core::bus::MemPresence::default());
    let (log, s) = run_with(&p, QUESTION, models, PeerExtras::default(), Some(pres), None).await;
    let absent: Vec<_> = log.iter().filter(|e| e.kind == Kind::Absent).collect();
    assert_eq!(absent.len(), 1);
    assert_eq!(absent[0].body.json.as_ref().unwrap()["peer"], "j3");
    assert_eq!(log.iter().filter(|e| e.kind == Kind::Commit).count(), 2);
    assert_eq!(s.final_answer.as_deref(), Some(RIGHT));
    assert!(s.stop_reason.as_deref().unwrap().contains("of 2 valid votes"), "{:?}", s.stop_reason);

    // c's model hangs. c is alive (it keeps beating while it waits), so it is not
    // absent: the per-call timeout layer ends each hung call, c records the failure,
    // and the rounds close without its answers.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\n{presence}",
        simulated(1.0, 0.0, 1),
        peers(&["a", "b", "c"])
    ));
    let mut models = offline_models(&p, None);
    models.insert(
        PeerId::from("c"),
        Arc::new(roundtable_core::model::layers::Timeout::new(Silent, std::time::Duration::from_millis(400))),
    );
    let pres: Arc<dyn roundtable_core::bus::Presence> = Arc::new(roundtable_core::bus::MemPresence::default());
    let (log, s) = run_with(&p, QUESTION, models, PeerExtras::default(), Some(pres), None).await;
    assert!(!log.iter().any(|e| e.kind == Kind::Absent), "a peer waiting on its model is alive");
    let failed: Vec<_> = log.iter().filter(|e| e.kind == Kind::Failure && e.from.as_str() == "c").collect();
    assert_eq!(failed.len(), 2, "one timed-out call per round");
    assert!(failed[0].body.text.contains("timed out"), "{}", failed[0].body.text);
    let mut said = steps_of(&log, Kind::Message);
    said.sort();
    assert_eq!(said, ["a:r0/answer", "a:r1/answer", "b:r0/answer", "b:r1/answer"], "c never answered");
    assert_eq!(s.final_answer.as_deref(), Some(RIGHT));
}

#[tokio::test]
async fn termination_conditions_read_the_protocols_signals() {
    // Answers that never change: no_progress stops a 5-round debate after round 2.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\nrounds = 5\n[termination]\nno_progress = 1\n",
        scripted(&[("a", &["Answer: 4"]), ("b", &["Answer: 5"])]),
        peers(&["a", "b"])
    ));
    let (_, s) = run(&p, "topic").await;
    assert_eq!(s.stop_reason.as_deref(), Some("no_progress: answers unchanged for 1 round"));
    assert_eq!((s.rounds, s.calls), (2, 4));
    assert_eq!(s.final_answer.as_deref(), Some("4"), "the best answer so far: a tie, by team order");

    // consensus_reached stops a debate as soon as the answers agree.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\nrounds = 4\n[termination]\nconsensus_reached = true\n",
        simulated(1.0, 0.0, 1),
        peers(&["a", "b"])
    ));
    let (_, s) = run(&p, QUESTION).await;
    assert_eq!((s.stop_reason.as_deref(), s.calls), (Some("consensus_reached"), 2));
    assert_eq!(s.final_answer.as_deref(), Some(RIGHT));

    // any/all compose protocol signals with limits.
    let p = plan(&format!(
        "{}{}[protocol]\nkind = \"debate\"\nrounds = 4\n[termination]\nall = [{{ max_rounds = 2 }}, {{ confidence = 0.99 }}]\n",
        simulated(1.0, 0.0, 1),
        peers(&["a", "b"])
    ));
    let (_, s) = run(&p, QUESTION).await;
    assert_eq!(s.stop_reason.as_deref(), Some("max_rounds: 2 rounds reached and confidence: 1.00 ≥ 0.99"));
}

#[tokio::test]
async fn judges_calls_are_budgeted_like_everyone_elses() {
    // The judge may make one call: its second verdict is refused and recorded as a
    // failure of that step, and the debate ends with the debaters' vote.
    let p = judged(
        &format!(
            "{}[budget.per_peer]\nmax_calls = 2\n",
            scripted(&[
                ("pro", &["Answer: yes"]),
                ("con", &["Answer: no", "Answer: yes"]),
                ("judge", &[r#"{"consensus_reached": false, "conclusion": ""}"#]),
            ])
        ),
        "rounds = 2",
    );
    let (log, s) = run(&p, "topic").await;
    let refused = log.iter().find(|e| e.kind == Kind::Failure && e.from.as_str() == "judge").unwrap();
    assert_eq!(refused.body.json.as_ref().unwrap()["error"], "budget");
    assert_eq!(&*refused.step, "final");
    assert!(
        s.stop_reason
            .as_deref()
            .unwrap()
            .starts_with("the judge judge gave no usable pick; the debaters' latest answers decide"),
        "{:?}",
        s.stop_reason
    );
    assert_eq!(s.final_answer.as_deref(), Some("yes"));
    // A session budget stops everything before the judge's call, with the best answer.
    let p = judged(&format!("{}[budget]\nmax_calls = 2\n", simulated(1.0, 0.0, 1)), "");
    let (log, s) = run(&p, QUESTION).await;
    assert!(log.iter().all(|e| e.kind != Kind::Verdict));
    assert!(
        s.stop_reason.as_deref().unwrap().starts_with("budget: 2 model calls made, limit 2"),
        "{:?}",
        s.stop_reason
    );
    assert!(s.final_answer.as_deref().unwrap().ends_with(RIGHT));
}
