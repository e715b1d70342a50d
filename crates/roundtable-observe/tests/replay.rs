//! Replay: every example session replays with no divergence; tampered recordings,
//! failures, clock stops, absences and crash-then-resume are handled.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use roundtable_core::bus::{MemPresence, Presence};
use roundtable_core::log::Entry;
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::{EnvelopeId, Kind, PeerId};
use roundtable_observe::replay::{ReplayOptions, replay};

fn quick() -> ReplayOptions {
    ReplayOptions { idle: Duration::from_millis(400) }
}

const TRIO: &str = r#"
name = "trio"
topic = "pick a name"
[models.s]
provider = "scripted"
cycle = true
replies = ["{peer} speaks ({n})"]
[[peers]]
id = "pm"
model = "s"
[[peers]]
id = "eng"
model = "s"
[[peers]]
id = "cfo"
model = "s"
[[peers]]
id = "facilitator"
model = "s"
[protocol]
kind = "round_robin"
rounds = 3
summarizer = "facilitator"
"#;

#[tokio::test]
async fn every_example_session_replays_with_no_divergence() {
    let all = examples();
    assert!(all.len() >= 2, "the examples directory has the example sessions");
    for (name, plan) in all {
        let entries = run(&plan).await;
        assert!(entries.iter().any(|e| e.env.kind == Kind::Stop), "{name}: the session ran to its stop");
        let report = replay(&entries, ReplayOptions::default()).await.unwrap();
        assert!(report.ok(), "{name}: {}", report.divergence.unwrap());
        assert_eq!(report.matched, entries.len(), "{name}: every envelope reproduced");
        assert_eq!(report.replayed, entries.len(), "{name}");
        let calls = entries.iter().filter(|e| e.env.usage.is_some()).count();
        assert_eq!(report.model_calls, calls, "{name}: every model output came from the recording");
        assert!(report.unrecorded_calls.is_empty(), "{name}: {:?}", report.unrecorded_calls);
        let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).unwrap();
        assert_eq!(report.stop_reason.as_deref(), stop.env.body.json.as_ref().unwrap()["reason"].as_str(), "{name}");
    }
}

fn tampered(entries: &[Entry], seq: u64, f: impl Fn(&mut roundtable_core::Envelope)) -> Vec<Entry> {
    entries
        .iter()
        .map(|e| {
            let mut env = (*e.env).clone();
            if e.seq == seq {
                f(&mut env);
            }
            Entry { seq: e.seq, env: Arc::new(env) }
        })
        .collect()
}

#[tokio::test]
async fn a_recording_that_the_reducers_would_not_produce_is_reported_at_its_first_divergence() {
    let plan = plan_from(TRIO);
    let entries = run(&plan).await;
    let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).unwrap().seq;

    // A stop reason the reducers did not decide.
    let t = tampered(&entries, stop, |env| {
        env.body.json.as_mut().unwrap()["reason"] = "max_messages: 3 messages".into();
    });
    let r = replay(&t, quick()).await.unwrap();
    let d = r.divergence.expect("a changed stop reason is a divergence");
    assert_eq!((d.seq, d.field.as_str()), (stop, "stop reason"), "{d}");
    assert!(d.expected.contains("max_messages") && d.got.contains("completed: 3 rounds"), "{d}");

    // Causal parents the protocol would not give: eng's first turn answers pm's.
    let t = tampered(&entries, 3, |env| env.parents.clear());
    let d = replay(&t, quick()).await.unwrap().divergence.expect("changed parents diverge");
    assert_eq!((d.seq, d.field.as_str(), d.key.as_str()), (3, "parents", "eng@turn/1"), "{d}");

    // The wrong peer took a turn: the replay's eng wants turn/1, which the recording has
    // only for cfo.
    let t = tampered(&entries, 3, |env| {
        env.from = PeerId::from("cfo");
        env.id = EnvelopeId::derive(&env.session, &env.from, &env.step);
    });
    let r = replay(&t, quick()).await.unwrap();
    let d = r.divergence.expect("a turn out of order diverges");
    assert_eq!((d.seq, d.field.as_str(), d.key.as_str()), (3, "missing", "cfo@turn/1"), "{d}");
    assert!(r.unrecorded_calls.iter().any(|c| c == "eng@turn/1"), "{:?}", r.unrecorded_calls);
}

