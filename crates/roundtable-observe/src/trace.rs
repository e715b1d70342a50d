//! The causal trace of a session, read from its log: who said what to whom, which
//! envelopes each one answers (its causal parents), which envelopes led to the decision
//! that stopped the session, and what every peer cost.
//!
//! Rendered as text for people, Mermaid or Graphviz DOT for diagrams, and JSON for tools
//! (the web view draws from the same data).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use roundtable_core::log::Entry;
use roundtable_core::readable;
use roundtable_core::session::plan_of;
use roundtable_core::tool::{ToolCallBody, ToolResultBody};
use roundtable_core::{Kind, PeerId, Recipient, SessionId};
use serde::Serialize;

/// One envelope in the trace.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub seq: u64,
    pub id: String,
    pub from: String,
    /// `all`, a peer id, or `group NAME`.
    pub to: String,
    pub kind: &'static str,
    pub step: String,
    pub round: u32,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// Sequence numbers of the envelopes this one answers (its causal parents).
    pub parents: Vec<u64>,
    /// Parent ids that are not on this log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_parents: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: u64,
    /// On the causal path to the stop decision.
    pub led_to_decision: bool,
    /// Appended after the session's stop (a duty that was under way when the stop landed,
    /// an approval answered late): on the record, but it decided nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub after_stop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// How often one peer answered another (an envelope of `from` lists one of `to` as a
/// parent), or wrote to it directly.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Interaction {
    pub from: String,
    pub to: String,
    pub answers: u64,
    pub direct: u64,
}

/// What one peer did and cost.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PeerCost {
    pub peer: String,
    pub messages: u64,
    pub calls: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: u64,
    pub models: Vec<String>,
}

/// Why the session stopped.
#[derive(Clone, Debug, Serialize)]
pub struct StopExplanation {
    pub seq: u64,
    pub recorded_by: String,
    pub reason: String,
    pub answer: Option<String>,
    /// Whether the protocol accepted `answer` by its own rule (false when a limit
    /// stopped the session first).
    pub accepted: bool,
    /// The envelopes the decision was made from (the stop's parents).
    pub decided_by: Vec<u64>,
    /// Every envelope that led to the decision: `decided_by` and their causal ancestors,
    /// in log order.
    pub led_by: Vec<u64>,
    /// Votes and verdicts cast on the envelopes the stop was decided by (they name one of
    /// them as a parent): the ballots behind a consensus or a verdict.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ballots: Vec<u64>,
    /// When the stop names no envelopes: the contributions of the last round before it,
    /// for context (what the decision was made over, without a causal claim).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub last_round: Vec<u64>,
}

/// Where a forked session came from (recorded in its task envelope).
#[derive(Clone, Debug, Serialize)]
pub struct ForkOrigin {
    pub session: String,
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited: Option<serde_json::Value>,
}

/// The causal trace of one session.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    pub session: String,
    pub team: String,
    pub protocol: String,
    pub topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkOrigin>,
    pub nodes: Vec<Node>,
    pub interactions: Vec<Interaction>,
    pub peers: Vec<PeerCost>,
    pub total: PeerCost,
    /// Votes, verdicts, proposals and other decisions besides the stop (envelopes no
    /// model wrote that were derived from others), in log order.
    pub decisions: Vec<u64>,
    pub stop: Option<StopExplanation>,
}

/// A tool call or result as one line: who called which tool with what, and how it
/// ended (`None` for other envelopes, or a body this build cannot read).
fn tool_line(n: &Node) -> Option<String> {
    let json = n.json.clone()?;
    match n.kind {
        "tool_call" => {
            let b: ToolCallBody = serde_json::from_value(json).ok()?;
            let said = if b.said.trim().is_empty() {
                String::new()
            } else {
                format!(" — said \"{}\"", one_line(&b.said, 60))
            };
            Some(format!("{} called {}({}){said}", n.from, b.tool, one_line(&b.arguments, 90)))
        }
        "tool_result" => {
            let b: ToolResultBody = serde_json::from_value(json).ok()?;
            Some(format!("{} → {} ({}): \"{}\"", b.tool, n.from, b.status(), one_line(&b.output, 90)))
        }
        _ => None,
    }
}

