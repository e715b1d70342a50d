//! `roundtable eval` through the binary.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_roundtable"))
}

#[test]
fn eval_reports_every_pattern_with_the_baselines_at_equal_calls() {
    let o = bin()
        .args(["eval", "--pattern", "debate", "--agents", "3", "--rounds", "2", "--n", "30", "--seed", "7", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = r["results"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|x| x["pattern"] == name).unwrap_or_else(|| panic!("no {name} row: {r}"));
    let debate = row("debate");
    // Debate with N=3, R=2 makes 6 calls a question; the vote baseline matches it.
    assert_eq!(debate["calls_per_question"], 6.0);
    assert_eq!(row("vote@6")["calls_per_question"], 6.0);
    assert_eq!(row("single")["calls_per_question"], 1.0);
    for x in rows {
        let (acc, lo, hi) =
            (x["accuracy"].as_f64().unwrap(), x["ci_low"].as_f64().unwrap(), x["ci_high"].as_f64().unwrap());
        assert!(lo <= acc && acc <= hi && (0.0..=1.0).contains(&lo) && hi <= 1.0, "{x}");
        assert_eq!(x["questions"], 30);
    }
    // Seeded: the same command gives the same accuracies.
    let again = bin()
        .args(["eval", "--pattern", "debate", "--agents", "3", "--rounds", "2", "--n", "30", "--seed", "7", "--json"])
        .output()
        .unwrap();
    let r2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let acc = |r: &serde_json::Value| {
        r["results"].as_array().unwrap().iter().map(|x| x["correct"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(acc(&r), acc(&r2));

    let text = bin().args(["eval", "--n", "5"]).output().unwrap();
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(t.contains("single (baseline)") && t.contains("95% CI"), "{t}");
}

#[test]
fn eval_rejects_bad_arguments_with_exit_2_and_the_choices() {
    let o = bin().args(["eval", "--pattern", "debat"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`debate`"));
    let o = bin().args(["eval", "--task", "jsonl:/nonexistent/tasks.jsonl"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/tasks.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.jsonl");
    std::fs::write(&f, "{\"question\": \"1+1?\", \"answer\": 2}\n{\"question\": 3}\n").unwrap();
    let o = bin().args(["eval", "--task", &format!("jsonl:{}", f.display())]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(":2"), "{}", String::from_utf8_lossy(&o.stderr));
}
