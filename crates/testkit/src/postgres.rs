//! Throwaway PostgreSQL clusters, made with the server binaries of the `postgresql`
//! package and listening only on a Unix socket in a temporary directory. The shared one is
//! created on first use and stopped (its directory removed) by a watchdog shell as soon as
//! the test process exits, however it exits; each registry gets its own schema in it.
//! A [`PrivateCluster`] belongs to one test, which may stop and start it (outages).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::wait_until;

/// Where the shared cluster listens, as a connection string.
pub struct PostgresCluster {
    url: String,
    /// The watchdog shell; it outlives this process on purpose, to stop the server.
    _watchdog: std::process::Child,
}

impl PostgresCluster {
    /// `host=<socket dir> user=postgres dbname=postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

static CLUSTER: OnceLock<Option<PostgresCluster>> = OnceLock::new();

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

/// The shared cluster, started on first call; `None` when PostgreSQL is not installed
/// (locally; under `CI` that is a failure, since CI installs it).
pub fn shared_cluster() -> Option<&'static PostgresCluster> {
    CLUSTER
        .get_or_init(|| {
            let Some(bin) = server_bin_dir() else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "PostgreSQL is required under CI but not installed"
                );
                eprintln!("PostgreSQL is not installed: the PostgreSQL suite runs on SQLite");
                return None;
            };
            Some(start(&bin))
        })
        .as_ref()
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

fn start(bin: &Path) -> PostgresCluster {
    let root = is_root();
    let dir = init_cluster(bin, root);
    let data = dir.join("data");
    // The watchdog: postgres runs as long as this test process does, then stops (a fast
    // shutdown, signalled to the postmaster itself: `runuser` does not pass it on) and its
    // directory goes.
    let postgres = bin.join("postgres");
    let runner = if root { "runuser -u postgres -- " } else { "" };
    let script = format!(
        "{runner}'{postgres}' -D '{data}' -k '{dir}' -c listen_addresses= -c max_connections=400 \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off >'{dir}/log' 2>&1 & pg=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
         kill -INT $(head -n1 '{data}/postmaster.pid' 2>/dev/null) 2>/dev/null; wait $pg; rm -rf '{dir}'",
        postgres = postgres.display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    let watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    let socket = dir.join(".s.PGSQL.5432");
    assert!(
        wait_until(Duration::from_secs(30), || socket.exists()),
        "postgres did not start: {}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    PostgresCluster {
        url: format!("host={} user=postgres dbname=postgres", dir.display()),
        _watchdog: watchdog,
    }
}

/// A cluster of one test's own, which it may stop and start. Stopped and removed on drop
/// (and by a watchdog if the test process dies first).
pub struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    root: bool,
    url: String,
    _watchdog: std::process::Child,
}

impl PrivateCluster {
    /// Creates and starts a cluster; `None` when PostgreSQL is not installed (locally).
    pub fn start() -> Option<Self> {
        let Some(bin) = server_bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is required under CI but not installed"
            );
            eprintln!("skipping: PostgreSQL is not installed");
            return None;
        };
        let root = is_root();
        let dir = init_cluster(&bin, root);
        let data = dir.join("data");
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; \
             {runner}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            parent = std::process::id(),
            runner = if root { "runuser -u postgres -- " } else { "" },
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
        let cluster = PrivateCluster {
            url: format!("host={} user=postgres dbname=postgres", dir.display()),
            bin,
            dir,
            root,
            _watchdog: watchdog,
        };
        cluster.resume();
        Some(cluster)
    }

    /// The connection string.
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
        let options = format!(
            "-k {} -c listen_addresses= -c max_connections=100",
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.pg_ctl(&["-w", "-l", &log.to_string_lossy(), "-o", &options, "start"]);
    }
}

impl Drop for PrivateCluster {
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
