//! The version-skew check in front of `ControlService`: a `clusterctl` outside this
//! coordinator's window (`vigil_proto::compat`) is refused before its call does anything, with
//! both versions and the upgrade order. Its version comes in the `vigil-client-version`
//! metadata; a call without it comes from a `clusterctl` that predates the key (release 0.1).

use tonic::{Request, Status};
use tracing::warn;
use vigil_proto::compat::{self, CLIENT_VERSION_METADATA, Peer, UNLABELLED_CLIENT};

/// The interceptor: passes a call from a release inside the window, refuses the rest with
/// `FAILED_PRECONDITION`.
pub fn check(request: Request<()>) -> Result<Request<()>, Status> {
    let said = request
        .metadata()
        .get(CLIENT_VERSION_METADATA)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    let version = said.unwrap_or_else(|| UNLABELLED_CLIENT.to_string());
    match compat::check(compat::this_release(), Peer::Clusterctl, &version) {
        Ok(()) => Ok(request),
        Err(skew) => {
            warn!(client_version = %version, "refused a clusterctl call: {skew}");
            Err(Status::failed_precondition(skew.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn call(version: Option<&'static str>) -> Result<Request<()>, Status> {
        let mut r = Request::new(());
        if let Some(v) = version {
            r.metadata_mut()
                .insert(CLIENT_VERSION_METADATA, MetadataValue::from_static(v));
        }
        check(r)
    }

    #[test]
    fn this_release_and_its_neighbours_pass() {
        let this = compat::this_release();
        assert!(call(None).is_ok() == this.works_with(&UNLABELLED_CLIENT));
        let own = Box::leak(this.to_string().into_boxed_str());
        assert!(call(Some(own)).is_ok());
    }

    #[test]
    fn a_release_far_away_is_refused_with_both_versions() {
        let far = compat::Version {
            minor: compat::this_release().minor + 2,
            ..compat::this_release()
        };
        let far = Box::leak(far.to_string().into_boxed_str());
        let status = call(Some(far)).expect_err("outside the window");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status
                .message()
                .contains(&format!("clusterctl {far} and coordinator"))
        );
        assert!(
            status.message().contains("upgrade the coordinators"),
            "{}",
            status.message()
        );
        let status = call(Some("nonsense")).expect_err("not a version");
        assert!(
            status.message().contains("\"nonsense\""),
            "{}",
            status.message()
        );
    }
}
