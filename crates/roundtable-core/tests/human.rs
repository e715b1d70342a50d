//! Human peers: a seat answered through the `Seat` model, and an empty seat that a
//! time limit skips, on the record.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use roundtable_core::human::{Field, Form, Seat};
use roundtable_core::log::{MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::ChatModel;
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::team::TeamPlan;
use roundtable_core::{Kind, PeerId, SessionId};

fn team(protocol: &str, within: Option<f64>) -> TeamPlan {
    let within = within.map_or(String::new(), |s| format!("answer_within_secs = {s}\n"));
    plan(&format!(
        r#"
name = "h"
topic = "Pick a colour."
[models.s]
provider = "scripted"
[models.s.per_peer]
a = ["red is best", "{{\"answer\": \"red\", \"confidence\": 0.9}}", "x"]
b = ["blue is best", "{{\"answer\": \"red\", \"confidence\": 0.6}}", "x"]
[[peers]]
id = "a"
model = "s"
[[peers]]
id = "p"
kind = "human"
{within}
[[peers]]
id = "b"
model = "s"
{protocol}
"#
    ))
}

async fn session(plan: &TeamPlan) -> Arc<dyn SessionLog> {
    let log: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from("human-test")))));
    open_session(log.as_ref(), plan, "Pick a colour.").await.unwrap();
    log
}

fn models(plan: &TeamPlan) -> HashMap<PeerId, Arc<dyn ChatModel>> {
    roundtable_core::eval::offline_models(plan, None)
}

#[tokio::test]
async fn a_person_answers_a_turn_and_a_vote_as_the_model_path_would() {
    let plan = team("[protocol]\nkind = \"debate\"\nrounds = 1\njson = true\n", None);
    let log = session(&plan).await;
    let (seat, mut asks) = Seat::new();
    let mut all = models(&plan);
    all.insert(PeerId::from("p"), Arc::new(seat));
    let person = tokio::spawn(async move {
        let mut forms = Vec::new();
        while let Some(q) = asks.recv().await {
            forms.push(q.form.clone());
            let Form::Fields(fields) = &q.form else { panic!("a debate answer is a form: {:?}", q.form) };
            let values: Vec<_> = fields
                .iter()
                .map(|f| match f {
                    Field::Text { name, .. } if name == "answer" => f.check("green").unwrap(),
                    Field::Fraction { .. } => f.check("0.7").unwrap(),
                    other => other.check("because").unwrap(),
                })
                .collect();
            let text = Form::answer_of(fields, &values);
            q.answer(text);
        }
        forms
    });
    let summary = run_peers(log.clone(), &plan, all, None, None).await.unwrap();
    let forms = person.await.unwrap();
    assert!(summary.stopped);
    assert!(!forms.is_empty(), "the person was asked");
    let entries = log.read_all().await.unwrap();
    let mine: Vec<_> = entries.iter().filter(|e| e.env.from.as_str() == "p" && e.env.kind == Kind::Message).collect();
    assert!(!mine.is_empty(), "the person's answers are envelopes authored by the seat's peer");
    for e in &mine {
        let j = e.env.body.json.as_ref().expect("the form's JSON is read as a model's is");
        assert_eq!(j["answer"], "green");
        assert_eq!(j["confidence"], 0.7);
        assert_eq!(e.env.usage.as_ref().unwrap().model.as_ref(), roundtable_core::human::HUMAN_MODEL);
    }
}

