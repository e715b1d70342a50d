#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use roundtable_core::envelope::PeerId;
use roundtable_core::tool::ToolContext;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn ctx() -> ToolContext {
    ToolContext { peer: PeerId::from("tester"), step: Arc::from("1") }
}

/// Whether process `pid` is gone, or a zombie whose every thread has exited (so its
/// parent can reap it and its files are closed). A multi-threaded process's leader shows
/// as a zombie while its other threads are still exiting; that is not gone yet.
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // The state follows the command name in parentheses.
            let zombie = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false);
            zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1)
        }
    }
}

/// Waits until `pid` is gone; panics (naming it) if it is still running after a long
/// while. The wait is for a condition, not a timing: a killed process disappears at
/// once, and the bound only keeps a broken implementation from hanging the suite.
pub async fn wait_gone(pid: i32) {
    for _ in 0..400 {
        if process_gone(pid) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("process {pid} is still running");
}

/// Waits until `path` holds at least `lines` lines and returns them.
pub async fn wait_lines(path: &Path, lines: usize) -> Vec<String> {
    for _ in 0..400 {
        if let Ok(text) = std::fs::read_to_string(path) {
            let got: Vec<String> = text.lines().map(str::to_owned).collect();
            if got.len() >= lines {
                return got;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{} never had {lines} lines", path.display());
}
