//! The `[tools.NAME]` tables and the peers' `tools = [...]` grants.
//!
//! A tool is declared once and granted to peers by name. The built-in tools (`send`,
//! `broadcast`, `board_read`, `board_write`, `queue_push`, `queue_claim`, `queue_done`,
//! `finish`) are the runtime's own mechanisms: they are granted by name without a
//! table, and a table may not take their names.
//!
//! ```toml
//! [tools.run_tests]
//! kind = "command"
//! description = "Run the API's tests against an endpoint"
//! argv = ["python3", "check_api.py", "--", "{endpoint}"]
//! parameters = { type = "object", properties = { endpoint = { type = "string" } }, required = ["endpoint"] }
//! timeout_secs = 30
//!
//! [tools.docs]
//! kind = "mcp"
//! command = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "docs"]
//!
//! [tools.status]
//! kind = "http"
//! url = "http://127.0.0.1:8080/status/{region}"
//! headers = { Authorization = { env = "STATUS_TOKEN" } }
//! ```

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

use super::{Ctx, PlanEnv, choices};
use crate::tool::{Builtin, CommandSpec, HeaderValue, HttpSpec, McpSpec, McpTransport, ToolKind, ToolSpec};

/// Defaults and limits of tool settings.
pub const DEFAULT_TOOL_TIMEOUT_SECS: f64 = 60.0;
pub const MAX_TOOL_TIMEOUT_SECS: f64 = 24.0 * 3600.0;
pub const DEFAULT_OUTPUT_BYTES: u64 = 64 * 1024;
pub const MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;

/// A tool a peer may call (`[tools.NAME]`), granted to peers by name in their `tools`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTool {
    /// What runs the tool.
    #[schemars(with = "String", extend("enum" = KINDS))]
    kind: Spanned<String>,
    /// What the tool does, for the model.
    description: Option<String>,
    /// Whether running it twice is harmless: an interrupted call is run again on resume
    /// only when it is.
    #[schemars(extend("default" = false))]
    idempotent: Option<bool>,
    /// The peer id that must approve each call before it runs.
    #[schemars(with = "Option<String>")]
    approve_by: Option<Spanned<String>>,
    /// Seconds a call may take.
    #[schemars(with = "Option<f64>", range(min = 0.001, max = MAX_TOOL_TIMEOUT_SECS), extend("default" = DEFAULT_TOOL_TIMEOUT_SECS))]
    timeout_secs: Option<Spanned<f64>>,
    /// command: the program and its arguments; `{name}` is filled from the call's arguments.
    #[schemars(with = "Option<Vec<String>>")]
    argv: Option<Spanned<Vec<String>>>,
    /// command: the working directory, relative to the team file.
    cwd: Option<String>,
    /// command: environment variables passed through to the program (names only).
    env: Option<Vec<String>>,
    /// command: stdout kept per call.
    #[schemars(with = "Option<u64>", range(min = 1, max = MAX_OUTPUT_BYTES), extend("default" = DEFAULT_OUTPUT_BYTES))]
    max_stdout_bytes: Option<Spanned<u64>>,
    /// command: stderr kept per call.
    #[schemars(with = "Option<u64>", range(min = 1, max = MAX_OUTPUT_BYTES), extend("default" = DEFAULT_OUTPUT_BYTES))]
    max_stderr_bytes: Option<Spanned<u64>>,
    /// command, http: the JSON Schema of the call's arguments.
    #[schemars(with = "Option<serde_json::Value>")]
    parameters: Option<Spanned<toml::Value>>,
    /// http: the method.
    #[schemars(with = "Option<String>")]
    method: Option<Spanned<String>>,
    /// http: the URL; `{name}` is filled from the call's arguments.
    #[schemars(with = "Option<String>")]
    url: Option<Spanned<String>>,
    /// http: headers, each a value or `{ env = "VAR" }` (read from the environment).
    headers: Option<BTreeMap<String, RawHeader>>,
    /// http: response bytes kept per call.
    #[schemars(with = "Option<u64>", range(min = 1, max = MAX_OUTPUT_BYTES), extend("default" = DEFAULT_OUTPUT_BYTES))]
    max_response_bytes: Option<Spanned<u64>>,
    /// mcp: the server's command line.
    #[schemars(with = "Option<Vec<String>>")]
    command: Option<Spanned<Vec<String>>>,
    /// mcp: the server's tools the peers may call (all by default).
    allow: Option<Vec<String>>,
    /// mcp: output bytes kept per call.
    #[schemars(with = "Option<u64>", range(min = 1, max = MAX_OUTPUT_BYTES), extend("default" = DEFAULT_OUTPUT_BYTES))]
    max_output_bytes: Option<Spanned<u64>>,
}

