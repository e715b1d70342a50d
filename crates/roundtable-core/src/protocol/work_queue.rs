//! Self-assigned work queue: peers claim tasks from the shared
//! [`crate::workqueue::WorkQueue`], do them, and report results; when a task fails,
//! its peer notifies the holders of the tasks that depend on it, and they
//! re-prioritize.
//!
//! - **Queue.** Every open task is a queue item, in a fixed order: dependencies first,
//!   then by `priority` (lower first), then by team-file order. A member with no task
//!   it can do now pushes the open items (pushes are idempotent by id, so every member
//!   pushing them is harmless and nothing depends on who pushed first) and claims one.
//!   The claim is recorded on the log (`claim/{item}`, a work envelope) before it is
//!   acked on the queue: from then on the log says who holds the task; of two claims of
//!   one item the first on the log holds it. A member may claim a task whose
//!   dependencies are not done yet (it holds it until they are) and holds at most two
//!   unfinished tasks.
//! - **Work.** A holder does a task when every dependency is resolved: it calls its
//!   model with the task's description and its dependencies' results, and records the
//!   result with the collective step `work/{task}/result` — exactly one result per task
//!   whoever records it. Only the task's holder may record it (`may_record`): a reader
//!   that rejects what may not be recorded (the NATS log's) rejects anyone else's.
//! - **Failure notices.** A task whose model call fails is failed (its result step is
//!   a failure). Its peer then sends each holder of a task that depends on it a direct
//!   notice (`work/{failed}/notice/{dependent}`), now or when the dependent is claimed
//!   later (when that peer is absent, any member sends it). Holders re-prioritize once
//!   the notice is on the log: with `on_dependency_failure = "skip"` (the default) the
//!   dependent task is recorded as skipped without a model call — and the skip is
//!   noticed down the chain the same way; with `"continue"` it is done last, after
//!   every other task the holder can do, told what failed.
//! - **Decision.** When every task is resolved (done, failed or skipped) the session
//!   ends; the answer is the result of `answer_task`, or the results of the tasks
//!   nothing depends on.
//! - **Absent peers.** The tasks an absent member holds are released: they become
//!   queue items again under a new id (`task#n`), so the queue hands them out again.
//!   A claim that reached the queue but not the log is redelivered by the queue when
//!   its lease expires.
//!
//! Team-file keys: `[[protocol.tasks]]` (`id`, `description`, `depends_on`,
//! `priority`), `members` (every peer), `on_dependency_failure` (`skip` |
//! `continue`), `answer_task`, `lease_secs` (30), `max_deliver` (5), `instruction`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Action, Duty, Facts, Finish, QueueItem, Reducer, View};
use crate::envelope::{Body, EnvelopeId, Kind, PeerId, Recipient};
use crate::log::Entry;
use crate::team::{OnDependencyFailure, TaskSpec, WorkQueueSpec};
use crate::termination::Signals;

/// Most unfinished tasks a member holds at once.
const MAX_HELD: usize = 2;

#[derive(Clone, Debug, PartialEq)]
enum Status {
    Open { releases: u32 },
    Held { by: PeerId, releases: u32 },
    Done { text: Arc<str>, id: EnvelopeId },
    Failed { why: Arc<str>, by: PeerId },
    Skipped { why: Arc<str>, by: PeerId },
}

impl Status {
    fn done(&self) -> bool {
        matches!(self, Status::Done { .. })
    }
    fn resolved(&self) -> bool {
        matches!(self, Status::Done { .. } | Status::Failed { .. } | Status::Skipped { .. })
    }
}

pub struct WorkQueueProtocol {
    spec: WorkQueueSpec,
    /// Task indices in queue order.
    order: Vec<usize>,
    status: Vec<Status>,
    notices: BTreeSet<(usize, usize)>,
}

