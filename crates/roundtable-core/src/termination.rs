//! Stop conditions and budgets, evaluated over the log.
//!
//! A [`Tally`] is folded from the log (messages, rounds, tokens, money, calls, per peer
//! and for the session). [`Termination`] is an algebra of conditions combined with
//! `any` / `all`; every condition is a pure function of the tally and the protocol's
//! [`Signals`], except `timeout`, which reads the clock — and whichever peer notices
//! first records the stop on the log, so replay reads the decision instead of the clock.
//!
//! A [`Budget`] is checked before every model call (judges, summarizers and embedders
//! included): a call that the budget does not allow is not made, and the session stops
//! with the best answer so far and the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, Kind, PeerId};

/// Running totals, folded from the log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Contributions by peers (everything but task, stop, presence and failures).
    pub messages: u64,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub failures: u64,
    /// Tool calls recorded (`tool_call` envelopes) and the time tools took (from their
    /// results).
    pub tool_calls: u64,
    pub tool_ms: u64,
    pub per_peer: BTreeMap<PeerId, PeerTally>,
    /// The first contribution that mentioned the termination text, if any.
    pub mention: Option<(u64, PeerId)>,
    /// The latest envelope that carries a model call's usage: the call a budget or a
    /// total-based stop is decided by.
    pub last_call: Option<crate::envelope::EnvelopeId>,
    /// Keep `per_peer` for this peer only. A peer reads only its own totals (its call
    /// ordinal, its budget); keeping everyone's in every peer would cost O(peers²).
    #[serde(skip)]
    pub only: Option<PeerId>,
}

/// One peer's totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerTally {
    pub messages: u64,
    /// Contributions that came from a model call (they carry usage).
    pub messages_from_calls: u64,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub failures: u64,
    pub tool_calls: u64,
}

impl Tally {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// A copy that keeps `me`'s per-peer totals only (see [`Tally::only`]).
    pub fn for_peer(&self, me: &PeerId) -> Tally {
        Tally {
            messages: self.messages,
            calls: self.calls,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
            failures: self.failures,
            tool_calls: self.tool_calls,
            tool_ms: self.tool_ms,
            per_peer: self.per_peer.get(me).map(|p| (me.clone(), p.clone())).into_iter().collect(),
            mention: self.mention.clone(),
            last_call: self.last_call.clone(),
            only: Some(me.clone()),
        }
    }

    /// Fold one envelope in. `mention` is the termination text to look for, if any.
    pub fn observe(&mut self, seq: u64, env: &Envelope, mention: Option<&str>) {
        let counts_as_message = env.kind.is_contribution();
        let mut scratch = PeerTally::default();
        let p = if self.only.as_ref().is_some_and(|o| o != &env.from) {
            &mut scratch
        } else {
            if !self.per_peer.contains_key(&env.from) {
                self.per_peer.insert(env.from.clone(), PeerTally::default());
            }
            self.per_peer.get_mut(&env.from).expect("inserted above")
        };
        if counts_as_message {
            self.messages += 1;
            p.messages += 1;
        }
        if env.kind == Kind::Failure {
            self.failures += 1;
            p.failures += 1;
        }
        // A model call's envelope: its answer, or the first call it asked for.
        if (counts_as_message || env.kind == Kind::ToolCall) && env.usage.is_some() {
            p.messages_from_calls += 1;
        }
        match env.kind {
            Kind::ToolCall => {
                self.tool_calls += 1;
                p.tool_calls += 1;
            }
            Kind::ToolResult => {
                self.tool_ms +=
                    env.body.json.as_ref().and_then(|j| j.get("duration_ms")).and_then(|d| d.as_u64()).unwrap_or(0);
            }
            _ => {}
        }
        if let Some(u) = &env.usage {
            self.last_call = Some(env.id.clone());
            let calls = u64::from(u.calls);
            self.calls += calls;
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
            self.cost_usd += u.cost_usd;
            p.calls += calls;
            p.prompt_tokens += u.prompt_tokens;
            p.completion_tokens += u.completion_tokens;
            p.cost_usd += u.cost_usd;
        }
        if let Some(m) = mention
            && self.mention.is_none()
            && counts_as_message
            && env.body.text.contains(m)
        {
            self.mention = Some((seq, env.from.clone()));
        }
    }
}

/// What a protocol reports about its own progress, for termination conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    pub round: u32,
    /// A judge or critic returned a verdict that ends the debate.
    pub verdict: bool,
    /// The protocol's consensus rule is met.
    pub consensus: bool,
    /// Pairwise similarity of the latest answers (emergent consensus).
    pub convergence: Option<f64>,
    /// Confidence of the leading answer.
    pub confidence: Option<f64>,
    /// Rounds in a row in which no answer changed.
    pub rounds_without_change: u32,
}