/// A header value: the text, or the environment variable holding it.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum RawHeader {
    Value(String),
    Env { env: String },
}

const KINDS: &[&str] = &["command", "http", "mcp"];

fn keys_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "command" => &[
            "argv",
            "parameters",
            "cwd",
            "env",
            "timeout_secs",
            "max_stdout_bytes",
            "max_stderr_bytes",
            "description",
            "idempotent",
            "approve_by",
        ],
        "http" => &[
            "method",
            "url",
            "headers",
            "parameters",
            "timeout_secs",
            "max_response_bytes",
            "description",
            "idempotent",
            "approve_by",
        ],
        "mcp" => &[
            "command",
            "url",
            "headers",
            "env",
            "cwd",
            "allow",
            "timeout_secs",
            "max_output_bytes",
            "description",
            "idempotent",
            "approve_by",
        ],
        _ => &[],
    }
}

impl RawTool {
    fn present(&self) -> Vec<(&'static str, Option<usize>)> {
        let at = |s: Option<usize>| s;
        vec![
            ("argv", self.argv.as_ref().map(|x| x.span().start)),
            ("cwd", self.cwd.as_ref().map(|_| self.kind.span().start)),
            ("env", self.env.as_ref().map(|_| self.kind.span().start)),
            ("max_stdout_bytes", at(self.max_stdout_bytes.as_ref().map(|x| x.span().start))),
            ("max_stderr_bytes", at(self.max_stderr_bytes.as_ref().map(|x| x.span().start))),
            ("parameters", self.parameters.as_ref().map(|x| x.span().start)),
            ("method", self.method.as_ref().map(|x| x.span().start)),
            ("url", self.url.as_ref().map(|x| x.span().start)),
            ("headers", self.headers.as_ref().map(|_| self.kind.span().start)),
            ("max_response_bytes", self.max_response_bytes.as_ref().map(|x| x.span().start)),
            ("command", self.command.as_ref().map(|x| x.span().start)),
            ("allow", self.allow.as_ref().map(|_| self.kind.span().start)),
            ("max_output_bytes", self.max_output_bytes.as_ref().map(|x| x.span().start)),
        ]
    }
}

