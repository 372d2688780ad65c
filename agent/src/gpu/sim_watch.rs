//! Watches the simulator's fault file: re-reads it whenever its content changes.
//!
//! Polling every [`POLL`] keeps it simple and reliable (editors that replace
//! the file, bind mounts, network filesystems) without an inotify
//! dependency; the file is small, so comparing content is cheap and never
//! misses a same-size rewrite within one mtime tick.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::sim::SimProbe;
use crate::events::EventSink;

/// Fault to heartbeat stays well under the 1 s fault-to-cordon target.
pub const POLL: Duration = Duration::from_millis(100);

/// Runs until the agent shuts down (the sink's receiver is gone).
pub async fn watch(probe: Arc<SimProbe>, path: PathBuf, sink: EventSink) {
    info!(path = %path.display(), "watching the simulated fault file");
    // `None` until the first read, so a file present at start-up is applied.
    let mut last: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !sink.is_closed() {
        ticker.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            // No file means no faults: deleting it heals every GPU.
            Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
            Err(e) => {
                let error = e.to_string();
                if last_error.as_ref() != Some(&error) {
                    warn!(path = %path.display(), %error, "cannot read the fault file; fix its permissions or path");
                    last_error = Some(error);
                }
                continue;
            }
        };
        last_error = None;
        if last.as_ref() == Some(&text) {
            continue;
        }
        info!(path = %path.display(), "fault file changed; applying");
        let probe = Arc::clone(&probe);
        let applied = text.clone();
        let events =
            match tokio::task::spawn_blocking(move || probe.apply_fault_text(&applied)).await {
                Ok(events) => events,
                Err(e) => {
                    warn!(error = %e, "applying the fault file failed");
                    continue;
                }
            };
        last = Some(text);
        for event in events {
            sink.emit(event);
        }
        sink.changed();
    }
}

#[cfg(test)]
mod tests {
    use vigil_proto::v1::agent_event::Kind;

    use super::*;
    use crate::gpu::GpuProbe;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn a_new_fault_line_is_seen_within_a_poll_or_two()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("faults");
        let probe = Arc::new(SimProbe::new("n", 4).with_fault_file(Some(path.clone())));
        let (sink, mut source) = crate::events::channel(Metrics::new("simulated", &[], "h"));
        Arc::clone(&probe).start_events(sink);
        tokio::time::sleep(POLL * 2).await;
        std::fs::write(&path, "gpu=2 xid=79\ngpu=1 lost\n")?;
        let first = tokio::time::timeout(Duration::from_secs(2), source.next()).await?;
        assert!(matches!(first.kind, Some(Kind::Xid(x)) if x.gpu_index == 2 && x.xid == 79));
        let second = tokio::time::timeout(Duration::from_secs(2), source.next()).await?;
        assert!(matches!(second.kind, Some(Kind::GpuLost(l)) if l.gpu_index == 1));
        assert_eq!(probe.sample()?.len(), 3);
        std::fs::remove_file(&path)?;
        tokio::time::timeout(Duration::from_secs(2), async {
            while probe.sample().map(|s| s.len()).unwrap_or(0) != 4 {
                tokio::time::sleep(POLL).await;
            }
        })
        .await?;
        assert!(source.try_next().is_none(), "healing fires no event");
        Ok(())
    }
}
