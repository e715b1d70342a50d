//! Sessions end to end, in memory: turn order, failures, limits, absence, resume.

use roundtable_core::team::NoEnv;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use roundtable_core::bus::{MemPresence, Presence};
use roundtable_core::log::{MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::scripted::Scripted;
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError};
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::team::{TeamPlan, parse_team};
use roundtable_core::{Kind, PeerId, SessionId};

fn plan(extra: &str) -> TeamPlan {
    let src = format!(
        r#"
name = "debate"
[models.s]
provider = "scripted"
replies = ["{{peer}} speaks ({{n}})"]
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
{extra}
"#
    );
    parse_team("t.toml", &src, &NoEnv).unwrap_or_else(|e| panic!("{e}"))
}

/// Counts calls, and can hang forever after a number of calls (to simulate a crash
/// mid-call).
struct Counting {
    inner: Scripted,
    calls: Arc<AtomicU32>,
    hang_after: Option<u32>,
}

#[async_trait]
impl ChatModel for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang_after.is_some_and(|h| n >= h) {
            futures::future::pending::<()>().await;
        }
        self.inner.chat(req).await
    }
}

fn models(plan: &TeamPlan, calls: &Arc<AtomicU32>, hang_after: Option<u32>) -> HashMap<PeerId, Arc<dyn ChatModel>> {
    let roundtable_core::team::ProviderSpec::Scripted { replies, .. } = &plan.models["s"].provider else { panic!() };
    plan.peers
        .iter()
        .map(|p| {
            let m: Arc<dyn ChatModel> = Arc::new(Counting {
                inner: Scripted::new("s", replies.clone(), HashMap::new()),
                calls: calls.clone(),
                hang_after,
            });
            (p.id.clone(), m)
        })
        .collect()
}

fn new_log() -> Arc<dyn SessionLog> {
    Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from("s1")))))
}

fn speakers(entries: &[roundtable_core::log::Entry]) -> Vec<String> {
    entries.iter().filter(|e| e.env.kind == Kind::Message).map(|e| format!("{}:{}", e.env.from, e.env.step)).collect()
}

#[tokio::test]
async fn round_robin_takes_turns_then_the_summarizer_closes() {
    let plan = plan("");
    let log = new_log();
    open_session(log.as_ref(), &plan, "Should we build it?").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let summary = run_peers(log.clone(), &plan, models(&plan, &calls, None), None, None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    assert_eq!(
        speakers(&entries),
        [
            "pm:turn/0",
            "eng:turn/1",
            "cfo:turn/2",
            "pm:turn/3",
            "eng:turn/4",
            "cfo:turn/5",
            "pm:turn/6",
            "eng:turn/7",
            "cfo:turn/8",
            "facilitator:final"
        ]
    );
    // Exactly one stop, last, with the summarizer's answer.
    let stops: Vec<_> = entries.iter().filter(|e| e.env.kind == Kind::Stop).collect();
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0].seq, entries.len() as u64);
    assert_eq!(summary.final_answer.as_deref(), Some("facilitator speaks (1)"));
    assert!(summary.stop_reason.as_deref().unwrap().starts_with("completed: 3 rounds"), "{:?}", summary.stop_reason);
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    assert_eq!((summary.messages, summary.calls), (10, 10));
    assert!(!summary.failed);
    // Each turn answers the previous one.
    assert_eq!(entries[2].env.parents, vec![entries[1].env.id.clone()]);
    // Lamport clocks increase along the log.
    assert!(entries.windows(2).all(|w| w[0].env.lamport < w[1].env.lamport));
}

