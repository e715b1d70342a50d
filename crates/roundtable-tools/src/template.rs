//! `{name}` placeholders in argv elements and URLs.
//!
//! A placeholder is `{` + a name of ASCII letters, digits, `_` or `-` (not starting with
//! a digit or `-`) + `}`; any other brace is literal text.

/// A piece of a template string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Text(&'a str),
    Arg(&'a str),
}

/// Splits `s` into literal text and placeholders.
pub(crate) fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    let mut text_start = 0usize;
    let mut pos = 0usize;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find('}') {
            let name = &after[..close];
            if is_name(name) {
                let abs_open = pos + open;
                if abs_open > text_start {
                    out.push(Piece::Text(&s[text_start..abs_open]));
                }
                out.push(Piece::Arg(name));
                let consumed = open + 1 + close + 1;
                pos += consumed;
                rest = &rest[consumed..];
                text_start = pos;
                continue;
            }
        }
        pos += open + 1;
        rest = &rest[open + 1..];
    }
    if text_start < s.len() {
        out.push(Piece::Text(&s[text_start..]));
    }
    out
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The placeholder names in `s`.
pub(crate) fn names(s: &str) -> impl Iterator<Item = &str> {
    pieces(s).into_iter().filter_map(|p| match p {
        Piece::Arg(n) => Some(n),
        Piece::Text(_) => None,
    })
}

/// The name when `s` is exactly one placeholder.
pub(crate) fn whole(s: &str) -> Option<&str> {
    match pieces(s).as_slice() {
        [Piece::Arg(n)] => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_text_and_placeholders() {
        assert_eq!(pieces("--file={path}.txt"), vec![Piece::Text("--file="), Piece::Arg("path"), Piece::Text(".txt")]);
        assert_eq!(pieces("{a}{b}"), vec![Piece::Arg("a"), Piece::Arg("b")]);
        assert_eq!(pieces("{}"), vec![Piece::Text("{}")]);
        assert_eq!(pieces("{ x }"), vec![Piece::Text("{ x }")]);
        assert_eq!(pieces("a{b"), vec![Piece::Text("a{b")]);
        assert_eq!(pieces("{{x}}"), vec![Piece::Text("{"), Piece::Arg("x"), Piece::Text("}")]);
        assert_eq!(whole("{x}"), Some("x"));
        assert_eq!(whole("-{x}"), None);
        assert_eq!(names("/a/{b}/c?d={e-f}").collect::<Vec<_>>(), vec!["b", "e-f"]);
    }
}
