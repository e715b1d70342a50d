//! Numbers as people read them: counts with the right noun, money rounded, rounds
//! counted from 1. Machine outputs (JSON, the log) keep full precision and the log's own
//! names; these are for text only.

/// `1 round`, `2 rounds`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// US dollars for people: `$0.0123`, `$1.50`, `$0` for nothing, `<$0.0001` for a
/// positive amount that would otherwise print as zero.
pub fn usd(c: f64) -> String {
    if !c.is_finite() {
        return format!("${c}");
    }
    if c == 0.0 {
        "$0".to_string()
    } else if c.abs() < 0.00005 {
        if c > 0.0 { "<$0.0001".to_string() } else { format!("-${:.4}", -c) }
    } else if c.abs() >= 1.0 {
        format!("${c:.2}")
    } else {
        format!("${c:.4}")
    }
}

/// A step name as people read it: rounds counted from 1.
///
/// The log names steps with rounds counted from 0 (`r0/propose`, `jury/r0/reveal`,
/// `summary/0` for the summary of the rounds up to the first), and it keeps those names:
/// they are part of every envelope's id, so renaming them would break the replay and
/// resume of existing logs. Everything a person reads — `log`, `trace`, `join`, the web
/// view, error messages — shows a step through this one function, so the first round is
/// `r1` wherever a person sees it, as in "[round 1]" and the summary's "consensus in
/// round 1". Only round numbers change: the round segment that opens a step
/// (`r{n}/…`), the one after `jury/`, and the round after `summary/`. Other numbers in a
/// step (a turn, a tool call, an interjection) and names (a peer called `r2` in
/// `r0/vote/r2/malformed`) are shown as the log has them.
pub fn step(step: &str) -> String {
    let mut parts: Vec<std::borrow::Cow<'_, str>> = step.split('/').map(std::borrow::Cow::Borrowed).collect();
    let at = match parts.first().map(|p| p.as_ref()) {
        Some("jury") => 1,
        Some("summary") => {
            if let Some(n) = parts.get(1).and_then(|p| plus_one(p)) {
                parts[1] = n.to_string().into();
            }
            return parts.join("/");
        }
        _ => 0,
    };
    if let Some(n) = parts.get(at).and_then(|p| p.strip_prefix('r')).and_then(plus_one) {
        parts[at] = format!("r{n}").into();
    }
    parts.join("/")
}

/// `n + 1` for a segment that is a number written plainly (no sign, no leading zero).
fn plus_one(segment: &str) -> Option<u64> {
    let plain = !segment.is_empty()
        && segment.bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.starts_with('0'));
    if !plain {
        return None;
    }
    segment.parse::<u64>().ok()?.checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_number() {
        assert_eq!(count(1u32, "round", "rounds"), "1 round");
        assert_eq!(count(0u32, "round", "rounds"), "0 rounds");
        assert_eq!(count(3u64, "round", "rounds"), "3 rounds");
    }

    #[test]
    fn money_is_rounded_for_people() {
        assert_eq!(usd(0.0123456789), "$0.0123");
        assert_eq!(usd(0.0), "$0");
        assert_eq!(usd(0.000001), "<$0.0001");
        assert_eq!(usd(1.23456), "$1.23");
        assert_eq!(usd(12.0), "$12.00");
    }

    #[test]
    fn steps_count_rounds_from_1() {
        assert_eq!(step("r0/propose"), "r1/propose");
        assert_eq!(step("r9/vote"), "r10/vote");
        assert_eq!(step("r1/vote/ann/malformed"), "r2/vote/ann/malformed");
        assert_eq!(step("r0/propose/call/0"), "r1/propose/call/0");
        assert_eq!(step("r0/propose/approve/1/answer"), "r1/propose/approve/1/answer");
        assert_eq!(step("jury/r0/reveal"), "jury/r1/reveal");
        assert_eq!(step("jury/r2/reject/r0"), "jury/r3/reject/r0");
        assert_eq!(step("summary/0"), "summary/1");
        // A peer's name is not a round, wherever it stands.
        assert_eq!(step("r0/vote/r2/malformed"), "r1/vote/r2/malformed");
        assert_eq!(step("absent/r2/0"), "absent/r2/0");
        // Not rounds: turns, interjections, contract-net attempts, the stop, odd shapes.
        for same in ["turn/0", "say/3", "cnet/t1/a0/bid", "stop", "objective", "r", "rx/propose", "r01/x", "r-1/x", ""]
        {
            assert_eq!(step(same), same);
        }
        assert_eq!(step(&format!("r{}/x", u64::MAX)), format!("r{}/x", u64::MAX));
    }
}