/// A tool name: what a model calls it, so what every provider accepts.
pub fn valid_tool_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validate the `[tools]` tables. `dir` is the team file's directory (working
/// directories are resolved against it); `peers` the team's peer ids (for
/// `approve_by`).
pub(super) fn validate_tools(
    cx: &mut Ctx<'_>,
    raw: BTreeMap<String, Spanned<RawTool>>,
    peers: &[crate::envelope::PeerId],
    env: &dyn PlanEnv,
) -> BTreeMap<String, ToolSpec> {
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        let at = t.span().start;
        let t = t.into_inner();
        let path = format!("tools.{name}");
        let before = cx.errors.len();
        if !valid_tool_name(&name) {
            cx.err_at(at, &path, "a tool name must be 1-64 letters, digits, '_' or '-'");
        }
        if Builtin::parse(&name).is_some() {
            cx.err_at(
                at,
                &path,
                format!(
                    "`{name}` is a built-in tool: grant it by name, without a [tools] table; built-ins: {}",
                    choices(Builtin::ALL.iter().map(|b| b.as_str()))
                ),
            );
        }
        let kind = t.kind.get_ref().as_str();
        if !KINDS.contains(&kind) {
            cx.err_at(
                t.kind.span().start,
                format!("{path}.kind"),
                format!("unknown tool kind `{kind}`; valid: {}", choices(KINDS)),
            );
            continue;
        }
        let allowed = keys_of(kind);
        for (key, key_at) in t.present() {
            if let Some(key_at) = key_at
                && !allowed.contains(&key)
            {
                cx.err_at(
                    key_at,
                    format!("{path}.{key}"),
                    format!("`{key}` is not a key of a `{kind}` tool; its keys: {}", choices(allowed.iter())),
                );
            }
        }
        let timeout_secs = match &t.timeout_secs {
            None => DEFAULT_TOOL_TIMEOUT_SECS,
            Some(s) => {
                let v = *s.get_ref();
                if !(v > 0.0 && v <= MAX_TOOL_TIMEOUT_SECS) {
                    cx.err_at(
                        s.span().start,
                        format!("{path}.timeout_secs"),
                        format!("timeout_secs must be more than 0 and at most {MAX_TOOL_TIMEOUT_SECS} (a day)"),
                    );
                }
                v
            }
        };
        let cap = |cx: &mut Ctx<'_>, v: &Option<Spanned<u64>>, key: &str| -> u64 {
            match v {
                None => DEFAULT_OUTPUT_BYTES,
                Some(s) => {
                    let n = *s.get_ref();
                    if !(1..=MAX_OUTPUT_BYTES).contains(&n) {
                        cx.err_at(
                            s.span().start,
                            format!("{path}.{key}"),
                            format!("{key} must be between 1 and {MAX_OUTPUT_BYTES}"),
                        );
                    }
                    n
                }
            }
        };
        let parameters = match &t.parameters {
            None => serde_json::json!({"type": "object", "properties": {}}),
            Some(p) => match serde_json::to_value(p.get_ref()) {
                Ok(v @ serde_json::Value::Object(_))
                    if v.get("type").and_then(|t| t.as_str()).is_none_or(|t| t == "object") =>
                {
                    v
                }
                _ => {
                    cx.err_at(
                        p.span().start,
                        format!("{path}.parameters"),
                        "parameters must be a JSON Schema of an object, e.g. { type = \"object\", properties = { name = { type = \"string\" } } }",
                    );
                    serde_json::Value::Null
                }
            },
        };
        let approve_by = t.approve_by.as_ref().and_then(|a| {
            let id = a.get_ref().as_str();
            if peers.iter().any(|p| p.as_str() == id) {
                Some(crate::envelope::PeerId::from(id))
            } else {
                cx.err_at(
                    a.span().start,
                    format!("{path}.approve_by"),
                    format!("unknown peer `{id}`; peers: {}", choices(peers)),
                );
                None
            }
        });
        let placeholders_known = |cx: &mut Ctx<'_>, texts: &[String], key: &str, key_at: usize| {
            let props = parameters.get("properties").and_then(|p| p.as_object());
            for text in texts {
                for name in placeholders(text) {
                    if props.is_none_or(|p| !p.contains_key(&name)) {
                        cx.err_at(
                            key_at,
                            format!("{path}.{key}"),
                            format!(
                                "placeholder `{{{name}}}` names no property of `parameters`; properties: {}",
                                choices(props.into_iter().flat_map(|p| p.keys()))
                            ),
                        );
                    }
                }
            }
        };
        let headers = |h: Option<BTreeMap<String, RawHeader>>| -> BTreeMap<String, HeaderValue> {
            h.unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        RawHeader::Value(s) => HeaderValue::Value(s),
                        RawHeader::Env { env } => HeaderValue::Env(env),
                    };
                    (k, v)
                })
                .collect()
        };
        let tool_kind = match kind {
            "command" => {
                let argv = match &t.argv {
                    Some(a) if !a.get_ref().is_empty() && !a.get_ref()[0].trim().is_empty() => a.get_ref().clone(),
                    Some(a) => {
                        cx.err_at(a.span().start, format!("{path}.argv"), "argv needs a program as its first element");
                        Vec::new()
                    }
                    None => {
                        cx.err_at(at, format!("{path}.argv"), "a `command` tool needs `argv` (program and arguments)");
                        Vec::new()
                    }
                };
                if let Some(a) = &t.argv {
                    if argv.first().is_some_and(|p| !placeholders(p).is_empty()) {
                        cx.err_at(
                            a.span().start,
                            format!("{path}.argv"),
                            "the program (argv[0]) must be literal, never filled from arguments",
                        );
                    } else if let Some(program) = argv.first()
                        && !env.program_exists(program)
                    {
                        cx.err_at(
                            a.span().start,
                            format!("{path}.argv"),
                            format!("program `{program}` is not on PATH (or not an executable file)"),
                        );
                    }
                    placeholders_known(cx, &argv, "argv", a.span().start);
                }
                ToolKind::Command(CommandSpec {
                    argv,
                    parameters: parameters.clone(),
                    cwd: t.cwd.map(|c| env.resolve(&c)),
                    env: t.env.unwrap_or_default(),
                    timeout_secs,
                    max_stdout_bytes: cap(cx, &t.max_stdout_bytes, "max_stdout_bytes"),
                    max_stderr_bytes: cap(cx, &t.max_stderr_bytes, "max_stderr_bytes"),
                })
            }
            "http" => {
                let method = t.method.as_ref().map_or("GET".to_string(), |m| m.get_ref().to_ascii_uppercase());
                const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
                if let Some(m) = &t.method
                    && !METHODS.contains(&method.as_str())
                {
                    cx.err_at(
                        m.span().start,
                        format!("{path}.method"),
                        format!("unknown method `{}`; valid: {}", m.get_ref(), choices(METHODS)),
                    );
                }
                let url = match &t.url {
                    None => {
                        cx.err_at(at, format!("{path}.url"), "an `http` tool needs `url`");
                        String::new()
                    }
                    Some(u) => {
                        let url = u.get_ref().clone();
                        if let Err(why) = literal_origin(&url) {
                            cx.err_at(u.span().start, format!("{path}.url"), why);
                        }
                        placeholders_known(cx, std::slice::from_ref(&url), "url", u.span().start);
                        url
                    }
                };
                ToolKind::Http(HttpSpec {
                    method,
                    url,
                    headers: headers(t.headers),
                    parameters: parameters.clone(),
                    timeout_secs,
                    max_response_bytes: cap(cx, &t.max_response_bytes, "max_response_bytes"),
                })
            }
            _ => {
                let transport = match (&t.command, &t.url) {
                    (Some(c), None) => {
                        if c.get_ref().is_empty() || c.get_ref()[0].trim().is_empty() {
                            cx.err_at(c.span().start, format!("{path}.command"), "command needs a program");
                        } else if !env.program_exists(&c.get_ref()[0]) {
                            cx.err_at(
                                c.span().start,
                                format!("{path}.command"),
                                format!("program `{}` is not on PATH (or not an executable file)", c.get_ref()[0]),
                            );
                        }
                        McpTransport::Stdio {
                            command: c.get_ref().clone(),
                            env: t.env.unwrap_or_default(),
                            cwd: t.cwd.map(|c| env.resolve(&c)),
                        }
                    }
                    (None, Some(u)) => {
                        if let Err(why) = literal_origin(u.get_ref()) {
                            cx.err_at(u.span().start, format!("{path}.url"), why);
                        }
                        McpTransport::Http { url: u.get_ref().clone(), headers: headers(t.headers) }
                    }
                    _ => {
                        cx.err_at(
                            at,
                            &path,
                            "an `mcp` tool needs exactly one of `command` (a server over stdio) or `url` (streamable HTTP)",
                        );
                        McpTransport::Http { url: String::new(), headers: BTreeMap::new() }
                    }
                };
                ToolKind::Mcp(McpSpec {
                    transport,
                    allow: t.allow.unwrap_or_default(),
                    timeout_secs,
                    max_output_bytes: cap(cx, &t.max_output_bytes, "max_output_bytes"),
                })
            }
        };
        if cx.errors.len() == before {
            out.insert(
                name.clone(),
                ToolSpec {
                    name: name.clone(),
                    description: t.description.unwrap_or_default(),
                    idempotent: t.idempotent.unwrap_or(false),
                    approve_by,
                    kind: tool_kind,
                },
            );
        }
    }
    out
}