/// A task list's answer: the `answer_task`'s result when one is named, otherwise the
/// results of the tasks nothing depends on (joined, each under its id). `result` reads
/// a finished task's text and envelope by index. Shared by the work-queue and
/// contract-net protocols.
pub fn tasks_answer(
    tasks: &[TaskSpec],
    answer_task: Option<&str>,
    result: impl Fn(usize) -> Option<(Arc<str>, EnvelopeId)>,
) -> (Option<Arc<str>>, Vec<EnvelopeId>) {
    if let Some(t) = answer_task {
        let r = tasks.iter().position(|x| x.id == t).and_then(&result);
        return (r.as_ref().map(|r| r.0.clone()), r.into_iter().map(|r| r.1).collect());
    }
    let done: Vec<(usize, (Arc<str>, EnvelopeId))> = (0..tasks.len())
        .filter(|&i| !tasks.iter().any(|t| t.depends_on.contains(&tasks[i].id)))
        .filter_map(|i| result(i).map(|r| (i, r)))
        .collect();
    match done.as_slice() {
        [] => (None, Vec::new()),
        [(_, (t, id))] => (Some(t.clone()), vec![id.clone()]),
        many => {
            let text: Vec<String> = many.iter().map(|(i, (t, _))| format!("[{}] {t}", tasks[*i].id)).collect();
            (Some(Arc::from(text.join("\n\n"))), many.iter().map(|(_, (_, id))| id.clone()).collect())
        }
    }
}

/// Task indices in queue order: dependencies first, then priority, then file order.
pub fn queue_order(tasks: &[TaskSpec]) -> Vec<usize> {
    let idx: BTreeMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
    let mut placed = vec![false; tasks.len()];
    let mut out = Vec::new();
    while out.len() < tasks.len() {
        let next = (0..tasks.len())
            .filter(|&i| !placed[i])
            .filter(|&i| tasks[i].depends_on.iter().all(|d| idx.get(d.as_str()).is_none_or(|&j| placed[j])))
            .min_by_key(|&i| (tasks[i].priority, i));
        // A cycle (rejected by validation) would stop here; place the rest in file order.
        let Some(i) = next.or_else(|| (0..tasks.len()).find(|&i| !placed[i])) else {
            break;
        };
        placed[i] = true;
        out.push(i);
    }
    out
}

impl WorkQueueProtocol {
    pub fn new(spec: WorkQueueSpec) -> Self {
        let order = queue_order(&spec.tasks);
        let status = vec![Status::Open { releases: 0 }; spec.tasks.len()];
        WorkQueueProtocol { spec, order, status, notices: BTreeSet::new() }
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.spec.tasks.iter().position(|t| t.id == id)
    }

    fn item(&self, i: usize) -> Option<String> {
        match &self.status[i] {
            Status::Open { releases: 0 } => Some(self.spec.tasks[i].id.clone()),
            Status::Open { releases } => Some(format!("{}#{releases}", self.spec.tasks[i].id)),
            _ => None,
        }
    }

    fn deps(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.spec.tasks[i].depends_on.iter().filter_map(|d| self.index(d))
    }

    /// Whether every dependency is resolved, and whether one of them did not succeed.
    fn readiness(&self, i: usize) -> (bool, bool) {
        let ready = self.deps(i).all(|d| self.status[d].resolved());
        let degraded = self.deps(i).any(|d| matches!(self.status[d], Status::Failed { .. } | Status::Skipped { .. }));
        (ready, degraded)
    }

    fn result_step(&self, i: usize) -> String {
        format!("work/{}/result", self.spec.tasks[i].id)
    }

    fn release_absent(&mut self, facts: &Facts<'_>) {
        for s in &mut self.status {
            if let Status::Held { by, releases } = s
                && facts.is_absent(by)
            {
                *s = Status::Open { releases: *releases + 1 };
            }
        }
    }

