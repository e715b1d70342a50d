//! Holding a human peer's seat: what every place a person sits from shares (the
//! terminal of `roundtable join`, the web view). [`Sitting::take`] checks the seat,
//! claims its lease ([`SeatLease`]) and keeps it renewed, runs the peer's usual loop
//! ([`run_peer_with`]) with a [`Seat`] as its model, brings the peer back after the
//! person was recorded absent, and numbers and posts the person's interjections. The
//! front end only shows what comes out ([`SeatEvent`]) and answers the questions.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::envelope::{Envelope, Kind, PeerId, Recipient, SessionId};
use crate::human::{Question, Seat, SeatError, SeatLease, interjection, is_interjection};
use crate::log::{Entry, SessionLog};
use crate::peer::{PeerConfig, PeerExtras, run_peer_with};
use crate::session::SessionState;
use crate::team::TeamPlan;

/// How long a seat's lease lasts without renewal (the holder renews it every second).
pub const LEASE: Duration = Duration::from_secs(5);

/// Why a seat could not be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SitError {
    /// Nothing to sit at: no such peer, a model's peer, a finished session, or someone
    /// else holds the seat. The text says which and what the choices are.
    Refused(String),
    /// The log or the lease store failed.
    Store(String),
}

impl std::fmt::Display for SitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SitError::Refused(w) | SitError::Store(w) => f.write_str(w),
        }
    }
}

/// What happens at a seat, in order.
#[derive(Debug)]
pub enum SeatEvent {
    /// An envelope on the log, every one from the first (a person who comes back
    /// catches up from the log).
    Entry(Entry),
    /// The protocol asks the person something; answer it with [`Question::answer`].
    Question(Question),
    /// The person did not answer in time and the duty was skipped: the question asked
    /// last is void. The person is still seated.
    Skipped,
    /// An interjection could not be appended.
    NotPosted(String),
    /// The session stopped.
    Over,
    /// The peer or the log failed; nothing more comes.
    Failed(String),
}

/// A seat held: dropping it (or [`Sitting::leave`]) gives it up.
pub struct Sitting {
    me: PeerId,
    session: SessionId,
    log: Arc<dyn SessionLog>,
    plan: Arc<TeamPlan>,
    seats: Arc<dyn SeatLease>,
    holder: String,
    /// The person's interjections on the log (a seat taken again starts from there)
    /// and those posted in this sitting: their steps number them.
    said_logged: Arc<AtomicU32>,
    said_posted: Mutex<u32>,
    round: Arc<AtomicU32>,
    outbox: mpsc::UnboundedSender<Envelope>,
    stop: Option<oneshot::Sender<()>>,
    driver: Option<JoinHandle<()>>,
    renew: JoinHandle<()>,
    posting: JoinHandle<()>,
}

/// The peers' ids of a plan, for messages that list the choices.
fn names(ids: impl Iterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = ids.map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() { "none".to_string() } else { v.join(", ") }
}

impl Sitting {
    /// Take `me`'s seat of the session on `log` (whose task holds `plan`): refused when
    /// the plan has no such human peer, the session is finished, or another holder's
    /// lease is live. `extras` are what the peer shares with the others (its secret for
    /// sealed votes, the blackboard); the plan is set here.
    pub async fn take(
        me: PeerId,
        log: Arc<dyn SessionLog>,
        plan: Arc<TeamPlan>,
        seats: Arc<dyn SeatLease>,
        mut extras: PeerExtras,
    ) -> Result<(Sitting, mpsc::UnboundedReceiver<SeatEvent>), SitError> {
        let session = log.session().clone();
        let humans = names(plan.peers.iter().filter(|p| p.is_human()).map(|p| p.id.as_str()));
        let Some(spec) = plan.peer(&me) else {
            return Err(SitError::Refused(format!(
                "session {session} has no peer {me:?}; its human seats are: {humans}"
            )));
        };
        if !spec.is_human() {
            return Err(SitError::Refused(format!(
                "peer {me} of session {session} is a model peer, not a seat for a person (kind = \"human\"); its human seats are: {humans}"
            )));
        }
        let entries = log.read_all().await.map_err(|e| SitError::Store(e.to_string()))?;
        let mut st = SessionState::for_peer(plan.clone(), session.clone(), &me);
        for e in &entries {
            st.apply(e);
        }
        if st.is_stopped() {
            let reason =
                st.stop.as_ref().and_then(|s| s.env.body.json.as_ref()?.get("reason")?.as_str().map(String::from));
            return Err(SitError::Refused(format!(
                "session {session} is finished ({}); there is nothing left to answer (see `roundtable log {session}`)",
                reason.unwrap_or_default()
            )));
        }
        let holder = hex::encode(rand::random::<[u8; 8]>());
        seats.claim(&me, &holder, LEASE).await.map_err(|e| match e {
            SeatError::Taken(w) => SitError::Refused(w),
            SeatError::Store(w) => SitError::Store(w),
        })?;
        extras.plan = Some(plan.clone());

        let (events, rx) = mpsc::unbounded_channel();
        // Keep the lease while seated.
        let renew = tokio::spawn({
            let (seats, me, holder) = (seats.clone(), me.clone(), holder.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Err(e) = seats.claim(&me, &holder, LEASE).await {
                        tracing::warn!(error = %e, "renewing the seat's lease failed");
                    }
                }
            }
        });
        // Interjections are appended one after another, in the order posted.
        let (outbox, mut outgoing) = mpsc::unbounded_channel::<Envelope>();
        let posting = tokio::spawn({
            let (log, events) = (log.clone(), events.clone());
            async move {
                while let Some(env) = outgoing.recv().await {
                    if let Err(e) = log.append(env).await {
                        let _ = events.send(SeatEvent::NotPosted(format!("your message could not be posted: {e}")));
                    }
                }
            }
        });
        let said_logged = Arc::new(AtomicU32::new(0));
        let round = Arc::new(AtomicU32::new(0));
        let (stop, stopped) = oneshot::channel();
        let driver =
            tokio::spawn(drive(me.clone(), log.clone(), extras, events, stopped, said_logged.clone(), round.clone()));
        let sitting = Sitting {
            me,
            session,
            log,
            plan,
            seats,
            holder,
            said_logged,
            said_posted: Mutex::new(0),
            round,
            outbox,
            stop: Some(stop),
            driver: Some(driver),
            renew,
            posting,
        };
        Ok((sitting, rx))
    }

    /// The session's log, as the seat reads and writes it.
    pub fn log(&self) -> &Arc<dyn SessionLog> {
        &self.log
    }

    pub fn peer(&self) -> &PeerId {
        &self.me
    }

    pub fn plan(&self) -> &Arc<TeamPlan> {
        &self.plan
    }

    /// Post an interjection to everyone or to one peer; refused (with the reason) when
    /// the text is empty or too long or the peer is unknown.
    pub fn say(&self, to: Recipient, text: &str) -> Result<(), String> {
        if let Recipient::Peer(p) = &to
            && self.plan.peer(p).is_none()
        {
            return Err(format!(
                "no peer {:?}; the peers are {}",
                p.as_str(),
                names(self.plan.peers.iter().map(|p| p.id.as_str()))
            ));
        }
        let mut posted = self.said_posted.lock().expect("interjection count");
        let n = self.said_logged.load(Ordering::SeqCst).max(*posted);
        let env = interjection(&self.session, &self.me, n, to, text, self.round.load(Ordering::SeqCst))?;
        // Counted now, so a second one posted before the first is back gets the next step.
        *posted = n + 1;
        self.outbox.send(env).map_err(|_| "the seat was left".to_string())
    }

    /// Leave: the peer stops before its question goes (so leaving records nothing),
    /// then the lease is given up.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(driver) = self.driver.take() {
            let _ = driver.await;
        }
        self.renew.abort();
        self.seats.release(&self.me, &self.holder).await;
    }
}

