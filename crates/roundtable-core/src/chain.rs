//! The hash chain over a session's log and the seal that signs its head, so that an
//! exported session can be checked anywhere and an altered one is refused.
//!
//! In one process the peers share a log the process already trusts, so its envelopes
//! are not signed one by one. Instead every entry's *link* is the SHA-256 of the
//! previous link and the entry's envelope as a line of an export carries it (its JSON,
//! signature included, if any); the first link starts from the session id. The chain
//! is a pure function of the log, so it is computed where it is needed — when a session
//! stops and on export — rather than on the append path.
//!
//! A [`Seal`] is the chain's head, how many entries it covers, the first 16 hex digits
//! of every link (so a check can name the first line that differs), and an Ed25519
//! signature over all of it by the key that sealed it. An export ends with its seal as
//! one line, `{"seal": {...}}`. [`verify`] recomputes the chain over the file's
//! envelopes and names the first line that was changed, dropped, added or moved, or the
//! seal's own line when the seal was edited. Whose key sealed a file is for the reader
//! to judge (`roundtable verify --key`): a seal proves the file is what that key's
//! holder exported, not who that is.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{Envelope, SessionId};
use crate::log::jsonl::ImportError;
use crate::trust::{PublicKey, SecretKey};

/// The version of the chain and seal format.
pub const SEAL_VERSION: u32 = 1;

/// How many hex digits of each link a seal keeps, to name the first line that differs.
const MARK_DIGITS: usize = 16;

/// A link of the chain.
pub type Link = [u8; 32];

/// The link before the first entry of `session`.
pub fn genesis(session: &SessionId) -> Link {
    let mut h = Sha256::new();
    h.update(b"roundtable chain v1\0");
    h.update(session.as_str().as_bytes());
    h.finalize().into()
}

/// The link of an entry whose envelope is `line` (its JSON), after `prev`.
pub fn link(prev: &Link, line: &[u8]) -> Link {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(line);
    h.finalize().into()
}

/// The chain over a log, built one entry at a time.
#[derive(Clone, Debug)]
pub struct Chain {
    session: SessionId,
    head: Link,
    marks: Vec<String>,
}

impl Chain {
    pub fn new(session: &SessionId) -> Chain {
        Chain { session: session.clone(), head: genesis(session), marks: Vec::new() }
    }

    /// Add the next entry, given as the JSON line of its envelope.
    pub fn push_line(&mut self, line: &[u8]) {
        self.head = link(&self.head, line);
        self.marks.push(hex::encode(&self.head[..MARK_DIGITS / 2]));
    }

    pub fn push(&mut self, env: &Envelope) {
        self.push_line(env.to_json().as_bytes());
    }

    pub fn head(&self) -> &Link {
        &self.head
    }

    pub fn len(&self) -> u64 {
        self.marks.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The signed seal of the chain as it stands.
    pub fn seal(&self, key: &SecretKey) -> Seal {
        let mut seal = Seal {
            v: SEAL_VERSION,
            session: self.session.clone(),
            entries: self.len(),
            head: hex::encode(self.head),
            marks: self.marks.clone(),
            key: key.public().to_hex(),
            sig: String::new(),
        };
        seal.sig = key.sign_bytes(&seal.signed_bytes());
        seal
    }
}

/// A chain's signed head (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    pub v: u32,
    pub session: SessionId,
    /// How many entries the chain covers.
    pub entries: u64,
    /// The last link, 64 hex digits.
    pub head: String,
    /// The first 16 hex digits of every link, in order.
    pub marks: Vec<String>,
    /// The public key that signed the seal, 64 hex digits.
    pub key: String,
    /// The signature over the seal's JSON without `sig`, 128 hex digits.
    pub sig: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealLine {
    seal: Seal,
}

impl Seal {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.sig = String::new();
        serde_json::to_vec(&unsigned).expect("a seal serializes")
    }

    /// The seal as the last line of an export.
    pub fn to_line(&self) -> String {
        serde_json::to_string(&SealLine { seal: self.clone() }).expect("a seal serializes")
    }

    /// Whether its signature is its key's; if not, why.
    pub fn check_signature(&self) -> Result<PublicKey, String> {
        if self.v != SEAL_VERSION {
            return Err(format!("a seal of version {} (this program reads {SEAL_VERSION})", self.v));
        }
        let key = PublicKey::parse(&self.key).map_err(|e| format!("field `seal.key`: {e}"))?;
        if !key.verify_bytes(&self.signed_bytes(), &self.sig) {
            return Err("the seal's signature does not match the seal (it was edited)".to_owned());
        }
        Ok(key)
    }
}

/// Split an export's text into the envelope lines and its seal, if its last non-empty
/// line is one: `(text without the seal, Some((line number, seal line)))`.
pub fn split_seal(text: &str) -> (&str, Option<(usize, &str)>) {
    let trimmed = text.trim_end();
    let start = trimmed.rfind('\n').map_or(0, |i| i + 1);
    let last = &trimmed[start..];
    if last.trim_start().starts_with("{\"seal\"") {
        let line = text[..start].lines().count() + 1;
        (&text[..start], Some((line, last)))
    } else {
        (text, None)
    }
}

/// Parse a seal line.
pub fn parse_seal(file: &str, line: usize, text: &str) -> Result<Seal, ImportError> {
    serde_json::from_str::<SealLine>(text).map(|l| l.seal).map_err(|e| ImportError {
        file: file.into(),
        line,
        error: format!("not a seal: {e}"),
    })
}

