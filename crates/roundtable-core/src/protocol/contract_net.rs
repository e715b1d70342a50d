//! Contract-net negotiation: a task is announced, peers bid with their load and
//! capability, and the award is decided from the bids on the log by a fixed rule; used
//! to balance work across peers.
//!
//! - **Steps.** Tasks are announced one at a time, in queue order (dependencies
//!   first, then `priority`, then file order). For attempt `n` of task `t`:
//!   `cnet/{t}/a{n}/announce` (collective), every eligible member's
//!   `cnet/{t}/a{n}/bid`, then `cnet/{t}/a{n}/award` (collective). The next task is
//!   announced once the award is on the log; the winner does its task meanwhile and
//!   records `cnet/{t}/a{n}/result` (collective: one result per award; only the
//!   awardee may record it, see `may_record`).
//! - **Bids.** A bid carries the bidder's `load` — the total `size` of the tasks
//!   awarded to it so far, read from the log — and its `capability` for the task:
//!   with `bids = "skills"` (the default) the share of the task's `needs` found in the
//!   bidder's declared `capabilities`, posted without a model call; with
//!   `bids = "model"` the bidder's model rates itself, answering JSON
//!   `{"capability": 0..1}`. Every peer recomputes load and skills from the log and
//!   the plan; a model-rated bid without a number is malformed: it is rejected (a
//!   collective failure envelope `…/bid/{peer}/malformed`) and does not count.
//! - **Award.** Highest capability, then lowest load, then team order. A member
//!   with no bid (failed, malformed, absent) is not considered; a task with no valid
//!   bid fails.
//! - **Work.** The winner calls its model with the task and its dependencies'
//!   results once they are done (a task whose dependency failed is skipped). When the
//!   work fails, or the winner is absent before recording a result, the task is
//!   announced again without the peers that failed it, up to `max_reannounce` times;
//!   then it fails.
//! - **Decision.** When every task is resolved the session ends; the answer is the
//!   result of `answer_task`, or the results of the tasks nothing depends on.
//! - **Absent peers.** They do not bid and are not waited for.
//!
//! Team-file keys: `[[protocol.tasks]]` (`id`, `description`, `depends_on`,
//! `priority`, `needs`, `size`), `members` (every peer), `capabilities` (a table
//! `peer = ["skill", …]`), `bids` (`skills` | `model`), `max_reannounce` (2),
//! `answer_task`, `instruction`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::rounds::team_order;
use super::work_queue::{queue_order, tasks_answer};
use super::{Duty, Facts, Finish, Reducer, View, rejection};
use crate::envelope::{Body, EnvelopeId, Kind, PeerId};
use crate::log::Entry;
use crate::team::{BidMode, ContractNetSpec};
use crate::termination::Signals;

#[derive(Clone, Debug, PartialEq)]
enum Status {
    Waiting,
    /// Announced (once the announcement is on the log); bids by peer: `Some(capability)`
    /// or `None` for failed or malformed.
    Bidding {
        attempt: u32,
        announced: bool,
        bids: BTreeMap<PeerId, Option<f64>>,
    },
    Awarded {
        to: PeerId,
        attempt: u32,
    },
    Done {
        text: Arc<str>,
        id: EnvelopeId,
        by: PeerId,
    },
    Failed {
        why: String,
    },
}

pub struct ContractNet {
    spec: ContractNetSpec,
    status: Vec<Status>,
    /// Tasks to announce, in order; the front one is being negotiated.
    queue: VecDeque<usize>,
    /// Peers that failed each task (not asked again for it).
    excluded: Vec<BTreeSet<PeerId>>,
    /// Load: total size of the tasks awarded to each peer.
    load: BTreeMap<PeerId, u32>,
    pending: Vec<(String, PeerId, EnvelopeId)>,
}

