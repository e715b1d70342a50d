//! Suites of real tests: a JSON-lines suite file, or one collected from a test runner.
//!
//! One test a line: `{"id": "...", "cmd": ["program", "arg", ...], "depends_on": [...],
//! "area": "...", "timeout_secs": 60, "cwd": "dir"}` (`depends_on`, `area`,
//! `timeout_secs` and `cwd` optional; `cwd` relative to the file's directory). Blank lines
//! and lines starting with `#` are skipped.
//!
//! **Where commands come from.** Only from the file on the machine that runs them: the
//! session's task carries the file's digest, its ids, dependencies and areas, never a
//! command. A worker loads its own copy and refuses to run when its digest differs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::Failure;

/// The longest timeout a test may ask for.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;
/// A test's timeout when the file does not give one.
pub(crate) const DEFAULT_TIMEOUT_SECS: f64 = 300.0;
/// How many tests a suite may hold.
pub(crate) const MAX_TESTS: usize = 100_000;

/// One test as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    id: Option<String>,
    cmd: Option<Vec<String>>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    area: Option<String>,
    #[serde(default)]
    timeout_secs: Option<f64>,
    #[serde(default)]
    cwd: Option<PathBuf>,
}

/// One test, checked.
#[derive(Clone, Debug)]
pub(crate) struct TestCase {
    pub(crate) id: String,
    pub(crate) cmd: Vec<String>,
    pub(crate) deps: Vec<usize>,
    pub(crate) area: String,
    pub(crate) timeout_secs: f64,
    pub(crate) cwd: Option<PathBuf>,
}

/// A suite file, loaded and checked.
#[derive(Debug)]
pub(crate) struct LocalSuite {
    pub(crate) path: PathBuf,
    /// `sha256:<hex>` of the file's bytes.
    pub(crate) digest: String,
    pub(crate) tests: Vec<TestCase>,
}

fn bad(path: &Path, line: usize, key: &str, msg: impl std::fmt::Display) -> Failure {
    Failure::Input(format!("{}:{line}: key `{key}`: {msg}", path.display()))
}

pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Load and check the suite file at `path`.
pub(crate) fn load(path: &Path) -> Result<LocalSuite, Failure> {
    let bytes = std::fs::read(path).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
    let text =
        std::str::from_utf8(&bytes).map_err(|e| Failure::Input(format!("{}: not UTF-8 text: {e}", path.display())))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut tests: Vec<TestCase> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    let mut raw_deps: Vec<Vec<String>> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let raw: RawTest = serde_json::from_str(trimmed).map_err(|e| {
            let key = e.to_string();
            // serde names an unknown field in its message; say which keys are valid.
            if key.contains("unknown field") {
                Failure::Input(format!(
                    "{}:{n}: {e} (valid keys: id, cmd, depends_on, area, timeout_secs, cwd)",
                    path.display()
                ))
            } else {
                Failure::Input(format!("{}:{n}: not a JSON test object: {e}", path.display()))
            }
        })?;
        let id = raw.id.ok_or_else(|| bad(path, n, "id", "missing (a unique, non-empty string)"))?;
        if id.is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
            return Err(bad(
                path,
                n,
                "id",
                format!("{id:?} must be 1 to 512 characters, none of them control characters"),
            ));
        }
        if let Some(&first) = by_id.get(&id) {
            return Err(bad(path, n, "id", format!("duplicate id {id:?} (first on line {})", lines[first])));
        }
        let cmd = raw
            .cmd
            .ok_or_else(|| bad(path, n, "cmd", "missing (an array of strings: the program, then its arguments)"))?;
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(bad(path, n, "cmd", "is empty: it needs at least the program to run"));
        }
        if cmd.iter().any(|a| a.contains('\0')) {
            return Err(bad(path, n, "cmd", "holds a NUL byte"));
        }
        let timeout_secs = raw.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if !(timeout_secs.is_finite() && timeout_secs > 0.0 && timeout_secs <= MAX_TIMEOUT_SECS) {
            return Err(bad(
                path,
                n,
                "timeout_secs",
                format!("{timeout_secs} is out of range (more than 0, at most {MAX_TIMEOUT_SECS})"),
            ));
        }
        let cwd = match raw.cwd {
            None => None,
            Some(dir) => {
                let dir = if dir.is_relative() { base.join(dir) } else { dir };
                if !dir.is_dir() {
                    return Err(bad(path, n, "cwd", format!("{} is not a directory", dir.display())));
                }
                Some(dir)
            }
        };
        let area = raw.area.unwrap_or_default();
        if area.len() > 256 {
            return Err(bad(path, n, "area", "is longer than 256 bytes"));
        }
        if tests.len() == MAX_TESTS {
            return Err(bad(path, n, "id", format!("a suite holds at most {MAX_TESTS} tests")));
        }
        by_id.insert(id.clone(), tests.len());
        lines.push(n);
        raw_deps.push(raw.depends_on);
        tests.push(TestCase { id, cmd, deps: Vec::new(), area, timeout_secs, cwd });
    }
    if tests.is_empty() {
        return Err(Failure::Input(format!("{}: holds no test (one JSON object a line)", path.display())));
    }
    for (i, deps) in raw_deps.iter().enumerate() {
        for d in deps {
            match by_id.get(d) {
                Some(&j) if j == i => {
                    return Err(bad(path, lines[i], "depends_on", format!("test {d:?} depends on itself")));
                }
                Some(&j) => {
                    if !tests[i].deps.contains(&j) {
                        tests[i].deps.push(j);
                    }
                }
                None => return Err(bad(path, lines[i], "depends_on", format!("unknown id {d:?}"))),
            }
        }
    }
    if let Some(cycle) = find_cycle(&tests) {
        let names: Vec<&str> = cycle.iter().map(|&i| tests[i].id.as_str()).collect();
        return Err(bad(path, lines[cycle[0]], "depends_on", format!("dependency cycle: {}", names.join(" → "))));
    }
    Ok(LocalSuite { path: path.to_path_buf(), digest: digest_of(&bytes), tests })
}

