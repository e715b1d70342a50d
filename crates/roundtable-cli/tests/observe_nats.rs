//! Trace, replay and the web view read sessions from a NATS server as they do from
//! the local store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roundtable_nats::testing::NatsServer;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    c.env_remove("ROUNDTABLE_NATS").env("NO_COLOR", "1");
    c
}

#[test]
fn trace_replay_and_ui_read_a_session_from_nats() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let team = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/product-debate.toml");
    let o = bin()
        .args(["run", team.to_str().unwrap(), "--json", "--nats", &server.url(), "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = s["session"].as_str().unwrap();

    let o = bin()
        .args(["trace", id, "--format", "json", "--nats", &server.url(), "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("completed: 3 rounds") && t.contains("facilitator"), "{t}");

    let o = bin().args(["replay", id, "--nats", &server.url(), "--data-dir"]).arg(data.path()).output().unwrap();
    assert!(o.status.success(), "replay diverged:\n{}", String::from_utf8_lossy(&o.stdout));

    // Nothing was written locally: the session lives on the server.
    assert!(!data.path().join("roundtable.db").exists());

    // The web view lists it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut ui = bin()
        .args(["ui", "--addr", &format!("127.0.0.1:{port}"), "--nats", &server.url(), "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    // Kept until the child is killed, so its later lines have somewhere to go.
    let mut out = BufReader::new(ui.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    assert!(first.contains(&server.url()), "{first}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            use std::io::{Read, Write};
            write!(c, "GET /api/sessions HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut b = String::new();
            c.read_to_string(&mut b)?;
            Ok(b)
        });
        match got {
            Ok(b) if b.contains(id) => break b,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("the web view never listed {id}: {other:?}"),
        }
    };
    let _ = ui.kill();
    let _ = ui.wait();
    drop(out);
    assert!(body.contains("product-debate"), "{body}");
}

fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(c, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut b = String::new();
    c.read_to_string(&mut b).ok()?;
    Some(b)
}

#[test]
fn a_peer_process_serves_its_sessions_metrics() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let team = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/product-debate.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let peer = |id: &str, extra: &[&str]| {
        bin()
            .args([
                "peer",
                team.to_str().unwrap(),
                "--id",
                id,
                "--session",
                "metrics-1",
                "--json",
                "--nats",
                &server.url(),
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // pm alone: it posts the task and waits for the others, serving metrics meanwhile.
    let pm = peer("pm", &["--metrics", &format!("127.0.0.1:{port}")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match scrape(port) {
            Some(b) if b.contains("roundtable_envelopes_total") => break b,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("no metrics from the peer: {other:?}"),
        }
    };
    assert!(body.contains("# TYPE roundtable_envelopes_total counter"), "{body}");
    let others: Vec<_> = ["eng", "cfo", "facilitator"].iter().map(|id| peer(id, &[])).collect();
    for child in std::iter::once(pm).chain(others) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["messages"], 10);
    }
}
