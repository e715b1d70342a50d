//! Helpers for protocol tests: team files, a fold of hand-made logs, in-memory runs.

#![allow(dead_code, unreachable_pub)]

pub use roundtable_core::team::NoEnv;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use roundtable_core::bus::Presence;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::eval::offline_models;
use roundtable_core::log::{Entry, MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind};
use roundtable_core::peer::PeerExtras;
use roundtable_core::protocol::{Action, Duty};
use roundtable_core::runner::{open_session, run_peers_with};
use roundtable_core::session::{SessionState, SessionSummary, task_envelope};
use roundtable_core::team::{TeamPlan, parse_team};

pub fn plan(src: &str) -> TeamPlan {
    parse_team("t.toml", src, &NoEnv).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// `[[peers]]` entries on model `m`.
pub fn peers(ids: &[&str]) -> String {
    ids.iter().map(|id| format!("[[peers]]\nid = \"{id}\"\nmodel = \"m\"\n")).collect()
}

/// A simulated model `m`.
pub fn simulated(p: f64, s: f64, seed: u64) -> String {
    format!("[models.m]\nprovider = \"simulated\"\np_correct = {p}\nsusceptibility = {s}\nseed = {seed}\n")
}

/// A scripted model `m` with per-peer replies (TOML literal strings, so JSON needs no
/// escaping), each list starting over when it runs out.
pub fn scripted(per_peer: &[(&str, &[&str])]) -> String {
    let mut s = "[models.m]\nprovider = \"scripted\"\ncycle = true\nreplies = [\"(no script)\"]\n[models.m.per_peer]\n"
        .to_string();
    for (peer, replies) in per_peer {
        let list: Vec<String> = replies.iter().map(|r| format!("'''{r}'''")).collect();
        s.push_str(&format!("{peer} = [{}]\n", list.join(", ")));
    }
    s
}

pub const QUESTION: &str = "What is the result of 3+4*5+6-7*8? End your reply with 'Answer: <number>'.";
pub const RIGHT: &str = "-27";

/// A log folded by hand: append envelopes, read duties and the stop decision.
pub struct Fold {
    pub st: SessionState,
    pub session: SessionId,
    pub seq: u64,
    pub log: Vec<Arc<Envelope>>,
}

impl Fold {
    pub fn new(plan: &TeamPlan, topic: &str) -> Self {
        let session = SessionId::from("fold");
        let mut f = Fold {
            st: SessionState::new(Arc::new(plan.clone()), session.clone()),
            session: session.clone(),
            seq: 0,
            log: Vec::new(),
        };
        f.push(task_envelope(&session, plan, topic));
        f
    }

    pub fn push(&mut self, mut env: Envelope) -> Arc<Envelope> {
        self.seq += 1;
        env.lamport = self.seq;
        let env = Arc::new(env);
        self.st.apply(&Entry { seq: self.seq, env: env.clone() });
        self.log.push(env.clone());
        env
    }

    pub fn env(&self, from: &str, step: &str, kind: Kind, body: Body) -> Envelope {
        Envelope::new(&self.session, &PeerId::from(from), step.to_string(), kind, Recipient::All, body)
    }

    pub fn say(&mut self, from: &str, step: &str, kind: Kind, text: &str) -> Arc<Envelope> {
        let e = self.env(from, step, kind, Body::text(text));
        self.push(e)
    }

    pub fn say_json(&mut self, from: &str, step: &str, kind: Kind, json: serde_json::Value) -> Arc<Envelope> {
        let e = self.env(from, step, kind, Body::text(json.to_string()).with_json(json));
        self.push(e)
    }

    pub fn fail(&mut self, from: &str, step: &str) -> Arc<Envelope> {
        let mut e = self.env(
            from,
            step,
            Kind::Failure,
            Body::text("model call failed").with_json(serde_json::json!({"error": "provider error"})),
        );
        e.usage = Some(roundtable_core::Usage { model: "m".into(), calls: 1, ..Default::default() });
        self.push(e)
    }

    pub fn absent(&mut self, peer: &str) -> Arc<Envelope> {
        let d = self.st.absent_duty(&PeerId::from(peer));
        self.perform(peer, &d)
    }

    /// Append what a post duty appends (as the given peer).
    pub fn perform(&mut self, peer: &str, d: &Duty) -> Arc<Envelope> {
        let Action::Post { body } = &d.action else { panic!("not a post: {d:?}") };
        let mut e =
            Envelope::new(&self.session, &PeerId::from(peer), d.step.clone(), d.kind, d.to.clone(), body.clone())
                .with_round(d.round)
                .with_parents(d.parents.clone());
        e.id = d.envelope_id(&self.session, &PeerId::from(peer));
        self.push(e)
    }

    pub fn duties(&self, peer: &str) -> Vec<Duty> {
        self.st.duties(&PeerId::from(peer), roundtable_core::envelope::now_ms())
    }

    /// The steps of a peer's duties, the stop excluded.
    pub fn steps(&self, peer: &str) -> Vec<String> {
        self.duties(peer).iter().filter(|d| d.kind != Kind::Stop).map(|d| d.step.to_string()).collect()
    }

    /// The stop decision: (reason, answer).
    pub fn stop(&self) -> Option<(String, Option<String>)> {
        self.st.stop_decision(roundtable_core::envelope::now_ms()).map(|d| (d.reason, d.answer.map(|a| a.to_string())))
    }

    /// Record every collective post (rejections, announcements, awards) any peer owes.
    pub fn settle(&mut self, peers: &[&str]) {
        loop {
            let mut did = false;
            for p in peers {
                for d in self.duties(p) {
                    if d.collective && d.kind != Kind::Stop && matches!(d.action, Action::Post { .. }) {
                        self.perform(p, &d);
                        did = true;
                    }
                }
            }
            if !did {
                return;
            }
        }
    }
}

/// One model call as a model saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub peer: String,
    pub step: String,
    pub system: String,
    pub messages: Vec<(Option<String>, String)>,
    pub instruction: String,
    pub prompt_tokens: u64,
}