/// Issue 12: a facilitator whose every call fails must not leave another peer's
/// message standing as the team's final answer, nor a session that looks successful.
#[tokio::test]
async fn issue_12_a_summarizer_that_fails_every_call_ends_failed_with_no_final_answer() {
    let plan = plan("");
    let log = new_log();
    open_session(log.as_ref(), &plan, "Should we build it?").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let mut ms = models(&plan, &calls, None);
    ms.insert(
        "facilitator".into(),
        Arc::new(Scripted::new("bad", vec!["!error auth rejected".into()], HashMap::new())),
    );
    let summary = run_peers(log.clone(), &plan, ms, None, None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    let last_turn = entries.iter().rev().find(|e| e.env.kind == Kind::Message).unwrap();
    assert_eq!(last_turn.env.step.as_ref(), "turn/8", "every turn was taken");
    let failure = entries.iter().find(|e| e.env.kind == Kind::Failure).expect("the final step failed");
    assert_eq!((failure.env.from.as_str(), failure.env.step.as_ref()), ("facilitator", "final"));
    assert!(summary.failed, "{:?}", summary.stop_reason);
    assert_eq!(summary.final_answer, None, "cfo's last turn is not the team's answer");
    let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).unwrap();
    assert_eq!(stop.env.parents, vec![failure.env.id.clone()], "the stop names the failed final step");
}

#[tokio::test]
async fn the_peers_of_a_process_hold_one_history_with_each_envelope_once() {
    let plan = plan("");
    let log = new_log();
    open_session(log.as_ref(), &plan, "Should we build it?").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let history = roundtable_core::model::History::new();
    let extras = roundtable_core::peer::PeerExtras { history: Some(history.clone()), ..Default::default() };
    let run =
        roundtable_core::runner::run_peers_with(log.clone(), &plan, models(&plan, &calls, None), None, None, extras);
    run.await.unwrap();
    let entries = log.read_all().await.unwrap();
    let in_context = entries.iter().filter(|e| matches!(e.env.kind, Kind::Task | Kind::Message)).count();
    // Four peers, one copy: the task and every message, appended once.
    assert_eq!(history.len(), in_context);
    assert_eq!(in_context, 11);
}

#[tokio::test]
async fn a_failing_peer_is_recorded_and_the_ring_moves_on() {
    let mut plan = plan("");
    // eng's model always fails.
    plan.models.insert(
        "bad".into(),
        roundtable_core::team::ModelSpec {
            provider: roundtable_core::team::ProviderSpec::Scripted {
                replies: vec!["!error server boom".into()],
                per_peer: Default::default(),
                summary_replies: Vec::new(),
                cycle: true,
                delay_ms: 0,
            },
            ..plan.models["s"].clone()
        },
    );
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let mut ms = models(&plan, &calls, None);
    ms.insert("eng".into(), Arc::new(Scripted::new("bad", vec!["!error server boom".into()], HashMap::new())));
    let summary = run_peers(log.clone(), &plan, ms, None, None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    let failures: Vec<_> = entries.iter().filter(|e| e.env.kind == Kind::Failure).collect();
    assert_eq!(failures.len(), 3, "one failure per eng turn");
    assert!(failures.iter().all(|f| f.env.from.as_str() == "eng" && f.env.body.text.contains("boom")));
    assert_eq!(failures[0].env.body.json.as_ref().unwrap()["error"], "provider error");
    assert!(summary.stopped);
    assert_eq!(summary.failures, 3);
    assert_eq!(summary.final_answer.as_deref(), Some("facilitator speaks (1)"));
}

#[tokio::test]
async fn a_budget_stops_before_the_call_that_would_exceed_it_with_the_best_answer() {
    let plan = plan("[budget]\nmax_calls = 4");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let summary = run_peers(log.clone(), &plan, models(&plan, &calls, None), None, None).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "the fifth call is never made");
    assert!(summary.stop_reason.as_deref().unwrap().starts_with("budget: 4 model calls"), "{:?}", summary.stop_reason);
    assert_eq!(summary.final_answer.as_deref(), Some("pm speaks (2)"), "the last contribution is the best so far");
}