impl ContractNet {
    pub fn new(spec: ContractNetSpec) -> Self {
        let n = spec.tasks.len();
        let queue = queue_order(&spec.tasks).into();
        ContractNet {
            spec,
            status: vec![Status::Waiting; n],
            queue,
            excluded: vec![BTreeSet::new(); n],
            load: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.spec.tasks.iter().position(|t| t.id == id)
    }

    fn prefix(&self, i: usize, attempt: u32) -> String {
        format!("cnet/{}/a{attempt}", self.spec.tasks[i].id)
    }

    /// The share of a task's needs a peer declared.
    pub fn skill_match(&self, i: usize, p: &PeerId) -> f64 {
        let needs = &self.spec.tasks[i].needs;
        if needs.is_empty() {
            return 1.0;
        }
        let skills = self.spec.capabilities.get(p).map(Vec::as_slice).unwrap_or(&[]);
        needs.iter().filter(|n| skills.contains(n)).count() as f64 / needs.len() as f64
    }

    fn eligible(&self, i: usize, facts: &Facts<'_>) -> Vec<PeerId> {
        self.spec.members.iter().filter(|m| !facts.is_absent(m) && !self.excluded[i].contains(*m)).cloned().collect()
    }

    /// The award from the bids: highest capability, then lowest load, then team order.
    fn award(&self, bids: &BTreeMap<PeerId, Option<f64>>, facts: &Facts<'_>) -> Option<(PeerId, f64)> {
        bids.iter().filter_map(|(p, c)| c.map(|c| (p.clone(), c))).max_by(|(pa, ca), (pb, cb)| {
            ca.total_cmp(cb)
                .then(self.load.get(pb).copied().unwrap_or(0).cmp(&self.load.get(pa).copied().unwrap_or(0)))
                .then(team_order(facts.plan, pb).cmp(&team_order(facts.plan, pa)))
        })
    }

    fn bids_complete(&self, i: usize, bids: &BTreeMap<PeerId, Option<f64>>, facts: &Facts<'_>) -> bool {
        self.eligible(i, facts).iter().all(|p| bids.contains_key(p))
    }

    /// Announce the task again without the peer that failed it, or fail it.
    fn retry(&mut self, i: usize, attempt: u32, failed_by: Option<PeerId>, why: &str) {
        if let Some(p) = failed_by {
            self.excluded[i].insert(p);
        }
        if attempt < self.spec.max_reannounce {
            self.status[i] = Status::Bidding { attempt: attempt + 1, announced: false, bids: BTreeMap::new() };
            self.queue.push_back(i);
        } else {
            self.status[i] = Status::Failed { why: format!("{why}; announced {} times", attempt + 1) };
        }
    }

    fn dep_state(&self, i: usize) -> (bool, bool) {
        let deps: Vec<usize> = self.spec.tasks[i].depends_on.iter().filter_map(|d| self.index(d)).collect();
        let ready = deps.iter().all(|&d| matches!(self.status[d], Status::Done { .. } | Status::Failed { .. }));
        let failed = deps.iter().any(|&d| matches!(self.status[d], Status::Failed { .. }));
        (ready, failed)
    }

    fn resolved(&self) -> usize {
        self.status.iter().filter(|s| matches!(s, Status::Done { .. } | Status::Failed { .. })).count()
    }

    fn advance(&mut self, facts: &Facts<'_>) {
        // Release awards held by absent peers.
        for i in 0..self.status.len() {
            if let Status::Awarded { to, attempt } = &self.status[i]
                && facts.is_absent(to)
            {
                let (to, attempt) = (to.clone(), *attempt);
                self.retry(i, attempt, Some(to.clone()), &format!("{to} is absent"));
            }
        }
        // Drop resolved or awarded tasks from the front; start the next.
        while let Some(&i) = self.queue.front() {
            match &self.status[i] {
                Status::Waiting => {
                    self.status[i] = Status::Bidding { attempt: 0, announced: false, bids: BTreeMap::new() };
                    break;
                }
                Status::Bidding { .. } => break,
                _ => {
                    self.queue.pop_front();
                }
            }
        }
        // A task with no one left to bid fails.
        if let Some(&i) = self.queue.front()
            && let Status::Bidding { attempt, announced: true, bids } = &self.status[i]
            && self.eligible(i, facts).is_empty()
            && bids.values().all(Option::is_none)
        {
            let attempt = *attempt;
            self.status[i] = Status::Failed { why: format!("no member could bid (attempt {})", attempt + 1) };
            self.queue.pop_front();
            self.advance(facts);
        }
    }
}

impl Reducer for ContractNet {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let step = env.step.as_ref();
        if let Some(&i) = self.queue.front() {
            let skill = self.skill_match(i, &env.from);
            if let Status::Bidding { attempt, announced, bids } = &mut self.status[i] {
                let prefix = format!("cnet/{}/a{attempt}", self.spec.tasks[i].id);
                if step == format!("{prefix}/announce") {
                    *announced = true;
                } else if *announced
                    && step == format!("{prefix}/bid")
                    && self.spec.members.contains(&env.from)
                    && !bids.contains_key(&env.from)
                {
                    let cap = match (env.kind, self.spec.bids) {
                        (Kind::Work, BidMode::Skills) => Some(skill),
                        (Kind::Work, BidMode::Model) => {
                            let c = env
                                .body
                                .json
                                .as_ref()
                                .and_then(|j| j.get("capability"))
                                .and_then(serde_json::Value::as_f64);
                            if c.is_none() {
                                self.pending.push((
                                    format!("{prefix}/bid/{}/malformed", env.from),
                                    env.from.clone(),
                                    env.id.clone(),
                                ));
                            }
                            c.map(|c| c.clamp(0.0, 1.0))
                        }
                        _ => None,
                    };
                    if matches!(env.kind, Kind::Work | Kind::Failure) {
                        bids.insert(env.from.clone(), cap);
                    }
                } else if step == format!("{prefix}/award") {
                    // The award is recomputed from the bids, not taken from the record.
                    let attempt = *attempt;
                    let bids = bids.clone();
                    let to = self.award(&bids, facts).map(|(p, _)| p);
                    match to {
                        Some(to) => {
                            *self.load.entry(to.clone()).or_default() += self.spec.tasks[i].size;
                            self.status[i] = Status::Awarded { to, attempt };
                        }
                        None => self.status[i] = Status::Failed { why: "no valid bid".into() },
                    }
                    self.queue.pop_front();
                }
            }
        }
        if let Some(task) =
            step.strip_prefix("cnet/").and_then(|s| s.strip_suffix("/result")).and_then(|s| s.split('/').next())
            && let Some(i) = self.index(task)
            && let Status::Awarded { to, attempt } = &self.status[i]
            && step == format!("{}/result", self.prefix(i, *attempt))
        {
            let (to, attempt) = (to.clone(), *attempt);
            let op = env.body.json.as_ref().and_then(|j| j.get("op")).and_then(|v| v.as_str());
            match (env.kind, op) {
                (Kind::Work, Some("skipped")) => self.status[i] = Status::Failed { why: env.body.text.to_string() },
                (Kind::Work, _) => {
                    self.status[i] =
                        Status::Done { text: env.body.text.clone(), id: env.id.clone(), by: env.from.clone() }
                }
                (Kind::Failure, _) => self.retry(i, attempt, Some(to.clone()), &format!("{to} failed it")),
                _ => {}
            }
        }
        if env.kind == Kind::Failure {
            self.pending.retain(|(s, ..)| s != step);
        }
        self.advance(facts);
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        let round = self.resolved() as u32;
        let mut out = Vec::new();
        // My awarded work, once its dependencies are resolved.
        for (i, s) in self.status.iter().enumerate() {
            let Status::Awarded { to, .. } = s else {
                continue;
            };
            if to != me {
                continue;
            }
            let (ready, dep_failed) = self.dep_state(i);
            if !ready {
                continue;
            }
            let t = &self.spec.tasks[i];
            let Status::Awarded { attempt, .. } = s else { continue };
            let step = format!("{}/result", self.prefix(i, *attempt));
            if dep_failed {
                let body = Body::text(format!("skipped: a task {} depends on failed", t.id))
                    .with_json(serde_json::json!({"op": "skipped"}));
                out.push(Duty::post(step, Kind::Work, round, body).collective());
                continue;
            }
            let mut text = format!("Your task ({}): {}\n", t.id, t.description);
            let mut parents = Vec::new();
            for d in t.depends_on.iter().filter_map(|d| self.index(d)) {
                if let Status::Done { text: r, id, .. } = &self.status[d] {
                    text.push_str(&format!("\nResult of task {}:\n{r}\n", self.spec.tasks[d].id));
                    parents.push(id.clone());
                }
            }
            text.push('\n');
            text.push_str(self.spec.instruction.as_deref().unwrap_or("Do the task and reply with its result."));
            out.push(
                Duty::speak(step, Kind::Work, round, Some(Arc::from(text)), false, View::Task)
                    .with_parents(parents)
                    .collective(),
            );
        }
        // The negotiation of the task in front.
        if let Some(&i) = self.queue.front()
            && let Status::Bidding { attempt, announced, bids } = &self.status[i]
        {
            let prefix = self.prefix(i, *attempt);
            let t = &self.spec.tasks[i];
            if !announced {
                let body =
                    Body::text(format!("Task {} is announced: {}", t.id, t.description)).with_json(serde_json::json!({
                        "op": "announce", "task": t.id, "attempt": attempt, "needs": t.needs, "size": t.size,
                    }));
                out.push(Duty::post(format!("{prefix}/announce"), Kind::Work, round, body).collective());
            } else if !bids.contains_key(me) && self.eligible(i, facts).contains(me) {
                let load = self.load.get(me).copied().unwrap_or(0);
                match self.spec.bids {
                    BidMode::Skills => {
                        let capability = self.skill_match(i, me);
                        let body = Body::text(format!(
                            "{me} bids for {}: capability {capability:.2}, load {load}",
                            t.id
                        ))
                        .with_json(
                            serde_json::json!({ "op": "bid", "task": t.id, "capability": capability, "load": load }),
                        );
                        out.push(Duty::post(format!("{prefix}/bid"), Kind::Work, round, body));
                    }
                    BidMode::Model => {
                        let ask = format!(
                            "A task is announced: ({}) {}\nYour current load is {load}. How capable are you of doing it well? \
                                 Reply with a JSON object {{\"capability\": <0 to 1>, \"reason\": \"<one sentence>\"}}.",
                            t.id, t.description
                        );
                        out.push(Duty::speak(
                            format!("{prefix}/bid"),
                            Kind::Work,
                            round,
                            Some(Arc::from(ask)),
                            true,
                            View::Task,
                        ));
                    }
                }
            } else if *announced && self.bids_complete(i, bids, facts) {
                let body = match self.award(bids, facts) {
                    Some((to, cap)) => {
                        let load = self.load.get(&to).copied().unwrap_or(0);
                        Body::text(format!("Task {} is awarded to {to} (capability {cap:.2}, load {load})", t.id))
                                .with_json(serde_json::json!({ "op": "award", "task": t.id, "to": to.as_str(), "capability": cap, "load": load }))
                    }
                    None => Body::text(format!("Task {} has no valid bid", t.id))
                        .with_json(serde_json::json!({ "op": "award", "task": t.id, "to": null })),
                };
                out.push(Duty::post(format!("{prefix}/award"), Kind::Work, round, body).collective());
            }
        }
        for (step, p, id) in &self.pending {
            out.push(rejection(
                step.clone(),
                round,
                p,
                "malformed_bid",
                format!("the bid of {p} states no capability; it does not count"),
                id,
            ));
        }
        out
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        let all_absent = self.spec.members.iter().all(|m| facts.is_absent(m));
        if !self.pending.is_empty() || (self.resolved() < self.status.len() && !all_absent) {
            return None;
        }
        let done: Vec<usize> =
            (0..self.status.len()).filter(|&i| matches!(self.status[i], Status::Done { .. })).collect();
        let mut by_peer: BTreeMap<&PeerId, u32> = BTreeMap::new();
        for &i in &done {
            if let Status::Done { by, .. } = &self.status[i] {
                *by_peer.entry(by).or_default() += 1;
            }
        }
        let spread = by_peer.iter().map(|(p, n)| format!("{p}: {n}")).collect::<Vec<_>>().join(", ");
        let n = self.status.len();
        let failed = n - done.len();
        let reason = if all_absent && done.len() + failed < n {
            format!("every member is absent: {} of {n} tasks done", done.len())
        } else {
            format!("all {n} tasks resolved: {} done ({spread}), {} failed", done.len(), self.resolved() - done.len())
        };
        let (answer, decided_by) = self.answer();
        Some(Finish { reason, answer, decided_by })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.resolved() as u32,
            consensus: self.status.iter().all(|s| matches!(s, Status::Done { .. })),
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        let (a, ids) = self.answer();
        Some((a?, ids.into_iter().next()?))
    }