#[tokio::test]
async fn recorded_model_failures_are_replayed_as_failures() {
    let src = TRIO.replace(
        "replies = [\"{peer} speaks ({n})\"]",
        "replies = [\"{peer} speaks ({n})\"]\nper_peer = { eng = [\"!error server upstream exploded\", \"eng recovers\"] }",
    );
    let plan = plan_from(&src);
    let entries = run(&plan).await;
    let failures = entries.iter().filter(|e| e.env.kind == Kind::Failure).count();
    assert!(failures >= 1, "the scripted error was recorded");
    let r = replay(&entries, ReplayOptions::default()).await.unwrap();
    assert!(r.ok(), "{}", r.divergence.unwrap());
    assert_eq!(r.matched, entries.len());
}

/// A scripted model that takes its time (so a clock can run out).
struct Slow(roundtable_core::model::scripted::Scripted, Duration);
#[async_trait]
impl ChatModel for Slow {
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        tokio::time::sleep(self.1).await;
        self.0.chat(req).await
    }
}

#[tokio::test]
async fn a_clock_stop_is_read_from_the_recording_not_from_the_clock() {
    let src = TRIO.replace("rounds = 3", "rounds = 50") + "[termination]\ntimeout_secs = 0.25\n";
    let plan = plan_from(&src);
    let models: HashMap<PeerId, Arc<dyn ChatModel>> = offline_models(&plan)
        .into_keys()
        .map(|p| {
            let s = roundtable_core::model::scripted::Scripted::new(
                "scripted:s",
                vec!["{peer} speaks ({n})".into()],
                HashMap::new(),
            );
            (p, Arc::new(Slow(s, Duration::from_millis(30))) as Arc<dyn ChatModel>)
        })
        .collect();
    let entries = run_with(&plan, models).await;
    let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).unwrap();
    assert!(stop.env.body.json.as_ref().unwrap()["reason"].as_str().unwrap().starts_with("timeout:"));
    let r = replay(&entries, ReplayOptions::default()).await.unwrap();
    assert!(r.ok(), "{}", r.divergence.unwrap());
    assert!(r.inputs.contains(&stop.seq), "the clock's decision was fed in: {:?}", r.inputs);
}

struct Hanging {
    inner: roundtable_core::model::scripted::Scripted,
    calls: Arc<AtomicU32>,
    hang_after: Option<u32>,
}
#[async_trait]
impl ChatModel for Hanging {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang_after.is_some_and(|h| n >= h) {
            futures::future::pending::<()>().await;
        }
        self.inner.chat(req).await
    }
}

fn hanging(plan: &roundtable_core::team::TeamPlan, hang_after: Option<u32>) -> HashMap<PeerId, Arc<dyn ChatModel>> {
    let calls = Arc::new(AtomicU32::new(0));
    plan.peers
        .iter()
        .map(|p| {
            let inner = roundtable_core::model::scripted::Scripted::new(
                "scripted:s",
                vec!["{peer} speaks ({n})".into()],
                HashMap::new(),
            );
            (p.id.clone(), Arc::new(Hanging { inner, calls: calls.clone(), hang_after }) as Arc<dyn ChatModel>)
        })
        .collect()
}

