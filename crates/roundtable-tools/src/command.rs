//! The `command` tool: a program run without a shell, its argv filled from arguments.
//!
//! **Filling.** Each element of the `argv` template may hold `{name}` placeholders, filled
//! from the call's arguments after they were validated against the tool's schema:
//!
//! - an element that is exactly `{name}` becomes exactly one argv element whatever the
//!   value (spaces, `;`, `$(...)`, newlines are just bytes of that element), or, when
//!   the value is an array, one element per item;
//! - a placeholder inside other text (`--out={path}`) takes a scalar only;
//! - strings are used as they are; numbers, booleans and null as their JSON text;
//!   objects (and arrays inside text, or nested) are refused;
//! - an element whose placeholder names an argument the call did not give is left out;
//! - a filled element that starts with `-` *because of a value* is refused unless a
//!   literal `--` element comes before it in the template, so an argument never
//!   becomes a flag (`--out={path}` with `path = "-x"` is fine: the element starts
//!   with the template's own text);
//! - a NUL byte anywhere is refused; `argv[0]` is always literal.
//!
//! **Running.** No shell. The environment is cleared but `PATH`, `HOME`, `LANG`, `TZ`
//! and the spec's allow-list (each passed only when set); stdin is null; the program
//! leads its own process group. When the program exits, what is left of its group is
//! killed (a call's processes do not outlive the call); when the timeout passes first,
//! the whole group (grandchildren included) is killed with `SIGKILL`, and so it is when
//! the call is dropped. stdout and stderr are read concurrently to their end, keeping at
//! most the caps (the rest is read and dropped, `truncated` is set).
//!
//! **Result.** `ok` for exit status 0, `error` otherwise (a non-zero status, a signal,
//! a timeout, a program that could not start). The model is told stdout, then stderr
//! under a `[stderr]` label, then bracketed notes (cut output, exit status, signal,
//! timeout).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use roundtable_core::tool::{CommandSpec, Outcome, Tool, ToolContext, ToolDef, ToolOutput, ToolSpec};
use serde_json::Value;
use tokio::process::Command;

use crate::capture::{self, Captured};
use crate::schema::ArgumentSchema;
use crate::template::{self, Piece};
use crate::{Problem, check_limits, duration_from_secs};

/// Variables every command gets from the runtime's environment (when set).
pub const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// How long output still being read is awaited once the group is dead. Only a process
/// that left the group (`setsid`) can hold a pipe open past that.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A `command` tool, checked and ready to run.
#[derive(Debug)]
pub struct CommandTool {
    def: ToolDef,
    idempotent: bool,
    spec: CommandSpec,
    schema: ArgumentSchema,
    timeout: Duration,
}

impl CommandTool {
    /// Builds the tool for `tool` (whose kind is `command`), or every problem of its spec.
    pub fn new(tool: &ToolSpec, spec: &CommandSpec) -> Result<Self, Vec<Problem>> {
        let problems = validate(spec);
        if !problems.is_empty() {
            return Err(problems);
        }
        let schema = ArgumentSchema::new(&spec.parameters).map_err(|m| vec![Problem::new("parameters", m)])?;
        let timeout = duration_from_secs(spec.timeout_secs)
            .ok_or_else(|| vec![Problem::new("timeout_secs", "must be a positive number of seconds")])?;
        Ok(CommandTool {
            def: ToolDef {
                name: tool.name.clone(),
                description: tool.description.clone(),
                parameters: spec.parameters.clone(),
            },
            idempotent: tool.idempotent,
            spec: spec.clone(),
            schema,
            timeout,
        })
    }

    /// The argv a call with `arguments` would run, or why it is refused.
    pub fn argv(&self, arguments: &Value) -> Result<Vec<String>, String> {
        self.schema.check(arguments)?;
        fill_argv(&self.spec.argv, arguments)
    }
}

