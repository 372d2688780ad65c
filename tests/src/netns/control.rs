//! Reading and driving a namespace cluster through clusterctl, run in the
//! coordinator's namespace over loopback (a partition never hides it).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{GRPC_PORT, NetCluster};
use crate::{CtlOutput, LONG, bin, wait_for, write_file};

impl NetCluster {
    /// Run clusterctl in the coordinator's namespace, over loopback.
    pub fn ctl(&self, args: &[&str]) -> Result<CtlOutput> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.coord_ns])
            .arg(bin("clusterctl")?)
            .arg("--insecure")
            .arg("--coordinator")
            .arg(format!("http://127.0.0.1:{GRPC_PORT}"))
            .args(args)
            .env_remove("VIGIL_COORDINATOR")
            .output()
            .context("cannot run clusterctl")?;
        Ok(out.into())
    }

    /// `clusterctl -o json nodes`, keyed by node name.
    pub fn nodes(&self) -> Result<BTreeMap<String, Value>> {
        let v = self.ctl(&["-o", "json", "nodes"])?.json()?;
        let list = v["nodes"].as_array().context("no \"nodes\" array")?;
        Ok(list
            .iter()
            .filter_map(|n| Some((n["name"].as_str()?.to_owned(), n.clone())))
            .collect())
    }

    pub fn node(&self, name: &str) -> Result<Value> {
        self.nodes()?
            .remove(name)
            .with_context(|| format!("node {name} not listed"))
    }

    pub(super) fn all_ready(&self, count: usize) -> Result<Option<()>> {
        let nodes = self.nodes()?;
        let ok = nodes.len() == count && nodes.values().all(|n| n["availability"] == "Ready");
        Ok(ok.then_some(()))
    }

    /// Submit a job spec (TOML text); returns the job id.
    pub fn submit(&self, spec: &str) -> Result<String> {
        let path = write_file(self.dir.path(), "job.toml", spec)?;
        let v = self
            .ctl(&["-o", "json", "job", "submit", &path.to_string_lossy()])?
            .json()?;
        v["job"]["id"]
            .as_str()
            .map(str::to_owned)
            .context("no job id in the answer")
    }

    /// `clusterctl -o json job show ID`.
    pub fn job(&self, id: &str) -> Result<Value> {
        self.ctl(&["-o", "json", "job", "show", id])?.json()
    }

    /// Wait until the job's detail satisfies `cond`; returns that detail.
    pub fn wait_job(&self, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
        wait_for(what, LONG, || {
            let job = self.job(id)?;
            Ok(cond(&job).then_some(job))
        })
    }

    /// Wait until node `name`'s summary satisfies `cond`.
    pub fn wait_node(&self, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<()> {
        wait_for(what, LONG, || Ok(cond(&self.node(name)?).then_some(())))
    }
}
