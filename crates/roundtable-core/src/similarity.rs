//! How alike two answers are, for emergent consensus.
//!
//! [`lexical`] is the offline default: the cosine of the two texts' word-count vectors
//! (lowercased letters and digits; everything else separates words). It is a pure
//! function, so reducers compute it themselves. Embedding similarity ([`cosine`] of
//! vectors from an [`crate::model::Embedder`]) is I/O: a peer computes it and records
//! the result on the log, and reducers read the recorded numbers.

use std::collections::BTreeMap;

/// Cosine similarity of word counts, in 0–1. Two empty texts are identical.
pub fn lexical(a: &str, b: &str) -> f64 {
    let ca = counts(a);
    let cb = counts(b);
    if ca.is_empty() && cb.is_empty() {
        return 1.0;
    }
    if ca.is_empty() || cb.is_empty() {
        return 0.0;
    }
    let dot: f64 = ca.iter().map(|(w, n)| n * cb.get(w).copied().unwrap_or(0.0)).sum();
    let na: f64 = ca.values().map(|n| n * n).sum::<f64>().sqrt();
    let nb: f64 = cb.values().map(|n| n * n).sum::<f64>().sqrt();
    (dot / (na * nb)).clamp(0.0, 1.0)
}

fn counts(s: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for w in s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        *m.entry(w.to_lowercase()).or_insert(0.0) += 1.0;
    }
    m
}

/// Cosine similarity of two vectors, clamped to 0–1 (0 when either is zero or their
/// lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na * nb)).clamp(0.0, 1.0)
}

/// Similarities of every pair of a set of answers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pairwise {
    /// `(i, j, similarity)` for every `i < j`.
    pub pairs: Vec<(usize, usize, f64)>,
    /// The least similar pair (1 for fewer than two answers).
    pub min: f64,
}

impl Pairwise {
    /// From a similarity function over `n` items.
    pub fn of(n: usize, mut sim: impl FnMut(usize, usize) -> f64) -> Self {
        let mut pairs = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                pairs.push((i, j, sim(i, j)));
            }
        }
        let min = pairs.iter().map(|p| p.2).fold(1.0, f64::min);
        Pairwise { pairs, min }
    }

    /// The item most similar to the others on average (the medoid); ties go to the
    /// lower index.
    pub fn medoid(&self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let mut sums = vec![0.0; n];
        for &(i, j, s) in &self.pairs {
            if i < n && j < n {
                sums[i] += s;
                sums[j] += s;
            }
        }
        let mut best = 0;
        for (i, s) in sums.iter().enumerate() {
            if *s > sums[best] + 1e-12 {
                best = i;
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_similarity() {
        assert!((lexical("The cat sat", "the CAT sat!") - 1.0).abs() < 1e-9);
        assert_eq!(lexical("apples", "oranges"), 0.0);
        let s = lexical("use postgres for orders", "use postgres for the orders table");
        assert!(s > 0.7 && s < 1.0, "{s}");
        assert_eq!(lexical("", ""), 1.0);
        assert_eq!(lexical("x", ""), 0.0);
    }

    #[test]
    fn cosine_and_medoid() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-9);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
        let texts = ["a b c", "a b d", "x y z"];
        let p = Pairwise::of(3, |i, j| lexical(texts[i], texts[j]));
        assert_eq!(p.pairs.len(), 3);
        assert_eq!(p.min, 0.0);
        assert_eq!(p.medoid(3), Some(0), "a tie between 0 and 1 goes to the lower index");
        assert_eq!(Pairwise::of(1, |_, _| 0.0).min, 1.0);
    }
}
