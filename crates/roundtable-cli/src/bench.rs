//! `roundtable bench`: run the benchmark workloads and print a table (or JSON lines).
//!
//! A sweep runs every configuration in a child process of its own, so each one's
//! memory figures start from a clean process; `--repeat K` runs each K times and
//! reports medians.

use std::process::Command;

use clap::{Args, ValueEnum};
use roundtable_bench::median;
use roundtable_bench::workloads::{GroupChatConfig, ScaleConfig, group_chat, scale};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// Round robin over an instant mock model; every peer sees every message.
    Groupchat,
    /// Memory per peer for idle and active peers; a session with many peers.
    Scale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Persist {
    On,
    Off,
    Both,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// The workload (see BENCHMARKS.md for their exact definitions).
    workload: Workload,
    /// Peers, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2, 4, 8, 16])]
    peers: Vec<usize>,
    /// Messages per session (the task included), comma-separated (groupchat).
    #[arg(long, value_delimiter = ',', default_values_t = vec![200, 1000, 5000])]
    messages: Vec<u64>,
    /// Persist the session log in SQLite (groupchat).
    #[arg(long, value_enum, default_value = "both")]
    persist: Persist,
    /// Have the mock model read the whole history on every call, as a provider
    /// serializing it would (groupchat).
    #[arg(long)]
    walk_history: bool,
    /// Rounds of round robin for `scale`; 0 measures idle peers.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 1])]
    rounds: Vec<u32>,
    /// Runs per configuration; medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// One JSON object per configuration instead of a table.
    #[arg(long)]
    json: bool,
    /// Run exactly one configuration in this process (used by sweeps).
    #[arg(long, hide = true)]
    single: bool,
}

pub(crate) async fn run(a: BenchArgs) -> Result<(), String> {
    if a.single {
        let v = match a.workload {
            Workload::Groupchat => serde_json::to_value(
                group_chat(GroupChatConfig {
                    peers: a.peers[0],
                    messages: a.messages[0],
                    persist: a.persist == Persist::On,
                    walk_history: a.walk_history,
                })
                .await?,
            ),
            Workload::Scale => {
                serde_json::to_value(scale(ScaleConfig { peers: a.peers[0], rounds: a.rounds[0] }).await?)
            }
        }
        .map_err(|e| e.to_string())?;
        println!("{v}");
        return Ok(());
    }
    let mut configs: Vec<Vec<String>> = Vec::new();
    match a.workload {
        Workload::Groupchat => {
            let persists: &[&str] = match a.persist {
                Persist::On => &["on"],
                Persist::Off => &["off"],
                Persist::Both => &["off", "on"],
            };
            for &m in &a.messages {
                for &n in &a.peers {
                    for p in persists {
                        let mut args = vec![
                            "groupchat".into(),
                            format!("--peers={n}"),
                            format!("--messages={m}"),
                            format!("--persist={p}"),
                        ];
                        if a.walk_history {
                            args.push("--walk-history".into());
                        }
                        configs.push(args);
                    }
                }
            }
        }
        Workload::Scale => {
            for &n in &a.peers {
                for &r in &a.rounds {
                    configs.push(vec!["scale".into(), format!("--peers={n}"), format!("--rounds={r}")]);
                }
            }
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for args in configs {
        let mut runs = Vec::new();
        for _ in 0..a.repeat.max(1) {
            let out = Command::new(&exe)
                .arg("bench")
                .args(&args)
                .arg("--single")
                .output()
                .map_err(|e| format!("starting a benchmark run: {e}"))?;
            if !out.status.success() {
                return Err(format!("benchmark {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            runs.push(v);
        }
        let row = median_row(&runs);
        if a.json {
            println!("{row}");
        } else if rows.is_empty() {
            print_header(a.workload);
        }
        if !a.json {
            print_row(a.workload, &row);
        }
        rows.push(row);
    }
    Ok(())
}

/// The first run's fields, with every number replaced by the median over runs.
fn median_row(runs: &[serde_json::Value]) -> serde_json::Value {
    let mut row = runs[0].clone();
    if let Some(obj) = row.as_object_mut() {
        for (k, v) in obj.iter_mut() {
            if v.is_f64() || (v.is_u64() && !matches!(k.as_str(), "peers" | "messages" | "rounds")) {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r[k].as_f64()).collect();
                *v = serde_json::json!(median(xs));
            }
        }
        obj.insert("runs".into(), serde_json::json!(runs.len()));
    }
    row
}

fn print_header(w: Workload) {
    match w {
        Workload::Groupchat => println!(
            "{:>5} {:>6} {:>7} {:>12} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8}",
            "peers", "msgs", "persist", "msgs/s", "µs first", "µs last", "ratio", "peak MiB", "added MiB", "×payload"
        ),
        Workload::Scale => {
            println!(
                "{:>6} {:>6} {:>9} {:>10} {:>11} {:>9}",
                "peers", "rounds", "messages", "wall ms", "added KiB", "KiB/peer"
            )
        }
    }
}

fn print_row(w: Workload, r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    match w {
        Workload::Groupchat => println!(
            "{:>5} {:>6} {:>7} {:>12.0} {:>10.2} {:>10.2} {:>6.2} {:>10.1} {:>10.1} {:>8.2}",
            f("peers"),
            f("messages"),
            if r["persist"].as_bool() == Some(true) { "on" } else { "off" },
            f("messages_per_sec"),
            f("us_per_msg_first100"),
            f("us_per_msg_last100"),
            f("last_over_first"),
            f("peak_rss_kib") / 1024.0,
            (f("rss_after_kib") - f("rss_before_kib")) / 1024.0,
            f("added_kib_over_payload_kib"),
        ),
        Workload::Scale => println!(
            "{:>6} {:>6} {:>9} {:>10.1} {:>11} {:>9.1}",
            f("peers"),
            f("rounds"),
            f("messages"),
            f("wall_ms"),
            f("rss_added_kib"),
            f("kib_per_peer")
        ),
    }
}