/// Check `lines` (each envelope with its line number, as parsed from an export) against
/// `seal` (on line `seal_line`): its signature, then the chain entry by entry. Returns
/// the key that sealed the file; an error names the first line that differs.
pub fn verify(
    file: &str,
    lines: &[(usize, Envelope)],
    seal_line: usize,
    seal: &Seal,
) -> Result<PublicKey, ImportError> {
    let err = |line: usize, error: String| ImportError { file: file.into(), line, error };
    let key = seal.check_signature().map_err(|e| err(seal_line, e))?;
    if seal.marks.len() as u64 != seal.entries {
        return Err(err(seal_line, "the seal's marks do not match its count of entries".into()));
    }
    let session = lines.first().map(|(_, e)| e.session.clone()).unwrap_or_else(|| seal.session.clone());
    if session != seal.session {
        return Err(err(
            lines.first().map_or(seal_line, |(l, _)| *l),
            format!("field `session`: the file is of session {session}, its seal of session {}", seal.session),
        ));
    }
    let mut chain = Chain::new(&seal.session);
    for (i, (line, env)) in lines.iter().enumerate() {
        chain.push(env);
        let Some(mark) = seal.marks.get(i) else {
            return Err(err(*line, format!("an envelope the seal does not cover (it covers {})", seal.entries)));
        };
        if chain.marks[i] != *mark {
            return Err(err(
                *line,
                "this envelope is not the one sealed at its place: it was changed, or an envelope \
                 before it was dropped, added or moved"
                    .into(),
            ));
        }
    }
    if chain.len() < seal.entries {
        return Err(err(
            seal_line,
            format!("the seal covers {} envelopes, the file has {}: the last were dropped", seal.entries, chain.len()),
        ));
    }
    if hex::encode(chain.head()) != seal.head {
        return Err(err(seal_line, "the chain's head does not match the seal".into()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, Kind, Recipient};

    fn lines(n: usize) -> Vec<(usize, Envelope)> {
        let s = SessionId::from("s");
        (0..n)
            .map(|i| {
                let kind = if i == 0 { Kind::Task } else { Kind::Message };
                (i + 1, Envelope::new(&s, &"p".into(), format!("turn/{i}"), kind, Recipient::All, Body::text("x")))
            })
            .collect()
    }

    fn sealed(lines: &[(usize, Envelope)], key: &SecretKey) -> Seal {
        let mut chain = Chain::new(&lines[0].1.session);
        for (_, e) in lines {
            chain.push(e);
        }
        chain.seal(key)
    }

    fn line_of(r: Result<PublicKey, ImportError>) -> usize {
        r.expect_err("refused").line
    }

    #[test]
    fn a_sealed_file_verifies_and_names_its_key() {
        let key = SecretKey::generate();
        let l = lines(5);
        let seal = sealed(&l, &key);
        assert_eq!(verify("f", &l, 6, &seal), Ok(key.public()));
        // The seal line round-trips and is found as the last line.
        let text: String = l.iter().map(|(_, e)| format!("{}\n", e.to_json())).collect::<String>() + &seal.to_line();
        let (body, found) = split_seal(&text);
        let (line, seal_text) = found.expect("a seal");
        assert_eq!((line, body.lines().count()), (6, 5));
        assert_eq!(parse_seal("f", line, seal_text).unwrap(), seal);
    }

    #[test]
    fn a_changed_dropped_added_or_moved_envelope_is_named_by_its_line() {
        let key = SecretKey::generate();
        let l = lines(6);
        let seal = sealed(&l, &key);
        let mut changed = l.clone();
        changed[3].1.body.text = "y".into();
        assert_eq!(line_of(verify("f", &changed, 7, &seal)), 4);
        // Dropped: the envelope after it is at the wrong place (line numbers as in the file).
        let dropped: Vec<_> =
            l.iter().filter(|(n, _)| *n != 3).enumerate().map(|(i, (_, e))| (i + 1, e.clone())).collect();
        assert_eq!(line_of(verify("f", &dropped, 6, &seal)), 3);
        let mut moved = l.clone();
        let (a, b) = (moved[2].1.clone(), moved[3].1.clone());
        moved[2].1 = b;
        moved[3].1 = a;
        assert_eq!(line_of(verify("f", &moved, 7, &seal)), 3);
        let mut added = l.clone();
        added.push((7, l[1].1.clone()));
        assert_eq!(line_of(verify("f", &added, 8, &seal)), 7);
        let last_dropped = l[..5].to_vec();
        assert_eq!(line_of(verify("f", &last_dropped, 6, &seal)), 6, "the seal's line: it covers more");
    }

    #[test]
    fn an_edited_or_resigned_seal_is_refused_at_its_line() {
        let key = SecretKey::generate();
        let l = lines(3);
        let mut seal = sealed(&l, &key);
        seal.entries = 2;
        let err = verify("f", &l, 4, &seal).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.error.contains("signature does not match"), "{err}");
        // A forger re-signs an altered file with a key of its own: it verifies, under
        // that key, which is not the sealer's.
        let mut changed = l.clone();
        changed[1].1.body.text = "forged".into();
        let forger = SecretKey::generate();
        let resealed = sealed(&changed, &forger);
        assert_eq!(verify("f", &changed, 4, &resealed), Ok(forger.public()));
        assert_ne!(forger.public(), key.public());
    }
}
