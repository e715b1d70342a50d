//! Commitments and seals for commit-reveal voting.
//!
//! A juror must not be able to read another juror's answer before everyone has
//! committed, yet nothing that matters may live only in a peer's memory. So a commit
//! envelope carries two things, both derived from a per-peer **secret** that never goes
//! on the log:
//!
//! - the **commitment**: `SHA-256("roundtable-commit-v1" ‖ salt ‖ answer)`, where the
//!   salt is `SHA-256("salt" ‖ secret ‖ session ‖ peer ‖ step)`. It binds the juror to
//!   its answer; without the salt nobody can test guesses against it.
//! - the **seal**: the answer XORed with a keystream of `SHA-256("seal" ‖ secret ‖
//!   session ‖ peer ‖ step ‖ counter)` blocks (SHA-256 in counter mode). It keeps the
//!   answer on the log, unreadable to the other peers, so that the juror can reveal it
//!   after a crash without calling its model again.
//!
//! The reveal posts the answer and the salt; every peer recomputes the commitment and
//! rejects a reveal that does not match. The seal needs no integrity check of its own:
//! an answer that was tampered with, or opened with the wrong secret, fails the
//! commitment check.
//!
//! A peer's secret must be its own: peers given one master secret (see
//! [`crate::runner::run_peers_with`]) get secrets derived from it and their ids, so
//! processes that share a master can open each other's seals. Give each process (or
//! each peer) its own, kept where its restarts find it.
//!
//! Salts and keystreams are re-derived from the secret, never stored, so a juror that
//! restarts with the same secret opens its own seal and reveals exactly what it
//! committed to. A juror that restarts without it (an in-memory run in a new process
//! that was given no secret) cannot open its seal: it records that it forfeits, and the
//! tally goes on without its vote.

use sha2::{Digest, Sha256};

use crate::envelope::{PeerId, SessionId};

fn h(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for p in parts {
        hasher.update((p.len() as u64).to_le_bytes());
        hasher.update(p);
    }
    hasher.finalize().into()
}

/// The salt of `peer`'s commitment at `step`.
pub fn salt(secret: &[u8], session: &SessionId, peer: &PeerId, step: &str) -> [u8; 32] {
    h(&[b"salt", secret, session.as_str().as_bytes(), peer.as_str().as_bytes(), step.as_bytes()])
}

/// The commitment to `answer` with `salt`, as hex.
pub fn commitment(salt: &[u8], answer: &str) -> String {
    hex::encode(h(&[b"roundtable-commit-v1", salt, answer.as_bytes()]))
}

fn keystream_xor(secret: &[u8], session: &SessionId, peer: &PeerId, step: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for (i, chunk) in data.chunks(32).enumerate() {
        let block = h(&[
            b"seal",
            secret,
            session.as_str().as_bytes(),
            peer.as_str().as_bytes(),
            step.as_bytes(),
            &(i as u64).to_le_bytes(),
        ]);
        out.extend(chunk.iter().zip(block.iter()).map(|(a, b)| a ^ b));
    }
    out
}

/// The answer sealed for the log, as hex.
pub fn seal(secret: &[u8], session: &SessionId, peer: &PeerId, step: &str, answer: &str) -> String {
    hex::encode(keystream_xor(secret, session, peer, step, answer.as_bytes()))
}

/// Open a seal; `None` when it is not hex or not UTF-8 after opening (a wrong secret
/// usually gives bytes that are not UTF-8; when it does not, the commitment check
/// catches it).
pub fn open(secret: &[u8], session: &SessionId, peer: &PeerId, step: &str, sealed: &str) -> Option<String> {
    let bytes = hex::decode(sealed).ok()?;
    String::from_utf8(keystream_xor(secret, session, peer, step, &bytes)).ok()
}

/// Whether a revealed answer and salt match a commitment.
pub fn verify(commitment_hex: &str, salt_hex: &str, answer: &str) -> bool {
    match hex::decode(salt_hex) {
        Ok(salt) => commitment(&salt, answer) == commitment_hex,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_opens_with_the_secret_only_and_commitment_binds() {
        let (s, p) = (SessionId::from("s"), PeerId::from("juror-1"));
        let secret = b"secret-one";
        let answer = "Answer: 42 — because 6*7.";
        let sealed = seal(secret, &s, &p, "jury/r0/commit", answer);
        assert!(!sealed.contains(&hex::encode("42")), "the answer is not readable on the log");
        assert_eq!(open(secret, &s, &p, "jury/r0/commit", &sealed).as_deref(), Some(answer));
        assert_ne!(open(b"other", &s, &p, "jury/r0/commit", &sealed).as_deref(), Some(answer));
        assert_ne!(open(secret, &s, &p, "jury/r1/commit", &sealed).as_deref(), Some(answer));

        let salt = salt(secret, &s, &p, "jury/r0/commit");
        let c = commitment(&salt, answer);
        assert!(verify(&c, &hex::encode(salt), answer));
        assert!(!verify(&c, &hex::encode(salt), "Answer: 43 — because 6*7."));
        assert!(!verify(&c, &hex::encode([0u8; 32]), answer), "the salt is part of the commitment");
        assert!(!verify(&c, "not hex", answer));
        // Deterministic: a restarted juror re-derives the same salt.
        assert_eq!(super::salt(secret, &s, &p, "jury/r0/commit"), salt);
    }
}
