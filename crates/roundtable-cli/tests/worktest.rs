//! `roundtable worktest`, the distributed-testing example, at a size for the test suite:
//! worker processes on one shared queue with no coordinator, one of them SIGKILLed
//! mid-test, and nothing lost or done twice.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use roundtable_nats::testing::NatsServer;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    for var in ["ROUNDTABLE_DIR", "ROUNDTABLE_NATS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS"] {
        c.env_remove(var);
    }
    c
}

fn report(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn check_whole(r: &serde_json::Value, tests: u64) {
    assert_eq!(r["lost"], 0, "no test lost: {r:#}");
    assert_eq!(r["completed_twice"], 0, "no test completed twice: {r:#}");
    let resolved = ["passed", "failed", "skipped"].iter().map(|k| r[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(resolved, tests, "{r:#}");
}

#[test]
fn workers_killed_mid_test_lose_nothing_and_repeat_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "worktest",
        "--tests",
        "200",
        "--workers",
        "4",
        "--duration-ms",
        "20",
        "--fail-rate",
        "0.05",
        "--dep-rate",
        "0.3",
        "--lease-ms",
        "1500",
        "--absent-after-ms",
        "1000",
        "--json",
    ];
    // One worker killed and not restarted, then one killed and restarted.
    for (extra, restarted) in [(vec!["--kill", "1"], 0), (vec!["--kill", "1", "--restart-after-ms", "300"], 1)] {
        let o = bin()
            .args(args)
            .args(&extra)
            .args(["--nats", &server.url(), "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("the binary runs");
        assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
        let r = report(&o);
        check_whole(&r, 200);
        assert_eq!((r["killed"].as_u64(), r["restarted"].as_u64()), (Some(1), Some(restarted)), "{r:#}");
        assert!(r["failed"].as_u64().unwrap() > 0, "some tests fail at a 5% rate: {r:#}");
    }
}

#[test]
fn workers_started_elsewhere_join_a_run_by_its_session() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let run = bin()
        .args(["worktest", "--tests", "60", "--workers", "3", "--spawn", "2", "--duration-ms", "10"])
        .args(["--session", "ci-1", "--json", "--nats", &server.url(), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // The third worker, as it would be started on another machine.
    let mut other = bin()
        .args(["worktest", "--worker", "w02", "--session", "ci-1", "--nats", &server.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let o = run.wait_with_output().expect("output");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_whole(&report(&o), 60);
    let start = Instant::now();
    while other.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "the third worker did not stop with the run");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(other.wait().unwrap().success());
}

#[test]
fn without_a_server_the_example_says_how_to_get_one() {
    let o = bin()
        .args(["worktest", "--tests", "1"])
        .env("ROUNDTABLE_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("apt-get install nats-server") && err.contains("--nats"), "{err}");
    let o = bin().args(["worktest", "--fail-rate", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}