/// Composable stop conditions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Termination {
    Any(Vec<Termination>),
    All(Vec<Termination>),
    MaxRounds(u32),
    MaxMessages(u64),
    TokenBudget(u64),
    CostBudget(f64),
    MaxCalls(u64),
    TimeoutMs(u64),
    TextMention(Arc<str>),
    JudgeVerdict,
    Confidence(f64),
    Convergence(f64),
    ConsensusReached,
    NoProgress(u32),
}

impl Default for Termination {
    fn default() -> Self {
        Termination::Any(Vec::new())
    }
}

impl Termination {
    /// Why the session must stop now, if it must. `elapsed_ms` is the time since the
    /// session's task was posted (only `timeout` uses it).
    pub fn check(&self, t: &Tally, s: &Signals, elapsed_ms: u64) -> Option<String> {
        match self {
            Termination::Any(cs) => cs.iter().find_map(|c| c.check(t, s, elapsed_ms)),
            Termination::All(cs) => {
                if cs.is_empty() {
                    return None;
                }
                let reasons: Option<Vec<String>> = cs.iter().map(|c| c.check(t, s, elapsed_ms)).collect();
                reasons.map(|r| r.join(" and "))
            }
            Termination::MaxRounds(n) => (s.round >= *n)
                .then(|| format!("max_rounds: {} reached", crate::readable::count(*n, "round", "rounds"))),
            Termination::MaxMessages(n) => (t.messages >= *n).then(|| format!("max_messages: {} messages", t.messages)),
            Termination::TokenBudget(n) => {
                (t.tokens() >= *n).then(|| format!("token_budget: {} tokens used of {n}", t.tokens()))
            }
            Termination::CostBudget(c) => {
                (t.cost_usd >= *c).then(|| format!("cost_budget: ${:.4} spent of ${c:.4}", t.cost_usd))
            }
            Termination::MaxCalls(n) => (t.calls >= *n).then(|| format!("max_calls: {} model calls", t.calls)),
            Termination::TimeoutMs(ms) => {
                (elapsed_ms >= *ms).then(|| format!("timeout: {:.1} s elapsed", elapsed_ms as f64 / 1000.0))
            }
            Termination::TextMention(m) => {
                t.mention.as_ref().map(|(seq, p)| format!("text_mention: {p} wrote {m:?} (seq {seq})"))
            }
            Termination::JudgeVerdict => s.verdict.then(|| "judge_verdict: the judge reached a verdict".into()),
            Termination::Confidence(th) => {
                s.confidence.filter(|c| c >= th).map(|c| format!("confidence: {c:.2} ≥ {th:.2}"))
            }
            Termination::Convergence(th) => {
                s.convergence.filter(|c| c >= th).map(|c| format!("convergence: similarity {c:.2} ≥ {th:.2}"))
            }
            Termination::ConsensusReached => s.consensus.then(|| "consensus_reached".into()),
            Termination::NoProgress(k) => (s.rounds_without_change >= *k).then(|| {
                format!("no_progress: answers unchanged for {}", crate::readable::count(*k, "round", "rounds"))
            }),
        }
    }

    /// The conditions in the team file's words (`max_rounds 4 or text_mention "DONE"`);
    /// empty when there are none.
    pub fn describe(&self) -> String {
        match self {
            Termination::Any(cs) | Termination::All(cs) => {
                let sep = if matches!(self, Termination::Any(_)) { " or " } else { " and " };
                let parts: Vec<String> = cs
                    .iter()
                    .map(|c| {
                        let d = c.describe();
                        if d.contains(" or ") || d.contains(" and ") { format!("({d})") } else { d }
                    })
                    .filter(|s| !s.is_empty())
                    .collect();
                parts.join(sep)
            }
            Termination::MaxRounds(n) => format!("max_rounds {n}"),
            Termination::MaxMessages(n) => format!("max_messages {n}"),
            Termination::TokenBudget(n) => format!("token_budget {n}"),
            Termination::CostBudget(c) => format!("cost_budget {c}"),
            Termination::MaxCalls(n) => format!("max_calls {n}"),
            Termination::TimeoutMs(ms) => format!("timeout_secs {}", *ms as f64 / 1000.0),
            Termination::TextMention(m) => format!("text_mention {m:?}"),
            Termination::JudgeVerdict => "judge_verdict".into(),
            Termination::Confidence(c) => format!("confidence {c}"),
            Termination::Convergence(c) => format!("convergence {c}"),
            Termination::ConsensusReached => "consensus_reached".into(),
            Termination::NoProgress(k) => format!("no_progress {k}"),
        }
    }

