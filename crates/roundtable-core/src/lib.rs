//! Roundtable core: the pieces every peer-to-peer session is made of.
//!
//! - [`envelope`]: the one message type.
//! - [`log`]: the session log, the truth of a session.
//! - [`bus`], [`blackboard`], [`workqueue`]: the transport and shared state, as traits
//!   with in-process implementations ([`mem`]).
//! - [`model`]: the `ChatModel` trait, offline models and layers.
//!
//! This crate knows nothing of NATS, SQLite, HTTP or the terminal: backends and
//! providers implement its traits in crates of their own.

pub mod blackboard;
pub mod bus;
pub mod envelope;
pub mod error;
pub mod log;
pub mod mem;
pub mod model;
pub mod workqueue;

pub use envelope::{Body, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId, Usage};
pub use error::Error;
