//! Peers of one process share one fold of the log and are woken only when their duty
//! may have changed. Every protocol and every example team that runs offline decides
//! the same with a shared fold as with peers that each fold the log themselves; the
//! wake sets never leave out a peer whose duty changed; and a peer that catches up
//! lazily sees the same history as one that folds every entry.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use roundtable_core::envelope::{Envelope, Kind, PeerId, SessionId};
use roundtable_core::log::{Entry, MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::{ChatModel, History, Transcript};
use roundtable_core::peer::{PeerConfig, PeerExtras, fold::SharedFold, run_peer_with};
use roundtable_core::runner::{open_session, run_peers_with, summarize};
use roundtable_core::session::{SessionState, SessionSummary};
use roundtable_core::team::{PlanEnv, TeamPlan, parse_team};

struct Dir(PathBuf);
impl PlanEnv for Dir {
    fn var_is_set(&self, _: &str) -> bool {
        true
    }
    fn read(&self, p: &str) -> Result<String, String> {
        std::fs::read_to_string(self.0.join(p)).map_err(|e| e.to_string())
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// Every example team that runs offline, by file name, with empty human seats given up
/// on quickly (nobody sits in them here).
fn offline_examples() -> Vec<(String, TeamPlan)> {
    let mut names: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let src = std::fs::read_to_string(examples().join(&name)).unwrap();
        let mut plan = parse_team(&name, &src, &Dir(examples())).unwrap_or_else(|e| panic!("{e}"));
        let models = plan.peers.iter().filter(|p| !p.is_human()).count();
        if roundtable_core::eval::offline_models(&plan, None).len() < models {
            continue;
        }
        for p in plan.peers.iter_mut().filter(|p| p.is_human()) {
            p.answer_within_ms = Some(100);
        }
        out.push((name, plan));
    }
    out
}

fn new_log(tag: &str) -> Arc<dyn SessionLog> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    log_of(&format!("wake-{tag}-{}", N.fetch_add(1, Ordering::SeqCst)))
}

fn log_of(session: &str) -> Arc<dyn SessionLog> {
    Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from(session)))))
}

/// How the peers of a run fold the log.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Folds {
    /// One fold shared by every peer (what the runner gives them).
    Shared,
    /// Each peer its own (as a peer run alone does).
    Own,
}

/// Run a session with fresh offline models, its peers folding the log as `folds` says.
/// Runs of one plan share the session id (so envelope ids and sealed votes are the
/// same), each with a blackboard and a work queue of its own.
async fn run_as(plan: &TeamPlan, folds: Folds) -> (Vec<Arc<Envelope>>, SessionSummary) {
    let topic = plan.topic.clone().unwrap_or_else(|| QUESTION.to_string());
    let log = log_of(&format!("wake-{}", plan.name));
    open_session(log.as_ref(), plan, &topic).await.unwrap();
    let models = roundtable_core::eval::offline_models(plan, None);
    let parts = roundtable_core::bus::MemParts::default();
    let extras = PeerExtras {
        board: Some(parts.blackboard(log.session())),
        queue: Some(parts.work_queue(log.session(), plan.protocol.queue_config().unwrap_or_default())),
        secret: Some(Arc::from(b"wake".to_vec())),
        ..PeerExtras::default()
    };
    let run = async {
        match folds {
            Folds::Shared => {
                // Given explicitly: the runner gives a conversation's peers none.
                let fold = SharedFold::new(log.clone(), Arc::new(plan.clone()), History::new());
                let extras = PeerExtras { fold: Some(fold), ..extras };
                run_peers_with(log.clone(), plan, models, None, None, extras).await
            }
            Folds::Own => run_own(log.clone(), plan, models, extras).await,
        }
    };
    let summary = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{} ({folds:?}) stops", plan.name))
        .expect("the session runs");
    let log = log.read_all().await.unwrap().into_iter().map(|e| e.env).collect();
    (log, summary)
}

/// Every peer with a model run alone, folding the log itself (one history shared, as
/// the runner shares it, but no shared fold).
async fn run_own(
    log: Arc<dyn SessionLog>,
    plan: &TeamPlan,
    models: HashMap<PeerId, Arc<dyn ChatModel>>,
    extras: PeerExtras,
) -> Result<SessionSummary, roundtable_core::log::LogError> {
    let history = History::new();
    let mut tasks = tokio::task::JoinSet::new();
    for p in &plan.peers {
        let Some(model) = models.get(&p.id) else { continue };
        let cfg = PeerConfig { me: p.id.clone(), log: log.clone(), model: model.clone(), presence: None, events: None };
        let master = extras.secret.as_ref().expect("a master secret");
        let extras = PeerExtras {
            history: Some(history.clone()),
            secret: Some(roundtable_core::runner::peer_secret(master, &p.id)),
            ..extras.clone()
        };
        assert!(extras.fold.is_none());
        tasks.spawn(run_peer_with(cfg, extras));
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a peer runs")?;
    }
    summarize(log.as_ref()).await
}