/// Answers only once the session's wall-time budget is spent (it waits for the clock to
/// pass `deadline_ms`), and counts its calls: the call after it must be refused, however
/// fast or slow the machine runs.
struct SpendsTheBudget(Counting, u64);

#[async_trait]
impl ChatModel for SpendsTheBudget {
    fn name(&self) -> &str {
        "spends-the-budget"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        while roundtable_core::envelope::now_ms() <= self.1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.0.chat(req).await
    }
}

#[tokio::test]
async fn a_wall_time_budget_refuses_the_next_call_once_the_time_is_spent() {
    // A second: only a machine that stalls this long before the first call could
    // refuse it too.
    let plan = plan("[budget]\nmax_wall_secs = 1");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let task_ms = log.read(1, 1).await.unwrap()[0].env.time_ms;
    let calls = Arc::new(AtomicU32::new(0));
    let models = models(&plan, &calls, None)
        .into_keys()
        .map(|id| {
            let inner = Counting {
                inner: Scripted::new("s", vec!["{peer} speaks ({n})".into()], HashMap::new()),
                calls: calls.clone(),
                hang_after: None,
            };
            (id, Arc::new(SpendsTheBudget(inner, task_ms + 1000)) as Arc<dyn ChatModel>)
        })
        .collect();
    let summary = run_peers(log.clone(), &plan, models, None, None).await.unwrap();
    let reason = summary.stop_reason.unwrap();
    assert!(reason.starts_with("budget:") && reason.contains("wall time"), "{reason}");
    // The first call spent the budget: the second is never made.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let entries = log.read_all().await.unwrap();
    assert_eq!(speakers(&entries), ["pm:turn/0"]);
    assert_eq!(summary.final_answer.as_deref(), Some("pm speaks (1)"));
}

/// The tokens and cost the log shows after each call of an unbudgeted run.
async fn spent_after_each_call(plan: &TeamPlan) -> Vec<(u64, f64)> {
    let log = new_log();
    open_session(log.as_ref(), plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    run_peers(log.clone(), plan, models(plan, &calls, None), None, None).await.unwrap();
    let mut spent = Vec::new();
    let (mut tokens, mut cost) = (0, 0.0);
    for e in log.read_all().await.unwrap() {
        if let Some(u) = &e.env.usage {
            tokens += u.total_tokens();
            cost += u.cost_usd;
            spent.push((tokens, cost));
        }
    }
    spent
}

#[tokio::test]
async fn token_and_cost_budgets_stop_a_running_session_before_the_call_that_would_exceed_them() {
    let priced = |extra: &str| {
        let mut p = plan(extra);
        // A dollar per million tokens either way, so cost follows tokens.
        p.models.get_mut("s").unwrap().price =
            roundtable_core::model::Price { prompt_per_mtok: 1.0, completion_per_mtok: 1.0 };
        p
    };
    let spent = spent_after_each_call(&priced("")).await;
    assert_eq!(spent.len(), 10, "unbudgeted, all ten calls are made");
    // A limit of exactly what four calls spend: the fifth call's prompt does not fit.
    let (tokens4, cost4) = spent[3];
    for (extra, what) in [
        (format!("[budget]\nmax_tokens = {tokens4}"), "tokens used"),
        (format!("[budget]\nmax_cost_usd = {cost4}"), "spent"),
    ] {
        let plan = priced(&extra);
        let log = new_log();
        open_session(log.as_ref(), &plan, "topic").await.unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let summary = run_peers(log.clone(), &plan, models(&plan, &calls, None), None, None).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4, "{extra}");
        let reason = summary.stop_reason.unwrap();
        assert!(reason.starts_with("budget:") && reason.contains(what), "{extra}: {reason}");
        assert_eq!((summary.tokens, summary.calls), (tokens4, 4), "{extra}");
        let entries = log.read_all().await.unwrap();
        assert_eq!(speakers(&entries), ["pm:turn/0", "eng:turn/1", "cfo:turn/2", "pm:turn/3"], "{extra}");
        assert_eq!(summary.final_answer.as_deref(), Some("pm speaks (2)"), "the best answer so far");
    }
}