#[tokio::test]
async fn an_absent_peer_is_an_input_and_its_skipped_turns_replay() {
    let plan = plan_from(&(TRIO.to_string() + "[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.3\n"));
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let mut ms = hanging(&plan, None);
    ms.remove(&PeerId::from("cfo"));
    let presence: Arc<dyn Presence> = Arc::new(MemPresence::default());
    run_peers(log.clone(), &plan, ms, Some(presence), None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    let absent = entries.iter().find(|e| e.env.kind == Kind::Absent).expect("cfo was noticed absent");
    let r = replay(&entries, ReplayOptions::default()).await.unwrap();
    assert!(r.ok(), "{}", r.divergence.unwrap());
    assert!(r.inputs.contains(&absent.seq));
    assert_eq!(r.matched, entries.len());
}

#[tokio::test]
async fn a_session_cut_off_and_resumed_replays_like_one_run() {
    let plan = plan_from(TRIO);
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let first = tokio::spawn({
        let (log, plan, ms) = (log.clone(), plan.clone(), hanging(&plan, Some(4)));
        async move { run_peers(log, &plan, ms, None, None).await }
    });
    while log.read_all().await.unwrap().iter().filter(|e| e.env.kind == Kind::Message).count() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    run_peers(log.clone(), &plan, hanging(&plan, None), None, None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    let r = replay(&entries, ReplayOptions::default()).await.unwrap();
    assert!(r.ok(), "{}", r.divergence.unwrap());
    assert_eq!(r.matched, entries.len());
}

#[tokio::test]
async fn an_open_session_replays_up_to_where_it_was_cut() {
    let plan = plan_from(TRIO);
    let entries = run(&plan).await;
    // The first six envelopes: the task and five turns, no stop.
    let prefix: Vec<Entry> = entries.iter().take(6).cloned().collect();
    let r = replay(&prefix, quick()).await.unwrap();
    assert!(r.ok(), "{}", r.divergence.unwrap());
    assert_eq!(r.matched, 6);
    assert_eq!(r.stop_reason, None);
    assert!(!r.unrecorded_calls.is_empty(), "the peers wanted to go on past the recording");
}

const SIMULATED: &str = "[models.m]\nprovider = \"simulated\"\np_correct = 0.6\nsusceptibility = 0.4\nseed = 7\n";
const QUESTION: &str = "What is the result of 3+4*5+6-7*8? End your reply with 'Answer: <number>'.";

fn members(ids: &[&str]) -> String {
    ids.iter().map(|id| format!("[[peers]]\nid = \"{id}\"\nmodel = \"m\"\n")).collect()
}

/// A team file for every protocol, on a seeded simulated model.
fn protocol_teams() -> Vec<(&'static str, String)> {
    let tasks = "[[protocol.tasks]]\nid = \"a\"\ndescription = \"Compute 2+3*4.\"\n[[protocol.tasks]]\nid = \"b\"\ndescription = \"Compute 5*5-1.\"\n[[protocol.tasks]]\nid = \"c\"\ndescription = \"Compute 7*6+1.\"\ndepends_on = [\"a\", \"b\"]\n";
    let sources = "[[protocol.sources]]\npeer = \"planner\"\nreads = [\"task\"]\nwrites = \"plan\"\n[[protocol.sources]]\npeer = \"writer\"\nreads = [\"plan\"]\nwrites = \"draft\"\n[[protocol.sources]]\npeer = \"reviewer\"\nreads = [\"draft\"]\nwrites = \"review\"\n";
    let t = |peers: &[&str], protocol: &str| {
        format!("name = \"t\"\n{SIMULATED}{}[protocol]\n{protocol}\n[termination]\nmax_messages = 40\n", members(peers))
    };
    vec![
        ("round_robin", t(&["a", "b", "c"], "kind = \"round_robin\"\nrounds = 2")),
        ("debate", t(&["a", "b", "c"], "kind = \"debate\"")),
        ("proposer_critic", t(&["prop", "crit"], "kind = \"proposer_critic\"")),
        ("judged_debate", t(&["pro", "con", "judge"], "kind = \"judged_debate\"\njudge = \"judge\"")),
        ("jury", t(&["j1", "j2", "j3", "j4", "j5"], "kind = \"jury\"")),
        ("consensus", t(&["lead", "a", "b"], "kind = \"consensus\"\nproposer = \"lead\"\nthreshold = 0.6")),
        (
            "emergent",
            t(&["a", "b", "c", "d"], "kind = \"emergent\"\ncompare = \"answer\"\nthreshold = 0.99\nrounds = 4"),
        ),
        (
            "adversarial",
            t(&["prop", "devil", "x"], "kind = \"adversarial\"\nproposer = \"prop\"\nadvocate = \"devil\""),
        ),
        (
            "blackboard",
            t(
                &["planner", "writer", "reviewer"],
                &format!("kind = \"blackboard\"\nanswer_key = \"draft\"\ndone_phrase = \"APPROVED\"\n{sources}"),
            ),
        ),
        ("work_queue", t(&["w1", "w2", "w3"], &format!("kind = \"work_queue\"\n{tasks}"))),
        ("contract_net", t(&["ana", "bo"], &format!("kind = \"contract_net\"\n{tasks}"))),
        ("hybrid", t(&["lead", "a", "b", "c"], "kind = \"hybrid\"\nleader = \"lead\"\ndeadlock_rounds = 2")),
        ("conversation", t(&["a", "b", "c"], "kind = \"conversation\"\nfinish = \"majority\"")),
    ]
}

#[tokio::test]
async fn every_protocol_replays_with_no_divergence() {
    let teams = protocol_teams();
    let kinds: Vec<&str> = teams.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, roundtable_core::team::ProtocolSpec::KINDS, "a team for every protocol");
    let mut failed = Vec::new();
    for (kind, src) in teams {
        let plan = plan_from(&src);
        let log = new_log();
        open_session(log.as_ref(), &plan, QUESTION).await.unwrap();
        run_peers(log.clone(), &plan, roundtable_core::eval::offline_models(&plan, None), None, None).await.unwrap();
        let entries = log.read_all().await.unwrap();
        let report = replay(&entries, ReplayOptions::default()).await.unwrap();
        if let Some(d) = &report.divergence {
            failed.push(format!("{kind} ({} envelopes): {d}", entries.len()));
        } else {
            assert_eq!(report.matched, entries.len() - report.stragglers.len(), "{kind}");
        }
    }
    assert!(failed.is_empty(), "divergences:\n{}", failed.join("\n"));
}
