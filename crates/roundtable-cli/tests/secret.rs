//! The data directory's sealing secret: created once, private, reused by every run,
//! refused when it is not one this program wrote.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_roundtable")).args(args).arg("--data-dir").arg(data).output().unwrap()
}

#[test]
fn the_secret_is_private_stable_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let jury = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/jury.toml");
    let o = run(&["run", jury.to_str().unwrap(), "--json"], &data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = data.join("secret");
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(first.len(), 64, "32 bytes in hex");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let o = run(&["run", jury.to_str().unwrap(), "--json"], &data);
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first, "reused, not replaced");
    // The secret never reaches the log.
    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["session"].as_str().unwrap().to_string();
    let export = run(&["export", &id], &data);
    assert!(!String::from_utf8_lossy(&export.stdout).contains(first.trim()));

    std::fs::write(&path, "not hex").unwrap();
    let o = run(&["run", jury.to_str().unwrap(), "--json"], &data);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("secret"), "{}", String::from_utf8_lossy(&o.stderr));
}
