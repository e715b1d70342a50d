//! `simulated`: a seeded noisy oracle for tasks with known answers.
//!
//! For a question whose answer the oracle knows (by default: arithmetic expressions such
//! as `3+4*5+6-7*8`), the model answers correctly with probability `p_correct`, and
//! otherwise gives a plausible wrong answer (the right one off by a small amount). With
//! `susceptibility` s > 0 it is swayed by its peers: with probability s it adopts the
//! most common answer among the other peers' messages in its context.
//!
//! Every draw is seeded from (seed, peer, step, question), so a call gives the same
//! answer however calls interleave, and a replayed session is identical. That makes the
//! protocols studiable offline and checkable against theory (majority-vote accuracy of
//! n independent voters is a binomial tail).
//!
//! Answers end with `Answer: X`; in JSON mode the reply is `{"answer": "X", "confidence": c}`.
//!
//! # Protocol roles
//! The model reads what it is asked from the JSON keys its instruction names, so every
//! protocol runs offline with it. "Its answer" below is its own noisy solution; "the
//! proposal" is the latest answer another peer stated in its context.
//! - `satisfied` (a critic): satisfied when its answer equals the proposal.
//! - `consensus_reached` (a judge): reached when the debaters' answers all agree; the
//!   conclusion is their most common answer. `conclusion` alone (the final pick): its
//!   answer when a debater gave it, else the most common one.
//! - `approve` (a consensus vote): approves when its answer equals the proposal.
//! - `concede` (a devil's advocate): objects with its answer when it differs;
//!   otherwise concedes with probability `p_correct`, or objects with a wrong answer.
//! - `valid` / `objection_valid`: the objection is valid when it names the model's own
//!   answer (or, without an alternative, when the proposal differs from it).
//! - `capability` (a bid): a number in 0.3–1.
//! - An instruction starting with "Summarize": a summary of the answers in view.
//! - "State the objective" (a hybrid leader): an objective that states no answer.
//!
//! # Task families
//! It answers two kinds of question, and says so when asked anything else:
//! - **Integer arithmetic** with `+ - *` and the usual precedence (`29+4*17+3-21*2`):
//!   the right answer is computed.
//! - **Multiple choice** with options labelled `A)`, `(A)`, `A.` or `A:` (at least `A`
//!   and `B`): the right answer is taken to be `A`; wrong ones are the other labels.
//! - An oracle given with [`Simulated::with_oracle`] (an answer key, as `eval` uses).
//!
//! Anything else (a factual question, arithmetic with parentheses, division, powers or
//! decimals, an open topic) gets [`CANNOT_ANSWER`] wherever the protocol asks for its
//! own answer (answers, critiques, votes, verdicts), with no answer in it, never a
//! guess. Roles that need no answer of its own (a summary, a bid, a leader's
//! objective) are still played.
//!
//! # Tools
//! When the peer is offered tools and the task names one of them (its name as a whole
//! word; `send`, `broadcast` and `finish` excepted, they are how a conversation
//! speaks), the model's first answer of a duty in which its own answer is asked is a
//! call of each tool named, in the order the task names them — unless one of its own
//! earlier messages in view already reports a tool's answer, which it keeps. Arguments:
//! the JSON object right after the name (`lookup {"key": "users"}`, or after `with`,
//! `on` or `:`); else, for a tool whose schema has exactly one property, the text in
//! double quotes or backticks right after it, as that property; else none (`{}`). Once the results are back, the last
//! successful one is its answer: the text after the last `Answer:` in the output, else
//! the output's `answer` when it is a JSON object, else the output's last non-empty
//! line. The reply says so (``I ran `NAME`: output. Answer: X``; in JSON mode the
//! answer's JSON, in a conversation a broadcast of that line). A call that failed
//! leaves the model to answer as it would without tools. No draw decides a call, so
//! the same request makes the same calls with the same ids.

use std::sync::Arc;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, estimate_tokens};

/// The reply to arithmetic the model cannot evaluate (it states no answer).
pub const CANNOT_ANSWER: &str = "I cannot answer this: the simulated model answers integer arithmetic with + - * (no parentheses, division, powers or decimals) and multiple-choice questions with options labelled A), B), ...; this is neither.";

/// Knows the right answer to a question, when it can.
pub type Oracle = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct Simulated {
    name: String,
    pub p_correct: f64,
    pub susceptibility: f64,
    pub seed: u64,
    oracle: Oracle,
}

impl std::fmt::Debug for Simulated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulated")
            .field("name", &self.name)
            .field("p_correct", &self.p_correct)
            .field("susceptibility", &self.susceptibility)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Simulated {
    pub fn new(name: impl Into<String>, p_correct: f64, susceptibility: f64, seed: u64) -> Self {
        Simulated {
            name: name.into(),
            p_correct,
            susceptibility,
            seed,
            oracle: Arc::new(|q| arithmetic::answer_in(q).map(|v| v.to_string())),
        }
    }

    /// Use a different oracle (e.g. an answer key for JSONL tasks).
    pub fn with_oracle(mut self, oracle: Oracle) -> Self {
        self.oracle = oracle;
        self
    }

    fn rng(&self, req: &ChatRequest, question: &str) -> ChaCha8Rng {
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(req.peer.as_str().as_bytes());
        h.update([0]);
        h.update(req.step.as_bytes());
        h.update([0]);
        h.update(question.as_bytes());
        let d = h.finalize();
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&d);
        ChaCha8Rng::from_seed(seed)
    }
}

