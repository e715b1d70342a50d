//! People at the table: a human peer's seat.
//!
//! A peer with `kind = "human"` is a peer like any other: the protocol gives it duties,
//! and what it answers is an envelope on the log of the kind the model path writes
//! (a turn's message, a vote, a verdict, a bid), authored by that peer, with the same
//! id rule, so a duty is never answered twice. Only where the answer comes from
//! differs: the process that holds the seat (`roundtable join`) runs the peer's usual
//! loop ([`crate::peer::run_peer`]) with a [`Seat`] as its model. The seat turns each
//! model call into a [`Question`] — what the peer would see under the context policy,
//! the instruction, and the [`Form`] the answer must take — and the person's checked
//! answer into the call's reply. Replay and resume need nothing of the person: the
//! answer is on the log.
//!
//! # Seats
//! One holder at a time: a [`SeatLease`] is taken before the peer runs, renewed while
//! it runs and released when the person leaves; a second claimant is refused while the
//! lease is live. A person who leaves and comes back folds the log from the start, like
//! any peer that restarts.
//!
//! # Waiting for a person
//! With `answer_within_secs`, a duty waits that long: then another peer (whichever
//! notices first, like an absence) records the human peer `absent` with the reason
//! ([`Overdue`]), so the protocol skips its duties as it skips any absent peer's, and
//! replay reads the record, not the clock. A person still in the seat comes back by
//! recording `join` (the usual duty of an absent peer) and the next duty waits again.
//! Without `answer_within_secs` the team waits. Human peers are never judged by
//! heartbeats: a seat is empty while nobody holds it, and that is no failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::blackboard::{Blackboard, BoardErrorKind};
use crate::envelope::{Body, Kind, PeerId, now_ms};
use crate::model::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind};
use crate::protocol::Duty;
use crate::session::SessionState;
use crate::team::TeamPlan;

/// The longest answer a person may give, in characters.
/// (A terminal's line editor takes about 4,096 bytes a line, so a longer limit could
/// not be typed at one anyway.)
pub const MAX_ANSWER_CHARS: usize = 4_000;

/// The model name recorded in the usage of a person's answers.
pub const HUMAN_MODEL: &str = "human";

/// One field of a structured answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// Free text (`"answer": "<your answer>"`); `optional` fields may be left empty.
    Text { name: String, optional: bool },
    /// A number from 0 to 1 (`"confidence": <0 to 1>`).
    Fraction { name: String },
    /// Yes or no (`"approve": true|false`).
    YesNo { name: String },
    /// A fixed value the format asks for (`"concede": false`): not asked.
    Fixed { name: String, value: serde_json::Value },
}

impl Field {
    pub fn name(&self) -> &str {
        match self {
            Field::Text { name, .. } | Field::Fraction { name } | Field::YesNo { name } | Field::Fixed { name, .. } => {
                name
            }
        }
    }

    /// What to ask the person for this field (`None` for a fixed value).
    pub fn prompt(&self) -> Option<String> {
        match self {
            Field::Text { name, optional: false } => Some(format!("» {name}:")),
            Field::Text { name, optional: true } => Some(format!("» {name} (may be empty):")),
            Field::Fraction { name } => Some(format!("» {name} (a number from 0 to 1):")),
            Field::YesNo { name } => Some(format!("» {name} (yes or no):")),
            Field::Fixed { .. } => None,
        }
    }

    /// The field's value from what the person typed, or why it is refused.
    pub fn check(&self, input: &str) -> Result<serde_json::Value, String> {
        let t = input.trim();
        match self {
            Field::Text { optional, name } => {
                if t.is_empty() && !optional {
                    return Err(format!("{name} cannot be empty"));
                }
                check_length(t)?;
                Ok(serde_json::Value::from(t))
            }
            Field::Fraction { name } => match t.parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => Ok(serde_json::json!(x)),
                _ => Err(format!("{name} must be a number from 0 to 1 (like 0.8), not {t:?}")),
            },
            Field::YesNo { name } => match t.to_ascii_lowercase().as_str() {
                "y" | "yes" | "true" => Ok(serde_json::Value::Bool(true)),
                "n" | "no" | "false" => Ok(serde_json::Value::Bool(false)),
                _ => Err(format!("{name}: answer yes or no, not {t:?}")),
            },
            Field::Fixed { value, .. } => Ok(value.clone()),
        }
    }
}

/// The shape of the answer a duty asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    /// Free text (a turn, a proposal, a summary).
    Text,
    /// A JSON object, field by field (a vote, a verdict, a bid, a critique).
    Fields(Vec<Field>),
}

