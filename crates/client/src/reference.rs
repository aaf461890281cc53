//! Image references as users type them: `host[:port]/repo[:tag][@digest]`, with Docker
//! Hub's shorthand (`alpine` is `docker.io/library/alpine:latest`).

use berth_oci::{Digest, RepoName};

use crate::ClientError;

/// Where an image is and which one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`.
    pub registry: String,
    /// The repository.
    pub repository: RepoName,
    /// The tag, if one was named.
    pub tag: Option<String>,
    /// The digest, if one was named (it wins over the tag).
    pub digest: Option<Digest>,
}

/// The registry Docker Hub references mean.
const DOCKER_HUB: &str = "docker.io";

impl ImageRef {
    /// Parses a reference; a name without a registry is Docker Hub's, one without a tag
    /// or digest is `:latest`.
    pub fn parse(text: &str) -> Result<ImageRef, ClientError> {
        let bad = |why: &str| ClientError::BadReference(format!("{text:?}: {why}"));
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (
                rest,
                Some(Digest::parse(digest).map_err(|e| bad(&e.to_string()))?),
            ),
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/' (a port is before it).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let host_ok = !registry.starts_with(['.', '-', ':'])
            && !registry.contains("..")
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            && url::Url::parse(&format!("http://{registry}/")).is_ok_and(|u| u.host().is_some());
        if !host_ok {
            return Err(bad("the registry is not host[:port]"));
        }
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let repository = RepoName::parse(&path).map_err(|e| bad(&e.to_string()))?;
        if let Some(tag) = &tag {
            berth_oci::Tag::parse(tag).map_err(|e| bad(&e.to_string()))?;
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest if known, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// Whether the registry is spoken to over plain HTTP by default: loopback and
    /// `localhost`, as docker does.
    pub fn plain_http_by_default(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository.as_str())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.as_str(), "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.plain_http_by_default());

        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository.as_str(), "library/alpine");
        assert_eq!(r.reference(), "latest");
        assert!(!r.plain_http_by_default());

        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/app@{digest}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), digest);
        assert!(r.plain_http_by_default());

        let r = ImageRef::parse("registry.example.com/a/b/c").unwrap();
        assert_eq!(r.repository.as_str(), "a/b/c");
        assert_eq!(r.to_string(), "registry.example.com/a/b/c:latest");

        for bad in [
            "",
            "UPPER/case",
            "host/repo:bad tag",
            "host/repo@sha256:short",
            "../x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