#[tokio::test]
async fn termination_conditions_stop_the_session_with_a_reason() {
    let plan = plan("[termination]\nmax_messages = 5");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let s = run_peers(log.clone(), &plan, models(&plan, &calls, None), None, None).await.unwrap();
    assert_eq!(s.stop_reason.as_deref(), Some("max_messages: 5 messages"));
    assert_eq!(s.messages, 5);

    let plan = plan_with_mention();
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let s = run_peers(log.clone(), &plan, models(&plan, &calls, None), None, None).await.unwrap();
    assert!(s.stop_reason.as_deref().unwrap().starts_with("text_mention: cfo wrote"), "{:?}", s.stop_reason);
}

fn plan_with_mention() -> TeamPlan {
    let mut p = plan("[termination]\ntext_mention = \"cfo\"");
    p.termination = roundtable_core::termination::Termination::TextMention("cfo speaks".into());
    p
}

// On a paused clock: absence follows the heartbeats, not the machine's scheduling.
#[tokio::test(start_paused = true)]
async fn an_absent_peer_is_noticed_recorded_once_and_skipped() {
    let plan = plan("[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.3");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let mut ms = models(&plan, &calls, None);
    ms.remove(&PeerId::from("cfo")); // cfo never runs
    let presence: Arc<dyn Presence> = Arc::new(MemPresence::default());
    let summary = run_peers(log.clone(), &plan, ms, Some(presence), None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    let absent: Vec<_> = entries.iter().filter(|e| e.env.kind == Kind::Absent).collect();
    assert_eq!(absent.len(), 1, "several peers noticed; one notice landed");
    assert_eq!(absent[0].env.body.json.as_ref().unwrap()["peer"], "cfo");
    assert!(speakers(&entries).iter().all(|s| !s.starts_with("cfo")));
    assert!(summary.stopped);
    assert_eq!(summary.final_answer.as_deref(), Some("facilitator speaks (1)"));
}

#[tokio::test]
async fn a_crashed_session_resumes_without_calling_models_again_for_logged_steps() {
    let plan = plan("");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    // First run: models hang after 4 calls; abort it once 4 messages are on the log.
    let calls1 = Arc::new(AtomicU32::new(0));
    let run = tokio::spawn({
        let (log, plan, ms) = (log.clone(), plan.clone(), models(&plan, &calls1, Some(4)));
        async move { run_peers(log, &plan, ms, None, None).await }
    });
    loop {
        let n = log.read_all().await.unwrap().iter().filter(|e| e.env.kind == Kind::Message).count();
        if n == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.abort();
    let _ = run.await;
    let before = log.read_all().await.unwrap();
    assert_eq!(calls1.load(Ordering::SeqCst), 5, "4 answered, the 5th hung mid-call");

    // Resume: the same log, fresh peers.
    let calls2 = Arc::new(AtomicU32::new(0));
    let summary = run_peers(log.clone(), &plan, models(&plan, &calls2, None), None, None).await.unwrap();
    assert_eq!(calls2.load(Ordering::SeqCst), 10 - 4, "only steps not on the log are called");
    let after = log.read_all().await.unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.env, b.env, "the prefix is untouched");
    }
    let mut ids: Vec<_> = after.iter().map(|e| e.env.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), after.len(), "no duplicates");
    assert_eq!(speakers(&after).len(), 10);
    // The ordinal comes from the log: pm's second turn says (2) in both runs.
    assert_eq!(summary.final_answer.as_deref(), Some("facilitator speaks (1)"));
    assert!(after.iter().any(|e| e.env.step.as_ref() == "turn/3" && e.env.body.text.as_ref() == "pm speaks (2)"));
}

