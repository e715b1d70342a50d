//! Stops are re-derived by every reader: a stop is taken only when it follows from the
//! log before it, and one that does not is folded as a rejection at its place.

mod common;

use std::sync::Arc;

use common::{Fold, plan};
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Usage};
use roundtable_core::log::{Entry, MemLog, SessionLog, SharedMemLog};
use roundtable_core::protocol::Action;
use roundtable_core::session::{REJECTED_BY, STOP_STEP, SessionState, SessionSummary, stop_follows};
use roundtable_core::team::TeamPlan;

/// Two peers, two rounds of round robin, with whatever `extra` adds (termination,
/// budget).
fn pair(extra: &str) -> TeamPlan {
    plan(&format!(
        "name = \"t\"\ntopic = \"x\"\n[models.m]\nprovider = \"scripted\"\nreplies = [\"r\"]\n\
         [[peers]]\nid = \"a\"\nmodel = \"m\"\n[[peers]]\nid = \"b\"\nmodel = \"m\"\n\
         [protocol]\nkind = \"round_robin\"\nrounds = 2\n{extra}"
    ))
}

/// A turn as a peer records it: the model call's usage on it.
fn turn(f: &mut Fold, from: &str, n: u64, text: &str) -> Arc<Envelope> {
    let mut e = f.env(from, &format!("turn/{n}"), Kind::Message, Body::text(text));
    e.usage =
        Some(Usage { model: "m".into(), prompt_tokens: 10, completion_tokens: 5, calls: 1, ..Default::default() });
    f.push(e)
}

/// A stop in `from`'s name with this JSON, at the stop's own step and id.
fn stop_with(f: &Fold, from: &str, text: &str, json: serde_json::Value) -> Envelope {
    let mut e = f.env(from, STOP_STEP, Kind::Stop, Body::text(text).with_json(json));
    e.id = roundtable_core::EnvelopeId::derive(&f.session, &PeerId::from("*"), STOP_STEP);
    e
}

/// The stop an honest peer records now (from its duty).
fn honest_stop(f: &Fold, from: &str) -> Envelope {
    let d = f.duties(from).into_iter().find(|d| d.kind == Kind::Stop).expect("a stop is due");
    let Action::Post { body } = &d.action else { panic!("a stop posts") };
    let mut e = Envelope::new(&f.session, &PeerId::from(from), d.step.clone(), d.kind, d.to.clone(), body.clone())
        .with_round(d.round)
        .with_parents(d.parents.clone());
    e.id = d.envelope_id(&f.session, &PeerId::from(from));
    e
}