#[async_trait]
impl Tool for CommandTool {
    fn def(&self) -> &ToolDef {
        &self.def
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    async fn call(&self, arguments: &Value, _ctx: &ToolContext) -> ToolOutput {
        let argv = match self.argv(arguments) {
            Ok(argv) => argv,
            Err(why) => return ToolOutput::refused(why),
        };
        run(&argv, &self.spec, self.timeout).await
    }
}

/// Everything wrong with a command spec, each with the key it concerns; empty when it
/// can run. `argv[0]` is looked up on this process's `PATH` (the one commands get).
pub fn validate(spec: &CommandSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let schema = match ArgumentSchema::new(&spec.parameters) {
        Ok(s) => Some(s),
        Err(m) => {
            problems.push(Problem::new("parameters", m));
            None
        }
    };
    match spec.argv.first() {
        None => problems.push(Problem::new("argv", "is empty: it needs at least the program to run")),
        Some(program) => {
            if template::names(program).next().is_some() {
                problems.push(Problem::new(
                    "argv[0]",
                    format!("{program:?} holds a placeholder: the program must be literal"),
                ));
            } else if program.contains('\0') {
                problems.push(Problem::new("argv[0]", "holds a NUL byte"));
            } else if let Err(m) = find_program(program, spec.cwd.as_deref()) {
                problems.push(Problem::new("argv[0]", m));
            }
        }
    }
    for (i, element) in spec.argv.iter().enumerate().skip(1) {
        if element.contains('\0') {
            problems.push(Problem::new(format!("argv[{i}]"), "holds a NUL byte"));
        }
        if let Some(schema) = &schema {
            for name in template::names(element) {
                if !schema.properties().iter().any(|p| p == name) {
                    let declared = if schema.properties().is_empty() {
                        "none are declared".to_owned()
                    } else {
                        format!("declared: {}", schema.properties().join(", "))
                    };
                    problems.push(Problem::new(
                        format!("argv[{i}]"),
                        format!("placeholder {{{name}}} names no property of parameters ({declared})"),
                    ));
                }
            }
        }
    }
    if let Some(cwd) = &spec.cwd {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => problems.push(Problem::new("cwd", format!("{} is not a directory", cwd.display()))),
            Err(e) => problems.push(Problem::new("cwd", format!("{}: {e}", cwd.display()))),
        }
    }
    for (i, name) in spec.env.iter().enumerate() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            problems.push(Problem::new(format!("env[{i}]"), format!("{name:?} is not a variable name")));
        }
    }
    check_limits(
        &mut problems,
        spec.timeout_secs,
        &[("max_stdout_bytes", spec.max_stdout_bytes), ("max_stderr_bytes", spec.max_stderr_bytes)],
    );
    problems
}

/// Where `program` is: a path (with a `/`, relative to `cwd` when given) that is an
/// executable file, or a name found on `PATH`.
pub fn find_program(program: &str, cwd: Option<&Path>) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("is empty: it needs the program to run".to_owned());
    }
    if program.contains('/') {
        let path = match cwd {
            Some(dir) if Path::new(program).is_relative() => dir.join(program),
            _ => PathBuf::from(program),
        };
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("{} is not an executable file", path.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("{program:?} is not found on PATH ({})", Path::new(&path).display()))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The argv for `arguments` (see the module docs), or why it is refused.
pub fn fill_argv(template: &[String], arguments: &Value) -> Result<Vec<String>, String> {
    let empty = serde_json::Map::new();
    let args = match arguments {
        Value::Object(map) => map,
        Value::Null => &empty,
        other => return Err(format!("arguments must be a JSON object, not {}", kind_of(other))),
    };
    let mut argv = Vec::with_capacity(template.len());
    let mut after_double_dash = false;
    for (i, element) in template.iter().enumerate() {
        if i == 0 {
            if template::names(element).next().is_some() {
                return Err("the program (argv[0]) must be literal".to_owned());
            }
            argv.push(element.clone());
            continue;
        }
        if element == "--" {
            after_double_dash = true;
            argv.push(element.clone());
            continue;
        }
        if let Some(name) = template::whole(element) {
            let Some(value) = args.get(name) else { continue };
            let values: Vec<String> = match value {
                Value::Array(items) => items.iter().map(|v| scalar(name, v)).collect::<Result<_, _>>()?,
                v => vec![scalar(name, v)?],
            };
            for v in values {
                check_element(name, &v, true, after_double_dash)?;
                argv.push(v);
            }
            continue;
        }
        let pieces = template::pieces(element);
        let mut filled = String::new();
        let mut missing = false;
        let mut starts_with_value = None;
        for (k, piece) in pieces.iter().enumerate() {
            match piece {
                Piece::Text(t) => filled.push_str(t),
                Piece::Arg(name) => match args.get(*name) {
                    None => missing = true,
                    Some(Value::Array(_)) => {
                        return Err(format!(
                            "argument {name:?} is an array: arrays fill only an element that is exactly {{{name}}}"
                        ));
                    }
                    Some(v) => {
                        if k == 0 {
                            starts_with_value = Some(*name);
                        }
                        filled.push_str(&scalar(name, v)?);
                    }
                },
            }
        }
        if missing {
            continue;
        }
        let name = starts_with_value.unwrap_or("");
        check_element(name, &filled, starts_with_value.is_some(), after_double_dash)?;
        argv.push(filled);
    }
    Ok(argv)
}

/// A scalar as argv text: strings as they are, others as JSON.
fn scalar(name: &str, value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) | Value::Null => Ok(value.to_string()),
        other => {
            Err(format!("argument {name:?} is {}: only strings, numbers, booleans and null fill argv", kind_of(other)))
        }
    }
}

