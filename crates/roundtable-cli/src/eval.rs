//! `roundtable eval`: compare collaboration patterns on tasks with known answers, with
//! the single-agent and sample-and-vote baselines at an equal number of calls.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use roundtable_core::eval::{EvalConfig, EvalModel, Pattern, run_eval, task_from_arg};
use roundtable_core::model::ChatModel;
use roundtable_core::model::layers::{LayerConfig, RetryPolicy, standard_stack};
use roundtable_core::team::VoteRule;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Vote {
    /// The most common answer wins (ties to team order).
    Plurality,
    /// An answer needs more than half the votes, or there is no answer.
    Majority,
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// `arithmetic` (Du et al.: a+b*c+d-e*f, integers 0-29, seeded) or `jsonl:FILE`
    /// (one {"question": ..., "answer": ...} per line).
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Patterns, comma-separated: single, vote, vote@K, debate, jury, judged_debate,
    /// proposer_critic, consensus, emergent, adversarial, hybrid. The single-agent and
    /// sample-and-vote baselines are always added, at an equal number of calls.
    #[arg(long, default_value = "debate")]
    pattern: String,
    /// Agents per team (N).
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Rounds (R).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Questions.
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The simulated model's probability of answering correctly.
    #[arg(long, default_value_t = 0.6)]
    p_correct: f64,
    /// The simulated model's chance of adopting its peers' majority answer.
    #[arg(long, default_value_t = 0.0)]
    susceptibility: f64,
    /// Use a model of a team file instead of the simulated one (with --model).
    #[arg(long, requires = "model")]
    team: Option<std::path::PathBuf>,
    /// The model's key in the team file's [models] (with --team).
    #[arg(long, requires = "team")]
    model: Option<String>,
    /// How debate and sample-and-vote count final answers.
    #[arg(long, value_enum, default_value = "plurality")]
    vote: Vote,
    /// Sessions run at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Bad arguments are `Err(Input)`; sessions that could not run, or whose model calls all
/// failed, are counted in their row's `errors`. When every session of every row is an
/// error (an unreachable endpoint, a rejected key), the report is printed and the result
/// is a runtime failure naming the count: a total failure must not look like a bad model.
pub(crate) async fn run(a: EvalArgs) -> Result<(), crate::Failure> {
    run_checked(a).await.map_err(crate::Failure::Input)?.map_err(crate::Failure::Runtime)
}

async fn run_checked(a: EvalArgs) -> Result<Result<(), String>, String> {
    let task = task_from_arg(&a.task, &|f| std::fs::read_to_string(f).map_err(|e| e.to_string()))?;
    let patterns = Pattern::parse_list(&a.pattern)?;
    if patterns.is_empty() {
        return Err(format!("--pattern is empty; valid: {}", Pattern::NAMES.join(", ")));
    }
    if a.agents == 0 || a.rounds == 0 || a.n == 0 {
        return Err("--agents, --rounds and --n must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&a.p_correct) || !(0.0..=1.0).contains(&a.susceptibility) {
        return Err("--p-correct and --susceptibility must be between 0 and 1".into());
    }
    let model = match (&a.team, &a.model) {
        (Some(team), Some(key)) => {
            let plan = crate::load_plan_for_eval(team)?;
            let spec = plan.models.get(key).ok_or_else(|| {
                let keys: Vec<String> = plan.models.keys().map(|k| format!("`{k}`")).collect();
                format!("{}: no model `{key}`; defined models: {}", team.display(), keys.join(", "))
            })?;
            let raw = crate::factory::provider(key, spec).map_err(|e| e.to_string())?;
            let layered: Arc<dyn ChatModel> = standard_stack(
                raw,
                LayerConfig {
                    retry: RetryPolicy { max_retries: spec.max_retries, ..RetryPolicy::default() },
                    timeout: std::time::Duration::from_millis(spec.timeout_ms),
                    max_concurrency: spec.max_concurrency,
                },
                None,
            );
            EvalModel::Custom {
                name: format!("{key} ({})", spec.provider.kind()),
                factory: Arc::new(move |_| layered.clone()),
            }
        }
        _ => EvalModel::Simulated { p_correct: a.p_correct, susceptibility: a.susceptibility },
    };
    let report = run_eval(EvalConfig {
        task,
        patterns,
        agents: a.agents,
        rounds: a.rounds,
        n: a.n,
        seed: a.seed,
        model,
        vote: match a.vote {
            Vote::Plurality => VoteRule::Plurality,
            Vote::Majority => VoteRule::Majority,
        },
        concurrency: a.concurrency.max(1),
    })
    .await;
    let written = if a.json {
        crate::print_out(&serde_json::to_string_pretty(&report.to_json()).expect("serializes"))
    } else {
        crate::print_out(report.table().trim_end())
    };
    if let Err(e) = written {
        return Ok(Err(format!("writing the report to stdout: {e}")));
    }
    let sessions: usize = report.results.iter().map(|r| r.questions).sum();
    let errors: usize = report.results.iter().map(|r| r.errors).sum();
    if sessions > 0 && errors == sessions {
        return Ok(Err(format!(
            "all {errors} sessions failed (no model call was answered); see the errors above, or check the endpoint and key"
        )));
    }
    Ok(Ok(()))
}
