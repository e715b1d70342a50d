//! The evaluation harness, run through the real runtime with the simulated model.

use roundtable_core::eval::{EvalConfig, EvalModel, EvalTask, Pattern, binomial_majority, parse_jsonl, run_eval};
use roundtable_core::team::VoteRule;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_vote_accuracy_matches_the_binomial_prediction() {
    // Five independent voters, each right with p = 0.6, strict majority: the answer is
    // right exactly when at least 3 of 5 are (wrong answers that form a majority are
    // wrong, and no majority is no answer). Theory: P(X ≥ 3) = 0.68256.
    let n = 400;
    let report = run_eval(EvalConfig {
        task: EvalTask::Arithmetic,
        patterns: vec![Pattern::Vote(Some(5))],
        agents: 5,
        rounds: 1,
        n,
        seed: 11,
        model: EvalModel::Simulated { p_correct: 0.6, susceptibility: 0.0 },
        vote: VoteRule::Majority,
        concurrency: 16,
    })
    .await;
    let predicted = binomial_majority(5, 0.6);
    let single = report.results.iter().find(|r| r.pattern == "single").expect("single baseline");
    let vote = report.results.iter().find(|r| r.pattern == "vote@5").expect("vote@5");
    assert_eq!((vote.questions, vote.errors), (n, 0));
    assert!(
        vote.ci_low <= predicted && predicted <= vote.ci_high,
        "predicted {predicted:.3} outside [{:.3}, {:.3}] (accuracy {:.3})\n{}",
        vote.ci_low,
        vote.ci_high,
        vote.accuracy,
        report.table()
    );
    // The single agent is right with p; voting at 5 calls does better.
    assert!(single.ci_low <= 0.6 && 0.6 <= single.ci_high, "{}", report.table());
    assert!(vote.accuracy > single.accuracy + 0.03, "{}", report.table());
    assert!((vote.calls_per_question - 5.0).abs() < 1e-9 && (single.calls_per_question - 1.0).abs() < 1e-9);
    // Without a majority the vote gives no answer; those sessions are counted.
    assert!(vote.unanswered > 0, "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_runs_and_the_baselines_match_its_calls() {
    let report = run_eval(EvalConfig {
        task: EvalTask::Arithmetic,
        patterns: Pattern::NAMES.iter().map(|n| Pattern::parse(n).unwrap()).collect(),
        agents: 3,
        rounds: 2,
        n: 12,
        seed: 3,
        model: EvalModel::Simulated { p_correct: 0.7, susceptibility: 0.3 },
        vote: VoteRule::Plurality,
        concurrency: 8,
    })
    .await;
    let table = report.table();
    for name in [
        "single",
        "vote@6",
        "debate",
        "jury",
        "judged_debate",
        "proposer_critic",
        "consensus",
        "emergent",
        "adversarial",
        "hybrid",
    ] {
        let r = report.results.iter().find(|r| r.pattern == name).unwrap_or_else(|| panic!("{name} missing\n{table}"));
        assert_eq!(r.errors, 0, "{name}\n{table}");
        assert!(r.calls > 0 && r.tokens > 0, "{name}\n{table}");
    }
    // Debate with N=3, R=2 makes 6 calls a question; its baseline votes with 6 samples.
    let debate = report.results.iter().find(|r| r.pattern == "debate").unwrap();
    assert!((debate.calls_per_question - 6.0).abs() < 1e-9, "{table}");
    // Every multi-agent pattern has a vote baseline at its (rounded) calls per question.
    for r in report.results.iter().filter(|r| !r.baseline) {
        let k = r.calls_per_question.round() as u32;
        if k >= 2 {
            assert!(
                report.results.iter().any(|b| b.baseline && b.pattern == format!("vote@{k}")),
                "{} at {k}\n{table}",
                r.pattern
            );
        }
    }
    assert!(report.results[0].pattern == "single" && report.results[0].baseline);
    let json = report.to_json();
    assert_eq!(json["results"].as_array().unwrap().len(), report.results.len());
    assert!(table.contains("vote@6 (baseline)"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_tasks_are_graded_against_their_answers() {
    let task = parse_jsonl(
        "capitals.jsonl",
        r#"{"question": "What is the capital of France?", "answer": "Paris"}
{"question": "What is the capital of Japan?", "answer": "Tokyo"}
{"question": "How many legs has a spider?", "answer": 8}
"#,
    )
    .unwrap();
    // A perfect simulated model knows the answer key: every pattern is always right.
    let report = run_eval(EvalConfig {
        task,
        patterns: vec![Pattern::Debate],
        n: 10,
        model: EvalModel::Simulated { p_correct: 1.0, susceptibility: 0.0 },
        ..EvalConfig::default()
    })
    .await;
    for r in &report.results {
        assert_eq!((r.questions, r.correct), (3, 3), "{}\n{}", r.pattern, report.table());
    }
    // A hopeless one never is.
    let report = run_eval(EvalConfig {
        task: parse_jsonl("c.jsonl", r#"{"question": "What is the capital of France?", "answer": "Paris"}"#).unwrap(),
        patterns: vec![Pattern::Single],
        model: EvalModel::Simulated { p_correct: 0.0, susceptibility: 0.0 },
        ..EvalConfig::default()
    })
    .await;
    assert!(report.results.iter().all(|r| r.correct == 0), "{}", report.table());
}
