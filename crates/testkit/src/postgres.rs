//! Throwaway PostgreSQL clusters, made with the server binaries of the `postgresql`
//! package and listening only on a Unix socket in a temporary directory. The shared one is
//! created on first use (fast and not crash-safe: fsync off) and each registry gets its own
//! schema in it; a test may also start a durable one of its own and stop and start it (an
//! outage). Either is stopped, and its directory removed, when the test process exits,
//! however it exits (see [`crate::after_exit`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::{after_exit, missing_tool};

/// A running cluster.
pub struct PostgresCluster {
    bin: PathBuf,
    dir: PathBuf,
    root: bool,
    durable: bool,
    url: String,
    _cleanup: Child,
}

static CLUSTER: OnceLock<Option<PostgresCluster>> = OnceLock::new();

/// The shared cluster, started on first call; `None` when PostgreSQL is not installed
/// (locally; under `CI` that is a failure, since CI installs it).
pub fn shared_cluster() -> Option<&'static PostgresCluster> {
    CLUSTER
        .get_or_init(|| PostgresCluster::start(false, "the PostgreSQL suite runs on SQLite"))
        .as_ref()
}

/// The directory of PostgreSQL's server binaries (`initdb`, `postgres`), newest version.
fn server_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (the server refuses
/// to run as root).
fn as_postgres(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Creates a temporary directory (owned by `postgres` when we are root) with a fresh
/// cluster in `data/`.
fn init_cluster(bin: &Path, root: bool) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("berth-pg")
        .tempdir_in("/tmp")
        .expect("temp dir")
        .keep();
    if root {
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the cluster directory failed");
    }
    let data = dir.join("data");
    let out = as_postgres(root, &bin.join("initdb"))
        .args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "-D",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

impl PostgresCluster {
    /// A durable cluster of the calling test's own; `None` when PostgreSQL is not
    /// installed (locally).
    pub fn start_private() -> Option<Self> {
        Self::start(true, "skipping")
    }

    fn start(durable: bool, consequence: &str) -> Option<Self> {
        let Some(bin) = server_bin_dir() else {
            missing_tool("PostgreSQL", consequence);
            return None;
        };
        let root = is_root();
        let dir = init_cluster(&bin, root);
        let cleanup = after_exit(&format!(
            "{runner}'{pg_ctl}' -D '{dir}/data' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            runner = if root { "runuser -u postgres -- " } else { "" },
            pg_ctl = bin.join("pg_ctl").display(),
            dir = dir.display(),
        ));
        let cluster = PostgresCluster {
            url: format!("host={} user=postgres dbname=postgres", dir.display()),
            bin,
            dir,
            root,
            durable,
            _cleanup: cleanup,
        };
        cluster.resume();
        Some(cluster)
    }

    /// `host=<socket dir> user=postgres dbname=postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_postgres(self.root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once, as a crash or a network cut would look to clients.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let mut options = format!(
            "-k {} -c listen_addresses= -c max_connections=400",
            self.dir.display()
        );
        if !self.durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.dir.join("log");
        self.pg_ctl(&["-w", "-l", &log.to_string_lossy(), "-o", &options, "start"]);
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let _ = as_postgres(self.root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