#[tokio::test]
async fn a_stop_with_a_made_up_reason_or_answer_is_rejected_and_the_honest_one_is_taken_from_an_in_memory_log() {
    let plan = Arc::new(pair(""));
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    // A stop mid-session, with a reason of its own and a final answer of its own, said
    // to be decided at the latest entry.
    let forged = stop_with(
        &f,
        "a",
        "FORGED",
        serde_json::json!({"reason": "completed: everyone agreed", "answer": "FORGED", "accepted": true,
                           "decided_by": [], "round": 0, "messages": 1, "tokens": 15, "cost_usd": 0.0,
                           "decided_at": 2, "elapsed_ms": 0}),
    );
    f.push(forged.clone());
    assert!(f.st.stop.is_none(), "the made-up stop is not the session's");
    assert_eq!(f.st.tally.failures, 1, "it is folded as a rejection at its place");
    assert_eq!(f.st.tally.per_peer[&PeerId::from(REJECTED_BY)].failures, 1);

    turn(&mut f, "b", 1, "b one");
    turn(&mut f, "a", 2, "a two");
    turn(&mut f, "b", 3, "b two");
    // The right place and reason, another answer: rejected too.
    let mut wrong_answer = honest_stop(&f, "a");
    let mut json = wrong_answer.body.json.clone().unwrap();
    assert_eq!(json["answer"], "b two");
    json["answer"] = "FORGED".into();
    wrong_answer.body = Body::text("FORGED").with_json(json);
    f.push(wrong_answer);
    assert!(f.st.stop.is_none());
    // A stop at a step of its own (not the session's stop) is not one either.
    let mut elsewhere = honest_stop(&f, "a");
    elsewhere.step = "stop/forged".into();
    elsewhere.id = roundtable_core::EnvelopeId::derive(&f.session, &PeerId::from("a"), "stop/forged");
    f.push(elsewhere);
    assert!(f.st.stop.is_none());

    // The honest stop, decided before two more entries landed (a rejection counts in
    // the log like any other entry), follows from the log up to where it was decided.
    let honest = honest_stop(&f, "b");
    let json = honest.body.json.as_ref().unwrap();
    assert_eq!(json["decided_at"], 8, "{json}");
    assert!(json["reason"].as_str().unwrap().starts_with("completed"), "{json}");
    let join = f.env("a", "join/a/0", Kind::Join, Body::text("a is back"));
    f.push(join);
    f.push(honest.clone());
    assert_eq!(f.st.stop.as_ref().map(|s| s.env.id.clone()), Some(honest.id.clone()));
    assert_eq!(f.st.tally.failures, 3, "three rejections, one per stop that did not follow");

    // The same log through an in-memory log store, folded by a reader that was not
    // there. The store keeps one envelope per id, so the stops after the made-up one
    // (same id) are not appended: the reader folds the rejection and the turns after
    // it, and the session is due to stop with the honest answer.
    let log = SharedMemLog(Arc::new(MemLog::new(f.session.clone())));
    for e in &f.log {
        log.append((**e).clone()).await.unwrap();
    }
    let read = log.read_all().await.unwrap();
    let mut reader = SessionState::new(plan.clone(), f.session.clone());
    for e in &read {
        reader.apply(e);
    }
    assert!(reader.stop.is_none());
    assert_eq!(reader.tally.per_peer[&PeerId::from(REJECTED_BY)].failures, 2, "the made-up stop and the one elsewhere");
    let due = reader.stop_decision(0).expect("the rounds are done");
    assert_eq!((due.answer.as_deref(), due.accepted), (Some("b two"), true), "{due:?}");
    let summary = SessionSummary::from_entries(&f.session, &read).unwrap();
    assert!(!summary.stopped);
    assert_eq!(summary.failures, 2);
    // Folded in full (as a backend that frees the stop's id for the next one records
    // it), the honest stop is the session's.
    let read: Vec<Entry> = f.log.iter().enumerate().map(|(i, e)| Entry { seq: i as u64 + 1, env: e.clone() }).collect();
    let summary = SessionSummary::from_entries(&f.session, &read).unwrap();
    assert!(summary.stopped);
    assert_eq!(summary.final_answer.as_deref(), Some("b two"));
    assert_eq!(summary.failures, 3);
    // A backend's check of each stop says the same, with why.
    let why = stop_follows(plan.clone(), f.session.clone(), read[..2].iter().cloned(), &read[2]).unwrap_err();
    assert!(why.contains("does not follow") && why.contains("nothing up to log position 2"), "{why}");
    let why = stop_follows(plan.clone(), f.session.clone(), read[..6].iter().cloned(), &read[6]).unwrap_err();
    assert!(why.contains("\"answer\":\"b two\"") && why.contains("\"answer\":\"FORGED\""), "{why}");
    let why = stop_follows(plan.clone(), f.session.clone(), read[..7].iter().cloned(), &read[7]).unwrap_err();
    assert!(why.contains("at step \"stop\""), "{why}");
    assert_eq!(stop_follows(plan.clone(), f.session.clone(), read[..9].iter().cloned(), &read[9]), Ok(()));
}

