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

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind, Role, estimate_tokens};

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
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
        if let Some(a) = v.get("answer") {
            return Some(a.as_str().map(str::to_owned).unwrap_or_else(|| a.to_string()));
        }
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

#[async_trait]
impl ChatModel for Simulated {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let msgs: Vec<_> = req.messages().collect();
        // The question: the first message that is not a peer's (the task).
        let question = msgs
            .iter()
            .find(|m| m.name.is_none() || m.role == Role::User && self.oracle_knows(&m.content))
            .map(|m| m.content.to_string())
            .or_else(|| req.instruction.as_deref().map(str::to_owned))
            .unwrap_or_default();
        let Some(correct) = (self.oracle)(&question)
            .or_else(|| msgs.iter().find_map(|m| (self.oracle)(&m.content)))
        else {
            return Err(ModelError::new(
                ModelErrorKind::BadRequest,
                "simulated model: no question with a known answer in the context",
            ));
        };
        let mut rng = self.rng(req, &question);

        // Others' latest answers in view.
        let mut latest: HashMap<&str, String> = HashMap::new();
        for m in &msgs {
            if let Some(name) = &m.name {
                if *name != req.peer {
                    if let Some(a) = extract_answer(&m.content) {
                        latest.insert(name.as_str(), a);
                    }
                }
            }
        }
        let swayed = !latest.is_empty() && rng.random_bool(self.susceptibility.clamp(0.0, 1.0));
        let independent_correct = rng.random_bool(self.p_correct.clamp(0.0, 1.0));
        let answer = if swayed {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for a in latest.values() {
                *counts.entry(a.as_str()).or_default() += 1;
            }
            let mut best: Vec<(&str, usize)> = counts.into_iter().collect();
            best.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            best[0].0.to_string()
        } else if independent_correct {
            correct.clone()
        } else {
            plausible_wrong(&correct, &mut rng)
        };
        let confidence = if answer == correct { rng.random_range(0.6..0.95) } else { rng.random_range(0.3..0.8) };
        let text = if req.json {
            serde_json::json!({ "answer": answer, "confidence": (confidence * 100.0f64).round() / 100.0 }).to_string()
        } else if swayed {
            format!("Having read the others' reasoning, I agree with them. Answer: {answer}")
        } else {
            format!("Working through the expression step by step. Answer: {answer}")
        };
        req.emit(&text);
        Ok(ChatResponse {
            completion_tokens: u64::from(estimate_tokens(&text)),
            prompt_tokens: req.estimated_prompt_tokens(),
            model: self.name.clone(),
            finish_reason: Some("stop".into()),
            text,
        })
    }
}

impl Simulated {
    fn oracle_knows(&self, text: &str) -> bool {
        (self.oracle)(text).is_some()
    }
}

fn plausible_wrong(correct: &str, rng: &mut ChaCha8Rng) -> String {
    match correct.parse::<i64>() {
        Ok(v) => {
            let mut d: i64 = rng.random_range(1..=10);
            if rng.random_bool(0.5) {
                d = -d;
            }
            (v + d).to_string()
        }
        Err(_) => format!("not {correct}"),
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
    /// operator) found in `text`.
    pub fn answer_in(text: &str) -> Option<i64> {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() {
                let start = i;
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_digit() || b"+-* ".contains(&b[j])) {
                    j += 1;
                }
                let cand = text[start..j].trim_end_matches([' ', '+', '-', '*']);
                if cand.contains(['+', '-', '*']) {
                    if let Some(v) = eval(cand) {
                        return Some(v);
                    }
                }
                i = j.max(i + 1);
            } else {
                i += 1;
            }
        }
        None
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
}
