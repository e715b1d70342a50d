//! The synthetic test suite, and what the log says about it.
//!
//! A suite is a pure function of its parameters, which travel in the session's task
//! envelope: every worker (and the report) derives the same tests, outcomes and
//! dependencies from them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use roundtable_core::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::Entry;
use roundtable_core::session::opening_envelope;
use serde::{Deserialize, Serialize};

/// The team name in the task envelope (what `roundtable sessions` shows).
pub(crate) const TEAM: &str = "distributed-testing";

/// Everything that defines a run, as recorded in the task envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Suite {
    pub(crate) tests: usize,
    /// The workers' ids.
    pub(crate) workers: Vec<String>,
    /// How long each synthetic test runs.
    pub(crate) duration_ms: u64,
    /// Share of the tests that fail.
    pub(crate) fail_rate: f64,
    /// Share of the tests that depend on one or two earlier tests.
    pub(crate) dep_rate: f64,
    pub(crate) seed: u64,
    /// The queue's lease: a claim not acked or extended within it is redelivered.
    pub(crate) lease_ms: u64,
    pub(crate) max_deliver: u32,
    pub(crate) heartbeat_ms: u64,
    pub(crate) absent_after_ms: u64,
}

/// How far back a dependency may be.
const DEP_WINDOW: usize = 64;

fn mix(mut z: u64) -> u64 {
    // splitmix64
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Suite {
    fn draw(&self, i: usize, salt: u64) -> u64 {
        mix(self.seed ^ mix((i as u64).wrapping_mul(0x1000_0000_01b3) ^ salt))
    }

    fn unit(&self, i: usize, salt: u64) -> f64 {
        (self.draw(i, salt) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn id(i: usize) -> String {
        format!("t{i:05}")
    }

    pub(crate) fn index(&self, id: &str) -> Option<usize> {
        id.strip_prefix('t')?.parse().ok().filter(|&i| i < self.tests)
    }

    /// Whether test `i` fails when it runs (the same on every run of it).
    pub(crate) fn fails(&self, i: usize) -> bool {
        self.unit(i, 1) < self.fail_rate
    }

    /// The earlier tests test `i` depends on.
    pub(crate) fn deps(&self, i: usize) -> Vec<usize> {
        if i == 0 || self.unit(i, 2) >= self.dep_rate {
            return Vec::new();
        }
        let window = i.min(DEP_WINDOW) as u64;
        let first = i - 1 - (self.draw(i, 3) % window) as usize;
        let mut deps = vec![first];
        if self.unit(i, 4) < 0.5 {
            let second = i - 1 - (self.draw(i, 5) % window) as usize;
            if second != first {
                deps.push(second);
            }
        }
        deps
    }

    /// For each test, the tests that depend on it.
    pub(crate) fn dependents(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.tests];
        for i in 0..self.tests {
            for d in self.deps(i) {
                out[d].push(i);
            }
        }
        out
    }

    pub(crate) fn task_envelope(&self, session: &SessionId) -> Envelope {
        let text = format!(
            "Run {} synthetic tests of {} ms on {} workers through one shared queue",
            self.tests,
            self.duration_ms,
            self.workers.len()
        );
        opening_envelope(session, &text, serde_json::json!({ "team_name": TEAM, "worktest": self }))
    }

    pub(crate) fn of_task(env: &Envelope) -> Option<Suite> {
        if env.kind != Kind::Task {
            return None;
        }
        serde_json::from_value(env.body.json.as_ref()?.get("worktest")?.clone()).ok()
    }
}

/// An envelope whose id is the same whoever writes it, so that the first one wins.
pub(crate) fn collective(
    session: &SessionId,
    me: &PeerId,
    step: String,
    kind: Kind,
    to: Recipient,
    body: Body,
) -> Envelope {
    let mut env = Envelope::new(session, me, step, kind, to, body);
    env.id = EnvelopeId::derive(session, &PeerId::from("*"), &env.step);
    env
}

/// How a test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Pass,
    Fail,
    /// Not run: a test it depends on did not pass.
    Skip,
    /// Ran out of deliveries without a result (a dead letter).
    Dead,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Dead => "dead",
        }
    }
}

/// What the log says about a run, folded entry by entry (by every worker, and by the
/// report).
pub(crate) struct Fold {
    pub(crate) suite: Option<Arc<Suite>>,
    pub(crate) last_seq: u64,
    /// The first result of each test, and the id of its envelope.
    pub(crate) result: Vec<Option<(Outcome, EnvelopeId)>>,
    /// Result envelopes per test (more than one: a test completed twice).
    pub(crate) results: Vec<u32>,
    /// The latest claim of each test: who, which delivery.
    pub(crate) holder: Vec<Option<(PeerId, u32)>>,
    /// Peers that claimed each test.
    pub(crate) claimers: Vec<HashSet<PeerId>>,
    pub(crate) resolved: usize,
    pub(crate) queued: bool,
    pub(crate) absent: HashSet<PeerId>,
    pub(crate) absences: HashMap<PeerId, u32>,
    pub(crate) stop: Option<Arc<Envelope>>,
    pub(crate) task_ms: u64,
    pub(crate) claims: u64,
    pub(crate) defers: u64,
    pub(crate) notices: u64,
    pub(crate) abandoned: u64,
    pub(crate) joins: u64,
    pub(crate) absent_notices: u64,
    pub(crate) rejected: u64,
}