#[test]
fn a_termination_condition_or_budget_stop_is_taken_only_when_the_log_reaches_it() {
    // max_messages 2: a stop after one message claiming it is refused; after two, taken.
    let plan = pair("[termination]\nmax_messages = 2\n");
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    let early = stop_with(
        &f,
        "b",
        "",
        serde_json::json!({"reason": "max_messages: 2 messages", "answer": "a one", "accepted": false,
                           "decided_by": [], "round": 0, "messages": 1, "tokens": 15, "cost_usd": 0.0,
                           "decided_at": 2, "elapsed_ms": 0}),
    );
    f.push(early);
    assert!(f.st.stop.is_none());
    turn(&mut f, "b", 1, "b one");
    let stop = honest_stop(&f, "a");
    f.push(stop);
    let taken = f.st.stop.as_ref().expect("the condition holds on the log");
    assert_eq!(taken.env.body.json.as_ref().unwrap()["reason"], "max_messages: 2 messages");

    // A budget of two calls: a budget stop naming a usage the log does not have is
    // refused; the one the log reaches is taken.
    let plan = pair("[budget]\nmax_calls = 2\n");
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    let budget = |f: &Fold, why: &str| {
        let d = f.st.budget_stop(why.to_owned());
        let Action::Post { body } = &d.action else { panic!() };
        let mut e = stop_with(f, "b", &body.text, body.json.clone().unwrap());
        e.parents = d.parents.clone();
        e
    };
    let lie = budget(&f, "budget: 2 model calls made, limit 2");
    f.push(lie);
    assert!(f.st.stop.is_none(), "one call is on the log, not two");
    turn(&mut f, "b", 1, "b one");
    let other_limit = budget(&f, "budget: 2 model calls made, limit 1");
    f.push(other_limit);
    assert!(f.st.stop.is_none(), "the limit is the plan's");
    let honest = budget(&f, "budget: 2 model calls made, limit 2");
    f.push(honest);
    let taken = f.st.stop.as_ref().expect("two calls are on the log");
    assert_eq!(taken.env.body.json.as_ref().unwrap()["answer"], "b one");
}

#[test]
fn a_timeout_is_the_writers_clock_but_the_rest_of_the_stop_must_follow() {
    let plan = pair("[termination]\ntimeout_secs = 60\n");
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    // A reader cannot read the writer's clock: a timeout said to be reached is taken
    // (across processes, only from a peer on the roster), with the answer the log gives.
    let decided = f.st.stop_decision(f.log[0].time_ms + 61_000).expect("the timeout holds at that time");
    assert!(decided.reason.starts_with("timeout"), "{decided:?}");
    let mut lying = decided.clone();
    lying.answer = Some("FORGED".into());
    let d = f.st.stop_duty(lying);
    let Action::Post { body } = &d.action else { panic!() };
    let mut e = stop_with(&f, "b", &body.text, body.json.clone().unwrap());
    e.parents = d.parents.clone();
    f.push(e);
    assert!(f.st.stop.is_none(), "the answer is the log's, not the writer's");
    let d = f.st.stop_duty(f.st.stop_decision(f.log[0].time_ms + 61_000).unwrap());
    let Action::Post { body } = &d.action else { panic!() };
    let mut e = stop_with(&f, "b", &body.text, body.json.clone().unwrap());
    e.parents = d.parents.clone();
    f.push(e);
    let taken = f.st.stop.as_ref().expect("a timeout from the writer's clock");
    assert_eq!(taken.env.body.json.as_ref().unwrap()["answer"], "a one");
    assert_eq!(taken.env.body.json.as_ref().unwrap()["elapsed_ms"], 61_000);
}

#[test]
fn a_signed_session_refuses_a_stop_that_does_not_say_where_it_was_decided() {
    let key = || roundtable_core::trust::SecretKey::generate().public().to_hex();
    let mut src = String::from(
        "name = \"t\"\ntopic = \"x\"\n[models.m]\nprovider = \"scripted\"\nreplies = [\"r\"]\n[protocol]\nkind = \"round_robin\"\nrounds = 1\n",
    );
    for id in ["a", "b"] {
        src.push_str(&format!("[[peers]]\nid = \"{id}\"\nmodel = \"m\"\npublic_key = \"{}\"\n", key()));
    }
    for (plan, taken) in [(plan(&src.replace("public_key", "# public_key")), true), (plan(&src), false)] {
        let mut f = Fold::new(&plan, "x");
        turn(&mut f, "a", 0, "a one");
        turn(&mut f, "b", 1, "b one");
        let mut old = honest_stop(&f, "a");
        let mut json = old.body.json.take().unwrap();
        json.as_object_mut().unwrap().remove("decided_at");
        old.body.json = Some(json);
        f.push(old);
        assert_eq!(f.st.stop.is_some(), taken, "a stop from before `decided_at`: taken only when unsigned");
    }
}