    /// The text to watch for, if a `text_mention` condition is present.
    pub fn mention(&self) -> Option<&str> {
        match self {
            Termination::Any(cs) | Termination::All(cs) => cs.iter().find_map(Termination::mention),
            Termination::TextMention(m) => Some(m),
            _ => None,
        }
    }

    /// The time limit, if a `timeout` condition is present (peers check it on a timer).
    pub fn timeout_ms(&self) -> Option<u64> {
        match self {
            Termination::Any(cs) | Termination::All(cs) => cs.iter().filter_map(Termination::timeout_ms).min(),
            Termination::TimeoutMs(ms) => Some(*ms),
            _ => None,
        }
    }
}

/// Hard limits, checked before every model call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub max_calls: Option<u64>,
    pub max_wall_ms: Option<u64>,
    /// Tool calls in the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_calls: Option<u64>,
    /// Wall time spent in tools, summed over calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_ms: Option<u64>,
    #[serde(default)]
    pub per_peer: PeerBudget,
}

/// Limits for each peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerBudget {
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub max_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_calls: Option<u64>,
}

/// Whose budget a refused call ran into.
#[derive(Clone, Debug, PartialEq)]
pub enum BudgetScope {
    Session,
    Peer,
}

impl Budget {
    /// Whether `peer` may make one more call whose prompt is about `prompt_tokens` and
    /// whose prompt would cost about `prompt_cost`. `Err` says which limit and whose.
    pub fn allows(
        &self,
        t: &Tally,
        peer: &PeerId,
        prompt_tokens: u64,
        prompt_cost: f64,
        elapsed_ms: u64,
    ) -> Result<(), (BudgetScope, String)> {
        let s = BudgetScope::Session;
        if let Some(max) = self.max_calls
            && t.calls + 1 > max
        {
            return Err((s, format!("budget: {} model calls made, limit {max}", t.calls)));
        }
        if let Some(max) = self.max_tokens
            && t.tokens() + prompt_tokens > max
        {
            return Err((
                s,
                format!("budget: {} tokens used and the next prompt needs ~{prompt_tokens}, limit {max}", t.tokens()),
            ));
        }
        if let Some(max) = self.max_cost_usd
            && t.cost_usd + prompt_cost > max
        {
            return Err((
                s,
                format!("budget: ${:.4} spent, next prompt ~${prompt_cost:.4}, limit ${max:.4}", t.cost_usd),
            ));
        }
        self.allows_wall(elapsed_ms)?;
        let zero = PeerTally::default();
        let p = t.per_peer.get(peer).unwrap_or(&zero);
        let pb = &self.per_peer;
        let ps = BudgetScope::Peer;
        if let Some(max) = pb.max_calls
            && p.calls + 1 > max
        {
            return Err((ps, format!("peer budget: {peer} made {} calls, limit {max}", p.calls)));
        }
        if let Some(max) = pb.max_tokens {
            let used = p.prompt_tokens + p.completion_tokens;
            if used + prompt_tokens > max {
                return Err((
                    ps,
                    format!("peer budget: {peer} used {used} tokens, next prompt ~{prompt_tokens}, limit {max}"),
                ));
            }
        }
        if let Some(max) = pb.max_cost_usd
            && p.cost_usd + prompt_cost > max
        {
            return Err((ps, format!("peer budget: {peer} spent ${:.4}, limit ${max:.4}", p.cost_usd)));
        }
        Ok(())
    }

    /// Whether the session's wall time allows more work. The only limit a person's
    /// answer is checked against: it is no model call, costs no tokens and no money.
    pub fn allows_wall(&self, elapsed_ms: u64) -> Result<(), (BudgetScope, String)> {
        if let Some(max) = self.max_wall_ms
            && elapsed_ms >= max
        {
            return Err((
                BudgetScope::Session,
                format!("budget: {:.1} s of wall time used, limit {:.1} s", elapsed_ms as f64 / 1e3, max as f64 / 1e3),
            ));
        }
        Ok(())
    }

