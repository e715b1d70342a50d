//! Conversation: the peers decide the flow. Nobody's turn comes round; a peer acts when
//! it has mail.
//!
//! - **Mail.** The task is mail to the peers named in `start` (every peer when none
//!   is named). A message is mail to its addressees: a direct message to one peer, a
//!   group message to the peers of that group (`group` on a peer), a broadcast to every
//!   peer but its sender.
//! - **Duties.** A peer that has unread mail takes a turn, step `conv/{peer}/{n}` (its
//!   n-th turn, from 1). A turn takes *everything* unread at once — three nudges make
//!   one turn, not three — and records how far it read (`read_upto`, a log sequence
//!   number) in its envelope. In the turn the peer's model answers by calling tools:
//!   `send` (to a peer or a group, by name), `broadcast`, the blackboard, the tools it
//!   was granted, and `finish` (propose the answer). Text the model answers with,
//!   besides its calls, is a reply to the peers whose mail it read (one sender: to that
//!   peer; several: to everyone); an empty answer sends nothing. Peers work
//!   concurrently: each acts on its own mail as it arrives.
//! - **Decision.** `finish` records a proposal. The session ends when the finishing
//!   rule holds (`finish`: `any` peer's proposal, a named peer's, or a `majority` of the
//!   peers present, whose most common answer wins, ties to team order); or when the
//!   team is quiescent: no peer present has unread mail and no tool call is without its
//!   result, which every peer derives from the log. A quiescent team with no proposal
//!   ends with no accepted answer, naming the last message as the leading candidate.
//! - **Loops.** A message whose text repeats one its sender sent or received in the
//!   last eight messages is a repeat; `signals().rounds_without_change` counts repeats
//!   in a row, so `no_progress = k` stops two peers bouncing the same thing back and
//!   forth. `max_turns` (per peer, default 10) bounds every peer, whatever the models do.
//! - **Failures.** A failed turn consumes the peer's mail up to the failure (the retry
//!   layer already retried the call); the peer acts again on newer mail.
//! - **Absent peers.** An absent peer's mail waits for it; it does not keep the team
//!   from being quiescent. When it comes back it reads its mail from the log.
//!
//! Batching depends on when mail arrives relative to a peer's turns, so two runs of the
//! same team may batch differently: a conversation is a timing-dependent protocol (its
//! log, not a rerun, is the record).
//!
//! Team-file keys: `start` (peers), `finish` (`any`, `majority` or a peer id; `any`),
//! `max_turns` (10), `instruction` (`{peer}`, `{senders}`, `{count}` are filled in).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::{Action, Duty, Facts, Finish, Reducer, View};
use crate::envelope::{Envelope, EnvelopeId, Kind, PeerId, Recipient};
use crate::log::Entry;
use crate::team::{ConversationSpec, FinishRule};
use crate::termination::Signals;

/// The step prefix of conversation turns.
pub const TURN_PREFIX: &str = "conv/";

/// The step of `peer`'s `n`-th turn (from 1).
pub fn turn_step(peer: &PeerId, n: u32) -> String {
    format!("{TURN_PREFIX}{peer}/{n}")
}

/// The peer and turn number of a turn step, or of a step inside a turn
/// (`conv/{peer}/{n}/…`).
pub fn parse_turn_step(step: &str) -> Option<(&str, u32, &str)> {
    let rest = step.strip_prefix(TURN_PREFIX)?;
    let (peer, rest) = rest.split_once('/')?;
    let (n, tail) = match rest.split_once('/') {
        Some((n, tail)) => (n, tail),
        None => (rest, ""),
    };
    Some((peer, n.parse().ok()?, tail))
}

#[derive(Default, Clone)]
struct Seat {
    turns: u32,
    read_upto: u64,
    /// Sequence numbers and senders of mail to this peer, oldest first, unread or not
    /// (trimmed to what is unread when a turn is folded).
    mail: VecDeque<(u64, PeerId, EnvelopeId)>,
}

