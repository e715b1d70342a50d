//! One test suite for every backend: the trait-level behaviour of [`SessionLog`],
//! [`LogStore`], [`Blackboard`], [`WorkQueue`] and [`Presence`] that the core's module
//! docs promise, checked the same way against the in-process parts, SQLite, NATS, …
//!
//! # Two ways in
//! - **Checks** are `pub async fn`s taking trait objects, in [`log`], [`board`],
//!   [`queue`], [`presence`] and [`backend`]; those in [`pair`] take two connections to
//!   one store (a fixture's [`Fixture::other_backend`]), as two processes would have. Each one panics with a message naming the
//!   broken promise. Give each check a fresh, empty instance (a new session). Queue
//!   checks need the [`QueueConfig`] their docs name (the constants in [`queue`]).
//! - **[`backend_tests!`]** turns a [`Backend`] into one `#[test]` per check:
//!
//!   ```no_run
//!   roundtable_conformance::backend_tests!(async { roundtable_core::bus::MemBackend::default() });
//!   ```
//!
//!   The expression is a future yielding a [`Fixture`] (any `Backend + Clone`, or a type
//!   that also keeps a server alive). Each test builds a two-worker runtime, makes a
//!   fixture, opens the parts of a fresh session and runs one check; dropping the
//!   fixture afterwards is the place to stop a server.
//!
//! # Time
//! The checks run in real time, because a remote backend cannot pause it. None of them
//! depends on how long an operation takes: lease checks wait for an expected event under
//! a generous deadline ([`DEADLINE`]), and the few that need something *not* to happen
//! for a while (a lease kept alive by progress, a nack's delay) leave margins of half a
//! second or more.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use roundtable_core::blackboard::Blackboard;
use roundtable_core::bus::{Backend, Presence};
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::SessionLog;
use roundtable_core::workqueue::{QueueConfig, WorkQueue};

pub mod backend;
pub mod board;
pub mod log;
pub mod pair;
pub mod presence;
pub mod queue;

/// How long a check waits for something that must happen before it calls it a failure.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// What a conformance test runs against: a backend, and whatever must stay alive while
/// it is used (a server process, a temporary directory).
pub trait Fixture: Send + 'static {
    fn backend(&self) -> Arc<dyn Backend>;
    /// Another connection to the same store, as a second process would open it (for the
    /// [`pair`] checks); the same backend by default.
    fn other_backend(&self) -> Arc<dyn Backend> {
        self.backend()
    }
}

impl<B: Backend + Clone> Fixture for B {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }
}

/// A session id that no other check (in this process or another) uses: lowercase
/// letters, digits and `-`, so that every backend accepts it as a name.
pub fn fresh_session(tag: &str) -> SessionId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tag: String =
        tag.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    SessionId::from(format!("{tag}-{}-{n}-{nanos:x}", std::process::id()))
}

/// A message envelope from `peer` at `step`.
pub fn envelope(session: &SessionId, peer: &str, step: &str) -> Envelope {
    Envelope::new(session, &PeerId::from(peer), step, Kind::Message, Recipient::All, Body::text(step))
}

/// Await `fut`, or panic saying `what` did not happen within [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

/// Await a spawned task, passing its panic on with its own message.
pub async fn join<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match handle.await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("task did not finish: {e}"),
    }
}

/// Calls `$cb!` with the table of every check: its part and its name. The single list
/// that [`backend_tests!`], [`CHECKS`] and [`run_on_backend`] are made from.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_checks {
    ([$($cb:tt)*] ( $($args:tt)* )) => {
        $($cb)*! { ($($args)*)
            (log): log_total_order, log_append_idempotent, log_read_from, log_tail_replays_then_follows,
                log_concurrent_appenders, log_session_mismatch_rejected, log_seq_of;
            (store): store_open_and_list;
            (board): board_create_if_absent, board_revisions_grow_across_keys, board_cas_race,
                board_cas_counter, board_delete_and_recreate, board_watch_history_then_live,
                board_watch_same_key_in_order, board_invalid_keys_rejected, board_matches_model;
            (queue LONG_LEASE): queue_push_idempotent, queue_claim_order, queue_exclusive_claims,
                queue_nack_with_delay, queue_stats;
            (queue SHORT_LEASE): queue_redelivery_after_lease_expiry, queue_dead_letter_after_max_deliver;
            (queue PROGRESS_LEASE): queue_progress_extends_lease;
            (presence): presence_tracks_peers;
            (backend): backend_sessions_are_isolated;
            (pair): pair_log_one_sequence, pair_board_cas_race, pair_queue_exclusive_claims;
        }
    };
}

