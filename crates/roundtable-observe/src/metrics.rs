//! Prometheus metrics, derived from session logs.
//!
//! Almost everything worth counting is on the log already: envelopes by kind, messages,
//! model calls, tokens, cost and latency (the usage stored in each envelope), tool calls,
//! failures, absences, stops, and work-queue redeliveries. [`Metrics`] folds entries in (each
//! once: it remembers how far it has read each session), so a `roundtable run` process
//! counts its own session from the log's tail and a `roundtable ui` process counts every
//! session of the store on each scrape. Retries are the exception — a retried call
//! leaves one envelope — and are counted in-process through the retry layer's
//! observer ([`Metrics::retry_observer`]).
//!
//! Rendered in the Prometheus text format (version 0.0.4) at `GET /metrics`.
//!
//! A message is a contribution by the tally's rule ([`Kind::is_contribution`], the rule
//! `trace` and the termination conditions count by): tool calls, their results,
//! approvals and tool listings are what a peer did, not what it said, and are counted
//! as envelopes of their kind and, each call once its result is on the log, in
//! `roundtable_tool_calls_total` by tool and outcome.
//!
//! A redelivery is counted for a `work` envelope whose JSON has `"redelivered": true` or
//! a `deliveries`/`delivery` count above 1 (how work-queue protocols record a task
//! handed out again after its lease expired).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use roundtable_core::log::{Entry, LogError, LogStore, SessionLog};
use roundtable_core::model::layers::RetryObserver;
use roundtable_core::tool::ToolResultBody;
use roundtable_core::{Kind, SessionId};

/// Latency histogram bounds, in seconds.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Inner {
    /// Per session: the last sequence folded, the team, whether it stopped.
    sessions: HashMap<SessionId, (u64, String, bool)>,
    counters: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<Labels, Histogram>,
}

impl Inner {
    fn add(&mut self, name: &'static str, labels: Labels, v: f64) {
        *self.counters.entry((name, labels)).or_default() += v;
    }
}

/// Counters and histograms folded from session logs.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