fn check_element(name: &str, element: &str, starts_with_value: bool, after_double_dash: bool) -> Result<(), String> {
    if element.contains('\0') {
        return Err(format!("argument {name:?} holds a NUL byte"));
    }
    if starts_with_value && element.starts_with('-') && !after_double_dash {
        return Err(format!(
            "argument {name:?} would start an argv element with '-' ({}): refused so it cannot become an option",
            preview(element)
        ));
    }
    Ok(())
}

fn preview(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    if cut.len() < s.len() { format!("{cut:?}...") } else { format!("{cut:?}") }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Kills a process group with `SIGKILL` when dropped (a dropped call leaves nothing
/// running).
struct GroupKiller(Option<Pid>);

impl GroupKiller {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            // ESRCH (the group is gone already) is the usual, harmless answer.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a literal `argv` (no placeholders are filled) under `spec`'s working directory,
/// environment allow-list, timeout and caps: the way a test runner runs one test. A
/// program that is not found, or limits out of range, give an error result, never a
/// panic. Also says whether the timeout killed it.
pub async fn run_literal(argv: &[String], spec: &CommandSpec) -> (ToolOutput, bool) {
    let Some(program) = argv.first() else {
        return (ToolOutput::error("an empty command: it needs at least the program to run".to_owned()), false);
    };
    if let Err(m) = find_program(program, spec.cwd.as_deref()) {
        return (ToolOutput::error(format!("cannot start {program:?}: {m}")), false);
    }
    let mut problems = Vec::new();
    check_limits(
        &mut problems,
        spec.timeout_secs,
        &[("max_stdout_bytes", spec.max_stdout_bytes), ("max_stderr_bytes", spec.max_stderr_bytes)],
    );
    let Some(timeout) = duration_from_secs(spec.timeout_secs).filter(|_| problems.is_empty()) else {
        let why: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect();
        return (ToolOutput::error(why.join("; ")), false);
    };
    run_timed(argv, spec, timeout).await
}

/// Runs `argv` as `spec` says.
async fn run(argv: &[String], spec: &CommandSpec, timeout: Duration) -> ToolOutput {
    run_timed(argv, spec, timeout).await.0
}

/// Runs `argv` as `spec` says; also says whether the timeout killed it.
async fn run_timed(argv: &[String], spec: &CommandSpec, timeout: Duration) -> (ToolOutput, bool) {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd.env_clear();
    for name in BASE_ENV.iter().copied().chain(spec.env.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    cmd.kill_on_drop(true);

    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let mut out = ToolOutput::error(format!("cannot start {:?}: {e}", argv[0]));
            out.duration_ms = Some(elapsed_ms(start));
            return (out, false);
        }
    };
    let group = GroupKiller(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
    let stdout = child.stdout.take().map(|s| tokio::spawn(capture::read_capped(s, spec.max_stdout_bytes)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(capture::read_capped(s, spec.max_stderr_bytes)));

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // Leftovers of the group (background grandchildren) die with the call either way.
    group.kill();
    let (status, timed_out) = match waited {
        Ok(status) => (status.ok(), false),
        Err(_) => (child.wait().await.ok(), true),
    };
    let stdout = drain(stdout).await;
    let stderr = drain(stderr).await;
    let duration_ms = elapsed_ms(start);

    let exit_status = if timed_out { None } else { status.and_then(|s| s.code()) };
    let signal = status.and_then(|s| s.signal());
    let ok = !timed_out && exit_status == Some(0);

    let mut text = capture::text(&stdout.bytes, stdout.truncated);
    let err_text = capture::text(&stderr.bytes, stderr.truncated);
    if !err_text.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&err_text);
    }
    let mut notes = Vec::new();
    if stdout.truncated {
        notes.push(format!("stdout cut at {} bytes", spec.max_stdout_bytes));
    }
    if stderr.truncated {
        notes.push(format!("stderr cut at {} bytes", spec.max_stderr_bytes));
    }
    if timed_out {
        notes.push(format!("timed out after {}s: the process group was killed", spec.timeout_secs));
    } else if let Some(code) = exit_status.filter(|c| *c != 0) {
        notes.push(format!("exit status {code}"));
    } else if let Some(sig) = signal {
        notes.push(format!("killed by signal {sig}"));
    }
    for note in notes {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("[{note}]"));
    }
    let out = ToolOutput {
        outcome: if ok { Outcome::Ok } else { Outcome::Error },
        output: text,
        exit_status,
        signal,
        duration_ms: Some(duration_ms),
        truncated: stdout.truncated || stderr.truncated,
    };
    (out, timed_out)
}

async fn drain(reader: Option<tokio::task::JoinHandle<Captured>>) -> Captured {
    let Some(mut handle) = reader else { return Captured::default() };
    match tokio::time::timeout(DRAIN_GRACE, &mut handle).await {
        Ok(Ok(c)) => c,
        Ok(Err(_)) => Captured::default(),
        Err(_) => {
            handle.abort();
            Captured {
                bytes: b"(output unavailable: a process that left the tool's group holds it open)".to_vec(),
                truncated: true,
            }
        }
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
