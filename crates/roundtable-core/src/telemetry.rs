//! Trace context carried in envelopes, without a tracing backend in this crate.
//!
//! Peers open `tracing` spans for their turns and model calls (named and attributed after
//! the OpenTelemetry GenAI semantic conventions). To make one trace span peers in several
//! processes, the W3C `traceparent` of the span that produced an envelope travels in the
//! envelope's `trace` field: a peer's turn span is a child of the session span named in
//! the task envelope, and links to the spans of the envelopes it answers.
//!
//! This crate knows no tracing backend, so the translation between `tracing` spans and
//! trace contexts is a hook that an exporter installs once per process
//! ([`install`]). Without one every function here is a cheap no-op and envelopes carry
//! no trace context.

use std::sync::{Arc, OnceLock};

/// Translates between `tracing` spans and W3C trace contexts (`traceparent` strings).
pub trait TraceHook: Send + Sync + 'static {
    /// The `traceparent` of `span`, if it is recorded.
    fn traceparent(&self, span: &tracing::Span) -> Option<String>;
    /// Make `span` (not yet entered) a child of the remote context `traceparent`.
    fn set_parent(&self, span: &tracing::Span, traceparent: &str);
    /// Link `span` (not yet entered) to the span named by `traceparent`.
    fn add_link(&self, span: &tracing::Span, traceparent: &str);
}

static HOOK: OnceLock<Box<dyn TraceHook>> = OnceLock::new();

/// Install the process's hook. Returns false when one was already installed (the first
/// one stays).
pub fn install(hook: Box<dyn TraceHook>) -> bool {
    HOOK.set(hook).is_ok()
}

/// Whether a hook is installed (callers skip work that only feeds traces).
pub fn enabled() -> bool {
    HOOK.get().is_some()
}

/// The `traceparent` of `span`, for an envelope's `trace` field.
pub fn traceparent(span: &tracing::Span) -> Option<Arc<str>> {
    HOOK.get()?.traceparent(span).map(Arc::from)
}

/// Make `span` a child of the span named by `traceparent`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let (Some(h), Some(tp)) = (HOOK.get(), traceparent) {
        h.set_parent(span, tp);
    }
}

/// Link `span` to the span named by `traceparent`.
pub fn add_link(span: &tracing::Span, traceparent: Option<&str>) {
    if let (Some(h), Some(tp)) = (HOOK.get(), traceparent) {
        h.add_link(span, tp);
    }
}
