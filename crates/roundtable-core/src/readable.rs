//! Numbers as people read them: counts with the right noun, money rounded. Machine
//! outputs (JSON, the log) keep full precision; these are for text only.

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
}