/// Check the peers' grants: every name is a declared tool or a built-in.
pub(super) fn check_grant(
    cx: &mut Ctx<'_>,
    at: usize,
    key: &str,
    name: &str,
    tools: &BTreeMap<String, ToolSpec>,
    declared: &[String],
) -> bool {
    if tools.contains_key(name) || Builtin::parse(name).is_some() {
        return true;
    }
    if declared.iter().any(|d| d == name) {
        // Declared but invalid: its own error says why.
        return false;
    }
    cx.err_at(
        at,
        key,
        format!(
            "unknown tool `{name}`; declared tools: {}; built-ins: {}",
            choices(declared),
            choices(Builtin::ALL.iter().map(|b| b.as_str()))
        ),
    );
    false
}

/// The `{name}` placeholders of a template.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            out.push(name.to_string());
        }
        rest = &after[end + 1..];
    }
    out
}

/// A URL template's scheme, host and port must be written out: arguments may fill
/// the path and query only.
fn literal_origin(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("url `{url}` must start with http:// or https://"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("url scheme `{scheme}` is not supported; valid: `http`, `https`"));
    }
    let origin = rest.split(['/', '?', '#']).next().unwrap_or("");
    if origin.is_empty() {
        return Err(format!("url `{url}` has no host"));
    }
    if origin.contains(['{', '}']) {
        return Err("the url's host and port must be literal, never filled from arguments".into());
    }
    if origin.contains('@') {
        return Err("the url may not carry credentials; put secrets in `headers` with { env = \"VAR\" }".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_names_in_braces() {
        assert_eq!(placeholders("--name={name}"), ["name"]);
        assert_eq!(placeholders("{a}/{b_2}"), ["a", "b_2"]);
        assert!(placeholders("{}{ x }{").is_empty());
    }

    #[test]
    fn origins_are_literal() {
        assert!(literal_origin("http://127.0.0.1:8080/x/{id}?q={q}").is_ok());
        assert!(literal_origin("http://{host}/x").is_err());
        assert!(literal_origin("ftp://h/x").is_err());
        assert!(literal_origin("https://user:pw@h/x").is_err());
        assert!(literal_origin("h/x").is_err());
    }
}