    fn work_duty(&self, i: usize, degraded: bool) -> Duty {
        let t = &self.spec.tasks[i];
        let mut text = format!("Your task ({}): {}\n", t.id, t.description);
        let mut parents = Vec::new();
        for d in self.deps(i) {
            let dt = &self.spec.tasks[d];
            match &self.status[d] {
                Status::Done { text: r, id } => {
                    text.push_str(&format!("\nResult of task {}:\n{r}\n", dt.id));
                    parents.push(id.clone());
                }
                Status::Failed { why, .. } | Status::Skipped { why, .. } => {
                    text.push_str(&format!("\nTask {} did not complete ({why}).\n", dt.id));
                }
                _ => {}
            }
        }
        if degraded {
            text.push_str(
                "\nA task this one depends on did not complete: do what you can without it, and say what is missing.\n",
            );
        }
        let ask = self.spec.instruction.clone().unwrap_or_else(|| "Do the task and reply with its result.".into());
        text.push('\n');
        text.push_str(&ask);
        Duty::speak(self.result_step(i), Kind::Work, self.resolved_count(), Some(Arc::from(text)), false, View::Task)
            .with_parents(parents)
            .collective()
    }

    fn resolved_count(&self) -> u32 {
        self.status.iter().filter(|s| s.resolved()).count() as u32
    }
}

