//! The `[protocol]` table: one validated spec per protocol kind.
//!
//! The raw table accepts the union of every kind's keys; validation then checks that
//! each key given applies to the kind chosen, and names the kind's valid keys when one
//! does not. Peer references name the team's peers when they are wrong; choices name
//! the valid values.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Ctx, choices, ranges};
use crate::envelope::PeerId;
use crate::protocol::answers::Rule;

/// The collaboration protocol and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProtocolSpec {
    RoundRobin(RoundRobinSpec),
    Debate(DebateSpec),
    ProposerCritic(ProposerCriticSpec),
    JudgedDebate(JudgedDebateSpec),
    Jury(JurySpec),
    Consensus(ConsensusSpec),
    Emergent(EmergentSpec),
    Adversarial(AdversarialSpec),
    Blackboard(BlackboardSpec),
    WorkQueue(WorkQueueSpec),
    ContractNet(ContractNetSpec),
    Hybrid(HybridSpec),
    Conversation(ConversationSpec),
}

impl ProtocolSpec {
    pub const KINDS: &'static [&'static str] = &[
        "round_robin",
        "debate",
        "proposer_critic",
        "judged_debate",
        "jury",
        "consensus",
        "emergent",
        "adversarial",
        "blackboard",
        "work_queue",
        "contract_net",
        "hybrid",
        "conversation",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolSpec::RoundRobin(_) => "round_robin",
            ProtocolSpec::Debate(_) => "debate",
            ProtocolSpec::ProposerCritic(_) => "proposer_critic",
            ProtocolSpec::JudgedDebate(_) => "judged_debate",
            ProtocolSpec::Jury(_) => "jury",
            ProtocolSpec::Consensus(_) => "consensus",
            ProtocolSpec::Emergent(_) => "emergent",
            ProtocolSpec::Adversarial(_) => "adversarial",
            ProtocolSpec::Blackboard(_) => "blackboard",
            ProtocolSpec::WorkQueue(_) => "work_queue",
            ProtocolSpec::ContractNet(_) => "contract_net",
            ProtocolSpec::Hybrid(_) => "hybrid",
            ProtocolSpec::Conversation(_) => "conversation",
        }
    }

    /// The keys of `[protocol]` that apply to a kind (besides `kind`).
    pub fn keys(kind: &str) -> Option<&'static [&'static str]> {
        Some(match kind {
            "round_robin" => &["rounds", "order", "summarizer", "instruction", "summary_instruction"],
            "debate" => &["rounds", "members", "vote", "json", "instruction", "update_instruction"],
            "proposer_critic" => &[
                "rounds",
                "proposer",
                "critics",
                "satisfied_phrase",
                "instruction",
                "critic_instruction",
                "final_instruction",
            ],
            "judged_debate" => &["rounds", "members", "judge", "instruction", "judge_instruction", "final_instruction"],
            "jury" => &["rounds", "members", "aggregation", "threshold", "instruction"],
            "consensus" => &["rounds", "proposer", "voters", "threshold", "instruction", "vote_instruction"],
            "emergent" => &[
                "rounds",
                "members",
                "threshold",
                "similarity",
                "compare",
                "measurer",
                "instruction",
                "update_instruction",
            ],
            "adversarial" => &[
                "rounds",
                "proposer",
                "advocate",
                "voters",
                "judge",
                "instruction",
                "advocate_instruction",
                "vote_instruction",
            ],
            "blackboard" => &["sources", "answer_key", "done_phrase", "max_writes", "instruction"],
            "work_queue" => &[
                "tasks",
                "members",
                "on_dependency_failure",
                "answer_task",
                "lease_secs",
                "max_deliver",
                "instruction",
            ],
            "contract_net" => {
                &["tasks", "members", "capabilities", "bids", "max_reannounce", "answer_task", "instruction"]
            }
            "hybrid" => &[
                "members",
                "leader",
                "deadlock_rounds",
                "threshold",
                "instruction",
                "update_instruction",
                "leader_instruction",
                "decide_instruction",
            ],
            "conversation" => &["start", "finish", "max_turns", "instruction"],
            _ => return None,
        })
    }

    /// The work-queue settings a backend should open the session's queue with, for
    /// protocols that use one.
    pub fn queue_config(&self) -> Option<crate::workqueue::QueueConfig> {
        match self {
            ProtocolSpec::WorkQueue(w) => Some(crate::workqueue::QueueConfig {
                lease: std::time::Duration::from_millis(w.lease_ms),
                max_deliver: w.max_deliver,
            }),
            _ => None,
        }
    }

    /// Whether the protocol uses the shared blackboard.
    pub fn uses_blackboard(&self) -> bool {
        matches!(self, ProtocolSpec::Blackboard(_))
    }
}

/// Peers take turns in a ring for a number of rounds; an optional summarizer writes
/// the final answer. See [`crate::protocol::round_robin`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRobinSpec {
    pub rounds: u32,
    pub order: Vec<PeerId>,
    pub summarizer: Option<PeerId>,
    pub instruction: Option<String>,
    pub summary_instruction: Option<String>,
}

/// How a debate's final answers are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoteRule {
    Plurality,
    Majority,
}

/// Simultaneous rounds, then a vote. See [`crate::protocol::debate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DebateSpec {
    pub members: Vec<PeerId>,
    /// Rounds in all, the first (answers given alone) included.
    pub rounds: u32,
    pub vote: VoteRule,
    /// Ask for JSON answers `{answer, confidence, reason}`.
    pub json: bool,
    pub instruction: Option<String>,
    pub update_instruction: Option<String>,
}

