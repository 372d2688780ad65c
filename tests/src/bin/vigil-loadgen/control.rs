//! The operator's side of the load test, over `ControlService`: the events
//! stream that times cordons, the job whose relaunches are timed, and
//! `clusterctl status` round trips.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use vigil_proto::v1::control_service_client::ControlServiceClient;
use vigil_proto::v1::{
    GetJobRequest, JobDetail, StatusRequest, StatusResponse, SubmitJobRequest, UncordonRequest,
    WatchEventsRequest,
};
use vigil_tls::ClientTls;

pub type Control = ControlServiceClient<Channel>;

pub const JOB_SPEC: &str = r#"name = "loadgen-relaunch"
nodes = 2
gpus_per_node = 8
command = ["/bin/true"]
workdir = "/tmp"
spare_nodes = 1

[checkpoint]
dir = "/tmp/ckpt"

[restart]
max_restarts = 1000
backoff = "0s"

[progress]
hang_timeout = "1h"
"#;

pub async fn connect(url: &str, tls: &ClientTls) -> Result<Control> {
    let endpoint = Endpoint::from_shared(vigil_tls::dial_url(url, tls))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = vigil_tls::connect(endpoint, tls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(ControlServiceClient::new(channel)
        .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(vigil_proto::MAX_MESSAGE_BYTES))
}

/// When each node's `cordon` event reached us (the first since it was cleared).
#[derive(Default)]
pub struct Cordons {
    pub seen: Mutex<HashMap<String, Instant>>,
    /// `gap` events: the coordinator dropped events for this slow reader.
    pub gaps: Mutex<u64>,
    pub stream_ended: Mutex<Option<String>>,
}

impl Cordons {
    pub fn clear(&self, node: &str) {
        if let Ok(mut s) = self.seen.lock() {
            s.remove(node);
        }
    }

    pub fn get(&self, node: &str) -> Option<Instant> {
        self.seen.lock().ok().and_then(|s| s.get(node).copied())
    }
}

/// Follows `WatchEvents` until the stream ends, noting cordons.
pub async fn watch_cordons(mut control: Control, cordons: Arc<Cordons>) {
    let request = WatchEventsRequest {
        follow: true,
        backlog: 1,
        ..Default::default()
    };
    let mut stream = match control.watch_events(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Ok(mut e) = cordons.stream_ended.lock() {
                *e = Some(format!("WatchEvents refused: {}", status.message()));
            }
            return;
        }
    };
    let why = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let at = Instant::now();
                match event.kind.as_str() {
                    "cordon" => {
                        if let Ok(mut s) = cordons.seen.lock() {
                            s.entry(event.node).or_insert(at);
                        }
                    }
                    "gap" => {
                        if let Ok(mut g) = cordons.gaps.lock() {
                            *g += 1;
                        }
                    }
                    _ => {}
                }
            }
            Ok(None) => break "stream closed".to_owned(),
            Err(status) => break format!("stream failed: {}", status.message()),
        }
    };
    if let Ok(mut e) = cordons.stream_ended.lock() {
        *e = Some(why);
    }
}

pub async fn status(control: &mut Control) -> Result<StatusResponse> {
    Ok(control.status(StatusRequest {}).await?.into_inner())
}

pub async fn submit_job(control: &mut Control) -> Result<JobDetail> {
    let job = control
        .submit_job(SubmitJobRequest {
            spec_toml: JOB_SPEC.to_owned(),
            source: "vigil-loadgen".to_owned(),
        })
        .await
        .map_err(|s| anyhow!("SubmitJob: {}", s.message()))?
        .into_inner();
    Ok(job)
}

pub async fn get_job(control: &mut Control, id: &str) -> Result<JobDetail> {
    control
        .get_job(GetJobRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| anyhow!("GetJob {id}: {}", s.message()))
}

pub async fn uncordon_force(control: &mut Control, node: &str) -> Result<()> {
    control
        .uncordon(UncordonRequest {
            name: node.to_owned(),
            force: true,
        })
        .await
        .map_err(|s| anyhow!("Uncordon {node}: {}", s.message()))?;
    Ok(())
}

/// Waits until the job runs attempt `min_attempt` or later with every worker
/// `running`; returns its detail.
pub async fn wait_running(
    control: &mut Control,
    id: &str,
    min_attempt: u64,
    timeout: Duration,
) -> Result<JobDetail> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match get_job(control, id).await {
            Ok(job) => {
                if let Some(s) = &job.summary {
                    let all_running =
                        !job.workers.is_empty() && job.workers.iter().all(|w| w.state == "running");
                    if s.state == "Running" && s.attempt >= min_attempt && all_running {
                        return Ok(job);
                    }
                    last = format!(
                        "state {} attempt {} workers {:?}",
                        s.state,
                        s.attempt,
                        job.workers.iter().map(|w| &w.state).collect::<Vec<_>>()
                    );
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("job {id} not running attempt {min_attempt} within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
