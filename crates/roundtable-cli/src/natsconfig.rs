//! `roundtable nats-config TEAM.toml`: what a deployer needs so that the NATS server
//! itself enforces who may speak as whom.
//!
//! It writes, into a directory of its own (`--out`, default `nats-config`):
//! `nats-server.conf`, one account with JetStream and one user per peer, each
//! authenticated by an NKey and allowed to publish only its own envelopes, the shared
//! ones and what JetStream needs (see `roundtable_nats::permissions`), plus an
//! `observer` user that may read sessions and publish none; and one seed file per user,
//! `PEER.nk` and `observer.nk` (mode 0600), to hand to whoever runs that peer, who
//! passes it with `--nats-nkey FILE` (or `NATS_NKEY`). Nothing is overwritten: a seed
//! already given out stays valid until the deployer removes it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use roundtable_nats::permissions::{Role, server_config};

use crate::{Failure, load_plan};

#[derive(clap::Args)]
pub(crate) struct NatsConfigArgs {
    /// The team file whose peers get credentials.
    team: PathBuf,
    /// The directory to write nats-server.conf and the seed files into (made if missing;
    /// none of the files may exist yet).
    #[arg(long, short, value_name = "DIR", default_value = "nats-config")]
    out: PathBuf,
}

/// The name of the user that reads sessions and takes part in none (no peer may be
/// called so: `observer.nk` would be ambiguous).
const OBSERVER: &str = "observer";

pub(crate) fn run(args: NatsConfigArgs) -> Result<ExitCode, Failure> {
    let plan = load_plan(&args.team)?;
    if let Some(p) = plan.peers.iter().find(|p| p.id.as_str() == OBSERVER) {
        return Err(Failure::Input(format!(
            "{}: peer id {:?} is taken by the observer's credentials; rename the peer",
            args.team.display(),
            p.id.as_str()
        )));
    }
    let conf = args.out.join("nats-server.conf");
    let mut files = vec![conf.clone()];
    files.extend(plan.peers.iter().map(|p| seed_path(&args.out, p.id.as_str())));
    files.push(seed_path(&args.out, OBSERVER));
    if let Some(existing) = files.iter().find(|f| f.symlink_metadata().is_ok()) {
        return Err(Failure::Input(format!(
            "{} exists: nats-config never overwrites credentials; choose another --out or move it away",
            existing.display()
        )));
    }
    let err = |path: &Path, e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&args.out).map_err(|e| err(&args.out, e))?;

    let mut users = Vec::new();
    let mut seeds = Vec::new();
    let roles: Vec<(String, Role<'_>)> = plan
        .peers
        .iter()
        .map(|p| (format!("peer {}", p.id), Role::Peer(p.id.as_str())))
        .chain(std::iter::once(("observer: reads sessions, takes part in none".to_owned(), Role::Observer)))
        .collect();
    for (comment, role) in roles {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().map_err(|e| Failure::Runtime(format!("making an NKey: {e}")))?;
        let name = match role {
            Role::Peer(p) => p.to_owned(),
            Role::Observer => OBSERVER.to_owned(),
        };
        users.push((comment, pair.public_key(), role));
        seeds.push((seed_path(&args.out, &name), seed));
    }
    for (path, seed) in &seeds {
        write_new(path, &format!("{seed}\n"), 0o600).map_err(|e| err(path, e))?;
    }
    write_new(&conf, &server_config(&plan.name, &users), 0o644).map_err(|e| err(&conf, e))?;
    println!("{}", conf.display());
    eprintln!(
        "Wrote {} and a seed file per peer ({} users). Start the server with `nats-server -c {}` \
         (add store_dir, TLS and listen addresses as your site needs), and give each peer its own \
         PEER.nk, passed with --nats-nkey FILE. Keep the seed files secret.",
        conf.display(),
        users.len(),
        conf.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn seed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.nk"))
}

fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