/// The last `Answer: X` (or, failing that, the last integer) in a text.
pub fn extract_answer(text: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim())
        && let Some(a) = v.get("answer")
    {
        return Some(a.as_str().map(str::to_owned).unwrap_or_else(|| a.to_string()));
    }
    let lower = text.to_ascii_lowercase();
    if let Some(pos) = lower.rfind("answer:") {
        let rest = text[pos + 7..].trim();
        let ans: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != ',').collect();
        let ans = ans.trim_end_matches(['.', ';']);
        if !ans.is_empty() {
            return Some(ans.to_string());
        }
    }
    last_integer(text).map(|v| v.to_string())
}

fn last_integer(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 {
        if b[end - 1].is_ascii_digit() {
            let mut start = end;
            while start > 0 && b[start - 1].is_ascii_digit() {
                start -= 1;
            }
            let neg = start > 0 && b[start - 1] == b'-' && (start < 2 || !b[start - 2].is_ascii_alphanumeric());
            let v: i64 = text[start..end].parse().ok()?;
            return Some(if neg { -v } else { v });
        }
        end -= 1;
    }
    None
}

/// What a protocol asks of the model, read from the JSON keys its instruction names.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ask {
    Answer,
    Summary,
    Critique,
    Judge,
    JudgePick,
    Approve,
    Advocate,
    ObjectionVote { key: &'static str },
    Bid,
    Objective,
}

impl Ask {
    /// Whether playing this role takes an answer of the model's own.
    fn needs_own_answer(self) -> bool {
        !matches!(self, Ask::Summary | Ask::Bid | Ask::Objective)
    }
}

fn ask_of(req: &ChatRequest) -> Ask {
    let i = req.instruction.as_deref().unwrap_or("");
    let has = |k: &str| i.contains(&format!("\"{k}\""));
    if has("satisfied") {
        Ask::Critique
    } else if has("consensus_reached") {
        Ask::Judge
    } else if has("conclusion") {
        Ask::JudgePick
    } else if has("approve") {
        Ask::Approve
    } else if has("concede") {
        Ask::Advocate
    } else if has("objection_valid") {
        Ask::ObjectionVote { key: "objection_valid" }
    } else if has("valid") {
        Ask::ObjectionVote { key: "valid" }
    } else if has("capability") {
        Ask::Bid
    } else if i.contains("State the objective") {
        Ask::Objective
    } else if i.trim_start().starts_with("Summarize") {
        Ask::Summary
    } else {
        Ask::Answer
    }
}

/// Keys that mark a reply as a verdict or vote rather than an answer.
const VERDICT_KEYS: [&str; 6] = ["satisfied", "consensus_reached", "approve", "valid", "objection_valid", "concede"];

/// The answer a message states, unless it is a verdict or a vote.
fn stated_answer(content: &str) -> Option<String> {
    let json = crate::peer::parse_json_answer(content);
    if json.as_ref().is_some_and(|j| VERDICT_KEYS.iter().any(|k| j.get(k).is_some())) {
        return None;
    }
    crate::protocol::answers::extract(content, json.as_ref()).map(|e| e.answer.to_string())
}

/// The alternative answer an objection proposes, if any.
fn objection_answer(content: &str) -> Option<String> {
    let json = crate::peer::parse_json_answer(content)?;
    json.get("concede")?;
    json.get("answer").map(|a| a.as_str().map(str::to_owned).unwrap_or_else(|| a.to_string()))
}

fn plurality(answers: &[String]) -> Option<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for a in answers {
        match counts.iter_mut().find(|(k, _)| *k == a) {
            Some(c) => c.1 += 1,
            None => counts.push((a, 1)),
        }
    }
    counts.iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0))).map(|(k, _)| k.to_string())
}

#[async_trait]
impl ChatModel for Simulated {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let msgs: Vec<_> = req.messages().collect();
        let ask = ask_of(req);
        // The task names a tool it is offered: call it first; its result is the answer.
        let from_tool = if ask == Ask::Answer { tools::answer(req, &msgs) } else { None };
        if ask == Ask::Answer
            && from_tool.is_none()
            && let Some(calls) = tools::calls_for(req, &msgs)
        {
            let arguments: String = calls.iter().map(|c| c.arguments.as_str()).collect();
            return Ok(ChatResponse {
                model: self.name.clone(),
                prompt_tokens: req.estimated_prompt_tokens(),
                completion_tokens: u64::from(estimate_tokens(&arguments)),
                finish_reason: Some("tool_calls".into()),
                text: String::new(),
                tool_calls: calls,
            });
        }
        // The question: the instruction when it holds one (work items), else the first
        // message that is not a peer's (the task), else any message.
        let instruction = req.instruction.as_deref().unwrap_or("");
        let known = |t: &str| (self.oracle)(t).map(|a| (t.to_string(), a));
        let mut options = None;
        let mut known_answer = true;
        let (question, correct) = known(instruction)
            .or_else(|| msgs.iter().find(|m| m.name.is_none()).and_then(|m| known(&m.content)))
            .or_else(|| msgs.iter().find_map(|m| known(&m.content)))
            .unwrap_or_else(|| {
                // No known answer: a multiple choice (whose right answer is A), if it is one.
                let q = msgs
                    .iter()
                    .find(|m| m.name.is_none())
                    .map_or_else(|| instruction.to_string(), |m| m.content.to_string());
                options = multiple_choice::options_in(&q).or_else(|| multiple_choice::options_in(instruction));
                known_answer = false;
                (q, GENERIC_CORRECT.to_string())
            });
        if from_tool.is_none() && !known_answer && options.is_none() && ask.needs_own_answer() {
            // Outside its task families: say so rather than guess.
            let text = CANNOT_ANSWER.to_string();
            req.emit(&text);
            return Ok(ChatResponse {
                completion_tokens: u64::from(estimate_tokens(&text)),
                prompt_tokens: req.estimated_prompt_tokens(),
                model: self.name.clone(),
                finish_reason: Some("stop".into()),
                text,
                tool_calls: Vec::new(),
            });
        }
        let mut rng = self.rng(req, &question);

