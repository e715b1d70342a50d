//! `dataproc` at small size: agents as processes of their own, some SIGKILLed mid-run,
//! or the NATS server SIGKILLed and restarted mid-run, in both modes; every event
//! recorded once on the log, none lost, none twice. Bad input exits 2. Timings are not
//! checked here (they go in BENCHMARKS.md).

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

/// Issue 13: the run's own nats-server SIGKILLed once 30% of the events are recorded
/// and started again on the same port and store a second later, in both modes. Nothing
/// acknowledged is lost (every event has its record), nothing is recorded twice, and no
/// event is processed twice: an append retried across the restart that finds its own
/// first attempt on the log is not a second processing, and a batch the coordinator
/// sends again after reconnecting is looked up event by event first. No agent is killed
/// here, and the absence limit is long, so no batch is taken over.
#[test]
fn the_server_killed_and_restarted_mid_run_loses_nothing_and_processes_each_event_once() {
    let o = dataproc()
        .args(["run", "--mode", "both", "--agents", "4", "--partitions", "6", "--events", "20", "--batch", "4"])
        .args(["--hot", "1", "--hot-ms", "80", "--cold-ms", "40", "--absent-after-ms", "10000"])
        .args(["--restart-server-at", "0.3", "--server-down-ms", "1000"])
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
        assert_eq!(r["server_restarts"], 1, "the server was killed and restarted mid-run: {r}");
        // Killed in the middle: most of the work was still to do.
        let at = r["recorded_at_server_kill"].as_u64().unwrap();
        assert!((36..=80).contains(&at), "killed with {at} of 120 events recorded: {r}");
        assert_eq!(r["events"], 120, "{r}");
        assert_eq!(r["recorded"], 120, "every event recorded: {r}");
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["recorded_twice"], 0, "{r}");
        assert_eq!(r["reexecuted"], 0, "no event processed twice: {r}");
        assert_eq!((r["killed"].as_u64(), r["taken_over"].as_u64()), (Some(0), Some(0)), "{r}");
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
        (vec!["run", "--restart-server-at", "2"], "--restart-server-at 2: valid: 0 to 1"),
        (vec!["run", "--restart-server-at", "NaN"], "--restart-server-at NaN: valid: 0 to 1"),
        (vec!["run", "--server-down-ms", "-1"], "--server-down-ms \"-1\": not a number"),
        (vec!["run", "--server-down-ms", "70000"], "--server-down-ms 70000: valid: 0 to 60000"),
        (
            vec!["run", "--restart-server-at", "0.5", "--nats", "nats://127.0.0.1:1"],
            "--restart-server-at restarts the run's own server: valid only without --nats",
        ),
    ] {
        let o = dataproc().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
