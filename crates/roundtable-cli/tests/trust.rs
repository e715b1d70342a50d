//! Attacks on a session shared over NATS, tried as a hostile client on the same server
//! would: the attacker publishes on the session's subjects with a client of its own and
//! runs an HTTP server of its own, and the test asserts what the peers refuse and that
//! nothing reached the attacker. Each test starts a nats-server of its own.

use std::path::PathBuf;
use std::process::{Command, Output};

use roundtable_core::bus::Backend;
use roundtable_core::envelope::SessionId;
use roundtable_core::runner::open_session;
use roundtable_core::team::{PlanEnv, parse_team};
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "sk-live-DO-NOT-LEAK";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roundtable"));
    for var in ["ROUNDTABLE_DIR", "ROUNDTABLE_NATS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS"] {
        c.env_remove(var);
    }
    c.env("NO_COLOR", "1").env("RT_TRUST_KEY", SECRET);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// A team of two on one OpenAI-compatible endpoint whose key is in `RT_TRUST_KEY`.
fn team(base: &str) -> String {
    format!(
        r#"name = "pair"
topic = "Pick a name"
[models.g]
provider = "openai"
model = "gpt-4o-mini"
base_url = "{base}/v1"
api_key_env = "RT_TRUST_KEY"
max_retries = 0
[[peers]]
id = "a"
model = "g"
[[peers]]
id = "b"
model = "g"
[protocol]
kind = "round_robin"
rounds = 1
"#
    )
}

/// The attacker's plan environment: it may name any variable.
struct AnyVar;

impl PlanEnv for AnyVar {
    fn var_is_set(&self, _: &str) -> bool {
        true
    }
    fn read(&self, path: &str) -> Result<String, String> {
        Err(format!("no file {path}"))
    }
}

/// An HTTP server that counts what it is sent and answers nothing useful.
fn listener(rt: &tokio::runtime::Runtime) -> MockServer {
    let server = rt.block_on(MockServer::start());
    rt.block_on(Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).mount(&server));
    server
}

#[test]
fn a_forged_task_naming_another_endpoint_is_refused_and_no_secret_leaves_the_machine() {
    let rt = rt();
    let server = NatsServer::start();
    let honest = listener(&rt);
    let attacker = listener(&rt);
    let dir = tempfile::tempdir().unwrap();
    let local: PathBuf = dir.path().join("pair.toml");
    std::fs::write(&local, team(&honest.uri())).unwrap();

    // Before any peer joins, the attacker posts the session's task with a plan of its
    // own: the same team, with the model pointing at the attacker.
    let forged = parse_team("forged.toml", &team(&attacker.uri()), &AnyVar).expect("the forged plan parses");
    rt.block_on(async {
        let backend = NatsBackend::connect(&server.url()).await.expect("connect");
        let log = backend.logs().open(&SessionId::from("forged-task"), true).await.expect("open");
        open_session(log.as_ref(), &forged, "Pick a name").await.expect("the attacker's task lands");
    });

    let o = bin()
        .args(["peer", local.to_str().unwrap(), "--id", "a", "--nats", &server.url(), "--session", "forged-task"])
        .arg("--data-dir")
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let shown = format!(
        "models.g.provider.base_url: the task says \"{}/v1\", the team file says \"{}/v1\"",
        attacker.uri(),
        honest.uri()
    );
    assert!(err.contains(&shown), "the difference is shown: {err}");
    assert!(!err.contains(SECRET), "{err}");
    let sent = rt.block_on(attacker.received_requests()).unwrap_or_default().len()
        + rt.block_on(honest.received_requests()).unwrap_or_default().len();
    assert_eq!(sent, 0, "the refused peer called no model at all");
}

#[test]
fn a_task_that_renames_the_key_variable_is_refused_too() {
    let rt = rt();
    let server = NatsServer::start();
    let honest = listener(&rt);
    let dir = tempfile::tempdir().unwrap();
    let local: PathBuf = dir.path().join("pair.toml");
    std::fs::write(&local, team(&honest.uri())).unwrap();
    let forged = team(&honest.uri()).replace("api_key_env = \"RT_TRUST_KEY\"", "api_key_env = \"HOME\"");
    let forged = parse_team("forged.toml", &forged, &AnyVar).unwrap();
    rt.block_on(async {
        let backend = NatsBackend::connect(&server.url()).await.expect("connect");
        let log = backend.logs().open(&SessionId::from("forged-env"), true).await.expect("open");
        open_session(log.as_ref(), &forged, "Pick a name").await.expect("the attacker's task lands");
    });
    let o = bin()
        .args(["peer", local.to_str().unwrap(), "--id", "b", "--nats", &server.url(), "--session", "forged-env"])
        .arg("--data-dir")
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("models.g.provider.api_key_env: the task says \"HOME\", the team file says \"RT_TRUST_KEY\""),
        "{}",
        stderr(&o)
    );
    assert_eq!(rt.block_on(honest.received_requests()).unwrap_or_default().len(), 0);
}
