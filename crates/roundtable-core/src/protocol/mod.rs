//! Collaboration protocols as deterministic reducers over the session log.
//!
//! Every peer runs its own [`Reducer`] over the same log and so reaches the same state:
//! whose turn it is, what round it is, whether the protocol has finished and with what
//! answer. From that state each peer reads its own [`Duty`] — speak, post, or nothing —
//! and no coordinator is needed. A reducer never reads the clock, never draws random
//! numbers and never looks at anything but the entries it is given.
//!
//! The generic parts every protocol shares (the task, the tally, absent peers, the stop
//! decision, budgets) live in [`crate::session::SessionState`], which drives the
//! reducer.

pub mod round_robin;

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
    /// A decision any peer may record (a stop, an absence): its id does not depend on
    /// which peer records it, so the first one wins and the others are duplicates.
    pub collective: bool,
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
    },
    /// Append this body as it is, without a model call.
    Post { body: Body },
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
}

/// A protocol's natural end.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: String,
    pub answer: Option<Arc<str>>,
    /// The envelopes the decision was made from.
    pub decided_by: Vec<EnvelopeId>,
}

/// One peer's view of a protocol: state folded from the log, and duties read from it.
pub trait Reducer: Send + Sync {
    /// Fold one entry in. Called for every entry, in log order, after the session
    /// state has folded it (so `facts` already reflects it).
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>);
    /// What `me` must do now; empty when it must wait.
    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty>;
    /// Whether the protocol has reached its natural end.
    fn finished(&self, facts: &Facts<'_>) -> Option<Finish>;
    /// Progress signals for termination conditions.
    fn signals(&self) -> Signals;
    /// The best answer so far, used when a limit stops the session early.
    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)>;
}

/// A fresh reducer for a plan's protocol.
pub fn reducer_for(plan: &TeamPlan) -> Box<dyn Reducer> {
    match &plan.protocol {
        ProtocolSpec::RoundRobin(spec) => Box::new(round_robin::RoundRobin::new(spec.clone())),
    }
}
