//! One sysfs value's text to what the protocol carries, and the device globs.

/// `4: ACTIVE` -> `ACTIVE`; `5: LinkUp` -> `LinkUp`; a bare word stays as it is.
pub fn state_word(text: &str) -> String {
    match text.split_once(':') {
        Some((_, word)) => word.trim().to_owned(),
        None => text.trim().to_owned(),
    }
}

/// `400 Gb/sec (4X NDR)` -> 400000 Mb/s; `2.5 Gb/sec (1X SDR)` -> 2500.
pub fn ib_rate_mbps(text: &str) -> Option<u64> {
    let (number, unit) = text.trim().split_once(' ')?;
    if !unit.starts_with("Gb/sec") {
        return None;
    }
    let gbps: f64 = number.parse().ok()?;
    if !gbps.is_finite() || !(0.0..=1e6).contains(&gbps) {
        return None;
    }
    Some((gbps * 1000.0).round() as u64)
}

/// Shell-style glob over a name: `*` any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative with one backtrack point: linear enough for names this short.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words_lose_their_number() {
        assert_eq!(state_word("4: ACTIVE"), "ACTIVE");
        assert_eq!(state_word("1: DOWN"), "DOWN");
        assert_eq!(state_word("5: LinkUp"), "LinkUp");
        assert_eq!(state_word("ACTIVE"), "ACTIVE");
        assert_eq!(state_word(""), "");
    }

    #[test]
    fn infiniband_rates_read_in_megabits() {
        assert_eq!(ib_rate_mbps("400 Gb/sec (4X NDR)"), Some(400_000));
        assert_eq!(ib_rate_mbps("2.5 Gb/sec (1X SDR)"), Some(2_500));
        assert_eq!(ib_rate_mbps("100 Gb/sec"), Some(100_000));
        assert_eq!(ib_rate_mbps("fast"), None);
        assert_eq!(ib_rate_mbps("100 Mb/sec"), None);
        assert_eq!(ib_rate_mbps("NaN Gb/sec"), None);
        assert_eq!(ib_rate_mbps("-4 Gb/sec"), None);
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("mlx5_*", "mlx5_0"));
        assert!(glob_match("mlx5_?/1", "mlx5_3/1"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(glob_match("*_1*", "mlx5_12"));
        assert!(!glob_match("mlx5_*", "mlx4_0"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(!glob_match("", "eth0"));
    }
}