        // Others' latest stated answers in view, in the order they were said.
        let mut latest: Vec<(&str, String)> = Vec::new();
        let mut last_other: Option<String> = None;
        let mut objection: Option<String> = None;
        for m in &msgs {
            if let Some(name) = &m.name
                && *name != req.peer
            {
                if let Some(a) = stated_answer(&m.content) {
                    latest.retain(|(n, _)| *n != name.as_str());
                    latest.push((name.as_str(), a.clone()));
                    last_other = Some(a);
                }
                if let Some(a) = objection_answer(&m.content) {
                    objection = Some(a);
                }
            }
        }
        let others: Vec<String> = latest.iter().map(|(_, a)| a.clone()).collect();
        let swayed = !others.is_empty() && rng.random_bool(self.susceptibility.clamp(0.0, 1.0));
        let independent_correct = rng.random_bool(self.p_correct.clamp(0.0, 1.0));
        let own = if independent_correct { correct.clone() } else { plausible_wrong(&correct, options, &mut rng) };
        let answer = match &from_tool {
            Some(t) => t.answer.clone(),
            None if swayed && ask == Ask::Answer => plurality(&others).unwrap_or_else(|| own.clone()),
            None => own.clone(),
        };
        let confidence = if answer == correct { rng.random_range(0.6..0.95) } else { rng.random_range(0.3..0.8) };
        let confidence = (confidence * 100.0f64).round() / 100.0;
        let json = |v: serde_json::Value| v.to_string();
        if req.tools.iter().any(|t| t.name == "finish" || t.name == "broadcast") {
            return Ok(self.converse(req, &msgs, &others, &answer, from_tool.as_ref()));
        }
        let text = match ask {
            Ask::Answer if req.json => {
                json(serde_json::json!({ "answer": answer, "confidence": confidence }))
            }
            Ask::Answer if from_tool.is_some() => from_tool.as_ref().map(tools::FromTool::said).unwrap_or_default(),
            Ask::Answer if swayed => {
                format!("Having read the others' reasoning, I agree with them. Answer: {answer}")
            }
            Ask::Answer => format!("Working through the expression step by step. Answer: {answer}"),
            Ask::Summary => match plurality(&others) {
                Some(lead) => format!(
                    "Summary: the answers given so far are {}; the most common is {lead}.",
                    others.join(", ")
                ),
                None => "Summary: no answer has been given yet.".to_string(),
            },
            Ask::Critique => {
                let target = last_other.clone().unwrap_or_default();
                let satisfied = target == own;
                let critique = if satisfied {
                    format!("The proposal holds: I also get {own}.")
                } else {
                    format!("I get {own}, not {target}.")
                };
                json(
                    serde_json::json!({ "satisfied": satisfied, "critique": critique, "answer": own }),
                )
            }
            Ask::Judge => {
                let agreed = others.len() >= 2 && others.iter().all(|a| *a == others[0]);
                let conclusion = if agreed {
                    others[0].clone()
                } else {
                    plurality(&others).unwrap_or_else(|| own.clone())
                };
                json(serde_json::json!({
                    "consensus_reached": agreed,
                    "conclusion": conclusion,
                    "reason": if agreed { "the debaters agree" } else { "the debaters still disagree" },
                }))
            }
            Ask::JudgePick => {
                let conclusion = if others.contains(&own) {
                    own.clone()
                } else {
                    plurality(&others).unwrap_or_else(|| own.clone())
                };
                json(
                    serde_json::json!({ "conclusion": conclusion, "reason": "the best-supported answer" }),
                )
            }
            Ask::Approve => {
                let target = last_other.clone().unwrap_or_default();
                let approve = target == own;
                let reason = if approve {
                    format!("I also get {own}.")
                } else {
                    format!("I get {own}, not {target}.")
                };
                json(serde_json::json!({ "approve": approve, "reason": reason, "answer": own }))
            }
            Ask::Advocate => {
                let target = last_other.clone().unwrap_or_default();
                if own != target {
                    json(
                        serde_json::json!({ "objection": format!("The proposal is wrong: I get {own}."), "concede": false, "answer": own }),
                    )
                } else if rng.random_bool(self.p_correct.clamp(0.0, 1.0)) {
                    json(serde_json::json!({ "objection": "", "concede": true }))
                } else {
                    let alt = plausible_wrong(&correct, options, &mut rng);
                    json(
                        serde_json::json!({ "objection": format!("Could it not be {alt}?"), "concede": false, "answer": alt }),
                    )
                }
            }
            Ask::ObjectionVote { key } => {
                let proposal = last_other.clone().unwrap_or_default();
                let valid = match &objection {
                    Some(alt) => *alt == own,
                    None => own != proposal,
                };
                json(serde_json::json!({ key: valid, "reason": format!("I get {own}.") }))
            }
            Ask::Objective => {
                "Objective: find the exact value; work through it step by step and check each multiplication before answering."
                    .to_string()
            }
            Ask::Bid => {
                let c: f64 = rng.random_range(0.3..1.0);
                json(
                    serde_json::json!({ "capability": (c * 100.0).round() / 100.0, "reason": "my own estimate" }),
                )
            }
        };
        req.emit(&text);
        Ok(ChatResponse {
            completion_tokens: u64::from(estimate_tokens(&text)),
            prompt_tokens: req.estimated_prompt_tokens(),
            model: self.name.clone(),
            finish_reason: Some("stop".into()),
            text,
            tool_calls: Vec::new(),
        })
    }
}

