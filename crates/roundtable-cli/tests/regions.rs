//! Regional peers (`examples/regions/`): six `roundtable peer` processes on a JetStream
//! cluster of three servers, with R3 streams and buckets. Each region makes its local
//! change on its own blackboard key; the global change is voted among the regions
//! present. One region's peer and one server are SIGKILLed in the middle of the vote:
//! the others go on, the vote completes among the regions present, nothing
//! acknowledged is lost, and the region, restarted, catches up from the log. The same
//! example against a single server. Each test starts its own servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roundtable_core::bus::Backend;
use roundtable_core::envelope::{Envelope, Kind, SessionId};
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::{NatsCluster, NatsServer};

/// How long a test waits for something that must happen, before calling it a failure.
const DEADLINE: Duration = Duration::from_secs(240);

const REGIONS: [&str; 6] = ["us-east", "us-west", "eu-west", "eu-central", "ap-south", "ap-east"];
/// The region whose peer is killed during the vote.
const KILLED: &str = "ap-east";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    for var in ["ROUNDTABLE_DIR", "ROUNDTABLE_NATS", "ROUNDTABLE_NATS_REPLICAS", "NATS_USER", "NATS_TOKEN"] {
        c.env_remove(var);
    }
    c.env("NO_COLOR", "1");
    c
}

fn team(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/regions").join(name)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", String::from_utf8_lossy(&o.stdout), stderr(o)))
}

/// Region processes, SIGKILLed if the test ends before they do; output to files.
struct Regions {
    out: tempfile::TempDir,
    data: PathBuf,
    url: String,
    replicas: usize,
    children: Vec<(String, Child, PathBuf)>,
}

impl Regions {
    fn new(url: &str, replicas: usize) -> Self {
        let out = tempfile::tempdir().unwrap();
        let data = out.path().join("data");
        Regions { out, data, url: url.to_owned(), replicas, children: Vec::new() }
    }

