//! TLS for talking to registries: the HTTP clients, and the CA certificates docker and
//! podman keep per registry.

use std::time::Duration;

use crate::{ClientError, RegistryClient};

impl RegistryClient {
    /// An HTTP client for talking to registries from the command line: redirects followed
    /// (blob downloads are often redirected to object storage; credentials are not sent
    /// to another host), `insecure` accepting any certificate.
    pub fn default_http(insecure: bool) -> Result<reqwest::Client, ClientError> {
        Self::http_for("", insecure, &[])
    }

    /// Whether docker's or podman's `certs.d` holds a CA for `registry`: then it speaks
    /// TLS, even on loopback.
    pub fn has_ca_for(registry: &str) -> bool {
        !certs_d_files(registry).is_empty()
    }

    /// [`RegistryClient::default_http`] for one registry, trusting besides the system's
    /// roots the PEM certificates in `ca_files` and those docker and podman keep for
    /// `registry` (`certs.d/<host:port>/*.crt` under `/etc/docker`, `/etc/containers` and
    /// the user's containers configuration), so a private CA set up for them works here.
    pub fn http_for(
        registry: &str,
        insecure: bool,
        ca_files: &[std::path::PathBuf],
    ) -> Result<reqwest::Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure)
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        let mut files = ca_files.to_vec();
        if !registry.is_empty() {
            files.extend(certs_d_files(registry));
        }
        for file in files {
            let pem = std::fs::read(&file)
                .map_err(|e| ClientError::Protocol(format!("{}: {e}", file.display())))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ClientError::Protocol(format!("{}: not PEM certificates: {e}", file.display()))
            })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        builder
            .build()
            .map_err(|e| ClientError::Protocol(format!("HTTP client: {e}")))
    }
}

/// The CA certificates docker and podman keep for `registry` (`*.crt` files; client
/// certificates there are `.cert`/`.key` and not read).
fn certs_d_files(registry: &str) -> Vec<std::path::PathBuf> {
    if registry.contains("..") || registry.contains('/') {
        return Vec::new();
    }
    let mut roots = vec![
        std::path::PathBuf::from("/etc/docker/certs.d"),
        std::path::PathBuf::from("/etc/containers/certs.d"),
    ];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        roots.push(std::path::PathBuf::from(home).join(".config/containers/certs.d"));
    }
    let mut files = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root.join(registry)) else {
            continue;
        };
        let mut found: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        found.sort();
        files.extend(found);
    }
    files
}