impl Simulated {
    /// In a conversation (the peer-to-peer tools are offered): state an answer to
    /// everyone, finish once every other answer in view agrees with it, say it again
    /// only when it changed, and otherwise stay quiet. One action a turn.
    fn converse(
        &self,
        req: &ChatRequest,
        msgs: &[super::ChatMessage],
        others: &[String],
        answer: &str,
        from_tool: Option<&tools::FromTool>,
    ) -> ChatResponse {
        let quiet = ChatResponse { model: self.name.clone(), finish_reason: Some("stop".into()), ..Default::default() };
        // One action a turn: once it spoke or finished, the turn is over.
        let acted =
            req.tool_turns.iter().flat_map(|m| m.tool_calls.iter()).any(|c| tools::SPEAKING.contains(&c.name.as_str()));
        if acted {
            return quiet;
        }
        let mine = msgs
            .iter()
            .filter(|m| m.name.as_ref() == Some(&req.peer))
            .filter_map(|m| stated_answer(&m.content))
            .next_back();
        let offered = |n: &str| req.tools.iter().any(|t| t.name == n);
        let call = match mine {
            Some(prev)
                if prev == answer && !others.is_empty() && others.iter().all(|o| o == answer) && offered("finish") =>
            {
                ("finish", serde_json::json!({ "answer": answer }))
            }
            Some(prev) if prev == answer => return quiet,
            _ if offered("broadcast") => {
                let text = match from_tool {
                    Some(t) => t.said(),
                    None => format!("I get {answer}. Answer: {answer}"),
                };
                ("broadcast", serde_json::json!({ "text": text }))
            }
            _ => return quiet,
        };
        let arguments = call.1.to_string();
        ChatResponse {
            model: self.name.clone(),
            prompt_tokens: req.estimated_prompt_tokens(),
            completion_tokens: u64::from(estimate_tokens(&arguments)),
            finish_reason: Some("tool_calls".into()),
            text: String::new(),
            tool_calls: vec![crate::tool::ToolCall {
                id: format!("sim-{}-{}", req.peer, req.ordinal),
                name: call.0.to_string(),
                arguments,
            }],
        }
    }
}

/// The tools a task names (see "Tools" in the module docs).
mod tools {
    use super::super::{ChatMessage, ChatRequest, Role};
    use crate::tool::ToolCall;

    /// The built-ins a conversation speaks with: never called because a task names them.
    pub(super) const SPEAKING: [&str; 3] = ["send", "broadcast", "finish"];

    /// At most this many calls in one answer.
    const MAX_CALLS: usize = 4;

    /// An answer that came from a tool.
    pub(super) struct FromTool {
        pub(super) tool: String,
        pub(super) output: String,
        pub(super) answer: String,
    }

    impl FromTool {
        /// What the model says of it: one line ending with the answer.
        pub(super) fn said(&self) -> String {
            let output = one_line(&self.output, 300);
            format!("I ran `{}`: {output}. Answer: {}", self.tool, self.answer)
        }
    }

    fn one_line(text: &str, n: usize) -> String {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let flat = flat.trim_end_matches(['.', ' ']);
        if flat.chars().count() <= n {
            flat.to_string()
        } else {
            format!("{}…", flat.chars().take(n).collect::<String>())
        }
    }

    /// The task: the first message that is not a peer's (nor a tool's result).
    fn task(msgs: &[ChatMessage]) -> Option<&str> {
        msgs.iter().find(|m| m.name.is_none() && m.role == Role::User).map(|m| &*m.content)
    }

    /// Where `name` first stands in `text` as a whole word.
    fn mention(text: &str, name: &str) -> Option<usize> {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        let mut from = 0;
        while let Some(i) = text[from..].find(name) {
            let at = from + i;
            let before = text[..at].chars().next_back();
            let after = text[at + name.len()..].chars().next();
            if !before.is_some_and(word) && !after.is_some_and(word) {
                return Some(at);
            }
            from = at + name.len();
        }
        None
    }

    /// The arguments of a call of `def`, from what follows its name in the task.
    fn arguments(def: &crate::tool::ToolDef, rest: &str) -> String {
        // Past the backtick that closes the name itself, if it was quoted so, and a
        // joining word.
        let mut r = rest.strip_prefix('`').unwrap_or(rest).trim_start();
        for joint in ["with ", "on ", ":"] {
            if let Some(x) = r.strip_prefix(joint) {
                r = x.trim_start();
                break;
            }
        }
        if r.starts_with('{')
            && let Some(Ok(v @ serde_json::Value::Object(_))) =
                serde_json::Deserializer::from_str(r).into_iter::<serde_json::Value>().next()
        {
            return v.to_string();
        }
        let props = def.parameters.get("properties").and_then(|p| p.as_object());
        if let Some(props) = props
            && props.len() == 1
            && let Some(q) = r.chars().next().filter(|c| *c == '"' || *c == '`')
            && let Some(len) = r[1..].find(q)
        {
            let key = props.keys().next().expect("one property");
            return serde_json::json!({ key: &r[1..1 + len] }).to_string();
        }
        "{}".to_string()
    }

