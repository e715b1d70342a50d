//! Property-based fuzzing of the three readers of outside input: the team-file parser,
//! the envelope decoder and `import`'s checks. Nothing panics, and whatever is accepted
//! writes out and reads back the same (nothing that parses is unwritable). Run at a
//! small size here; raise `PROPTEST_CASES` to search longer.

use std::collections::BTreeSet;

use proptest::prelude::*;
use roundtable_core::envelope::{Body, Envelope, Kind, PeerId, Recipient, SessionId};
use roundtable_core::log::jsonl;
use roundtable_core::session::plan_of;
use roundtable_core::team::{NoEnv, TeamPlan, parse_team};

const TEAM: &str = r#"name = "fuzz"
topic = "t"
[models.s]
provider = "simulated"
max_concurrency = 4
timeout_secs = 30.0
price = { prompt_per_mtok = 0.5, completion_per_mtok = 1.5 }
[[peers]]
id = "a"
model = "s"
[[peers]]
id = "b"
model = "s"
[[peers]]
id = "c"
model = "s"
[protocol]
kind = "debate"
rounds = 2
[termination]
confidence = 0.9
max_rounds = 5
[budget]
max_cost_usd = 1.0
[context]
policy = "last_k"
k = 4
"#;

/// Values a user might type for any key: numbers at and past every edge, NaN, strings,
/// arrays and tables.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("-0.0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("9223372036854775807".to_string()),
        Just("4294967295".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[\"a\", \"a\"]".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "[a-z_ ]{0,8}".prop_map(|s| format!("{s:?}")),
    ]
}

/// The valid team file with one value replaced (every line `key = value` is a target).
fn mutated_team() -> impl Strategy<Value = String> {
    let lines: Vec<usize> =
        TEAM.lines().enumerate().filter(|(_, l)| l.contains(" = ") && !l.starts_with('[')).map(|(i, _)| i).collect();
    (proptest::sample::select(lines), value()).prop_map(|(at, v)| {
        TEAM.lines()
            .enumerate()
            .map(|(i, l)| if i == at { format!("{} = {v}", l.split(" = ").next().unwrap()) } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn a_plan_round_trips(plan: &TeamPlan) {
    let json = serde_json::to_string(plan).expect("a valid plan serializes");
    let back: TeamPlan = serde_json::from_str(&json).unwrap_or_else(|e| panic!("unreadable plan {json}: {e}"));
    assert_eq!(&back, plan);
}

fn an_envelope() -> Envelope {
    let s = SessionId::from("s1");
    Envelope::new(&s, &PeerId::from("a"), "r0/answer", Kind::Message, Recipient::All, Body::text("Answer: 4"))
}

/// An envelope's JSON with one field replaced by an arbitrary JSON value.
fn mutated_envelope() -> impl Strategy<Value = String> {
    let fields =
        ["v", "id", "session", "from", "to", "kind", "step", "body", "parents", "round", "lamport", "usage", "time_ms"];
    let json = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!({"text": "x", "json": {"a": 1e300}})),
        Just(
            serde_json::json!({"model": "m", "prompt_tokens": 1, "completion_tokens": 2, "latency_ms": 3, "cost_usd": -1})
        ),
        Just(serde_json::json!({"type": "peer", "id": ""})),
        Just(serde_json::json!([])),
    ];
    (proptest::sample::select(fields.to_vec()), json).prop_map(|(field, v)| {
        let mut e = serde_json::to_value(an_envelope()).unwrap();
        e[field] = v;
        e.to_string()
    })
}

/// A session's export: the task with the plan, turns by its peers, the stop.
fn export_lines() -> Vec<serde_json::Value> {
    let plan = parse_team("t.toml", TEAM, &NoEnv).unwrap();
    let s = SessionId::from("20261207-000000-abcdef");
    let task = roundtable_core::session::task_envelope(&s, &plan, "t");
    let mut out = vec![serde_json::to_value(&task).unwrap()];
    let mut last = task.id.clone();
    for (i, p) in ["a", "b", "c"].iter().enumerate() {
        let e = Envelope::new(&s, &PeerId::from(*p), format!("r0/{i}"), Kind::Message, Recipient::All, Body::text("x"))
            .with_parents(vec![last.clone()]);
        last = e.id.clone();
        out.push(serde_json::to_value(&e).unwrap());
    }
    out
}

fn roster(task: &Envelope) -> Result<BTreeSet<PeerId>, String> {
    Ok(plan_of(task)?.peer_ids().into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_team_parser_never_panics_on_any_text(src in "(?s).{0,400}") {
        if let Ok(plan) = parse_team("t.toml", &src, &NoEnv) {
            a_plan_round_trips(&plan);
        }
    }

    #[test]
    fn a_team_file_with_any_value_changed_is_refused_or_writable(src in mutated_team()) {
        match parse_team("t.toml", &src, &NoEnv) {
            Ok(plan) => a_plan_round_trips(&plan),
            Err(e) => {
                // Every error names a line of the file.
                let lines = src.lines().count().max(1) + 1;
                prop_assert!(e.0.iter().all(|e| e.line >= 1 && e.line <= lines), "{e}");
            }
        }
    }

    #[test]
    fn the_envelope_decoder_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(env) = Envelope::from_json(&bytes) {
            prop_assert_eq!(Envelope::from_json(env.to_json().as_bytes()).unwrap(), env);
        }
    }

    #[test]
    fn a_decoded_envelope_always_writes_and_reads_back(json in mutated_envelope()) {
        if let Ok(env) = Envelope::from_json(json.as_bytes()) {
            prop_assert_eq!(Envelope::from_json(env.to_json().as_bytes()).unwrap(), env);
        }
    }

    #[test]
    fn import_never_panics_and_accepts_only_consistent_files(
        edits in proptest::collection::vec((0usize..4, proptest::sample::select(vec!["from", "id", "step", "session", "kind", "parents"]), ".{0,6}"), 0..3),
        swap in proptest::option::weighted(0.3, (0usize..4, 0usize..4)),
    ) {
        let base = export_lines();
        let mut lines = base.clone();
        if let Some((i, j)) = swap {
            lines.swap(i, j);
        }
        for (i, field, v) in &edits {
            lines[*i][*field] = serde_json::Value::from(v.as_str());
        }
        let text: String = lines.iter().map(|e| format!("{e}\n")).collect();
        let checked = jsonl::parse_lines("f.jsonl", &text).and_then(|l| jsonl::check_session("f.jsonl", &l, roster).map(|()| l));
        let unchanged = lines == base;
        match checked {
            Ok(_) => prop_assert!(unchanged, "an altered file was accepted: {text}"),
            Err(e) => {
                prop_assert!(!unchanged, "the unaltered export was refused: {e}");
                prop_assert!(e.line <= lines.len(), "{e}");
            }
        }
    }
}
