//! Trust between peers: what a peer takes from the wire and what it never does.
//!
//! A session's plan travels in its task envelope, so a peer that joins a session reads
//! the plan from the log. Whoever can publish a task can therefore write that plan. A
//! plan is data the peers agree on (the protocol, the termination, the personas), but
//! part of it is what a peer *executes*: where it sends its transcript (a model's
//! endpoint, headers and query), which secret it reads (`api_key_env`), and what its
//! offline models answer. That part always comes from the peer's own team file:
//! [`executable_differences`] lists every place where a task's plan differs from the
//! local one there, and a peer refuses a session for which it is not empty.

use serde_json::Value;

use crate::team::TeamPlan;

/// Every difference between `task` (the plan a session's task carries) and `local`
/// (the peer's own team file) in what a peer would execute: the models (provider,
/// endpoint, API-key variable, headers, query, model name, replies, limits and prices)
/// and which model each peer runs. Each difference is one line naming the key path
/// and both values (`models.g.provider.base_url: the task says "…", the team file says "…"`).
/// Secrets are never in a plan (only the names of the variables holding them), so the
/// lines may be shown.
pub fn executable_differences(task: &TeamPlan, local: &TeamPlan) -> Vec<String> {
    let mut out = Vec::new();
    let models = |p: &TeamPlan| serde_json::to_value(&p.models).unwrap_or(Value::Null);
    diff("models", &models(task), &models(local), &mut out);
    let assignment = |p: &TeamPlan| -> Value {
        p.peers
            .iter()
            .map(|s| (s.id.to_string(), Value::String(s.model.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    diff("peers", &assignment(task), &assignment(local), &mut out);
    out
}

fn diff(path: &str, task: &Value, local: &Value, out: &mut Vec<String>) {
    match (task, local) {
        (Value::Object(t), Value::Object(l)) => {
            let keys: std::collections::BTreeSet<&String> = t.keys().chain(l.keys()).collect();
            for k in keys {
                let sub = format!("{path}.{k}");
                match (t.get(k), l.get(k)) {
                    (Some(a), Some(b)) => diff(&sub, a, b, out),
                    (Some(a), None) => out.push(format!("{sub}: the task says {}, the team file has none", shown(a))),
                    (None, Some(b)) => out.push(format!("{sub}: the task has none, the team file says {}", shown(b))),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: the task says {}, the team file says {}", shown(a), shown(b))),
        _ => {}
    }
}

/// A value as a line shows it: JSON, cut at 120 characters.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::team::{NoEnv, parse_team};

    const TEAM: &str = r#"
name = "t"
topic = "x"
[models.g]
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
[models.s]
provider = "scripted"
replies = ["a"]
[[peers]]
id = "a"
model = "g"
[[peers]]
id = "b"
model = "s"
[protocol]
kind = "round_robin"
rounds = 1
"#;

    fn plan(src: &str) -> TeamPlan {
        parse_team("t.toml", src, &NoEnv).unwrap()
    }

    #[test]
    fn the_same_plan_has_no_differences_and_the_topic_and_personas_are_not_executed() {
        let local = plan(TEAM);
        assert!(executable_differences(&local, &local).is_empty());
        let other = plan(&TEAM.replace("topic = \"x\"", "topic = \"y\"").replace("rounds = 1", "rounds = 2"));
        assert!(executable_differences(&other, &local).is_empty());
    }

    #[test]
    fn an_endpoint_a_key_variable_a_new_model_or_a_reassigned_peer_is_a_difference() {
        let local = plan(TEAM);
        let task = plan(
            &TEAM
                .replace("http://127.0.0.1:9/v1", "http://evil.example/v1")
                .replace("model = \"s\"", "model = \"g\"")
                .replace("[models.s]", "[models.t]\nprovider = \"scripted\"\nreplies = [\"z\"]\n[models.s]"),
        );
        let d = executable_differences(&task, &local);
        assert!(
            d.contains(&"models.g.provider.base_url: the task says \"http://evil.example/v1\", the team file says \"http://127.0.0.1:9/v1\"".to_owned()),
            "{d:#?}"
        );
        assert!(d.iter().any(|l| l.starts_with("models.t: the task says {")), "{d:#?}");
        assert!(d.contains(&"peers.b: the task says \"g\", the team file says \"s\"".to_owned()), "{d:#?}");
        assert_eq!(d.len(), 3, "{d:#?}");
    }
}
