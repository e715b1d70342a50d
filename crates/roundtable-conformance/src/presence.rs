//! Checks of [`Presence`]: heartbeats and the time since each peer's last one.
//!
//! Each check takes the presence of a fresh session.

use std::sync::Arc;
use std::time::Duration;

use roundtable_core::bus::Presence;
use roundtable_core::envelope::PeerId;

/// Peers are heard from once they beat, with the age of their last beat; a new beat
/// makes a peer's age younger than that of a peer that beat before it.
pub async fn presence_tracks_peers(presence: Arc<dyn Presence>) {
    let (a, b) = (PeerId::from("alice"), PeerId::from("bob"));
    let seen = presence.last_seen().await.expect("last_seen");
    assert!(seen.is_empty(), "nobody has beaten in a new session: {seen:?}");
    // A handle that has just connected holds ages down until it could hear everyone.
    tokio::time::sleep(presence.settling()).await;
    presence.beat(&a).await.expect("beat");
    tokio::time::sleep(Duration::from_millis(20)).await;
    presence.beat(&b).await.expect("beat");
    let seen = presence.last_seen().await.expect("last_seen");
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (age_a, age_b) = (seen[&a], seen[&b]);
    // At least the 20 ms slept between the beats apart (a millisecond clock may round
    // each down): ages that are all zero, or read at the wrong time, fail this.
    let apart = Duration::from_millis(18);
    assert!(age_a >= age_b + apart, "bob beat 20 ms after alice, so his last beat is younger: {seen:?}");
    assert!(age_a >= apart && age_a < Duration::from_secs(60), "alice beat just now: {seen:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    presence.beat(&a).await.expect("beat");
    let seen = presence.last_seen().await.expect("last_seen");
    assert!(seen[&b] >= seen[&a] + apart, "alice beat again, 20 ms after bob: {seen:?}");
}
