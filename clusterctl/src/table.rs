//! Text building blocks: kubectl-style aligned tables and human units (ages, durations, times, GiB).

use crate::term::Term;

/// Spaces between columns, as kubectl prints them.
const COLUMN_GAP: usize = 3;

/// The fewest characters of a truncated last column kept, however narrow the terminal.
const MIN_FITTED: usize = 12;

/// Rows of cells printed with every column padded to its widest cell.
///
/// The last column is never padded, so lines carry no trailing spaces. Styled through `Term`:
/// `fit` truncates the last column so lines fit the terminal, `paint` colours state words.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
    gap: usize,
    header: bool,
    width: Option<usize>,
    term: Option<Term>,
    painted: Vec<usize>,
}

impl Table {
    /// A table whose first row is `headers` (printed as given; callers pass uppercase).
    pub fn with_headers(headers: &[&str]) -> Self {
        let mut table = Self::without_headers();
        table
            .rows
            .push(headers.iter().map(|h| (*h).to_string()).collect());
        table.header = true;
        table
    }

    /// A table with no header row, for aligned key/value blocks.
    pub fn without_headers() -> Self {
        Self {
            gap: COLUMN_GAP,
            ..Self::default()
        }
    }

    /// Changes the spacing between columns (the default is kubectl's three).
    pub fn gap(mut self, gap: usize) -> Self {
        self.gap = gap;
        self
    }

    /// Truncates the last column (a reason or message) with `…` so lines fit in `width`
    /// columns; `None` leaves lines whole.
    pub fn fit(mut self, width: Option<usize>) -> Self {
        self.width = width;
        self
    }

    /// Colours the state words of `columns` (not the header) as `term` allows.
    pub fn paint(mut self, term: Term, columns: &[usize]) -> Self {
        self.term = Some(term);
        self.painted = columns.to_vec();
        self
    }

    pub fn push<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows
            .push(cells.into_iter().map(|c| sanitize(&c.into())).collect());
    }

    /// The table as lines, each without a trailing newline.
    pub fn lines(&self) -> Vec<String> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        self.rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let mut line = String::new();
                let mut used = 0;
                for (i, cell) in row.iter().enumerate() {
                    let last = i + 1 == row.len();
                    let text = match self.width {
                        Some(width) if last && i + 1 == columns => {
                            truncate(cell, width.saturating_sub(used).max(MIN_FITTED))
                        }
                        _ => cell.clone(),
                    };
                    match self.term {
                        Some(term) if self.painted.contains(&i) && !(self.header && r == 0) => {
                            line.push_str(&term.paint(&text));
                        }
                        _ => line.push_str(&text),
                    }
                    if !last {
                        let pad = widths[i] - cell.chars().count() + self.gap;
                        line.extend(std::iter::repeat_n(' ', pad));
                        used += widths[i] + self.gap;
                    }
                }
                line.trim_end().to_string()
            })
            .collect()
    }

    /// The table as one string, one line per row, ending in a newline when not empty.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in self.lines() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// `text` cut to at most `max` characters, ending in `…` when anything was cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    let mut out = kept.trim_end().to_string();
    out.push('…');
    out
}

/// Keeps text from the network on one line: control characters become spaces.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A short age in kubectl style: `0.4s` and `9.9s` below ten seconds, then `12s`, `3m`, `5h`, `2d`.
pub fn format_age(ms: u64) -> String {
    const S: u64 = 1_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    match ms {
        ms if ms < 10 * S => format!("{}.{}s", ms / S, (ms % S) / 100),
        ms if ms < M => format!("{}s", ms / S),
        ms if ms < H => format!("{}m", ms / M),
        ms if ms < 2 * D => format!("{}h", ms / H),
        ms => format!("{}d", ms / D),
    }
}

/// A duration with two units, for uptimes: `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn format_duration(ms: u64) -> String {
    let secs = ms / 1_000;
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// How long ago `then_ms` was, seen at `now_ms`; a timestamp in the future (clock skew) is "0.0s".
pub fn format_ago(then_ms: u64, now_ms: u64) -> String {
    format!("{} ago", format_age(now_ms.saturating_sub(then_ms)))
}

/// How long something took: `0.4s` and `12.3s` below a minute, then as `format_duration`.
pub fn format_elapsed(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100)
    } else {
        format_duration(ms)
    }
}

