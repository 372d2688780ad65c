//! `clusterctl checkpoint latest`: the newest complete checkpoint of a directory, found by the
//! same validator the agent resumes from (crate `vigil-checkpoint`), for batch scripts that
//! resume outside vigil (Slurm: docs/slurm.md).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use vigil_checkpoint::Layout;

use crate::cli::Output;

/// What `-o json` prints: stable, documented in docs/clusterctl.md.
#[derive(Debug, Serialize)]
struct Latest {
    path: String,
    /// The step in the checkpoint's name, when it has one.
    step: Option<u64>,
    layout: String,
}

/// The path (one line) or JSON of the newest complete checkpoint; an error (exit 1, nothing on
/// stdout) when there is none, so `--resume "$(clusterctl checkpoint latest …)"` never resumes
/// from a partial one and a script can tell a fresh start with `if`.
pub fn latest(out: Output, dir: &Path, layout: Layout, world_size: Option<u32>) -> Result<String> {
    let found = vigil_checkpoint::latest_complete_with(dir, layout, world_size)
        .with_context(|| format!("reading checkpoint dir {}", dir.display()))?;
    let Some(found) = found else {
        anyhow::bail!(
            "no complete checkpoint in {} (layout {layout}); start from scratch",
            dir.display()
        );
    };
    let path = found
        .path
        .to_str()
        .with_context(|| format!("checkpoint path {} is not UTF-8", found.path.display()))?;
    let model = Latest {
        path: path.to_owned(),
        step: found.step,
        layout: layout.to_string(),
    };
    crate::commands::emit(out, &model, |m| format!("{}\n", m.path))
}