#[tokio::test]
async fn an_empty_seat_with_a_time_limit_is_skipped_on_the_record_and_the_team_finishes() {
    let plan = team("[protocol]\nkind = \"round_robin\"\nrounds = 2\n", Some(0.2));
    let log = session(&plan).await;
    let summary = run_peers(log.clone(), &plan, models(&plan), None, None).await.unwrap();
    assert!(summary.stopped, "the team finished without the person");
    let entries = log.read_all().await.unwrap();
    let absent: Vec<_> = entries.iter().filter(|e| e.env.kind == Kind::Absent).collect();
    assert_eq!(absent.len(), 1, "skipped once, then absent until someone takes the seat");
    assert!(absent[0].env.body.text.contains("p did not answer turn/1 within 0.2 s"), "{}", absent[0].env.body.text);
    assert_eq!(absent[0].env.body.json.as_ref().unwrap()["reason"], "answer_within");
    let turns: Vec<_> =
        entries.iter().filter(|e| e.env.kind == Kind::Message).map(|e| e.env.from.to_string()).collect();
    assert_eq!(turns, ["a", "b", "a", "b"], "the person's turns were skipped, the others' taken");
}

#[tokio::test]
async fn without_a_time_limit_the_team_waits_for_the_person() {
    let plan = team(
        "[protocol]\nkind = \"round_robin\"\nrounds = 1\n[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.1\n",
        None,
    );
    let log = session(&plan).await;
    // With presence: a model peer with no heartbeat would be recorded absent by now.
    let presence: Arc<dyn roundtable_core::bus::Presence> = Arc::new(roundtable_core::bus::MemPresence::default());
    let run = tokio::spawn({
        let (log, plan) = (log.clone(), plan.clone());
        async move { run_peers(log, &plan, models(&plan), Some(presence), None).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let entries = log.read_all().await.unwrap();
    assert!(!run.is_finished(), "the session waits for the person");
    assert!(entries.iter().all(|e| e.env.kind != Kind::Absent && e.env.kind != Kind::Stop));
    assert_eq!(entries.len(), 2, "the task and a's turn; p's turn is awaited");
    run.abort();
}

#[tokio::test]
async fn a_person_as_the_hybrid_leader_takes_the_deadlock_decision() {
    let plan = plan(
        r#"
name = "h"
topic = "How many regions do we launch in?"
[models.s]
provider = "scripted"
[models.s.per_peer]
m1 = ["Two regions. Answer: 2", "Still two. Answer: 2"]
m2 = ["Three regions. Answer: 3", "Still three. Answer: 3"]
[[peers]]
id = "lead"
kind = "human"
[[peers]]
id = "m1"
model = "s"
[[peers]]
id = "m2"
model = "s"
[protocol]
kind = "hybrid"
leader = "lead"
deadlock_rounds = 2
"#,
    );
    let log = session(&plan).await;
    let (seat, mut asks) = Seat::new();
    let mut all = models(&plan);
    all.insert(PeerId::from("lead"), Arc::new(seat));
    let person = tokio::spawn(async move {
        let mut asked = Vec::new();
        while let Some(q) = asks.recv().await {
            assert_eq!(q.form, Form::Text, "the leader answers in free text");
            let answer = match &*q.step {
                "objective" => "Decide how many regions we launch in; cost matters most.",
                "decide" => {
                    let seen: Vec<String> = q.context.iter().map(|(_, t)| t.to_string()).collect();
                    assert!(
                        seen.iter().any(|t| t.contains("Answer: 2")) && seen.iter().any(|t| t.contains("Answer: 3")),
                        "the leader sees both positions before deciding: {seen:?}"
                    );
                    "Two keeps the on-call load sane. Answer: 2"
                }
                other => panic!("the leader has no duty {other}"),
            };
            asked.push(q.step.to_string());
            q.answer(answer.to_string());
        }
        asked
    });
    let summary = run_peers(log.clone(), &plan, all, None, None).await.unwrap();
    assert_eq!(person.await.unwrap(), ["objective", "decide"]);
    assert_eq!(summary.final_answer.as_deref(), Some("2"), "{summary:?}");
    assert!(summary.answer_accepted);
    let entries = log.read_all().await.unwrap();
    let decide = entries.iter().find(|e| &*e.env.step == "decide").unwrap();
    assert_eq!(decide.env.from.as_str(), "lead");
}
