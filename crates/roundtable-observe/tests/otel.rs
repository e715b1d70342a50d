//! One trace spans peers in two processes: each "process" here has its own tracer
//! provider, service name and exporter, and its own thread and runtime; the only thing
//! they share is the session log, as peers on NATS do. A local OTLP/HTTP receiver
//! decodes what both export.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use roundtable_core::PeerId;
use roundtable_core::log::SessionLog;
use roundtable_core::runner::{open_session, run_peers};
use roundtable_core::team::TeamPlan;
use roundtable_observe::telemetry::{self, OtlpSettings, session_span};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const PAIR: &str = r#"
name = "pair"
topic = "name the product"
[models.s]
provider = "scripted"
cycle = true
replies = ["{peer} says {n}"]
[[peers]]
id = "alice"
model = "s"
[[peers]]
id = "bob"
model = "s"
[protocol]
kind = "round_robin"
rounds = 2
"#;

fn receiver() -> (String, Arc<Mutex<Vec<(String, Span)>>>, tokio::runtime::Runtime) {
    let got: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
    let g = got.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            g.lock().unwrap().push((service.clone(), s));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, got, rt)
}

/// Run `peer` of `plan` on `log` as a process of its own with service name `service`;
/// with `open`, this process also opens the session (inside its session span).
fn process(
    endpoint: String,
    service: &'static str,
    plan: TeamPlan,
    log: Arc<dyn SessionLog>,
    peer: &'static str,
    open: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let provider =
            telemetry::provider(&OtlpSettings { endpoint: Some(endpoint), service_name: Some(service.into()) })
                .unwrap();
        let subscriber = tracing_subscriber::registry().with(telemetry::layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let models = offline_models(&plan).into_iter().filter(|(p, _)| p.as_str() == peer).collect();
                let work = async {
                    if open {
                        open_session(log.as_ref(), &plan, "name the product").await.unwrap();
                    }
                    run_peers(log.clone(), &plan, models, None, None).await.unwrap();
                };
                if open {
                    work.instrument(session_span(log.session(), &plan.name, "round_robin")).await
                } else {
                    work.await
                }
            });
        });
        provider.shutdown().unwrap();
    })
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn step(s: &Span) -> &str {
    match attr(s, "roundtable.step") {
        Some(Value::StringValue(v)) => v,
        other => panic!("{}: roundtable.step {other:?}", s.name),
    }
}

#[test]
fn one_trace_spans_peers_in_two_processes() {
    let (addr, got, _rt) = receiver();
    let endpoint = format!("http://{addr}/v1/traces");
    telemetry::install_hook();
    let plan = plan_from(PAIR);
    let log = new_log();
    // Bob's process starts first and waits for the task on the log.
    let b = process(endpoint.clone(), "proc-b", plan.clone(), log.clone(), "bob", false);
    let a = process(endpoint, "proc-a", plan, log.clone(), "alice", true);
    a.join().unwrap();
    b.join().unwrap();

    let spans = got.lock().unwrap().clone();
    let of = |service: &str, prefix: &str| -> Vec<Span> {
        spans.iter().filter(|(s, sp)| s == service && sp.name.starts_with(prefix)).map(|(_, sp)| sp.clone()).collect()
    };
    let root = of("proc-a", "session ");
    assert_eq!(root.len(), 1, "{:?}", spans.iter().map(|(s, sp)| (s, &sp.name)).collect::<Vec<_>>());
    let root = &root[0];
    let alice = of("proc-a", "invoke_agent alice");
    let bob = of("proc-b", "invoke_agent bob");
    assert_eq!((alice.len(), bob.len()), (2, 2));
    assert!(of("proc-a", "invoke_agent bob").is_empty() && of("proc-b", "invoke_agent alice").is_empty());
    assert!(of("proc-b", "session ").is_empty(), "only the opening process has a session span");
    for (_, s) in &spans {
        assert_eq!(s.trace_id, root.trace_id, "{} is in the one trace", s.name);
    }
    for t in alice.iter().chain(&bob) {
        assert_eq!(t.parent_span_id, root.span_id, "{} is a child of the session span", t.name);
    }
    for (service, turns) in [("proc-a", &alice), ("proc-b", &bob)] {
        let chats = of(service, "chat ");
        assert_eq!(chats.len(), 2, "{service}");
        for c in &chats {
            assert!(turns.iter().any(|t| t.span_id == c.parent_span_id), "{service}: a chat inside its own turn");
        }
    }
    // Each turn links to the turn it answers, across the processes.
    let by_step: HashMap<&str, &Span> = alice.iter().chain(&bob).map(|t| (step(t), t)).collect();
    for (answer, answered) in [("turn/1", "turn/0"), ("turn/2", "turn/1"), ("turn/3", "turn/2")] {
        let links = &by_step[answer].links;
        assert_eq!(links.len(), 1, "{answer}");
        assert_eq!(links[0].span_id, by_step[answered].span_id, "{answer} links to {answered}");
    }

    // The log carries the same contexts.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let entries = rt.block_on(log.read_all()).unwrap();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let task_trace = entries[0].env.trace.as_deref().unwrap();
    assert_eq!(task_trace, format!("00-{}-{}-01", hex(&root.trace_id), hex(&root.span_id)));
    for e in entries.iter().filter(|e| e.env.kind == roundtable_core::Kind::Message) {
        let t = by_step[&*e.env.step];
        assert!(e.env.trace.as_deref().unwrap().contains(&hex(&t.span_id)), "{}", e.env.step);
        assert_eq!(e.env.from, PeerId::from(if e.env.step.ends_with(['0', '2']) { "alice" } else { "bob" }));
    }
}
