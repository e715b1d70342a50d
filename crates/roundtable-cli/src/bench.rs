//! `roundtable bench`: run the benchmark workloads and print a table (or JSON lines).
//!
//! A sweep runs every configuration in a child process of its own, so each one's
//! memory figures start from a clean process; `--repeat K` runs each K times and
//! reports medians.

use std::process::Command;

use clap::{Args, ValueEnum};
use roundtable_bench::median;
use roundtable_bench::nats::{NatsConfig, nats};
use roundtable_bench::rounds::{RoundsConfig, rounds};
use roundtable_bench::tokens::{Policy, TokensConfig, tokens};
use roundtable_bench::workloads::{GroupChatConfig, ScaleConfig, group_chat, scale};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// Round robin over an instant mock model; every peer sees every message.
    Groupchat,
    /// Memory per peer for idle and active peers; a session with many peers.
    Scale,
    /// Debate over a mock model with a fixed latency: wall time against rounds × latency.
    Rounds,
    /// Prompt tokens per round of round robin under each context policy.
    Tokens,
    /// Direct-message latency, work-queue and log-append throughput on a nats-server
    /// started for the run, against raw NATS.
    Nats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PolicyArg {
    Full,
    #[value(name = "last_k")]
    LastK,
    Summary,
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
    /// Peers, comma-separated [groupchat, scale: 2,4,8,16; rounds: 3,8,32; tokens: 8].
    #[arg(long, value_delimiter = ',')]
    peers: Vec<usize>,
    /// Messages per session (the task included), comma-separated (groupchat).
    #[arg(long, value_delimiter = ',', default_values_t = vec![200, 1000, 5000])]
    messages: Vec<u64>,
    /// Persist the session log in SQLite (groupchat, rounds).
    #[arg(long, value_enum, default_value = "both")]
    persist: Persist,
    /// Have the mock model read the whole history on every call, as a provider
    /// serializing it would (groupchat).
    #[arg(long)]
    walk_history: bool,
    /// Messages of an untimed session run first in the same process, so that the
    /// measured one runs warm (groupchat; 0 for a cold start).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Append every measured session's gaps between consecutive model calls (µs, in
    /// order) to this file, one JSON object per session (groupchat): where a slow
    /// stretch or a lone stall sits in the session.
    #[arg(long)]
    gaps: Option<std::path::PathBuf>,
    /// Rounds, comma-separated [scale: 0,1 (rounds of round robin; 0 measures idle
    /// peers); rounds: 3 (debate rounds, round 0 included); tokens: 20].
    #[arg(long, value_delimiter = ',')]
    rounds: Vec<u32>,
    /// The mock model's latency per call, in ms (rounds).
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Context policies, comma-separated (tokens).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["full", "last_k", "summary"])]
    policy: Vec<PolicyArg>,
    /// Messages kept by `last_k` (tokens).
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Rounds kept in full by `summary` (tokens).
    #[arg(long, default_value_t = 1)]
    keep_rounds: u32,
    /// Bytes of every model reply (tokens).
    #[arg(long, default_value_t = 400)]
    reply_bytes: usize,
    /// Messages timed per latency measurement (nats).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Tasks through the work queue (nats).
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Concurrent work-queue claimers, each on its own connection (nats).
    #[arg(long, default_value_t = 20)]
    claimers: usize,
    /// Envelopes per session-log append measurement (nats).
    #[arg(long, default_value_t = 5000)]
    appends: usize,
    /// Concurrent appenders on one connection (nats).
    #[arg(long, default_value_t = 20)]
    appenders: usize,
    /// Signed sessions: every envelope signed by its author and verified by each
    /// reading process (nats).
    #[arg(long)]
    signed: bool,
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

