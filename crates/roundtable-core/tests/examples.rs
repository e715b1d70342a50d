//! Every example team file under `examples/` validates, and those with offline models
//! run to a recorded stop; the scripted ones reach the outcome their comments describe.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use roundtable_core::Kind;
use roundtable_core::team::{PlanEnv, TeamPlan, parse_team};

struct Dir(PathBuf);
impl PlanEnv for Dir {
    // Examples that use a hosted model name a key variable; validation only checks that
    // it is set, and those examples are validated but not run.
    fn var_is_set(&self, _: &str) -> bool {
        true
    }
    fn read(&self, p: &str) -> Result<String, String> {
        std::fs::read_to_string(self.0.join(p)).map_err(|e| e.to_string())
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn example(name: &str) -> TeamPlan {
    let path = examples().join(name);
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_team(name, &src, &Dir(examples())).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_runs_offline_to_a_stop() {
    let mut kinds = std::collections::BTreeSet::new();
    let mut names: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    for name in &names {
        let mut plan = example(name);
        kinds.insert(plan.protocol.kind());
        let models = plan.peers.iter().filter(|p| !p.is_human()).count();
        if roundtable_core::eval::offline_models(&plan, None).len() < models {
            continue;
        }
        // Nobody sits in a human seat here: its duties wait a moment, then are skipped.
        for p in plan.peers.iter_mut().filter(|p| p.is_human()) {
            p.answer_within_ms = Some(100);
        }
        let topic = plan.topic.clone().expect("examples have a topic");
        let (log, s) = run(&plan, &topic).await;
        assert!(s.stopped && s.stop_reason.is_some(), "{name}");
        stop_of(&log);
        assert!(log.iter().all(|e| e.kind != Kind::Failure || e.usage.is_none()), "{name}: no model call failed");
        for p in plan.peers.iter().filter(|p| p.is_human()) {
            let skipped = log
                .iter()
                .find(|e| e.kind == Kind::Absent && e.body.text.starts_with(&format!("{} did not answer", p.id)));
            assert!(skipped.is_some(), "{name}: the empty seat {} is recorded skipped, with why", p.id);
        }
        folding_by_reference_and_by_value_agree(&plan, &log, name);
    }
    for kind in roundtable_core::team::ProtocolSpec::KINDS {
        assert!(kinds.contains(kind), "no example of {kind}");
    }
}

#[tokio::test]
async fn scripted_examples_reach_their_described_outcome() {
    let cases: [(&str, &str, &str); 5] = [
        ("proposer-critic.toml", "the critics are satisfied in round 2", "Final design: cache the first page"),
        ("judged-debate.toml", "judge verdict in round 2", "Yes, as a one-quarter pilot"),
        (
            "consensus.toml",
            "consensus in round 2: 2 of 2 voters approve",
            "Postgres for orders, with a streaming read replica",
        ),
        ("adversarial.toml", "consensus in round 2: 2 of 2 voters found the objection invalid", "Ship Monday morning"),
        (
            "blackboard.toml",
            "done: reviewer wrote \"APPROVED\" to `review`",
            "Yesterday from 14:05 to 14:45 UTC some customers could not complete checkout. A cache setting expired payment sessions too early. We fixed the setting and added an alert",
        ),
    ];
    for (name, reason, answer) in cases {
        let plan = example(name);
        let (_, s) = run(&plan, plan.topic.as_deref().unwrap()).await;
        assert!(s.stop_reason.as_deref().unwrap().starts_with(reason), "{name}: {:?}", s.stop_reason);
        assert!(s.final_answer.as_deref().unwrap().starts_with(answer), "{name}: {:?}", s.final_answer);
    }
}

#[tokio::test]
async fn the_long_discussion_example_keeps_prompts_flat() {
    let plan = example("long-discussion.toml");
    let (log, _) = run(&plan, plan.topic.as_deref().unwrap()).await;
    let mut per_round = vec![0u64; 6];
    for e in log.iter().filter(|e| e.step.starts_with("turn/")) {
        per_round[e.round as usize] += e.usage.as_ref().unwrap().prompt_tokens;
    }
    // From the third round on, each round's prompts cost the same (the replies carry
    // the turn number, so allow a few tokens of difference).
    let base = per_round[2] as i64;
    assert!(per_round[2..].iter().all(|t| (*t as i64 - base).abs() <= 6), "{per_round:?}");
    assert!(log.iter().filter(|e| e.kind == Kind::Summary).count() >= 3);
}

/// Peers fold owned entries (`SessionState::take`), listings and tests borrowed ones
/// (`apply`): after every entry of a real session, both give every peer the same duties.
fn folding_by_reference_and_by_value_agree(
    plan: &TeamPlan,
    log: &[std::sync::Arc<roundtable_core::Envelope>],
    name: &str,
) {
    use roundtable_core::log::Entry;
    use roundtable_core::session::SessionState;
    let plan = std::sync::Arc::new(plan.clone());
    let session = log[0].session.clone();
    let (mut by_ref, mut by_value) =
        (SessionState::new(plan.clone(), session.clone()), SessionState::new(plan.clone(), session));
    for (i, env) in log.iter().enumerate() {
        let entry = Entry { seq: i as u64 + 1, env: env.clone() };
        by_ref.apply(&entry);
        by_value.take(entry);
        for p in &plan.peers {
            let now = env.time_ms;
            assert_eq!(
                by_ref.duties(&p.id, now),
                by_value.duties(&p.id, now),
                "{name}: {} after entry {}",
                p.id,
                i + 1
            );
        }
        assert_eq!(by_ref.best_answer(), by_value.best_answer(), "{name}: best answer after entry {}", i + 1);
    }
}

/// The variants the examples' own comments suggest are valid, and those that run
/// offline run to a stop.
#[tokio::test]
async fn the_variants_the_examples_comments_suggest_work() {
    let source = |name: &str| std::fs::read_to_string(examples().join(name)).unwrap();
    let parse = |name: &str, src: &str| {
        parse_team(name, src, &Dir(examples())).unwrap_or_else(|e| panic!("{name}, as its comment suggests: {e}"))
    };

    // long-discussion: the [context] table replaced by `policy = "full"` alone.
    let src = source("long-discussion.toml");
    let at = src.find("\n[context]\n").expect("a [context] table") + 1;
    let full = format!("{}[context]\npolicy = \"full\"\n", &src[..at]);
    let plan = parse("long-discussion.toml", &full);
    assert_eq!(plan.context, roundtable_core::team::ContextPolicy::Full);
    let (log, s) = run(&plan, plan.topic.as_deref().unwrap()).await;
    assert!(s.stopped && s.failures == 0, "{:?}", s.stop_reason);
    assert!(log.iter().all(|e| e.kind != Kind::Summary), "no summaries under the full policy");
    // Its prompts grow with the rounds, unlike the summarized original's.
    let (summarized, _) = run(&example("long-discussion.toml"), "topic").await;
    let last_prompt = |log: &[std::sync::Arc<roundtable_core::Envelope>]| {
        log.iter().rfind(|e| e.kind == Kind::Message).and_then(|e| e.usage.as_ref()).unwrap().prompt_tokens
    };
    assert!(last_prompt(&log) > last_prompt(&summarized), "full history costs more prompt tokens by the last turn");

    // work-queue: `on_dependency_failure = "continue"`.
    let src =
        source("work-queue.toml").replace("on_dependency_failure = \"skip\"", "on_dependency_failure = \"continue\"");
    assert!(src.contains("on_dependency_failure = \"continue\""));
    let plan = parse("work-queue.toml", &src);
    let (_, s) = run(&plan, plan.topic.as_deref().unwrap()).await;
    assert!(s.stopped, "{:?}", s.stop_reason);

    // emergent: `similarity = "embedding"` (without an embedder, lexical decides).
    let src = source("emergent.toml").replace("similarity = \"lexical\"", "similarity = \"embedding\"");
    assert!(src.contains("similarity = \"embedding\""));
    let plan = parse("emergent.toml", &src);
    let (_, s) = run(&plan, plan.topic.as_deref().unwrap()).await;
    assert!(s.stopped, "{:?}", s.stop_reason);

    // product-debate: the [models.debater] table replaced by each commented one.
    let src = source("product-debate.toml");
    let blocks: Vec<String> = src
        .split("\n#\n")
        .filter(|b| b.contains("#   provider = "))
        .flat_map(|b| b.split("#   [models.debater]").skip(1).map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(blocks.len() >= 2, "two commented model tables");
    let table_at = src.find("\n[models.debater]\n").unwrap() + 1;
    let table_end = src[table_at..].find("\n[[peers]]").map(|i| table_at + i).unwrap();
    for b in blocks {
        let lines: Vec<String> = b
            .lines()
            .filter_map(|l| l.strip_prefix("#   "))
            .take_while(|l| !l.starts_with('['))
            .map(|l| l.split("  #").next().unwrap().trim_end().to_string())
            .collect();
        let table = format!("[models.debater]\n{}\n", lines.join("\n"));
        let variant = format!("{}{}{}", &src[..table_at], table, &src[table_end..]);
        parse("product-debate.toml", &variant);
    }
}