fn to_text(to: &Recipient) -> String {
    match to {
        Recipient::All => "all".into(),
        Recipient::Peer(p) => p.to_string(),
        Recipient::Group(g) => format!("group {g}"),
    }
}

/// Whether an envelope counts as a contribution (the tally's rule: tool calls, their
/// results, approvals and listings are what a peer did, not what it said).
fn is_contribution(kind: Kind) -> bool {
    kind.is_contribution()
}

impl Node {
    /// Where the envelope stands, for people: its step when the step names its round
    /// (`r1/propose`), else the round and the step (`r1 turn/2`); rounds counted from 1.
    fn place(&self) -> String {
        let round = format!("r{}", self.round + 1);
        let step = readable::step(&self.step);
        let named = step.strip_prefix("jury/").unwrap_or(&step).split('/').next() == Some(round.as_str());
        if named { step } else { format!("{round} {step}") }
    }
}

impl Trace {
    /// Build the trace of a log. Works on any prefix of a log, including an open session.
    /// The log is read as its fold reads it: a stop that does not follow from the log is
    /// the rejection it stands for ([`roundtable_core::session::as_folded`]), so the
    /// trace never explains a stop the session did not take.
    pub fn build(session: &SessionId, entries: &[Entry]) -> Trace {
        let folded = roundtable_core::session::as_folded(session, entries);
        let entries = &folded[..];
        let seq_of: HashMap<&str, u64> = entries.iter().map(|e| (e.env.id.as_str(), e.seq)).collect();
        let task = entries.iter().find(|e| e.env.kind == Kind::Task);
        let plan = task.and_then(|t| plan_of(&t.env).ok());
        let team = plan
            .as_ref()
            .map(|p| p.name.clone())
            .or_else(|| task.and_then(|t| t.env.body.json.as_ref()?.get("team_name")?.as_str().map(str::to_owned)));
        let forked_from = task.and_then(|t| {
            let f = t.env.body.json.as_ref()?.get("forked_from")?;
            Some(ForkOrigin {
                session: f.get("session")?.as_str()?.to_owned(),
                at: f.get("at")?.as_u64()?,
                edited: f.get("edited").cloned(),
            })
        });

        let mut nodes: Vec<Node> = Vec::with_capacity(entries.len());
        let mut peers: BTreeMap<String, PeerCost> = BTreeMap::new();
        if let Some(plan) = &plan {
            for p in &plan.peers {
                peers
                    .entry(p.id.to_string())
                    .or_insert_with(|| PeerCost { peer: p.id.to_string(), ..Default::default() });
            }
        }
        let mut inter: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        let by_seq: HashMap<u64, &Entry> = entries.iter().map(|e| (e.seq, e)).collect();
        let mut decisions = Vec::new();
        let stop_seq = entries.iter().find(|e| e.env.kind == Kind::Stop).map(|e| e.seq);
        for e in entries {
            let after_stop = stop_seq.is_some_and(|s| e.seq > s);
            let env = &e.env;
            let mut parents = Vec::new();
            let mut unknown = Vec::new();
            for p in &env.parents {
                match seq_of.get(p.as_str()) {
                    Some(&s) => parents.push(s),
                    None => unknown.push(p.to_string()),
                }
            }
            let u = env.usage.as_ref();
            if env.kind != Kind::Task && env.kind != Kind::Stop {
                let pc = peers
                    .entry(env.from.to_string())
                    .or_insert_with(|| PeerCost { peer: env.from.to_string(), ..Default::default() });
                if is_contribution(env.kind) {
                    pc.messages += 1;
                }
                if env.kind == Kind::Failure {
                    pc.failures += 1;
                }
                if let Some(u) = u {
                    pc.calls += u64::from(u.calls);
                    pc.prompt_tokens += u.prompt_tokens;
                    pc.completion_tokens += u.completion_tokens;
                    pc.tokens += u.total_tokens();
                    pc.cost_usd += u.cost_usd;
                    pc.latency_ms += u.latency_ms;
                    if !u.model.is_empty() && !pc.models.iter().any(|m| **m == *u.model) {
                        pc.models.push(u.model.to_string());
                    }
                }
                for &ps in &parents {
                    let from = by_seq[&ps].env.from.to_string();
                    if from != env.from.as_str() && is_contribution(env.kind) {
                        inter.entry((env.from.to_string(), from)).or_default().0 += 1;
                    }
                }
                if let Recipient::Peer(to) = &env.to {
                    inter.entry((env.from.to_string(), to.to_string())).or_default().1 += 1;
                }
            }
            let derived_decision = env.usage.is_none()
                && !parents.is_empty()
                && !matches!(
                    env.kind,
                    Kind::Stop
                        | Kind::Failure
                        | Kind::Absent
                        | Kind::Join
                        | Kind::ToolCall
                        | Kind::ToolResult
                        | Kind::ToolList
                );
            if !after_stop
                && (derived_decision || matches!(env.kind, Kind::Vote | Kind::Verdict | Kind::Proposal | Kind::Reveal))
            {
                decisions.push(e.seq);
            }
            nodes.push(Node {
                seq: e.seq,
                id: env.id.to_string(),
                from: env.from.to_string(),
                to: to_text(&env.to),
                kind: env.kind.as_str(),
                step: env.step.to_string(),
                round: env.round,
                text: env.body.text.to_string(),
                json: if env.kind == Kind::Task { None } else { env.body.json.clone() },
                parents,
                unknown_parents: unknown,
                model: u.map(|u| u.model.to_string()),
                prompt_tokens: u.map_or(0, |u| u.prompt_tokens),
                completion_tokens: u.map_or(0, |u| u.completion_tokens),
                cost_usd: u.map_or(0.0, |u| u.cost_usd),
                latency_ms: u.map_or(0, |u| u.latency_ms),
                led_to_decision: false,
                after_stop,
                trace: env.trace.as_deref().map(str::to_owned),
            });
        }

        let stop = entries.iter().find(|e| e.env.kind == Kind::Stop).map(|s| {
            let j = s.env.body.json.as_ref();
            let decided_by: Vec<u64> = s.env.parents.iter().filter_map(|p| seq_of.get(p.as_str()).copied()).collect();
            // Causal ancestors of the decision.
            let index: HashMap<u64, usize> = nodes.iter().enumerate().map(|(i, n)| (n.seq, i)).collect();
            let mut seen = BTreeSet::new();
            let mut stack = decided_by.clone();
            while let Some(q) = stack.pop() {
                if seen.insert(q)
                    && let Some(&i) = index.get(&q)
                {
                    stack.extend(nodes[i].parents.iter().copied());
                }
            }
            StopExplanation {
                seq: s.seq,
                recorded_by: s.env.from.to_string(),
                reason: j.and_then(|j| j.get("reason")?.as_str().map(str::to_owned)).unwrap_or_default(),
                answer: j
                    .and_then(|j| j.get("answer")?.as_str().map(str::to_owned))
                    .or_else(|| (!s.env.body.text.is_empty()).then(|| s.env.body.text.to_string())),
                // Logs from before `accepted` was recorded: an answer in the stop counted.
                accepted: j.is_some_and(|j| {
                    j.get("accepted")
                        .and_then(|a| a.as_bool())
                        .unwrap_or_else(|| j.get("answer").is_some_and(|a| a.is_string()))
                }),
                last_round: if decided_by.is_empty() { last_round(entries, s.seq) } else { Vec::new() },
                ballots: nodes
                    .iter()
                    .filter(|n| {
                        n.seq < s.seq
                            && matches!(n.kind, "vote" | "verdict" | "reveal")
                            && n.parents.iter().any(|p| decided_by.contains(p))
                    })
                    .map(|n| n.seq)
                    .collect(),
                decided_by,
                led_by: seen.into_iter().collect(),
            }
        });
        if let Some(stop) = &stop {
            let on: BTreeSet<u64> = stop.led_by.iter().copied().collect();
            for n in &mut nodes {
                n.led_to_decision = on.contains(&n.seq);
            }
        }

        let mut total = PeerCost { peer: "total".into(), ..Default::default() };
        for p in peers.values() {
            total.messages += p.messages;
            total.calls += p.calls;
            total.failures += p.failures;
            total.prompt_tokens += p.prompt_tokens;
            total.completion_tokens += p.completion_tokens;
            total.tokens += p.tokens;
            total.cost_usd += p.cost_usd;
            total.latency_ms += p.latency_ms;
        }
        // Peers in the team's order, then anyone else (e.g. a peer that left the plan).
        let order: Vec<PeerId> = plan.as_ref().map(|p| p.peer_ids()).unwrap_or_default();
        let mut peer_list: Vec<PeerCost> = Vec::new();
        for id in &order {
            if let Some(p) = peers.remove(id.as_str()) {
                peer_list.push(p);
            }
        }
        peer_list.extend(peers.into_values());

        Trace {
            session: session.to_string(),
            team: team.unwrap_or_else(|| "?".into()),
            protocol: plan.as_ref().map_or("?", |p| p.protocol.kind()).to_string(),
            topic: task.map(|t| t.env.body.text.to_string()).unwrap_or_default(),
            forked_from,
            nodes,
            interactions: inter
                .into_iter()
                .map(|((from, to), (answers, direct))| Interaction { from, to, answers, direct })
                .collect(),
            peers: peer_list,
            total,
            decisions,
            stop,
        }
    }