/// A proposer, critics, a satisfaction signal. See [`crate::protocol::proposer_critic`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposerCriticSpec {
    pub proposer: PeerId,
    pub critics: Vec<PeerId>,
    pub rounds: u32,
    pub satisfied_phrase: String,
    pub instruction: Option<String>,
    pub critic_instruction: Option<String>,
    pub final_instruction: Option<String>,
}

/// Debaters with stances and a judge. See [`crate::protocol::judged_debate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgedDebateSpec {
    pub debaters: Vec<PeerId>,
    pub judge: PeerId,
    pub rounds: u32,
    pub instruction: Option<String>,
    pub judge_instruction: Option<String>,
    pub final_instruction: Option<String>,
}

/// Commit-reveal voting. See [`crate::protocol::jury`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JurySpec {
    pub jurors: Vec<PeerId>,
    pub rounds: u32,
    pub rule: Rule,
    pub instruction: Option<String>,
}

/// Propose, approve or reject, revise. See [`crate::protocol::consensus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsensusSpec {
    pub proposer: PeerId,
    pub voters: Vec<PeerId>,
    pub threshold: f64,
    pub rounds: u32,
    pub instruction: Option<String>,
    pub vote_instruction: Option<String>,
}

/// How emergent consensus measures similarity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimilarityKind {
    Lexical,
    Embedding,
}

/// What emergent consensus compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The whole answers.
    Text,
    /// The stated answers (`Answer: …`), falling back to the text.
    Answer,
}

/// Iterate until the answers converge. See [`crate::protocol::emergent`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmergentSpec {
    pub members: Vec<PeerId>,
    pub rounds: u32,
    pub threshold: f64,
    pub similarity: SimilarityKind,
    pub compare: Compare,
    /// Who measures embedding similarity (the first present member by default).
    pub measurer: Option<PeerId>,
    pub instruction: Option<String>,
    pub update_instruction: Option<String>,
}

/// A devil's advocate against every proposal. See [`crate::protocol::adversarial`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdversarialSpec {
    pub proposer: PeerId,
    pub advocate: PeerId,
    pub voters: Vec<PeerId>,
    pub judge: Option<PeerId>,
    pub rounds: u32,
    pub instruction: Option<String>,
    pub advocate_instruction: Option<String>,
    pub vote_instruction: Option<String>,
}

/// A knowledge source: a peer that contributes to one key of the board when the keys
/// it reads change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    pub peer: PeerId,
    pub reads: Vec<String>,
    pub writes: String,
}

/// Blackboard collaboration. See [`crate::protocol::blackboard`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlackboardSpec {
    pub sources: Vec<SourceSpec>,
    pub answer_key: String,
    pub done_phrase: Option<String>,
    pub max_writes: u32,
    pub instruction: Option<String>,
}

/// A unit of work for the work queue or contract net.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    pub description: String,
    pub depends_on: Vec<String>,
    /// Lower runs first among ready tasks.
    pub priority: i64,
    /// Skills a bidder needs (contract net).
    pub needs: Vec<String>,
    /// Load this task adds to its holder (contract net).
    pub size: u32,
}

/// What the holder of a task does when one of its dependencies failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDependencyFailure {
    /// Record the task as skipped, without a model call.
    Skip,
    /// Run it last, told which dependency failed.
    Continue,
}

/// Self-assigned work. See [`crate::protocol::work_queue`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkQueueSpec {
    pub tasks: Vec<TaskSpec>,
    pub members: Vec<PeerId>,
    pub on_dependency_failure: OnDependencyFailure,
    pub answer_task: Option<String>,
    pub lease_ms: u64,
    pub max_deliver: u32,
    pub instruction: Option<String>,
}

/// How contract-net bids are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BidMode {
    /// From the declared capabilities, without a model call.
    Skills,
    /// The bidder's model rates its capability (a JSON answer).
    Model,
}

/// Announce, bid, award. See [`crate::protocol::contract_net`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContractNetSpec {
    pub tasks: Vec<TaskSpec>,
    pub members: Vec<PeerId>,
    pub capabilities: BTreeMap<PeerId, Vec<String>>,
    pub bids: BidMode,
    pub max_reannounce: u32,
    pub answer_task: Option<String>,
    pub instruction: Option<String>,
}

/// Peers work peer to peer; a leader decides on deadlock. See [`crate::protocol::hybrid`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HybridSpec {
    pub leader: PeerId,
    pub members: Vec<PeerId>,
    pub deadlock_rounds: u32,
    pub threshold: f64,
    pub instruction: Option<String>,
    pub update_instruction: Option<String>,
    pub leader_instruction: Option<String>,
    pub decide_instruction: Option<String>,
}

/// Peers address each other by name and decide the flow. See
/// [`crate::protocol::conversation`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConversationSpec {
    /// The peers the task goes to (every peer when empty).
    pub start: Vec<PeerId>,
    pub finish: FinishRule,
    /// Turns each peer may take.
    pub max_turns: u32,
    pub instruction: Option<String>,
}

/// Whose `finish` ends a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishRule {
    /// The first proposal of any peer.
    Any,
    /// More than half of the peers present proposed; their most common answer.
    Majority,
    /// This peer's proposal.
    Peer(PeerId),
}

/// Most turns a conversation peer may be allowed.
pub const MAX_CONVERSATION_TURNS: u32 = 10_000;

// ----------------------------------------------------------------------------------
// The raw table.

