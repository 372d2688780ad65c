//! Confinement of job processes: the unprivileged user they run as, and the directory roots their
//! working and checkpoint directories must lie under (`[workers]` in the agent config).
//!
//! A coordinator (or whoever could impersonate one) decides what runs; this is what the node
//! still refuses: running as root unless the operator said so, and directories outside the roots
//! the operator named. Paths are checked lexically (absolute, no `..`), then resolved through
//! symlinks (the longest existing ancestor is canonicalised, the rest appended), and the resolved
//! path must lie under a canonicalised root; the worker is started in the resolved directory, so
//! a symlink swapped in later does not move it. Supplementary groups are cleared by the standard
//! library when the user changes (`setgroups(0)` before `setuid`).

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use nix::unistd::{Uid, User};
use vigil_proto::v1::StartWorker;

/// `workers.run_as` naming root explicitly.
pub const ROOT: &str = "root";

/// The `[workers]` rules, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// `workers.run_as`: `None` runs jobs as the agent's own user, refused when that is root.
    pub run_as: Option<String>,
    /// `workers.allowed_roots`: absolute directories; empty refuses every job.
    pub allowed_roots: Vec<PathBuf>,
}

/// The user a worker runs as, when it is not the agent's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// What a permitted StartWorker may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    /// `None`: run as the agent's own user.
    pub identity: Option<Identity>,
    /// The workdir, symlinks resolved: the worker starts there.
    pub workdir: PathBuf,
    /// The checkpoint dir, symlinks resolved (as far as it exists); `None` when the job has none.
    pub checkpoint_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "refusing to run job processes as root: workers.run_as is not set and the agent runs as root; \
         set workers.run_as in the agent config to an unprivileged user (e.g. \"vigil-job\"), or to \"root\" to allow it explicitly"
    )]
    ImplicitRoot,
    #[error(
        "workers.run_as = {0:?}: no such user on this node; create it (e.g. useradd --system --no-create-home {0}) or change workers.run_as"
    )]
    UnknownUser(String),
    #[error(
        "workers.run_as = {name:?}: cannot look the user up ({source}); check /etc/passwd and NSS"
    )]
    Lookup { name: String, source: nix::Error },
    #[error(
        "workers.run_as = {name:?} needs the agent to run as root to switch users (it runs as uid {uid}); \
         run the agent as root, or remove workers.run_as to run jobs as the agent's own user"
    )]
    CannotSwitch { name: String, uid: u32 },
    #[error("{field} {path:?} must be an absolute path without '..'; fix the job spec")]
    BadPath { field: &'static str, path: String },
    #[error(
        "{field} {path:?} is outside workers.allowed_roots (none configured on this node); \
         add the storage root jobs use to workers.allowed_roots in the agent config, e.g. allowed_roots = [\"/shared\"]"
    )]
    NoRoots { field: &'static str, path: String },
    #[error(
        "{field} {path:?} resolves to {} which is outside workers.allowed_roots ({roots}); \
         use a directory under one of them, or add its root to workers.allowed_roots in the agent config",
        .resolved.display()
    )]
    Outside {
        field: &'static str,
        path: String,
        resolved: PathBuf,
        roots: String,
    },
    #[error("{field} {path:?} cannot be resolved: {source}")]
    Resolve {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
}

impl Confinement {
    /// Check `start` against the rules, as an agent running with effective uid `agent_uid`.
    pub fn check(&self, start: &StartWorker, agent_uid: u32) -> Result<Confined, ConfineError> {
        let identity = self.identity(agent_uid)?;
        let workdir = self.inside("workdir", &start.workdir)?;
        let checkpoint_dir = if start.checkpoint_dir.is_empty() {
            None
        } else {
            Some(self.inside("checkpoint_dir", &start.checkpoint_dir)?)
        };
        Ok(Confined {
            identity,
            workdir,
            checkpoint_dir,
        })
    }

    /// What an operator must hear at start-up: rules under which no job (or any job as root)
    /// runs on this node.
    pub fn startup_warnings(&self, agent_uid: u32) -> Vec<String> {
        let mut out = Vec::new();
        match self.identity(agent_uid) {
            Err(e) => out.push(format!("every job will be refused: {e}")),
            Ok(_) if self.run_as.as_deref() == Some(ROOT) => out.push(
                "job processes run as root (workers.run_as = \"root\"): a job, or whoever can submit one, owns this node".to_owned(),
            ),
            Ok(_) => {}
        }
        if self.allowed_roots.is_empty() {
            out.push(
                "every job will be refused: workers.allowed_roots is empty; list the storage roots jobs use, e.g. allowed_roots = [\"/shared\"]".to_owned(),
            );
        }
        out
    }