/// Records every call, then answers with the inner model.
pub struct Recording {
    pub inner: Arc<dyn ChatModel>,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

#[async_trait]
impl ChatModel for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        self.calls.lock().unwrap().push(Call {
            peer: req.peer.to_string(),
            step: req.step.to_string(),
            system: req.system.as_deref().unwrap_or("").to_string(),
            // The conversation without the instruction (kept apart below).
            messages: req
                .messages()
                .take(req.message_count() - usize::from(req.instruction.is_some()))
                .map(|m| (m.name.map(|n| n.to_string()), m.content.to_string()))
                .collect(),
            instruction: req.instruction.as_deref().unwrap_or("").to_string(),
            prompt_tokens: req.estimated_prompt_tokens(),
        });
        self.inner.chat(req).await
    }
}

/// Fails the calls a predicate picks, answers the rest with the inner model.
pub struct FailWhen {
    pub inner: Arc<dyn ChatModel>,
    pub when: Box<dyn Fn(&ChatRequest) -> bool + Send + Sync>,
}

#[async_trait]
impl ChatModel for FailWhen {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        if (self.when)(req) {
            return Err(ModelError::new(ModelErrorKind::Server, "boom").with_status(500));
        }
        self.inner.chat(req).await
    }
}

/// Offline models for a plan, every one wrapped to record its calls.
pub fn recorded(plan: &TeamPlan) -> (HashMap<PeerId, Arc<dyn ChatModel>>, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let models = offline_models(plan, None)
        .into_iter()
        .map(|(p, m)| (p, Arc::new(Recording { inner: m, calls: calls.clone() }) as Arc<dyn ChatModel>))
        .collect();
    (models, calls)
}

/// Run a session in memory to its stop (failing the test after 30 s).
pub async fn run_with(
    plan: &TeamPlan,
    topic: &str,
    models: HashMap<PeerId, Arc<dyn ChatModel>>,
    extras: PeerExtras,
    presence: Option<Arc<dyn Presence>>,
    log: Option<Arc<dyn SessionLog>>,
) -> (Vec<Arc<Envelope>>, SessionSummary) {
    let log = log.unwrap_or_else(|| {
        let s = SessionId::from(format!("t-{}", rand_id()));
        let l: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(s))));
        l
    });
    if log.last_seq().await.unwrap() == 0 {
        open_session(log.as_ref(), plan, topic).await.unwrap();
    }
    let run = run_peers_with(log.clone(), plan, models, presence, None, extras);
    let summary =
        tokio::time::timeout(Duration::from_secs(30), run).await.expect("the session stops").expect("the session runs");
    let entries = log.read_all().await.unwrap().into_iter().map(|e| e.env).collect();
    (entries, summary)
}

pub async fn run(plan: &TeamPlan, topic: &str) -> (Vec<Arc<Envelope>>, SessionSummary) {
    run_with(plan, topic, offline_models(plan, None), PeerExtras::default(), None, None).await
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst) + std::process::id() as u64 * 1_000_000
}

/// `from:step` of every envelope of a kind.
pub fn steps_of(log: &[Arc<Envelope>], kind: Kind) -> Vec<String> {
    log.iter().filter(|e| e.kind == kind).map(|e| format!("{}:{}", e.from, e.step)).collect()
}

pub fn stop_of(log: &[Arc<Envelope>]) -> Arc<Envelope> {
    let stops: Vec<_> = log.iter().filter(|e| e.kind == Kind::Stop).collect();
    assert_eq!(stops.len(), 1, "exactly one stop");
    assert!(Arc::ptr_eq(stops[0], log.last().unwrap()), "the stop is last");
    stops[0].clone()
}
