//! The conformance suite against the embedded backend (`SqliteBackend`, what a user gets
//! by default): the log in a SQLite database of the test's own, group committed, and
//! the in-process blackboard, work queue and presence.

use roundtable_sqlite::{Durability, SqliteBackend, SqliteStore};

#[derive(Clone)]
struct Sqlite {
    backend: SqliteBackend,
    // Removed when the last clone is dropped, after the backend's last use.
    _dir: std::sync::Arc<tempfile::TempDir>,
}

impl roundtable_conformance::Fixture for Sqlite {
    fn backend(&self) -> std::sync::Arc<dyn roundtable_core::bus::Backend> {
        std::sync::Arc::new(self.backend.clone())
    }
}

async fn sqlite() -> Sqlite {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(&SqliteStore::default_path(dir.path()), true, Durability::Normal)
        .expect("open a fresh database");
    Sqlite { backend: SqliteBackend::new(store), _dir: std::sync::Arc::new(dir) }
}

roundtable_conformance::backend_tests!(sqlite());
