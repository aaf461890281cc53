//! TLS terminated in the process, with certificates that can be renewed under load.
//!
//! Container engines refuse plain HTTP for any registry that is not on loopback, so a
//! registry facing a network needs TLS. [`Tls`] holds the current rustls configuration
//! behind a lock: every new connection takes the configuration current at its handshake,
//! and connections already open keep theirs. Reloading builds a whole new configuration
//! from the files and swaps it in only if it is complete and consistent, so a renewal
//! caught half-written (the certificate new, the key still old) changes nothing until the
//! key follows.

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Where the PEM files are. Read again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key of the leaf (PKCS#8, PKCS#1 RSA or SEC1 ECDSA).
    pub key_file: PathBuf,
    /// With it, clients must present a certificate issued by one of these authorities
    /// (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Why a TLS configuration could not be built. The previous one, if any, stays in use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or is not PEM.
    #[error("reading {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A PEM file held no item of the kind it is named for.
    #[error("{path} holds no {what}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// rustls refused the certificate, key or authorities (a key that does not match the
    /// certificate, an unsupported algorithm).
    #[error("TLS configuration refused: {0}")]
    Refused(String),
}

/// The live TLS configuration of a listener, reloadable while it serves.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification stamps when last loaded, and when a reload last failed (so
    /// a broken renewal is reported once, not on every poll).
    stamps: Mutex<Stamps>,
}

#[derive(Default)]
struct Stamps {
    loaded: Vec<Option<(SystemTime, u64)>>,
    failed: Option<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    /// Loads the files; fails if they do not make a working configuration, so a server
    /// never starts with TLS half set up.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamps = stamps(&files);
        let config = build(&files)?;
        Ok(Arc::new(Tls {
            files,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(Stamps {
                loaded: stamps,
                failed: None,
            }),
        }))
    }

    /// Reads the files again and, if they make a working configuration, uses it for every
    /// connection from now on. On failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = stamps(&self.files);
        let result = build(&self.files);
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                stamps.loaded = seen;
                stamps.failed = None;
                Ok(())
            }
            Err(e) => {
                stamps.failed = Some(seen);
                Err(e)
            }
        }
    }

    /// Reloads if a file changed since the last load (or the last failed attempt).
    /// `Ok(true)` when a new configuration is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let seen = stamps(&self.files);
        {
            let stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if seen == stamps.loaded || stamps.failed.as_ref() == Some(&seen) {
                return Ok(false);
            }
        }
        self.reload().map(|()| true)
    }

    /// Polls the files every `every` and reloads when they change, for as long as the
    /// server runs: a renewal by any tool is picked up without a signal.
    pub async fn watch_files(self: Arc<Self>, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let tls = self.clone();
            match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!("TLS certificate reloaded (files changed)"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS files changed but do not load; keeping the certificate in use")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }

    /// An acceptor for one new connection, with the configuration current now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// What tells a changed file from an unchanged one without reading it.
fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    let stamp = |m: Metadata| m.modified().ok().map(|t| (t, m.len()));
    [
        Some(&files.cert_file),
        Some(&files.key_file),
        files.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).ok().and_then(stamp))
    .collect()
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            path: files.key_file.clone(),
            what: "private key",
        },
        e => read_error(&files.key_file, e),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Refused(format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Refused(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        io::Error::other(e)
    }
}
