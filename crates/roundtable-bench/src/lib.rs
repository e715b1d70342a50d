//! Benchmark workloads, defined precisely in BENCHMARKS.md so the same work can be run
//! in another framework. Each returns a result that serializes to one JSON object.
//!
//! Timings are measured here and reported by `roundtable bench`; tests only check that
//! each workload runs and counts what it claims to (never how fast).

pub mod mock;
pub mod nats;
pub mod rounds;
pub mod tokens;
pub mod workloads;

/// Resident set size of this process, in KiB: (current, peak), from /proc.
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
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
