//! The suite of a run, and what the log says about it.
//!
//! A suite is a pure function of what the session's task envelope says: either the
//! parameters of a synthetic suite (every worker, and the report, derives the same
//! tests, durations, outcomes and dependencies from them), or the digest, ids,
//! dependencies and areas of a suite file, whose commands each worker reads from its own
//! copy (see [`super::file`]).

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
    /// The median of how long a synthetic test runs.
    pub(crate) duration_ms: u64,
    /// The spread of synthetic durations: the σ of a log-normal around the median (0:
    /// every test takes the median).
    #[serde(default)]
    pub(crate) spread: f64,
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
    /// A suite file's tests (no commands: those stay in each worker's copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file: Option<FileMeta>,
}

/// What the task says of a suite file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileMeta {
    /// The file's name, for messages.
    pub(crate) name: String,
    /// `sha256:<hex>` of the file: a worker whose copy differs refuses to run.
    pub(crate) digest: String,
    pub(crate) ids: Vec<String>,
    pub(crate) deps: Vec<Vec<usize>>,
    pub(crate) areas: Vec<String>,
    #[serde(skip)]
    pub(crate) index: HashMap<String, usize>,
}

impl FileMeta {
    pub(crate) fn of(local: &super::file::LocalSuite) -> FileMeta {
        let mut meta = FileMeta {
            name: local.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            digest: local.digest.clone(),
            ids: local.tests.iter().map(|t| t.id.clone()).collect(),
            deps: local.tests.iter().map(|t| t.deps.clone()).collect(),
            areas: local.tests.iter().map(|t| t.area.clone()).collect(),
            index: HashMap::new(),
        };
        meta.reindex();
        meta
    }

    fn reindex(&mut self) {
        self.index = self.ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
    }

    /// Whether the task's lists are consistent (the wire is not trusted).
    fn is_consistent(&self, tests: usize) -> bool {
        self.ids.len() == tests
            && self.deps.len() == tests
            && self.areas.len() == tests
            && self.index.len() == tests
            && self.deps.iter().enumerate().all(|(i, d)| d.iter().all(|&j| j < tests && j != i))
    }
}

/// How many areas the synthetic tests are spread over.
const SYNTHETIC_AREAS: u64 = 25;

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

    pub(crate) fn id(&self, i: usize) -> String {
        match &self.file {
            Some(f) => f.ids[i].clone(),
            None => format!("t{i:05}"),
        }
    }

    pub(crate) fn index(&self, id: &str) -> Option<usize> {
        match &self.file {
            Some(f) => f.index.get(id).copied(),
            None => id.strip_prefix('t')?.parse().ok().filter(|&i| i < self.tests),
        }
    }

    /// Whether synthetic test `i` fails when it runs (the same on every run of it).
    pub(crate) fn fails(&self, i: usize) -> bool {
        self.unit(i, 1) < self.fail_rate
    }

    /// How long synthetic test `i` runs: log-normal around the median, the same on every
    /// run of it.
    pub(crate) fn duration_of(&self, i: usize) -> u64 {
        if self.spread <= 0.0 {
            return self.duration_ms;
        }
        // Box–Muller: a standard normal from two uniforms (the first kept off zero).
        let (u1, u2) = (1.0 - self.unit(i, 7), self.unit(i, 8));
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let ms = self.duration_ms as f64 * (self.spread * z).exp();
        ms.round().clamp(0.0, 3_600_000.0) as u64
    }

    /// The area of test `i` (what a failure's likely-affected tests share).
    pub(crate) fn area(&self, i: usize) -> String {
        match &self.file {
            Some(f) => f.areas[i].clone(),
            None => format!("area{}", self.draw(i, 6) % SYNTHETIC_AREAS),
        }
    }

    /// The tests test `i` depends on.
    pub(crate) fn deps(&self, i: usize) -> Vec<usize> {
        if let Some(f) = &self.file {
            return f.deps[i].clone();
        }
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
        let text = match &self.file {
            Some(f) => format!(
                "Run the {} tests of suite file {} ({}) on {} workers through one shared queue",
                self.tests,
                f.name,
                f.digest,
                self.workers.len()
            ),
            None => format!(
                "Run {} synthetic tests of {} ms (median) on {} workers through one shared queue",
                self.tests,
                self.duration_ms,
                self.workers.len()
            ),
        };
        opening_envelope(session, &text, serde_json::json!({ "team_name": TEAM, "worktest": self }))
    }

    pub(crate) fn of_task(env: &Envelope) -> Option<Suite> {
        if env.kind != Kind::Task {
            return None;
        }
        let mut suite: Suite = serde_json::from_value(env.body.json.as_ref()?.get("worktest")?.clone()).ok()?;
        if let Some(f) = &mut suite.file {
            f.reindex();
            if !f.is_consistent(suite.tests) {
                return None;
            }
        }
        Some(suite)
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// Which queue a claim came from (its lane): every test is on the main queue; a test named likely
/// affected by a failure also gets a copy on the priority queue, which workers drain
/// first. Only one copy runs (see the worker's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    Main,
    Priority,
}

impl Lane {
    pub(crate) fn of(json: Option<&serde_json::Value>) -> Lane {
        match json.and_then(|j| j.get("queue")).and_then(|v| v.as_str()) {
            Some("priority") => Lane::Priority,
            _ => Lane::Main,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Lane::Main => "main",
            Lane::Priority => "priority",
        }
    }
}

