//! The tools that do I/O: commands, HTTP requests and MCP servers, each behind
//! [`roundtable_core::tool::Tool`].
//!
//! Everything a tool needs to run comes from its [`ToolSpec`] (the team file), never
//! from the log or the wire. A tool never panics on what a model, a program or a server
//! sends it: every failure is a [`ToolOutput`] with an error or refused outcome.
//!
//! - [`command`]: a program run without a shell, its argv filled from arguments that
//!   were validated against the tool's JSON Schema. An argument never becomes a flag or
//!   a second command; the program runs in its own process group with a cleared
//!   environment, and a timeout kills the whole group. Output is kept up to caps.
//! - [`http`]: one HTTP request per call; placeholders are percent-encoded into the
//!   path and query only; header secrets are read from the environment at call time and
//!   never appear in an output or an error.
//! - [`mcp`]: an MCP server (a child process over stdio, or streamable HTTP) through
//!   `rmcp`; its tools are listed once at start ([`mcp::McpServer::tools`], data the
//!   runtime records) and each allowed one becomes a [`Tool`]. A server that dies is
//!   restarted once; after that its calls fail as error results.
//! - [`registry`]: builds every tool of a team from its specs, starting each MCP server
//!   once.
//!
//! [`ToolSpec`]: roundtable_core::tool::ToolSpec
//! [`ToolOutput`]: roundtable_core::tool::ToolOutput
//! [`Tool`]: roundtable_core::tool::Tool

pub mod command;
pub mod http;
pub mod mcp;
pub mod registry;

mod capture;
mod schema;
mod template;

pub use registry::{Registry, RegistryError};
pub use schema::ArgumentSchema;

/// One thing wrong with a tool's spec, found before anything runs: `key` is the spec's
/// key it concerns (`argv`, `cwd`, `parameters`, `url`, `headers.NAME`, ...), so the
/// team file's reader can name the file, line and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem { key: key.into(), message: message.into() }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Seconds from a spec as a duration: `None` when not a finite positive number.
pub(crate) fn duration_from_secs(secs: f64) -> Option<std::time::Duration> {
    if secs.is_finite() && secs > 0.0 && secs < 1.0e9 { Some(std::time::Duration::from_secs_f64(secs)) } else { None }
}

/// Checks a timeout and a cap shared by every kind of tool.
pub(crate) fn check_limits(problems: &mut Vec<Problem>, timeout_secs: f64, caps: &[(&str, u64)]) {
    if duration_from_secs(timeout_secs).is_none() {
        problems
            .push(Problem::new("timeout_secs", format!("must be a positive number of seconds, not {timeout_secs}")));
    }
    for (key, cap) in caps {
        if *cap == 0 {
            problems.push(Problem::new(*key, "must be at least 1 byte"));
        }
    }
}
