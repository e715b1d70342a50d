//! Peers' signing keys: `roundtable keys new --peer ID`, and the keys a process loads to
//! sign what its peers append across processes.
//!
//! A peer's secret key is one file, `DIR/keys/PEER.key` (64 hex digits, mode 0600),
//! under the data directory of the machine that runs the peer; it never leaves it.
//! `keys new` prints the public key, for every team file that lists the peer
//! (`public_key = "…"` in its `[[peers]]` entry). When a team's peers have public keys,
//! a process refuses to run a peer whose secret key it lacks or whose key is not the
//! one its team file lists.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use roundtable_core::PeerId;
use roundtable_core::team::TeamPlan;
use roundtable_core::trust::{Roster, SecretKey, Signers};

use crate::Failure;

#[derive(clap::Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// Make a peer's key pair: the secret key goes to DIR/keys/PEER.key (0600), the
    /// public key is printed for the team file's `public_key`.
    New {
        /// The peer the key is for.
        #[arg(long, value_name = "PEER")]
        peer: String,
    },
}

fn key_path(dir: &Path, peer: &str) -> PathBuf {
    dir.join("keys").join(format!("{peer}.key"))
}

pub(crate) fn run(dir: &Path, args: KeysArgs) -> Result<ExitCode, Failure> {
    match args.command {
        KeysCommand::New { peer } => {
            let valid = !peer.is_empty()
                && peer.len() <= 64
                && peer.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(Failure::Input(format!("--peer {peer:?}: a peer id is 1-64 letters, digits, '-' or '_'")));
            }
            let path = key_path(dir, &peer);
            let err = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
            std::fs::create_dir_all(path.parent().expect("a key file has a directory")).map_err(err)?;
            let key = SecretKey::generate();
            let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(Failure::Input(format!(
                        "{}: peer {peer} has a key already; move the file away to make a new one",
                        path.display()
                    )));
                }
                Err(e) => return Err(err(e)),
            };
            f.write_all(format!("{}\n", key.to_hex()).as_bytes()).map_err(err)?;
            println!("{}", key.public().to_hex());
            eprintln!(
                "Wrote {}. Add to peer {peer}'s [[peers]] entry in the team file:\n  public_key = \"{}\"",
                path.display(),
                key.public().to_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The keys of `peers` (of `plan`), when the plan's peers have public keys: each read
/// from the data directory and checked against the plan. No keys when the plan has
/// none (its sessions are not signed).
pub(crate) fn signers(dir: &Path, plan: &TeamPlan, peers: &[PeerId]) -> Result<Signers, Failure> {
    let mut signers = Signers::default();
    let Some(roster) = Roster::of_plan(plan).map_err(Failure::Input)? else {
        return Ok(signers);
    };
    for peer in peers {
        let path = key_path(dir, peer.as_str());
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Failure::Input(format!(
                "{}: {e}: the team's peers sign what they say, and this machine has no key of {peer}'s \
                 (make one with `roundtable keys new --peer {peer} --data-dir {}` and put its public key in the team file)",
                path.display(),
                dir.display()
            ))
        })?;
        let key = SecretKey::from_hex(&text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
        if roster.key(peer) != Some(&key.public()) {
            return Err(Failure::Input(format!(
                "{}: this is not the key whose public key the team file lists for {peer} ({})",
                path.display(),
                key.public().to_hex()
            )));
        }
        signers.insert(peer.clone(), key);
    }
    Ok(signers)
}
