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
    /// (Default: the team file's protocol with --team when it is one of these, else
    /// debate.)
    #[arg(long)]
    pattern: Option<String>,
    /// Agents per team (N). (Default: the team file's peers with --team, else 3.)
    #[arg(long)]
    agents: Option<usize>,
    /// Rounds (R). (Default: the team file's protocol rounds with --team, else 2.)
    #[arg(long)]
    rounds: Option<u32>,
    /// Questions.
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Seeds the questions (and the simulated model). (Default: a simulated team
    /// model's own `seed` with --team, else 0.)
    #[arg(long)]
    seed: Option<u64>,
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
    /// How debate and sample-and-vote count final answers. (Default: a debate team
    /// file's `vote` with --team, else plurality.)
    #[arg(long, value_enum)]
    vote: Option<Vote>,
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
    let team = match &a.team {
        Some(t) => Some(crate::load_plan_for_eval(t)?),
        None => None,
    };
    let defaults = TeamDefaults::of(team.as_ref(), a.model.as_deref());
    let pattern = a.pattern.clone().or(defaults.pattern).unwrap_or_else(|| "debate".into());
    let patterns = Pattern::parse_list(&pattern)?;
    if patterns.is_empty() {
        return Err(format!("--pattern is empty; valid: {}", Pattern::NAMES.join(", ")));
    }
    let agents = a.agents.or(defaults.agents).unwrap_or(3);
    let rounds = a.rounds.or(defaults.rounds).unwrap_or(2);
    let seed = a.seed.or(defaults.seed).unwrap_or(0);
    if agents == 0 || rounds == 0 || a.n == 0 {
        return Err("--agents, --rounds and --n must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&a.p_correct) || !(0.0..=1.0).contains(&a.susceptibility) {
        return Err("--p-correct and --susceptibility must be between 0 and 1".into());
    }
    let model = match (&team, &a.team, &a.model) {
        (Some(plan), Some(team), Some(key)) => {
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
    let vote = a.vote.map(|v| match v {
        Vote::Plurality => VoteRule::Plurality,
        Vote::Majority => VoteRule::Majority,
    });
    let report = run_eval(EvalConfig {
        task,
        patterns,
        agents,
        rounds,
        n: a.n,
        seed,
        model,
        vote: vote.or(defaults.vote).unwrap_or(VoteRule::Plurality),
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

/// What `--team` contributes when a flag is not given: the team's protocol (when it is
/// a pattern), its peers, its rounds, its debate vote, and a simulated model's seed.
#[derive(Debug, Default, PartialEq)]
struct TeamDefaults {
    pattern: Option<String>,
    agents: Option<usize>,
    rounds: Option<u32>,
    vote: Option<VoteRule>,
    seed: Option<u64>,
}

impl TeamDefaults {
    fn of(plan: Option<&roundtable_core::team::TeamPlan>, model: Option<&str>) -> Self {
        let Some(plan) = plan else { return TeamDefaults::default() };
        let kind = plan.protocol.kind();
        let protocol = serde_json::to_value(&plan.protocol).unwrap_or_default();
        TeamDefaults {
            pattern: Pattern::NAMES.contains(&kind).then(|| kind.to_string()),
            agents: Some(plan.peers.len()),
            rounds: protocol.get("rounds").and_then(|r| r.as_u64()).map(|r| r as u32),
            vote: match &plan.protocol {
                roundtable_core::team::ProtocolSpec::Debate(d) => Some(d.vote),
                _ => None,
            },
            seed: model.and_then(|m| match &plan.models.get(m)?.provider {
                roundtable_core::team::ProviderSpec::Simulated { seed, .. } => Some(*seed),
                _ => None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roundtable_core::team::{NoEnv, parse_team};

    #[test]
    fn a_team_file_gives_eval_its_protocol_settings_and_its_models_seed() {
        let src = "[models.sim]\nprovider = \"simulated\"\nseed = 42\n\
                   [[peers]]\nid = \"a\"\nmodel = \"sim\"\n[[peers]]\nid = \"b\"\nmodel = \"sim\"\n\
                   [[peers]]\nid = \"c\"\nmodel = \"sim\"\n[[peers]]\nid = \"d\"\nmodel = \"sim\"\n\
                   [protocol]\nkind = \"debate\"\nrounds = 4\nvote = \"majority\"\n";
        let plan = parse_team("t.toml", src, &NoEnv).unwrap();
        let d = TeamDefaults::of(Some(&plan), Some("sim"));
        assert_eq!(
            d,
            TeamDefaults {
                pattern: Some("debate".into()),
                agents: Some(4),
                rounds: Some(4),
                vote: Some(VoteRule::Majority),
                seed: Some(42)
            }
        );
        assert_eq!(TeamDefaults::of(None, None), TeamDefaults::default());
    }
}