    /// The calls the first answer of a duty makes: one per offered tool the task names.
    pub(super) fn calls_for(req: &ChatRequest, msgs: &[ChatMessage]) -> Option<Vec<ToolCall>> {
        if !req.tool_turns.is_empty() {
            return None;
        }
        let task = task(msgs)?;
        let mut named: Vec<(usize, &crate::tool::ToolDef)> = req
            .tools
            .iter()
            .filter(|t| !SPEAKING.contains(&t.name.as_str()))
            .filter_map(|t| mention(task, &t.name).map(|at| (at, t)))
            .collect();
        named.sort_by_key(|(at, _)| *at);
        named.truncate(MAX_CALLS);
        if named.is_empty() {
            return None;
        }
        let calls = named
            .iter()
            .enumerate()
            .map(|(i, (at, def))| ToolCall {
                id: format!("sim-{}-{}-{i}", req.peer, req.ordinal),
                name: def.name.clone(),
                arguments: arguments(def, &task[at + def.name.len()..]),
            })
            .collect();
        Some(calls)
    }

    /// The answer in a tool's output.
    fn answer_in(output: &str) -> Option<String> {
        let lower = output.to_ascii_lowercase();
        if let Some(pos) = lower.rfind("answer:") {
            let rest = output[pos + 7..].lines().next().unwrap_or("").trim().trim_end_matches('.').trim();
            if !rest.is_empty() {
                return Some(rest.to_string());
            }
        }
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(output.trim())
            && let Some(a) = o.get("answer")
        {
            return Some(a.as_str().map(str::to_owned).unwrap_or_else(|| a.to_string()));
        }
        let last = output.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
        Some(one_line(last, 200))
    }

    /// The answer from the results of this duty's calls, or one of this peer's earlier
    /// messages that reported one.
    pub(super) fn answer(req: &ChatRequest, msgs: &[ChatMessage]) -> Option<FromTool> {
        let called: Vec<&ToolCall> = req.tool_turns.iter().flat_map(|m| m.tool_calls.iter()).collect();
        let fresh = req.tool_turns.iter().rev().filter(|m| m.role == Role::Tool && !m.tool_error).find_map(|m| {
            let call = called.iter().find(|c| Some(c.id.as_str()) == m.tool_call_id.as_deref())?;
            if SPEAKING.contains(&call.name.as_str()) {
                return None;
            }
            let answer = answer_in(&m.content)?;
            Some(FromTool { tool: call.name.clone(), output: m.content.to_string(), answer })
        });
        if fresh.is_some() {
            return fresh;
        }
        // "I ran `NAME`: output. Answer: X", said earlier by this peer.
        msgs.iter().rev().filter(|m| m.name.as_ref() == Some(&req.peer)).find_map(|m| {
            let rest = m.content.strip_prefix("I ran `")?;
            let (tool, rest) = rest.split_once("`: ")?;
            let (output, answer) = rest.rsplit_once(". Answer: ")?;
            Some(FromTool { tool: tool.to_string(), output: output.to_string(), answer: answer.trim().to_string() })
        })
    }
}

/// The answer the simulated model treats as right for a question it cannot solve.
pub const GENERIC_CORRECT: &str = "A";

fn plausible_wrong(correct: &str, options: Option<u8>, rng: &mut ChaCha8Rng) -> String {
    match correct.parse::<i64>() {
        Ok(v) => {
            let mut d: i64 = rng.random_range(1..=10);
            if rng.random_bool(0.5) {
                d = -d;
            }
            (v + d).to_string()
        }
        Err(_) => {
            let n = options.unwrap_or(4).max(2);
            char::from(b'A' + rng.random_range(1..n)).to_string()
        }
    }
}

/// Multiple-choice questions: options labelled `A)`, `(A)`, `A.` or `A:`.
pub mod multiple_choice {
    /// How many options (`A`, `B`, … in a row, at least two) `text` labels, if any.
    pub fn options_in(text: &str) -> Option<u8> {
        let b = text.as_bytes();
        let mut seen = [false; 26];
        for i in 0..b.len() {
            let c = b[i];
            if !c.is_ascii_uppercase() {
                continue;
            }
            let before = if i == 0 { None } else { Some(b[i - 1]) };
            let after = b.get(i + 1).copied();
            let opens = before.is_none_or(|p| p.is_ascii_whitespace() || p == b'(');
            let labelled = match after {
                Some(b')') | Some(b':') => true,
                // "A." only when something follows after a space ("A. Rust"), not "U.S."
                Some(b'.') => b.get(i + 2).is_some_and(|n| *n == b' '),
                _ => false,
            };
            if opens && labelled {
                seen[usize::from(c - b'A')] = true;
            }
        }
        let n = seen.iter().take_while(|s| **s).count();
        (n >= 2).then_some(n as u8)
    }
}

/// Arithmetic tasks in the style of Du et al. (2023): `a+b*c+d-e*f`.
pub mod arithmetic {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The `i`th question of a seeded set, and its answer.
    pub fn question(seed: u64, i: u64) -> (String, i64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n: Vec<i64> = (0..6).map(|_| rng.random_range(0..30)).collect();
        let expr = format!("{}+{}*{}+{}-{}*{}", n[0], n[1], n[2], n[3], n[4], n[5]);
        let ans = n[0] + n[1] * n[2] + n[3] - n[4] * n[5];
        (format!("What is the result of {expr}? End your reply with 'Answer: <number>'."), ans)
    }

    /// Evaluate the first arithmetic expression (integers, + - *, at least one
    /// operator) found in `text`. An expression with parentheses, division, powers or
    /// decimals is outside the family and is never evaluated in part.
    pub fn answer_in(text: &str) -> Option<i64> {
        expressions(text).find(|c| !c.contains(UNSUPPORTED)).and_then(eval)
    }