/// One `#[test]` per check against the fixture that `$make` (a future) yields; see the
/// crate docs.
#[macro_export]
macro_rules! backend_tests {
    ($make:expr) => {
        $crate::__with_checks!([$crate::__backend_tests]($make));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __backend_tests {
    (($make:expr) $($part:tt : $($name:ident),+ ;)*) => {
        $($(
            #[test]
            fn $name() {
                $crate::run_check(stringify!($name), || $make);
            }
        )+)*
    };
}

macro_rules! check_table {
    (() $($part:tt : $($name:ident),+ ;)*) => {
        /// The name of every check, in the order of the table.
        pub const CHECKS: &[&str] = &[$($(stringify!($name)),+),*];

        /// Run the check named `name` on the parts of a fresh session of `backend`.
        pub async fn run_on_backend(name: &str, backend: Arc<dyn Backend>) {
            run_on_backends(name, backend.clone(), backend).await
        }

        /// [`run_on_backend`], with `other` as the second connection of the [`pair`]
        /// checks.
        pub async fn run_on_backends(name: &str, backend: Arc<dyn Backend>, other: Arc<dyn Backend>) {
            let session = fresh_session(name);
            match name {
                $($(stringify!($name) => run_part!($part, $name, backend, other, session),)+)*
                _ => panic!("no conformance check named {name:?}; the checks are {CHECKS:?}"),
            }
        }
    };
}

macro_rules! run_part {
    ((pair), $name:ident, $backend:ident, $other:ident, $session:ident) => {
        pair::$name($backend, $other, $session).await
    };
    ($part:tt, $name:ident, $backend:ident, $other:ident, $session:ident) => {{
        drop($other);
        run_part!($part, $name, $backend, $session)
    }};
    ((log), $name:ident, $backend:ident, $session:ident) => {
        log::$name(open_log(&*$backend, &$session).await).await
    };
    ((store), $name:ident, $backend:ident, $session:ident) => {
        log::$name($backend.logs()).await
    };
    ((board), $name:ident, $backend:ident, $session:ident) => {
        board::$name(open_board(&*$backend, &$session).await).await
    };
    ((queue $cfg:ident), $name:ident, $backend:ident, $session:ident) => {
        queue::$name(open_queue(&*$backend, &$session, queue::$cfg).await).await
    };
    ((presence), $name:ident, $backend:ident, $session:ident) => {
        presence::$name(open_presence(&*$backend, &$session).await).await
    };
    ((backend), $name:ident, $backend:ident, $session:ident) => {
        backend::$name($backend).await
    };
}

__with_checks!([check_table]());

/// Run one check in a fresh two-worker runtime against the fixture `make` yields (what
/// each test of [`backend_tests!`] does).
pub fn run_check<F, S>(name: &str, make: impl FnOnce() -> F)
where
    F: Future<Output = S>,
    S: Fixture,
{
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let fixture = make().await;
        run_on_backends(name, fixture.backend(), fixture.other_backend()).await;
        drop(fixture);
    });
}

pub(crate) async fn open_log(backend: &dyn Backend, session: &SessionId) -> Arc<dyn SessionLog> {
    let log = backend.logs().open(session, true).await;
    log.unwrap_or_else(|e| panic!("{} backend: opening the log of {session}: {e}", backend.name()))
}

pub(crate) async fn open_board(backend: &dyn Backend, session: &SessionId) -> Arc<dyn Blackboard> {
    let board = backend.blackboard(session).await;
    board.unwrap_or_else(|e| panic!("{} backend: opening the blackboard of {session}: {e}", backend.name()))
}

pub(crate) async fn open_queue(backend: &dyn Backend, session: &SessionId, config: QueueConfig) -> Arc<dyn WorkQueue> {
    let queue = backend.work_queue(session, config).await;
    queue.unwrap_or_else(|e| panic!("{} backend: opening the work queue of {session}: {e}", backend.name()))
}

pub(crate) async fn open_presence(backend: &dyn Backend, session: &SessionId) -> Arc<dyn Presence> {
    let presence = backend.presence(session).await;
    presence.unwrap_or_else(|e| panic!("{} backend: opening presence of {session}: {e}", backend.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_sessions_are_distinct_and_plain() {
        let a = fresh_session("Log_total order");
        let b = fresh_session("Log_total order");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("log-total-order-"), "{a}");
        assert!(a.as_str().bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'), "{a}");
    }

    #[test]
    fn every_check_has_a_distinct_name() {
        let mut names = CHECKS.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
    }
}