/// What a run decided, apart from what differs legitimately between two runs (times,
/// the order of concurrent contributions, which peer recorded a collective decision,
/// where the stop was decided): the stop, and every envelope's sender, step, kind,
/// addressee, text and JSON.
#[derive(Debug, PartialEq)]
struct Decided {
    stop_reason: Option<String>,
    answer: Option<String>,
    accepted: bool,
    messages: u64,
    rounds: u32,
    entries: Vec<String>,
}

fn decided(plan: &TeamPlan, log: &[Arc<Envelope>], s: &SessionSummary) -> Decided {
    let anyone = PeerId::from("*");
    // Workers race for a work queue's tasks: which one takes a task is not decided by
    // the log, in any two runs alike. The rest must be the same.
    let racing = plan.protocol.kind() == "work_queue";
    let mut entries: Vec<String> = log
        .iter()
        .map(|e| {
            let mut json = e.body.json.clone();
            if let Some(serde_json::Value::Object(j)) = json.as_mut() {
                // Where and when the stop was decided, and the prompt tokens counted
                // up to there, depend on the order concurrent contributions landed in.
                for k in ["decided_at", "elapsed_ms", "duration_ms", "tokens", "cost_usd"] {
                    j.remove(k);
                }
            }
            // A collective decision is recorded by whichever peer gets there first.
            let collective = e.id == roundtable_core::EnvelopeId::derive(&e.session, &anyone, &e.step);
            let from = if collective { "*" } else { e.from.as_str() };
            let json = json.map(|j| j.to_string()).unwrap_or_default();
            let line = format!("{from} {} {} {:?} {:?} {json}", e.step, e.kind, e.to, e.body.text);
            if racing { plan.peers.iter().fold(line, |l, p| l.replace(p.id.as_str(), "<worker>")) } else { line }
        })
        .collect();
    // Concurrent contributions (a round's answers, votes) land in either order, in
    // any two runs alike: the same envelopes, in any order.
    entries.sort();
    Decided {
        stop_reason: s.stop_reason.clone(),
        answer: s.final_answer.clone(),
        accepted: s.answer_accepted,
        messages: s.messages,
        rounds: s.rounds,
        entries,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_decides_the_same_with_a_shared_fold_and_with_folds_of_their_own() {
    let mut kinds = BTreeSet::new();
    for (name, plan) in offline_examples() {
        kinds.insert(plan.protocol.kind());
        let (shared_log, shared) = run_as(&plan, Folds::Shared).await;
        let (own_log, own) = run_as(&plan, Folds::Own).await;
        assert!(shared.stopped && own.stopped, "{name}");
        let (mut a, mut b) = (decided(&plan, &shared_log, &shared), decided(&plan, &own_log, &own));
        if plan.protocol.kind() == "conversation" {
            // A conversation batches mail by when it arrives (see its module docs): two
            // runs of one team may take different turns. Its decision must agree.
            (a.entries, b.entries, a.messages, b.messages) = (Vec::new(), Vec::new(), 0, 0);
        }
        if a != b {
            let diff: Vec<String> = a
                .entries
                .iter()
                .zip(&b.entries)
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .take(3)
                .map(|(i, (x, y))| format!("#{}: shared {x}\n      own    {y}", i + 1))
                .collect();
            panic!(
                "{name}: shared fold and own folds differ\nshared: {:?} {:?}\nown:    {:?} {:?}\n{}",
                a.stop_reason,
                a.answer,
                b.stop_reason,
                b.answer,
                diff.join("\n")
            );
        }
    }
    for kind in roundtable_core::team::ProtocolSpec::KINDS {
        assert!(kinds.contains(kind), "no offline example of {kind}");
    }
}

/// The logs of every offline example, run once.
async fn example_logs() -> Vec<(String, TeamPlan, Vec<Arc<Envelope>>)> {
    let mut out = Vec::new();
    for (name, plan) in offline_examples() {
        let (log, _) = run_as(&plan, Folds::Shared).await;
        out.push((name, plan, log));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_wakes_every_peer_whose_duty_it_changed() {
    for (name, plan, log) in example_logs().await {
        let plan = Arc::new(plan);
        let mut st = SessionState::new(plan.clone(), log[0].session.clone());
        // The clock is held still: duties the clock brings (a timeout) are the periodic
        // re-check's, not an entry's.
        let now = log[0].time_ms;
        let mut before: BTreeMap<PeerId, Vec<roundtable_core::protocol::Duty>> = BTreeMap::new();
        for (i, env) in log.iter().enumerate() {
            let entry = Entry { seq: i as u64 + 1, env: env.clone() };
            st.apply(&entry);
            let due = st.due(&entry, now);
            for p in &plan.peers {
                let duties = st.duties(&p.id, now);
                let changed = before.get(&p.id) != Some(&duties);
                if !duties.is_empty() && changed && !due.includes(&p.id) {
                    let steps = |d: &[roundtable_core::protocol::Duty]| {
                        d.iter().map(|d| d.step.to_string()).collect::<Vec<_>>()
                    };
                    let was = before.get(&p.id).map(|d| steps(d));
                    let log: Vec<String> = log.iter().map(|e| format!("{} {} {}", e.from, e.step, e.kind)).collect();
                    panic!(
                        "{name}: entry {} ({} {}) changed {}'s duty from {was:?} to {:?} without waking it \
                         (woken: {due:?}); the log: {log:?}",
                        i + 1,
                        env.from,
                        env.step,
                        p.id,
                        steps(&duties)
                    );
                }
                before.insert(p.id.clone(), duties);
            }
        }
    }
}

/// The precise wake sets are precise: in a ring, an entry wakes one peer, not all.
#[test]
fn a_ring_wakes_only_the_holder_of_the_turn() {
    let plan = plan(&format!(
        "name = \"ring\"\n[protocol]\nkind = \"round_robin\"\nrounds = 2\n{}{}",
        simulated(0.9, 0.0, 1),
        peers(&["a", "b", "c", "d"])
    ));
    let mut f = Fold::new(&plan, QUESTION);
    for (t, who) in ["a", "b", "c", "d", "a"].iter().enumerate() {
        let e = f.say(who, &format!("turn/{t}"), Kind::Message, "hello");
        let entry = Entry { seq: f.seq, env: e };
        let next = ["a", "b", "c", "d"][(t + 1) % 4];
        assert_eq!(
            f.st.due(&entry, 0),
            roundtable_core::protocol::Due::Peers(vec![PeerId::from(next)]),
            "after turn {t}"
        );
    }
}

/// A transcript that catches up with a history others append to, now and then, holds
/// what one fed every entry holds, for every peer of every example.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_catching_up_lazily_sees_the_same_history() {
    let in_context =
        |k: Kind| matches!(k, Kind::Task | Kind::Message | Kind::Proposal | Kind::Vote | Kind::Reveal | Kind::Verdict);
    for (name, plan, log) in example_logs().await {
        for every in [1usize, 3, 7, 1000] {
            let history = History::new();
            let mut lead = Transcript::over(history.clone());
            let mut eager: Vec<Transcript> = plan.peers.iter().map(|_| Transcript::over(History::new())).collect();
            let mut lazy: Vec<Transcript> = plan.peers.iter().map(|_| Transcript::over(history.clone())).collect();
            let visible = |p: &roundtable_core::team::PeerSpec, e: &Envelope| e.visible_to(&p.id, p.group.as_deref());
            for (i, env) in log.iter().enumerate().filter(|(_, e)| in_context(e.kind)) {
                lead.fold(env, false);
                for (p, t) in plan.peers.iter().zip(eager.iter_mut()) {
                    t.fold(env, visible(p, env));
                }
                if i % every == 0 {
                    for (p, t) in plan.peers.iter().zip(lazy.iter_mut()) {
                        t.catch_up(|e| visible(p, e));
                    }
                }
            }
            for ((p, e), l) in plan.peers.iter().zip(&eager).zip(lazy.iter_mut()) {
                l.catch_up(|x| visible(p, x));
                let ids = |t: &Transcript| t.iter(0..t.len()).map(|e| e.id.clone()).collect::<Vec<_>>();
                assert_eq!(ids(e), ids(l), "{name}: {} catching up every {every} entries", p.id);
                assert_eq!(e.tokens(0..e.len()), l.tokens(0..l.len()), "{name}: {}", p.id);
            }
        }
    }
}

/// A shared fold that a peer joins late (after the session stopped) still gives it
/// the whole state: it reads the stop and ends.
#[tokio::test]
async fn a_peer_joining_a_shared_fold_late_reads_the_state_folded_before_it() {
    let plan = plan(&format!(
        "name = \"ring\"\n[protocol]\nkind = \"round_robin\"\nrounds = 2\n{}{}",
        simulated(0.9, 0.0, 1),
        peers(&["a", "b"])
    ));
    let log = new_log("late");
    open_session(log.as_ref(), &plan, QUESTION).await.unwrap();
    let fold = SharedFold::new(log.clone(), Arc::new(plan.clone()), History::new());
    let extras = PeerExtras { fold: Some(fold.clone()), ..PeerExtras::default() };
    let models = roundtable_core::eval::offline_models(&plan, None);
    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        run_peers_with(log.clone(), &plan, models.clone(), None, None, extras.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(summary.stopped);
    let entries = log.read_all().await.unwrap().len() as u64;
    assert_eq!(fold.with(|st| (st.is_stopped(), st.last_seq)), (true, entries));
    // A peer that joins now ends at once, appending nothing.
    let cfg = PeerConfig { me: "a".into(), log: log.clone(), model: models["a"].clone(), presence: None, events: None };
    let exit = tokio::time::timeout(Duration::from_secs(10), run_peer_with(cfg, extras)).await.unwrap().unwrap();
    assert_eq!(exit, roundtable_core::peer::PeerExit::Stopped);
    assert_eq!(log.read_all().await.unwrap().len() as u64, entries);
}