    fn node(&self, seq: u64) -> Option<&Node> {
        self.nodes.binary_search_by_key(&seq, |n| n.seq).ok().map(|i| &self.nodes[i])
    }

    fn who(&self, seq: u64) -> String {
        match self.node(seq) {
            Some(n) if n.kind == "task" => format!("#{seq} the task"),
            Some(n) => format!("#{seq} {}", n.from),
            None => format!("#{seq}"),
        }
    }

    /// The trace for people.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Session {} · team {} · protocol {} · {} envelopes",
            self.session,
            self.team,
            self.protocol,
            self.nodes.len()
        );
        let _ = writeln!(o, "Task: {}", one_line(&self.topic, 200));
        if let Some(f) = &self.forked_from {
            let edit = match &f.edited {
                Some(e) => {
                    format!(", with envelope {} edited", e.get("seq").map_or_else(|| "?".into(), |s| format!("#{s}")))
                }
                None => String::new(),
            };
            let _ = writeln!(o, "Forked from session {} at #{}{edit}.", f.session, f.at);
        }

        let _ = writeln!(o, "\nWhy it stopped");
        match &self.stop {
            None => {
                let _ = writeln!(
                    o,
                    "  It has not stopped: the session is still open (resume it with `roundtable resume {}`).",
                    self.session
                );
            }
            Some(s) => {
                let _ = writeln!(o, "  #{} stop, recorded by {}: {}", s.seq, s.recorded_by, s.reason);
                if s.decided_by.is_empty() {
                    let _ = writeln!(o, "  It names no envelope it was decided from; its reason says why.");
                    if !s.last_round.is_empty() {
                        let last: Vec<String> = s
                            .last_round
                            .iter()
                            .filter_map(|&q| self.node(q))
                            .map(|n| format!("#{} {} ({})", n.seq, n.from, n.kind))
                            .collect();
                        let _ = writeln!(o, "  the last round before it: {}", last.join(", "));
                    }
                }
                for &d in &s.decided_by {
                    if let Some(n) = self.node(d) {
                        let _ = writeln!(
                            o,
                            "  decided by #{} {} ({}, {}): \"{}\"",
                            n.seq,
                            n.from,
                            n.kind,
                            readable::step(&n.step),
                            one_line(&n.text, 100)
                        );
                    }
                }
                for &b in &s.ballots {
                    if let Some(n) = self.node(b) {
                        let _ = writeln!(o, "  ballot on it: #{} {} ({}): {}", n.seq, n.from, n.kind, ballot(n));
                    }
                }
                if s.led_by.len() > s.decided_by.len() {
                    let chain: Vec<String> = s.led_by.iter().map(|&q| self.who(q)).collect();
                    let _ = writeln!(o, "  which came from {} envelopes: {}", s.led_by.len(), chain.join(", "));
                }
                if let Some(a) = &s.answer {
                    let label = if s.accepted { "final answer" } else { "leading candidate, not accepted" };
                    let _ = writeln!(o, "  {label}: \"{}\"", one_line(a, 160));
                }
            }
        }

        let _ = writeln!(o, "\nWho said what to whom (⤷ the envelopes each one answers; * led to the decision)");
        for n in &self.nodes {
            if n.kind == "task" {
                let _ = writeln!(o, "  #{:<4} {} posted the task", n.seq, n.from);
                continue;
            }
            if n.kind == "stop" {
                let reason = self.stop.as_ref().filter(|s| s.seq == n.seq).map_or("", |s| s.reason.as_str());
                let _ = writeln!(o, "  #{:<4} {} recorded the stop: {reason}", n.seq, n.from);
                let by: Vec<String> = n.parents.iter().map(|&p| self.who(p)).collect();
                if !by.is_empty() {
                    let _ = writeln!(o, "         ⤷ decided by {}", by.join(", "));
                }
                continue;
            }
            if n.kind == "tool_list" {
                let _ = writeln!(o, "  #{:<4} {} recorded the tools: {}", n.seq, n.from, one_line(&n.text, 160));
                continue;
            }
            let mark = if n.led_to_decision { "*" } else { " " };
            let cost = if n.prompt_tokens + n.completion_tokens > 0 {
                format!("  [{} tok{}]", n.prompt_tokens + n.completion_tokens, money(n.cost_usd, " · "))
            } else {
                String::new()
            };
            let at = n.place();
            let late = if n.after_stop { " (after the stop: decides nothing)" } else { "" };
            if let Some(line) = tool_line(n) {
                let _ = writeln!(o, "{mark} #{:<4} {at} {line}{late}{cost}", n.seq);
                if n.kind == "tool_result" && !n.parents.is_empty() {
                    let by: Vec<String> = n.parents.iter().map(|&p| self.who(p)).collect();
                    let _ = writeln!(o, "         ⤷ answers {}", by.join(", "));
                }
                continue;
            }
            let kind = match (n.kind, n.after_stop) {
                ("message", false) => String::new(),
                ("message", true) => " (after the stop: decides nothing)".to_string(),
                (kind, false) => format!(" ({kind})"),
                (kind, true) => format!(" ({kind}, after the stop: decides nothing)"),
            };
            let _ = writeln!(
                o,
                "{mark} #{:<4} {at} {} → {}{kind}: \"{}\"{cost}",
                n.seq,
                n.from,
                n.to,
                one_line(&n.text, 90)
            );
            let answers: Vec<String> = n
                .parents
                .iter()
                .map(|&p| self.who(p))
                .chain(n.unknown_parents.iter().map(|u| format!("{} (not on this log)", short(u))))
                .collect();
            if !answers.is_empty() {
                let _ = writeln!(o, "         ⤷ answers {}", answers.join(", "));
            } else if answers_task(n.kind) {
                let _ = writeln!(o, "         ⤷ answers the task");
            }
        }

        if !self.interactions.is_empty() {
            let _ = writeln!(o, "\nWho answered whom");
            for i in &self.interactions {
                let mut parts = Vec::new();
                if i.answers > 0 {
                    parts.push(format!("answered {} {}×", i.to, i.answers));
                }
                if i.direct > 0 {
                    parts.push(format!("wrote to {} directly {}×", i.to, i.direct));
                }
                let _ = writeln!(o, "  {} {}", i.from, parts.join(", "));
            }
        }

        if !self.decisions.is_empty() {
            let _ = writeln!(o, "\nVotes and decisions");
            for &d in &self.decisions {
                if let Some(n) = self.node(d) {
                    let from: Vec<String> = n.parents.iter().map(|&p| self.who(p)).collect();
                    let basis = if from.is_empty() { String::new() } else { format!(" ← {}", from.join(", ")) };
                    let _ = writeln!(o, "  #{} {} ({}): {}{basis}", n.seq, n.from, n.kind, ballot(n));
                }
            }
        }

        let _ = writeln!(o, "\nCost per peer");
        // The first column is as wide as the longest peer id.
        let w =
            self.peers.iter().chain(std::iter::once(&self.total)).map(|p| p.peer.chars().count()).max().unwrap_or(0);
        let w = w.max(14);
        let _ = writeln!(
            o,
            "  {:<w$} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8} {:>10} {:>9}",
            "PEER", "MSGS", "CALLS", "FAILS", "PROMPT", "COMPL", "TOKENS", "COST", "LATENCY"
        );
        for p in self.peers.iter().chain(std::iter::once(&self.total)) {
            let _ = writeln!(
                o,
                "  {:<w$} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8} {:>10} {:>7}ms",
                p.peer,
                p.messages,
                p.calls,
                p.failures,
                p.prompt_tokens,
                p.completion_tokens,
                p.tokens,
                format!("${:.4}", p.cost_usd),
                p.latency_ms
            );
        }
        o
    }

    /// A Mermaid flowchart: envelopes as nodes, causal parents as edges (parent → child);
    /// the path to the decision is drawn bold.
    pub fn to_mermaid(&self) -> String {
        let mut o = String::from("flowchart TD\n");
        for n in &self.nodes {
            let label = format!("#{} {} · {}<br/>{}", n.seq, n.from, n.kind, one_line(&n.text, 48));
            let label = mermaid_escape(&label);
            let shape = match n.kind {
                "task" => format!("e{}[/\"{label}\"/]", n.seq),
                "stop" => format!("e{}{{{{\"{label}\"}}}}", n.seq),
                "vote" | "verdict" => format!("e{}([\"{label}\"])", n.seq),
                _ => format!("e{}[\"{label}\"]", n.seq),
            };
            let _ = writeln!(o, "  {shape}");
        }
        let task = self.nodes.iter().find(|n| n.kind == "task").map(|n| n.seq);
        for n in &self.nodes {
            let stop_edge = n.kind == "stop";
            for &p in &n.parents {
                let arrow = if stop_edge || self.node(p).is_some_and(|pn| pn.led_to_decision) && n.led_to_decision {
                    "==>"
                } else {
                    "-->"
                };
                let _ = writeln!(o, "  e{p} {arrow} e{}", n.seq);
            }
            if n.parents.is_empty()
                && answers_task(n.kind)
                && let Some(t) = task
            {
                let _ = writeln!(o, "  e{t} -.-> e{}", n.seq);
            }
        }
        o.push_str("  classDef decision fill:#fde68a,stroke:#b45309,stroke-width:2px\n");
        o.push_str("  classDef stop fill:#fecaca,stroke:#b91c1c,stroke-width:2px\n");
        let on: Vec<String> = self.nodes.iter().filter(|n| n.led_to_decision).map(|n| format!("e{}", n.seq)).collect();
        if !on.is_empty() {
            let _ = writeln!(o, "  class {} decision", on.join(","));
        }
        if let Some(s) = &self.stop {
            let _ = writeln!(o, "  class e{} stop", s.seq);
        }
        o
    }

    /// A Graphviz DOT digraph of the same graph.
    pub fn to_dot(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "digraph \"{}\" {{", dot_escape(&self.session));
        o.push_str("  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f8fafc\", fontname=\"Helvetica\", fontsize=10];\n  edge [color=\"#64748b\"];\n");
        let _ = writeln!(
            o,
            "  label=\"{} · {} · {}\"; labelloc=t;",
            dot_escape(&self.team),
            dot_escape(&self.protocol),
            dot_escape(&self.session)
        );
        for n in &self.nodes {
            let label = format!(
                "#{} {} · {} (r{})\\n{}",
                n.seq,
                dot_escape(&n.from),
                n.kind,
                n.round + 1,
                dot_escape(&one_line(&n.text, 48))
            );
            let style = match n.kind {
                "task" => ", shape=note, fillcolor=\"#e0f2fe\"",
                "stop" => ", shape=doubleoctagon, fillcolor=\"#fecaca\"",
                "failure" => ", fillcolor=\"#fee2e2\"",
                _ if n.led_to_decision => ", fillcolor=\"#fde68a\"",
                _ => "",
            };
            let _ = writeln!(o, "  n{} [label=\"{label}\"{style}];", n.seq);
        }
        let task = self.nodes.iter().find(|n| n.kind == "task").map(|n| n.seq);
        for n in &self.nodes {
            for &p in &n.parents {
                let bold = n.kind == "stop" || (n.led_to_decision && self.node(p).is_some_and(|pn| pn.led_to_decision));
                let attrs = if n.kind == "stop" {
                    " [penwidth=2.5, color=\"#b91c1c\", label=\"decided\"]"
                } else if bold {
                    " [penwidth=2, color=\"#b45309\"]"
                } else {
                    ""
                };
                let _ = writeln!(o, "  n{p} -> n{}{attrs};", n.seq);
            }
            if n.parents.is_empty()
                && answers_task(n.kind)
                && let Some(t) = task
            {
                let _ = writeln!(o, "  n{t} -> n{} [style=dashed];", n.seq);
            }
        }
        o.push_str("}\n");
        o
    }
}