pub struct Conversation {
    spec: ConversationSpec,
    seats: BTreeMap<PeerId, Seat>,
    /// Tool calls without a result yet, by call envelope step.
    open_calls: BTreeMap<Arc<str>, ()>,
    /// Latest proposal per peer.
    proposals: BTreeMap<PeerId, Arc<Envelope>>,
    /// Order in which proposals arrived (for `any`).
    first_proposal: Option<Arc<Envelope>>,
    /// Proposals whose turn has not closed yet: they count once it has, so the stop
    /// always follows the proposer's whole turn.
    pending: Vec<(PeerId, u32, Arc<Envelope>)>,
    /// Peers whose current turn has put something on the log but has not closed: the
    /// finishing rule waits for them, so no turn is cut in half by the stop.
    mid_turn: BTreeMap<PeerId, u32>,
    last_message: Option<Arc<Envelope>>,
    /// The last messages' (sender, addressee set key, normalized text).
    recent: VecDeque<(PeerId, String)>,
    repeats: u32,
    any_turn: bool,
}

impl Conversation {
    pub fn new(spec: ConversationSpec) -> Self {
        Conversation {
            spec,
            seats: BTreeMap::new(),
            open_calls: BTreeMap::new(),
            proposals: BTreeMap::new(),
            first_proposal: None,
            pending: Vec::new(),
            mid_turn: BTreeMap::new(),
            last_message: None,
            recent: VecDeque::new(),
            repeats: 0,
            any_turn: false,
        }
    }

    fn seat(&mut self, p: &PeerId) -> &mut Seat {
        self.seats.entry(p.clone()).or_default()
    }

    fn unread(&self, p: &PeerId) -> usize {
        self.seats.get(p).map_or(0, |s| s.mail.iter().filter(|(seq, _, _)| *seq > s.read_upto).count())
    }

    fn can_act(&self, p: &PeerId, facts: &Facts<'_>) -> bool {
        !facts.is_absent(p) && self.seats.get(p).is_none_or(|s| s.turns < self.spec.max_turns) && self.unread(p) > 0
    }

    fn deliver(&mut self, seq: u64, env: &Envelope, facts: &Facts<'_>) {
        let to: Vec<PeerId> = match &env.to {
            Recipient::All => facts.plan.peers.iter().map(|p| p.id.clone()).filter(|p| *p != env.from).collect(),
            Recipient::Peer(p) => {
                if *p == env.from || facts.plan.peer(p).is_none() {
                    Vec::new()
                } else {
                    vec![p.clone()]
                }
            }
            Recipient::Group(g) => facts
                .plan
                .peers
                .iter()
                .filter(|p| p.group.as_deref() == Some(&**g) && p.id != env.from)
                .map(|p| p.id.clone())
                .collect(),
        };
        for p in to {
            self.seat(&p).mail.push_back((seq, env.from.clone(), env.id.clone()));
        }
    }

    fn note_message(&mut self, env: &Arc<Envelope>) {
        let text: String = env.body.text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        if text.is_empty() {
            return;
        }
        let repeat = self.recent.iter().any(|(_, t)| *t == text);
        self.repeats = if repeat { self.repeats + 1 } else { 0 };
        self.recent.push_back((env.from.clone(), text));
        if self.recent.len() > 8 {
            self.recent.pop_front();
        }
        self.last_message = Some(env.clone());
    }

    /// An envelope inside a turn (`conv/{peer}/{n}/…`) that has not closed yet.
    fn note_mid_turn(&mut self, step: &str) {
        if let Some((peer, n, tail)) = parse_turn_step(step)
            && !tail.is_empty()
        {
            let owner = PeerId::from(peer);
            if self.seats.get(&owner).is_none_or(|s| s.turns < n) {
                self.mid_turn.insert(owner, n);
            }
        }
    }

    fn decided(&self, facts: &Facts<'_>) -> Option<(Arc<Envelope>, String)> {
        match &self.spec.finish {
            FinishRule::Any => self.first_proposal.clone().map(|p| {
                let why = format!("finished: {} proposed the answer", p.from);
                (p, why)
            }),
            FinishRule::Peer(who) => {
                self.proposals.get(who).cloned().map(|p| (p, format!("finished: {who} proposed the answer")))
            }
            FinishRule::Majority => {
                let present: Vec<&PeerId> =
                    facts.plan.peers.iter().map(|p| &p.id).filter(|p| !facts.is_absent(p)).collect();
                let finished: Vec<&Arc<Envelope>> = present.iter().filter_map(|p| self.proposals.get(*p)).collect();
                if present.is_empty() || finished.len() * 2 <= present.len() {
                    return None;
                }
                // The most common answer; ties to the team order of its first proposer.
                let mut best: Option<(usize, &Arc<Envelope>)> = None;
                for p in &finished {
                    let n = finished.iter().filter(|q| q.body.text.trim() == p.body.text.trim()).count();
                    if best.is_none_or(|(m, _)| n > m) {
                        best = Some((n, p));
                    }
                }
                best.map(|(n, p)| {
                    (
                        p.clone(),
                        format!(
                            "finished: {} of {} peers present proposed an answer, {n} this one",
                            finished.len(),
                            present.len()
                        ),
                    )
                })
            }
        }
    }
}

