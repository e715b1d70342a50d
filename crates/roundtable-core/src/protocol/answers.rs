//! Answers and votes: how protocols read an answer out of a reply and count ballots.
//!
//! # Reading an answer
//! In order: a JSON body's `answer` field (string or number); the text of the last
//! line that starts with `Answer:` (any case; the rest of that line); a JSON object in
//! the text. [`extract`] returns `None` when none of these is present (a malformed
//! vote); [`answer_or_text`] falls back to the whole text, for free-form protocols.
//! A stated confidence is read from a JSON `confidence` field or a `Confidence: 0.8`
//! line; percentages (`85`, `85%`) are scaled to 0–1.
//!
//! Answers are compared by their [`normalize`]d key: case, surrounding punctuation and
//! whitespace do not matter, and numbers compare by value (`42`, `42.0`, `+42`).
//!
//! # Counting
//! [`tally`] counts ballots under a [`Rule`]. The leader is the answer with the most
//! weight; a tie goes to the answer whose first supporter comes first in team order —
//! never to whichever answer landed first, so the outcome does not depend on timing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::envelope::{EnvelopeId, PeerId};

/// An answer read out of a reply, with its stated confidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Extracted {
    /// The answer as written.
    pub answer: Arc<str>,
    pub confidence: Option<f64>,
}

/// The answer in a reply, if it states one (see the module docs).
pub fn extract(text: &str, json: Option<&serde_json::Value>) -> Option<Extracted> {
    let from_json = |j: &serde_json::Value| -> Option<Extracted> {
        let a = j.get("answer")?;
        let answer = match a {
            serde_json::Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return None,
        };
        let confidence = j.get("confidence").and_then(serde_json::Value::as_f64).map(scale_confidence);
        Some(Extracted { answer: Arc::from(answer), confidence })
    };
    if let Some(e) = json.and_then(from_json) {
        return Some(e);
    }
    let mut answer = None;
    let mut confidence = None;
    for line in text.lines() {
        let t = line.trim().trim_start_matches(['*', '#', '-', ' ']);
        if let Some(rest) = strip_prefix_ci(t, "answer:") {
            let a = clean(rest);
            if !a.is_empty() {
                answer = Some(a.to_string());
            }
        } else if let Some(rest) = strip_prefix_ci(t, "confidence:") {
            confidence = parse_confidence(rest);
        }
        // "... so the result is 42. Answer: 42" on one line.
        if let Some(pos) = t.to_ascii_lowercase().rfind("answer:")
            && pos > 0
        {
            let a = clean(&t[pos + 7..]);
            if !a.is_empty() {
                answer = Some(a.to_string());
            }
        }
    }
    if let Some(a) = answer {
        return Some(Extracted { answer: Arc::from(a), confidence });
    }
    crate::peer::parse_json_answer(text).as_ref().and_then(from_json)
}

/// The stated answer, or the whole text when none is stated.
pub fn answer_or_text(text: &str, json: Option<&serde_json::Value>) -> Extracted {
    extract(text, json).unwrap_or_else(|| whole_text(text))
}

/// The whole text as the answer (what [`answer_or_text`] falls back to).
pub fn whole_text(text: &str) -> Extracted {
    Extracted { answer: Arc::from(text.trim()), confidence: None }
}

/// An answer without surrounding emphasis and trailing punctuation.
fn clean(s: &str) -> &str {
    let mut t = s.trim();
    loop {
        let next = t.trim_end_matches(['.', ';']).trim_matches('*').trim();
        if next.len() == t.len() {
            return t;
        }
        t = next;
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.is_char_boundary(prefix.len()) && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

fn parse_confidence(s: &str) -> Option<f64> {
    let t = s.trim().trim_end_matches(['.', '%']).trim();
    t.parse::<f64>().ok().map(scale_confidence)
}

fn scale_confidence(c: f64) -> f64 {
    if c > 1.0 { (c / 100.0).clamp(0.0, 1.0) } else { c.clamp(0.0, 1.0) }
}

/// The key answers are compared by (see the module docs).
pub fn normalize(answer: &str) -> String {
    let t = answer.trim().trim_matches(|c: char| c == '"' || c == '\'' || c == '`' || c == '*').trim();
    let t = t.trim_end_matches(['.', '!', ';', ',']).trim();
    let compact: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
    let numeric = compact.trim_start_matches('+').replace(',', "");
    if let Ok(v) = numeric.parse::<i64>() {
        return v.to_string();
    }
    if let Ok(v) = numeric.parse::<f64>()
        && v.is_finite()
    {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            return (v as i64).to_string();
        }
        return v.to_string();
    }
    compact.to_lowercase()
}

/// One counted answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Ballot {
    pub peer: PeerId,
    /// The peer's place in the team (tie-break).
    pub order: usize,
    pub answer: Arc<str>,
    pub confidence: Option<f64>,
    /// The envelope the answer came from.
    pub id: EnvelopeId,
    /// The full text the answer came from (the final answer carries it).
    pub text: Arc<str>,
}

