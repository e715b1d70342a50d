//! Faults a shared server exposes peers to: messages nobody should have sent on a
//! session's subjects, and a server that stops and comes back.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use roundtable_core::bus::Backend;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::Appended;
use roundtable_core::session::{STOP_STEP, TASK_STEP, USER};
use roundtable_nats::testing::NatsServer;
use roundtable_nats::{NatsBackend, REJECTED_FROM, log_subject, token};

fn env(s: &SessionId, peer: &str, step: &str) -> Envelope {
    Envelope::new(s, &PeerId::from(peer), step, Kind::Message, Recipient::All, Body::text(step))
}

async fn publish(backend: &NatsBackend, subject: String, payload: Vec<u8>) {
    backend.jetstream().publish(subject, payload.into()).await.expect("publish").await.expect("stored by the stream");
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut).await.unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_nobody_should_have_sent_are_rejected_in_place() {
    // A server that accepts payloads larger than an envelope may be, so that an
    // oversized message can reach the stream at all.
    let conf = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(conf.path(), "max_payload: 4194304\n").expect("write config");
    let server = NatsServer::start_with(&["-c", conf.path().to_str().expect("utf-8 path")]);
    let backend = NatsBackend::connect(&server.url()).await.expect("connect");
    let s = SessionId::from("garbage");
    let log = backend.logs().open(&s, true).await.expect("open");
    let prefix = format!("rt.{}.log.", token(s.as_str()));

    assert_eq!(log.append(env(&s, "pm", "turn/1")).await.unwrap().seq, 1);
    // 2: not JSON.
    publish(&backend, format!("{prefix}junk"), b"\x00\x01 not json".to_vec()).await;
    // 3: a newer wire version, on its own subject.
    let v2 = env(&s, "pm", "turn/v2");
    let v2_json = v2.to_json().replacen("\"v\":1", "\"v\":2", 1);
    publish(&backend, log_subject(&v2), v2_json.into_bytes()).await;
    // 4: oversized (2 MiB of JSON).
    let mut big = env(&s, "pm", "turn/big");
    big.body = Body::text("x".repeat(2 << 20));
    publish(&backend, log_subject(&big), big.to_json().into_bytes()).await;
    // 5: an envelope of another session.
    let other = env(&SessionId::from("other"), "pm", "turn/1");
    publish(&backend, format!("{prefix}pm.{}", token(other.id.as_str())), other.to_json().into_bytes()).await;
    // 6: a good envelope on a subject that is not its id's (a second copy would break
    // the one-append-per-id rule).
    let misfiled = env(&s, "eng", "turn/2");
    publish(&backend, format!("{prefix}elsewhere"), misfiled.to_json().into_bytes()).await;
    // 7: the session goes on.
    assert_eq!(log.append(env(&s, "cfo", "turn/3")).await.unwrap().seq, 7);

    let all = log.read_all().await.expect("read");
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    let reasons: Vec<String> = all[1..6]
        .iter()
        .map(|e| {
            assert_eq!((e.env.kind, e.env.from.as_str()), (Kind::Failure, REJECTED_FROM), "{:?}", e.env);
            assert_eq!(&*e.env.step, format!("rejected/{}", e.seq));
            let j = e.env.body.json.as_ref().expect("json");
            assert_eq!(j["op"], "rejected");
            assert_eq!(j["seq"], e.seq);
            j["reason"].as_str().expect("reason").to_owned()
        })
        .collect();
    for (reason, expected) in reasons.iter().zip([
        "malformed envelope",
        "version 2",
        "over the",
        "of session other",
        "not on its own subject",
    ]) {
        assert!(reason.contains(expected), "{reason:?} should say {expected:?}");
    }
    assert_eq!(&*all[6].env.step, "turn/3");

    // Every reader reads the same rejections: a tail, a short read, another connection.
    let mut tail = log.tail(1).await.expect("tail");
    for e in &all {
        let t = within("tail", tail.next()).await.expect("entry").expect("ok");
        assert_eq!((t.seq, t.env.to_json()), (e.seq, e.env.to_json()));
    }
    let short = log.read(2, 3).await.expect("short read");
    assert_eq!(
        short.iter().map(|e| e.env.to_json()).collect::<Vec<_>>(),
        all[1..4].iter().map(|e| e.env.to_json()).collect::<Vec<_>>()
    );
    let elsewhere = NatsBackend::connect(&server.url()).await.expect("connect");
    let again = elsewhere.logs().open(&s, false).await.expect("open").read_all().await.expect("read");
    assert_eq!(
        again.iter().map(|e| e.env.to_json()).collect::<Vec<_>>(),
        all.iter().map(|e| e.env.to_json()).collect::<Vec<_>>()
    );

    // The misfiled copy does not count as the envelope: its real append still lands, once.
    assert_eq!(log.seq_of(&misfiled.id).await.unwrap(), None);
    let placed = log.append(misfiled.clone()).await.unwrap();
    assert_eq!((placed.seq, placed.duplicate), (8, false));
    assert_eq!(log.append(misfiled).await.unwrap().seq, 8);

    // Junk on the subject an envelope will need: the envelope takes its next subject,
    // once, and is found there.
    let later = env(&s, "pm", "turn/4");
    publish(&backend, log_subject(&later), b"squatter".to_vec()).await;
    let placed = log.append(later.clone()).await.unwrap();
    assert_eq!((placed.seq, placed.duplicate), (10, false));
    assert_eq!(log.append(later.clone()).await.unwrap(), Appended { seq: 10, duplicate: true });
    assert_eq!(log.seq_of(&later.id).await.unwrap(), Some(10));
    let m = backend.jetstream().get_stream(format!("RT_{}", token(s.as_str()))).await.unwrap();
    let stored = m.get_raw_message(10).await.unwrap();
    assert_eq!(stored.subject.as_str(), format!("{}-1", log_subject(&later)));
    // Every subject of an id taken by junk, the last one twice: the envelope goes after
    // the junk on the last subject, once, and is found there.
    let squatted = env(&s, "pm", "turn/5");
    for k in 0..9 {
        let suffix = if k == 0 { String::new() } else { format!("-{}", k.min(7)) };
        publish(&backend, format!("{}{suffix}", log_subject(&squatted)), b"squatter".to_vec()).await;
    }
    let placed = log.append(squatted.clone()).await.unwrap();
    assert_eq!((placed.seq, placed.duplicate), (20, false));
    assert_eq!(log.append(squatted.clone()).await.unwrap(), Appended { seq: 20, duplicate: true });
    assert_eq!(log.seq_of(&squatted.id).await.unwrap(), Some(20));
    assert_eq!(m.get_raw_message(20).await.unwrap().subject.as_str(), format!("{}-7", log_subject(&squatted)));
    let rejected = log.read(11, 9).await.unwrap();
    assert!(rejected.iter().all(|e| e.env.from.as_str() == REJECTED_FROM), "{rejected:?}");

    let sessions = backend.logs().sessions().await.expect("sessions");
    let info = sessions.iter().find(|i| i.id == s).expect("listed");
    assert_eq!(info.envelopes, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_find_the_task_and_the_stop_wherever_they_are() {
    let server = NatsServer::start();
    let backend = NatsBackend::connect(&server.url()).await.expect("connect");
    let s = SessionId::from("listed");
    let log = backend.logs().open(&s, true).await.expect("open");
    let mut task = Envelope::new(&s, &PeerId::from(USER), TASK_STEP, Kind::Task, Recipient::All, Body::text("t"));
    task.body.json = Some(serde_json::json!({ "team_name": "crew" }));
    log.append(task).await.unwrap();
    log.append(env(&s, "a", "turn/1")).await.unwrap();
    let mut stop = Envelope::new(&s, &PeerId::from("b"), STOP_STEP, Kind::Stop, Recipient::All, Body::text("done"));
    stop.id = roundtable_core::envelope::EnvelopeId::derive(&s, &PeerId::from("*"), STOP_STEP);
    stop.body.json = Some(serde_json::json!({ "reason": "max rounds" }));
    log.append(stop).await.unwrap();
    // Something after the stop (a late absence notice) must not hide it.
    log.append(env(&s, "a", "absent/b/0")).await.unwrap();
    let info = backend.logs().sessions().await.expect("sessions").into_iter().find(|i| i.id == s).expect("listed");
    assert_eq!(info.team.as_deref(), Some("crew"));
    assert_eq!(info.stop.as_deref(), Some("max rounds"));
    assert_eq!(info.envelopes, 4);
    assert!(info.first_ms > 0 && info.last_ms >= info.first_ms, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_backend_waits_out_a_server_restart() {
    let mut server = NatsServer::start();
    let backend = NatsBackend::connect(&server.url()).await.expect("connect").patient();
    let s = SessionId::from("restart");
    let log = backend.logs().open(&s, true).await.expect("open");
    let presence = backend.presence(&s).await.expect("presence");
    presence.beat(&PeerId::from("a")).await.expect("beat");
    for i in 1..=3 {
        log.append(env(&s, "a", &format!("turn/{i}"))).await.expect("append");
    }
    let mut tail = log.tail(1).await.expect("tail");
    for seq in 1..=3 {
        assert_eq!(within("tail", tail.next()).await.expect("entry").expect("ok").seq, seq);
    }

    server.stop();
    // Appends made while the server is away wait for it instead of failing.
    let writer = {
        let log = log.clone();
        let s = s.clone();
        tokio::spawn(async move { log.append(env(&s, "b", "turn/4")).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = SystemTime::now();
    server.start_again();
    let appended = within("the append made during the outage", writer).await.expect("join").expect("append");
    assert_eq!(appended.seq, 4);
    log.append(env(&s, "a", "turn/5")).await.expect("append after the restart");

    // The tail goes on where it was: nothing lost, nothing twice.
    for seq in 4..=5 {
        let e = within("tail after the restart", tail.next()).await.expect("entry").expect("ok");
        assert_eq!(e.seq, seq);
    }
    // Nothing acknowledged before the stop is lost.
    let steps: Vec<String> = log.read_all().await.expect("read").iter().map(|e| e.env.step.to_string()).collect();
    assert_eq!(steps, ["turn/1", "turn/2", "turn/3", "turn/4", "turn/5"]);

    // No peer could beat while the server was away: a's age counts from this process's
    // reconnection, which came after the restart.
    let age = presence.last_seen().await.expect("last seen")[&PeerId::from("a")];
    let since_restart = restarted.elapsed().expect("clock");
    assert!(age <= since_restart, "age {age:?} counts from before the reconnection ({since_restart:?} ago)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_sees_every_peer_while_they_all_beat() {
    // nats-server 2.9 can skip keys of a bucket whose last message is replaced while a
    // last-per-subject consumer starts: presence must not read it that way.
    let server = NatsServer::start();
    let backend = NatsBackend::connect(&server.url()).await.expect("connect");
    let presence = backend.presence(&SessionId::from("crowd")).await.expect("presence");
    let peers: Vec<PeerId> = (0..20).map(|i| PeerId::from(format!("w{i:02}"))).collect();
    for p in &peers {
        presence.beat(p).await.expect("beat");
    }
    let beating = {
        let (presence, peers) = (presence.clone(), peers.clone());
        tokio::spawn(async move {
            loop {
                for p in &peers {
                    let _ = presence.beat(p).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for read in 0..200 {
        let seen = presence.last_seen().await.expect("last seen");
        assert_eq!(seen.len(), peers.len(), "read {read}: {:?}", seen.keys().collect::<Vec<_>>());
    }
    beating.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_name_the_author_and_a_stream_of_the_old_layout_keeps_its_own() {
    let server = NatsServer::start();
    let backend = NatsBackend::connect(&server.url()).await.expect("connect");
    let js = backend.jetstream();

    // A new session: an envelope goes on its author's subject, a collective decision on
    // the shared one, and an envelope on another author's subject is rejected.
    let s = SessionId::from("layout");
    let log = backend.logs().open(&s, true).await.expect("open");
    let turn = env(&s, "pm", "turn/1");
    assert_eq!(log.append(turn.clone()).await.unwrap().seq, 1);
    let stop_id = roundtable_core::EnvelopeId::derive(&s, &PeerId::from("*"), STOP_STEP);
    let mut stop = env(&s, "eng", STOP_STEP);
    stop.id = stop_id;
    stop.kind = Kind::Stop;
    assert_eq!(log.append(stop.clone()).await.unwrap().seq, 2);
    let stream = js.get_stream("RT_layout").await.unwrap();
    assert_eq!(stream.get_raw_message(1).await.unwrap().subject.as_str(), format!("rt.layout.log.pm.{}", turn.id));
    assert_eq!(stream.get_raw_message(2).await.unwrap().subject.as_str(), format!("rt.layout.log.~.{}", stop.id));
    let in_pm_name = env(&s, "pm", "turn/2");
    publish(&backend, format!("rt.layout.log.eng.{}", in_pm_name.id), in_pm_name.to_json().into_bytes()).await;
    let third = log.read(3, 1).await.unwrap();
    assert_eq!((third[0].env.kind, third[0].env.from.as_str()), (Kind::Failure, REJECTED_FROM));
    assert!(third[0].env.body.text.contains("not on its own subject"), "{}", third[0].env.body.text);
    assert_eq!(log.seq_of(&turn.id).await.unwrap(), Some(1));
    assert_eq!(log.seq_of(&stop.id).await.unwrap(), Some(2));
    assert_eq!(log.seq_of(&in_pm_name.id).await.unwrap(), None);

    // A stream made before authors were in subjects: opened, it is read and written the
    // old way, one subject per id.
    let old = SessionId::from("legacy");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RT_legacy".into(),
        description: Some("legacy".into()),
        subjects: vec!["rt.legacy.log.*".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("an old stream");
    let before = env(&old, "pm", "turn/1");
    publish(&backend, format!("rt.legacy.log.{}", before.id), before.to_json().into_bytes()).await;
    let log = backend.logs().open(&old, true).await.expect("open the old stream");
    let after = env(&old, "eng", "turn/2");
    assert_eq!(log.append(after.clone()).await.unwrap(), Appended { seq: 2, duplicate: false });
    assert_eq!(log.append(after.clone()).await.unwrap(), Appended { seq: 2, duplicate: true });
    let stream = js.get_stream("RT_legacy").await.unwrap();
    assert_eq!(stream.get_raw_message(2).await.unwrap().subject.as_str(), format!("rt.legacy.log.{}", after.id));
    let all = log.read_all().await.unwrap();
    assert_eq!(all.iter().map(|e| e.env.id.clone()).collect::<Vec<_>>(), [before.id.clone(), after.id.clone()]);
    assert_eq!(log.seq_of(&before.id).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_opening_one_sessions_streams_at_once_on_a_cluster_all_get_them() {
    // Each process of a session opens its log, board, queue and presence at start; in a
    // cluster creating a replicated stream can time out or be refused while another
    // process's creation of the same stream is under way.
    let cluster = roundtable_nats::testing::NatsCluster::start(3);
    cluster.wait_for_jetstream(3).await;
    for round in 0..2 {
        let session = SessionId::from(format!("opening-{round}"));
        let mut opens = Vec::new();
        for _ in 0..8 {
            let (urls, session) = (cluster.urls(), session.clone());
            opens.push(tokio::spawn(async move {
                let backend = NatsBackend::connect(&urls).await?.with_replicas(3)?;
                let board = backend.blackboard(&session).await.map_err(|e| e.to_string())?;
                let queue = backend
                    .work_queue(&session, roundtable_core::workqueue::QueueConfig::default())
                    .await
                    .map_err(|e| e.to_string())?;
                backend.presence(&session).await?;
                backend.logs().open(&session, true).await.map_err(|e| e.to_string())?;
                drop((board, queue));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }));
        }
        for (i, open) in opens.into_iter().enumerate() {
            // Up to 90 s: a busy machine places replicas slowly, and each part is asked
            // again for up to 30 s.
            tokio::time::timeout(Duration::from_secs(90), open)
                .await
                .unwrap_or_else(|_| panic!("round {round}, process {i}: not open within 90 s"))
                .expect("the task ran")
                .unwrap_or_else(|e| panic!("round {round}, process {i}: {e}"));
        }
    }
}
