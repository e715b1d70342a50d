//! Collaboration protocols as deterministic reducers over the session log.
//!
//! Every peer runs its own [`Reducer`] over the same log and so reaches the same state:
//! whose turn it is, what round it is, whether the protocol has finished and with what
//! answer. From that state each peer reads its own [`Duty`] — speak, post, commit,
//! reveal, measure, write the board, claim work, or nothing — and no coordinator is
//! needed. A reducer never reads the clock, never draws random numbers and never looks
//! at anything but the entries it is given.
//!
//! The generic parts every protocol shares (the task, the tally, absent peers, the stop
//! decision, budgets, summaries of older rounds) live in
//! [`crate::session::SessionState`], which drives the reducer.
//!
//! # Shared rules
//! - A duty's step, with the session and the peer (or `*` for a collective duty),
//!   determines the envelope id, so a duty done twice lands once.
//! - A failure envelope for a step consumes the step: the protocol moves on without
//!   that contribution. A failing peer never stalls a protocol.
//! - A peer recorded absent is skipped: rounds complete without it, turns pass it by,
//!   its tasks are released. When every peer a protocol waits for is absent, the
//!   session stops with the best answer so far.
//! - Ties are broken by the team order of the peers involved (never by timing), so the
//!   decision is the same whatever order concurrent answers landed in.
//! - When a protocol's own acceptance rule is not met (no majority, a hung jury, no
//!   consensus, no convergence, a leader that cannot decide) the session ends with that
//!   reason and no answer: an answer the rule rejected is not presented as the answer;
//!   the reason names the leading candidate. When a termination condition or a budget
//!   stops a session early, the protocol's best answer so far is the answer.
//! - Termination conditions read the protocol's [`Signals`] (round, verdict,
//!   consensus, confidence, convergence, rounds without change), computed from
//!   completed rounds only.
//!
//! | kind | module |
//! |---|---|
//! | `round_robin` | [`round_robin`] |
//! | `debate` | [`debate`] |
//! | `proposer_critic` | [`proposer_critic`] |
//! | `judged_debate` | [`judged_debate`] |
//! | `jury` | [`jury`] |
//! | `consensus` | [`consensus`] |
//! | `emergent` | [`emergent`] |
//! | `adversarial` | [`adversarial`] |
//! | `blackboard` | [`blackboard`] |
//! | `work_queue` | [`work_queue`] |
//! | `contract_net` | [`contract_net`] |
//! | `hybrid` | [`hybrid`] |
//! | `conversation` | [`conversation`] |

pub mod adversarial;
pub mod answers;
pub mod blackboard;
pub mod consensus;
pub mod contract_net;
pub mod conversation;
pub mod debate;
pub mod emergent;
pub mod hybrid;
pub mod judged_debate;
pub mod jury;
pub mod proposer_critic;
pub mod round_robin;
pub mod rounds;
pub mod seal;
pub mod work_queue;

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use crate::log::Entry;
use crate::team::{ProtocolSpec, TeamPlan};
use crate::termination::Signals;

/// What the session state shares with the protocol reducer.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    pub plan: &'a TeamPlan,
    pub session: &'a SessionId,
    /// Peers noticed absent and not back.
    pub absent: &'a BTreeSet<PeerId>,
    pub task: Option<&'a Arc<Envelope>>,
}

impl Facts<'_> {
    pub fn is_absent(&self, p: &PeerId) -> bool {
        self.absent.contains(p)
    }
    /// The task's text (the topic or question).
    pub fn topic(&self) -> Arc<str> {
        self.task.map_or_else(|| Arc::from(""), |t| t.body.text.clone())
    }
}

/// Something a peer must do now.
#[derive(Clone, Debug, PartialEq)]
pub struct Duty {
    /// The protocol step; with the peer and session it determines the envelope id.
    pub step: Arc<str>,
    pub kind: Kind,
    pub to: Recipient,
    pub round: u32,
    pub parents: Vec<EnvelopeId>,
    pub action: Action,
    /// A decision any peer may record (a stop, an absence, a task's result): its id
    /// does not depend on which peer records it, so the first one wins and the others
    /// are duplicates.
    pub collective: bool,
}

/// What a model call sees besides the system prompt and the instruction.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// The peer's visible history under the team's context policy.
    History,
    /// The task alone: an independent answer.
    Task,
    /// The task, then these messages (e.g. the others' answers of the previous round).
    Shown(Vec<Shown>),
    /// The task, the current summary, and the history of the rounds after the summary
    /// up to `upto`: the input of a summarizer.
    ToSummarize { upto: u32 },
}

/// A message shown to a model by a [`View::Shown`].
#[derive(Clone, Debug, PartialEq)]
pub struct Shown {
    pub from: PeerId,
    pub text: Arc<str>,
}

impl Shown {
    pub fn new(from: &PeerId, text: &Arc<str>) -> Self {
        Shown { from: from.clone(), text: text.clone() }
    }
}

