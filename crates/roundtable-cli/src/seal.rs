//! Sealed exports: the data directory's seal key, and reading an export checked
//! against its seal (see `roundtable_core::chain`).
//!
//! The key that seals what this machine exports is `DIR/seal.key` (64 hex digits, mode
//! 0600), made on first use. It is the machine's, not a peer's: an export of a NATS
//! session is sealed by whoever exported it, and a reader decides whether it trusts
//! that key (`roundtable verify FILE --key HEX`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use roundtable_core::Envelope;
use roundtable_core::chain;
use roundtable_core::log::jsonl;
use roundtable_core::trust::{PublicKey, SecretKey};

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
