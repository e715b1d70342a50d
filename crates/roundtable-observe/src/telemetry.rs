//! OpenTelemetry: spans exported over OTLP, and the trace-context hook that carries a
//! span's `traceparent` inside envelopes.
//!
//! Spans (names and attributes follow the OpenTelemetry GenAI semantic conventions):
//! - `session {id}`: one per session run by this process (the CLI opens it around
//!   `run`, `resume` and `fork`); its context is stored in the task envelope.
//! - `invoke_agent {peer}`: one per turn, a child of the session span named in the task
//!   envelope — in whatever process the peer runs — with links to the spans of the
//!   envelopes the turn answers.
//! - `chat {model}`: one per model call, inside its turn, with `gen_ai.request.model`,
//!   `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `gen_ai.response.model`,
//!   `roundtable.latency_ms` and, on failure, `error.type`.
//!
//! Export is configured by the standard environment variables and is off unless an
//! endpoint is set: `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME` (default `roundtable`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true`
//! or `OTEL_TRACES_EXPORTER=none` turn it off. The protocol is `http/protobuf` (the
//! only one this build carries; `OTEL_EXPORTER_OTLP_PROTOCOL` set to anything else is
//! reported and export stays off).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use roundtable_core::telemetry::TraceHook;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The hook that stores and reads W3C trace contexts for `roundtable-core`.
struct OtelHook;

fn context_of(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

impl TraceHook for OtelHook {
    fn traceparent(&self, span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        carrier.remove("traceparent")
    }

    fn set_parent(&self, span: &tracing::Span, traceparent: &str) {
        let cx = context_of(traceparent);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }

    fn add_link(&self, span: &tracing::Span, traceparent: &str) {
        let cx = context_of(traceparent);
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}

/// Install the trace-context hook in `roundtable-core` (once per process).
pub fn install_hook() {
    roundtable_core::telemetry::install(Box::new(OtelHook));
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// The full traces URL (`…/v1/traces`), when given in code; `None` reads the
    /// environment.
    pub endpoint: Option<String>,
    /// `service.name`, when given in code; `None` reads `OTEL_SERVICE_NAME` (default
    /// `roundtable`).
    pub service_name: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// OTLP settings from the standard environment variables: `Ok(None)` when export is
/// off, `Err` when it is asked for in a way this build cannot do.
pub fn settings_from_env() -> Result<Option<OtlpSettings>, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
        return Ok(None);
    }
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() {
        return Ok(None);
    }
    for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(p) = env(var) {
            if !p.eq_ignore_ascii_case("http/protobuf") {
                return Err(format!(
                    "{var}={p} is not supported; this build exports OTLP over http/protobuf (set {var}=http/protobuf and point the endpoint at the collector's HTTP port, usually 4318)"
                ));
            }
            break;
        }
    }
    Ok(Some(OtlpSettings { endpoint: None, service_name: None }))
}

/// A tracer provider exporting to OTLP/HTTP (protobuf) in batches, from a background
/// thread. Shut it down to flush.
pub fn provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, String> {
    // reqwest is built without a TLS provider of its own; use ring (https endpoints).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(e) = &settings.endpoint {
        use opentelemetry_otlp::WithExportConfig;
        builder = builder.with_endpoint(e.clone());
    }
    let exporter = builder.build().map_err(|e| format!("OTLP exporter: {e}"))?;
    let name = settings.service_name.clone().or_else(|| env("OTEL_SERVICE_NAME"));
    let from_attributes = env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    match name {
        Some(n) => resource = resource.with_service_name(n),
        None if !from_attributes => resource = resource.with_service_name("roundtable"),
        None => {}
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// The layer that turns roundtable's spans into OpenTelemetry spans of `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let tracer = provider.tracer("roundtable");
    let only_ours = Targets::new()
        .with_target("roundtable_core", LevelFilter::INFO)
        .with_target("roundtable_observe", LevelFilter::INFO)
        .with_target("roundtable", LevelFilter::INFO)
        .with_target("roundtable_cli", LevelFilter::INFO);
    tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours)
}

/// The CLI's logging and tracing, set up once. Dropping it flushes pending spans.
#[must_use = "dropping the guard flushes and stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: OpenTelemetry export: {e}");
        }
    }
}

/// Install the process's subscriber: human-readable logs on standard error, filtered by
/// the environment variable `log_env` (default `error`), and, when the OTEL_* variables
/// ask for it, OTLP span export. Call outside any async runtime; drop the guard after
/// the runtime has finished.
pub fn init(log_env: &str) -> Telemetry {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::try_from_env(log_env).unwrap_or_else(|_| "error".into()));
    let provider = match settings_from_env().and_then(|s| s.map(|s| provider(&s)).transpose()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: OpenTelemetry export is off: {e}");
            None
        }
    };
    let otel = provider.as_ref().map(layer);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if provider.is_some() {
        install_hook();
    }
    Telemetry { provider }
}

/// The span of a session run by this process (its context goes into the task envelope
/// when the session is opened inside it).
pub fn session_span(session: &roundtable_core::SessionId, team: &str, protocol: &str) -> tracing::Span {
    tracing::info_span!(
        "session",
        otel.name = %format!("session {session}"),
        gen_ai.conversation.id = %session,
        roundtable.team = %team,
        roundtable.protocol = %protocol,
    )
}
