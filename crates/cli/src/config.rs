//! Settings: built-in defaults, then a TOML file, then `BERTH_*` environment variables,
//! then command-line flags, each overriding the one before. No file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The settings `berth serve` runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_level: String,
    pub(crate) max_manifest_bytes: usize,
}

/// The config file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_manifest_bytes: Option<usize>,
}

/// Values given on the command line or in the environment (clap reads both).
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<String>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) log_level: Option<String>,
    pub(crate) max_manifest_bytes: Option<usize>,
}

impl Settings {
    /// Resolves the settings from an optional file and the overrides.
    pub(crate) fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let file_config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let listen = overrides
            .listen
            .or(file_config.listen)
            .unwrap_or_else(|| "127.0.0.1:5000".to_owned());
        let listen = listen
            .parse()
            .with_context(|| format!("listen address {listen:?} is not HOST:PORT"))?;
        Ok(Settings {
            listen,
            data_dir: overrides
                .data_dir
                .or(file_config.data_dir)
                .unwrap_or_else(|| PathBuf::from("./berth-data")),
            log_level: overrides
                .log_level
                .or(file_config.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            max_manifest_bytes: overrides
                .max_manifest_bytes
                .or(file_config.limits.max_manifest_bytes)
                .unwrap_or(berth_registry::Limits::default().max_manifest_bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:6000\"\ndata_dir = \"/srv/berth\"\n[limits]\nmax_manifest_bytes = 1024\n").unwrap();
        let s = Settings::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.listen.port(), 6000);
        assert_eq!(s.max_manifest_bytes, 1024);
        let s = Settings::load(
            Some(&path),
            Overrides {
                listen: Some("127.0.0.1:7000".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.data_dir, PathBuf::from("/srv/berth"));
        let d = Settings::load(None, Overrides::default()).unwrap();
        assert_eq!(d.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(d.data_dir, PathBuf::from("./berth-data"));
        std::fs::write(&path, "lisen = 1\n").unwrap();
        assert!(Settings::load(Some(&path), Overrides::default()).is_err());
    }
}