    /// A task's result (`cnet/{t}/a{n}/result`, collective) may be recorded by the peer
    /// the task's current attempt is awarded to only.
    fn may_record(&self, env: &crate::envelope::Envelope, _facts: &Facts<'_>) -> Result<(), String> {
        let step = env.step.as_ref();
        let Some(i) = step
            .strip_prefix("cnet/")
            .and_then(|s| s.strip_suffix("/result"))
            .and_then(|s| s.split('/').next())
            .and_then(|t| self.index(t))
        else {
            return Ok(());
        };
        let task = &self.spec.tasks[i].id;
        match &self.status[i] {
            Status::Awarded { to, attempt } if step == self.prefix(i, *attempt) + "/result" => {
                if *to == env.from {
                    Ok(())
                } else {
                    Err(format!("a result of task {task} from {}; it is awarded to {to}", env.from))
                }
            }
            _ => Err(format!("a result of task {task} at {step}, which no award of the task on the log calls for")),
        }
    }
}

impl ContractNet {
    fn answer(&self) -> (Option<Arc<str>>, Vec<EnvelopeId>) {
        tasks_answer(&self.spec.tasks, self.spec.answer_task.as_deref(), |i| match &self.status[i] {
            Status::Done { text, id, .. } => Some((text.clone(), id.clone())),
            _ => None,
        })
    }
}
