//! Sealed exports: the data directory's seal key, and reading an export checked
//! against its seal (see `roundtable_core::chain`).
//!
//! The key that seals what this machine exports is `DIR/seal.key` (64 hex digits, mode
//! 0600), made on first use. It is the machine's, not a peer's: an export of a NATS
//! session is sealed by whoever exported it, and a reader decides whether it trusts
//! that key (`roundtable verify FILE --key HEX`).
//!
//! A local session is also sealed when it stops ([`seal_at_stop`]), so that its log
//! changed afterwards (a database edited between the stop and the export) is refused
//! by `export` and `verify` rather than sealed as edited.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use roundtable_core::chain;
use roundtable_core::log::{SessionLog, jsonl};
use roundtable_core::trust::{PublicKey, SecretKey};
use roundtable_core::{Envelope, Kind, SessionId};

use crate::{Failure, roster_of};

/// The data directory's seal key, made if there is none.
pub(crate) fn key(dir: &Path) -> Result<SecretKey, Failure> {
    let path = dir.join("seal.key");
    let err = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return SecretKey::from_hex(&text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let key = SecretKey::generate();
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(f) => f,
        // Another process made it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return key_again(&path),
        Err(e) => return Err(err(e)),
    };
    f.write_all(format!("{}\n", key.to_hex()).as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(key)
}

/// The data directory's seal key, if it has one (reading it makes none).
pub(crate) fn existing_key(dir: &Path) -> Option<SecretKey> {
    let text = std::fs::read_to_string(dir.join("seal.key")).ok()?;
    SecretKey::from_hex(&text).ok()
}

fn key_again(path: &Path) -> Result<SecretKey, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| Failure::Runtime(format!("{}: {e}", path.display())))?;
    SecretKey::from_hex(&text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

/// An export's envelopes with their line numbers, checked against its seal (when it
/// has one, or always with `require_seal`) and then against the session's rules. An
/// unsealed file, which this version never writes, is read with a warning.
pub(crate) fn read_export(
    file: &Path,
    require_seal: bool,
) -> Result<(Vec<(usize, Envelope)>, Option<PublicKey>), Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| Failure::Input(format!("{}: {e}", file.display())))?;
    let name = file.display().to_string();
    let input = |e: jsonl::ImportError| Failure::Input(e.to_string());
    let (body, seal) = chain::split_seal(&text);
    let lines = jsonl::parse_lines(&name, body).map_err(input)?;
    let sealed = match seal {
        Some((line, seal)) => {
            let seal = chain::parse_seal(&name, line, seal).map_err(input)?;
            Some(chain::verify(&name, &lines, line, &seal).map_err(input)?)
        }
        None if require_seal => {
            return Err(Failure::Input(format!(
                "{name}: no seal (the last line of an export is its seal): whether it was altered cannot be told"
            )));
        }
        None => {
            eprintln!("warning: {name} has no seal: whether it was altered cannot be told");
            None
        }
    };
    jsonl::check_session(&name, &lines, roster_of).map_err(input)?;
    Ok((lines, sealed))
}

/// Where the seal recorded when a session stopped is kept: `DIR/seals/<session>.seal`,
/// one seal line. Beside the seal key rather than in the store, so that a local session
/// is sealed whatever store holds it; a session id is safe to name a file by (see
/// `check_session_id`).
fn stop_seal_path(dir: &Path, session: &SessionId) -> PathBuf {
    dir.join("seals").join(format!("{session}.seal"))
}

/// Seal a local session's log as it stands when its session stopped: the chain over
/// every entry, signed with the data directory's seal key, written to
/// [`stop_seal_path`] (atomically; a seal already there is kept, since the first
/// covers the log as the process that ran the session left it). `export` and `verify`
/// then refuse a log that was changed since, naming the line. A session that did not
/// stop (interrupted, failed) is not sealed: `resume` may still add to it.
pub(crate) async fn seal_at_stop(dir: &Path, log: &dyn SessionLog) -> Result<(), Failure> {
    let path = stop_seal_path(dir, log.session());
    if path.exists() {
        return Ok(());
    }
    let entries = log.read_all().await?;
    if !entries.iter().any(|e| e.env.kind == Kind::Stop) {
        return Ok(());
    }
    let mut chain = chain::Chain::new(log.session());
    for e in &entries {
        chain.push(&e.env);
    }
    let line = chain.seal(&key(dir)?).to_line();
    let folder = path.parent().expect("a seal's path has a folder");
    let err = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(folder).map_err(err)?;
    let mut tmp = tempfile::Builder::new().prefix(".seal-").tempfile_in(folder).map_err(err)?;
    tmp.write_all(format!("{line}\n").as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    Ok(())
}

/// The seal recorded when `session` stopped, if this data directory holds one.
fn stop_seal(dir: &Path, session: &SessionId) -> Result<Option<chain::Seal>, Failure> {
    let path = stop_seal_path(dir, session);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Failure::Runtime(format!("{}: {e}", path.display()))),
    };
    let name = path.display().to_string();
    chain::parse_seal(&name, 1, text.trim()).map(Some).map_err(|e| Failure::Input(e.to_string()))
}

/// Check envelopes (each with its line in an export) against the seal recorded when
/// their session stopped, if this data directory holds one: every envelope as sealed,
/// in order, none added or dropped. `what` names the export in the error, which names
/// the first line that differs.
pub(crate) fn check_stop_seal(dir: &Path, what: &str, lines: &[(usize, Envelope)]) -> Result<(), Failure> {
    let Some((_, first)) = lines.first() else {
        return Ok(());
    };
    let Some(seal) = stop_seal(dir, &first.session)? else {
        return Ok(());
    };
    let path = stop_seal_path(dir, &first.session);
    let seal_line = lines.last().map_or(1, |(l, _)| l + 1);
    let mine = existing_key(dir).map(|k| k.public().to_hex());
    if mine.as_deref() != Some(seal.key.as_str()) {
        return Err(Failure::Input(format!(
            "{}: sealed by key {}, not this data directory's seal key: it was replaced",
            path.display(),
            seal.key
        )));
    }
    chain::verify(what, lines, seal_line, &seal).map(|_| ()).map_err(|e| {
        Failure::Input(format!(
            "{e}; session {} was changed after it stopped (its log no longer matches the seal recorded then, {})",
            first.session,
            path.display()
        ))
    })
}

/// [`check_stop_seal`] for a session's log as `export` would write it (line n holds
/// the n-th entry).
pub(crate) async fn check_log_against_stop_seal(dir: &Path, log: &dyn SessionLog) -> Result<(), Failure> {
    if stop_seal(dir, log.session())?.is_none() {
        return Ok(());
    }
    let lines: Vec<(usize, Envelope)> =
        log.read_all().await?.into_iter().enumerate().map(|(i, e)| (i + 1, (*e.env).clone())).collect();
    check_stop_seal(dir, &format!("the export of session {}", log.session()), &lines)
}