    /// Whether `text` holds an arithmetic expression outside the family `answer_in`
    /// evaluates (parentheses, division, powers, decimals).
    pub fn unsupported_in(text: &str) -> bool {
        expressions(text).any(|c| c.contains(UNSUPPORTED))
    }

    const UNSUPPORTED: [char; 7] = ['(', ')', '/', '^', '.', '×', '÷'];

    /// Runs of digits, operators and brackets with at least one digit and one operator.
    fn expressions(text: &str) -> impl Iterator<Item = &str> {
        let is_expr = |c: char| c.is_ascii_digit() || "+-* ()/^.×÷".contains(c);
        let mut rest = text;
        std::iter::from_fn(move || {
            loop {
                let start = rest.find(|c: char| c.is_ascii_digit() || c == '(')?;
                let run = &rest[start..];
                let end = run.find(|c: char| !is_expr(c)).unwrap_or(run.len());
                let cand = run[..end].trim_end_matches([' ', '+', '-', '*', '.', '/', '^']);
                rest = &run[end.max(1)..];
                let cand = cand.trim_start_matches(' ');
                if cand.contains(|c: char| c.is_ascii_digit())
                    && cand.trim_start_matches('(').contains(['+', '-', '*', '/', '^', '×', '÷'])
                {
                    return Some(cand);
                }
            }
        })
    }

    /// Evaluate `n (op n)*` with the usual precedence of `*` over `+` and `-`.
    pub fn eval(expr: &str) -> Option<i64> {
        let toks: Vec<&str> = tokenize(expr)?;
        let mut sum: i64 = 0;
        let mut term: i64 = toks.first()?.parse().ok()?;
        let mut sign = 1;
        let mut k = 1;
        while k + 1 < toks.len() + 1 && k < toks.len() {
            let op = toks[k];
            let v: i64 = toks.get(k + 1)?.parse().ok()?;
            match op {
                "*" => term = term.checked_mul(v)?,
                "+" | "-" => {
                    sum = sum.checked_add(sign * term)?;
                    sign = if op == "+" { 1 } else { -1 };
                    term = v;
                }
                _ => return None,
            }
            k += 2;
        }
        sum.checked_add(sign * term)
    }