macro_rules! raw_protocol {
    ($($(#[$doc:meta])* $field:ident : $ty:ty as $plain:tt),* $(,)?) => {
        /// The collaboration protocol (`[protocol]`): `kind`, then the keys of that kind.
        #[derive(Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub(super) struct RawProtocol {
            /// Which protocol the team follows.
            #[schemars(with = "String", extend("enum" = ProtocolSpec::KINDS))]
            pub(super) kind: Spanned<String>,
            $($(#[$doc])* #[schemars(with = $plain)] $field: Option<Spanned<$ty>>,)*
        }
        impl RawProtocol {
            /// Every key given, with where it is.
            fn present(&self) -> Vec<(&'static str, usize)> {
                let mut v = Vec::new();
                $(if let Some(x) = &self.$field { v.push((stringify!($field), x.span().start)); })*
                v
            }
        }
    };
}

/// The choices of `[protocol]` keys whose value is one of a fixed set.
pub const VOTE_CHOICES: &[&str] = &["plurality", "majority"];
pub const AGGREGATION_CHOICES: &[&str] = &["plurality", "approval", "confidence"];
pub const SIMILARITY_CHOICES: &[&str] = &["lexical", "embedding"];
pub const COMPARE_CHOICES: &[&str] = &["text", "answer"];
pub const ON_DEPENDENCY_FAILURE_CHOICES: &[&str] = &["skip", "continue"];
pub const BIDS_CHOICES: &[&str] = &["skills", "model"];

raw_protocol! {
    /// Rounds in all, counted from 1. For proposer/critic, consensus and adversarial:
    /// the proposals (and revisions) allowed.
    #[schemars(range(min = 1, max = 10000), extend("x-defaults" = {
        "round_robin": 3, "debate": 2, "proposer_critic": 3, "judged_debate": 3, "jury": 1,
        "consensus": 3, "emergent": 5, "adversarial": 3
    }))]
    rounds: u32 as "Option<u32>",
    /// The speaking order, as peer ids.
    #[schemars(extend("x-default" = "every peer but the summarizer, in team order"))]
    order: Vec<Spanned<String>> as "Option<Vec<String>>",
    /// The peer that writes the final answer after the last round (round robin);
    /// without one, the last turn is the answer.
    summarizer: String as "Option<String>",
    /// What every peer is asked to do on its turn (added after the topic).
    instruction: String as "Option<String>",
    /// Round robin: what the summarizer is asked for when it writes the final answer.
    /// (Not `[context] instruction`, which asks for a summary of older rounds.)
    summary_instruction: String as "Option<String>",
    /// What members are asked in rounds after the first (they see the others' answers).
    update_instruction: String as "Option<String>",
    /// What critics are asked (proposer/critic).
    critic_instruction: String as "Option<String>",
    /// What the proposer (proposer/critic) or the judge (judged debate) is asked for
    /// the final answer.
    final_instruction: String as "Option<String>",
    /// What the judge is asked each round (judged debate).
    judge_instruction: String as "Option<String>",
    /// What voters are asked (consensus, adversarial).
    vote_instruction: String as "Option<String>",
    /// What the devil's advocate is asked (adversarial).
    advocate_instruction: String as "Option<String>",
    /// What the leader is told while it waits (hybrid).
    leader_instruction: String as "Option<String>",
    /// What the leader is asked when it must decide (hybrid).
    decide_instruction: String as "Option<String>",
    /// The peers that take part, as peer ids.
    #[schemars(extend("x-default" = "every peer (debate, jury, emergent, work_queue, contract_net); every peer but the judge (judged_debate) or the leader (hybrid)"))]
    members: Vec<Spanned<String>> as "Option<Vec<String>>",
    /// How a debate's final answers are counted.
    #[schemars(extend("enum" = VOTE_CHOICES, "default" = "plurality"))]
    vote: String as "Option<String>",
    /// Debate: ask for JSON answers `{"answer", "confidence", "reason"}`.
    #[schemars(extend("default" = false))]
    json: bool as "Option<bool>",
    /// The peer that proposes and revises.
    #[schemars(extend("x-default" = "the first peer"))]
    proposer: String as "Option<String>",
    /// The critics, as peer ids.
    #[schemars(extend("x-default" = "every peer but the proposer"))]
    critics: Vec<Spanned<String>> as "Option<Vec<String>>",
    /// The phrase a critic's free-text answer contains when it is satisfied (its JSON
    /// `satisfied` field is read first).
    #[schemars(extend("default" = "SATISFIED"))]
    satisfied_phrase: String as "Option<String>",
    /// The judge (judged debate: required; adversarial: rules on objections instead of
    /// voters).
    judge: String as "Option<String>",
    /// How the jury's ballots are counted.
    #[schemars(extend("enum" = AGGREGATION_CHOICES, "default" = "plurality"))]
    aggregation: String as "Option<String>",
    /// The fraction needed: approvals (consensus, default 2/3), approval aggregation
    /// (jury, default 0.6), similarity (emergent, default 0.8), agreement before the
    /// leader is needed (hybrid, default 1.0).
    #[schemars(range(min = 0.0, max = 1.0), extend("x-defaults" = {
        "consensus": 0.6667, "jury": 0.6, "emergent": 0.8, "hybrid": 1.0
    }))]
    threshold: f64 as "Option<f64>",
    /// The voters, as peer ids.
    #[schemars(extend("x-default" = "every peer but the proposer (and the advocate)"))]
    voters: Vec<Spanned<String>> as "Option<Vec<String>>",
    /// How answers' similarity is measured (emergent).
    #[schemars(extend("enum" = SIMILARITY_CHOICES, "default" = "lexical"))]
    similarity: String as "Option<String>",
    /// What is compared: whole texts, or the stated answers (`Answer: …`).
    #[schemars(extend("enum" = COMPARE_CHOICES, "default" = "text"))]
    compare: String as "Option<String>",
    /// Who measures embedding similarity (emergent, `similarity = "embedding"`).
    #[schemars(extend("x-default" = "the first present member"))]
    measurer: String as "Option<String>",
    /// The devil's advocate (adversarial; required).
    advocate: String as "Option<String>",
    /// The knowledge sources (blackboard; required): `[[protocol.sources]]`.
    sources: Vec<Spanned<RawSource>> as "Option<Vec<RawSource>>",
    /// The board key holding the answer (blackboard).
    #[schemars(extend("x-default" = "the key the last source writes"))]
    answer_key: String as "Option<String>",
    /// A phrase that ends the blackboard session when a write contains it.
    done_phrase: String as "Option<String>",
    /// Board writes allowed in all (blackboard).
    #[schemars(range(min = 1), extend("default" = 20))]
    max_writes: u32 as "Option<u32>",
    /// The tasks (work_queue, contract_net; required): `[[protocol.tasks]]`.
    tasks: Vec<Spanned<RawTask>> as "Option<Vec<RawTask>>",
    /// What a task's holder does when a dependency failed (work queue).
    #[schemars(extend("enum" = ON_DEPENDENCY_FAILURE_CHOICES, "default" = "skip"))]
    on_dependency_failure: String as "Option<String>",
    /// The task whose result is the session's answer.
    #[schemars(extend("x-default" = "every task's result, in order"))]
    answer_task: String as "Option<String>",
    /// Seconds a claimed task is held before it is offered again (work queue).
    #[schemars(range(min = 0.01, max = 604800.0), extend("default" = 30))]
    lease_secs: f64 as "Option<f64>",
    /// Deliveries of a task before it is dead-lettered (work queue).
    #[schemars(range(min = 1, max = 1000), extend("default" = 5))]
    max_deliver: u32 as "Option<u32>",
    /// Each member's skills (contract net): `capabilities = { alice = ["sql"] }`.
    capabilities: BTreeMap<String, Vec<String>> as "Option<BTreeMap<String, Vec<String>>>",
    /// How bids are made: from declared skills, or by asking the bidder's model.
    #[schemars(extend("enum" = BIDS_CHOICES, "default" = "skills"))]
    bids: String as "Option<String>",
    /// Times a task with no bids is announced again (contract net).
    #[schemars(extend("default" = 2))]
    max_reannounce: u32 as "Option<u32>",
    /// The peer that decides when the members deadlock (hybrid; required).
    leader: String as "Option<String>",
    /// Rounds without agreement before the leader decides (hybrid).
    #[schemars(range(min = 1, max = 10000), extend("default" = 2))]
    deadlock_rounds: u32 as "Option<u32>",
    /// The peers the task goes to first (conversation).
    #[schemars(extend("x-default" = "every peer"))]
    start: Vec<Spanned<String>> as "Option<Vec<String>>",
    /// Whose `finish` ends a conversation: `any` (the first proposal), `majority` (more
    /// than half of the peers present proposed), or a peer id (that peer's proposal).
    #[schemars(extend("default" = "any"))]
    finish: String as "Option<String>",
    /// Turns each peer may take (conversation).
    #[schemars(range(min = 1, max = MAX_CONVERSATION_TURNS), extend("default" = 10))]
    max_turns: u32 as "Option<u32>",
}