/// A dependency cycle, as the tests on it (the first one repeated at the end).
fn find_cycle(tests: &[TestCase]) -> Option<Vec<usize>> {
    // Iterative depth-first search: 0 unseen, 1 on the stack, 2 done.
    let mut state = vec![0u8; tests.len()];
    for start in 0..tests.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = tests[node].deps.get(*next) {
                *next += 1;
                match state[dep] {
                    0 => {
                        state[dep] = 1;
                        stack.push((dep, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(n, _)| n == dep).expect("on the stack");
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(n, _)| n).collect();
                        cycle.push(dep);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// The runners a suite can be collected from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Runner {
    /// `cargo test ARGS -- --list`; each test runs as `cargo test -q ARGS -- --exact NAME`.
    Cargo,
    /// `pytest --collect-only -q ARGS`; each test runs as `pytest -q NODEID`.
    Pytest,
}

/// Run `runner`'s listing in `dir` and turn it into suite-file lines.
pub(crate) fn collect(runner: Runner, dir: &Path, extra: &[String], timeout_secs: f64) -> Result<String, Failure> {
    let (program, args): (&str, Vec<String>) = match runner {
        Runner::Cargo => {
            let mut a = vec!["test".to_owned()];
            a.extend(extra.iter().cloned());
            a.extend(["--".to_owned(), "--list".to_owned()]);
            ("cargo", a)
        }
        Runner::Pytest => {
            let mut a = vec!["--collect-only".to_owned(), "-q".to_owned()];
            a.extend(extra.iter().cloned());
            ("pytest", a)
        }
    };
    let out = std::process::Command::new(program)
        .args(&args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Failure::Input(format!("--collect: cannot run {program} in {}: {e}", dir.display())))?;
    if !out.status.success() {
        return Err(Failure::Input(format!(
            "--collect: `{program} {}` in {} failed ({}): {}",
            args.join(" "),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" / ")
        )));
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let dir_text = dir.to_string_lossy().into_owned();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut lines = String::new();
    for (name, area) in parse_listing(runner, &listing) {
        let n = seen.entry(name.clone()).or_default();
        *n += 1;
        // The same name in two test binaries: one test (the filter runs both).
        if *n > 1 {
            continue;
        }
        let cmd: Vec<String> = match runner {
            Runner::Cargo => {
                let mut c = vec!["cargo".to_owned(), "test".to_owned(), "-q".to_owned()];
                c.extend(extra.iter().cloned());
                c.extend(["--".to_owned(), "--exact".to_owned(), name.clone()]);
                c
            }
            Runner::Pytest => vec!["pytest".to_owned(), "-q".to_owned(), name.clone()],
        };
        let line = serde_json::json!({
            "id": name, "cmd": cmd, "area": area, "timeout_secs": timeout_secs, "cwd": dir_text,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    if lines.is_empty() {
        return Err(Failure::Input(format!(
            "--collect: `{program} {}` in {} listed no test",
            args.join(" "),
            dir.display()
        )));
    }
    Ok(lines)
}

/// Test names and areas from a runner's listing.
pub(crate) fn parse_listing(runner: Runner, listing: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in listing.lines() {
        let line = line.trim();
        match runner {
            Runner::Cargo => {
                // `path::to::name: test` (benches and summaries are not tests).
                if let Some(name) = line.strip_suffix(": test") {
                    let area = name.rsplit_once("::").map_or("", |(m, _)| m);
                    out.push((name.to_owned(), area.to_owned()));
                }
            }
            Runner::Pytest => {
                // `tests/test_x.py::test_a` (or `::Class::test_a`).
                if line.contains("::") && !line.contains(' ') {
                    let area = line.split("::").next().unwrap_or("");
                    out.push((line.to_owned(), area.to_owned()));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn error(text: &str) -> String {
        let (_dir, path) = write(text);
        match load(&path) {
            Err(Failure::Input(m)) => m,
            Err(Failure::Runtime(m)) => panic!("a runtime error for bad input: {m}"),
            Ok(s) => panic!("accepted: {s:?}"),
        }
    }

    #[test]
    fn a_good_file_loads_with_its_dependencies_and_digest() {
        let text = "# a comment\n{\"id\":\"a\",\"cmd\":[\"true\"],\"area\":\"x\"}\n\n{\"id\":\"b\",\"cmd\":[\"false\"],\"depends_on\":[\"a\"],\"timeout_secs\":2}\n";
        let (_dir, path) = write(text);
        let s = match load(&path) {
            Ok(s) => s,
            Err(Failure::Input(m) | Failure::Runtime(m)) => panic!("{m}"),
        };
        assert_eq!(s.tests.len(), 2);
        assert_eq!(s.tests[1].deps, vec![0]);
        assert_eq!(s.tests[0].area, "x");
        assert_eq!(s.tests[1].timeout_secs, 2.0);
        assert_eq!(s.tests[0].timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(s.digest, digest_of(text.as_bytes()));
        assert_ne!(s.digest, digest_of(b"other"));
    }

    #[test]
    fn bad_files_name_the_line_and_the_key() {
        let e = error("{\"id\":\"a\",\"cmd\":[\"true\"]}\n{\"id\":\"a\",\"cmd\":[\"true\"]}\n");
        assert!(e.contains("suite.jsonl:2: key `id`") && e.contains("duplicate") && e.contains("line 1"), "{e}");
        let e = error(
            "{\"id\":\"a\",\"cmd\":[\"true\"],\"depends_on\":[\"b\"]}\n{\"id\":\"b\",\"cmd\":[\"true\"],\"depends_on\":[\"a\"]}\n",
        );
        assert!(e.contains(":1: key `depends_on`") && e.contains("cycle: a → b → a"), "{e}");
        let e =
            error("{\"id\":\"a\",\"cmd\":[\"true\"]}\n\n{\"id\":\"b\",\"cmd\":[\"true\"],\"depends_on\":[\"zz\"]}\n");
        assert!(e.contains(":3: key `depends_on`") && e.contains("unknown id \"zz\""), "{e}");
        let e = error("{\"id\":\"a\",\"cmd\":[\"true\"]}\n{\"id\":\"b\",\n");
        assert!(e.contains("suite.jsonl:2:") && e.contains("not a JSON"), "{e}");
        let e = error("{\"id\":\"a\"}\n");
        assert!(e.contains(":1: key `cmd`: missing"), "{e}");
        let e = error("{\"id\":\"a\",\"cmd\":[]}\n");
        assert!(e.contains(":1: key `cmd`: is empty"), "{e}");
        let e = error("{\"id\":\"a\",\"cmd\":[\"true\"],\"timeout_secs\":0}\n");
        assert!(e.contains(":1: key `timeout_secs`"), "{e}");
        let e = error("{\"id\":\"a\",\"cmd\":[\"true\"],\"comand\":1}\n");
        assert!(e.contains(":1:") && e.contains("comand") && e.contains("valid keys"), "{e}");
        let e = error("{\"id\":\"a\",\"cmd\":[\"true\"],\"cwd\":\"nowhere\"}\n");
        assert!(e.contains(":1: key `cwd`"), "{e}");
        let e = error("\n# nothing\n");
        assert!(e.contains("holds no test"), "{e}");
    }

    #[test]
    fn listings_become_tests() {
        let cargo = "tests::a: test\nb: test\nbench_x: bench\n\n3 tests, 1 benchmark\n";
        assert_eq!(
            parse_listing(Runner::Cargo, cargo),
            vec![("tests::a".to_owned(), "tests".to_owned()), ("b".to_owned(), String::new())]
        );
        let pytest = "t/test_x.py::test_a\nt/test_x.py::C::test_b\n\n2 tests collected in 0.01s\n";
        assert_eq!(
            parse_listing(Runner::Pytest, pytest),
            vec![
                ("t/test_x.py::test_a".to_owned(), "t/test_x.py".to_owned()),
                ("t/test_x.py::C::test_b".to_owned(), "t/test_x.py".to_owned())
            ]
        );
    }
}