/// The last write the log knows for a blackboard key: who made it at which step.
#[derive(Clone, Debug, PartialEq)]
pub struct BoardMark {
    pub by: PeerId,
    pub step: Arc<str>,
    pub text: Arc<str>,
}

/// A work item a claim may push before claiming (pushes are idempotent by id).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueItem {
    /// The queue's id for this delivery of the task (`task` or `task#n` after a release).
    pub id: String,
    pub task: String,
}

/// How a duty is carried out.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Call the peer's model; its answer is the envelope's body.
    Speak {
        /// What the protocol asks of the peer now (the last user message).
        instruction: Option<Arc<str>>,
        /// Ask for a JSON object and store it parsed in the body.
        json: bool,
        view: View,
    },
    /// Append this body as it is, without a model call.
    Post { body: Body },
    /// Call the model and commit to its answer without showing it: the envelope holds
    /// a hash commitment and the answer sealed with the peer's secret (see [`seal`]).
    Commit { instruction: Option<Arc<str>>, json: bool, view: View },
    /// Open this peer's own commitment (the commit envelope given): post the answer and
    /// the salt, which every peer checks against the commitment.
    Reveal { commit: Arc<Envelope> },
    /// Measure the pairwise similarity of these answers with the peer's embedder and
    /// record it (an embedder call is a model call: budget-checked and on the log).
    Measure { texts: Vec<Shown> },
    /// Call the model, then write its answer to `key` on the shared blackboard with
    /// compare-and-set against the write the log knows last (`after`), and record the
    /// write — or the lost race — on the log.
    BoardWrite { instruction: Option<Arc<str>>, key: Arc<str>, after: Option<BoardMark> },
    /// Push these items to the shared work queue (idempotent), claim one, and record
    /// the claim. Nothing is recorded when no item is handed out.
    Claim { items: Vec<QueueItem> },
    /// A conversation turn: call the model with the peer's tools (the peer-to-peer
    /// built-ins included) until it answers without a call; its text, if any, goes to
    /// `reply_to`. The envelope records `read_upto`, how far the turn read its mail.
    Turn { instruction: Option<Arc<str>>, view: View, read_upto: u64, reply_to: Recipient },
}

impl Duty {
    /// The envelope id this duty produces when `me` performs it.
    pub fn envelope_id(&self, session: &SessionId, me: &PeerId) -> EnvelopeId {
        if self.collective {
            EnvelopeId::derive(session, &PeerId::from("*"), &self.step)
        } else {
            EnvelopeId::derive(session, me, &self.step)
        }
    }

    /// A model call broadcast to everyone.
    pub fn speak(
        step: impl Into<Arc<str>>,
        kind: Kind,
        round: u32,
        instruction: Option<Arc<str>>,
        json: bool,
        view: View,
    ) -> Self {
        Duty {
            step: step.into(),
            kind,
            to: Recipient::All,
            round,
            parents: Vec::new(),
            action: Action::Speak { instruction, json, view },
            collective: false,
        }
    }

    /// A post without a model call, broadcast to everyone.
    pub fn post(step: impl Into<Arc<str>>, kind: Kind, round: u32, body: Body) -> Self {
        Duty {
            step: step.into(),
            kind,
            to: Recipient::All,
            round,
            parents: Vec::new(),
            action: Action::Post { body },
            collective: false,
        }
    }

    pub fn with_parents(mut self, parents: Vec<EnvelopeId>) -> Self {
        self.parents = parents;
        self
    }

    pub fn collective(mut self) -> Self {
        self.collective = true;
        self
    }

    pub fn to(mut self, to: Recipient) -> Self {
        self.to = to;
        self
    }
}

/// A rejection any peer may record for audit (a malformed vote, a reveal that does
/// not match its commitment): a collective failure envelope, so it lands once.
pub fn rejection(step: String, round: u32, peer: &PeerId, error: &str, text: String, of: &EnvelopeId) -> Duty {
    Duty::post(
        step,
        Kind::Failure,
        round,
        Body::text(text)
            .with_json(serde_json::json!({ "error": error, "peer": peer.as_str(), "envelope": of.as_str() })),
    )
    .with_parents(vec![of.clone()])
    .collective()
}

/// A protocol's natural end.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: String,
    pub answer: Option<Arc<str>>,
    /// The envelopes the decision was made from.
    pub decided_by: Vec<EnvelopeId>,
}

/// The peers whose duties may have changed with the entry folded last (see
/// [`Reducer::due`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Any peer's.
    Everyone,
    /// These peers' only (none: nobody's).
    Peers(Vec<PeerId>),
}

impl Due {
    /// Nobody's duty changed.
    pub fn nobody() -> Self {
        Due::Peers(Vec::new())
    }

