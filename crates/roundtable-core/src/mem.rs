//! In-process implementations of the blackboard and the work queue (the embedded
//! default). Their semantics are the ones written in [`crate::blackboard`] and
//! [`crate::workqueue`], mirroring JetStream.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::blackboard::{BoardEntry, BoardError, Blackboard};
use crate::envelope::PeerId;
use crate::workqueue::{Claim, DeadLetter, QueueConfig, QueueError, QueueStats, WorkQueue};

/// In-process blackboard.
#[derive(Default)]
pub struct MemBlackboard {}

#[async_trait]
impl Blackboard for MemBlackboard {
    async fn get(&self, _key: &str) -> Result<Option<BoardEntry>, BoardError> {
        unimplemented!("in progress")
    }
    async fn put(&self, _key: &str, _value: Vec<u8>) -> Result<u64, BoardError> {
        unimplemented!("in progress")
    }
    async fn create(&self, _key: &str, _value: Vec<u8>) -> Result<u64, BoardError> {
        unimplemented!("in progress")
    }
    async fn update(&self, _key: &str, _value: Vec<u8>, _expected: u64) -> Result<u64, BoardError> {
        unimplemented!("in progress")
    }
    async fn delete(&self, _key: &str) -> Result<u64, BoardError> {
        unimplemented!("in progress")
    }
    async fn keys(&self) -> Result<Vec<String>, BoardError> {
        unimplemented!("in progress")
    }
    async fn watch(&self, _from: u64) -> Result<BoxStream<'static, Result<BoardEntry, BoardError>>, BoardError> {
        unimplemented!("in progress")
    }
}

/// In-process work queue.
pub struct MemWorkQueue {
    config: QueueConfig,
}

impl MemWorkQueue {
    pub fn new(config: QueueConfig) -> Self {
        MemWorkQueue { config }
    }
}

#[async_trait]
impl WorkQueue for MemWorkQueue {
    fn config(&self) -> QueueConfig {
        self.config
    }
    async fn push(&self, _task_id: &str, _payload: serde_json::Value) -> Result<(), QueueError> {
        unimplemented!("in progress")
    }
    async fn claim(&self, _claimer: &PeerId, _wait: Duration) -> Result<Option<Claim>, QueueError> {
        unimplemented!("in progress")
    }
    async fn ack(&self, _claim: &Claim) -> Result<(), QueueError> {
        unimplemented!("in progress")
    }
    async fn nack(&self, _claim: &Claim, _delay: Duration) -> Result<(), QueueError> {
        unimplemented!("in progress")
    }
    async fn progress(&self, _claim: &Claim) -> Result<(), QueueError> {
        unimplemented!("in progress")
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        unimplemented!("in progress")
    }
    async fn stats(&self) -> Result<QueueStats, QueueError> {
        unimplemented!("in progress")
    }
}
