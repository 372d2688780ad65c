//! This host's identity, sent in every `Register`: its machine-id (stable across reboots; the
//! coordinator binds the node name to it, so a second host with the same name is refused) and
//! its boot id (new at every boot).
//!
//! The machine-id comes from `[identity] machine_id` when set (tests that start several agents
//! on one machine, hosts without one), else `/etc/machine-id`, else `/var/lib/dbus/machine-id`,
//! else a random id kept in the state dir (with a warning: a cloned state dir clones it too).

use std::path::{Path, PathBuf};

use tracing::warn;

/// Where systemd and D-Bus keep the machine-id, in the order they are read.
pub const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// The generated machine-id, in the state dir, for a host that has none.
pub const GENERATED_FILE: &str = "machine-id";

/// Who this host is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostIdentity {
    pub machine_id: String,
    /// Empty where the kernel does not say.
    pub boot_id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot keep a generated machine-id in {}: {source}; set [identity] machine_id", path.display())]
pub struct IdentityError {
    path: PathBuf,
    source: std::io::Error,
}

/// This host's identity: `configured` (an override) or the system's files (see the module doc).
pub async fn load(
    configured: Option<&str>,
    state_dir: &Path,
) -> Result<HostIdentity, IdentityError> {
    let files: Vec<PathBuf> = MACHINE_ID_FILES.iter().map(PathBuf::from).collect();
    resolve(configured, &files, Path::new(BOOT_ID_FILE), state_dir).await
}

async fn resolve(
    configured: Option<&str>,
    files: &[PathBuf],
    boot_id_file: &Path,
    state_dir: &Path,
) -> Result<HostIdentity, IdentityError> {
    let boot_id = read_id(boot_id_file).await.unwrap_or_default();
    if let Some(id) = configured {
        return Ok(HostIdentity {
            machine_id: id.to_owned(),
            boot_id,
        });
    }
    for file in files {
        if let Some(machine_id) = read_id(file).await {
            return Ok(HostIdentity {
                machine_id,
                boot_id,
            });
        }
    }
    let path = state_dir.join(GENERATED_FILE);
    if let Some(machine_id) = read_id(&path).await {
        return Ok(HostIdentity {
            machine_id,
            boot_id,
        });
    }
    let machine_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    warn!(
        generated = %path.display(),
        "this host has no machine-id ({}): using a random one kept in {}; a copy of this state \
         dir on another host would claim to be this host, so give each host its own (run \
         systemd-machine-id-setup, or set [identity] machine_id)",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        path.display()
    );
    tokio::fs::write(&path, format!("{machine_id}\n"))
        .await
        .map_err(|source| IdentityError {
            path: path.clone(),
            source,
        })?;
    Ok(HostIdentity {
        machine_id,
        boot_id,
    })
}

/// A non-empty, valid id from `path`, or `None` (missing, unreadable, empty, malformed).
async fn read_id(path: &Path) -> Option<String> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let id = text.trim();
    if id.is_empty() {
        return None;
    }
    match vigil_proto::check_host_id(id) {
        Ok(()) => Some(id.to_owned()),
        Err(problem) => {
            warn!(file = %path.display(), "ignoring the id in {}: it {problem}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_readable_machine_id_file_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc-machine-id");
        let dbus = dir.path().join("dbus-machine-id");
        let boot = dir.path().join("boot_id");
        std::fs::write(&dbus, "dbus0123\n").expect("write");
        std::fs::write(&boot, "6f1e2d3c-aaaa\n").expect("write");
        let files = [etc.clone(), dbus];
        let id = resolve(None, &files, &boot, dir.path()).await.expect("id");
        assert_eq!(id.machine_id, "dbus0123");
        assert_eq!(id.boot_id, "6f1e2d3c-aaaa");
        std::fs::write(&etc, "etc0123\n").expect("write");
        let id = resolve(None, &files, &boot, dir.path()).await.expect("id");
        assert_eq!(id.machine_id, "etc0123");
        let id = resolve(Some("override-1"), &files, &boot, dir.path())
            .await
            .expect("id");
        assert_eq!(id.machine_id, "override-1");
    }

    #[tokio::test]
    async fn a_host_without_a_machine_id_keeps_a_generated_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = [dir.path().join("none")];
        let boot = dir.path().join("no-boot-id");
        let first = resolve(None, &files, &boot, dir.path()).await.expect("id");
        assert_eq!(first.machine_id.len(), 32);
        assert!(first.boot_id.is_empty());
        let again = resolve(None, &files, &boot, dir.path()).await.expect("id");
        assert_eq!(again.machine_id, first.machine_id, "kept across restarts");
    }
}
