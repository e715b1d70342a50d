//! Taking a human peer's seat, for `roundtable join` (a terminal) and `roundtable ui
//! --act` (the web view) alike: open the session's log, its seat leases and what its
//! peers share — locally through the SQLite store (answers go through its `submitted`
//! table, which the process running the session appends), or over NATS — then take the
//! seat with [`roundtable_core::sitting::Sitting`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use roundtable_core::bus::Backend;
use roundtable_core::human::SeatLease;
use roundtable_core::log::{LogStore, SessionLog};
use roundtable_core::peer::PeerExtras;
use roundtable_core::session::plan_of;
use roundtable_core::sitting::{SeatEvent, SitError, Sitting};
use roundtable_core::team::TeamPlan;
use roundtable_core::{PeerId, SessionId};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{Failure, factory, nats};

/// A seat taken: the sitting, what comes out of it, and whether answers are relayed by
/// the process that runs the session (a local session).
pub(crate) struct Taken {
    pub(crate) sitting: Sitting,
    pub(crate) events: UnboundedReceiver<SeatEvent>,
    pub(crate) relay: bool,
}

/// Take `me`'s seat of `session`, from the store in `dir` or the NATS server `remote`
/// names.
pub(crate) async fn take(
    dir: &Path,
    remote: &nats::NatsArgs,
    session: &SessionId,
    me: &PeerId,
) -> Result<Taken, Failure> {
    if let Err(why) = roundtable_core::envelope::check_session_id(session.as_str()) {
        return Err(Failure::Input(format!("session {:?}: {why}", session.as_str())));
    }
    // The log, the seat leases and what the peer shares with the others.
    let (log, seats, mut extras, relay): (Arc<dyn SessionLog>, Arc<dyn SeatLease>, PeerExtras, bool) = if remote
        .url()
        .is_some()
    {
        let backend = remote.connect(true).await?;
        let log = backend.logs().open(session, false).await?;
        let plan = task_plan(log.as_ref()).await?;
        let backend = backend.with_signers(crate::keys::signers(dir, &plan, std::slice::from_ref(me))?);
        let log = backend.logs().open(session, false).await?;
        let board = backend.blackboard(session).await.map_err(|e| Failure::Runtime(e.to_string()))?;
        let extras = PeerExtras { board: Some(board.clone()), ..PeerExtras::default() };
        (log, Arc::new(roundtable_core::human::BoardSeats(board)), extras, false)
    } else {
        let db = crate::db_path(dir);
        let store = crate::open_store(dir, false, roundtable_sqlite::Durability::Normal)?;
        let reader = roundtable_sqlite::SqliteReader::new(&db, Duration::from_millis(50)).open(session, false).await?;
        let log: Arc<dyn SessionLog> =
            Arc::new(roundtable_sqlite::SeatRelay { store: store.clone(), reader, poll: Duration::from_millis(50) });
        let seats = roundtable_sqlite::SqliteSeats { store, session: session.clone() };
        (log, Arc::new(seats), PeerExtras::default(), true)
    };
    let plan = Arc::new(task_plan(log.as_ref()).await?);
    if extras.secret.is_none() {
        let master = factory::local_secret(dir)?;
        extras.secret = Some(roundtable_core::runner::peer_secret(&master, me));
    }
    let (sitting, events) = Sitting::take(me.clone(), log, plan, seats, extras).await.map_err(|e| match e {
        SitError::Refused(w) => Failure::Input(w),
        SitError::Store(w) => Failure::Runtime(w),
    })?;
    Ok(Taken { sitting, events, relay })
}

/// The plan in a session's task (bad input when the session has none).
pub(crate) async fn task_plan(log: &dyn SessionLog) -> Result<TeamPlan, Failure> {
    let session = log.session().clone();
    let task = roundtable_core::session::read_task(log)
        .await?
        .ok_or_else(|| Failure::Input(format!("session {session} has no task envelope")))?;
    plan_of(&task.env).map_err(|e| Failure::Input(format!("session {session}: {e}")))
}

/// The web view's seats: taken as `join` takes them, from the same store or server.
pub(crate) struct WebSeats {
    pub(crate) dir: PathBuf,
    pub(crate) remote: nats::NatsArgs,
}

#[async_trait]
impl roundtable_observe::ui::SeatSource for WebSeats {
    async fn take(
        &self,
        session: &SessionId,
        peer: &PeerId,
    ) -> Result<(Sitting, UnboundedReceiver<SeatEvent>), SitError> {
        match take(&self.dir, &self.remote, session, peer).await {
            Ok(t) => Ok((t.sitting, t.events)),
            Err(Failure::Input(w)) => Err(SitError::Refused(w)),
            Err(Failure::Runtime(w)) => Err(SitError::Store(w)),
        }
    }
}
