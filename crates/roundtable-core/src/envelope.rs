//! The one message type. Every interaction between peers is an [`Envelope`] appended to
//! the session log; nothing else crosses between peers.
//!
//! Envelopes are serialized as JSON with a `v` version field. An envelope produced by a
//! protocol step has an id derived from `(session, peer, step)`, so a peer that re-does a
//! step after a crash produces the same id and the log drops the duplicate.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Current envelope wire version.
pub const ENVELOPE_VERSION: u32 = 1;

/// Largest envelope accepted from the wire, in bytes of JSON.
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

macro_rules! shared_str_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                // Ids are mostly clones of one another: the same pointer is the same id.
                Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                // As the string hashes, like equality (a `Borrow<str>` lookup relies on it).
                self.0.hash(state)
            }
        }

        impl $name {
            pub fn new(s: impl AsRef<str>) -> Self {
                Self(Arc::from(s.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

shared_str_id!(
    /// A peer's id, unique within a team.
    PeerId
);
shared_str_id!(
    /// A session's id.
    SessionId
);
shared_str_id!(
    /// An envelope's id: 32 hex characters, derived from (session, peer, step).
    EnvelopeId
);

impl EnvelopeId {
    /// The id of the envelope that `peer` produces at protocol `step` in `session`.
    pub fn derive(session: &SessionId, peer: &PeerId, step: &str) -> Self {
        let mut h = Sha256::new();
        h.update(session.as_str().as_bytes());
        h.update([0u8]);
        h.update(peer.as_str().as_bytes());
        h.update([0u8]);
        h.update(step.as_bytes());
        let digest = h.finalize();
        let mut text = [0u8; 32];
        hex::encode_to_slice(&digest[..16], &mut text).expect("16 bytes are 32 hex digits");
        EnvelopeId::new(std::str::from_utf8(&text).expect("hex digits are ASCII"))
    }
}

/// Who an envelope is addressed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Recipient {
    /// Every peer in the session.
    All,
    /// One peer: a direct message, in that peer's context only.
    Peer(PeerId),
    /// Every peer of a group.
    Group(Arc<str>),
}

/// What an envelope is, from the protocols' point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The task or topic that opens a session.
    Task,
    /// A peer's contribution (a turn, an argument, an answer).
    Message,
    /// A proposal to be approved or rejected.
    Proposal,
    /// A vote or an approval / rejection.
    Vote,
    /// A hash commitment (commit-reveal voting).
    Commit,
    /// The reveal of a commitment.
    Reveal,
    /// A critic's or judge's structured verdict.
    Verdict,
    /// A summary of older rounds, shared by every peer's context.
    Summary,
    /// A work item claimed, finished or failed; a bid or an award.
    Work,
    /// A write to the shared blackboard, recorded for audit.
    Board,
    /// A failure: a model call that failed after retries, a rejected message, a lost peer.
    Failure,
    /// A peer was noticed absent (no heartbeat within the configured time).
    Absent,
    /// A peer joined or came back.
    Join,
    /// The session is closed: the recorded stop reason and the final answer.
    Stop,
    /// A tool call, recorded before the tool runs (`json`: [`crate::tool::ToolCallBody`]).
    ToolCall,
    /// A tool call's result (`json`: [`crate::tool::ToolResultBody`]).
    ToolResult,
    /// A request to approve a tool call (step `{duty}/approve/{k}`), or its answer
    /// (step `{duty}/approve/{k}/answer`): see [`crate::tool::ApprovalRequest`].
    Approval,
    /// The tools an MCP server listed when a process started it, or why it could not
    /// be started (`json`: [`crate::tool::ToolListBody`]; collective step
    /// `tools/{server}/{n}`, see [`crate::tool::record_listing`]).
    ToolList,
}

impl Kind {
    /// Whether an envelope of this kind counts as a contribution, what a peer said (the
    /// tally's rule): the task, the stop, presence, failures, and tool calls, their
    /// results, approvals and listings (what a peer did) do not.
    pub fn is_contribution(self) -> bool {
        !matches!(
            self,
            Kind::Task
                | Kind::Stop
                | Kind::Absent
                | Kind::Join
                | Kind::Failure
                | Kind::ToolCall
                | Kind::ToolResult
                | Kind::Approval
                | Kind::ToolList
        )
    }

    pub const ALL: [Kind; 18] = [
        Kind::Task,
        Kind::Message,
        Kind::Proposal,
        Kind::Vote,
        Kind::Commit,
        Kind::Reveal,
        Kind::Verdict,
        Kind::Summary,
        Kind::Work,
        Kind::Board,
        Kind::Failure,
        Kind::Absent,
        Kind::Join,
        Kind::Stop,
        Kind::ToolCall,
        Kind::ToolResult,
        Kind::Approval,
        Kind::ToolList,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Message => "message",
            Kind::Proposal => "proposal",
            Kind::Vote => "vote",
            Kind::Commit => "commit",
            Kind::Reveal => "reveal",
            Kind::Verdict => "verdict",
            Kind::Summary => "summary",
            Kind::Work => "work",
            Kind::Board => "board",
            Kind::Failure => "failure",
            Kind::Absent => "absent",
            Kind::Join => "join",
            Kind::Stop => "stop",
            Kind::ToolCall => "tool_call",
            Kind::ToolResult => "tool_result",
            Kind::Approval => "approval",
            Kind::ToolList => "tool_list",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The content of an envelope: text, and optional structured JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Body {
    pub text: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

impl Body {
    pub fn text(text: impl Into<Arc<str>>) -> Self {
        Body { text: text.into(), json: None }
    }
    pub fn with_json(mut self, json: serde_json::Value) -> Self {
        self.json = Some(json);
        self
    }
}

/// What one model call cost. Stored in the envelope the call produced, so replaying or
/// resuming never calls the model again for that step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub model: Arc<str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    #[serde(default)]
    pub cost_usd: f64,
    /// Model calls this envelope accounts for (retries count once; a judge and a
    /// summarizer count as calls of their own).
    #[serde(default = "one")]
    pub calls: u32,
}

fn one() -> u32 {
    1
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// One message on the session log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Wire version, [`ENVELOPE_VERSION`].
    pub v: u32,
    pub id: EnvelopeId,
    pub session: SessionId,
    pub from: PeerId,
    pub to: Recipient,
    pub kind: Kind,
    /// The protocol step that produced this envelope (e.g. `turn/7`, `r2/answer`).
    pub step: Arc<str>,
    pub body: Body,
    /// Causal parents: the envelopes this one answers or was decided from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<EnvelopeId>,
    pub round: u32,
    /// Lamport clock of the sender when it produced this envelope.
    pub lamport: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Milliseconds since the Unix epoch, from the sender's clock (informational only:
    /// no decision depends on it).
    pub time_ms: u64,
    /// W3C trace context (`traceparent`) of the span that produced this envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Arc<str>>,
    /// The author's signature over every other field (see [`crate::trust`]):
    /// `<signer peer id>:<128 hex digits>`. Envelopes are signed across processes;
    /// inside one process the log is trusted and they carry none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<Arc<str>>,
}

impl Envelope {
    /// A new envelope for `step`, with its id derived from (session, from, step).
    pub fn new(
        session: &SessionId,
        from: &PeerId,
        step: impl Into<Arc<str>>,
        kind: Kind,
        to: Recipient,
        body: Body,
    ) -> Self {
        let step = step.into();
        Envelope::with_id(EnvelopeId::derive(session, from, &step), session, from, step, kind, to, body)
    }

    /// A new envelope with an id already derived (see [`EnvelopeId::derive`]).
    pub fn with_id(
        id: EnvelopeId,
        session: &SessionId,
        from: &PeerId,
        step: Arc<str>,
        kind: Kind,
        to: Recipient,
        body: Body,
    ) -> Self {
        Envelope {
            v: ENVELOPE_VERSION,
            id,
            session: session.clone(),
            from: from.clone(),
            to,
            kind,
            step,
            body,
            parents: Vec::new(),
            round: 0,
            lamport: 0,
            usage: None,
            time_ms: now_ms(),
            trace: None,
            sig: None,
        }
    }

    pub fn with_round(mut self, round: u32) -> Self {
        self.round = round;
        self
    }
    pub fn with_parents(mut self, parents: Vec<EnvelopeId>) -> Self {
        self.parents = parents;
        self
    }
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Whether `peer` (member of `groups`) is an addressee of this envelope.
    pub fn visible_to(&self, peer: &PeerId, group: Option<&str>) -> bool {
        match &self.to {
            Recipient::All => true,
            Recipient::Peer(p) => p == peer || &self.from == peer,
            Recipient::Group(g) => group == Some(&**g) || &self.from == peer,
        }
    }

    /// Serialize to one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("envelope serializes")
    }

    /// Parse and check an envelope that came from outside (the wire, a file).
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge { bytes: bytes.len() });
        }
        #[derive(Deserialize)]
        struct VersionOnly {
            v: Option<u32>,
        }
        let probe: VersionOnly = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        match probe.v {
            Some(ENVELOPE_VERSION) => {}
            Some(v) => return Err(EnvelopeError::Version { found: v }),
            None => return Err(EnvelopeError::Malformed("missing field `v`".into())),
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if env.step.is_empty() {
            return Err(EnvelopeError::Malformed("field `step` is empty".into()));
        }
        if env.from.as_str().is_empty() {
            return Err(EnvelopeError::Malformed("field `from` is empty".into()));
        }
        Ok(env)
    }

    /// The model usage recorded on this envelope, or zero.
    pub fn tokens(&self) -> u64 {
        self.usage.as_ref().map_or(0, Usage::total_tokens)
    }
}

/// The longest session id accepted from outside.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Whether a session id from outside (a file, a flag) is safe to name a session by: 1 to
/// [`MAX_SESSION_ID_LEN`] ASCII letters, digits, `-`, `_` and `.`, not starting with `.`
/// and without `..` — so it can never be a path, a NATS subject wildcard, or hold a
/// control character or NUL.
pub fn check_session_id(id: &str) -> Result<(), String> {
    let shown: String = id.chars().take(40).collect::<String>().escape_debug().to_string();
    if id.is_empty() {
        return Err("the session id is empty".into());
    }
    if id.len() > MAX_SESSION_ID_LEN {
        return Err(format!("the session id \"{shown}…\" is {} bytes, over {MAX_SESSION_ID_LEN}", id.len()));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || id.starts_with('.')
        || id.contains("..")
    {
        return Err(format!(
            "the session id \"{shown}\" may hold only letters, digits, '-', '_' and '.' (not first, never '..')"
        ));
    }
    Ok(())
}

/// Why an envelope from outside was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is {bytes} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit")]
    TooLarge { bytes: usize },
    #[error("envelope version {found} is not supported (this build reads version {ENVELOPE_VERSION})")]
    Version { found: u32 },
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_derived_from_session_peer_and_step() {
        let s = SessionId::from("s1");
        let a = EnvelopeId::derive(&s, &"pm".into(), "turn/1");
        assert_eq!(a, EnvelopeId::derive(&s, &"pm".into(), "turn/1"));
        assert_ne!(a, EnvelopeId::derive(&s, &"pm".into(), "turn/2"));
        assert_ne!(a, EnvelopeId::derive(&s, &"cfo".into(), "turn/1"));
        assert_ne!(a, EnvelopeId::derive(&"s2".into(), &"pm".into(), "turn/1"));
        // No ambiguity from concatenation.
        assert_ne!(EnvelopeId::derive(&s, &"a".into(), "bc"), EnvelopeId::derive(&s, &"ab".into(), "c"));
        assert_eq!(a.as_str().len(), 32);
    }

    #[test]
    fn json_round_trip_and_rejections() {
        let s = SessionId::from("s1");
        let e = Envelope::new(&s, &"pm".into(), "turn/1", Kind::Message, Recipient::All, Body::text("hi"))
            .with_usage(Usage { model: "m".into(), prompt_tokens: 3, completion_tokens: 4, ..Default::default() });
        let j = e.to_json();
        assert!(j.contains("\"v\":1"));
        assert_eq!(Envelope::from_json(j.as_bytes()).unwrap(), e);

        let wrong = j.replacen("\"v\":1", "\"v\":9", 1);
        assert_eq!(Envelope::from_json(wrong.as_bytes()), Err(EnvelopeError::Version { found: 9 }));
        assert!(matches!(Envelope::from_json(b"not json"), Err(EnvelopeError::Malformed(_))));
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(Envelope::from_json(&big), Err(EnvelopeError::TooLarge { .. })));
    }

    #[test]
    fn visibility_of_direct_group_and_broadcast() {
        let s = SessionId::from("s");
        let pm = PeerId::from("pm");
        let eng = PeerId::from("eng");
        let cfo = PeerId::from("cfo");
        let direct = Envelope::new(&s, &pm, "x", Kind::Message, Recipient::Peer(eng.clone()), Body::text("psst"));
        assert!(direct.visible_to(&eng, None));
        assert!(direct.visible_to(&pm, None), "the sender sees what it sent");
        assert!(!direct.visible_to(&cfo, None));
        let group = Envelope::new(&s, &pm, "y", Kind::Message, Recipient::Group("money".into()), Body::text("$"));
        assert!(group.visible_to(&cfo, Some("money")));
        assert!(!group.visible_to(&eng, Some("tech")));
        let all = Envelope::new(&s, &pm, "z", Kind::Message, Recipient::All, Body::text("hello"));
        assert!(all.visible_to(&cfo, None));
    }
}