pub(crate) async fn run(mut a: BenchArgs) -> Result<(), String> {
    if a.peers.is_empty() {
        a.peers = match a.workload {
            Workload::Rounds => vec![3, 8, 32],
            Workload::Tokens => vec![8],
            _ => vec![2, 4, 8, 16],
        };
    }
    if a.rounds.is_empty() {
        a.rounds = match a.workload {
            Workload::Rounds => vec![3],
            Workload::Tokens => vec![20],
            _ => vec![0, 1],
        };
    }
    if a.single {
        let v = match a.workload {
            Workload::Groupchat => {
                let r = group_chat(GroupChatConfig {
                    peers: a.peers[0],
                    messages: a.messages[0],
                    persist: a.persist == Persist::On,
                    walk_history: a.walk_history,
                    warmup: a.warmup,
                })
                .await?;
                if let Some(path) = &a.gaps {
                    write_gaps(path, &r)?;
                }
                serde_json::to_value(r)
            }
            Workload::Scale => {
                serde_json::to_value(scale(ScaleConfig { peers: a.peers[0], rounds: a.rounds[0] }).await?)
            }
            Workload::Rounds => serde_json::to_value(
                rounds(RoundsConfig {
                    peers: a.peers[0],
                    rounds: a.rounds[0],
                    latency_ms: a.latency_ms,
                    persist: a.persist == Persist::On,
                })
                .await?,
            ),
            Workload::Tokens => {
                let policy = match a.policy[0] {
                    PolicyArg::Full => Policy::Full,
                    PolicyArg::LastK => Policy::LastK { k: a.k },
                    PolicyArg::Summary => Policy::Summary { keep_rounds: a.keep_rounds },
                };
                let cfg = TokensConfig { peers: a.peers[0], rounds: a.rounds[0], policy, reply_bytes: a.reply_bytes };
                serde_json::to_value(tokens(cfg).await?)
            }
            Workload::Nats => serde_json::to_value(
                nats(NatsConfig {
                    samples: a.samples,
                    tasks: a.tasks,
                    claimers: a.claimers,
                    appends: a.appends,
                    appenders: a.appenders,
                    signed: a.signed,
                })
                .await?,
            ),
        }
        .map_err(|e| e.to_string())?;
        let mut v = v;
        if let Some(obj) = v.as_object_mut() {
            // Which process ran it: each run of a sweep is a process of its own.
            obj.insert("pid".into(), serde_json::json!(std::process::id()));
        }
        println!("{v}");
        return Ok(());
    }
    let mut configs: Vec<Vec<String>> = Vec::new();
    let persists: &[&str] = match a.persist {
        Persist::On => &["on"],
        Persist::Off => &["off"],
        Persist::Both => &["off", "on"],
    };
    match a.workload {
        Workload::Groupchat => {
            for &m in &a.messages {
                for &n in &a.peers {
                    for p in persists {
                        let mut args = vec![
                            "groupchat".into(),
                            format!("--peers={n}"),
                            format!("--messages={m}"),
                            format!("--persist={p}"),
                            format!("--warmup={}", a.warmup),
                        ];
                        if a.walk_history {
                            args.push("--walk-history".into());
                        }
                        if let Some(path) = &a.gaps {
                            args.push(format!("--gaps={}", path.display()));
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
        Workload::Rounds => {
            for &r in &a.rounds {
                for &n in &a.peers {
                    for p in persists {
                        configs.push(vec![
                            "rounds".into(),
                            format!("--peers={n}"),
                            format!("--rounds={r}"),
                            format!("--latency-ms={}", a.latency_ms),
                            format!("--persist={p}"),
                        ]);
                    }
                }
            }
        }
        Workload::Tokens => {
            for &n in &a.peers {
                for &r in &a.rounds {
                    for p in &a.policy {
                        let p = p.to_possible_value().expect("policy names").get_name().to_string();
                        configs.push(vec![
                            "tokens".into(),
                            format!("--peers={n}"),
                            format!("--rounds={r}"),
                            format!("--policy={p}"),
                            format!("--k={}", a.k),
                            format!("--keep-rounds={}", a.keep_rounds),
                            format!("--reply-bytes={}", a.reply_bytes),
                        ]);
                    }
                }
            }
        }
        Workload::Nats => configs.push(vec![
            "nats".into(),
            format!("--samples={}", a.samples),
            format!("--tasks={}", a.tasks),
            format!("--claimers={}", a.claimers),
            format!("--appends={}", a.appends),
            format!("--appenders={}", a.appenders),
            format!("--signed={}", a.signed),
        ]),
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
    if a.workload == Workload::Tokens && !a.json {
        print_tokens_per_round(&rows);
    }
    Ok(())
}

/// Append one session's gaps to `path` as a JSON line.
fn write_gaps(path: &std::path::Path, r: &roundtable_bench::workloads::GroupChatResult) -> Result<(), String> {
    use std::io::Write;
    let c = &r.config;
    let line = serde_json::json!({
        "peers": c.peers, "messages": c.messages, "persist": c.persist, "warmup": c.warmup,
        "walk_history": c.walk_history, "gaps_us": r.gaps_us,
    });
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Prompt tokens per round, one column per configuration (tokens).
fn print_tokens_per_round(rows: &[serde_json::Value]) {
    println!();
    print!("{:>5}", "round");
    for r in rows {
        print!(" {:>12}", r["policy"].as_str().unwrap_or("?"));
    }
    println!();
    let n = rows.iter().filter_map(|r| r["per_round"].as_array().map(Vec::len)).max().unwrap_or(0);
    for i in 0..n {
        print!("{:>5}", i + 1);
        for r in rows {
            print!(" {:>12}", r["per_round"][i]["prompt_tokens"].as_u64().unwrap_or(0));
        }
        println!();
    }
}

/// The first run's fields, with every number replaced by the median over runs; each
/// measure's values run by run under `per_run`, and the runs' process ids under `pids`.
fn median_row(runs: &[serde_json::Value]) -> serde_json::Value {
    let mut row = runs[0].clone();
    if let Some(obj) = row.as_object_mut() {
        obj.remove("pid");
        let mut per_run = serde_json::Map::new();
        for (k, v) in obj.iter_mut() {
            let setting = matches!(
                k.as_str(),
                "peers"
                    | "messages"
                    | "rounds"
                    | "latency_ms"
                    | "k"
                    | "keep_rounds"
                    | "reply_bytes"
                    | "samples"
                    | "tasks"
                    | "claimers"
                    | "appends"
                    | "appenders"
                    | "signed"
                    | "warmup"
            );
            if v.is_f64() || (v.is_u64() && !setting) {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r[k].as_f64()).collect();
                per_run.insert(k.clone(), serde_json::json!(xs));
                *v = serde_json::json!(median(xs));
            }
        }
        obj.insert("runs".into(), serde_json::json!(runs.len()));
        obj.insert("per_run".into(), serde_json::Value::Object(per_run));
        let pids: Vec<&serde_json::Value> = runs.iter().filter_map(|r| r.get("pid")).collect();
        if !pids.is_empty() {
            obj.insert("pids".into(), serde_json::json!(pids));
        }
    }
    row
}

fn print_header(w: Workload) {
    match w {
        Workload::Groupchat => println!(
            "{:>5} {:>6} {:>7} {:>12} {:>8} {:>10} {:>10} {:>6} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8} {:>9}",
            "peers",
            "msgs",
            "persist",
            "msgs/s",
            "start µs",
            "µs first",
            "µs last",
            "ratio",
            "med first",
            "med last",
            "ratio",
            "peak MiB",
            "added MiB",
            "×payload",
            "code MiB"
        ),
        Workload::Scale => {
            println!(
                "{:>6} {:>6} {:>9} {:>10} {:>11} {:>9} {:>9}",
                "peers", "rounds", "messages", "wall ms", "added KiB", "KiB/peer", "RSS+ KiB"
            )
        }
        Workload::Rounds => println!(
            "{:>5} {:>6} {:>7} {:>6} {:>9} {:>9} {:>6} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9}",
            "peers",
            "rounds",
            "persist",
            "L ms",
            "R×L ms",
            "wall ms",
            "ratio",
            "overhead",
            "start",
            "spread",
            "handoff",
            "stop",
            "call+"
        ),
        Workload::Tokens => println!(
            "{:>8} {:>5} {:>6} {:>13} {:>13} {:>12} {:>11} {:>10}",
            "policy", "peers", "rounds", "round 5 tok", "last rnd tok", "total tok", "max dev r5", "summaries"
        ),
        Workload::Nats => {}
    }
}

fn print_row(w: Workload, r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    match w {
        Workload::Groupchat => println!(
            "{:>5} {:>6} {:>7} {:>12.0} {:>8.0} {:>10.2} {:>10.2} {:>6.2} {:>9.2} {:>9.2} {:>6.2} {:>10.1} {:>10.2} {:>8.2} {:>9.1}",
            f("peers"),
            f("messages"),
            if r["persist"].as_bool() == Some(true) { "on" } else { "off" },
            f("messages_per_sec"),
            f("start_us"),
            f("us_per_msg_first100"),
            f("us_per_msg_last100"),
            f("last_over_first"),
            f("us_median_first100"),
            f("us_median_last100"),
            f("median_last_over_first"),
            f("peak_rss_kib") / 1024.0,
            f("added_kib") / 1024.0,
            f("added_over_payload"),
            f("code_paged_in_kib") / 1024.0,
        ),
        Workload::Scale => println!(
            "{:>6} {:>6} {:>9} {:>10.1} {:>11} {:>9.1} {:>9}",
            f("peers"),
            f("rounds"),
            f("messages"),
            f("wall_ms"),
            f("added_kib"),
            f("kib_per_peer"),
            f("rss_added_kib")
        ),
        Workload::Rounds => println!(
            "{:>5} {:>6} {:>7} {:>6} {:>9.0} {:>9.1} {:>6.3} {:>9.2} {:>8.2} {:>9.2} {:>9.2} {:>8.2} {:>9.2}",
            f("peers"),
            f("rounds"),
            if r["persist"].as_bool() == Some(true) { "on" } else { "off" },
            f("latency_ms"),
            f("critical_path_ms"),
            f("wall_ms"),
            f("ratio"),
            f("overhead_ms"),
            f("start_ms"),
            f("max_round_spread_ms"),
            f("mean_handoff_ms"),
            f("stop_ms"),
            f("mean_call_excess_ms"),
        ),
        Workload::Tokens => {
            let summaries: u64 =
                r["per_round"].as_array().map_or(0, |rs| rs.iter().filter_map(|x| x["summaries"].as_u64()).sum());
            let policy = match r["policy"].as_str().unwrap_or("?") {
                "last_k" => format!("last_k={}", f("k")),
                "summary" => format!("summary/{}", f("keep_rounds")),
                p => p.to_string(),
            };
            println!(
                "{:>8} {:>5} {:>6} {:>13} {:>13} {:>12} {:>10.1}% {:>10}",
                policy,
                f("peers"),
                f("rounds"),
                f("round5_prompt_tokens"),
                f("last_round_prompt_tokens"),
                f("total_prompt_tokens"),
                f("max_dev_from_round5") * 100.0,
                summaries
            )
        }
        Workload::Nats => {
            println!(
                "nats-server {}; messages of {} bytes",
                r["server_version"].as_str().unwrap_or("?"),
                f("message_bytes")
            );
            println!("{:<42} {:>9} {:>9}", "latency, one message at a time", "p50 µs", "p99 µs");
            for (what, k) in [
                ("raw core NATS publish → subscriber", "raw_pubsub"),
                ("raw core NATS request/reply", "raw_request"),
                ("raw JetStream publish until ack", "js_publish"),
                ("Roundtable log append (sender side)", "append"),
                ("Roundtable direct message (append → tail)", "dm"),
                ("Roundtable direct message and answer", "dm_roundtrip"),
            ] {
                println!("{what:<42} {:>9.0} {:>9.0}", f(&format!("{k}_p50_us")), f(&format!("{k}_p99_us")));
            }
            println!("direct message p50 / raw request/reply p50: {:.2} (target ≤ 2)", f("dm_over_raw_request_p50"));
            if r["signed"].as_bool() == Some(true) {
                println!("signed sessions: sign {:.1} µs, verify {:.1} µs per envelope", f("sign_us"), f("verify_us"));
            }
            println!("{:<42} {:>9}", "throughput", "per s");
            let c = f("claimers");
            for (what, k) in [
                (format!("work queue: push ({c} pushers)"), "queue_pushes_per_sec"),
                (format!("work queue: claim + ack ({c} claimers)"), "queue_claim_acks_per_sec"),
                ("work queue: push → claim → ack".to_string(), "queue_tasks_per_sec"),
                ("log append, sequential".to_string(), "append_sequential_per_sec"),
                (format!("log append, {} concurrent appenders", f("appenders")), "append_concurrent_per_sec"),
            ] {
                println!("{what:<42} {:>9.0}", f(k));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_holds_the_median_of_every_measure_and_the_settings_as_given() {
        let runs = [
            serde_json::json!({"workload": "groupchat", "peers": 3, "messages_per_sec": 100.0, "wall_us": 9}),
            serde_json::json!({"workload": "groupchat", "peers": 3, "messages_per_sec": 300.0, "wall_us": 1}),
            serde_json::json!({"workload": "groupchat", "peers": 3, "messages_per_sec": 200.0, "wall_us": 5}),
        ];
        let row = median_row(&runs);
        assert_eq!(row["messages_per_sec"], 200.0, "the middle run, not the first or the mean");
        assert_eq!(row["wall_us"], 5.0);
        assert_eq!((row["peers"].as_u64(), row["runs"].as_u64()), (Some(3), Some(3)));
        assert_eq!(row["workload"], "groupchat");
        assert_eq!(row["per_run"]["messages_per_sec"], serde_json::json!([100.0, 300.0, 200.0]));
        let even = median_row(&runs[..2]);
        assert_eq!(even["messages_per_sec"], 200.0, "the mean of the middle two");
    }
}