impl Reducer for WorkQueueProtocol {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        let json = env.body.json.as_ref();
        let op = json.and_then(|j| j.get("op")).and_then(|v| v.as_str());
        if env.kind == Kind::Work && op == Some("claim") && self.spec.members.contains(&env.from) {
            let item = json.and_then(|j| j.get("item")).and_then(|v| v.as_str()).unwrap_or("");
            let task = json.and_then(|j| j.get("task")).and_then(|v| v.as_str()).unwrap_or("");
            if let Some(i) = self.index(task)
                && self.item(i).as_deref() == Some(item)
                && env.step.as_ref() == format!("claim/{item}")
                && let Status::Open { releases } = self.status[i]
            {
                self.status[i] = Status::Held { by: env.from.clone(), releases };
            }
        } else if let Some(task) = env.step.strip_prefix("work/").and_then(|s| s.strip_suffix("/result")) {
            if let Some(i) = self.index(task)
                && !self.status[i].resolved()
            {
                self.status[i] = match (env.kind, op) {
                    (Kind::Work, Some("skipped")) => {
                        Status::Skipped { why: env.body.text.clone(), by: env.from.clone() }
                    }
                    (Kind::Work, _) => Status::Done { text: env.body.text.clone(), id: env.id.clone() },
                    (Kind::Failure, _) => Status::Failed { why: env.body.text.clone(), by: env.from.clone() },
                    _ => self.status[i].clone(),
                };
            }
        } else if env.kind == Kind::Work && op == Some("dependency_failed") {
            let f = json.and_then(|j| j.get("failed")).and_then(|v| v.as_str()).and_then(|t| self.index(t));
            let d = json.and_then(|j| j.get("dependent")).and_then(|v| v.as_str()).and_then(|t| self.index(t));
            if let (Some(f), Some(d)) = (f, d) {
                self.notices.insert((f, d));
            }
        }
        self.release_absent(facts);
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        if !self.spec.members.contains(me) {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Failure notices to the holders of dependent tasks.
        for (f, st) in self.status.iter().enumerate() {
            let (Status::Failed { by, why } | Status::Skipped { by, why }) = st else {
                continue;
            };
            if by != me && !facts.is_absent(by) {
                continue;
            }
            for (d, dst) in self.status.iter().enumerate() {
                let Status::Held { by: holder, .. } = dst else {
                    continue;
                };
                if !self.spec.tasks[d].depends_on.contains(&self.spec.tasks[f].id) || self.notices.contains(&(f, d)) {
                    continue;
                }
                let (ft, dt) = (&self.spec.tasks[f].id, &self.spec.tasks[d].id);
                let body = Body::text(format!("Task {ft} did not complete ({why}); your task {dt} depends on it."))
                    .with_json(serde_json::json!({ "op": "dependency_failed", "failed": ft, "dependent": dt }));
                out.push(
                    Duty::post(format!("work/{ft}/notice/{dt}"), Kind::Work, self.resolved_count(), body)
                        .to(Recipient::Peer(holder.clone()))
                        .collective(),
                );
            }
        }
        // Work on held tasks: those with every dependency done first, degraded ones last.
        let mine: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|&i| matches!(&self.status[i], Status::Held { by, .. } if by == me))
            .collect();
        let mut degraded = Vec::new();
        for &i in &mine {
            let (ready, bad) = self.readiness(i);
            // A holder re-prioritizes on the notice: it acts on a task whose dependency
            // did not complete once the notice is on the log.
            let noticed = self.deps(i).all(|d| self.status[d].done() || self.notices.contains(&(d, i)));
            if !ready || !noticed {
                continue;
            }
            if !bad {
                out.push(self.work_duty(i, false));
            } else if self.spec.on_dependency_failure == OnDependencyFailure::Skip {
                let failed: Vec<&str> = self
                    .deps(i)
                    .filter(|&d| !matches!(self.status[d], Status::Done { .. }))
                    .map(|d| self.spec.tasks[d].id.as_str())
                    .collect();
                let body = Body::text(format!("skipped: depends on {} which did not complete", failed.join(", ")))
                    .with_json(serde_json::json!({ "op": "skipped", "task": self.spec.tasks[i].id }));
                out.push(Duty::post(self.result_step(i), Kind::Work, self.resolved_count(), body).collective());
            } else {
                degraded.push(self.work_duty(i, true));
            }
        }
        out.extend(degraded);
        let busy = out.iter().any(|d| d.step.ends_with("/result"));
        let held = mine.len();
        if !busy && held < MAX_HELD {
            let items: Vec<QueueItem> = self
                .order
                .iter()
                .filter_map(|&i| self.item(i).map(|id| QueueItem { id, task: self.spec.tasks[i].id.clone() }))
                .collect();
            if !items.is_empty() {
                out.push(Duty {
                    step: Arc::from(format!("claim/{me}")),
                    kind: Kind::Work,
                    to: Recipient::All,
                    round: self.resolved_count(),
                    parents: Vec::new(),
                    action: Action::Claim { items },
                    collective: false,
                });
            }
        }
        out
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        let all_resolved = self.status.iter().all(Status::resolved);
        let all_absent = self.spec.members.iter().all(|m| facts.is_absent(m));
        if !all_resolved && !all_absent {
            return None;
        }
        let count = |f: fn(&Status) -> bool| self.status.iter().filter(|s| f(s)).count();
        let done = count(|s| matches!(s, Status::Done { .. }));
        let failed = count(|s| matches!(s, Status::Failed { .. }));
        let skipped = count(|s| matches!(s, Status::Skipped { .. }));
        let n = self.status.len();
        let (answer, decided_by) = self.answer();
        let reason = if all_resolved {
            format!("all {n} tasks resolved: {done} done, {failed} failed, {skipped} skipped")
        } else {
            format!("every member is absent: {done} of {n} tasks done")
        };
        Some(Finish { reason, answer, decided_by })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.resolved_count(),
            consensus: self.status.iter().all(|s| matches!(s, Status::Done { .. })),
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        let (a, ids) = self.answer();
        Some((a?, ids.into_iter().next()?))
    }

    /// A task's result (`work/{task}/result`, collective) may be recorded by the peer
    /// that holds the task only.
    fn may_record(&self, env: &crate::envelope::Envelope, _facts: &Facts<'_>) -> Result<(), String> {
        let Some(i) =
            env.step.strip_prefix("work/").and_then(|s| s.strip_suffix("/result")).and_then(|t| self.index(t))
        else {
            return Ok(());
        };
        match &self.status[i] {
            Status::Held { by, .. } if *by == env.from => Ok(()),
            Status::Held { by, .. } => {
                Err(format!("a result of task {} from {}, which {by} holds", self.spec.tasks[i].id, env.from))
            }
            s if s.resolved() => Err(format!("a second result of task {}", self.spec.tasks[i].id)),
            _ => Err(format!("a result of task {} from {}, which nobody holds", self.spec.tasks[i].id, env.from)),
        }
    }
}

impl WorkQueueProtocol {
    /// The answer task's result, or the results of the tasks nothing depends on.
    fn answer(&self) -> (Option<Arc<str>>, Vec<EnvelopeId>) {
        tasks_answer(&self.spec.tasks, self.spec.answer_task.as_deref(), |i| match &self.status[i] {
            Status::Done { text, id } => Some((text.clone(), id.clone())),
            _ => None,
        })
    }
}
