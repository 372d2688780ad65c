//! `job logs`: worker output as it streams. With more than one node in the stream, each line
//! is prefixed `[NODE rank R] `; chunks may end mid-line, so each worker keeps its partial line
//! until the rest arrives.

use crate::model::LogChunk;
use crate::table::sanitize;

/// Turns chunks into the text to print, in arrival order.
#[derive(Debug, Default)]
pub struct LogPrinter {
    prefix: bool,
    /// The only node seen so far while not prefixing.
    first_node: Option<String>,
    /// Unprefixed output so far ended mid-line.
    mid_line: bool,
    /// Each worker's partial last line: (node, rank, attempt) and the text.
    partial: Vec<((String, u32, u64), String)>,
}

impl LogPrinter {
    /// `prefix`: more than one node is expected; a second node showing up turns it on anyway.
    pub fn new(prefix: bool) -> Self {
        Self {
            prefix,
            ..Self::default()
        }
    }

    pub fn push(&mut self, chunk: &LogChunk) -> String {
        let mut out = String::new();
        if !self.prefix {
            match &self.first_node {
                None => self.first_node = Some(chunk.node.clone()),
                Some(node) if *node != chunk.node => {
                    self.prefix = true;
                    if self.mid_line {
                        out.push('\n');
                    }
                }
                Some(_) => {}
            }
        }
        if !self.prefix {
            if !chunk.data.is_empty() {
                self.mid_line = !chunk.data.ends_with('\n');
            }
            out.push_str(&chunk.data);
            return out;
        }
        let key = (chunk.node.clone(), chunk.node_rank, chunk.attempt);
        let index = match self.partial.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.partial.push((key, String::new()));
                self.partial.len() - 1
            }
        };
        let (_, buffer) = &mut self.partial[index];
        buffer.push_str(&chunk.data);
        if let Some(end) = buffer.rfind('\n') {
            let complete: String = buffer.drain(..=end).collect();
            for line in complete.lines() {
                out.push_str(&prefixed(&chunk.node, chunk.node_rank, line));
            }
        }
        out
    }

    /// What is left when the stream ends: partial lines, each finished with a newline.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if self.mid_line && !self.prefix {
            out.push('\n');
        }
        self.mid_line = false;
        for ((node, rank, _), rest) in self.partial.drain(..) {
            if !rest.is_empty() {
                out.push_str(&prefixed(&node, rank, &rest));
            }
        }
        out
    }
}

fn prefixed(node: &str, rank: u32, line: &str) -> String {
    let line = format!("[{} rank {rank}] {line}", sanitize(node));
    format!("{}\n", line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(node: &str, rank: u32, data: &str) -> LogChunk {
        LogChunk {
            node: node.into(),
            node_rank: rank,
            attempt: 2,
            data: data.into(),
        }
    }

    #[test]
    fn two_nodes_get_prefixes_and_split_lines_are_joined() {
        let mut p = LogPrinter::new(true);
        let mut out = p.push(&chunk("gpu-001", 0, "step 1\nstep 2 par"));
        out += &p.push(&chunk("gpu-004", 1, "hello\r\nworld"));
        out += &p.push(&chunk("gpu-001", 0, "tial\n"));
        out += &p.finish();
        assert_eq!(
            out,
            "[gpu-001 rank 0] step 1\n\
             [gpu-004 rank 1] hello\n\
             [gpu-001 rank 0] step 2 partial\n\
             [gpu-004 rank 1] world\n"
        );
    }

    #[test]
    fn one_node_prints_as_written() {
        let mut p = LogPrinter::new(false);
        let mut out = p.push(&chunk("gpu-001", 0, "step 1\nstep 2 par"));
        out += &p.push(&chunk("gpu-001", 0, "tial"));
        out += &p.finish();
        assert_eq!(out, "step 1\nstep 2 partial\n");
    }

    #[test]
    fn an_unexpected_second_node_turns_prefixes_on() {
        let mut p = LogPrinter::new(false);
        let mut out = p.push(&chunk("gpu-001", 0, "a\nb"));
        out += &p.push(&chunk("gpu-004", 1, "c\n"));
        out += &p.finish();
        assert_eq!(out, "a\nb\n[gpu-004 rank 1] c\n");
    }
}
