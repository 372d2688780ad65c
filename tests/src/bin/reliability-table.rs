//! `reliability-table ROWS.jsonl`: print the markdown table of the rows the
//! reliability scenarios appended (see `vigil_tests::report`);
//! `scripts/reliability.sh` puts it into docs/reliability.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: reliability-table ROWS.jsonl");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("reliability-table: cannot read {path}: {e}");
            return ExitCode::from(1);
        }
    };
    match vigil_tests::report::render(&text) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reliability-table: {path}: {e:#}");
            ExitCode::from(1)
        }
    }
}