    fn start(&mut self, team: &Path, id: &str, session: &str) {
        let base = self.out.path().join(format!("{session}-{id}-{}", self.children.len()));
        let file = |ext: &str| std::fs::File::create(base.with_extension(ext)).unwrap();
        let child = bin()
            .args(["peer", team.to_str().unwrap(), "--id", id, "--nats", &self.url, "--session", session, "--json"])
            .args(["--nats-replicas", &self.replicas.to_string(), "--data-dir"])
            .arg(self.data.join(id))
            // Warnings (disconnections, failed heartbeats) go to the region's stderr,
            // which a failure shows.
            .env("ROUNDTABLE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file("out"))
            .stderr(file("err"))
            .spawn()
            .expect("the binary runs");
        self.children.push((id.to_owned(), child, base));
    }

    fn kill(&mut self, id: &str) {
        let i = self.children.iter().position(|(p, ..)| p == id).unwrap_or_else(|| panic!("no region {id}"));
        let (_, mut child, _) = self.children.remove(i);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// Wait for every running process to exit; their outputs, by region.
    fn wait_all(&mut self) -> Vec<(String, Output)> {
        let start = Instant::now();
        let mut out = Vec::new();
        while let Some((id, mut child, base)) = self.children.pop() {
            let status = loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                if start.elapsed() > DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = std::fs::read_to_string(base.with_extension("err")).unwrap_or_default();
                    panic!("region {id} did not finish within {DEADLINE:?}; stderr:\n{err}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let read = |ext: &str| std::fs::read(base.with_extension(ext)).unwrap_or_default();
            out.push((id, Output { status, stdout: read("out"), stderr: read("err") }));
        }
        out
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A reader of sessions on the servers, over one connection.
struct Reader {
    rt: tokio::runtime::Runtime,
    backend: NatsBackend,
}

impl Reader {
    fn new(url: &str) -> Self {
        let rt = rt();
        let backend = rt.block_on(NatsBackend::connect(url)).expect("connect");
        Reader { rt, backend }
    }

    fn log(&self, session: &str) -> Vec<Arc<Envelope>> {
        self.rt.block_on(async {
            match self.backend.logs().open(&SessionId::from(session), false).await {
                Ok(log) => log.read_all().await.map(|l| l.into_iter().map(|e| e.env).collect()).unwrap_or_default(),
                Err(_) => Vec::new(),
            }
        })
    }

    fn wait_for(&self, session: &str, what: &str, cond: impl Fn(&[Arc<Envelope>]) -> bool) -> Vec<Arc<Envelope>> {
        let start = Instant::now();
        loop {
            let log = self.log(session);
            if cond(&log) {
                return log;
            }
            assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}; the log: {:#?}", steps(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The replica count of a stream.
    fn replicas_of(&self, stream: &str) -> usize {
        self.rt.block_on(async {
            let mut s = self.backend.jetstream().get_stream(stream).await.expect("the stream exists");
            s.info().await.expect("stream info").config.num_replicas
        })
    }

    fn board_value(&self, session: &str, key: &str) -> Option<String> {
        self.rt.block_on(async {
            let board = self.backend.blackboard(&SessionId::from(session)).await.expect("the board opens");
            board.get(key).await.expect("board read").map(|e| String::from_utf8_lossy(&e.value).into_owned())
        })
    }
}

fn steps(log: &[Arc<Envelope>]) -> Vec<String> {
    let t0 = log.first().map_or(0, |e| e.time_ms);
    log.iter().map(|e| format!("{} {} {} (+{} ms)", e.kind, e.from, e.step, e.time_ms.saturating_sub(t0))).collect()
}

/// The example, start to end: the local changes, then the global vote with `KILLED`'s
/// peer killed once the proposal is on the log (and `disturb(true)` called at that
/// moment, `disturb(false)` before the region is restarted).
fn run_example(url: &str, replicas: usize, tag: &str, disturb: &mut dyn FnMut(bool)) {
    let reader = Reader::new(url);

    // Local changes: every region on its own key, no vote.
    let local = format!("regions-local-{tag}");
    let mut regions = Regions::new(url, replicas);
    for r in REGIONS {
        regions.start(&team("local.toml"), r, &local);
    }
    for (id, o) in regions.wait_all() {
        assert!(o.status.success(), "region {id}: {}", stderr(&o));
        let s = json(&o);
        assert!(s["stop_reason"].as_str().unwrap().contains("quiescent"), "region {id}: {s}");
    }
    let log = reader.log(&local);
    assert_eq!(log.iter().filter(|e| e.kind == Kind::Vote).count(), 0, "local changes take no vote");
    for r in REGIONS {
        let writes: Vec<_> = log.iter().filter(|e| e.kind == Kind::Board && e.from.as_str() == r).collect();
        assert_eq!(writes.len(), 1, "{r} made its one local change: {:#?}", steps(&log));
        let json = writes[0].body.json.as_ref().unwrap();
        assert_eq!(json["key"], format!("{r}-settings"), "{r} wrote its own key: {json}");
        let value = reader.board_value(&local, &format!("{r}-settings")).expect("the change is on the board");
        assert!(value.contains(&format!("{r}: replicas")), "{r}'s key holds its change: {value}");
    }
    let tok = roundtable_nats::token(&local);
    assert_eq!(reader.replicas_of(&format!("RT_{tok}")), replicas, "the log's stream");
    assert_eq!(reader.replicas_of(&format!("KV_RTB_{tok}")), replicas, "the blackboard's bucket");

    // The global change: the regions vote; KILLED and a server die in the middle.
    let global = format!("regions-global-{tag}");
    for r in REGIONS {
        regions.start(&team("global.toml"), r, &global);
    }
    let before = reader.wait_for(&global, "the proposal", |log| log.iter().any(|e| e.kind == Kind::Proposal));
    regions.kill(KILLED);
    disturb(true);
    let outs = regions.wait_all();
    let log = reader.log(&global);
    // Every region's diagnostics, for a failure that is about another region than the
    // one whose report shows it (a live region recorded absent, say).
    let stderrs: String = outs.iter().map(|(id, o)| format!("--- {id} stderr:\n{}\n", stderr(o))).collect();
    for (id, o) in &outs {
        assert!(o.status.success(), "region {id}: {}", stderr(o));
        let s = json(o);
        // eu-central rejects; ap-east is absent, so neither waited for nor counted.
        assert_eq!(
            s["stop_reason"],
            "consensus in round 1: 3 of 4 voters approve (75%, threshold 75%)",
            "region {id}: {s}\nlog: {:#?}\n{stderrs}",
            steps(&log)
        );
        assert!(s["final_answer"].as_str().unwrap().contains("2.4.1"), "region {id}: {s}");
    }
    let absent: Vec<_> = log.iter().filter(|e| e.kind == Kind::Absent).collect();
    assert_eq!(absent.len(), 1, "{KILLED} recorded absent once: {:#?}", steps(&log));
    assert_eq!(absent[0].body.json.as_ref().unwrap()["peer"], KILLED);
    let voters: Vec<&str> = log.iter().filter(|e| e.kind == Kind::Vote).map(|e| e.from.as_str()).collect();
    assert_eq!(voters.len(), 4, "the four voters present voted, once each: {voters:?}");
    assert!(!voters.contains(&KILLED));
    // Nothing acknowledged before the kills is lost or moved.
    for (i, e) in before.iter().enumerate() {
        assert_eq!(log[i].id, e.id, "entry {} changed after the kills", i + 1);
    }

    // The server, then the region, come back: the region catches up from the log.
    disturb(false);
    regions.start(&team("global.toml"), KILLED, &global);
    let outs = regions.wait_all();
    let log = reader.log(&global);
    let (_, o) = &outs[0];
    assert!(o.status.success(), "{KILLED} after its restart: {}", stderr(o));
    let s = json(o);
    assert_eq!(s["envelopes"].as_u64(), Some(log.len() as u64), "{KILLED} read the whole log: {s}");
    assert!(s["stop_reason"].as_str().unwrap().starts_with("consensus in round 1: 3 of 4"), "{s}");
    assert!(s["final_answer"].as_str().unwrap().contains("2.4.1"), "{KILLED} found the change adopted: {s}");
    let ids: std::collections::BTreeSet<_> = log.iter().map(|e| &e.id).collect();
    assert_eq!(ids.len(), log.len(), "no envelope twice: {:#?}", steps(&log));
}

#[test]
fn regions_on_a_three_server_cluster_survive_a_killed_region_and_server_and_the_region_catches_up() {
    let mut cluster = NatsCluster::start(3);
    rt().block_on(cluster.wait_for_jetstream(3));
    let url = cluster.urls();
    run_example(&url, 3, "cluster", &mut |down| {
        if down {
            cluster.server(1).kill();
        } else {
            cluster.server(1).start_again();
        }
    });
}

#[test]
fn regions_work_the_same_against_a_single_server() {
    let server = NatsServer::start();
    run_example(&server.url(), 1, "single", &mut |_| {});
}

#[test]
fn replica_counts_are_checked_and_one_the_server_cannot_hold_fails_plainly() {
    for bad in ["0", "6", "three"] {
        let o = bin()
            .args(["peer", team("local.toml").to_str().unwrap(), "--id", "us-east", "--session", "s"])
            .args(["--nats", "nats://127.0.0.1:1", "--nats-replicas", bad])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "--nats-replicas {bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--nats-replicas"), "the message names the flag: {}", stderr(&o));
    }
    // Three copies on a server that is alone: the session cannot be created, and the
    // peer says so instead of running.
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["peer", team("local.toml").to_str().unwrap(), "--id", "us-east", "--session", "r3-alone"])
        .args(["--nats", &server.url(), "--nats-replicas", "3", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("r3-alone"), "the message names the session: {}", stderr(&o));
    assert!(Reader::new(&server.url()).log("r3-alone").is_empty(), "no session was made");
}