/// A claim on the log not yet settled by a result, a defer, an abandon or a yield.
#[derive(Clone, Debug)]
pub(crate) struct OpenClaim {
    pub(crate) peer: PeerId,
    pub(crate) lane: Lane,
    pub(crate) seq: u64,
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
    /// Claims of each test not yet settled: who, which copy, where on the log.
    pub(crate) open: Vec<Vec<OpenClaim>>,
    /// Tests named likely affected by a failure (they go to the priority copy queue).
    pub(crate) prioritized: Vec<bool>,
    /// Prioritized tests without a result.
    pub(crate) pending_priority: usize,
    pub(crate) prioritize_envelopes: u64,
    pub(crate) affected_notices: u64,
    pub(crate) yields: u64,
    /// Assignments the coordinator took back from a silent worker.
    pub(crate) reassigned: u64,
    /// Results that timed out, and that could not start (first results only).
    pub(crate) timed_out: usize,
    pub(crate) errors: usize,
    /// The run time of the first results, summed.
    pub(crate) ran_ms: u64,
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
            open: Vec::new(),
            prioritized: Vec::new(),
            pending_priority: 0,
            prioritize_envelopes: 0,
            affected_notices: 0,
            yields: 0,
            reassigned: 0,
            timed_out: 0,
            errors: 0,
            ran_ms: 0,
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
                self.open = vec![Vec::new(); n];
                self.prioritized = vec![false; n];
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
        let lane = Lane::of(json);
        match (env.kind, op, task) {
            (Kind::Work, "claim", Some(i)) => {
                self.claims += 1;
                // A coordinator's assignment names the worker it went to.
                let who = json
                    .and_then(|j| j.get("worker"))
                    .and_then(|v| v.as_str())
                    .map_or_else(|| env.from.clone(), PeerId::from);
                self.holder[i] = Some((who.clone(), delivery));
                self.claimers[i].insert(who);
                // A later delivery of the same copy: the earlier lease ran out.
                self.open[i].retain(|c| c.lane != lane);
                self.open[i].push(OpenClaim { peer: env.from.clone(), lane, seq: entry.seq });
            }
            (Kind::Work, "defer" | "abandon" | "yield", Some(i)) => {
                self.open[i].retain(|c| !(c.peer == env.from && c.lane == lane));
                match op {
                    "defer" => self.defers += 1,
                    "abandon" => self.abandoned += 1,
                    _ => self.yields += 1,
                }
            }
            (Kind::Work, "prioritize", _) => {
                self.prioritize_envelopes += 1;
                let named = json.and_then(|j| j.get("tests")).and_then(|v| v.as_array());
                for t in named.into_iter().flatten() {
                    if let Some(j) = t.as_str().and_then(|t| suite.index(t))
                        && !self.prioritized[j]
                    {
                        self.prioritized[j] = true;
                        if self.result[j].is_none() {
                            self.pending_priority += 1;
                        }
                    }
                }
            }
            (Kind::Work, "affected", _) => self.affected_notices += 1,
            (Kind::Work, "reassign", Some(_)) => self.reassigned += 1,
            (Kind::Work, "result" | "dead", Some(i)) => {
                let outcome = json
                    .and_then(|j| j.get("outcome"))
                    .and_then(|v| serde_json::from_value::<Outcome>(v.clone()).ok())
                    .unwrap_or(Outcome::Dead);
                if op == "result" {
                    self.results[i] += 1;
                }
                self.open[i].clear();
                if self.result[i].is_none() {
                    self.result[i] = Some((outcome, env.id.clone()));
                    self.resolved += 1;
                    if self.prioritized[i] {
                        self.pending_priority -= 1;
                    }
                    match json.and_then(|j| j.get("status")).and_then(|v| v.as_str()) {
                        Some("timed_out") => self.timed_out += 1,
                        Some("error") => self.errors += 1,
                        _ => {}
                    }
                    if outcome != Outcome::Skip {
                        self.ran_ms += json.and_then(|j| j.get("duration_ms")).and_then(|v| v.as_u64()).unwrap_or(0);
                    }
                }
            }
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
            spread: 0.0,
            file: None,
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
        assert_eq!(s.index(&s.id(42)), Some(42));
        assert_eq!(s.index("t99999"), None);
        let env = s.task_envelope(&SessionId::from("x"));
        assert_eq!(Suite::of_task(&env), Some(s));
    }

    #[test]
    fn synthetic_durations_are_log_normal_around_the_median() {
        let mut s = suite(4000);
        s.duration_ms = 100;
        assert!((0..50).all(|i| s.duration_of(i) == 100), "no spread: the median every time");
        s.spread = 0.5;
        let mut d: Vec<u64> = (0..4000).map(|i| s.duration_of(i)).collect();
        assert_eq!(d[..10], (0..10).map(|i| s.duration_of(i)).collect::<Vec<_>>()[..], "seeded");
        d.sort_unstable();
        let median = d[2000];
        assert!((90..=110).contains(&median), "median {median}");
        // exp(0.5 × 1.2816) ≈ 1.90: the 90th percentile of a log-normal with σ = 0.5.
        let p90 = d[3600];
        assert!((175..=205).contains(&p90), "p90 {p90}");
        assert!(d[0] < 50 && d[3999] > 300, "a spread, not a constant: {} .. {}", d[0], d[3999]);
    }
}
