//! The `coordinator` key: one URL or the list of an HA group, and its checks.

use std::fmt;

use serde::{Deserialize, Deserializer};
use tonic::codegen::http::Uri;

use super::{ConfigError, MAX_COORDINATORS};

/// The `coordinator` key: one URL (`"https://coord:7770"`) or a list of them
/// (`["https://coord-1:7770", "https://coord-2:7770"]`), in the order the agent tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinators(Vec<String>);

impl Coordinators {
    /// `--coordinator URL[,URL...]`: a comma-separated list; entries are trimmed, empty ones
    /// kept so validation can name them.
    pub fn from_flag(value: &str) -> Self {
        Self(value.split(',').map(|u| u.trim().to_owned()).collect())
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every URL starts with `prefix` (a scheme, say).
    pub fn starts_with(&self, prefix: &str) -> bool {
        !self.0.is_empty() && self.0.iter().all(|u| u.starts_with(prefix))
    }

    /// More than one: a highly available group, where the agent looks for the leader.
    pub fn is_group(&self) -> bool {
        self.0.len() > 1
    }

    /// The position of `url` in the list, comparing scheme, host and port (not spelling).
    pub fn position(&self, url: &str) -> Option<usize> {
        let key = url_key(url)?;
        self.0
            .iter()
            .position(|u| url_key(u).as_ref() == Some(&key))
    }
}

/// Scheme, lower-case host and port (the scheme's default when absent): two URLs with the
/// same key reach the same coordinator.
fn url_key(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.trim().parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host().filter(|h| !h.is_empty())?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, host, port))
}

impl<'de> Deserialize<'de> for Coordinators {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a coordinator URL, or an array of coordinator URLs"
        )]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Form::deserialize(deserializer)? {
            Form::One(url) => Self(vec![url]),
            Form::Many(urls) => Self(urls),
        })
    }
}

/// One URL as itself; a list comma-separated (the `--coordinator` form).
impl fmt::Display for Coordinators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl From<String> for Coordinators {
    fn from(url: String) -> Self {
        Self(vec![url])
    }
}

impl From<&str> for Coordinators {
    fn from(url: &str) -> Self {
        Self(vec![url.to_owned()])
    }
}

impl From<Vec<String>> for Coordinators {
    fn from(urls: Vec<String>) -> Self {
        Self(urls)
    }
}

/// A single coordinator equals its URL.
impl PartialEq<&str> for Coordinators {
    fn eq(&self, other: &&str) -> bool {
        matches!(self.0.as_slice(), [one] if one == other)
    }
}

/// Each URL on its own, then the list: not empty, at most [`MAX_COORDINATORS`], one
/// scheme, no coordinator twice.
pub(super) fn validate_coordinators(list: &Coordinators) -> Result<(), ConfigError> {
    let invalid = |problem: String, fix: &'static str| ConfigError::Invalid {
        field: "coordinator",
        problem,
        fix,
    };
    if list.is_empty() {
        return Err(invalid(
            "the list is empty".to_owned(),
            "name the coordinator, e.g. coordinator = \"https://coord:7770\", or every member \
             of its group, e.g. coordinator = [\"https://coord-1:7770\", \"https://coord-2:7770\"]",
        ));
    }
    if list.len() > MAX_COORDINATORS {
        return Err(invalid(
            format!(
                "lists {} coordinators, more than {MAX_COORDINATORS}",
                list.len()
            ),
            "list only the coordinators of this cluster's group (usually 2 or 3)",
        ));
    }
    let mut first_scheme: Option<(&str, &str)> = None;
    for (i, url) in list.urls().iter().enumerate() {
        validate_coordinator(url)?;
        let scheme = url.split("://").next().unwrap_or_default();
        match first_scheme {
            None => first_scheme = Some((url, scheme)),
            Some((first, s)) if !s.eq_ignore_ascii_case(scheme) => {
                return Err(invalid(
                    format!("{url:?} uses {scheme}:// but {first:?} uses {s}://"),
                    "use one scheme for every coordinator: https:// with [tls], or http:// \
                     with insecure = true",
                ));
            }
            Some(_) => {}
        }
        if list.position(url).is_some_and(|p| p < i) {
            return Err(invalid(
                format!("{url:?} is listed twice"),
                "list each coordinator once",
            ));
        }
    }
    Ok(())
}

fn validate_coordinator(url: &str) -> Result<(), ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        field: "coordinator",
        problem,
        fix: "use a URL such as https://coordinator.example:7770",
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| invalid(format!("{url:?} is not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(invalid(format!("scheme {other:?} is not http or https"))),
        None => return Err(invalid(format!("{url:?} has no scheme"))),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{url:?} has no host")));
    }
    Ok(())
}