impl Form {
    /// The form of a model call: the JSON template in the instruction when the call
    /// asks for JSON (every protocol writes its format there, see
    /// [`crate::team::reference::ANSWER_FORMATS`]), else free text.
    pub fn of(req: &ChatRequest) -> Form {
        let fields = req
            .instruction
            .as_deref()
            .filter(|_| req.json || has_template(req))
            // The template follows "Reply with a JSON object" where the instruction says
            // it: JSON quoted before it (a tool call's arguments to approve) is not the form.
            .map(|i| i.find(TEMPLATE_MARK).map_or(i, |at| &i[at..]))
            .and_then(template_fields);
        match fields {
            Some(f) if !f.is_empty() => Form::Fields(f),
            _ => Form::Text,
        }
    }

    /// The form of the JSON template in a protocol's instruction, if it holds one.
    pub fn of_instruction(instruction: &str) -> Form {
        match template_fields(instruction) {
            Some(f) if !f.is_empty() => Form::Fields(f),
            _ => Form::Text,
        }
    }

    /// The JSON Schema of an answer in this form, titled `title` (`None` for free
    /// text): what a provider with structured output is asked to enforce. Text fields
    /// are strings, a fraction a number from 0 to 1, yes/no a boolean, a value shown in
    /// the template a value of its type; every field but an optional text is required. Other keys are allowed,
    /// as the protocols' parsers ignore them.
    pub fn schema(&self, title: &str) -> Option<serde_json::Value> {
        let Form::Fields(fields) = self else { return None };
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        for f in fields {
            let (schema, needed) = match f {
                Field::Text { optional, .. } => (serde_json::json!({"type": "string"}), !optional),
                Field::Fraction { .. } => (serde_json::json!({"type": "number", "minimum": 0, "maximum": 1}), true),
                Field::YesNo { .. } => (serde_json::json!({"type": "boolean"}), true),
                // The value the template shows, not the only one allowed: the devil's
                // advocate's `"concede": false` is `true` when it concedes.
                Field::Fixed { value, .. } => (serde_json::json!({"type": json_type(value)}), true),
            };
            properties.insert(f.name().to_owned(), schema);
            if needed {
                required.push(f.name().to_owned());
            }
        }
        Some(serde_json::json!({
            "title": title,
            "type": "object",
            "properties": properties,
            "required": required,
        }))
    }

    /// The answer text a model would have given for these checked values: the JSON
    /// object (the protocols parse it exactly as they parse a model's).
    pub fn answer_of(fields: &[Field], values: &[serde_json::Value]) -> String {
        let mut obj = serde_json::Map::new();
        for (f, v) in fields.iter().zip(values) {
            obj.insert(f.name().to_string(), v.clone());
        }
        serde_json::Value::Object(obj).to_string()
    }
}

/// The words every JSON answer format is introduced with.
const TEMPLATE_MARK: &str = "Reply with a JSON object";

/// Some protocols ask for JSON in the instruction without the provider's JSON mode.
fn has_template(req: &ChatRequest) -> bool {
    req.instruction.as_deref().is_some_and(|i| i.contains(TEMPLATE_MARK))
}

/// The fields of the `{"key": …, …}` template in an instruction: the first after the
/// words "JSON object" when it has them (an approval quotes the call's arguments, an
/// object too, before its template), else the first.
fn template_fields(instruction: &str) -> Option<Vec<Field>> {
    let from = instruction.find("JSON object").unwrap_or(0);
    let start = from + instruction[from..].find("{\"")?;
    let end = start + instruction[start..].find('}')?;
    let inner = &instruction[start + 1..end];
    let mut fields = Vec::new();
    // Keys are quoted; a value runs to the next `, "` (templates hold no nested objects).
    for part in inner.split(", \"") {
        let part = part.trim().trim_start_matches('"');
        let (name, value) = part.split_once("\":")?;
        let value = value.trim();
        let name = name.to_string();
        let field = if value.starts_with('"') {
            let optional = matches!(name.as_str(), "reason" | "critique");
            Field::Text { name, optional }
        } else if value.contains("0 to 1") {
            Field::Fraction { name }
        } else if value == "true|false" {
            Field::YesNo { name }
        } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(value) {
            Field::Fixed { name, value: v }
        } else {
            return None;
        };
        fields.push(field);
    }
    Some(fields)
}

/// The JSON Schema `type` of a value.
fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn check_length(t: &str) -> Result<(), String> {
    let n = t.chars().count();
    if n > MAX_ANSWER_CHARS {
        return Err(format!("the answer is {n} characters; at most {MAX_ANSWER_CHARS}"));
    }
    Ok(())
}