impl Reducer for Conversation {
    fn apply(&mut self, entry: &Entry, facts: &Facts<'_>) {
        let env = &entry.env;
        match env.kind {
            Kind::Task => {
                let starters: Vec<PeerId> = if self.spec.start.is_empty() {
                    facts.plan.peers.iter().map(|p| p.id.clone()).collect()
                } else {
                    self.spec.start.clone()
                };
                for p in starters {
                    self.seat(&p).mail.push_back((entry.seq, PeerId::from("user"), env.id.clone()));
                }
            }
            Kind::ToolCall => {
                self.open_calls.insert(env.step.clone(), ());
                self.note_mid_turn(&env.step);
            }
            Kind::ToolResult => {
                // `…/result/k` answers `…/call/k`.
                if let Some((head, k)) = env.step.rsplit_once("/result/") {
                    self.open_calls.remove(format!("{head}/call/{k}").as_str());
                }
            }
            Kind::Proposal if env.step.starts_with(TURN_PREFIX) && facts.plan.peer(&env.from).is_some() => {
                if let Some((peer, n, _)) = parse_turn_step(&env.step)
                    && peer == env.from.as_str()
                {
                    self.pending.push((env.from.clone(), n, env.clone()));
                }
                self.note_mid_turn(&env.step);
            }
            Kind::Message | Kind::Failure => {
                let Some((peer, n, tail)) = parse_turn_step(&env.step) else { return };
                if peer != env.from.as_str() && env.kind == Kind::Message {
                    return;
                }
                let owner = PeerId::from(peer);
                if facts.plan.peer(&owner).is_none() {
                    return;
                }
                if tail.is_empty() {
                    // The turn itself: how far it read, and its reply (if any).
                    let read = match env.kind {
                        Kind::Message => env
                            .body
                            .json
                            .as_ref()
                            .and_then(|j| j.get("read_upto"))
                            .and_then(|r| r.as_u64())
                            .unwrap_or(entry.seq)
                            .min(entry.seq),
                        _ => entry.seq,
                    };
                    let seat = self.seat(&owner);
                    seat.turns = seat.turns.max(n);
                    seat.read_upto = seat.read_upto.max(read);
                    let upto = seat.read_upto;
                    seat.mail.retain(|(seq, _, _)| *seq > upto);
                    self.any_turn = true;
                    if self.mid_turn.get(&owner).is_some_and(|t| *t <= n) {
                        self.mid_turn.remove(&owner);
                    }
                    // The turn closed: its proposals count now.
                    let (closed, open): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut self.pending).into_iter().partition(|(p, t, _)| *p == owner && *t <= n);
                    self.pending = open;
                    for (_, _, p) in closed {
                        if self.first_proposal.is_none() {
                            self.first_proposal = Some(p.clone());
                        }
                        self.proposals.insert(owner.clone(), p);
                    }
                }
                if !tail.is_empty() {
                    self.note_mid_turn(&env.step);
                }
                if env.kind == Kind::Message && (tail.is_empty() || tail.starts_with("send/")) {
                    self.deliver(entry.seq, env, facts);
                    self.note_message(env);
                }
            }
            _ => {}
        }
    }

    fn duties(&self, me: &PeerId, facts: &Facts<'_>) -> Vec<Duty> {
        if !self.can_act(me, facts) {
            return Vec::new();
        }
        let seat = self.seats.get(me).cloned().unwrap_or_default();
        let unread: Vec<&(u64, PeerId, EnvelopeId)> =
            seat.mail.iter().filter(|(seq, _, _)| *seq > seat.read_upto).collect();
        let read_upto = unread.iter().map(|(s, _, _)| *s).max().unwrap_or(seat.read_upto);
        let mut senders: Vec<&PeerId> = Vec::new();
        for (_, s, _) in &unread {
            if !senders.contains(&s) {
                senders.push(s);
            }
        }
        let peers_only: Vec<&PeerId> = senders.iter().copied().filter(|s| facts.plan.peer(s).is_some()).collect();
        let reply_to = match peers_only.as_slice() {
            [one] => Recipient::Peer((*one).clone()),
            _ => Recipient::All,
        };
        let names = senders.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        let count = unread.len().to_string();
        let instruction = match &self.spec.instruction {
            Some(t) => super::fill(t, &[("peer", me.as_str()), ("senders", &names), ("count", &count)]),
            None => format!(
                "You have {count} new message(s), from {names}. Act on them: message peers by name with `send`, \
                 everyone with `broadcast`, use your other tools, or call `finish` with the answer when the \
                 team's work is done. Text you answer with goes back to {}; answer with nothing to stay quiet.",
                match &reply_to {
                    Recipient::Peer(p) => p.as_str().to_string(),
                    _ => "everyone".to_string(),
                }
            ),
        };
        let step = turn_step(me, seat.turns + 1);
        vec![Duty {
            step: Arc::from(step),
            kind: Kind::Message,
            to: reply_to.clone(),
            round: seat.turns,
            parents: unread.iter().map(|(_, _, id)| id.clone()).collect(),
            action: Action::Turn {
                instruction: Some(Arc::from(instruction)),
                view: View::History,
                read_upto,
                reply_to,
            },
            collective: false,
        }]
    }

    fn finished(&self, facts: &Facts<'_>) -> Option<Finish> {
        if let Some((p, reason)) = self.decided(facts) {
            if self.mid_turn.keys().any(|p| !facts.is_absent(p)) {
                return None;
            }
            return Some(Finish { reason, answer: Some(p.body.text.clone()), decided_by: vec![p.id.clone()] });
        }
        if !self.any_turn {
            return None;
        }
        let waiting = facts.plan.peers.iter().any(|p| self.can_act(&p.id, facts));
        if waiting || !self.open_calls.is_empty() {
            return None;
        }
        let unread_absent: Vec<&str> = facts
            .plan
            .peers
            .iter()
            .filter(|p| facts.is_absent(&p.id) && self.unread(&p.id) > 0)
            .map(|p| p.id.as_str())
            .collect();
        let exhausted: Vec<&str> = facts
            .plan
            .peers
            .iter()
            .filter(|p| !facts.is_absent(&p.id) && self.unread(&p.id) > 0)
            .map(|p| p.id.as_str())
            .collect();
        let mut reason = String::from("quiescent: no peer present has unread mail and no tool call is in flight");
        if !unread_absent.is_empty() {
            reason.push_str(&format!("; unread mail waits for absent {}", unread_absent.join(", ")));
        }
        if !exhausted.is_empty() {
            reason.push_str(&format!("; {} used all {} turns", exhausted.join(", "), self.spec.max_turns));
        }
        match &self.last_message {
            Some(m) => reason.push_str(&format!(
                "; no peer called finish, so no answer was accepted (last message, from {}: {:?})",
                m.from,
                preview(&m.body.text, 80)
            )),
            None => reason.push_str("; no peer called finish and nobody said anything"),
        }
        Some(Finish { reason, answer: None, decided_by: self.last_message.iter().map(|m| m.id.clone()).collect() })
    }

    fn signals(&self) -> Signals {
        Signals {
            round: self.seats.values().map(|s| s.turns).max().unwrap_or(0),
            rounds_without_change: self.repeats,
            ..Default::default()
        }
    }

    fn best_answer(&self) -> Option<(Arc<str>, EnvelopeId)> {
        self.proposals
            .values()
            .max_by_key(|p| p.lamport)
            .or(self.first_proposal.as_ref())
            .map(|p| (p.body.text.clone(), p.id.clone()))
    }
}

/// The first `n` characters of a text, on one line.
fn preview(text: &str, n: usize) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= n { one } else { format!("{}…", one.chars().take(n).collect::<String>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_steps_round_trip() {
        let p = PeerId::from("api");
        assert_eq!(parse_turn_step(&turn_step(&p, 3)), Some(("api", 3, "")));
        assert_eq!(parse_turn_step("conv/api/3/send/0"), Some(("api", 3, "send/0")));
        assert_eq!(parse_turn_step("turn/3"), None);
        assert_eq!(parse_turn_step("conv/api/x"), None);
    }
}