    /// The user to switch to, or `None` to stay the agent's own.
    pub(crate) fn identity(&self, agent_uid: u32) -> Result<Option<Identity>, ConfineError> {
        let Some(name) = self.run_as.as_deref() else {
            return if agent_uid == 0 {
                Err(ConfineError::ImplicitRoot)
            } else {
                Ok(None)
            };
        };
        let user = User::from_name(name)
            .map_err(|source| ConfineError::Lookup {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| ConfineError::UnknownUser(name.to_owned()))?;
        let uid = user.uid.as_raw();
        if uid == agent_uid {
            return Ok(None);
        }
        if agent_uid != 0 {
            return Err(ConfineError::CannotSwitch {
                name: name.to_owned(),
                uid: agent_uid,
            });
        }
        Ok(Some(Identity {
            name: user.name,
            uid,
            gid: user.gid.as_raw(),
            home: user.dir,
        }))
    }

    /// `path` resolved, if it lies under an allowed root.
    pub(crate) fn inside(&self, field: &'static str, path: &str) -> Result<PathBuf, ConfineError> {
        let bad = || ConfineError::BadPath {
            field,
            path: path.to_owned(),
        };
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            return Err(bad());
        }
        if self.allowed_roots.is_empty() {
            return Err(ConfineError::NoRoots {
                field,
                path: path.to_owned(),
            });
        }
        let resolved = resolve(p).map_err(|source| ConfineError::Resolve {
            field,
            path: path.to_owned(),
            source,
        })?;
        let roots: Vec<PathBuf> = self
            .allowed_roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect();
        if roots.iter().any(|r| resolved.starts_with(r)) {
            return Ok(resolved);
        }
        let roots = self
            .allowed_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Err(ConfineError::Outside {
            field,
            path: path.to_owned(),
            resolved,
            roots,
        })
    }
}

/// `path` (absolute, without `..`) with symlinks resolved as far as it exists: the longest
/// existing ancestor canonicalised, the components that do not exist yet appended.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut missing: Vec<OsString> = Vec::new();
    let mut at = path;
    loop {
        match at.canonicalize() {
            Ok(base) => {
                return Ok(missing.iter().rev().fold(base, |p, c| p.join(c)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
                    return Err(e);
                };
                missing.push(name.to_owned());
                at = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The agent's effective uid.
pub fn agent_uid() -> u32 {
    Uid::effective().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(workdir: &Path, ckpt: &str) -> StartWorker {
        StartWorker {
            job_id: "j-1".into(),
            attempt: 1,
            command: vec!["true".into()],
            workdir: workdir.display().to_string(),
            checkpoint_dir: ckpt.into(),
            ..StartWorker::default()
        }
    }

    fn rules(root: &Path, run_as: Option<&str>) -> Confinement {
        Confinement {
            run_as: run_as.map(str::to_owned),
            allowed_roots: vec![root.to_owned()],
        }
    }

    #[test]
    fn a_workdir_under_a_root_is_allowed_and_resolved() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let work = tmp.path().join("work");
        std::fs::create_dir(&work)?;
        let ckpt = tmp.path().join("ckpt/not/yet");
        let c =
            rules(tmp.path(), Some(ROOT)).check(&start(&work, &ckpt.display().to_string()), 0)?;
        assert_eq!(c.workdir, work.canonicalize()?);
        assert_eq!(
            c.checkpoint_dir,
            Some(tmp.path().canonicalize()?.join("ckpt/not/yet"))
        );
        assert_eq!(c.identity, None, "run_as = root as root: no switch");
        Ok(())
    }

    #[test]
    fn escapes_are_refused_naming_the_field() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        std::fs::create_dir(&root)?;
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside)?;
        // A symlink under the root pointing out of it.
        let link = root.join("link");
        std::os::unix::fs::symlink(&outside, &link)?;
        let r = rules(&root, Some(ROOT));
        let cases = [
            (
                start(&outside, ""),
                "workdir",
                "outside workers.allowed_roots",
            ),
            (start(&link, ""), "workdir", "resolves to"),
            (
                start(&root.join("../outside"), ""),
                "workdir",
                "without '..'",
            ),
            (start(&root, "/etc/cron.d"), "checkpoint_dir", "outside"),
            (start(&root, "relative/ckpt"), "checkpoint_dir", "absolute"),
            (
                start(&root, &link.join("ckpt").display().to_string()),
                "checkpoint_dir",
                "resolves to",
            ),
        ];
        for (s, field, needle) in cases {
            let e = r.check(&s, 0).expect_err(field).to_string();
            assert!(e.starts_with(field) && e.contains(needle), "{e}");
        }
        let none = Confinement {
            run_as: Some(ROOT.into()),
            allowed_roots: Vec::new(),
        };
        let e = none
            .check(&start(&root, ""), 0)
            .expect_err("no roots")
            .to_string();
        assert!(
            e.contains("workers.allowed_roots") && e.contains("none configured"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn root_runs_jobs_only_when_configured() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let implicit = rules(tmp.path(), None);
        let e = implicit
            .check(&start(tmp.path(), ""), 0)
            .expect_err("implicit root");
        assert!(matches!(e, ConfineError::ImplicitRoot));
        assert!(e.to_string().contains("workers.run_as"), "{e}");
        // A non-root agent runs jobs as itself when nothing is configured.
        assert_eq!(implicit.check(&start(tmp.path(), ""), 1000)?.identity, None);
        Ok(())
    }

    #[test]
    fn run_as_resolves_a_user_and_refuses_unknown_ones() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let unknown = rules(tmp.path(), Some("no-such-user-vigil"));
        let e = unknown
            .check(&start(tmp.path(), ""), 0)
            .expect_err("unknown");
        assert!(matches!(e, ConfineError::UnknownUser(_)), "{e}");
        // `root` always exists: as a non-root agent, switching to it is refused.
        let e = rules(tmp.path(), Some(ROOT)).check(&start(tmp.path(), ""), 1000);
        assert!(matches!(e, Err(ConfineError::CannotSwitch { .. })), "{e:?}");
        if let Some(nobody) = User::from_name("nobody")? {
            let c = rules(tmp.path(), Some("nobody")).check(&start(tmp.path(), ""), 0)?;
            let id = c.identity.ok_or("a switch to nobody")?;
            assert_eq!(id.uid, nobody.uid.as_raw());
            assert_eq!(id.gid, nobody.gid.as_raw());
        }
        Ok(())
    }
}