impl Fold {
    pub(crate) fn new() -> Self {
        Fold {
            suite: None,
            last_seq: 0,
            result: Vec::new(),
            results: Vec::new(),
            holder: Vec::new(),
            claimers: Vec::new(),
            resolved: 0,
            queued: false,
            absent: HashSet::new(),
            absences: HashMap::new(),
            stop: None,
            task_ms: 0,
            claims: 0,
            defers: 0,
            notices: 0,
            abandoned: 0,
            joins: 0,
            absent_notices: 0,
            rejected: 0,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.suite.as_ref().is_some_and(|s| self.resolved == s.tests)
    }

    /// The tests `i` depends on: all passed (`Some(true)`), one did not (`Some(false)`),
    /// or not all known yet (`None`).
    pub(crate) fn deps_passed(&self, suite: &Suite, i: usize) -> Option<bool> {
        let mut all = true;
        for d in suite.deps(i) {
            match &self.result[d] {
                Some((Outcome::Pass, _)) => {}
                Some(_) => return Some(false),
                None => all = false,
            }
        }
        all.then_some(true)
    }

    pub(crate) fn apply(&mut self, entry: &Entry) {
        let env = &entry.env;
        self.last_seq = self.last_seq.max(entry.seq);
        if self.suite.is_none() {
            if let Some(suite) = Suite::of_task(env) {
                let n = suite.tests;
                self.result = vec![None; n];
                self.results = vec![0; n];
                self.holder = vec![None; n];
                self.claimers = vec![HashSet::new(); n];
                self.task_ms = env.time_ms;
                self.suite = Some(Arc::new(suite));
            }
            return;
        }
        let Some(suite) = self.suite.clone() else { return };
        let json = env.body.json.as_ref();
        let op = json.and_then(|j| j.get("op")).and_then(|v| v.as_str()).unwrap_or("");
        let task = json.and_then(|j| j.get("task")).and_then(|v| v.as_str()).and_then(|t| suite.index(t));
        let delivery = json.and_then(|j| j.get("delivery")).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        match (env.kind, op, task) {
            (Kind::Work, "claim", Some(i)) => {
                self.claims += 1;
                self.holder[i] = Some((env.from.clone(), delivery));
                self.claimers[i].insert(env.from.clone());
            }
            (Kind::Work, "result" | "dead", Some(i)) => {
                let outcome = json
                    .and_then(|j| j.get("outcome"))
                    .and_then(|v| serde_json::from_value::<Outcome>(v.clone()).ok())
                    .unwrap_or(Outcome::Dead);
                if op == "result" {
                    self.results[i] += 1;
                }
                if self.result[i].is_none() {
                    self.result[i] = Some((outcome, env.id.clone()));
                    self.resolved += 1;
                }
            }
            (Kind::Work, "defer", Some(_)) => self.defers += 1,
            (Kind::Work, "abandon", Some(_)) => self.abandoned += 1,
            (Kind::Work, "dependency_failed", _) => self.notices += 1,
            (Kind::Work, "queued", _) => self.queued = true,
            (Kind::Absent, _, _) => {
                if let Some(p) = json.and_then(|j| j.get("peer")).and_then(|v| v.as_str()) {
                    let p = PeerId::from(p);
                    *self.absences.entry(p.clone()).or_default() += 1;
                    self.absent.insert(p);
                    self.absent_notices += 1;
                }
            }
            (Kind::Join, _, _) => {
                self.absent.remove(&env.from);
                self.joins += 1;
            }
            (Kind::Stop, _, _) if self.stop.is_none() => self.stop = Some(env.clone()),
            (Kind::Failure, _, _) => self.rejected += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(tests: usize) -> Suite {
        Suite {
            tests,
            workers: vec!["p00".into()],
            duration_ms: 1,
            fail_rate: 0.1,
            dep_rate: 0.3,
            seed: 7,
            lease_ms: 1000,
            max_deliver: 10,
            heartbeat_ms: 100,
            absent_after_ms: 1000,
        }
    }

    #[test]
    fn a_suite_is_a_function_of_its_parameters() {
        let s = suite(2000);
        let failing = (0..2000).filter(|&i| s.fails(i)).count();
        assert!((150..250).contains(&failing), "about 10% fail: {failing}");
        let dependent = (0..2000).filter(|&i| !s.deps(i).is_empty()).count();
        assert!((500..700).contains(&dependent), "about 30% depend: {dependent}");
        for i in 0..2000 {
            for d in s.deps(i) {
                assert!(d < i && i - d <= DEP_WINDOW, "{d} before {i}");
            }
        }
        assert_eq!(s.deps(17), suite(2000).deps(17));
        assert_eq!(s.index(&Suite::id(42)), Some(42));
        assert_eq!(s.index("t99999"), None);
        let env = s.task_envelope(&SessionId::from("x"));
        assert_eq!(Suite::of_task(&env), Some(s));
    }
}
