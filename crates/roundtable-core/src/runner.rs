//! Starting a session's peers and waiting for the session to close.
//!
//! The runner decides nothing: it posts the task (when starting a new session), spawns
//! one task per peer, and waits until every peer has seen the stop envelope. A peer
//! still inside a model call that does not return is cut off shortly after the first
//! peer saw the stop: the session is over, and nothing it could add would count. Whether a
//! session goes on, and how it ends, is decided by the peers from the log.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::Presence;
use crate::envelope::{PeerId, SessionId};
use crate::log::{LogError, LogErrorKind, SessionLog};
use crate::model::ChatModel;
use crate::peer::fold::SharedFold;
use crate::peer::{EventSink, PeerConfig, PeerExtras, run_peer_with};
use crate::session::{SessionSummary, task_envelope};
use crate::team::TeamPlan;

/// Post the opening task of a new session.
pub async fn open_session(log: &dyn SessionLog, plan: &TeamPlan, topic: &str) -> Result<(), LogError> {
    let mut task = task_envelope(log.session(), plan, topic);
    // The current span (the session's, when tracing is on) becomes the parent of every
    // peer's turn spans, in whatever process the peers run.
    task.trace = crate::telemetry::traceparent(&tracing::Span::current());
    log.append(task).await?;
    Ok(())
}

/// Run the given peers of a session (all of them, or the ones of this process) until
/// the session stops, and summarize the log.
pub async fn run_peers(
    log: Arc<dyn SessionLog>,
    plan: &TeamPlan,
    models: HashMap<PeerId, Arc<dyn ChatModel>>,
    presence: Option<Arc<dyn Presence>>,
    events: Option<EventSink>,
) -> Result<SessionSummary, LogError> {
    run_peers_with(log, plan, models, presence, events, PeerExtras::default()).await
}

/// [`run_peers`] with a blackboard, a work queue, an embedder and a secret for the
/// peers (see [`PeerExtras`]). The secret given is a master secret: each peer seals
/// with its own, derived from it and the peer's id.
pub async fn run_peers_with(
    log: Arc<dyn SessionLog>,
    plan: &TeamPlan,
    models: HashMap<PeerId, Arc<dyn ChatModel>>,
    presence: Option<Arc<dyn Presence>>,
    events: Option<EventSink>,
    extras: PeerExtras,
) -> Result<SessionSummary, LogError> {
    let mut tasks = tokio::task::JoinSet::new();
    let shared = extras.plan.clone().unwrap_or_else(|| Arc::new(plan.clone()));
    let history = extras.history.clone().unwrap_or_default();
    // One fold of the log for every peer of this process (when the protocol suits it).
    let fold = extras
        .fold
        .clone()
        .or_else(|| SharedFold::suits(plan).then(|| SharedFold::new(log.clone(), shared.clone(), history.clone())));
    for p in &plan.peers {
        let Some(model) = models.get(&p.id) else {
            continue;
        };
        let mut mine = extras.clone();
        mine.plan = Some(shared.clone());
        mine.history = Some(history.clone());
        mine.fold = fold.clone();
        mine.secret = extras.secret.as_ref().map(|s| peer_secret(s, &p.id));
        let cfg = PeerConfig {
            me: p.id.clone(),
            log: log.clone(),
            model: model.clone(),
            presence: presence.clone(),
            events: events.clone(),
        };
        tasks.spawn(async move { (cfg.me.clone(), run_peer_with(cfg, mine).await) });
    }
    let mut first_error = None;
    // Once one peer has seen the stop, the others see it as soon as they read the log,
    // unless they are stuck in a model call that does not return: those are cut off
    // after a grace period (the session is over; nothing they say would count).
    let grace = std::time::Duration::from_millis(plan.presence.heartbeat_ms.max(100) * 2);
    let mut stopped = false;
    loop {
        let joined = if stopped {
            match tokio::time::timeout(grace, tasks.join_next()).await {
                Ok(j) => j,
                Err(_) => {
                    tracing::warn!(peers = tasks.len(), "peers still busy after the stop; cutting them off");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        } else {
            tasks.join_next().await
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok((_, Ok(_))) => stopped = true,
            Ok((peer, Err(e))) => {
                tracing::error!(%peer, error = %e, "peer stopped with an error");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(LogError::new(LogErrorKind::Storage, format!("a peer task panicked: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    summarize(log.as_ref()).await
}

/// A peer's own secret, derived from a master secret.
pub fn peer_secret(master: &[u8], peer: &PeerId) -> Arc<[u8]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"roundtable-peer-secret");
    h.update(master);
    h.update([0]);
    h.update(peer.as_str().as_bytes());
    Arc::from(h.finalize().to_vec())
}

/// Summarize a session from its log.
pub async fn summarize(log: &dyn SessionLog) -> Result<SessionSummary, LogError> {
    let entries = log.read_all().await?;
    SessionSummary::from_entries(log.session(), &entries).map_err(|e| LogError::new(LogErrorKind::Corrupt, e))
}

/// Convenience for tests and embedding: a new in-memory session, run to the end.
pub async fn run_in_memory(
    plan: &TeamPlan,
    topic: &str,
    models: HashMap<PeerId, Arc<dyn ChatModel>>,
) -> Result<(Arc<dyn SessionLog>, SessionSummary), LogError> {
    let session = crate::session::new_session_id();
    let log: Arc<dyn SessionLog> =
        Arc::new(crate::log::SharedMemLog(Arc::new(crate::log::MemLog::new(SessionId::clone(&session)))));
    open_session(log.as_ref(), plan, topic).await?;
    let summary = run_peers(log.clone(), plan, models, None, None).await?;
    Ok((log, summary))
}