/// How ballots are aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Rule {
    /// The answer with the most votes wins.
    Plurality,
    /// The leader wins only with more than half of the ballots.
    Majority,
    /// The leader wins only with at least `threshold` of the ballots (0–1).
    Approval { threshold: f64 },
    /// Votes weighted by recalibrated confidence (ReConcile): see [`reconcile_weight`].
    Confidence,
}

impl Rule {
    pub fn name(&self) -> String {
        match self {
            Rule::Plurality => "plurality".into(),
            Rule::Majority => "majority".into(),
            Rule::Approval { threshold } => format!("approval ≥ {:.0}%", threshold * 100.0),
            Rule::Confidence => "confidence-weighted".into(),
        }
    }
}

/// ReConcile's recalibration of a stated confidence into a vote weight: 1.0 for
/// certainty, 0.8 from 0.9, 0.5 from 0.8, 0.3 above 0.6, 0.1 otherwise (and when no
/// confidence is stated).
pub fn reconcile_weight(confidence: Option<f64>) -> f64 {
    match confidence {
        Some(c) if c >= 1.0 => 1.0,
        Some(c) if c >= 0.9 => 0.8,
        Some(c) if c >= 0.8 => 0.5,
        Some(c) if c > 0.6 => 0.3,
        _ => 0.1,
    }
}

/// The support of one answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Support {
    pub key: String,
    pub answer: String,
    pub weight: f64,
    pub supporters: Vec<PeerId>,
    /// Team order of the first supporter (the tie-break).
    #[serde(skip)]
    pub first: usize,
    #[serde(skip)]
    pub first_id: Option<EnvelopeId>,
    #[serde(skip)]
    pub first_text: Option<Arc<str>>,
}

/// The result of counting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    /// Answers by support, leader first.
    pub ranking: Vec<Support>,
    /// Whether the rule's condition is met (always, for plurality with any ballot).
    pub decided: bool,
    /// The leader's share of the total weight.
    pub share: f64,
    /// Whether the leader tied with the runner-up and won on team order.
    pub tie_broken: bool,
}

