//! Roundtable core: the pieces every peer-to-peer session is made of.
//!
//! - [`envelope`]: the one message type.
//! - [`log`]: the session log, the truth of a session.
//! - [`bus`], [`blackboard`], [`workqueue`]: the transport and shared state, as traits
//!   with in-process implementations ([`mem`]).
//! - [`model`]: the `ChatModel` trait, offline models and layers.
//! - [`team`]: team files, validated into plans before anything runs.
//! - [`protocol`], [`session`], [`termination`]: decisions as pure functions of the log.
//! - [`peer`], [`runner`]: peers as tasks, each with its own view of the log.
//! - [`human`]: people at the table: a human peer's seat, its answers and time limits.
//! - [`trust`]: what a peer takes from the wire and what it never does.
//! - [`similarity`]: answer similarity for emergent consensus.
//! - [`human`]: counts and money as people read them.
//! - [`eval`]: the evaluation harness (protocols against single-agent and
//!   sample-and-vote baselines).
//!
//! This crate knows nothing of NATS, SQLite, HTTP or the terminal: backends and
//! providers implement its traits in crates of their own.

pub mod blackboard;
pub mod bus;
pub mod chain;
pub mod envelope;
pub mod error;
pub mod eval;
pub mod human;
pub mod log;
pub mod mem;
pub mod model;
pub mod peer;
pub mod protocol;
pub mod readable;
pub mod runner;
pub mod session;
pub mod similarity;
pub mod sitting;
pub mod team;
pub mod telemetry;
pub mod termination;
pub mod tool;
pub mod trust;
pub mod workqueue;

pub use envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId, Usage};
pub use error::Error;