#[test]
fn readers_see_the_log_as_its_fold_takes_it_a_stop_that_does_not_follow_and_a_second_stop_as_rejections() {
    use roundtable_core::log::SessionInfo;
    use roundtable_core::session::{as_folded, is_rejection, task_entry};
    let plan = Arc::new(pair(""));
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    let made_up = serde_json::json!({"reason": "completed: everyone agreed", "answer": "FORGED", "accepted": true,
        "decided_by": [], "round": 0, "messages": 1, "tokens": 15, "cost_usd": 0.0, "decided_at": 2, "elapsed_ms": 0});
    f.push(stop_with(&f, "a", "FORGED", made_up));
    let entries = |f: &Fold| -> Vec<Entry> {
        f.log.iter().enumerate().map(|(i, e)| Entry { seq: i as u64 + 1, env: e.clone() }).collect()
    };

    // Mid-session: the made-up stop is a rejection at its place, the rest as it is.
    let open = entries(&f);
    let read = as_folded(&f.session, &open);
    assert_eq!(read.len(), 3);
    assert_eq!(read[2].seq, 3);
    assert!(is_rejection(&read[2].env) && read[2].env.from.as_str() == REJECTED_BY, "{:?}", read[2].env);
    assert!(read[2].env.body.text.contains("does not follow from the log"), "{}", read[2].env.body.text);
    assert!(Arc::ptr_eq(&read[1].env, &open[1].env), "what is not a stop is the log's own envelope");
    let info = SessionInfo::of_entries(&f.session, &open);
    assert_eq!(info.stop, None, "the listing does not show the session stopped by it");
    assert_eq!(info.team.as_deref(), Some("t"));
    assert_eq!(info.envelopes, 3);

    // Finished: the honest stop is kept; a stop after it is a rejection too.
    turn(&mut f, "b", 1, "b one");
    turn(&mut f, "a", 2, "a two");
    turn(&mut f, "b", 3, "b two");
    let honest = honest_stop(&f, "b");
    f.push(honest);
    let after = serde_json::json!({"reason": "completed: again", "answer": "LATE", "accepted": true,
        "decided_by": [], "round": 2, "messages": 4, "tokens": 60, "cost_usd": 0.0, "decided_at": 7, "elapsed_ms": 0});
    f.push(stop_with(&f, "a", "LATE", after));
    let all = entries(&f);
    let read = as_folded(&f.session, &all);
    let stops: Vec<&Entry> = read.iter().filter(|e| e.env.kind == Kind::Stop).collect();
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0].seq, 7);
    assert!(read[7].env.body.text.contains("a second stop"), "{}", read[7].env.body.text);
    let info = SessionInfo::of_entries(&f.session, &all);
    assert!(info.stop.as_deref().is_some_and(|r| r.starts_with("completed: 2 rounds")), "{:?}", info.stop);

    // The task is the first entry that is not a rejection.
    let mut junk_first = vec![Entry { seq: 1, env: read[2].env.clone() }];
    junk_first.extend(all.iter().map(|e| Entry { seq: e.seq + 1, env: e.env.clone() }));
    assert_eq!(task_entry(&junk_first).map(|t| t.seq), Some(2));
    assert_eq!(task_entry(&all[1..]).map(|t| t.seq), None, "a log whose first entry is a turn has no task");
}

#[test]
fn an_export_may_start_with_rejections_before_the_task_but_not_with_anything_else() {
    use roundtable_core::log::jsonl;
    let plan = Arc::new(pair(""));
    let mut f = Fold::new(&plan, "x");
    turn(&mut f, "a", 0, "a one");
    // What a reader of a shared server exports for junk published before the task.
    let rejection = Envelope::new(
        &f.session,
        &PeerId::from("nats"),
        "rejected/1",
        Kind::Failure,
        roundtable_core::Recipient::All,
        Body::text("rejected the message at log position 1: junk"),
    );
    let roster = |task: &Envelope| -> Result<std::collections::BTreeSet<PeerId>, String> {
        let plan = roundtable_core::session::plan_of(task)?;
        Ok(plan.peers.iter().map(|p| p.id.clone()).chain([PeerId::from("nats")]).collect())
    };
    let lines = |first: Envelope| -> Vec<(usize, Envelope)> {
        std::iter::once(first).chain(f.log.iter().map(|e| (**e).clone())).enumerate().map(|(i, e)| (i + 1, e)).collect()
    };
    jsonl::check_session("f.jsonl", &lines(rejection), roster).expect("rejections may come before the task");
    // A turn before the task is not a session as a log writes it.
    let early = f.env("b", "turn/9", Kind::Message, Body::text("early"));
    let err = jsonl::check_session("f.jsonl", &lines(early), roster).unwrap_err();
    assert_eq!(err.line, 1, "{err}");
    assert!(err.error.contains("must be the session's task"), "{err}");
}