/// A unix-millisecond timestamp as UTC, e.g. `2025-06-01 10:04:05Z`; 0 (never set) is `-`.
pub fn format_utc(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    let secs = unix_ms / 1_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A timestamp with its age: `2025-06-01 10:04:05Z (12m ago)`, or `-` when never set.
pub fn format_when(unix_ms: u64, now_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    format!("{} ({})", format_utc(unix_ms), format_ago(unix_ms, now_ms))
}

/// Bytes as GiB with one decimal: `80.0 GiB`.
pub fn format_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes in the largest binary unit that keeps a number of at least 1, one decimal: `512 B`,
/// `20.0 MiB`, `1.5 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_the_largest_unit_above_one() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(20 << 20), "20.0 MiB");
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
    }

    #[test]
    fn ages_below_ten_seconds_keep_one_decimal() {
        assert_eq!(format_age(0), "0.0s");
        assert_eq!(format_age(400), "0.4s");
        assert_eq!(format_age(1_999), "1.9s");
        assert_eq!(format_age(9_999), "9.9s");
    }

    #[test]
    fn longer_ages_use_one_whole_unit() {
        assert_eq!(format_age(12_000), "12s");
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(3 * 60_000 + 5_000), "3m");
        assert_eq!(format_age(5 * 3_600_000), "5h");
        assert_eq!(format_age(47 * 3_600_000), "47h");
        assert_eq!(format_age(3 * 86_400_000), "3d");
    }

    #[test]
    fn durations_show_two_units() {
        assert_eq!(format_duration(42_000), "42s");
        assert_eq!(format_duration(192_000), "3m12s");
        assert_eq!(format_duration(2 * 3_600_000 + 5 * 60_000), "2h05m");
        assert_eq!(format_duration(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }

    #[test]
    fn elapsed_times_keep_a_decimal_below_a_minute() {
        assert_eq!(format_elapsed(400), "0.4s");
        assert_eq!(format_elapsed(12_345), "12.3s");
        assert_eq!(format_elapsed(125_000), "2m05s");
    }

    #[test]
    fn ago_in_the_future_is_clamped_to_zero() {
        assert_eq!(format_ago(10_000, 5_000), "0.0s ago");
        assert_eq!(format_ago(0, 720_000), "12m ago");
    }

    #[test]
    fn utc_timestamps_are_calendar_dates() {
        assert_eq!(format_utc(0), "-");
        assert_eq!(format_utc(1_000), "1970-01-01 00:00:01Z");
        // 2024-02-29 is a leap day.
        assert_eq!(format_utc(1_709_210_096_000), "2024-02-29 12:34:56Z");
        assert_eq!(format_utc(1_735_689_599_000), "2024-12-31 23:59:59Z");
    }

    #[test]
    fn gib_has_one_decimal() {
        assert_eq!(format_gib(80 * (1 << 30)), "80.0 GiB");
        assert_eq!(format_gib(0), "0.0 GiB");
        assert_eq!(format_gib(3 << 29), "1.5 GiB");
    }

    #[test]
    fn table_columns_align_to_the_widest_cell() {
        let mut t = Table::with_headers(&["NAME", "STATE", "REASON"]);
        t.push(["gpu-001", "Ready", ""]);
        t.push(["n2", "Cordoned", "bad fan"]);
        assert_eq!(
            t.lines(),
            vec![
                "NAME      STATE      REASON",
                "gpu-001   Ready",
                "n2        Cordoned   bad fan",
            ]
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut t = Table::without_headers().gap(1);
        t.push(["ü", "x"]);
        t.push(["ab", "y"]);
        assert_eq!(t.lines(), vec!["ü  x", "ab y"]);
    }

    #[test]
    fn fitted_tables_truncate_only_the_last_column() {
        let mut t = Table::with_headers(&["NAME", "STATE", "REASON"]).fit(Some(36));
        t.push(["gpu-001", "Ready", ""]);
        t.push(["n2", "Cordoned", "a rather long reason that does not fit"]);
        assert_eq!(
            t.lines(),
            vec![
                "NAME      STATE      REASON",
                "gpu-001   Ready",
                "n2        Cordoned   a rather long…",
            ]
        );
        let mut narrow = Table::without_headers().fit(Some(5));
        narrow.push(["name", "the reason is long enough"]);
        assert_eq!(narrow.lines(), vec!["name   the reason…"]);
        assert_eq!(truncate("short", 5), "short");
        assert_eq!(truncate("longer", 5), "long…");
    }

    #[test]
    fn painted_columns_keep_their_alignment() {
        let term = Term {
            width: None,
            color: true,
        };
        let mut t = Table::with_headers(&["NAME", "STATE", "X"]).paint(term, &[1]);
        t.push(["a", "Ready", "1"]);
        t.push(["b", "Lost", "2"]);
        assert_eq!(
            t.lines(),
            vec![
                "NAME   STATE   X",
                "a      \x1b[32mReady\x1b[0m   1",
                "b      \x1b[31mLost\x1b[0m    2",
            ]
        );
    }

    #[test]
    fn table_cells_from_the_network_stay_on_one_line() {
        let mut t = Table::without_headers();
        t.push(["a\nb", "c\td"]);
        assert_eq!(t.render(), "a b   c d\n");
    }
}