const HELP: &[(&str, &str, &str)] = &[
    ("roundtable_envelopes_total", "counter", "Envelopes appended to session logs, by kind."),
    (
        "roundtable_messages_total",
        "counter",
        "Contributions by peers (messages, proposals, votes, verdicts, ...; not tool calls, results, approvals or listings).",
    ),
    ("roundtable_model_calls_total", "counter", "Model calls recorded on the log (a retried call counts once)."),
    ("roundtable_tokens_total", "counter", "Model tokens, by direction (input = prompt, output = completion)."),
    ("roundtable_cost_usd_total", "counter", "Model cost in US dollars, from the configured prices."),
    (
        "roundtable_tool_calls_total",
        "counter",
        "Tool calls with a recorded result, by tool and outcome (ok, error, refused, denied, unknown).",
    ),
    ("roundtable_model_failures_total", "counter", "Model calls that failed after retries, by error kind."),
    ("roundtable_model_retries_total", "counter", "Model call attempts that failed and were retried (this process)."),
    ("roundtable_redeliveries_total", "counter", "Work items handed out again after a lease expired."),
    ("roundtable_absences_total", "counter", "Peers noticed absent."),
    ("roundtable_stops_total", "counter", "Sessions stopped, by the kind of stop reason."),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels_text(labels: &[(&'static str, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    /// Fold one entry of `session` in (entries at or below the last folded sequence are
    /// ignored, so feeding a tail from 1 twice counts nothing twice).
    pub fn observe(&self, session: &SessionId, entry: &Entry) {
        let mut m = self.inner.lock().expect("metrics lock");
        let (last, team, _) = m.sessions.entry(session.clone()).or_insert((0, String::new(), false)).clone();
        if entry.seq <= last {
            return;
        }
        let env = &entry.env;
        let team = if env.kind == Kind::Task {
            env.body.json.as_ref().and_then(|j| j.get("team_name")?.as_str().map(str::to_owned)).unwrap_or(team)
        } else {
            team
        };
        let peer = env.from.to_string();
        m.add("roundtable_envelopes_total", vec![("team", team.clone()), ("kind", env.kind.to_string())], 1.0);
        if env.kind.is_contribution() {
            m.add("roundtable_messages_total", vec![("team", team.clone()), ("peer", peer.clone())], 1.0);
        }
        if let Some(u) = &env.usage {
            let model = u.model.to_string();
            let base = vec![("team", team.clone()), ("peer", peer.clone()), ("model", model)];
            m.add("roundtable_model_calls_total", base.clone(), f64::from(u.calls));
            let mut input = base.clone();
            input.push(("type", "input".into()));
            m.add("roundtable_tokens_total", input, u.prompt_tokens as f64);
            let mut output = base.clone();
            output.push(("type", "output".into()));
            m.add("roundtable_tokens_total", output, u.completion_tokens as f64);
            m.add("roundtable_cost_usd_total", base.clone(), u.cost_usd);
            m.histograms.entry(base).or_default().observe(u.latency_ms as f64 / 1000.0);
        }
        let json = env.body.json.as_ref();
        match env.kind {
            Kind::Failure => {
                let error =
                    json.and_then(|j| j.get("error")?.as_str().map(str::to_owned)).unwrap_or_else(|| "other".into());
                m.add(
                    "roundtable_model_failures_total",
                    vec![("team", team.clone()), ("peer", peer), ("error", error)],
                    1.0,
                );
            }
            Kind::Absent => m.add("roundtable_absences_total", vec![("team", team.clone())], 1.0),
            Kind::ToolResult => {
                if let Some(b) = json.and_then(|j| serde_json::from_value::<ToolResultBody>(j.clone()).ok()) {
                    let outcome = serde_json::to_value(b.outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    m.add(
                        "roundtable_tool_calls_total",
                        vec![("team", team.clone()), ("peer", peer), ("tool", b.tool), ("outcome", outcome)],
                        1.0,
                    );
                }
            }
            Kind::Work => {
                let redelivered = json.is_some_and(|j| {
                    j.get("redelivered").and_then(serde_json::Value::as_bool) == Some(true)
                        || ["deliveries", "delivery"]
                            .iter()
                            .any(|k| j.get(*k).and_then(serde_json::Value::as_u64).is_some_and(|n| n > 1))
                });
                if redelivered {
                    m.add("roundtable_redeliveries_total", vec![("team", team.clone())], 1.0);
                }
            }
            Kind::Stop => {
                let reason = json.and_then(|j| j.get("reason")?.as_str().map(str::to_owned)).unwrap_or_default();
                let kind = reason.split(':').next().unwrap_or("").trim().to_string();
                m.add("roundtable_stops_total", vec![("team", team.clone()), ("reason", kind)], 1.0);
            }
            _ => {}
        }
        let stopped = env.kind == Kind::Stop;
        let s = m.sessions.get_mut(session).expect("inserted above");
        *s = (entry.seq, team, s.2 || stopped);
    }

    /// An observer for the retry layer: counts each retried attempt.
    pub fn retry_observer(self: &Arc<Self>) -> RetryObserver {
        let me = self.clone();
        Arc::new(move |req, err, _wait| {
            let mut m = me.inner.lock().expect("metrics lock");
            m.add(
                "roundtable_model_retries_total",
                vec![("peer", req.peer.to_string()), ("error", err.kind.to_string())],
                1.0,
            );
        })
    }

    /// Fold everything new in every session of `store`.
    pub async fn refresh(&self, store: &dyn LogStore) -> Result<(), LogError> {
        for info in store.sessions().await? {
            let from = self.inner.lock().expect("metrics lock").sessions.get(&info.id).map_or(0, |s| s.0) + 1;
            if from > info.envelopes {
                continue;
            }
            let log = store.open(&info.id, false).await?;
            let mut next = from;
            loop {
                let batch = log.read(next, 4096).await?;
                let Some(last) = batch.last() else { break };
                next = last.seq + 1;
                for e in &batch {
                    self.observe(&info.id, e);
                }
            }
        }
        Ok(())
    }

    /// Fold a session's log as it grows, until its stop (run as a task beside a session).
    pub async fn follow(self: Arc<Self>, log: Arc<dyn SessionLog>) -> Result<(), LogError> {
        let mut tail = log.tail(1).await?;
        while let Some(e) = tail.next().await {
            let e = e?;
            self.observe(log.session(), &e);
        }
        Ok(())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.inner.lock().expect("metrics lock");
        let mut o = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for ((n, labels), v) in &m.counters {
                if n == name {
                    let _ = writeln!(o, "{name}{} {}", labels_text(labels, None), number(*v));
                }
            }
        }
        let name = "roundtable_model_latency_seconds";
        let _ = writeln!(o, "# HELP {name} Model call latency, as recorded in each envelope's usage.");
        let _ = writeln!(o, "# TYPE {name} histogram");
        for (labels, h) in &m.histograms {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(o, "{name}_bucket{} {}", labels_text(labels, Some(("le", number(*b)))), h.counts[i]);
            }
            let _ = writeln!(o, "{name}_bucket{} {}", labels_text(labels, Some(("le", "+Inf".into()))), h.count);
            let _ = writeln!(o, "{name}_sum{} {}", labels_text(labels, None), number(h.sum));
            let _ = writeln!(o, "{name}_count{} {}", labels_text(labels, None), h.count);
        }
        let _ = writeln!(o, "# HELP roundtable_sessions Sessions seen, open or stopped.");
        let _ = writeln!(o, "# TYPE roundtable_sessions gauge");
        let mut gauge: BTreeMap<(String, &str), u64> = BTreeMap::new();
        for (_, team, stopped) in m.sessions.values() {
            *gauge.entry((team.clone(), if *stopped { "stopped" } else { "open" })).or_default() += 1;
        }
        for ((team, state), n) in gauge {
            let _ = writeln!(o, "roundtable_sessions{{team=\"{}\",state=\"{state}\"}} {n}", escape(&team));
        }
        o
    }
}

/// Where a metrics endpoint gets its numbers.
#[derive(Clone)]
pub enum Source {
    /// Folded as it happens (a session run by this process).
    Live(Arc<Metrics>),
    /// Refreshed from a store on every scrape (the web view).
    Store(Arc<Metrics>, Arc<dyn LogStore>),
}

/// A router serving `GET /metrics`.
pub fn router(source: Source) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = source.clone();
            async move {
                let m = match &source {
                    Source::Live(m) => m.clone(),
                    Source::Store(m, store) => {
                        if let Err(e) = m.refresh(store.as_ref()).await {
                            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
                        }
                        m.clone()
                    }
                };
                ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
            }
        }),
    )
}