    /// Whether `peer`'s latest recorded tool call may run: `t` already counts it (a call
    /// is on the log before it runs). `Err` says which limit and whose.
    pub fn allows_tool(&self, t: &Tally, peer: &PeerId) -> Result<(), (BudgetScope, String)> {
        if let Some(max) = self.max_tool_calls
            && t.tool_calls > max
        {
            return Err((BudgetScope::Session, format!("budget: {} tool calls made, limit {max}", t.tool_calls - 1)));
        }
        if let Some(max) = self.max_tool_ms
            && t.tool_ms >= max
        {
            return Err((
                BudgetScope::Session,
                format!("budget: {:.1} s spent in tools, limit {:.1} s", t.tool_ms as f64 / 1e3, max as f64 / 1e3),
            ));
        }
        let calls = t.per_peer.get(peer).map_or(0, |p| p.tool_calls);
        if let Some(max) = self.per_peer.max_tool_calls
            && calls > max
        {
            return Err((BudgetScope::Peer, format!("peer budget: {peer} made {} tool calls, limit {max}", calls - 1)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, Recipient, SessionId, Usage};

    fn msg(from: &str, text: &str, tokens: u64) -> Envelope {
        Envelope::new(
            &SessionId::from("s"),
            &from.into(),
            text.to_string(),
            Kind::Message,
            Recipient::All,
            Body::text(text),
        )
        .with_usage(Usage {
            model: "m".into(),
            prompt_tokens: tokens,
            completion_tokens: 1,
            cost_usd: 0.5,
            calls: 1,
            ..Default::default()
        })
    }

    #[test]
    fn tally_counts_and_finds_mentions() {
        let mut t = Tally::default();
        t.observe(1, &msg("a", "hello", 10), Some("DONE"));
        t.observe(2, &msg("b", "we are DONE", 5), Some("DONE"));
        t.observe(3, &msg("a", "DONE again", 5), Some("DONE"));
        assert_eq!((t.messages, t.calls, t.tokens()), (3, 3, 23));
        assert_eq!(t.mention, Some((2, PeerId::from("b"))));
        assert_eq!(t.per_peer[&PeerId::from("a")].calls, 2);
    }

    #[test]
    fn a_peers_tally_keeps_only_its_own_per_peer_totals() {
        let mut t = Tally { only: Some("a".into()), ..Default::default() };
        t.observe(1, &msg("a", "x", 10), None);
        t.observe(2, &msg("b", "y", 20), None);
        assert_eq!((t.messages, t.calls, t.tokens()), (2, 2, 32), "session totals count everyone");
        assert_eq!(t.per_peer.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(t.per_peer[&PeerId::from("a")].prompt_tokens, 10);
    }

    #[test]
    fn any_and_all_compose() {
        let mut t = Tally::default();
        for i in 0..4 {
            t.observe(i, &msg("a", &format!("m{i}"), 10), None);
        }
        let s = Signals { round: 2, ..Default::default() };
        let any = Termination::Any(vec![Termination::MaxRounds(5), Termination::MaxMessages(4)]);
        assert_eq!(any.check(&t, &s, 0).unwrap(), "max_messages: 4 messages");
        let all = Termination::All(vec![Termination::MaxRounds(2), Termination::MaxMessages(5)]);
        assert_eq!(all.check(&t, &s, 0), None);
        let all = Termination::All(vec![Termination::MaxRounds(2), Termination::MaxCalls(4)]);
        assert!(all.check(&t, &s, 0).unwrap().contains(" and "));
        assert_eq!(Termination::default().check(&t, &s, u64::MAX), None);
        assert!(Termination::TimeoutMs(1000).check(&t, &s, 1000).is_some());
        assert!(Termination::TimeoutMs(1000).check(&t, &s, 999).is_none());
        let nested =
            Termination::Any(vec![Termination::All(vec![Termination::TimeoutMs(5)]), Termination::TimeoutMs(3)]);
        assert_eq!(nested.timeout_ms(), Some(3));
    }

    #[test]
    fn budget_refuses_the_call_that_would_exceed() {
        let mut t = Tally::default();
        t.observe(1, &msg("a", "x", 90), None); // 91 tokens, $0.5, 1 call
        let b = Budget { max_tokens: Some(100), ..Default::default() };
        assert!(b.allows(&t, &"a".into(), 9, 0.0, 0).is_ok());
        let (scope, why) = b.allows(&t, &"a".into(), 10, 0.0, 0).unwrap_err();
        assert_eq!(scope, BudgetScope::Session);
        assert!(why.contains("limit 100"), "{why}");
        let b = Budget { max_calls: Some(1), ..Default::default() };
        assert!(b.allows(&t, &"a".into(), 0, 0.0, 0).is_err());
        let b = Budget { per_peer: PeerBudget { max_calls: Some(1), ..Default::default() }, ..Default::default() };
        assert_eq!(b.allows(&t, &"a".into(), 0, 0.0, 0).unwrap_err().0, BudgetScope::Peer);
        assert!(b.allows(&t, &"b".into(), 0, 0.0, 0).is_ok());
        let b = Budget { max_cost_usd: Some(0.6), ..Default::default() };
        assert!(b.allows(&t, &"a".into(), 0, 0.2, 0).is_err());
    }
}
