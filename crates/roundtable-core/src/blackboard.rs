//! The blackboard: shared key-value state with revisions, compare-and-set and watch.
//!
//! Semantics mirror a JetStream KV bucket, so a team behaves the same in-process and on
//! NATS:
//! - Every write (put, create, update, delete) gets a **revision**, a number that grows
//!   across the whole board (not per key). A key's entry carries the revision of its last
//!   write.
//! - [`Blackboard::create`] writes only if the key is absent (or deleted); otherwise it
//!   fails with [`BoardErrorKind::AlreadyExists`].
//! - [`Blackboard::update`] writes only if the key's last revision is the one given;
//!   otherwise [`BoardErrorKind::WrongLastRevision`]. Of two peers racing on the same
//!   revision exactly one wins; the other reads the new revision and retries.
//! - [`Blackboard::watch`] yields every write with a revision ≥ the one given (history
//!   first, then live), in revision order. A watcher that falls behind may see only the
//!   latest write of a key when history is compacted (JetStream keeps one value per key
//!   by default); it never sees writes out of order.
//! - A peer that dies mid-write either wrote (the revision exists) or did not; there are
//!   no partial values. Nothing on the board is owned by a peer, so a peer's death
//!   changes nothing on it.
//!
//! Writes that matter to a decision are also recorded on the session log (kind `board`)
//! by the protocol that makes them, so the log stays the truth for audit and replay.

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::Error;

crate::error_kind! {
    /// What went wrong with a blackboard operation.
    pub enum BoardErrorKind {
        /// Compare-and-set failed: the key was written since the revision given.
        WrongLastRevision => "wrong last revision",
        /// Create-if-absent failed: the key exists.
        AlreadyExists => "key already exists",
        /// The key name is not valid (empty, or characters the backend cannot store).
        InvalidKey => "invalid key",
        /// The storage failed.
        Storage => "storage failure",
        /// The backend cannot be reached right now; retrying may help.
        Unavailable => "backend unavailable",
    }
}

pub type BoardError = Error<BoardErrorKind>;

/// Whether a write set or removed the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoardOp {
    Put,
    Delete,
}

/// One write on the board.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoardEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: u64,
    pub op: BoardOp,
}

/// Keys may contain letters, digits and `-_/=.`; not empty, at most 256 bytes, and not
/// starting or ending with `.` (JetStream KV's rules, so both backends accept the same).
pub fn validate_key(key: &str) -> Result<(), BoardError> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_/=.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BoardError::new(
            BoardErrorKind::InvalidKey,
            format!("key {key:?}: use letters, digits and -_/=. (not empty, not starting or ending with '.')"),
        ))
    }
}

/// Shared key-value state with revisions (see the module docs).
#[async_trait]
pub trait Blackboard: Send + Sync + 'static {
    /// The key's current entry; `None` when absent or deleted.
    async fn get(&self, key: &str) -> Result<Option<BoardEntry>, BoardError>;
    /// Write unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError>;
    /// Write only if the key is absent or deleted.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError>;
    /// Write only if the key's last revision is `expected`.
    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, BoardError>;
    /// Delete the key (a tombstone with its own revision).
    async fn delete(&self, key: &str) -> Result<u64, BoardError>;
    /// Keys that currently have a value, sorted.
    async fn keys(&self) -> Result<Vec<String>, BoardError>;
    /// Every write with revision ≥ `from` (history first, then live).
    async fn watch(&self, from: u64) -> Result<BoxStream<'static, Result<BoardEntry, BoardError>>, BoardError>;
}