/// Serve `GET /metrics` on `addr` in the background. Returns the bound address (useful
/// with port 0).
pub async fn serve(addr: SocketAddr, source: Source) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(source)).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roundtable_core::{Body, Envelope, PeerId, Recipient, Usage};

    fn entry(seq: u64, env: Envelope) -> Entry {
        Entry { seq, env: Arc::new(env) }
    }

    fn env(from: &str, step: &str, kind: Kind, json: Option<serde_json::Value>) -> Envelope {
        let mut body = Body::text(step);
        body.json = json;
        Envelope::new(&SessionId::from("s"), &PeerId::from(from), step, kind, Recipient::All, body)
    }

    #[test]
    fn folds_each_entry_once_and_renders_the_text_format() {
        let m = Metrics::new();
        let s = SessionId::from("s");
        let usage = |p, c, ms| Usage {
            model: "m".into(),
            prompt_tokens: p,
            completion_tokens: c,
            latency_ms: ms,
            cost_usd: 0.25,
            calls: 1,
        };
        let entries = vec![
            entry(1, env("user", "task", Kind::Task, Some(serde_json::json!({"team_name": "a \"b\""})))),
            entry(2, env("pm", "turn/0", Kind::Message, None).with_usage(usage(10, 5, 40))),
            entry(3, env("eng", "turn/1", Kind::Message, None).with_usage(usage(20, 7, 3000))),
            entry(4, env("eng", "turn/2", Kind::Failure, Some(serde_json::json!({"error": "provider error"})))),
            entry(5, env("pm", "work/1", Kind::Work, Some(serde_json::json!({"deliveries": 2})))),
            entry(6, env("pm", "work/2", Kind::Work, Some(serde_json::json!({"deliveries": 1})))),
            entry(7, env("pm", "absent/eng/0", Kind::Absent, None)),
            entry(8, env("pm", "stop", Kind::Stop, Some(serde_json::json!({"reason": "max_messages: 4 messages"})))),
        ];
        for _ in 0..2 {
            for e in &entries {
                m.observe(&s, e);
            }
        }
        let t = m.render();
        let team = "team=\"a \\\"b\\\"\"";
        for line in [
            format!("roundtable_envelopes_total{{{team},kind=\"message\"}} 2"),
            format!("roundtable_messages_total{{{team},peer=\"pm\"}} 3"),
            format!("roundtable_model_calls_total{{{team},peer=\"eng\",model=\"m\"}} 1"),
            format!("roundtable_tokens_total{{{team},peer=\"eng\",model=\"m\",type=\"input\"}} 20"),
            format!("roundtable_tokens_total{{{team},peer=\"eng\",model=\"m\",type=\"output\"}} 7"),
            format!("roundtable_cost_usd_total{{{team},peer=\"pm\",model=\"m\"}} 0.25"),
            format!("roundtable_model_failures_total{{{team},peer=\"eng\",error=\"provider error\"}} 1"),
            format!("roundtable_redeliveries_total{{{team}}} 1"),
            format!("roundtable_absences_total{{{team}}} 1"),
            format!("roundtable_stops_total{{{team},reason=\"max_messages\"}} 1"),
            format!("roundtable_model_latency_seconds_bucket{{{team},peer=\"eng\",model=\"m\",le=\"2.5\"}} 0"),
            format!("roundtable_model_latency_seconds_bucket{{{team},peer=\"eng\",model=\"m\",le=\"5\"}} 1"),
            format!("roundtable_model_latency_seconds_bucket{{{team},peer=\"pm\",model=\"m\",le=\"0.05\"}} 1"),
            format!("roundtable_model_latency_seconds_bucket{{{team},peer=\"pm\",model=\"m\",le=\"+Inf\"}} 1"),
            format!("roundtable_model_latency_seconds_sum{{{team},peer=\"eng\",model=\"m\"}} 3"),
            format!("roundtable_model_latency_seconds_count{{{team},peer=\"pm\",model=\"m\"}} 1"),
            format!("roundtable_sessions{{{team},state=\"stopped\"}} 1"),
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}\n{t}");
        }
        assert!(t.contains("# TYPE roundtable_model_retries_total counter"));
    }

    /// A tool that answers at once.
    struct Deploy(roundtable_core::tool::ToolDef);

    #[async_trait::async_trait]
    impl roundtable_core::tool::Tool for Deploy {
        fn def(&self) -> &roundtable_core::tool::ToolDef {
            &self.0
        }
        fn idempotent(&self) -> bool {
            false
        }
        async fn call(
            &self,
            args: &serde_json::Value,
            _: &roundtable_core::tool::ToolContext,
        ) -> roundtable_core::tool::ToolOutput {
            roundtable_core::tool::ToolOutput::ok(format!("deployed {}", args["version"]))
        }
    }

    /// The value of one rendered sample, 0 when it is absent.
    fn sample(text: &str, line: &str) -> f64 {
        text.lines().find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
    }

    /// The sum of every sample of a metric.
    fn total(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[tokio::test]
    async fn a_session_with_tool_calls_counts_messages_as_the_tally_does_and_tool_calls_by_tool_and_outcome() {
        use roundtable_core::log::{MemLog, SharedMemLog};
        use roundtable_core::peer::PeerExtras;
        use roundtable_core::tool::{ToolBox, ToolDef};
        // ops deploys (approved by lead), calls a tool it was not granted, then finishes.
        let src = r#"name = "ship"
topic = "ship v1"
[models.m]
provider = "scripted"
cycle = true
replies = [""]
[models.m.per_peer]
ops = ['!tool deploy {"version": "v1"}', '!tool wipe {}', '!tool finish {"answer": "v1 is out"}']
lead = ['{"approve": true, "reason": "routine"}']
[[peers]]
id = "ops"
model = "m"
tools = ["deploy"]
[[peers]]
id = "lead"
model = "m"
[tools.deploy]
kind = "command"
argv = ["true"]
approve_by = "lead"
[protocol]
kind = "conversation"
start = ["ops"]
"#;
        let plan = roundtable_core::team::parse_team("t.toml", src, &roundtable_core::team::NoEnv).unwrap();
        let log: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from("tools")))));
        roundtable_core::runner::open_session(log.as_ref(), &plan, "ship v1").await.unwrap();
        let mut tools = ToolBox::new();
        let def = ToolDef {
            name: "deploy".into(),
            description: "Deploy a version".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"version": {"type": "string"}}}),
        };
        tools.insert("deploy", Arc::new(Deploy(def)));
        let models = roundtable_core::eval::offline_models(&plan, None);
        let extras = PeerExtras { tools: Some(Arc::new(tools)), ..Default::default() };
        let summary =
            roundtable_core::runner::run_peers_with(log.clone(), &plan, models, None, None, extras).await.unwrap();
        assert_eq!(summary.final_answer.as_deref(), Some("v1 is out"));

        let entries = log.read_all().await.unwrap();
        let m = Metrics::new();
        for e in &entries {
            m.observe(log.session(), e);
        }
        let t = m.render();
        let of_kind = |k: Kind| entries.iter().filter(|e| e.env.kind == k).count() as f64;
        // The log has tool envelopes of every sort, none of them a message.
        assert_eq!(of_kind(Kind::ToolCall), 3.0, "{t}");
        assert_eq!(of_kind(Kind::ToolResult), 3.0);
        assert_eq!(of_kind(Kind::Approval), 2.0, "a request and its answer");
        let team = "team=\"ship\"";
        assert_eq!(total(&t, "roundtable_messages_total"), summary.messages as f64, "the tally's count\n{t}");
        let contributions = entries.iter().filter(|e| e.env.kind.is_contribution()).count() as f64;
        assert_eq!(total(&t, "roundtable_messages_total"), contributions);
        // Counted the old way (everything but the task, the stop, presence, failures and
        // listings), the three calls, three results and two approvals would be messages.
        let everything = entries
            .iter()
            .filter(|e| {
                !matches!(
                    e.env.kind,
                    Kind::Task | Kind::Stop | Kind::Absent | Kind::Join | Kind::Failure | Kind::ToolList
                )
            })
            .count() as f64;
        assert_eq!(contributions, everything - 8.0, "tool envelopes are not messages");
        for (line, n) in [
            (format!("roundtable_tool_calls_total{{{team},peer=\"ops\",tool=\"deploy\",outcome=\"ok\"}}"), 1.0),
            (format!("roundtable_tool_calls_total{{{team},peer=\"ops\",tool=\"wipe\",outcome=\"refused\"}}"), 1.0),
            (format!("roundtable_tool_calls_total{{{team},peer=\"ops\",tool=\"finish\",outcome=\"ok\"}}"), 1.0),
            (format!("roundtable_envelopes_total{{{team},kind=\"tool_call\"}}"), 3.0),
            (format!("roundtable_envelopes_total{{{team},kind=\"approval\"}}"), 2.0),
        ] {
            assert_eq!(sample(&t, &line), n, "{line}\n{t}");
        }
        assert_eq!(total(&t, "roundtable_tool_calls_total"), 3.0, "{t}");
        assert!(t.contains("# TYPE roundtable_tool_calls_total counter"));
    }
}
