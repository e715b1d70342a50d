//! The conversation protocol and tools: inboxes, batching, quiescence, finishing rules,
//! loops stopped by no_progress, absent peers with mail, and side effects recorded once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::{MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError, Role};
use roundtable_core::peer::PeerExtras;
use roundtable_core::protocol::Action;
use roundtable_core::tool::{Outcome, Tool, ToolBox, ToolCall, ToolContext, ToolDef, ToolOutput, ToolResultBody};

/// One scripted answer: text and tool calls `(name, arguments)`.
#[derive(Clone, Debug)]
struct Act {
    text: &'static str,
    calls: Vec<(&'static str, serde_json::Value)>,
}

fn say(text: &'static str) -> Act {
    Act { text, calls: Vec::new() }
}

fn call(name: &'static str, args: serde_json::Value) -> Act {
    Act { text: "", calls: vec![(name, args)] }
}

fn calls(list: Vec<(&'static str, serde_json::Value)>) -> Act {
    Act { text: "", calls: list }
}

/// Answers each peer's n-th call with its n-th act (`ordinal`, from the log); past the
/// end, an empty answer (stay quiet). Records every request.
struct Acts {
    script: HashMap<String, Vec<Act>>,
    seen: Arc<Mutex<Vec<ChatRequest>>>,
}

#[async_trait]
impl ChatModel for Acts {
    fn name(&self) -> &str {
        "acts"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.seen.lock().unwrap().push(req.clone());
        let act = self.script.get(req.peer.as_str()).and_then(|l| l.get(req.ordinal as usize)).cloned();
        let act = act.unwrap_or(Act { text: "", calls: Vec::new() });
        let tool_calls = act
            .calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| ToolCall {
                id: format!("call_{}_{}_{i}", req.peer, req.ordinal),
                name: name.to_string(),
                arguments: args.to_string(),
            })
            .collect();
        Ok(ChatResponse {
            text: act.text.to_string(),
            model: "acts".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: None,
            tool_calls,
        })
    }
}

type Seen = Arc<Mutex<Vec<ChatRequest>>>;

fn acts(
    plan: &roundtable_core::team::TeamPlan,
    script: Vec<(&str, Vec<Act>)>,
) -> (HashMap<PeerId, Arc<dyn ChatModel>>, Seen) {
    let seen: Seen = Arc::default();
    let script: HashMap<String, Vec<Act>> = script.into_iter().map(|(p, a)| (p.to_string(), a)).collect();
    let model: Arc<dyn ChatModel> = Arc::new(Acts { script, seen: seen.clone() });
    (plan.peers.iter().map(|p| (p.id.clone(), model.clone())).collect(), seen)
}

fn team(peers_toml: &str, protocol: &str, extra: &str) -> roundtable_core::team::TeamPlan {
    plan(&format!(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n{peers_toml}\n[protocol]\nkind = \"conversation\"\n{protocol}\n{extra}"
    ))
}

fn mem_log() -> Arc<dyn SessionLog> {
    static N: AtomicU32 = AtomicU32::new(0);
    let s = SessionId::from(format!("conv-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    Arc::new(SharedMemLog(Arc::new(MemLog::new(s))))
}

fn texts(log: &[Arc<Envelope>], kind: Kind) -> Vec<String> {
    log.iter()
        .filter(|e| e.kind == kind && !e.body.text.is_empty())
        .map(|e| format!("{}: {}", e.from, e.body.text))
        .collect()
}

#[tokio::test]
async fn peers_message_each_other_by_name_and_a_finish_ends_the_session() {
    let plan = team(&peers(&["api", "tester"]), "start = [\"api\"]\nfinish = \"api\"", "");
    let (models, seen) = acts(
        &plan,
        vec![
            (
                "api",
                vec![
                    call("send", serde_json::json!({"to": "tester", "text": "POST /users is ready, please test it"})),
                    say(""),
                    call("finish", serde_json::json!({"answer": "POST /users shipped; tests pass"})),
                ],
            ),
            ("tester", vec![call("send", serde_json::json!({"to": "api", "text": "all 12 tests pass"})), say("")]),
        ],
    );
    let (log, summary) =
        run_with(&plan, "Design and ship POST /users", models, PeerExtras::default(), None, None).await;
    assert_eq!(summary.stop_reason.as_deref(), Some("finished: api proposed the answer"), "{log:#?}");
    assert_eq!(summary.final_answer.as_deref(), Some("POST /users shipped; tests pass"));
    let sends: Vec<(String, Recipient, String)> = log
        .iter()
        .filter(|e| e.kind == Kind::Message && e.step.contains("/send/"))
        .map(|e| (e.from.to_string(), e.to.clone(), e.body.text.to_string()))
        .collect();
    assert_eq!(
        sends,
        vec![
            ("api".into(), Recipient::Peer("tester".into()), "POST /users is ready, please test it".into()),
            ("tester".into(), Recipient::Peer("api".into()), "all 12 tests pass".into()),
        ]
    );
    // Every call is recorded before its result, and the result answers it.
    for (i, e) in log.iter().enumerate() {
        if e.kind == Kind::ToolResult {
            let parent = &e.parents[0];
            let at = log.iter().position(|c| &c.id == parent).expect("the call is on the log");
            assert!(at < i && log[at].kind == Kind::ToolCall);
        }
    }
    // The tester only ever saw the message meant for it, and the model was shown the
    // send's result after its call.
    let seen = seen.lock().unwrap();
    let tester_first = seen.iter().find(|r| r.peer.as_str() == "tester").unwrap();
    let shown: Vec<String> = tester_first.messages().map(|m| m.content.to_string()).collect();
    assert!(shown.iter().any(|m| m.contains("please test it")), "{shown:?}");
    let api_second = seen.iter().filter(|r| r.peer.as_str() == "api").nth(1).unwrap();
    let last = api_second.messages().last().unwrap();
    assert_eq!((last.role, last.content.as_ref()), (Role::Tool, "sent to tester"));
    assert!(api_second.tools.iter().any(|t| t.name == "finish"));
}

/// Issue 11: text a model returns together with tool calls was dropped. It is kept on
/// the first call's envelope, shown to other peers, and given back to the model.
#[tokio::test]
async fn text_said_along_with_tool_calls_is_kept_on_the_log_and_given_back() {
    let plan = team(&peers(&["api", "tester"]), "start = [\"api\"]\nfinish = \"api\"", "");
    let (models, seen) = acts(
        &plan,
        vec![
            (
                "api",
                vec![
                    Act {
                        text: "The endpoint is ready; asking the tester.",
                        calls: vec![("send", serde_json::json!({"to": "tester", "text": "please test POST /users"}))],
                    },
                    call("finish", serde_json::json!({"answer": "shipped"})),
                ],
            ),
            ("tester", vec![say("")]),
        ],
    );
    let (log, _) = run_with(&plan, "Ship POST /users", models, PeerExtras::default(), None, None).await;
    let first = log.iter().find(|e| e.kind == Kind::ToolCall && e.from.as_str() == "api").expect("a call");
    assert!(first.body.text.starts_with("The endpoint is ready; asking the tester.\n→ send("), "{}", first.body.text);
    let body: roundtable_core::tool::ToolCallBody = serde_json::from_value(first.body.json.clone().unwrap()).unwrap();
    assert_eq!(body.said, "The endpoint is ready; asking the tester.");
    // The model's next call in the turn carries its own words with its call.
    let seen = seen.lock().unwrap();
    let second = seen.iter().filter(|r| r.peer.as_str() == "api").nth(1).expect("a second call");
    let asked = second.tool_turns.iter().find(|m| !m.tool_calls.is_empty()).expect("the call");
    assert_eq!(asked.content.as_ref(), "The endpoint is ready; asking the tester.");
}

#[test]
fn a_turn_takes_everything_unread_at_once() {
    let plan = team(&peers(&["a", "b", "c"]), "start = [\"a\"]", "");
    let mut f = Fold::new(&plan, "topic");
    let steps = f.steps("c");
    assert!(steps.is_empty(), "c has no mail yet: {steps:?}");
    for (i, from) in ["a", "b", "a"].iter().enumerate() {
        let mut e =
            f.env(from, &format!("conv/{from}/{}/send/{i}", i + 1), Kind::Message, Body::text(format!("nudge {i}")));
        e.to = Recipient::Peer("c".into());
        f.push(e);
    }
    let duties = f.duties("c");
    assert_eq!(duties.len(), 1, "three nudges, one turn");
    let Action::Turn { read_upto, reply_to, .. } = &duties[0].action else { panic!("{duties:?}") };
    assert_eq!(*read_upto, f.seq, "the turn reads up to the last nudge");
    assert_eq!(*reply_to, Recipient::All, "two senders: a reply goes to everyone");
    assert_eq!(&*duties[0].step, "conv/c/1");
    // The turn lands: nothing unread, no further duty.
    let read = *read_upto;
    let mut turn =
        f.env("c", "conv/c/1", Kind::Message, Body::text("").with_json(serde_json::json!({"read_upto": read})));
    turn.to = Recipient::Peer("c".into());
    f.push(turn);
    assert!(f.steps("c").is_empty());
    // Mail that arrived while c was thinking is still unread, for a second turn.
    let mut late = f.env("b", "conv/b/2/send/0", Kind::Message, Body::text("late"));
    late.to = Recipient::Peer("c".into());
    f.push(late);
    assert_eq!(f.steps("c"), ["conv/c/2"]);
}

#[test]
fn group_messages_reach_the_group_and_broadcasts_everyone_else() {
    let peers = "[[peers]]\nid = \"a\"\nmodel = \"m\"\n[[peers]]\nid = \"b\"\nmodel = \"m\"\ngroup = \"ops\"\n[[peers]]\nid = \"c\"\nmodel = \"m\"\ngroup = \"ops\"\n[[peers]]\nid = \"d\"\nmodel = \"m\"\n";
    let plan = team(peers, "start = [\"a\"]", "");
    let mut f = Fold::new(&plan, "topic");
    let mut g = f.env("a", "conv/a/1/send/0", Kind::Message, Body::text("ops, deploy"));
    g.to = Recipient::Group("ops".into());
    f.push(g);
    assert_eq!(f.steps("b"), ["conv/b/1"]);
    assert_eq!(f.steps("c"), ["conv/c/1"]);
    assert!(f.steps("d").is_empty());
    let all = f.env("d", "conv/d/1/send/0", Kind::Message, Body::text("hello all"));
    f.push(all);
    assert!(f.steps("d").is_empty(), "a broadcast is not mail to its sender");
    assert_eq!(f.steps("a"), ["conv/a/1"], "a's task was never read, plus the broadcast");
}

#[test]
fn an_absent_peer_with_unread_mail_does_not_keep_the_team_from_quiescence() {
    let plan = team(&peers(&["a", "b"]), "start = [\"a\"]", "");
    let mut f = Fold::new(&plan, "topic");
    let mut m = f.env("a", "conv/a/1/send/0", Kind::Message, Body::text("b, check this"));
    m.to = Recipient::Peer("b".into());
    f.push(m);
    let mut t = f.env("a", "conv/a/1", Kind::Message, Body::text("").with_json(serde_json::json!({"read_upto": 1})));
    t.to = Recipient::Peer("a".into());
    f.push(t);
    assert_eq!(f.stop(), None, "b has mail to read");
    f.absent("b");
    let (reason, answer) = f.stop().expect("quiescent once b is absent");
    assert!(reason.starts_with("quiescent"), "{reason}");
    assert!(reason.contains("unread mail waits for absent b"), "{reason}");
    assert!(reason.contains("no answer was accepted"), "{reason}");
    assert_eq!(answer, None);
}

#[tokio::test]
async fn a_quiet_team_is_quiescent_with_no_answer() {
    let plan = team(&peers(&["a", "b"]), "", "");
    let (models, _) = acts(&plan, vec![("a", vec![say("")]), ("b", vec![say("")])]);
    let (log, summary) = run_with(&plan, "anything?", models, PeerExtras::default(), None, None).await;
    let reason = summary.stop_reason.unwrap();
    assert!(reason.starts_with("quiescent"), "{reason}");
    assert_eq!(summary.final_answer, None);
    let mut turns = steps_of(&log, Kind::Message);
    turns.sort();
    assert_eq!(turns, ["a:conv/a/1", "b:conv/b/1"], "one quiet turn each, then nothing");
}

#[tokio::test]
async fn the_finishing_rules_any_named_and_majority() {
    // any: the first proposal ends it.
    let plan = team(&peers(&["a", "b", "c"]), "finish = \"any\"", "");
    let (models, _) = acts(&plan, vec![("b", vec![call("finish", serde_json::json!({"answer": "42"}))])]);
    let (_, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    assert_eq!(
        (s.stop_reason.as_deref(), s.final_answer.as_deref()),
        (Some("finished: b proposed the answer"), Some("42"))
    );

    // A named peer: another's proposal does not end it.
    let plan = team(&peers(&["a", "b", "c"]), "finish = \"c\"", "");
    let (models, _) = acts(
        &plan,
        vec![
            ("a", vec![call("finish", serde_json::json!({"answer": "from a"}))]),
            (
                "c",
                vec![
                    call("send", serde_json::json!({"to": "a", "text": "hold on"})),
                    call("finish", serde_json::json!({"answer": "from c"})),
                ],
            ),
            // a answers c's message with nothing
        ],
    );
    let (_, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    assert_eq!(s.final_answer.as_deref(), Some("from c"), "{:?}", s.stop_reason);
    assert_eq!(s.stop_reason.as_deref(), Some("finished: c proposed the answer"));

    // Majority: one of three is not enough; quiescence without a majority accepts nothing.
    let plan = team(&peers(&["a", "b", "c"]), "finish = \"majority\"", "");
    let (models, _) = acts(&plan, vec![("a", vec![call("finish", serde_json::json!({"answer": "7"}))])]);
    let (_, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    assert!(s.stop_reason.as_deref().unwrap().starts_with("quiescent"), "{:?}", s.stop_reason);
    assert_eq!(s.final_answer, None);

    let plan = team(&peers(&["a", "b", "c"]), "finish = \"majority\"", "");
    let (models, _) = acts(
        &plan,
        vec![
            ("a", vec![call("finish", serde_json::json!({"answer": "7"}))]),
            ("c", vec![call("finish", serde_json::json!({"answer": "7"}))]),
        ],
    );
    let (_, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    assert_eq!(s.final_answer.as_deref(), Some("7"));
    assert!(s.stop_reason.as_deref().unwrap().starts_with("finished: 2 of 3 peers present"), "{:?}", s.stop_reason);
}

#[tokio::test]
async fn two_peers_bouncing_the_same_thing_are_stopped_by_no_progress() {
    let plan = team(&peers(&["a", "b"]), "start = [\"a\"]\nmax_turns = 50", "[termination]\nno_progress = 4\n");
    let ping: Vec<Act> =
        (0..50).map(|_| call("send", serde_json::json!({"to": "b", "text": "Are you sure?"}))).collect();
    let pong: Vec<Act> =
        (0..50).map(|_| call("send", serde_json::json!({"to": "a", "text": "Are you sure?"}))).collect();
    // Each peer sends, then its turn ends quietly: the acts list alternates call/quiet.
    let ping: Vec<Act> = ping.into_iter().flat_map(|a| [a, say("")]).collect();
    let pong: Vec<Act> = pong.into_iter().flat_map(|a| [a, say("")]).collect();
    let (models, _) = acts(&plan, vec![("a", ping), ("b", pong)]);
    let (log, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    let reason = s.stop_reason.unwrap();
    assert!(reason.starts_with("no_progress"), "{reason}");
    let sent = log.iter().filter(|e| e.step.contains("/send/")).count();
    assert!((5..=8).contains(&sent), "stopped after a few repeats, not 50 turns each: {sent}");
}

#[tokio::test]
async fn max_turns_bounds_every_peer_whatever_the_models_do() {
    let plan = team(&peers(&["a", "b"]), "start = [\"a\"]\nmax_turns = 3", "");
    let (models, _) = acts(
        &plan,
        vec![
            ("a", (0..20).map(|_| say("again")).collect()),
            ("b", (0..20).map(|_| say("again, differently")).collect()),
        ],
    );
    let (log, s) = run_with(&plan, "q", models, PeerExtras::default(), None, None).await;
    let turns = log.iter().filter(|e| e.kind == Kind::Message && !e.step.contains("/send/")).count();
    assert_eq!(turns, 6, "three turns each");
    let reason = s.stop_reason.unwrap();
    assert!(reason.contains("used all 3 turns"), "{reason}");
    assert_eq!(texts(&log, Kind::Message).len(), 6);
}

/// A tool that counts its runs and can hang (standing in for a process that dies).
struct Counter {
    def: ToolDef,
    runs: Arc<AtomicU32>,
    idempotent: bool,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Tool for Counter {
    fn def(&self) -> &ToolDef {
        &self.def
    }
    fn idempotent(&self) -> bool {
        self.idempotent
    }
    async fn call(&self, args: &serde_json::Value, _: &ToolContext) -> ToolOutput {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        ToolOutput::ok(format!("deployed {} (run {n})", args["version"]))
    }
}

fn counter(idempotent: bool) -> (ToolBox, Arc<AtomicU32>, Arc<std::sync::atomic::AtomicBool>) {
    let runs = Arc::new(AtomicU32::new(0));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let def = ToolDef {
        name: "deploy".into(),
        description: "Deploy a version".into(),
        parameters: serde_json::json!({"type": "object", "properties": {"version": {"type": "string"}}}),
    };
    let mut b = ToolBox::new();
    b.insert("deploy", Arc::new(Counter { def, runs: runs.clone(), idempotent, hang: hang.clone() }));
    (b, runs, hang)
}

fn tool_team(idempotent: bool) -> roundtable_core::team::TeamPlan {
    let _ = idempotent;
    plan(&format!(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[protocol]\nkind = \"conversation\"\nstart = [\"ops\"]\n[tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\nidempotent = {idempotent}\n"
    ))
}

fn results(log: &[Arc<Envelope>]) -> Vec<ToolResultBody> {
    log.iter()
        .filter(|e| e.kind == Kind::ToolResult)
        .map(|e| serde_json::from_value(e.body.json.clone().unwrap()).unwrap())
        .collect()
}

/// Run until the deploy call is on the log and the tool hangs, then drop the peers (as a
/// SIGKILL would), and resume on the same log.
async fn crash_in_the_middle_of_a_deploy(idempotent: bool) -> (Vec<Arc<Envelope>>, u32, Seen) {
    let plan = tool_team(idempotent);
    let script = || {
        vec![(
            "ops",
            vec![
                call("deploy", serde_json::json!({"version": "v2"})),
                call("finish", serde_json::json!({"answer": "v2 is out"})),
            ],
        )]
    };
    let (tools, runs, hang) = counter(idempotent);
    hang.store(true, Ordering::SeqCst);
    let log = mem_log();
    roundtable_core::runner::open_session(log.as_ref(), &plan, "ship v2").await.unwrap();
    let (models, _) = acts(&plan, script());
    let extras = PeerExtras { tools: Some(Arc::new(tools.clone())), ..Default::default() };
    let run = roundtable_core::runner::run_peers_with(log.clone(), &plan, models, None, None, extras);
    let cut = tokio::time::timeout(Duration::from_millis(500), run).await;
    assert!(cut.is_err(), "the deploy hangs, so the session cannot stop");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let before = log.read_all().await.unwrap();
    assert!(before.iter().any(|e| e.env.kind == Kind::ToolCall), "the call was recorded before it ran");
    assert!(!before.iter().any(|e| e.env.kind == Kind::ToolResult));

    hang.store(false, Ordering::SeqCst);
    let (models, seen) = acts(&plan, script());
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, summary) = run_with(&plan, "ship v2", models, extras, None, Some(log)).await;
    assert_eq!(summary.final_answer.as_deref(), Some("v2 is out"));
    (log, runs.load(Ordering::SeqCst), seen)
}

#[tokio::test]
async fn a_non_idempotent_call_interrupted_by_a_crash_is_never_run_again_and_its_outcome_is_unknown() {
    let (log, runs, seen) = crash_in_the_middle_of_a_deploy(false).await;
    assert_eq!(runs, 1, "the deploy ran at most once");
    let r = results(&log);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].tool, "deploy");
    assert_eq!(r[0].outcome, Outcome::Unknown);
    // The model was told, and was not asked again for the call it had already made.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one model call after the restart");
    assert_eq!(seen[0].ordinal, 1);
    let last = seen[0].messages().last().unwrap();
    assert_eq!(last.role, Role::Tool);
    assert!(last.content.contains("outcome unknown"), "{}", last.content);
}

#[tokio::test]
async fn an_idempotent_call_interrupted_by_a_crash_is_run_again_once() {
    let (log, runs, _) = crash_in_the_middle_of_a_deploy(true).await;
    assert_eq!(runs, 2);
    let r = results(&log);
    assert_eq!((r[0].outcome, r[0].output.as_str()), (Outcome::Ok, "deployed \"v2\" (run 2)"));
}

#[tokio::test]
async fn a_finished_call_is_never_run_again_on_resume() {
    let plan = tool_team(false);
    let (tools, runs, _) = counter(false);
    let log = mem_log();
    let (models, _) =
        acts(&plan, vec![("ops", vec![call("deploy", serde_json::json!({"version": "v3"})), say("done")])]);
    let extras = PeerExtras { tools: Some(Arc::new(tools.clone())), ..Default::default() };
    let (first, _) = run_with(&plan, "ship v3", models, extras, None, Some(log.clone())).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Resume from a copy of the log without its last entries (the turn and the stop).
    let cut = mem_log();
    let upto = first.iter().position(|e| e.kind == Kind::ToolResult).unwrap();
    for e in &first[..=upto] {
        let mut e = (**e).clone();
        let copy = cut.session().clone();
        e.session = copy.clone();
        // Ids are derived from the session: re-derive so the copy is a log of its own.
        e.id = roundtable_core::envelope::EnvelopeId::derive(&copy, &e.from, &e.step);
        cut.append(e).await.unwrap();
    }
    let (models, seen) =
        acts(&plan, vec![("ops", vec![call("deploy", serde_json::json!({"version": "v3"})), say("done")])]);
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "ship v3", models, extras, None, Some(cut)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the recorded call did not run again");
    assert_eq!(results(&log).len(), 1);
    assert_eq!(seen.lock().unwrap().len(), 1, "only the model call after the result");
    assert!(s.stopped);
}

#[tokio::test]
async fn refusals_are_recorded_and_told_to_the_model() {
    let plan = tool_team(false);
    let (tools, runs, _) = counter(false);
    let (models, seen) = acts(
        &plan,
        vec![(
            "ops",
            vec![
                calls(vec![
                    ("rm_rf", serde_json::json!({})),
                    ("send", serde_json::json!({"to": "nobody", "text": "hi"})),
                ]),
                Act { text: "", calls: vec![("deploy", serde_json::json!("not an object"))] },
                say("giving up"),
            ],
        )],
    );
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, _) = run_with(&plan, "q", models, extras, None, None).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing refused ran");
    let r = results(&log);
    assert_eq!(r.iter().map(|r| r.outcome).collect::<Vec<_>>(), [Outcome::Refused; 3]);
    assert!(r[0].output.contains("not granted"), "{}", r[0].output);
    assert!(r[1].output.contains("no peer or group is called `nobody`"), "{}", r[1].output);
    assert!(r[2].output.contains("JSON object"), "{}", r[2].output);
    let seen = seen.lock().unwrap();
    let told: Vec<String> =
        seen[1].messages().filter(|m| m.role == Role::Tool).map(|m| m.content.to_string()).collect();
    assert_eq!(told.len(), 2);
    assert!(told[0].starts_with("[refused]"));
}

#[tokio::test]
async fn tool_budgets_are_checked_before_every_call() {
    let plan = plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[protocol]\nkind = \"conversation\"\n[tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\n[budget]\nmax_tool_calls = 2\n",
    );
    let (tools, runs, _) = counter(false);
    let deploys: Vec<Act> = (0..5).map(|i| call("deploy", serde_json::json!({"version": format!("v{i}")}))).collect();
    let (models, _) = acts(&plan, vec![("ops", deploys)]);
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "q", models, extras, None, None).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let reason = s.stop_reason.unwrap();
    assert!(reason.contains("2 tool calls made, limit 2"), "{reason}");
    assert_eq!(results(&log).last().unwrap().outcome, Outcome::Refused);
}

/// An approver's model: answers every approval request with `answer`, or never
/// (`None`, standing in for a process that dies while it thinks).
struct Approver {
    answer: Option<&'static str>,
    asked: Arc<Mutex<Vec<ChatRequest>>>,
}

#[async_trait]
impl ChatModel for Approver {
    fn name(&self) -> &str {
        "approver"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.asked.lock().unwrap().push(req.clone());
        let Some(text) = self.answer else { return std::future::pending().await };
        Ok(ChatResponse {
            text: text.to_string(),
            model: "approver".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: None,
            tool_calls: Vec::new(),
        })
    }
}

fn approval_team() -> roundtable_core::team::TeamPlan {
    plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[[peers]]\nid = \"lead\"\nmodel = \"m\"\n[protocol]\nkind = \"conversation\"\nstart = [\"ops\"]\n[tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"lead\"\n",
    )
}

fn ops_script() -> Vec<(&'static str, Vec<Act>)> {
    vec![(
        "ops",
        vec![
            call("deploy", serde_json::json!({"version": "v4"})),
            call("finish", serde_json::json!({"answer": "tried"})),
        ],
    )]
}

/// The models: `ops` scripted, `lead` the approver.
fn approval_models(
    plan: &roundtable_core::team::TeamPlan,
    answer: Option<&'static str>,
) -> (HashMap<PeerId, Arc<dyn ChatModel>>, Seen, Seen) {
    let (mut models, seen) = acts(plan, ops_script());
    let asked: Seen = Arc::default();
    models.insert(PeerId::from("lead"), Arc::new(Approver { answer, asked: asked.clone() }));
    (models, seen, asked)
}

fn approvals(log: &[Arc<Envelope>]) -> (Vec<Arc<Envelope>>, Vec<Arc<Envelope>>) {
    let all: Vec<Arc<Envelope>> = log.iter().filter(|e| e.kind == Kind::Approval).cloned().collect();
    all.into_iter().partition(|e| !e.step.ends_with("/answer"))
}

#[tokio::test]
async fn an_approved_call_runs_once_after_the_approvers_answer() {
    let plan = approval_team();
    let (tools, runs, _) = counter(false);
    let (models, _, asked) = approval_models(&plan, Some(r#"{"approve": true, "reason": "routine"}"#));
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "ship v4", models, extras, None, None).await;
    assert_eq!(s.final_answer.as_deref(), Some("tried"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (requests, answers) = approvals(&log);
    assert_eq!((requests.len(), answers.len()), (1, 1));
    assert_eq!(requests[0].from.as_str(), "ops");
    assert_eq!(requests[0].to, Recipient::Peer(PeerId::from("lead")));
    let req: roundtable_core::tool::ApprovalRequest =
        serde_json::from_value(requests[0].body.json.clone().unwrap()).unwrap();
    assert_eq!((req.tool.as_str(), req.caller.as_str()), ("deploy", "ops"));
    assert!(req.arguments.contains("v4"), "{}", req.arguments);
    assert_eq!(answers[0].from.as_str(), "lead");
    // The request came before the run, the answer before the result.
    let pos = |p: &dyn Fn(&Envelope) -> bool| log.iter().position(|e| p(e)).unwrap();
    assert!(pos(&|e| e.kind == Kind::Approval && !e.step.ends_with("/answer")) < pos(&|e| e.kind == Kind::ToolResult));
    assert!(pos(&|e| e.kind == Kind::Approval && e.step.ends_with("/answer")) < pos(&|e| e.kind == Kind::ToolResult));
    let r = results(&log);
    assert_eq!(r[0].outcome, Outcome::Ok);
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), 1);
    let instruction = asked[0].instruction.as_deref().unwrap();
    assert!(instruction.contains("`deploy`") && instruction.contains("v4"), "{instruction}");
}

#[tokio::test]
async fn a_denied_call_does_not_run_and_the_model_is_told_why() {
    let plan = approval_team();
    let (tools, runs, _) = counter(false);
    let (models, seen, _) = approval_models(&plan, Some(r#"{"approve": false, "reason": "not on a Friday"}"#));
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, _) = run_with(&plan, "ship v4", models, extras, None, None).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a denied call never runs");
    let r = results(&log);
    assert_eq!(r[0].tool, "deploy");
    assert_eq!(r[0].outcome, Outcome::Denied);
    assert_eq!(r[0].output, "denied by lead: not on a Friday");
    let seen = seen.lock().unwrap();
    let next = seen.iter().find(|q| q.peer.as_str() == "ops" && q.ordinal == 1).expect("ops was called again");
    let last = next.messages().last().unwrap();
    assert_eq!(last.role, Role::Tool);
    assert!(last.content.contains("denied by lead: not on a Friday"), "{}", last.content);
}

#[tokio::test]
async fn a_restart_while_waiting_for_an_approval_does_not_ask_again() {
    let plan = approval_team();
    let (tools, runs, _) = counter(false);
    let log = mem_log();
    roundtable_core::runner::open_session(log.as_ref(), &plan, "ship v4").await.unwrap();
    let (models, _, asked) = approval_models(&plan, None);
    let extras = PeerExtras { tools: Some(Arc::new(tools.clone())), ..Default::default() };
    let run = roundtable_core::runner::run_peers_with(log.clone(), &plan, models, None, None, extras);
    // The approver never answers, so the session cannot stop; wait until it was asked.
    let cut = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::pin!(run);
        loop {
            tokio::select! {
                _ = &mut run => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if !asked.lock().unwrap().is_empty() {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the approver was asked");
    let before = log.read_all().await.unwrap();
    assert_eq!(before.iter().filter(|e| e.env.kind == Kind::Approval).count(), 1, "one request, no answer");
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    let (models, _, asked) = approval_models(&plan, Some(r#"{"approve": true, "reason": "fine"}"#));
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "ship v4", models, extras, None, Some(log)).await;
    assert!(s.stopped);
    let (requests, answers) = approvals(&log);
    assert_eq!((requests.len(), answers.len()), (1, 1), "the request was not made again");
    assert_eq!(asked.lock().unwrap().len(), 1, "the approver answered the recorded request");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "approved after the restart, run once");
    assert_eq!(results(&log)[0].outcome, Outcome::Ok);
}

/// A person in the approver's seat: asked the yes/no form (not the call's arguments as
/// fields), and their answers are no model calls, so a call budget the caller's own
/// model calls fill does not stop them.
#[tokio::test]
async fn a_person_approves_through_the_seat_and_their_answers_count_against_no_call_budget() {
    use roundtable_core::human::{Field, Form, Seat, check_approval};
    let plan = plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[[peers]]\nid = \"lead\"\nkind = \"human\"\n[protocol]\nkind = \"conversation\"\nstart = [\"ops\"]\n[tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"lead\"\n[budget]\nmax_calls = 2\n[budget.per_peer]\nmax_calls = 2\n",
    );
    let (tools, runs, _) = counter(false);
    // Two model calls for ops (three deploys in one answer, then finish), three answers
    // for the person: with a person's answers counted as calls, both limits would refuse.
    let (mut models, _) = acts(
        &plan,
        vec![(
            "ops",
            vec![
                calls(vec![
                    ("deploy", serde_json::json!({"version": "v1"})),
                    ("deploy", serde_json::json!({"version": "v2"})),
                    ("deploy", serde_json::json!({"version": "v3"})),
                ]),
                call("finish", serde_json::json!({"answer": "tried"})),
            ],
        )],
    );
    let (seat, mut asks) = Seat::new();
    models.insert(PeerId::from("lead"), Arc::new(seat));
    let person = tokio::spawn(async move {
        let mut forms = Vec::new();
        while let Some(q) = asks.recv().await {
            forms.push(q.form.clone());
            q.answer(check_approval(true, "routine").unwrap());
        }
        forms
    });
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "ship v1 to v3", models, extras, None, None).await;
    assert_eq!(s.final_answer.as_deref(), Some("tried"), "{:?}", s.stop_reason);
    assert_eq!(runs.load(Ordering::SeqCst), 3, "every approved call ran");
    let forms = person.await.unwrap();
    let approval_form = Form::Fields(vec![
        Field::YesNo { name: "approve".into() },
        Field::Text { name: "reason".into(), optional: true },
    ]);
    assert_eq!(forms, vec![approval_form; 3]);
    let (_, answers) = approvals(&log);
    assert_eq!(answers.len(), 3);
    for a in &answers {
        assert_eq!(a.from.as_str(), "lead");
        let u = a.usage.as_ref().unwrap();
        assert_eq!((&*u.model, u.calls), (roundtable_core::human::HUMAN_MODEL, 0), "a person is no model call");
        assert_eq!(a.body.json.as_ref().unwrap()["approve"], true);
    }
}

/// A person who does not answer within the approver's `answer_within_secs`: the caller
/// records the denial, the question is taken back from the seat, and what the seat's
/// peer records after it says the request was not answered (the first answer decides).
#[tokio::test]
async fn a_person_too_slow_to_approve_leaves_the_recorded_timeout_denial_standing() {
    use roundtable_core::human::Seat;
    let plan = plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n[[peers]]\nid = \"lead\"\nkind = \"human\"\nanswer_within_secs = 0.2\n[protocol]\nkind = \"conversation\"\nstart = [\"ops\"]\n[tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"lead\"\n",
    );
    let (tools, runs, _) = counter(false);
    let (mut models, _) = acts(&plan, ops_script());
    let (seat, mut asks) = Seat::new();
    models.insert(PeerId::from("lead"), Arc::new(seat));
    let log = mem_log();
    let person = tokio::spawn({
        let log = log.clone();
        async move {
            let q = asks.recv().await.expect("the person is asked");
            // The person is still reading when the caller's wait runs out.
            loop {
                let entries = log.read_all().await.unwrap();
                let denied = entries.iter().any(|e| {
                    e.env.kind == Kind::Approval && e.env.from.as_str() == "ops" && e.env.step.ends_with("/answer")
                });
                if denied {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(q);
        }
    });
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, s) = run_with(&plan, "ship v4", models, extras, None, Some(log)).await;
    person.await.unwrap();
    assert_eq!(s.final_answer.as_deref(), Some("tried"));
    assert_eq!(runs.load(Ordering::SeqCst), 0, "denied for want of an answer, never run");
    let r = results(&log);
    assert_eq!((r[0].outcome, r[0].output.as_str()), (Outcome::Denied, "denied: lead did not answer within 0.2 s"));
    let (_, answers) = approvals(&log);
    assert_eq!(answers[0].from.as_str(), "ops", "the caller's timeout denial is first");
    assert_eq!(answers[0].body.json.as_ref().unwrap()["timeout"], true);
    // The seat's peer may record its own answer after it (a question taken back is
    // not answered); it never approves.
    for late in &answers[1..] {
        assert_eq!(late.from.as_str(), "lead");
        let j = late.body.json.as_ref().unwrap();
        assert_eq!(j["approve"], false);
        assert!(j["reason"].as_str().unwrap().starts_with("not answered: "), "{j}");
    }
}

/// Each peer's first model call meets the other's (so both are inside their duties
/// before either asks), then calls its own tool, whose approver is the other peer;
/// approval requests are approved; anything else is a quiet answer.
struct Mutual {
    barrier: Arc<tokio::sync::Barrier>,
    turns: Mutex<HashMap<PeerId, u32>>,
    asked: Seen,
}

#[async_trait]
impl ChatModel for Mutual {
    fn name(&self) -> &str {
        "mutual"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let answer = |text: &str, tool_calls| ChatResponse {
            text: text.to_string(),
            model: "mutual".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: None,
            tool_calls,
        };
        if req.instruction.as_deref().is_some_and(|i| i.contains("asks you to approve")) {
            self.asked.lock().unwrap().push(req.clone());
            return Ok(answer(r#"{"approve": true, "reason": "fine by me"}"#, Vec::new()));
        }
        let n = {
            let mut turns = self.turns.lock().unwrap();
            let n = turns.entry(req.peer.clone()).or_default();
            *n += 1;
            *n
        };
        if n > 1 {
            return Ok(answer("", Vec::new()));
        }
        self.barrier.wait().await;
        let call = ToolCall {
            id: format!("call_{}", req.peer),
            name: format!("deploy_{}", req.peer),
            arguments: r#"{"version": "v5"}"#.into(),
        };
        Ok(answer("", vec![call]))
    }
}

#[tokio::test]
async fn two_peers_that_each_need_the_others_approval_answer_each_other_while_they_wait() {
    let plan = plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n\
         [[peers]]\nid = \"a\"\nmodel = \"m\"\ntools = [\"deploy_a\"]\n\
         [[peers]]\nid = \"b\"\nmodel = \"m\"\ntools = [\"deploy_b\"]\n\
         [protocol]\nkind = \"conversation\"\nstart = [\"a\", \"b\"]\n\
         [tools.deploy_a]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"b\"\n\
         [tools.deploy_b]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"a\"\n",
    );
    let mut tools = ToolBox::new();
    let mut runs = HashMap::new();
    for name in ["deploy_a", "deploy_b"] {
        let n = Arc::new(AtomicU32::new(0));
        let def = ToolDef {
            name: name.into(),
            description: "Deploy a version".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"version": {"type": "string"}}}),
        };
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tools.insert(name, Arc::new(Counter { def, runs: n.clone(), idempotent: false, hang }));
        runs.insert(name, n);
    }
    let asked: Seen = Arc::default();
    let model: Arc<dyn ChatModel> = Arc::new(Mutual {
        barrier: Arc::new(tokio::sync::Barrier::new(2)),
        turns: Mutex::default(),
        asked: asked.clone(),
    });
    let models = plan.peers.iter().map(|p| (p.id.clone(), model.clone())).collect();
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    // Before the fix each peer waited for the other's answer inside its own duty, and
    // this session never stopped (run_with fails after its deadline).
    let (log, summary) = run_with(&plan, "ship v5", models, extras, None, None).await;
    assert!(summary.stopped, "{summary:?}");
    for (name, n) in &runs {
        assert_eq!(n.load(Ordering::SeqCst), 1, "{name} ran once, approved");
    }
    let (requests, answers) = approvals(&log);
    assert_eq!((requests.len(), answers.len()), (2, 2), "{log:#?}");
    for req in &requests {
        let other = if req.from.as_str() == "a" { "b" } else { "a" };
        assert_eq!(req.to, Recipient::Peer(PeerId::from(other)));
        let answer = answers.iter().find(|a| *a.step == *format!("{}/answer", req.step)).expect("answered");
        assert_eq!(answer.from.as_str(), other, "the approver answered, not the caller");
        assert_eq!(answer.body.json.as_ref().unwrap()["approve"], true);
        let result =
            log.iter().position(|e| e.kind == Kind::ToolResult && e.from == req.from).expect("the call has a result");
        let answered = log.iter().position(|e| e.id == answer.id).unwrap();
        assert!(answered < result, "the answer came before the run");
    }
    assert!(results(&log).iter().all(|r| r.outcome == Outcome::Ok), "{:?}", results(&log));
    // Both peers were asked while each waited for its own answer.
    assert_eq!(asked.lock().unwrap().len(), 2);
}

/// An approver that answers only once the session has stopped (as a person whose seat
/// is slow, or a model call that outlasts the session, would), approving the call.
struct Late {
    log: Arc<dyn SessionLog>,
    /// The approver's model was called (it holds the request).
    asked: Arc<std::sync::atomic::AtomicBool>,
}

async fn wait_for(log: &Arc<dyn SessionLog>, what: impl Fn(&Envelope) -> bool) {
    loop {
        if log.read_all().await.unwrap().iter().any(|e| what(&e.env)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[async_trait]
impl ChatModel for Late {
    fn name(&self) -> &str {
        "late"
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let text = if req.peer.as_str() == "lead" {
            self.asked.store(true, Ordering::SeqCst);
            wait_for(&self.log, |e| e.kind == Kind::Stop).await;
            r#"{"approve": true, "reason": "looks fine (but too late)"}"#.to_string()
        } else {
            String::new()
        };
        let tool_calls = match req.peer.as_str() {
            "ops" if req.tool_turns.is_empty() => vec![ToolCall {
                id: "call_ops".into(),
                name: "deploy".into(),
                arguments: r#"{"version": "v6"}"#.into(),
            }],
            "pm" if req.tool_turns.is_empty() => {
                // The stop lands while ops waits for its approval and lead considers it.
                while !self.asked.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                vec![ToolCall {
                    id: "call_pm".into(),
                    name: "broadcast".into(),
                    arguments: r#"{"text": "Hold v6 until lead has looked."}"#.into(),
                }]
            }
            _ => Vec::new(),
        };
        Ok(ChatResponse {
            text,
            model: "late".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: None,
            tool_calls,
        })
    }
}

#[tokio::test]
async fn an_approval_answered_after_the_stop_decides_nothing_and_no_tool_runs() {
    let plan = plan(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n\
         [[peers]]\nid = \"ops\"\nmodel = \"m\"\ntools = [\"deploy\"]\n\
         [[peers]]\nid = \"pm\"\nmodel = \"m\"\n\
         [[peers]]\nid = \"lead\"\nmodel = \"m\"\n\
         [protocol]\nkind = \"conversation\"\nstart = [\"ops\", \"pm\"]\n\
         [tools.deploy]\nkind = \"command\"\nargv = [\"true\"]\napprove_by = \"lead\"\n\
         [termination]\nmax_messages = 1\n",
    );
    let (tools, runs, _) = counter(false);
    let log = mem_log();
    let model: Arc<dyn ChatModel> = Arc::new(Late { log: log.clone(), asked: Arc::default() });
    let models = plan.peers.iter().map(|p| (p.id.clone(), model.clone())).collect();
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let (log, summary) = run_with(&plan, "ship v6", models, extras, None, Some(log)).await;
    // A limit stops the session while ops waits for lead (a conversation's own finish
    // waits for turns under way; a limit does not).
    assert!(summary.stop_reason.as_deref().unwrap().starts_with("max_messages"), "{summary:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing runs after the stop, approved or not");

    let stop = log.iter().position(|e| e.kind == Kind::Stop).unwrap();
    let (requests, answers) = approvals(&log);
    assert_eq!((requests.len(), answers.len()), (1, 1), "{log:#?}");
    let answered = log.iter().position(|e| e.id == answers[0].id).unwrap();
    assert!(answered > stop, "the answer was written after the stop");
    assert_eq!(answers[0].from.as_str(), "lead");
    assert_eq!(answers[0].body.json.as_ref().unwrap()["approve"], true);
    // The caller was not told the late answer as a decision: the call did not run
    // because the session stopped, which is neither an approval nor a denial.
    let r: Vec<ToolResultBody> = results(&log).into_iter().filter(|r| r.tool == "deploy").collect();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].outcome, Outcome::Refused, "{r:?}");
    assert_eq!(r[0].output, "not run: the session stopped before lead answered");
    // What was written after the stop is at most one envelope per peer, so the log
    // exports and imports as a session.
    let lines: Vec<(usize, Envelope)> = log.iter().enumerate().map(|(i, e)| (i + 1, (**e).clone())).collect();
    let roster = |task: &Envelope| -> Result<std::collections::BTreeSet<PeerId>, String> {
        Ok(roundtable_core::session::plan_of(task)?.peer_ids().into_iter().collect())
    };
    roundtable_core::log::jsonl::check_session("s.jsonl", &lines, roster).expect("a consistent session");
}

/// The approver of `approval_team`: says it was asked, then answers (approving) only
/// once the session has stopped.
struct AfterStop {
    log: Arc<dyn SessionLog>,
    asked: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl ChatModel for AfterStop {
    fn name(&self) -> &str {
        "after-stop"
    }
    async fn chat(&self, _: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.asked.store(true, Ordering::SeqCst);
        wait_for(&self.log, |e| e.kind == Kind::Stop).await;
        Ok(ChatResponse {
            text: r#"{"approve": true, "reason": "late"}"#.into(),
            model: "after-stop".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: None,
            tool_calls: Vec::new(),
        })
    }
}

/// The stop and an approving answer land together while the caller waits (as when it
/// reads the log after both were written): the answer came after the stop, so the call
/// does not run.
#[tokio::test]
async fn an_approval_behind_the_stop_on_the_log_is_not_taken_as_a_decision() {
    let plan = approval_team();
    let (tools, runs, _) = counter(false);
    let log = mem_log();
    roundtable_core::runner::open_session(log.as_ref(), &plan, "ship v4").await.unwrap();
    let (mut models, _, _) = approval_models(&plan, None);
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    models.insert(PeerId::from("lead"), Arc::new(AfterStop { log: log.clone(), asked: asked.clone() }));
    let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
    let run = tokio::spawn({
        let (log, plan) = (log.clone(), plan.clone());
        async move { roundtable_core::runner::run_peers_with(log, &plan, models, None, None, extras).await }
    });
    while !asked.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Both appended with no await in between that lets a peer run (one thread).
    let s = log.session().clone();
    let stop_id = roundtable_core::envelope::EnvelopeId::derive(&s, &PeerId::from("*"), "stop");
    let stop = Envelope::with_id(
        stop_id,
        &s,
        &PeerId::from("lead"),
        Arc::from("stop"),
        Kind::Stop,
        Recipient::All,
        Body::text("").with_json(serde_json::json!({"reason": "max_wall_secs: stopped", "accepted": false})),
    );
    let request = log.read_all().await.unwrap().into_iter().find(|e| e.env.kind == Kind::Approval).unwrap().env;
    let mut answer = Envelope::new(
        &s,
        &PeerId::from("lead"),
        format!("{}/answer", request.step),
        Kind::Approval,
        Recipient::Peer(PeerId::from("ops")),
        Body::text("approved, late")
            .with_json(serde_json::json!({"approve": true, "reason": "late", "timeout": false})),
    );
    answer.parents = vec![request.id.clone()];
    log.append(stop).await.unwrap();
    log.append(answer).await.unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.expect("the session ends").unwrap().unwrap();
    assert!(summary.stopped);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "an approval after the stop runs nothing");
    let entries: Vec<Arc<Envelope>> = log.read_all().await.unwrap().into_iter().map(|e| e.env).collect();
    let r = results(&entries);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].outcome, r[0].output.as_str()),
        (Outcome::Refused, "not run: the session stopped before lead answered")
    );
}