/// Contributions of the last round before the stop at `stop_seq`.
fn last_round(entries: &[Entry], stop_seq: u64) -> Vec<u64> {
    let before = entries.iter().filter(|e| e.seq < stop_seq && is_contribution(e.env.kind));
    let Some(round) = before.clone().map(|e| e.env.round).max() else { return Vec::new() };
    before.filter(|e| e.env.round == round).map(|e| e.seq).collect()
}

/// A vote, verdict or proposal in a few words: its structured fields when it has them
/// (`approve`, `answer`, `reason`, …), its text otherwise.
fn ballot(n: &Node) -> String {
    let structured = match &n.json {
        // A reveal's JSON is its salt and commitment: the answer is the text.
        Some(serde_json::Value::Object(m)) if !matches!(n.kind, "reveal" | "commit") => Some(m),
        _ => None,
    };
    let Some(m) = structured else { return format!("\"{}\"", one_line(&n.text, 80)) };
    let mut parts = Vec::new();
    if let Some(a) = m.get("approve").and_then(serde_json::Value::as_bool) {
        parts.push(if a { "approves".to_string() } else { "rejects".to_string() });
    }
    for (k, v) in m {
        if k == "approve" {
            continue;
        }
        let v = match v {
            serde_json::Value::String(s) => one_line(s, 60),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => v.to_string(),
            _ => continue,
        };
        parts.push(format!("{k}: {v}"));
    }
    if parts.is_empty() { format!("\"{}\"", one_line(&n.text, 80)) } else { parts.join(" · ") }
}

/// Kinds that answer the task when they name no parents.
fn answers_task(kind: &str) -> bool {
    matches!(kind, "message" | "proposal" | "vote" | "verdict" | "commit" | "reveal")
}

fn money(c: f64, sep: &str) -> String {
    if c > 0.0 { format!("{sep}${c:.4}") } else { String::new() }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// `text` on one line (whitespace collapsed), cut at `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let mut out: String = flat.chars().take(max).collect();
        out.push('…');
        out
    } else {
        flat
    }
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;").replace('<', "#lt;").replace('>', "#gt;").replace("#lt;br/#gt;", "<br/>")
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
