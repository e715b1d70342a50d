//! The conformance suite against the in-process parts: `MemStore`/`SharedMemLog`,
//! `MemBlackboard`, `MemWorkQueue` and `MemPresence`, as `MemBackend` opens them.

roundtable_conformance::backend_tests!(async { roundtable_core::bus::MemBackend::default() });
