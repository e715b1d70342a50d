//! The committed team-file schema and reference page are what the validator's types
//! generate. When this fails, regenerate them:
//!
//!     cargo run --bin roundtable -- schema --write docs

use std::path::PathBuf;

use roundtable_core::team::reference::{ANSWER_FORMATS, reference_markdown};
use roundtable_core::team::schema::team_schema_text;

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

fn committed(name: &str) -> String {
    let path = docs().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; generate it with `cargo run --bin roundtable -- schema --write docs`", path.display())
    })
}

#[test]
fn committed_schema_is_the_generated_one() {
    assert!(
        committed("team-file.schema.json") == team_schema_text(),
        "docs/team-file.schema.json is stale: run `cargo run --bin roundtable -- schema --write docs`"
    );
}

#[test]
fn committed_reference_is_the_generated_one() {
    assert!(
        committed("team-file.md") == reference_markdown(),
        "docs/team-file.md is stale: run `cargo run --bin roundtable -- schema --write docs`"
    );
}

/// Each documented answer format is the one its protocol asks for: the format's text
/// appears in the protocol's source, where the instruction is written.
#[test]
fn answer_formats_are_the_protocols_own() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/protocol");
    for f in ANSWER_FORMATS {
        let file = match f.kind {
            "debate" | "jury" | "emergent" => "rounds.rs",
            k => &format!("{k}.rs"),
        };
        let code = std::fs::read_to_string(src.join(file)).unwrap();
        // Instructions write JSON with escaped quotes (and doubled braces in format!).
        let escaped = f.format.replace('"', "\\\"");
        let braced = escaped.replace('{', "{{").replace('}', "}}");
        // A free-text format names what the instruction asks for between backticks.
        let quoted = f.format.split('`').nth(1).unwrap_or(f.format);
        assert!(
            code.contains(&escaped) || code.contains(&braced) || (!f.format.starts_with('{') && code.contains(quoted)),
            "{}: {} is not asked for in {file}",
            f.kind,
            f.format
        );
    }
}

/// Every example carries a `#:schema` line that resolves to the committed schema.
#[test]
fn examples_point_editors_at_the_schema() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap_or("");
        let target =
            first.strip_prefix("#:schema ").unwrap_or_else(|| panic!("{}: no #:schema first line", path.display()));
        assert!(dir.join(target.trim()).is_file(), "{}: {target} does not exist", path.display());
    }
}