#[tokio::test]
async fn when_every_model_fails_the_session_stops_early_with_the_last_error() {
    let plan = plan("");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let ms: HashMap<PeerId, Arc<dyn ChatModel>> = plan
        .peers
        .iter()
        .map(|p| {
            let m: Arc<dyn ChatModel> =
                Arc::new(Scripted::new("down", vec!["!error auth invalid key".into()], HashMap::new()));
            (p.id.clone(), m)
        })
        .collect();
    let s = run_peers(log.clone(), &plan, ms, None, None).await.unwrap();
    let reason = s.stop_reason.unwrap();
    assert!(reason.starts_with("failures: 4 model calls failed in a row"), "{reason}");
    assert!(reason.contains("authentication failed"), "{reason}");
    assert_eq!(s.failures, 4, "stopped after one failure per peer, not one per turn");
    assert!(s.failed, "the summary says the session failed");
}

/// A model that takes longer than the absence timeout.
struct Slow(Scripted);

#[async_trait]
impl ChatModel for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        tokio::time::sleep(Duration::from_millis(600)).await;
        self.0.chat(req).await
    }
}

// On a paused clock: absence follows the heartbeats, not the machine's scheduling.
#[tokio::test(start_paused = true)]
async fn a_peer_inside_a_long_model_call_is_not_taken_for_absent() {
    let plan = plan("[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.2");
    let mut plan = plan;
    let roundtable_core::team::ProtocolSpec::RoundRobin(rr) = &mut plan.protocol else { panic!() };
    rr.rounds = 1;
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let mut ms = models(&plan, &calls, None);
    let roundtable_core::team::ProviderSpec::Scripted { replies, .. } = &plan.models["s"].provider else { panic!() };
    ms.insert("pm".into(), Arc::new(Slow(Scripted::new("s", replies.clone(), HashMap::new()))));
    let presence: Arc<dyn Presence> = Arc::new(MemPresence::default());
    let summary = run_peers(log.clone(), &plan, ms, Some(presence), None).await.unwrap();
    let entries = log.read_all().await.unwrap();
    assert!(entries.iter().all(|e| e.env.kind != Kind::Absent), "a slow peer was declared absent");
    assert_eq!(speakers(&entries)[0], "pm:turn/0");
    assert!(summary.stopped);
}

/// Never answers: the session stays open while presence is watched.
struct Hangs;

#[async_trait]
impl ChatModel for Hangs {
    fn name(&self) -> &str {
        "hangs"
    }
    async fn chat(&self, _: &ChatRequest) -> Result<ChatResponse, ModelError> {
        futures::future::pending().await
    }
}

/// The whole process stops running for five seconds (the clock jumps with no task
/// run in between, as a suspended or starved process sees it): every peer is alive, and
/// none may be recorded absent for a silence that was the observer's own. On a paused
/// clock, so nothing here depends on how the machine schedules.
#[tokio::test(start_paused = true)]
async fn a_stall_of_the_observing_process_does_not_make_live_peers_absent() {
    let plan = plan("[presence]\nheartbeat_secs = 0.02\nabsent_after_secs = 0.3");
    let log = new_log();
    open_session(log.as_ref(), &plan, "topic").await.unwrap();
    let ms: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), Arc::new(Hangs) as Arc<dyn ChatModel>)).collect();
    let presence: Arc<dyn Presence> = Arc::new(MemPresence::default());
    let run = tokio::spawn({
        let (log, plan) = (log.clone(), plan.clone());
        async move { run_peers(log, &plan, ms, Some(presence), None).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let entries = log.read_all().await.unwrap();
    let absent: Vec<_> =
        entries.iter().filter(|e| e.env.kind == Kind::Absent).map(|e| e.env.body.text.clone()).collect();
    assert!(absent.is_empty(), "live peers recorded absent after a stall: {absent:?}");
    assert!(!run.is_finished(), "the session is still open, pm inside its call");
    run.abort();
}
