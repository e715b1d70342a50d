//! The conformance suite against the NATS backend, each check on a nats-server of its own.

use std::sync::Arc;

use roundtable_conformance::Fixture;
use roundtable_core::bus::Backend;
use roundtable_nats::NatsBackend;
use roundtable_nats::testing::NatsServer;

struct Nats {
    backend: NatsBackend,
    /// A second connection, as another process would have.
    other: NatsBackend,
    // Dropped after the backend's last use: the server goes with the test.
    _server: NatsServer,
}

impl Fixture for Nats {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }
    fn other_backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.other.clone())
    }
}

async fn nats() -> Nats {
    let server = NatsServer::start();
    let backend = NatsBackend::connect(&server.url()).await.expect("connect to the test server");
    let other = NatsBackend::connect(&server.url()).await.expect("connect again");
    Nats { backend, other, _server: server }
}

roundtable_conformance::backend_tests!(nats());