/// A free-text answer (a turn), checked: not empty, not too long.
pub fn check_text(input: &str) -> Result<String, String> {
    let t = input.trim();
    if t.is_empty() {
        return Err("an empty answer is not an answer; type it again".into());
    }
    check_length(t)?;
    Ok(t.to_string())
}

/// A person's answer to an approval request, checked, as the answer text (the JSON
/// object a model approver writes): a denial needs a reason, because the caller's model
/// is told it and decides what to do next from it.
pub fn check_approval(approve: bool, reason: &str) -> Result<String, String> {
    let reason = reason.trim();
    if !approve && reason.is_empty() {
        return Err("a denial needs a reason (the caller is told why)".into());
    }
    check_length(reason)?;
    Ok(serde_json::json!({ "approve": approve, "reason": reason }).to_string())
}

/// The step prefix of a person's interjections: `say/{n}`, the n-th of that peer.
pub const INTERJECTION_STEP: &str = "say/";

/// Whether an envelope is a person's interjection (a message posted at any time, not
/// for a duty).
pub fn is_interjection(env: &crate::envelope::Envelope) -> bool {
    env.kind == Kind::Message && env.step.starts_with(INTERJECTION_STEP)
}

/// A person's interjection: their `n`-th (counted from the log, so a retry has the
/// same id), to everyone or to one peer. Where it lands is the protocol's: every
/// message is in the context of the peers it is visible to, so in a round robin (and
/// the other protocols whose duties see the history) the next speaker sees it; in a
/// conversation a message to a peer is mail in its inbox and a broadcast in everyone's;
/// protocols whose duties see only the round's answers (debate, jury, …) do not show it
/// to the models, though it stays on the record.
pub fn interjection(
    session: &crate::envelope::SessionId,
    me: &PeerId,
    n: u32,
    to: crate::envelope::Recipient,
    text: &str,
    round: u32,
) -> Result<crate::envelope::Envelope, String> {
    let text = check_text(text)?;
    Ok(crate::envelope::Envelope::new(
        session,
        me,
        format!("{INTERJECTION_STEP}{n}"),
        Kind::Message,
        to,
        Body::text(text),
    )
    .with_round(round))
}

/// A duty put to the person in a seat.
#[derive(Debug)]
pub struct Question {
    pub peer: PeerId,
    pub step: Arc<str>,
    /// The round, counted from 1 (0 when the protocol has none).
    pub round: u32,
    /// What the protocol asks now.
    pub instruction: Option<Arc<str>>,
    pub form: Form,
    /// What the peer sees under the context policy, oldest first: (who said it, text).
    pub context: Vec<(Option<PeerId>, Arc<str>)>,
    reply: oneshot::Sender<String>,
}

impl Question {
    /// Answer with text already checked against the form ([`check_text`], or
    /// [`Form::answer_of`] of checked fields).
    pub fn answer(self, text: String) {
        let _ = self.reply.send(text);
    }
}

/// The model of a human peer: each call is a [`Question`] on a channel, answered by
/// whoever reads it (the terminal of `roundtable join`, the web view). A question that
/// is dropped unanswered (the person left, or the duty was skipped) fails the call.
pub struct Seat {
    asks: mpsc::UnboundedSender<Question>,
}

impl Seat {
    pub fn new() -> (Seat, mpsc::UnboundedReceiver<Question>) {
        let (asks, rx) = mpsc::unbounded_channel();
        (Seat { asks }, rx)
    }
}

#[async_trait]
impl ChatModel for Seat {
    fn name(&self) -> &str {
        HUMAN_MODEL
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let context = req
            .messages()
            .take(req.message_count().saturating_sub(usize::from(req.instruction.is_some())))
            .map(|m| (m.name, m.content))
            .collect();
        let (reply, answer) = oneshot::channel();
        let q = Question {
            peer: req.peer.clone(),
            step: req.step.clone(),
            round: req.round,
            instruction: req.instruction.clone(),
            form: Form::of(req),
            context,
            reply,
        };
        let gone =
            || ModelError::new(ModelErrorKind::Timeout, "no answer from the person in the seat; the duty was skipped");
        self.asks.send(q).map_err(|_| gone())?;
        let text = answer.await.map_err(|_| gone())?;
        Ok(ChatResponse { text, model: HUMAN_MODEL.into(), ..Default::default() })
    }
}

/// Why a seat could not be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeatError {
    /// Someone else holds it; the text says who and until when.
    Taken(String),
    /// The store that keeps leases failed.
    Store(String),
}

