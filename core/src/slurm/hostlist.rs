//! Slurm hostlists (`n[1-3,7]`, `gpu[01-02]-r[1-2]`, `a1,b2`) expanded to node names, for the
//! node lists `squeue` prints in that compressed form.

/// Most names one hostlist expands to: `squeue` output is input, and `n[0-999999999]` must not
/// allocate the world.
pub const MAX_HOSTS: usize = 65_536;

/// The names in `list`, in order; `None` when it is not a hostlist or expands past [`MAX_HOSTS`].
pub fn expand(list: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for item in split_top_level(list.trim())? {
        if !item.is_empty() {
            expand_one(item, &mut out)?;
        }
    }
    Some(out)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Option<Vec<&str>> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return None,
            ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    (depth == 0).then(|| {
        items.push(&list[start..]);
        items
    })
}

/// One item: the first bracket's ranges, each followed by the expansion of the rest.
fn expand_one(item: &str, out: &mut Vec<String>) -> Option<()> {
    let Some(open) = item.find('[') else {
        if item.contains(']') {
            return None;
        }
        out.push(item.to_owned());
        return (out.len() <= MAX_HOSTS).then_some(());
    };
    let close = open + item[open..].find(']')?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let mut tails = Vec::new();
    expand_one(rest, &mut tails)?;
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let width = lo.len();
        let (lo, hi): (u64, u64) = (lo.parse().ok()?, hi.parse().ok()?);
        if hi < lo || hi - lo >= MAX_HOSTS as u64 {
            return None;
        }
        for n in lo..=hi {
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}"));
                if out.len() > MAX_HOSTS {
                    return None;
                }
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &str) -> Vec<String> {
        expand(list).unwrap_or_default()
    }

    #[test]
    fn plain_names_and_ranges_expand_in_order() {
        assert_eq!(names("n1"), ["n1"]);
        assert_eq!(names("n[1-3]"), ["n1", "n2", "n3"]);
        assert_eq!(names("n[1,3]"), ["n1", "n3"]);
        assert_eq!(names("a1,b[2-3],c"), ["a1", "b2", "b3", "c"]);
        assert!(names("").is_empty());
    }

    #[test]
    fn zero_padding_and_several_brackets_are_kept() {
        assert_eq!(names("gpu[08-10]"), ["gpu08", "gpu09", "gpu10"]);
        assert_eq!(names("r[1-2]-n[1-2]"), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
    }

    #[test]
    fn malformed_or_huge_lists_are_refused() {
        for bad in [
            "n[1-",
            "n]1[",
            "n[a-b]",
            "n[3-1]",
            "n[[1]]",
            "n[0-999999999]",
        ] {
            assert_eq!(expand(bad), None, "{bad}");
        }
    }
}
