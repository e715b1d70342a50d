//! `dataproc` at small size: agents as processes of their own, some SIGKILLed mid-run,
//! in both modes; every event recorded once on the log, none lost, none twice. Bad
//! input exits 2. Timings are not checked here (they go in BENCHMARKS.md).

use std::process::Command;

fn dataproc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dataproc"))
}

#[test]
fn agents_killed_mid_run_lose_nothing_and_nothing_is_recorded_twice_in_both_modes() {
    let o = dataproc()
        .args(["run", "--mode", "both", "--agents", "6", "--partitions", "8", "--events", "12", "--batch", "4"])
        .args(["--hot", "2", "--hot-ms", "40", "--cold-ms", "2", "--kill", "2", "--kill-at", "0.3"])
        .args(["--absent-after-ms", "1000"])
        .output()
        .expect("dataproc runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}\nstdout: {stdout}\nstderr: {stderr}", o.status.code());
    let runs: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["p2p", "coordinator"], "{stdout}");
    for r in &runs {
        assert_eq!(r["events"], 96, "{r}");
        assert_eq!(r["recorded"], 96, "every event recorded: {r}");
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["recorded_twice"], 0, "{r}");
        assert_eq!(r["killed"], 2, "{r}");
        // The killed agents held the hot partitions' batches: someone finished them.
        assert!(r["taken_over"].as_u64().unwrap() >= 1, "a dead agent's batch taken over: {r}");
    }
}

#[test]
fn bad_input_exits_2_and_names_the_flag_and_its_range() {
    for (args, needle) in [
        (vec!["run", "--agents", "0"], "--agents 0: valid: 1 to 200"),
        (vec!["run", "--hot", "40", "--partitions", "8"], "--hot 40: valid: 0 to 8"),
        (vec!["run", "--kill", "15"], "--kill 15: valid: 0 to 14"),
        (vec!["run", "--mode", "central"], "valid: p2p, coordinator, both"),
        (vec!["run", "--speed", "1"], "unknown flag"),
        (vec!["run", "--kill-at", "2"], "--kill-at 2: valid: 0 to 1"),
    ] {
        let o = dataproc().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
