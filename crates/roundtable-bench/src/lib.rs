//! Benchmark workloads, defined precisely in BENCHMARKS.md so the same work can be run
//! in another framework. Each returns a result that serializes to one JSON object.
//!
//! Timings are measured here and reported by `roundtable bench`; tests only check that
//! each workload runs and counts what it claims to (never how fast).

pub mod dataproc;
pub mod mock;
pub mod nats;
pub mod rounds;
pub mod tokens;
pub mod workloads;

use serde::Serialize;

/// This process's memory, in KiB, from /proc/self/status.
///
/// `anon` is what the process allocated (heap, stacks); `file` is pages mapped from
/// files, chiefly the executable's code, paged in the first time it runs (the same for
/// a session of 2 messages or 5,000, and shared with every other process running the
/// binary). A session's memory is the growth of `anon`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Resident set size (`VmRSS`): `anon` + `file` + shared memory.
    pub rss: u64,
    /// `RssAnon`.
    pub anon: u64,
    /// `RssFile`.
    pub file: u64,
    /// Peak resident set size (`VmHWM`).
    pub peak: u64,
}

/// This process's memory now (zeros where /proc is not there).
pub fn memory() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss: field("VmRSS:"), anon: field("RssAnon:"), file: field("RssFile:"), peak: field("VmHWM:") }
}

/// The median of some samples (0 when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}