impl Drop for Sitting {
    fn drop(&mut self) {
        // The driver sees its stop signal dropped and stops the peer itself.
        self.renew.abort();
        self.posting.abort();
    }
}

/// Aborts a task when dropped (a driver cut off takes its peer with it).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The peer's loop, with the person as its model; a fresh one after the person was
/// recorded absent (it folds the log and comes back).
fn spawn_peer(
    me: &PeerId,
    log: &Arc<dyn SessionLog>,
    extras: &PeerExtras,
) -> (AbortOnDrop<Result<(), String>>, mpsc::UnboundedReceiver<Question>) {
    let (seat, asks) = Seat::new();
    let cfg = PeerConfig { me: me.clone(), log: log.clone(), model: Arc::new(seat), presence: None, events: None };
    let extras = extras.clone();
    let task = tokio::spawn(async move { run_peer_with(cfg, extras).await.map(|_| ()).map_err(|e| e.to_string()) });
    (AbortOnDrop(task), asks)
}

async fn stop_peer(peer: &mut AbortOnDrop<Result<(), String>>, done: bool) {
    peer.0.abort();
    if !done {
        let _ = (&mut peer.0).await;
    }
}

async fn drive(
    me: PeerId,
    log: Arc<dyn SessionLog>,
    extras: PeerExtras,
    events: mpsc::UnboundedSender<SeatEvent>,
    mut stopped: oneshot::Receiver<()>,
    said_logged: Arc<AtomicU32>,
    round: Arc<AtomicU32>,
) {
    let mut tail = match log.tail(1).await {
        Ok(t) => t,
        Err(e) => {
            let _ = events.send(SeatEvent::Failed(e.to_string()));
            return;
        }
    };
    let (mut peer, mut asks) = spawn_peer(&me, &log, &extras);
    let (mut peer_done, mut asks_open) = (false, true);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            ended = &mut peer.0, if !peer_done => {
                peer_done = true;
                let failed = match ended {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) if e.is_cancelled() => None,
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    let _ = events.send(SeatEvent::Failed(format!("seat {me}: {e}")));
                    break;
                }
            }
            next = tail.next() => {
                let e = match next {
                    None => break,
                    Some(Err(e)) => {
                        let _ = events.send(SeatEvent::Failed(e.to_string()));
                        break;
                    }
                    Some(Ok(e)) => e,
                };
                round.fetch_max(e.env.round, Ordering::SeqCst);
                if e.env.from == me && is_interjection(&e.env) {
                    said_logged.fetch_add(1, Ordering::SeqCst);
                }
                let kind = e.env.kind;
                let me_absent = kind == Kind::Absent
                    && e.env.body.json.as_ref().and_then(|j| j.get("peer")?.as_str()) == Some(me.as_str());
                let _ = events.send(SeatEvent::Entry(e));
                if kind == Kind::Stop {
                    let _ = events.send(SeatEvent::Over);
                    break;
                }
                if me_absent {
                    // The duty was skipped: the question goes, and the peer comes back
                    // (a fresh loop folds the log, sees itself absent and records `join`).
                    stop_peer(&mut peer, peer_done).await;
                    let _ = events.send(SeatEvent::Skipped);
                    (peer, asks) = spawn_peer(&me, &log, &extras);
                    (peer_done, asks_open) = (false, true);
                }
            }
            q = asks.recv(), if asks_open => match q {
                Some(q) => { let _ = events.send(SeatEvent::Question(q)); }
                None => asks_open = false,
            },
        }
    }
    // Stop the peer before the question it waits on goes, so that leaving records nothing.
    stop_peer(&mut peer, peer_done).await;
}