impl Outcome {
    pub fn leader(&self) -> Option<&Support> {
        self.ranking.first()
    }
    pub fn winner(&self) -> Option<&Support> {
        self.decided.then(|| self.ranking.first()).flatten()
    }
    /// Every ballot's envelope supporting the leader.
    pub fn describe(&self) -> String {
        self.ranking
            .iter()
            .map(|s| {
                format!(
                    "{} ({}: {})",
                    s.answer,
                    fmt_weight(s.weight),
                    s.supporters.iter().map(PeerId::as_str).collect::<Vec<_>>().join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn fmt_weight(w: f64) -> String {
    if w.fract() == 0.0 { format!("{w:.0}") } else { format!("{w:.2}") }
}

/// Count ballots under a rule (see the module docs for ties).
pub fn tally(ballots: &[Ballot], rule: Rule) -> Outcome {
    let keys: Vec<String> = ballots.iter().map(|b| normalize(&b.answer)).collect();
    tally_keyed(ballots, &keys, rule)
}

/// [`tally`] for callers that keep each ballot's [`normalize`]d key: `keys[i]` is the
/// key of `ballots[i]`.
pub fn tally_keyed(ballots: &[Ballot], keys: &[impl AsRef<str>], rule: Rule) -> Outcome {
    assert_eq!(ballots.len(), keys.len(), "one key per ballot");
    let mut ranking: Vec<Support> = Vec::new();
    let mut sorted: Vec<(&Ballot, &str)> = ballots.iter().zip(keys.iter().map(AsRef::as_ref)).collect();
    sorted.sort_by_key(|(b, _)| b.order);
    for (b, key) in sorted {
        let w = match rule {
            Rule::Confidence => reconcile_weight(b.confidence),
            _ => 1.0,
        };
        match ranking.iter_mut().find(|s| s.key == key) {
            Some(s) => {
                s.weight += w;
                s.supporters.push(b.peer.clone());
            }
            None => ranking.push(Support {
                key: key.to_string(),
                answer: b.answer.to_string(),
                weight: w,
                supporters: vec![b.peer.clone()],
                first: b.order,
                first_id: Some(b.id.clone()),
                first_text: Some(b.text.clone()),
            }),
        }
    }
    ranking.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.first.cmp(&b.first)));
    let total: f64 = ranking.iter().map(|s| s.weight).sum();
    let share = ranking.first().map_or(0.0, |s| if total > 0.0 { s.weight / total } else { 0.0 });
    let tie_broken = ranking.len() > 1 && (ranking[0].weight - ranking[1].weight).abs() < 1e-9;
    let decided = match rule {
        _ if ranking.is_empty() => false,
        Rule::Plurality | Rule::Confidence => true,
        Rule::Majority => share > 0.5 + 1e-12,
        Rule::Approval { threshold } => share + 1e-12 >= threshold,
    };
    Outcome { ranking, decided, share, tie_broken }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(peer: &str, order: usize, answer: &str, conf: Option<f64>) -> Ballot {
        Ballot {
            peer: peer.into(),
            order,
            answer: answer.into(),
            confidence: conf,
            id: EnvelopeId::from(format!("id-{peer}")),
            text: answer.into(),
        }
    }

    #[test]
    fn reads_answers_from_json_marker_and_embedded_json() {
        let j = serde_json::json!({"answer": 17, "confidence": 85});
        assert_eq!(extract("", Some(&j)).unwrap(), Extracted { answer: "17".into(), confidence: Some(0.85) });
        let e = extract("Let me think.\nAnswer: **-42**.\nConfidence: 90%", None).unwrap();
        assert_eq!((&*e.answer, e.confidence), ("-42", Some(0.9)));
        assert_eq!(&*extract("so 3+4 = 7. Answer: 7", None).unwrap().answer, "7");
        assert_eq!(&*extract("```json\n{\"answer\": \"B\"}\n```", None).unwrap().answer, "B");
        assert_eq!(extract("I think it is 12", None), None, "no stated answer is malformed");
        assert_eq!(&*answer_or_text("  free text ", None).answer, "free text");
    }

    #[test]
    fn normalizes_case_punctuation_and_numbers() {
        assert_eq!(normalize(" 42.0 "), "42");
        assert_eq!(normalize("+42"), "42");
        assert_eq!(normalize("1,000"), "1000");
        assert_eq!(normalize("\"Use  Postgres.\""), "use postgres");
        assert_ne!(normalize("41"), normalize("42"));
    }

    #[test]
    fn plurality_tie_goes_to_team_order_not_arrival() {
        // c (order 2) voted first for "x"; a (order 0) voted "y": a tie, "y" wins.
        let ballots = vec![
            b("c", 2, "x", None),
            b("a", 0, "y", None),
            b("b", 1, "z", None),
            b("d", 3, "x", None),
            b("e", 4, "y", None),
        ];
        let o = tally(&ballots, Rule::Plurality);
        assert_eq!(o.winner().unwrap().answer, "y");
        assert!(o.tie_broken);
        let mut rev = ballots.clone();
        rev.reverse();
        assert_eq!(tally(&rev, Rule::Plurality).winner().unwrap().answer, "y", "order of ballots does not matter");
        let keys: Vec<String> = rev.iter().map(|b| normalize(&b.answer)).collect();
        assert_eq!(tally_keyed(&rev, &keys, Rule::Plurality), tally(&rev, Rule::Plurality), "kept keys count the same");
    }

    #[test]
    fn majority_and_approval_need_their_share() {
        let ballots = vec![b("a", 0, "x", None), b("b", 1, "x", None), b("c", 2, "y", None), b("d", 3, "z", None)];
        assert!(!tally(&ballots, Rule::Majority).decided, "2 of 4 is not more than half");
        assert!(tally(&ballots, Rule::Approval { threshold: 0.5 }).decided);
        assert!(!tally(&ballots, Rule::Approval { threshold: 0.6 }).decided);
        assert_eq!(tally(&ballots, Rule::Approval { threshold: 0.6 }).leader().unwrap().answer, "x");
        assert!(!tally(&[], Rule::Plurality).decided);
    }

    #[test]
    fn confidence_weighting_uses_reconcile_buckets() {
        assert_eq!(reconcile_weight(Some(1.0)), 1.0);
        assert_eq!(reconcile_weight(Some(0.95)), 0.8);
        assert_eq!(reconcile_weight(Some(0.85)), 0.5);
        assert_eq!(reconcile_weight(Some(0.7)), 0.3);
        assert_eq!(reconcile_weight(Some(0.6)), 0.1);
        assert_eq!(reconcile_weight(None), 0.1);
        // Two unsure votes for x (0.3 + 0.3) lose to one certain vote for y (1.0).
        let ballots = vec![b("a", 0, "x", Some(0.7)), b("b", 1, "x", Some(0.65)), b("c", 2, "y", Some(1.0))];
        assert_eq!(tally(&ballots, Rule::Plurality).winner().unwrap().answer, "x");
        assert_eq!(tally(&ballots, Rule::Confidence).winner().unwrap().answer, "y");
    }
}