impl std::fmt::Display for SeatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeatError::Taken(w) | SeatError::Store(w) => f.write_str(w),
        }
    }
}

/// Who holds which seat of a session: one holder at a time, for a lease that the holder
/// renews; a lease that runs out (the holder's process died) frees the seat.
#[async_trait]
pub trait SeatLease: Send + Sync {
    /// Take or renew `peer`'s seat for `holder` until `lease` from now. Refused while
    /// another holder's lease is live.
    async fn claim(&self, peer: &PeerId, holder: &str, lease: Duration) -> Result<(), SeatError>;
    /// Give the seat up (only if `holder` holds it).
    async fn release(&self, peer: &PeerId, holder: &str);
}

/// Seat leases kept on a session's blackboard (the NATS key-value bucket, shared by
/// every process), with compare-and-set so two claimants cannot both win.
pub struct BoardSeats(pub Arc<dyn Blackboard>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
    until_ms: u64,
}

fn seat_key(peer: &PeerId) -> String {
    format!("_seat_{peer}")
}

#[async_trait]
impl SeatLease for BoardSeats {
    async fn claim(&self, peer: &PeerId, holder: &str, lease: Duration) -> Result<(), SeatError> {
        let key = seat_key(peer);
        let mine = serde_json::to_vec(&Lease { holder: holder.into(), until_ms: now_ms() + lease.as_millis() as u64 })
            .expect("lease serializes");
        let store = |e: crate::blackboard::BoardError| SeatError::Store(format!("seat lease: {e}"));
        let taken = || {
            SeatError::Taken(format!(
                "seat `{peer}` is taken: someone else joined as {peer} (only one person may hold a seat)"
            ))
        };
        let current = self.0.get(&key).await.map_err(store)?;
        let written = match current {
            None => self.0.create(&key, mine).await,
            Some(e) => {
                let held: Option<Lease> = serde_json::from_slice(&e.value).ok();
                if held.as_ref().is_some_and(|l| l.holder != holder && l.until_ms > now_ms()) {
                    return Err(taken());
                }
                self.0.update(&key, mine, e.revision).await
            }
        };
        match written {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), BoardErrorKind::WrongLastRevision | BoardErrorKind::AlreadyExists) => {
                Err(taken())
            }
            Err(e) => Err(store(e)),
        }
    }

    async fn release(&self, peer: &PeerId, holder: &str) {
        let key = seat_key(peer);
        if let Ok(Some(e)) = self.0.get(&key).await {
            let held: Option<Lease> = serde_json::from_slice(&e.value).ok();
            if held.is_some_and(|l| l.holder == holder) {
                let free = serde_json::to_vec(&Lease { holder: String::new(), until_ms: 0 }).expect("lease serializes");
                let _ = self.0.update(&key, free, e.revision).await;
            }
        }
    }
}

/// The duties human peers are waiting on, as this peer sees them, and when each began
/// to wait: the source of the one clock-driven decision about people — recording a
/// human peer absent when a duty waited longer than its `answer_within_secs`.
#[derive(Default)]
pub struct Overdue {
    waiting: HashMap<PeerId, (Arc<str>, tokio::time::Instant)>,
}

impl Overdue {
    /// Whether the plan has a human peer with a time limit (otherwise nothing to watch).
    pub fn applies(plan: &TeamPlan) -> bool {
        plan.peers.iter().any(|p| p.is_human() && p.answer_within_ms.is_some())
    }

