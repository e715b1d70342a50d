//! A program peer run as a command: each turn starts the program, writes the peer's
//! inbox to its stdin as JSON lines and reads its actions from stdout, one JSON object
//! a line (the format is in `roundtable_core::model::program`). Never through a shell;
//! its environment holds only `PATH`, `HOME`, `LANG` and `TZ`; a turn that outlives the
//! model's timeout is ended by the timeout layer, which drops (and so kills) the child.

use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use roundtable_core::model::program::{inbox_lines, inbox_of, parse_action_lines, response_of};
use roundtable_core::model::{ChatModel, ChatRequest, ChatResponse, ModelError, ModelErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of a program's output read; more is an error.
const MAX_OUTPUT: u64 = 4 << 20;

/// A command that takes a peer's turns.
#[derive(Clone, Debug)]
pub struct CommandProgram {
    name: String,
    command: Vec<String>,
    cwd: Option<PathBuf>,
}

impl CommandProgram {
    pub fn new(name: impl Into<String>, command: Vec<String>, cwd: Option<PathBuf>) -> Self {
        CommandProgram { name: name.into(), command, cwd }
    }
}

#[async_trait]
impl ChatModel for CommandProgram {
    fn name(&self) -> &str {
        &self.name
    }
    async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ModelError> {
        let fail = |m: String| ModelError::new(ModelErrorKind::BadRequest, m);
        let (program, args) = self.command.split_first().ok_or_else(|| fail("program: empty command".into()))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in ["PATH", "HOME", "LANG", "TZ"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| fail(format!("program `{program}` could not start: {e}")))?;
        let input = inbox_lines(&inbox_of(req));
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = async move {
            // A program that exits without reading its inbox is its own business.
            let _ = stdin.write_all(input.as_bytes()).await;
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut stdout = stdout.take(MAX_OUTPUT + 1);
        let mut stderr = stderr.take(64 * 1024);
        let read_out = stdout.read_to_end(&mut out);
        let read_err = stderr.read_to_end(&mut err);
        let (_, o, _) = tokio::join!(writer, read_out, read_err);
        o.map_err(|e| fail(format!("program `{program}`: reading its output: {e}")))?;
        let status = child.wait().await.map_err(|e| fail(format!("program `{program}`: {e}")))?;
        if out.len() as u64 > MAX_OUTPUT {
            return Err(fail(format!("program `{program}` wrote more than {MAX_OUTPUT} bytes")));
        }
        if !status.success() {
            let e = String::from_utf8_lossy(&err);
            let e: String = e.trim().chars().take(500).collect();
            return Err(fail(format!("program `{program}` exited with {status}: {e}")));
        }
        let text =
            String::from_utf8(out).map_err(|_| fail(format!("program `{program}` wrote output that is not UTF-8")))?;
        let actions = parse_action_lines(&text)
            .map_err(|e| ModelError::new(ModelErrorKind::Malformed, format!("program `{program}`: {e}")))?;
        Ok(response_of(req, &self.name, actions))
    }
}
