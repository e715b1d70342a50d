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
    /// `cargo test ARGS --no-run` builds the test binaries once; each binary's `--list`
    /// names its tests, and each test runs as `BINARY --exact NAME` in its package's
    /// directory.
    Cargo,
    /// `pytest --collect-only -q ARGS`; each test runs as `pytest -q NODEID`.
    Pytest,
}

/// Run `program args` in `dir` for the listing, failing with the command's last lines.
fn listing_of(program: &str, args: &[String], dir: &Path) -> Result<String, Failure> {
    let out = std::process::Command::new(program)
        .args(args)
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A test binary `cargo test --no-run` built.
#[derive(Debug, PartialEq)]
pub(crate) struct TestBinary {
    /// How the tests of this binary are named apart from others': the package for its
    /// library, `package::target` for the others (as `cargo nextest` does).
    pub(crate) name: String,
    pub(crate) executable: PathBuf,
    /// The package's directory, where `cargo test` runs the binary.
    pub(crate) dir: PathBuf,
}

/// The test binaries in the JSON messages of `cargo test --no-run --message-format json`.
pub(crate) fn test_binaries(messages: &str) -> Vec<TestBinary> {
    let mut out = Vec::new();
    for line in messages.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if m["reason"] != "compiler-artifact" || m["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (m["executable"].as_str(), m["manifest_path"].as_str()) else { continue };
        let target = m["target"]["name"].as_str().unwrap_or_default();
        let kinds: Vec<&str> =
            m["target"]["kind"].as_array().into_iter().flatten().filter_map(|k| k.as_str()).collect();
        // The package's name: from `path+file:///…#name@version` or `…#version` ids.
        let package = m["package_id"]
            .as_str()
            .and_then(|id| {
                let frag = id.rsplit_once('#')?.1;
                match frag.split_once('@') {
                    Some((name, _)) => Some(name.to_owned()),
                    None => id.rsplit_once('#')?.0.rsplit('/').next().map(str::to_owned),
                }
            })
            .unwrap_or_else(|| target.to_owned());
        let name =
            if kinds.iter().any(|k| matches!(*k, "lib" | "rlib" | "proc-macro" | "cdylib" | "dylib" | "staticlib")) {
                package
            } else if kinds.contains(&"bin") {
                format!("{package}::bin/{target}")
            } else {
                format!("{package}::{target}")
            };
        let dir = Path::new(manifest).parent().map(Path::to_path_buf).unwrap_or_default();
        out.push(TestBinary { name, executable: PathBuf::from(exe), dir });
    }
    out
}

/// Run `runner`'s listing in `dir` and turn it into suite-file lines.
///
/// For cargo, the suite runs the test binaries themselves, not `cargo test` once per
/// test: twenty workers each starting `cargo test` would queue on cargo's lock of the
/// target directory, re-check (or, after an edit, rebuild) the whole package per test,
/// and run every test binary and the doc tests to find one test. Built once here, each
/// test costs one process start. Doc tests are not collected (they are not in the
/// binaries' listings).
pub(crate) fn collect(runner: Runner, dir: &Path, extra: &[String], timeout_secs: f64) -> Result<String, Failure> {
    // (id, area, command, working directory) for each test.
    let mut tests: Vec<(String, String, Vec<String>, String)> = Vec::new();
    let command = match runner {
        Runner::Cargo => {
            let mut args = vec!["test".to_owned()];
            args.extend(extra.iter().cloned());
            args.extend(["--no-run".to_owned(), "--message-format".to_owned(), "json-render-diagnostics".to_owned()]);
            let binaries = test_binaries(&listing_of("cargo", &args, dir)?);
            if binaries.is_empty() {
                return Err(Failure::Input(format!(
                    "--collect: `cargo {}` in {} built no test binary",
                    args.join(" "),
                    dir.display()
                )));
            }
            let mut seen: HashMap<String, usize> = HashMap::new();
            for b in &binaries {
                let exe = b.executable.to_string_lossy().into_owned();
                let listing = listing_of(&exe, &["--list".to_owned()], &b.dir)?;
                for (name, module) in parse_listing(Runner::Cargo, &listing) {
                    let id = format!("{} {name}", b.name);
                    // Two binaries of one name (a test target rebuilt under another
                    // hash): one test.
                    *seen.entry(id.clone()).or_default() += 1;
                    if seen[&id] > 1 {
                        continue;
                    }
                    let area = if module.is_empty() { b.name.clone() } else { format!("{} {module}", b.name) };
                    let cmd = vec![exe.clone(), "--exact".to_owned(), name];
                    tests.push((id, area, cmd, b.dir.to_string_lossy().into_owned()));
                }
            }
            format!("cargo {}", args.join(" "))
        }
        Runner::Pytest => {
            // No cache plugin: twenty workers would race to rewrite `.pytest_cache`.
            let mut args: Vec<String> =
                ["--collect-only", "-q", "-p", "no:cacheprovider"].iter().map(|a| (*a).to_owned()).collect();
            args.extend(extra.iter().cloned());
            let listing = listing_of("pytest", &args, dir)?;
            let mut seen = std::collections::HashSet::new();
            for (name, area) in parse_listing(Runner::Pytest, &listing) {
                if !seen.insert(name.clone()) {
                    continue;
                }
                let cmd = ["pytest", "-q", "-p", "no:cacheprovider", &name].iter().map(|a| (*a).to_owned()).collect();
                tests.push((name, area, cmd, dir.to_string_lossy().into_owned()));
            }
            format!("pytest {}", args.join(" "))
        }
    };
    let mut lines = String::new();
    for (id, area, cmd, cwd) in tests {
        let line = serde_json::json!({ "id": id, "cmd": cmd, "area": area, "timeout_secs": timeout_secs, "cwd": cwd });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    if lines.is_empty() {
        return Err(Failure::Input(format!("--collect: `{command}` in {} listed no test", dir.display())));
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
    fn cargo_messages_name_the_test_binaries_and_their_package_dirs() {
        let messages = [
            r#"{"reason":"compiler-artifact","package_id":"path+file:///p/tiny#0.1.0","manifest_path":"/p/tiny/Cargo.toml","target":{"kind":["lib"],"name":"tiny"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///p/tiny#0.1.0","manifest_path":"/p/tiny/Cargo.toml","target":{"kind":["lib"],"name":"tiny"},"profile":{"test":true},"executable":"/t/deps/tiny-b84"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///p#other@0.2.0","manifest_path":"/p/Cargo.toml","target":{"kind":["test"],"name":"api"},"profile":{"test":true},"executable":"/t/deps/api-355"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///p#other@0.2.0","manifest_path":"/p/Cargo.toml","target":{"kind":["bin"],"name":"tool"},"profile":{"test":true},"executable":"/t/deps/tool-1"}"#,
            r#"{"reason":"build-finished","success":true}"#,
            "not json",
        ]
        .join("\n");
        let bin = |name: &str, exe: &str, dir: &str| TestBinary {
            name: name.to_owned(),
            executable: PathBuf::from(exe),
            dir: PathBuf::from(dir),
        };
        assert_eq!(
            test_binaries(&messages),
            vec![
                bin("tiny", "/t/deps/tiny-b84", "/p/tiny"),
                bin("other::api", "/t/deps/api-355", "/p"),
                bin("other::bin/tool", "/t/deps/tool-1", "/p")
            ]
        );
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
