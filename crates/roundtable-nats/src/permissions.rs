//! What each peer may publish and subscribe to on a shared server: the permissions
//! `roundtable nats-config` writes into a nats-server configuration.
//!
//! A peer may publish its own envelopes (`rt.*.log.<peer>.>`) and the shared ones
//! (`rt.*.log.~.>`: the task and collective decisions), so the server refuses a message
//! in another peer's name before it reaches any stream (see [`crate::NatsLog`]). Beyond
//! that it gets the JetStream API calls the backend makes — creating and reading
//! streams and consumers, direct and stored-message gets, acks and flow control — and
//! the shared parts that are the session's by nature (the blackboard, presence and work
//! queue buckets, the work queue's subject). It may not delete, purge or reconfigure a
//! stream, nor delete a message. An observer (for `log`, `export`, `trace`, `ui`) may
//! read and publish nothing of a session. Every user subscribes only to its inboxes.

/// Whose permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    /// A peer of the team, by its id.
    Peer(&'a str),
    /// A reader of sessions that takes no part in them.
    Observer,
}

/// The JetStream API subjects every user needs to read sessions.
const READ_API: &[&str] = &[
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.FC.>",
];

/// What a peer needs beyond reading: making a session's streams, pulling and settling
/// work-queue tasks, writing the shared buckets and the queue.
const PEER_API: &[&str] = &[
    "$JS.API.STREAM.CREATE.*",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    "$JS.ACK.>",
    "$KV.>",
    "rtq.*.tasks",
];

/// The subjects `role` may publish on.
pub fn publish_allowed(role: Role<'_>) -> Vec<String> {
    let mut out: Vec<String> = READ_API.iter().map(|s| (*s).to_owned()).collect();
    if let Role::Peer(peer) = role {
        out.push(format!("rt.*.log.{}.>", crate::token(peer)));
        out.push(format!("rt.*.log.{}.>", crate::log::SHARED));
        out.extend(PEER_API.iter().map(|s| (*s).to_owned()));
    }
    out
}

/// The subjects `role` may subscribe to: its inboxes (replies and consumer deliveries).
pub fn subscribe_allowed(_role: Role<'_>) -> Vec<String> {
    vec!["_INBOX.>".to_owned()]
}

/// A nats-server configuration: one account with JetStream, holding one user per
/// `(comment, nkey public key, role)` with the permissions above. JetStream itself is
/// enabled with the server's defaults; the deployer adds `store_dir`, TLS and listen
/// addresses as the site needs.
pub fn server_config(team: &str, users: &[(String, String, Role<'_>)]) -> String {
    let list = |v: Vec<String>| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut out = format!(
        "# nats-server configuration for team {team:?}, written by `roundtable nats-config`.\n\
         # Each peer logs in with its own NKey seed file (roundtable ... --nats-nkey FILE) and\n\
         # may publish only its own envelopes, the shared ones and what JetStream needs;\n\
         # clients without a key are refused.\n\
         jetstream {{}}\n\
         accounts {{\n  roundtable {{\n    jetstream: enabled\n    users: [\n"
    );
    for (comment, nkey, role) in users {
        out.push_str(&format!(
            "      # {comment}\n      {{\n        nkey: {nkey:?}\n        permissions: {{\n          \
             publish: {{ allow: [{}] }}\n          subscribe: {{ allow: [{}] }}\n        }}\n      }}\n",
            list(publish_allowed(*role)),
            list(subscribe_allowed(*role)),
        ));
    }
    out.push_str("    ]\n  }\n}\n");
    out
}
