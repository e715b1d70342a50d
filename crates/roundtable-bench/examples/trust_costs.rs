//! What trust costs: signing and verifying one envelope (the canonical encoding and
//! Ed25519, as a NATS log signs on append and a reader verifies), and the in-process
//! group chat (N = 16 peers, M = 1,000 messages, instant mock model, in memory) with and
//! without the hash chain and its seal computed over the session's log when it stops.
//! Runs alternate in one process; medians.
//!
//!     cargo run --release -p roundtable-bench --example trust_costs

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use roundtable_bench::median;
use roundtable_bench::mock::MockModel;
use roundtable_bench::workloads::group_chat_plan;
use roundtable_core::chain::Chain;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::{LogStore, MemStore};
use roundtable_core::model::ChatModel;
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::session::new_session_id;
use roundtable_core::team::{NoEnv, parse_team};
use roundtable_core::trust::{Roster, SecretKey, sign};

const PEERS: usize = 16;
const MESSAGES: u64 = 1000;
const RUNS: usize = 15;
const ENVELOPES: usize = 2000;

async fn group_chat(chain: bool) -> f64 {
    let plan = group_chat_plan(PEERS, MESSAGES);
    let key = SecretKey::generate();
    let session = new_session_id();
    let log = MemStore::new().open(&session, true).await.expect("open");
    let mock = Arc::new(MockModel::new(None, false, MESSAGES as usize));
    let models: HashMap<PeerId, Arc<dyn ChatModel>> =
        plan.peers.iter().map(|p| (p.id.clone(), mock.clone() as Arc<dyn ChatModel>)).collect();
    let start = Instant::now();
    open_session(log.as_ref(), &plan, "Discuss the benchmark topic.").await.expect("task");
    let summary = run_peers(log.clone(), &plan, models, None, None).await.expect("run");
    assert_eq!(summary.messages, MESSAGES - 1);
    if chain {
        let mut c = Chain::new(&session);
        for e in log.read_all().await.expect("read") {
            c.push(&e.env);
        }
        let seal = c.seal(&key);
        assert_eq!(seal.entries as usize, log.read_all().await.expect("read").len());
    }
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

fn sign_and_verify() -> (f64, f64) {
    let (a, b) = (SecretKey::generate(), SecretKey::generate());
    let src = format!(
        "[models.m]\nprovider = \"scripted\"\nreplies = [\"x\"]\n[[peers]]\nid = \"a\"\nmodel = \"m\"\npublic_key = \"{}\"\n\
         [[peers]]\nid = \"b\"\nmodel = \"m\"\npublic_key = \"{}\"\n[protocol]\nkind = \"round_robin\"\nrounds = 1\n",
        a.public().to_hex(),
        b.public().to_hex()
    );
    let plan = parse_team("t.toml", &src, &NoEnv).expect("plan");
    let roster = Roster::of_plan(&plan).expect("keys").expect("a roster");
    let s = SessionId::from("bench");
    let mut envs: Vec<Envelope> = (0..ENVELOPES)
        .map(|i| {
            Envelope::new(
                &s,
                &"a".into(),
                format!("turn/{i}"),
                Kind::Message,
                Recipient::Peer("b".into()),
                Body::text("I agree with the previous point and add one more."),
            )
        })
        .collect();
    let start = Instant::now();
    for e in &mut envs {
        sign(e, &"a".into(), &a);
    }
    let signing = start.elapsed().as_secs_f64() * 1e6 / ENVELOPES as f64;
    let start = Instant::now();
    for e in &envs {
        roster.verify(e).expect("verifies");
    }
    let verifying = start.elapsed().as_secs_f64() * 1e6 / ENVELOPES as f64;
    (signing, verifying)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut off, mut on, mut signs, mut verifies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    group_chat(false).await;
    for _ in 0..RUNS {
        off.push(group_chat(false).await);
        on.push(group_chat(true).await);
        let (s, v) = sign_and_verify();
        signs.push(s);
        verifies.push(v);
    }
    let (off, on) = (median(off), median(on));
    println!("sign one envelope:   {:.1} µs (median of {RUNS} runs of {ENVELOPES})", median(signs));
    println!("verify one envelope: {:.1} µs", median(verifies));
    println!("group chat N={PEERS} M={MESSAGES}, chain off: {off:.0} msgs/s");
    println!("group chat N={PEERS} M={MESSAGES}, chain on:  {on:.0} msgs/s ({:+.1}%)", (on / off - 1.0) * 100.0);
}