/// A knowledge source (`[[protocol.sources]]`): a peer that writes one board key when
/// the keys it reads change.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    /// The peer id of the source.
    #[schemars(with = "String")]
    peer: Spanned<String>,
    /// Board keys that trigger it (`task` is the topic).
    #[serde(default)]
    #[schemars(with = "Vec<String>", example = &["task"])]
    reads: Vec<Spanned<String>>,
    /// The board key it writes.
    #[schemars(with = "String", example = &"notes")]
    writes: Spanned<String>,
}

/// A unit of work (`[[protocol.tasks]]`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTask {
    /// The task id: 1-64 letters, digits, `-` or `_`.
    #[schemars(with = "String", example = &"schema")]
    id: Spanned<String>,
    /// What to do.
    description: String,
    /// Task ids that must finish first.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    depends_on: Vec<Spanned<String>>,
    /// Lower runs first among ready tasks.
    #[schemars(extend("default" = 0))]
    priority: Option<i64>,
    /// Skills a bidder needs (contract net).
    #[serde(default)]
    needs: Vec<String>,
    /// Load the task adds to its holder (contract net).
    #[schemars(range(min = 1), extend("default" = 1))]
    size: Option<u32>,
}

fn inner<T: Clone>(s: &Option<Spanned<T>>) -> Option<T> {
    s.as_ref().map(|s| s.get_ref().clone())
}

