//! The blackboard as a JetStream KV bucket, `RTB_<session>`.
//!
//! A KV bucket is what the blackboard's semantics were modelled on, so the mapping is
//! direct: the revision is the bucket stream's sequence (global across keys), `update`
//! is a publish with `Nats-Expected-Last-Subject-Sequence`, a delete is a tombstone
//! message (published here directly, to learn its revision), and `watch` is an ordered
//! consumer from a start sequence.
//!
//! The bucket keeps 64 values per key (JetStream's maximum); a watcher that starts from a
//! revision older than that may miss superseded values of a key, never their order.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use roundtable_core::blackboard::{Blackboard, BoardEntry, BoardError, BoardErrorKind, BoardOp, validate_key};
use roundtable_core::envelope::SessionId;

use std::time::Duration;

use crate::{board_error, open_bucket, token};

/// One session's blackboard on JetStream (see the module docs).
pub struct NatsBoard {
    kv: kv::Store,
    js: jetstream::Context,
}

fn wrong_revision(key: &str, expected: u64) -> BoardError {
    BoardError::new(BoardErrorKind::WrongLastRevision, format!("key {key:?} was written since revision {expected}"))
}

impl NatsBoard {
    /// Open (creating when needed, with `replicas` copies) the blackboard of `session`.
    pub async fn open(js: &jetstream::Context, session: &SessionId, replicas: usize) -> Result<NatsBoard, BoardError> {
        let bucket = format!("RTB_{}", token(session.as_str()));
        let description = format!("blackboard of session {session}");
        let kv = open_bucket(js, &bucket, description, 64, Duration::ZERO, replicas)
            .await
            .map_err(|e| board_error(&format!("opening the blackboard of session {session}"), e))?;
        Ok(NatsBoard { kv, js: js.clone() })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix))
    }
}

fn board_entry(e: kv::Entry) -> BoardEntry {
    let op = match e.operation {
        kv::Operation::Put => BoardOp::Put,
        kv::Operation::Delete | kv::Operation::Purge => BoardOp::Delete,
    };
    BoardEntry { key: e.key, value: e.value.to_vec(), revision: e.revision, op }
}

#[async_trait]
impl Blackboard for NatsBoard {
    async fn get(&self, key: &str) -> Result<Option<BoardEntry>, BoardError> {
        validate_key(key)?;
        let entry = self.kv.entry(key).await.map_err(|e| board_error(&format!("reading {key:?}"), e))?;
        Ok(entry.map(board_entry).filter(|e| e.op == BoardOp::Put))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        validate_key(key)?;
        self.kv.put(key, value.into()).await.map_err(|e| board_error(&format!("writing {key:?}"), e))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, BoardError> {
        validate_key(key)?;
        // Absent: the key's last revision is 0. Deleted: its last revision is the
        // tombstone's. Either way a CAS from that revision; a lost race shows up as a
        // changed entry on the next look.
        let mut expected = 0;
        loop {
            match self.update(key, value.clone(), expected).await {
                Ok(rev) => return Ok(rev),
                Err(e) if e.kind() == BoardErrorKind::WrongLastRevision => {}
                Err(e) => return Err(e),
            }
            let entry = self.kv.entry(key).await.map_err(|e| board_error(&format!("reading {key:?}"), e))?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    return Err(BoardError::new(
                        BoardErrorKind::AlreadyExists,
                        format!("key {key:?} exists (revision {})", e.revision),
                    ));
                }
                Some(e) => expected = e.revision,
                None => expected = 0,
            }
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, BoardError> {
        validate_key(key)?;
        match self.kv.update(key, value.into(), expected).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(wrong_revision(key, expected)),
            Err(e) => Err(board_error(&format!("updating {key:?}"), e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<u64, BoardError> {
        validate_key(key)?;
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        let what = || format!("deleting {key:?}");
        let ack = crate::publish_acked(&self.js, self.subject(key), headers, Vec::new())
            .await
            .map_err(|e| board_error(&what(), e))?;
        Ok(ack.sequence)
    }

    async fn keys(&self) -> Result<Vec<String>, BoardError> {
        let mut keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| board_error("listing keys", e))?
            .map(|k| k.map_err(|e| board_error("listing keys", e)))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        keys.sort_unstable();
        Ok(keys)
    }

    async fn watch(&self, from: u64) -> Result<BoxStream<'static, Result<BoardEntry, BoardError>>, BoardError> {
        let watch =
            self.kv.watch_all_from_revision(from.max(1)).await.map_err(|e| board_error("watching the board", e))?;
        // A start past the end is moved back to the end by the server.
        let from = from.max(1);
        let entries = watch.filter_map(move |e| {
            let entry = match e {
                Ok(e) if e.revision < from => None,
                Ok(e) => Some(Ok(board_entry(e))),
                Err(e) => Some(Err(board_error("watching the board", e))),
            };
            std::future::ready(entry)
        });
        Ok(Box::pin(entries))
    }
}