    /// Whether `p` may have a new duty.
    pub fn includes(&self, p: &PeerId) -> bool {
        match self {
            Due::Everyone => true,
            Due::Peers(ps) => ps.contains(p),
        }
    }
}

/// One peer's view of a protocol: state folded from the log, and duties read from it.
pub trait Reducer: Send + Sync {
    /// Fold one entry in. Called for every entry, in log order, after the session
    /// state has folded it (so `facts` already reflects it).
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>);
    /// [`Reducer::apply`], owning the entry. A reducer that keeps envelopes takes the
    /// reference it is given instead of making one: every peer folds every entry, and
    /// a reference count that every peer bumps is a cache line the cores fight over.
    fn take(&mut self, entry: Entry, facts: &Facts<'_>) {
        self.apply(&entry, facts);
    }
    /// What `me` must do now; empty when it must wait.
    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty>;
    /// Whether the protocol has reached its natural end.
    fn finished(&self, facts: &Facts<'_>) -> Option<Finish>;
    /// Progress signals for termination conditions.
    fn signals(&self) -> Signals;
    /// The best answer so far, used when a limit stops the session early.
    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)>;
    /// Whether `env`, a collective envelope (its id does not depend on its author), may
    /// be recorded by its author at this point of the log; if not, why. A reader that
    /// does not let a rejected envelope hold its id (the NATS log's) rejects it at its
    /// place, so the one who may record it still can. The default: anyone may.
    fn may_record(&self, _env: &Envelope, _facts: &Facts<'_>) -> Result<(), String> {
        Ok(())
    }
    /// After `entry` was folded in: the peers whose [`Reducer::duties`] may now differ
    /// from what they were before it, among those that now have a duty. Peers of one
    /// process that share a fold are woken by it, so a peer left out whose duty did
    /// change would wait for the periodic re-check. The default, everyone, is always
    /// right; a protocol that can tell cheaply names the peers (a ring: the holder of
    /// the turn).
    fn due(&self, entry: &Entry, facts: &Facts<'_>) -> Due {
        let _ = (entry, facts);
        Due::Everyone
    }
}

/// A fresh reducer for a plan's protocol.
pub fn reducer_for(plan: &TeamPlan) -> Box<dyn Reducer> {
    match &plan.protocol {
        ProtocolSpec::RoundRobin(spec) => Box::new(round_robin::RoundRobin::new(spec.clone())),
        ProtocolSpec::Debate(spec) => Box::new(debate::Debate::new(spec.clone())),
        ProtocolSpec::ProposerCritic(spec) => Box::new(proposer_critic::ProposerCritic::new(spec.clone())),
        ProtocolSpec::JudgedDebate(spec) => Box::new(judged_debate::JudgedDebate::new(spec.clone())),
        ProtocolSpec::Jury(spec) => Box::new(jury::Jury::new(spec.clone())),
        ProtocolSpec::Consensus(spec) => Box::new(consensus::Consensus::new(spec.clone())),
        ProtocolSpec::Emergent(spec) => Box::new(emergent::Emergent::new(spec.clone())),
        ProtocolSpec::Adversarial(spec) => Box::new(adversarial::Adversarial::new(spec.clone())),
        ProtocolSpec::Blackboard(spec) => Box::new(blackboard::BlackboardProtocol::new(spec.clone())),
        ProtocolSpec::WorkQueue(spec) => Box::new(work_queue::WorkQueueProtocol::new(spec.clone())),
        ProtocolSpec::ContractNet(spec) => Box::new(contract_net::ContractNet::new(spec.clone())),
        ProtocolSpec::Hybrid(spec) => Box::new(hybrid::Hybrid::new(spec.clone())),
        ProtocolSpec::Conversation(spec) => Box::new(conversation::Conversation::new(spec.clone())),
    }
}

/// Whether `step` is exactly `r{round}/{name}`, without building that string: reducers
/// check steps for every folded entry of every peer.
pub fn is_round_step(step: &str, round: u32, name: &str) -> bool {
    let Some((n, rest)) = step.strip_prefix('r').and_then(|s| s.split_once('/')) else {
        return false;
    };
    // Exactly the digits `format!` would write: no sign, no leading zero.
    rest == name
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && (n == "0" || !n.starts_with('0'))
        && n.parse::<u32>() == Ok(round)
}

/// `{key}` substitutions in configurable instructions.
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::is_round_step;

    #[test]
    fn round_steps_match_exactly_what_format_writes() {
        for r in [0u32, 1, 7, 10, 123] {
            assert!(is_round_step(&format!("r{r}/vote"), r, "vote"));
        }
        for (step, r) in [
            ("r1/vote", 2),
            ("r1/votes", 1),
            ("r01/vote", 1),
            ("r+1/vote", 1),
            ("r/vote", 0),
            ("1/vote", 1),
            ("r1", 1),
            ("x1/vote", 1),
        ] {
            assert!(!is_round_step(step, r, "vote"), "{step} for round {r}");
        }
    }
}