/// Validate a `[protocol]` table against the team's peers.
pub(super) fn validate_protocol(cx: &mut Ctx<'_>, p: RawProtocol, peers: &[PeerId]) -> Option<ProtocolSpec> {
    let kind = p.kind.get_ref().as_str();
    let kind_at = p.kind.span().start;
    let Some(allowed) = ProtocolSpec::keys(kind) else {
        cx.err_at(
            kind_at,
            "protocol.kind",
            format!("unknown protocol `{kind}`; valid: {}", choices(ProtocolSpec::KINDS)),
        );
        return None;
    };
    let before = cx.errors.len();
    for (key, at) in p.present() {
        if !allowed.contains(&key) {
            cx.err_at(
                at,
                format!("protocol.{key}"),
                format!("`{key}` is not a key of protocol `{kind}`; its keys: {}", choices(allowed.iter())),
            );
        }
    }
    let ids: BTreeSet<&str> = peers.iter().map(PeerId::as_str).collect();
    let known = |cx: &mut Ctx<'_>, name: &str, at: usize, key: &str| -> Option<PeerId> {
        if ids.contains(name) {
            Some(PeerId::from(name))
        } else {
            cx.err_at(at, format!("protocol.{key}"), format!("unknown peer `{name}`; peers: {}", choices(&ids)));
            None
        }
    };
    let one = |cx: &mut Ctx<'_>, s: &Option<Spanned<String>>, key: &str| -> Option<PeerId> {
        s.as_ref().and_then(|s| known(cx, s.get_ref(), s.span().start, key))
    };
    // A list of peers: each known, none twice (a repeated peer would take another's place).
    let list = |cx: &mut Ctx<'_>, s: &Option<Spanned<Vec<Spanned<String>>>>, key: &str| -> Option<Vec<PeerId>> {
        s.as_ref().map(|v| {
            let mut out: Vec<PeerId> = Vec::new();
            for s in v.get_ref() {
                let Some(id) = known(cx, s.get_ref(), s.span().start, key) else { continue };
                if out.contains(&id) {
                    cx.err_at(s.span().start, format!("protocol.{key}"), format!("peer `{id}` is listed twice"));
                } else {
                    out.push(id);
                }
            }
            out
        })
    };
    let pick = |cx: &mut Ctx<'_>,
                s: &Option<Spanned<String>>,
                key: &str,
                valid: &[&'static str],
                default: &'static str|
     -> &'static str {
        match s {
            None => default,
            Some(s) => match valid.iter().find(|v| **v == s.get_ref().as_str()) {
                Some(v) => v,
                None => {
                    cx.err_at(
                        s.span().start,
                        format!("protocol.{key}"),
                        format!("unknown value `{}`; valid: {}", s.get_ref(), choices(valid)),
                    );
                    default
                }
            },
        }
    };
    let rounds = |cx: &mut Ctx<'_>, default: u32| -> u32 {
        cx.count(p.rounds.clone(), "protocol.rounds", ranges::ROUNDS).unwrap_or(default)
    };
    let fraction = |cx: &mut Ctx<'_>, s: &Option<Spanned<f64>>, key: &str, default: f64| -> f64 {
        match s {
            Some(t) if !(0.0..=1.0).contains(t.get_ref()) => {
                cx.err_at(t.span().start, format!("protocol.{key}"), format!("{key} must be between 0 and 1"));
                default
            }
            Some(t) => *t.get_ref(),
            None => default,
        }
    };
    // A role that must be filled: given, or else an error naming the key.
    let required = |cx: &mut Ctx<'_>, s: &Option<Spanned<String>>, key: &str, what: &str| -> Option<PeerId> {
        if s.is_none() {
            cx.err_at(
                kind_at,
                format!("protocol.{key}"),
                format!("protocol `{kind}` needs `{key}` ({what}); peers: {}", choices(&ids)),
            );
        }
        one(cx, s, key)
    };
    let others =
        |excluded: &[&PeerId]| -> Vec<PeerId> { peers.iter().filter(|p| !excluded.contains(p)).cloned().collect() };
    let need = |cx: &mut Ctx<'_>, group: &[PeerId], n: usize, key: &str, what: &str| {
        if group.len() < n {
            cx.err_at(
                kind_at,
                format!("protocol.{key}"),
                format!("protocol `{kind}` needs at least {n} {what}, has {}", group.len()),
            );
        }
    };
    let first = peers.first().cloned().unwrap_or_else(|| PeerId::from("?"));

    let spec = match kind {
        "round_robin" => {
            let summarizer = one(cx, &p.summarizer, "summarizer");
            let order = list(cx, &p.order, "order")
                .unwrap_or_else(|| peers.iter().filter(|id| Some(*id) != summarizer.as_ref()).cloned().collect());
            let rounds = rounds(cx, 3);
            need(cx, &order, 1, "order", "speaker");
            ProtocolSpec::RoundRobin(RoundRobinSpec {
                rounds,
                order,
                summarizer,
                instruction: inner(&p.instruction),
                summary_instruction: inner(&p.summary_instruction),
            })
        }
        "debate" => {
            let members = list(cx, &p.members, "members").unwrap_or_else(|| peers.to_vec());
            need(cx, &members, 1, "members", "member");
            let rounds = rounds(cx, 2);
            // A debate of one is defined as one answer: the single-agent baseline.
            if members.len() == 1 && rounds > 1 {
                let at = p.rounds.as_ref().map_or(kind_at, |r| r.span().start);
                cx.err_at(
                    at,
                    "protocol.rounds",
                    "a debate of one member has no one to debate: rounds must be 1 (a single answer), or add members",
                );
            }
            let vote = match pick(cx, &p.vote, "vote", VOTE_CHOICES, "plurality") {
                "majority" => VoteRule::Majority,
                _ => VoteRule::Plurality,
            };
            ProtocolSpec::Debate(DebateSpec {
                members,
                rounds,
                vote,
                json: inner(&p.json).unwrap_or(false),
                instruction: inner(&p.instruction),
                update_instruction: inner(&p.update_instruction),
            })
        }
        "proposer_critic" => {
            let proposer = one(cx, &p.proposer, "proposer").unwrap_or_else(|| first.clone());
            let critics = list(cx, &p.critics, "critics").unwrap_or_else(|| others(&[&proposer]));
            need(cx, &critics, 1, "critics", "critic");
            if critics.contains(&proposer) {
                cx.err_at(kind_at, "protocol.critics", format!("the proposer `{proposer}` cannot also be a critic"));
            }
            let phrase = inner(&p.satisfied_phrase).unwrap_or_else(|| "SATISFIED".into());
            if phrase.trim().is_empty() {
                cx.err_at(kind_at, "protocol.satisfied_phrase", "satisfied_phrase must not be empty");
            }
            ProtocolSpec::ProposerCritic(ProposerCriticSpec {
                proposer,
                critics,
                rounds: rounds(cx, 3),
                satisfied_phrase: phrase,
                instruction: inner(&p.instruction),
                critic_instruction: inner(&p.critic_instruction),
                final_instruction: inner(&p.final_instruction),
            })
        }
        "judged_debate" => {
            let judge = required(cx, &p.judge, "judge", "the peer that judges");
            let judge = judge.unwrap_or_else(|| first.clone());
            let debaters = list(cx, &p.members, "members").unwrap_or_else(|| others(&[&judge]));
            need(cx, &debaters, 2, "members", "debaters");
            if debaters.contains(&judge) {
                cx.err_at(kind_at, "protocol.members", format!("the judge `{judge}` cannot also debate"));
            }
            ProtocolSpec::JudgedDebate(JudgedDebateSpec {
                debaters,
                judge,
                rounds: rounds(cx, 3),
                instruction: inner(&p.instruction),
                judge_instruction: inner(&p.judge_instruction),
                final_instruction: inner(&p.final_instruction),
            })
        }
        "jury" => {
            let jurors = list(cx, &p.members, "members").unwrap_or_else(|| peers.to_vec());
            need(cx, &jurors, 2, "members", "jurors (a jury of one is one model answering)");
            let rule = match pick(cx, &p.aggregation, "aggregation", AGGREGATION_CHOICES, "plurality") {
                "approval" => Rule::Approval { threshold: fraction(cx, &p.threshold, "threshold", 0.6) },
                "confidence" => Rule::Confidence,
                _ => Rule::Plurality,
            };
            if p.threshold.is_some() && !matches!(rule, Rule::Approval { .. }) {
                let at = p.threshold.as_ref().map_or(kind_at, |t| t.span().start);
                cx.err_at(at, "protocol.threshold", "threshold applies to aggregation = \"approval\" only");
            }
            ProtocolSpec::Jury(JurySpec { jurors, rounds: rounds(cx, 1), rule, instruction: inner(&p.instruction) })
        }
        "consensus" => {
            let proposer = one(cx, &p.proposer, "proposer").unwrap_or_else(|| first.clone());
            let voters = list(cx, &p.voters, "voters").unwrap_or_else(|| others(&[&proposer]));
            need(cx, &voters, 1, "voters", "voter");
            if voters.contains(&proposer) {
                let at = p.voters.as_ref().map_or(kind_at, |v| v.span().start);
                cx.err_at(at, "protocol.voters", format!("the proposer `{proposer}` cannot vote on its own proposal"));
            }
            ProtocolSpec::Consensus(ConsensusSpec {
                proposer,
                voters,
                threshold: fraction(cx, &p.threshold, "threshold", 2.0 / 3.0),
                rounds: rounds(cx, 3),
                instruction: inner(&p.instruction),
                vote_instruction: inner(&p.vote_instruction),
            })
        }
        "emergent" => {
            let members = list(cx, &p.members, "members").unwrap_or_else(|| peers.to_vec());
            need(cx, &members, 2, "members", "members");
            let similarity = match pick(cx, &p.similarity, "similarity", SIMILARITY_CHOICES, "lexical") {
                "embedding" => SimilarityKind::Embedding,
                _ => SimilarityKind::Lexical,
            };
            let compare = match pick(cx, &p.compare, "compare", COMPARE_CHOICES, "text") {
                "answer" => Compare::Answer,
                _ => Compare::Text,
            };
            let measurer = one(cx, &p.measurer, "measurer");
            if measurer.is_some() && similarity == SimilarityKind::Lexical {
                let at = p.measurer.as_ref().map_or(kind_at, |m| m.span().start);
                cx.err_at(at, "protocol.measurer", "measurer applies to similarity = \"embedding\" only");
            }
            ProtocolSpec::Emergent(EmergentSpec {
                members,
                rounds: rounds(cx, 5),
                threshold: fraction(cx, &p.threshold, "threshold", 0.8),
                similarity,
                compare,
                measurer,
                instruction: inner(&p.instruction),
                update_instruction: inner(&p.update_instruction),
            })
        }
        "adversarial" => {
            let proposer = one(cx, &p.proposer, "proposer").unwrap_or_else(|| first.clone());
            let advocate =
                required(cx, &p.advocate, "advocate", "the devil's advocate").unwrap_or_else(|| first.clone());
            let judge = one(cx, &p.judge, "judge");
            if advocate == proposer && cx.errors.len() == before {
                cx.err_at(kind_at, "protocol.advocate", "the devil's advocate cannot be the proposer");
            }
            let voters = match list(cx, &p.voters, "voters") {
                Some(v) => v,
                None if judge.is_some() => Vec::new(),
                None => others(&[&proposer, &advocate]),
            };
            if judge.is_none() {
                need(cx, &voters, 1, "voters", "voter (or a `judge`)");
            }
            if voters.contains(&advocate) || voters.contains(&proposer) {
                cx.err_at(kind_at, "protocol.voters", "the proposer and the advocate cannot vote on the objection");
            }
            ProtocolSpec::Adversarial(AdversarialSpec {
                proposer,
                advocate,
                voters,
                judge,
                rounds: rounds(cx, 3),
                instruction: inner(&p.instruction),
                advocate_instruction: inner(&p.advocate_instruction),
                vote_instruction: inner(&p.vote_instruction),
            })
        }
        "blackboard" => {
            let mut sources = Vec::new();
            if p.sources.is_none() {
                cx.err_at(
                    kind_at,
                    "protocol.sources",
                    "protocol `blackboard` needs [[protocol.sources]] entries (peer, reads, writes)",
                );
            }
            let mut written = BTreeSet::new();
            for (i, s) in p.sources.iter().flat_map(|s| s.get_ref().iter()).enumerate() {
                let s = s.get_ref();
                let key = format!("sources[{i}]");
                let peer = known(cx, s.peer.get_ref(), s.peer.span().start, &format!("{key}.peer"));
                for k in s.reads.iter().chain(std::iter::once(&s.writes)) {
                    if let Err(e) = crate::blackboard::validate_key(k.get_ref()) {
                        cx.err_at(k.span().start, format!("protocol.{key}"), e.message().to_string());
                    }
                }
                if s.writes.get_ref() == "task" {
                    cx.err_at(
                        s.writes.span().start,
                        format!("protocol.{key}.writes"),
                        "`task` is the topic and cannot be written",
                    );
                }
                written.insert(s.writes.get_ref().clone());
                if let Some(peer) = peer {
                    sources.push(SourceSpec {
                        peer,
                        reads: s.reads.iter().map(|r| r.get_ref().clone()).collect(),
                        writes: s.writes.get_ref().clone(),
                    });
                }
            }
            for (i, s) in p.sources.iter().flat_map(|s| s.get_ref().iter()).enumerate() {
                for r in &s.get_ref().reads {
                    if r.get_ref() != "task" && !written.contains(r.get_ref()) {
                        cx.err_at(
                            r.span().start,
                            format!("protocol.sources[{i}].reads"),
                            format!(
                                "no source writes `{}`; written keys: {}",
                                r.get_ref(),
                                choices(written.iter().chain(["task".to_string()].iter()))
                            ),
                        );
                    }
                }
            }
            let answer_key = match &p.answer_key {
                Some(k) => {
                    if !written.contains(k.get_ref()) {
                        cx.err_at(
                            k.span().start,
                            "protocol.answer_key",
                            format!("no source writes `{}`; written keys: {}", k.get_ref(), choices(&written)),
                        );
                    }
                    k.get_ref().clone()
                }
                None => sources.last().map(|s| s.writes.clone()).unwrap_or_default(),
            };
            let max_writes = cx.count(p.max_writes.clone(), "protocol.max_writes", ranges::ROUNDS).unwrap_or(20);
            ProtocolSpec::Blackboard(BlackboardSpec {
                sources,
                answer_key,
                done_phrase: inner(&p.done_phrase).filter(|s| !s.is_empty()),
                max_writes,
                instruction: inner(&p.instruction),
            })
        }
        "work_queue" | "contract_net" => {
            let tasks = validate_tasks(cx, &p.tasks, kind_at, kind);
            let members = list(cx, &p.members, "members").unwrap_or_else(|| peers.to_vec());
            need(cx, &members, 1, "members", "member");
            let answer_task = match &p.answer_task {
                Some(t) if !tasks.iter().any(|x| &x.id == t.get_ref()) => {
                    cx.err_at(
                        t.span().start,
                        "protocol.answer_task",
                        format!("no task `{}`; tasks: {}", t.get_ref(), choices(tasks.iter().map(|t| &t.id))),
                    );
                    None
                }
                t => inner(t),
            };
            if kind == "work_queue" {
                let on = match pick(
                    cx,
                    &p.on_dependency_failure,
                    "on_dependency_failure",
                    ON_DEPENDENCY_FAILURE_CHOICES,
                    "skip",
                ) {
                    "continue" => OnDependencyFailure::Continue,
                    _ => OnDependencyFailure::Skip,
                };
                let lease_ms = cx
                    .real(p.lease_secs.clone(), "protocol.lease_secs", ranges::LEASE_SECS)
                    .map_or(30_000, ranges::millis);
                let max_deliver =
                    cx.count(p.max_deliver.clone(), "protocol.max_deliver", ranges::DELIVERIES).unwrap_or(5);
                ProtocolSpec::WorkQueue(WorkQueueSpec {
                    tasks,
                    members,
                    on_dependency_failure: on,
                    answer_task,
                    lease_ms,
                    max_deliver,
                    instruction: inner(&p.instruction),
                })
            } else {
                let mut capabilities = BTreeMap::new();
                if let Some(c) = &p.capabilities {
                    for (peer, skills) in c.get_ref() {
                        if let Some(id) = known(cx, peer, c.span().start, "capabilities") {
                            capabilities.insert(id, skills.clone());
                        }
                    }
                }
                let bids = match pick(cx, &p.bids, "bids", BIDS_CHOICES, "skills") {
                    "model" => BidMode::Model,
                    _ => BidMode::Skills,
                };
                ProtocolSpec::ContractNet(ContractNetSpec {
                    tasks,
                    members,
                    capabilities,
                    bids,
                    max_reannounce: cx
                        .count(p.max_reannounce.clone(), "protocol.max_reannounce", ranges::REANNOUNCE)
                        .unwrap_or(2),
                    answer_task,
                    instruction: inner(&p.instruction),
                })
            }
        }
        "hybrid" => {
            let leader =
                required(cx, &p.leader, "leader", "the peer that decides on deadlock").unwrap_or_else(|| first.clone());
            let members = list(cx, &p.members, "members").unwrap_or_else(|| others(&[&leader]));
            need(cx, &members, 2, "members", "members");
            if members.contains(&leader) {
                cx.err_at(kind_at, "protocol.members", format!("the leader `{leader}` cannot also be a member"));
            }
            let k = cx.count(p.deadlock_rounds.clone(), "protocol.deadlock_rounds", ranges::ROUNDS).unwrap_or(2);
            ProtocolSpec::Hybrid(HybridSpec {
                leader,
                members,
                deadlock_rounds: k,
                threshold: fraction(cx, &p.threshold, "threshold", 1.0),
                instruction: inner(&p.instruction),
                update_instruction: inner(&p.update_instruction),
                leader_instruction: inner(&p.leader_instruction),
                decide_instruction: inner(&p.decide_instruction),
            })
        }
        "conversation" => {
            let start = list(cx, &p.start, "start").unwrap_or_default();
            let finish = match &p.finish {
                None => FinishRule::Any,
                Some(f) => match f.get_ref().as_str() {
                    "any" => FinishRule::Any,
                    "majority" => FinishRule::Majority,
                    other => match known(cx, other, f.span().start, "finish") {
                        Some(id) => FinishRule::Peer(id),
                        None => {
                            // `known` named the peers; say the rules too.
                            if let Some(e) = cx.errors.last_mut() {
                                e.message = format!(
                                    "unknown finishing rule `{other}`; valid: `any`, `majority`, or a peer: {}",
                                    choices(&ids)
                                );
                            }
                            FinishRule::Any
                        }
                    },
                },
            };
            let max_turns = match &p.max_turns {
                Some(m) if !(1..=MAX_CONVERSATION_TURNS).contains(m.get_ref()) => {
                    cx.err_at(
                        m.span().start,
                        "protocol.max_turns",
                        format!("max_turns must be between 1 and {MAX_CONVERSATION_TURNS}"),
                    );
                    10
                }
                Some(m) => *m.get_ref(),
                None => 10,
            };
            ProtocolSpec::Conversation(ConversationSpec {
                start,
                finish,
                max_turns,
                instruction: inner(&p.instruction),
            })
        }
        _ => unreachable!("keys() knows every kind"),
    };
    (cx.errors.len() == before).then_some(spec)
}

