//! A nats-server of a test's own: a port on 127.0.0.1 the server picks itself, JetStream
//! on, a temporary store directory; killed when dropped, and able to be stopped and
//! started again on the same port and store (to test what survives a server restart).
//!
//! A server counts as started only when its own log line (tagged with its process id)
//! says it is ready: a port that merely accepts connections may belong to another test's
//! server, and peers connected to that one would see its restarts as their own. [`NatsCluster`]: three
//! (or more) of them routed into one JetStream cluster, each killable on its own.
//!
//! The binary is `nats-server` on `PATH`, else `/usr/sbin/nats-server`, or the path in
//! `ROUNDTABLE_NATS_SERVER`. A missing binary is a test failure that says how to install
//! it, never a silently skipped test.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) nats-server with JetStream.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl NatsServer {
    /// Start a server on a free port with a fresh store directory, and wait until it
    /// accepts connections. Panics, saying how to install it, when there is no binary.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// [`Self::start`] with more command-line arguments for the server, kept for restarts:
    /// `["--user", "u", "--pass", "p"]`, `["--auth", "token"]`, `["-c", "server.conf"]`….
    pub fn start_with(args: &[&str]) -> NatsServer {
        let binary = find_binary().unwrap_or_else(|| {
            panic!(
                "nats-server not found (looked for `nats-server` on PATH, /usr/sbin/nats-server and \
                 $ROUNDTABLE_NATS_SERVER): install it with `apt-get install nats-server` \
                 (version 2.9 or newer)"
            )
        });
        let store = tempfile::Builder::new().prefix("roundtable-nats-").tempdir().expect("temporary store directory");
        let extra = args.iter().map(|a| a.to_string()).collect();
        // Port 0: the first start lets the server pick one, and later starts reuse it.
        let mut server = NatsServer { binary, port: 0, store, child: None, extra };
        server.start_again();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the server at once (SIGKILL: no flush, no goodbye), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the server the way an operator would (SIGTERM), waiting until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let terminated = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            if !terminated.is_ok_and(|s| s.success()) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// What the server has logged so far (every start of it).
    pub fn log(&self) -> String {
        read_log(&self.store.path().join("server.log"))
    }

    /// Start the server again (after [`Self::kill`] or [`Self::stop`]) on the same port
    /// and store directory, and wait until it says it is ready.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server on port {} is already running", self.port);
        let log = self.store.path().join("server.log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("server log file");
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(self.store.path().join("jetstream"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        // Each line the server logs begins with its process id in brackets.
        let tag = format!("[{}] ", child.id());
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("nats-server exited at start ({status}); its log:\n{}", read_log(&log));
            }
            let text = read_log(&log);
            let ours = || text.lines().filter(|l| l.starts_with(&tag));
            if ours().any(|l| l.ends_with("Server is ready")) {
                let listening = ours()
                    .find_map(|l| l.split("Listening for client connections on ").nth(1))
                    .and_then(|addr| addr.trim().parse::<SocketAddr>().ok())
                    .unwrap_or_else(|| panic!("nats-server is ready but logged no client address; its log:\n{text}"));
                assert!(
                    self.port == 0 || listening.port() == self.port,
                    "nats-server listens on {listening}, not on port {}",
                    self.port
                );
                self.port = listening.port();
                return;
            }
            if start.elapsed() > START_TIMEOUT {
                self.kill();
                panic!("nats-server was not ready within {START_TIMEOUT:?}; its log:\n{}", read_log(&log));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill the server and start it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of servers of a test's own, each on its own client and route
/// ports with its own store directory, routed to all the others. Streams created with
/// `num_replicas` up to the cluster's size keep a copy on that many servers, so killing
/// one server (a minority) loses nothing that was acknowledged.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `size` routed servers (named `rt-1` …) and wait until each accepts
    /// connections. The cluster may still be electing its JetStream leader: see
    /// [`NatsCluster::wait_for_jetstream`].
    pub fn start(size: usize) -> NatsCluster {
        assert!(size >= 1, "a cluster has at least one server");
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let servers = (0..size)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect();
                let name = format!("rt-{}", i + 1);
                let listen = format!("nats://127.0.0.1:{}", routes[i]);
                let others = others.join(",");
                let mut args = vec!["-n", name.as_str(), "--cluster_name", "rt-test", "--cluster", listen.as_str()];
                if !others.is_empty() {
                    args.extend(["--routes", others.as_str()]);
                }
                NatsServer::start_with(&args)
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server's URL, separated by commas (what `--nats` takes): a client goes to
    /// another when the one it is connected to dies.
    pub fn urls(&self) -> String {
        self.servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// Server `i` (from 0), to kill and start again.
    pub fn server(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    pub fn size(&self) -> usize {
        self.servers.len()
    }

    /// Wait until the cluster can create a stream with `replicas` copies (its
    /// JetStream meta leader is elected and enough servers are up), up to 60 s; panics
    /// with the last refusal otherwise.
    pub async fn wait_for_jetstream(&self, replicas: usize) {
        let addrs: Vec<async_nats::ServerAddr> =
            self.servers.iter().map(|s| s.url().parse().expect("a server address")).collect();
        let client = async_nats::connect(addrs).await.expect("connect to the cluster");
        let js = async_nats::jetstream::new(client);
        let start = Instant::now();
        loop {
            let config = async_nats::jetstream::stream::Config {
                name: "RT_CLUSTER_PROBE".into(),
                subjects: vec!["rt-cluster-probe".into()],
                num_replicas: replicas,
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            };
            match js.get_or_create_stream(config).await {
                Ok(_) => {
                    let _ = js.delete_stream("RT_CLUSTER_PROBE").await;
                    return;
                }
                Err(e) if start.elapsed() > Duration::from_secs(60) => {
                    panic!("the cluster cannot create an R{replicas} stream within 60 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// The nats-server binary [`NatsServer::start`] would run, if there is one.
pub fn server_binary() -> Option<PathBuf> {
    find_binary()
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROUNDTABLE_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn starts_accepts_and_restarts_on_the_same_port() {
        let mut server = NatsServer::start();
        let addr = SocketAddr::from(([127, 0, 0, 1], server.port()));
        assert!(TcpStream::connect(addr).is_ok());
        server.kill();
        assert!(TcpStream::connect(addr).is_err(), "a killed server accepts nothing");
        server.start_again();
        assert!(TcpStream::connect(addr).is_ok());
        server.stop();
        assert!(!server.is_running());
        server.restart();
        assert!(server.url().ends_with(&format!(":{}", server.port())));
    }

    #[test]
    fn a_port_held_by_another_server_is_not_taken_for_ours() {
        let other = NatsServer::start();
        let store = tempfile::Builder::new().prefix("roundtable-nats-").tempdir().unwrap();
        let mut ours =
            NatsServer { binary: find_binary().unwrap(), port: other.port(), store, child: None, extra: Vec::new() };
        // The port accepts connections (the other server's), yet ours could not listen.
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ours.start_again()));
        let message = started.expect_err("a server that could not listen is not started");
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("exited at start") || message.contains("not ready"), "{message}");
        assert!(TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], other.port()))).is_ok());
    }
}