    /// The absence to record now, if a human peer's duty has waited too long.
    pub fn check(&mut self, st: &SessionState, me: &PeerId, now: u64) -> Option<Duty> {
        if st.is_stopped() {
            return None;
        }
        for p in &st.plan.peers {
            let Some(limit) = p.answer_within_ms.filter(|_| p.is_human() && p.id != *me) else { continue };
            let pending = if st.absent.contains(&p.id) {
                None
            } else {
                st.duties(&p.id, now).into_iter().find(|d| !d.collective && d.kind != Kind::Join)
            };
            let Some(duty) = pending else {
                self.waiting.remove(&p.id);
                continue;
            };
            let since = match self.waiting.get(&p.id) {
                Some((step, since)) if *step == duty.step => *since,
                _ => {
                    let now = tokio::time::Instant::now();
                    self.waiting.insert(p.id.clone(), (duty.step.clone(), now));
                    now
                }
            };
            if since.elapsed() >= Duration::from_millis(limit) {
                let mut absent = st.absent_duty(&p.id);
                let secs = limit as f64 / 1000.0;
                let text = format!(
                    "{} did not answer {} within {secs} s (answer_within_secs); its duties are skipped until a person takes the seat",
                    p.id,
                    crate::readable::step(&duty.step)
                );
                let json = serde_json::json!({
                    "peer": p.id.as_str(),
                    "reason": "answer_within",
                    "step": &*duty.step,
                    "answer_within_secs": secs,
                });
                absent.action = crate::protocol::Action::Post { body: Body::text(text).with_json(json) };
                return Some(absent);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocols_templates_become_forms() {
        let vote = template_fields(crate::protocol::rounds::ANSWER_JSON).unwrap();
        assert_eq!(
            vote,
            vec![
                Field::Text { name: "answer".into(), optional: false },
                Field::Fraction { name: "confidence".into() },
                Field::Text { name: "reason".into(), optional: true },
            ]
        );
        let consensus = template_fields(
            "Vote on the latest proposal. Reply with a JSON object {\"approve\": true|false, \"reason\": \"<why; what would change your mind>\"}.",
        )
        .unwrap();
        assert_eq!(consensus[0], Field::YesNo { name: "approve".into() });
        let advocate = template_fields("{\"objection\": \"<your objection>\", \"concede\": false}").unwrap();
        assert_eq!(advocate[1], Field::Fixed { name: "concede".into(), value: serde_json::Value::Bool(false) });
        assert_eq!(template_fields("no template here"), None);
    }

    #[test]
    fn a_template_becomes_the_schema_a_provider_enforces() {
        let vote = Form::of_instruction(
            "Vote on the latest proposal. Reply with a JSON object {\"approve\": true|false, \"reason\": \"<why>\"}.",
        );
        assert_eq!(
            vote.schema("vote").unwrap(),
            serde_json::json!({
                "title": "vote",
                "type": "object",
                "properties": {"approve": {"type": "boolean"}, "reason": {"type": "string"}},
                "required": ["approve"],
            })
        );
        let answer = Form::of_instruction(crate::protocol::rounds::ANSWER_JSON).schema("message").unwrap();
        assert_eq!(
            answer["properties"]["confidence"],
            serde_json::json!({"type": "number", "minimum": 0, "maximum": 1})
        );
        assert_eq!(answer["required"], serde_json::json!(["answer", "confidence"]));
        // A value the template shows is a type, not a constant: the advocate may concede.
        let advocate =
            Form::of_instruction("Reply with a JSON object {\"objection\": \"<your objection>\", \"concede\": false}.");
        assert_eq!(
            advocate.schema("message").unwrap()["properties"]["concede"],
            serde_json::json!({"type": "boolean"})
        );
        // An approval quotes the call's arguments (an object) before its template.
        let approval = Form::of_instruction(
            "eng asks you to approve a call of the tool `deploy` with these arguments:\n{\"region\": \"eu\"}\n\
             Reply with a JSON object: {\"approve\": true|false, \"reason\": \"<why>\"}",
        );
        let names: Vec<String> =
            approval.schema("approval").unwrap()["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(names, ["approve", "reason"]);
        assert_eq!(Form::of_instruction("Propose a solution. End with 'Answer: <it>'.").schema("proposal"), None);
    }

    #[test]
    fn answers_are_checked_against_their_field() {
        let answer = Field::Text { name: "answer".into(), optional: false };
        assert!(answer.check("   ").unwrap_err().contains("cannot be empty"));
        assert!(answer.check(&"x".repeat(MAX_ANSWER_CHARS + 1)).unwrap_err().contains("at most"));
        let conf = Field::Fraction { name: "confidence".into() };
        assert_eq!(conf.check(" 0.75 ").unwrap(), serde_json::json!(0.75));
        for bad in ["1.5", "-0.1", "high", "NaN", ""] {
            assert!(conf.check(bad).is_err(), "{bad:?} must be refused");
        }
        let yes = Field::YesNo { name: "approve".into() };
        assert_eq!(yes.check("Yes").unwrap(), serde_json::Value::Bool(true));
        assert_eq!(yes.check("n").unwrap(), serde_json::Value::Bool(false));
        assert!(yes.check("maybe").is_err());
        assert!(check_text("").is_err());
        assert_eq!(check_text("  ship it  ").unwrap(), "ship it");
        let fields = vec![answer, conf];
        let text = Form::answer_of(&fields, &[serde_json::json!("B"), serde_json::json!(0.5)]);
        assert_eq!(
            crate::peer::parse_json_answer(&text).unwrap(),
            serde_json::json!({"answer": "B", "confidence": 0.5})
        );
    }
}