fn validate_tasks(
    cx: &mut Ctx<'_>,
    raw: &Option<Spanned<Vec<Spanned<RawTask>>>>,
    kind_at: usize,
    kind: &str,
) -> Vec<TaskSpec> {
    let Some(raw) = raw else {
        cx.err_at(
            kind_at,
            "protocol.tasks",
            format!("protocol `{kind}` needs [[protocol.tasks]] entries (id, description)"),
        );
        return Vec::new();
    };
    let mut ids = BTreeSet::new();
    let mut tasks = Vec::new();
    for (i, t) in raw.get_ref().iter().enumerate() {
        let t = t.get_ref();
        let id = t.id.get_ref().trim().to_string();
        let ok =
            !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            cx.err_at(
                t.id.span().start,
                format!("protocol.tasks[{i}].id"),
                format!("task id {id:?} must be 1-64 letters, digits, '-' or '_'"),
            );
        } else if !ids.insert(id.clone()) {
            cx.err_at(t.id.span().start, format!("protocol.tasks[{i}].id"), format!("task id `{id}` is used twice"));
        }
        tasks.push(TaskSpec {
            id,
            description: t.description.clone(),
            depends_on: t.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
            priority: t.priority.unwrap_or(0),
            needs: t.needs.clone(),
            size: t.size.unwrap_or(1).max(1),
        });
    }
    for (i, t) in raw.get_ref().iter().enumerate() {
        for d in &t.get_ref().depends_on {
            if !ids.contains(d.get_ref()) {
                cx.err_at(
                    d.span().start,
                    format!("protocol.tasks[{i}].depends_on"),
                    format!("no task `{}`; tasks: {}", d.get_ref(), choices(&ids)),
                );
            }
        }
    }
    if tasks.is_empty() {
        cx.err_at(raw.span().start, "protocol.tasks", "at least one task is needed");
    }
    // Dependencies must not form a cycle (Kahn's algorithm over the valid ones).
    let mut indeg: BTreeMap<&str, usize> = tasks.iter().map(|t| (t.id.as_str(), 0)).collect();
    for t in &tasks {
        for d in &t.depends_on {
            if ids.contains(d) {
                *indeg.get_mut(t.id.as_str()).expect("task") += 1;
            }
        }
    }
    let mut ready: Vec<&str> = indeg.iter().filter(|(_, n)| **n == 0).map(|(k, _)| *k).collect();
    let mut seen = 0;
    while let Some(k) = ready.pop() {
        seen += 1;
        for t in &tasks {
            if t.depends_on.iter().any(|d| d == k) {
                let n = indeg.get_mut(t.id.as_str()).expect("task");
                *n -= 1;
                if *n == 0 {
                    ready.push(&t.id);
                }
            }
        }
    }
    if seen < indeg.len() {
        cx.err_at(raw.span().start, "protocol.tasks", "task dependencies form a cycle");
    }
    tasks
}