    fn tokenize(expr: &str) -> Option<Vec<&str>> {
        let mut out = Vec::new();
        let b = expr.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b' ' => i += 1,
                b'+' | b'-' | b'*' => {
                    out.push(&expr[i..i + 1]);
                    i += 1;
                }
                c if c.is_ascii_digit() => {
                    let s = i;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    out.push(&expr[s..i]);
                }
                _ => return None,
            }
        }
        (out.len() % 2 == 1).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_choice_options_are_read_from_their_labels() {
        assert_eq!(multiple_choice::options_in("Pick one: A) red B) green C) blue"), Some(3));
        assert_eq!(multiple_choice::options_in("(A) yes (B) no"), Some(2));
        assert_eq!(multiple_choice::options_in("Options:\nA. Rust\nB. Go\nC. Zig\nD. C"), Some(4));
        assert_eq!(multiple_choice::options_in("A: one\nB: two"), Some(2));
        assert_eq!(multiple_choice::options_in("What is the capital of Australia?"), None);
        assert_eq!(multiple_choice::options_in("Plan A) only"), None, "one option is no choice");
        assert_eq!(multiple_choice::options_in("B) and C) without A)"), Some(3));
        assert_eq!(multiple_choice::options_in("the U.S. and A. B."), None);
        assert_eq!(multiple_choice::options_in("PLAN:A) B)"), None, "labels start a word");
    }

    #[tokio::test]
    async fn arithmetic_it_cannot_evaluate_gets_cannot_answer_not_a_guess() {
        assert_eq!(arithmetic::answer_in("Compute (3+4)*5"), None, "never in part");
        assert_eq!(arithmetic::answer_in("What is 3+4*5?"), Some(23));
        assert!(arithmetic::unsupported_in("Compute (3+4)*5") && arithmetic::unsupported_in("What is 10/4+1?"));
        assert!(!arithmetic::unsupported_in("What is 3+4*5? Answer: 23."));
        let m = Simulated::new("s", 1.0, 0.0, 1);
        let r = m.chat(&ChatRequest::simple("p", "Compute (3+4)*5")).await.unwrap();
        assert_eq!(r.text, CANNOT_ANSWER);
        assert_eq!(extract_answer(&r.text), None);
        let r = m.chat(&ChatRequest::simple("p", "What is 3+4*5?")).await.unwrap();
        assert!(r.text.ends_with("Answer: 23"), "{}", r.text);
    }

    #[test]
    fn arithmetic_evaluates_with_precedence() {
        assert_eq!(arithmetic::eval("3+4*5+6-7*8"), Some(3 + 20 + 6 - 56));
        assert_eq!(arithmetic::eval("2*3*4"), Some(24));
        assert_eq!(arithmetic::eval("10-2-3"), Some(5));
        assert_eq!(arithmetic::answer_in("What is the result of 1+2*3? End"), Some(7));
        let (q, a) = arithmetic::question(7, 3);
        assert_eq!(arithmetic::answer_in(&q), Some(a));
        assert_eq!(arithmetic::question(7, 3), arithmetic::question(7, 3));
        assert_ne!(arithmetic::question(7, 3).0, arithmetic::question(7, 4).0);
    }

    #[test]
    fn extracts_answers() {
        assert_eq!(extract_answer("so... Answer: -42."), Some("-42".into()));
        assert_eq!(extract_answer("{\"answer\": \"17\", \"confidence\": 0.9}"), Some("17".into()));
        assert_eq!(extract_answer("I think 12 then 13"), Some("13".into()));
        assert_eq!(extract_answer("nothing"), None);
    }

    #[tokio::test]
    async fn accuracy_tracks_p_and_draws_are_deterministic() {
        let m = Simulated::new("sim", 0.7, 0.0, 42);
        let mut correct = 0;
        for i in 0..2000 {
            let (q, a) = arithmetic::question(1, i);
            let r = m.chat(&ChatRequest::simple("p", &q)).await.unwrap();
            let again = m.chat(&ChatRequest::simple("p", &q)).await.unwrap();
            assert_eq!(r.text, again.text, "same call, same answer");
            if extract_answer(&r.text) == Some(a.to_string()) {
                correct += 1;
            }
        }
        // 2000 Bernoulli(0.7): sd ≈ 20.5; 5 sd either side.
        assert!((1297..=1503).contains(&correct), "correct = {correct}");
    }

    fn ask(peer: &str, step: &str, q: &str, shown: &[(&str, &str)], instruction: &str, json: bool) -> ChatRequest {
        let mut t = crate::model::Transcript::default();
        for (who, text) in shown {
            t.push(crate::model::ChatMessage::new(crate::model::Role::User, Some((*who).into()), Arc::from(*text)));
        }
        let n = t.len();
        let mut r = ChatRequest::simple(peer, instruction);
        r.step = Arc::from(step);
        r.prelude = vec![crate::model::ChatMessage::new(crate::model::Role::User, None, Arc::from(q))];
        r.history = Arc::new(t);
        r.window = 0..n;
        r.json = json;
        r
    }

    #[tokio::test]
    async fn answers_every_protocol_role_from_the_keys_it_is_asked_for() {
        let (q, a) = arithmetic::question(2, 5);
        let right = format!("Answer: {a}");
        let wrong = format!("Answer: {}", a + 3);
        let sure = Simulated::new("sim", 1.0, 0.0, 1);
        let json = |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap();
        let reply = |req: ChatRequest| {
            let m = sure.clone();
            async move { m.chat(&req).await.unwrap().text }
        };
        let critic = "Reply with a JSON object {\"satisfied\": true|false, \"critique\": \"...\"}";
        assert_eq!(json(reply(ask("c", "s", &q, &[("p", &right)], critic, true)).await)["satisfied"], true);
        assert_eq!(json(reply(ask("c", "s", &q, &[("p", &wrong)], critic, true)).await)["satisfied"], false);
        let judge = "{\"consensus_reached\": true|false, \"conclusion\": \"...\"}";
        let v = json(reply(ask("j", "s", &q, &[("x", &right), ("y", &right)], judge, true)).await);
        assert_eq!(
            (v["consensus_reached"].as_bool(), v["conclusion"].as_str()),
            (Some(true), Some(a.to_string().as_str()))
        );
        let v = json(reply(ask("j", "s", &q, &[("x", &right), ("y", &wrong)], judge, true)).await);
        assert_eq!(v["consensus_reached"], false);
        let pick = "Pick the best answer: {\"conclusion\": \"...\", \"reason\": \"...\"}";
        assert_eq!(
            json(reply(ask("j", "s", &q, &[("x", &wrong), ("y", &right)], pick, true)).await)["conclusion"],
            a.to_string()
        );
        let vote = "{\"approve\": true|false, \"reason\": \"...\"}";
        assert_eq!(json(reply(ask("v", "s", &q, &[("p", &wrong)], vote, true)).await)["approve"], false);
        let objection = format!("{{\"objection\": \"I get {a}\", \"concede\": false, \"answer\": \"{a}\"}}");
        let valid = "{\"valid\": true|false}";
        assert_eq!(
            json(reply(ask("v", "s", &q, &[("p", &wrong), ("d", &objection)], valid, true)).await)["valid"],
            true
        );
        let bid = json(reply(ask("b", "s", &q, &[], "{\"capability\": <0 to 1>}", true)).await);
        assert!((0.3..1.0).contains(&bid["capability"].as_f64().unwrap()));
        let objective =
            reply(ask("l", "s", &q, &[], "You lead this team. State the objective for the others.", false)).await;
        assert!(objective.starts_with("Objective:") && !objective.contains("Answer:"), "{objective}");
        // Verdicts are not mistaken for answers: a critique does not sway a peer.
        let swayable = Simulated::new("sim", 0.0, 1.0, 1);
        let critique = "{\"satisfied\": false, \"critique\": \"no\", \"answer\": \"12345\"}";
        let r = swayable.chat(&ask("p", "s", &q, &[("c", critique)], "Revise.", false)).await.unwrap().text;
        assert!(!r.ends_with("12345"), "{r}");
        // Deterministic per (seed, peer, step, question).
        let m = Simulated::new("sim", 0.5, 0.5, 9);
        let req = ask("p", "r1/answer", &q, &[("x", &wrong)], "Update.", false);
        assert_eq!(m.chat(&req).await.unwrap().text, m.chat(&req).await.unwrap().text);
        // A multiple choice: its right answer is A, the wrong ones are the other labels.
        let mc = "Which plan?\nA) the monolith\nB) services\nC) both";
        let r = sure.chat(&ask("p", "s", mc, &[], "Answer.", false)).await.unwrap().text;
        assert!(r.ends_with("Answer: A"), "{r}");
        let unsure = Simulated::new("sim", 0.0, 0.0, 1);
        for step in 0..50 {
            let r = unsure.chat(&ask("p", &step.to_string(), mc, &[], "Answer.", false)).await.unwrap().text;
            assert!(r.ends_with("Answer: B") || r.ends_with("Answer: C"), "only the options given: {r}");
        }
        // Anything else: "cannot answer", never a guess, wherever its own answer is asked.
        for q in ["What is the capital of Australia?", "Which plan?", "Compute (3+4)*5"] {
            for instruction in ["Answer.", vote, critic] {
                let r = sure.chat(&ask("p", "s", q, &[("x", "Answer: A")], instruction, true)).await.unwrap().text;
                assert_eq!(r, CANNOT_ANSWER, "{q} / {instruction}");
            }
        }
        // Roles that take no answer of its own are still played.
        let summary = ask("s", "s", "Which plan?", &[("x", "Answer: A")], "Summarize the discussion.", false);
        assert!(sure.chat(&summary).await.unwrap().text.starts_with("Summary:"));
    }

    fn tool(name: &str, props: serde_json::Value) -> crate::tool::ToolDef {
        crate::tool::ToolDef {
            name: name.into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object", "properties": props}),
        }
    }

    /// A request whose task is `task`, offered `tools`.
    fn offered(task: &str, tools: Vec<crate::tool::ToolDef>) -> ChatRequest {
        let mut r = ask("tester", "conv/tester/1", task, &[], "Act on your messages.", false);
        r.tools = Arc::from(tools);
        r
    }

    #[tokio::test]
    async fn calls_the_tools_a_task_names_and_answers_with_their_result() {
        let m = Simulated::new("sim", 0.0, 0.0, 3);
        let checks = tool("run_checks", serde_json::json!({"spec": {"type": "string"}}));
        let lookup = tool("lookup", serde_json::json!({"key": {"type": "string"}, "depth": {"type": "integer"}}));
        let task = "Before release, run `run_checks` \"POST /users 201 409\", then lookup {\"key\": \"users\", \"depth\": 2} and report.";
        let req = offered(task, vec![lookup.clone(), checks.clone()]);
        let r = m.chat(&req).await.unwrap();
        let calls: Vec<(&str, serde_json::Value)> =
            r.tool_calls.iter().map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).unwrap())).collect();
        assert_eq!(
            calls,
            [
                ("run_checks", serde_json::json!({"spec": "POST /users 201 409"})),
                ("lookup", serde_json::json!({"key": "users", "depth": 2})),
            ],
            "in the order the task names them"
        );
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        let again = m.chat(&req).await.unwrap();
        assert_eq!(again.tool_calls, r.tool_calls, "the same request makes the same calls, ids included");

        // The results come back: the last successful one is the answer.
        let mut after = req.clone();
        let call = r.tool_calls[0].clone();
        after.tool_turns = vec![
            crate::model::ChatMessage::tool_calls(Some("tester".into()), Arc::from(""), r.tool_calls.clone()),
            crate::model::ChatMessage::tool_result(
                Arc::from(call.id.as_str()),
                Arc::from("ok   method POST\n3 passed, 0 failed\n"),
            ),
            crate::model::ChatMessage::tool_failure(
                Arc::from(r.tool_calls[1].id.as_str()),
                Arc::from("[error] no such key"),
            ),
        ];
        let r = m.chat(&after).await.unwrap();
        assert!(r.tool_calls.is_empty(), "no second round of calls");
        assert_eq!(r.text, "I ran `run_checks`: ok method POST 3 passed, 0 failed. Answer: 3 passed, 0 failed");
        let extracted = crate::protocol::answers::extract(&r.text, None).unwrap();
        assert_eq!(&*extracted.answer, "3 passed, 0 failed", "the protocols read the tool's answer");
        // An output that states its answer.
        after.tool_turns[1] =
            crate::model::ChatMessage::tool_result(Arc::from(call.id.as_str()), Arc::from("computed\nAnswer: 42\n"));
        assert!(m.chat(&after).await.unwrap().text.ends_with(". Answer: 42"));
        // Every call failed: it answers as it would without tools (here it cannot).
        after.tool_turns[1] = crate::model::ChatMessage::tool_failure(Arc::from(call.id.as_str()), Arc::from("boom"));
        assert_eq!(m.chat(&after).await.unwrap().text, CANNOT_ANSWER);

        // Not named, named inside another word, or only a built-in named: no call.
        for task in ["Check the signup endpoint.", "Use rerun_checks_all.", "Please send it and finish."] {
            let send = tool("send", serde_json::json!({"to": {"type": "string"}, "text": {"type": "string"}}));
            let r = m.chat(&offered(task, vec![checks.clone(), send])).await.unwrap();
            assert!(r.tool_calls.is_empty(), "{task}: {:?}", r.tool_calls);
        }
        // A vote is not its own answer: no call even when a tool is named.
        let mut vote = offered(task, vec![checks.clone()]);
        vote.instruction = Some(Arc::from("Reply with {\"approve\": true|false, \"reason\": \"...\"}"));
        assert!(m.chat(&vote).await.unwrap().tool_calls.is_empty());
        // Its own earlier report stands: it does not call again.
        let mut later = ask(
            "tester",
            "conv/tester/2",
            task,
            &[("tester", "I ran `run_checks`: 3 passed, 0 failed. Answer: 3 passed, 0 failed")],
            "Act.",
            false,
        );
        later.tools = Arc::from(vec![checks]);
        let r = m.chat(&later).await.unwrap();
        assert!(r.tool_calls.is_empty());
        assert!(r.text.ends_with("Answer: 3 passed, 0 failed"), "{}", r.text);
    }
}
