//! Test support shared by the integration suites: a real registry served on an ephemeral
//! loopback port, a real `berth` process that can be killed, and a way to find real client
//! tools (skipped locally when absent, required under CI).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_auth::{AuthMode, AuthSettings};
use berth_meta::MetaError;
use berth_registry::{GcOptions, Limits};
use berth_server::node::{BlobConfig, MetaConfig, Node, NodeConfig, NodeError};
use berth_storage::S3Config;

/// A registry served in this process on `127.0.0.1:0`, with its own runtime and a temporary
/// data directory. Stops on drop.
pub struct TestRegistry {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    data_dir: DataDir,
}

/// A registry's data directory: its own temporary one, or one shared with other nodes.
enum DataDir {
    Own(tempfile::TempDir),
    Shared(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Own(dir) => dir.path(),
            DataDir::Shared(path) => path,
        }
    }
}

mod garage;
mod hub;
mod postgres;
mod proxy;
mod receiver;

pub use garage::{shared_garage, GarageServer};
pub use hub::{HubOptions, HubRequest, HubServer};
pub use postgres::{shared_cluster, PostgresCluster};
pub use proxy::CuttableProxy;
pub use receiver::{ReceivedRequest, ReceiverMode, WebhookReceiver};

/// Where a test registry keeps blob bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobBackend {
    /// The registry's data directory.
    Filesystem,
    /// A prefix of its own in the shared throwaway S3 server (the file system when Garage
    /// is not installed, outside CI).
    S3,
}

/// Which metadata backend a test registry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaBackend {
    /// SQLite in the registry's data directory.
    Sqlite,
    /// A schema of its own in the shared throwaway PostgreSQL cluster (SQLite when
    /// PostgreSQL is not installed, outside CI).
    Postgres,
}

/// How to start a test registry.
#[derive(Clone)]
pub struct Options {
    /// Input limits.
    pub limits: Limits,
    /// Garbage-collection settings (for `POST /api/v1/gc`).
    pub gc: GcOptions,
    /// Access control; disabled by default.
    pub auth: AuthSettings,
    /// In external token mode, the issuer's key.
    pub issuer_key: Option<berth_auth::IssuerKey>,
    /// The metadata backend.
    pub meta: MetaBackend,
    /// With [`MetaBackend::Postgres`]: this server instead of the shared cluster.
    pub postgres_url: Option<String>,
    /// With [`MetaBackend::Postgres`]: this schema (another node's) instead of a new one.
    pub postgres_schema: Option<String>,
    /// This data directory (another node's) instead of a new temporary one.
    pub data_dir: Option<PathBuf>,
    /// The blob backend.
    pub blobs: BlobBackend,
    /// With [`BlobBackend::S3`]: this key prefix (another node's) instead of a new one.
    pub s3_prefix: Option<String>,
    /// With [`BlobBackend::S3`]: redirect blob downloads to pre-signed URLs this long-lived.
    pub s3_redirect: Option<Duration>,
    /// With [`BlobBackend::S3`]: this server instead of the shared one.
    pub s3_config: Option<S3Config>,
    /// Send blob files with `sendfile` (`App::with_sendfile`).
    pub sendfile: bool,
    /// Deliver webhooks with these settings (the sender runs only if given; the API
    /// works either way, with default settings).
    pub webhooks: Option<berth_webhooks::WebhookSettings>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            gc: GcOptions::default(),
            auth: AuthSettings {
                mode: AuthMode::Disabled,
                ..AuthSettings::default()
            },
            issuer_key: None,
            meta: MetaBackend::Sqlite,
            postgres_url: None,
            postgres_schema: None,
            data_dir: None,
            blobs: BlobBackend::Filesystem,
            s3_prefix: None,
            s3_redirect: None,
            s3_config: None,
            sendfile: false,
            webhooks: None,
        }
    }
}

/// Where a test node keeps blob bytes: S3 (the shared Garage server, or the one given)
/// when asked for and available, else its data directory.
fn blob_config(
    backend: BlobBackend,
    given: Option<S3Config>,
    prefix: Option<String>,
    redirect: Option<Duration>,
) -> BlobConfig {
    if let Some(config) = given {
        return BlobConfig::S3(config);
    }
    if backend == BlobBackend::S3 {
        if let Some(garage) = shared_garage() {
            return BlobConfig::S3(S3Config {
                redirect,
                ..garage.s3_config(&prefix.unwrap_or_else(unique_schema))
            });
        }
    }
    BlobConfig::Filesystem
}

/// Where a test node keeps metadata: a PostgreSQL schema (of the shared cluster, or of
/// the server given) when asked for and available, else SQLite.
fn meta_config(backend: MetaBackend, url: Option<String>, schema: Option<String>) -> MetaConfig {
    if backend == MetaBackend::Postgres {
        if let Some(url) = url.or_else(|| shared_cluster().map(|c| c.url().to_owned())) {
            let schema = schema.unwrap_or_else(|| format!("t_{}", uuid_like()));
            return MetaConfig::Postgres {
                url,
                schema: Some(schema),
            };
        }
    }
    MetaConfig::Sqlite
}

/// Opens a node, retrying while a PostgreSQL server that was just started (or restarted)
/// refuses connections.
async fn open_node(config: &NodeConfig) -> Node {
    let mut last = None;
    for _ in 0..100 {
        match Node::open(config).await {
            Ok(node) => return node,
            Err(e @ NodeError::Meta(MetaError::Unavailable(_))) => last = Some(e),
            Err(e) => panic!("opening the test node: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("connecting to the test cluster: {last:?}");
}

/// A fresh schema name (or S3 key prefix) for a group of test nodes sharing one store.
pub fn unique_schema() -> String {
    format!("t_{}", uuid_like())
}

/// A unique lowercase name part.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}_{nanos:x}_{n}", std::process::id())
}

/// The password of `admin` in registries started with access control.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

impl TestRegistry {
    /// Starts an open registry (no access control, as Distribution without `auth`) with
    /// default limits and collection settings.
    pub fn start() -> Self {
        Self::start_with(Limits::default(), GcOptions::default())
    }

    /// Starts an open registry with the given limits and collection settings (used by
    /// `POST /api/v1/gc`).
    pub fn start_with(limits: Limits, gc: GcOptions) -> Self {
        Self::start_opts(Options {
            limits,
            gc,
            ..Options::default()
        })
    }

    /// Starts a registry with access control in the given settings' mode; in builtin mode
    /// the user `admin` has [`ADMIN_PASSWORD`].
    pub fn start_with_auth(auth: AuthSettings) -> Self {
        Self::start_opts(Options {
            auth,
            ..Options::default()
        })
    }

    /// Starts a registry that trusts only tokens signed by `issuer_key` (external token
    /// mode), so tests can mint any token, forged ones included.
    pub fn start_trusting(auth: AuthSettings, issuer_key: berth_auth::IssuerKey) -> Self {
        Self::start_opts(Options {
            auth: AuthSettings {
                mode: AuthMode::ExternalToken,
                ..auth
            },
            issuer_key: Some(issuer_key),
            ..Options::default()
        })
    }

    /// Starts a registry as `options` say.
    pub fn start_opts(options: Options) -> Self {
        let Options {
            limits,
            gc,
            auth,
            issuer_key,
            meta: backend,
            postgres_url,
            postgres_schema,
            data_dir,
            blobs: blob_backend,
            s3_prefix,
            s3_redirect,
            s3_config,
            sendfile,
            webhooks,
        } = options;
        let data_dir = match data_dir {
            Some(path) => DataDir::Shared(path),
            None => DataDir::Own(tempfile::tempdir().expect("temp dir")),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = NodeConfig {
            data_dir: data_dir.path().to_owned(),
            blobs: blob_config(blob_backend, s3_config, s3_prefix, s3_redirect),
            meta: meta_config(backend, postgres_url, postgres_schema),
            limits,
            auth,
            signing_key_file: None,
            issuer_key,
            gc,
            sendfile,
            metrics_access: berth_server::MetricsAccess::default(),
            webhooks: webhooks.clone().unwrap_or_default(),
            distribution_metrics: true,
            tracing: None,
            proxy_caches: Vec::new(),
            replication_reconcile: Duration::from_secs(3600),
        };
        let addr = runtime.block_on(async move {
            let Node {
                access,
                app,
                webhooks: webhook_admin,
                replication,
                ..
            } = open_node(&config).await;
            if webhooks.is_some() {
                tokio::spawn(berth_webhooks::run_sender(webhook_admin));
            }
            tokio::spawn(berth_replication::run(replication));
            if access.settings().mode == AuthMode::Builtin {
                access
                    .accounts()
                    .bootstrap_admin(Some(ADMIN_PASSWORD.to_owned()))
                    .await
                    .expect("first admin");
            }
            // Bound here and handed over: no window in which another test takes the port.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.await;
                };
                if let Err(e) =
                    berth_server::serve(listener, app, berth_server::ServeOptions::default(), stop)
                        .await
                {
                    eprintln!("test registry stopped with {e}");
                }
            });
            addr
        });
        TestRegistry {
            addr,
            shutdown: Some(tx),
            runtime: Some(runtime),
            data_dir,
        }
    }

    /// `127.0.0.1:PORT`, as clients write a registry host.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory, to inspect what was stored.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// An open (`--auth none`) `berth serve` child process on `127.0.0.1:0`; killed (and
/// reaped) on drop.
pub struct BerthProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl BerthProcess {
    /// Starts an open `binary serve` on `data_dir` and waits until it reports its address.
    pub fn spawn(binary: &Path, data_dir: &Path) -> Self {
        Self::spawn_with(binary, data_dir, &["--auth", "none"], &[])
    }

    /// Starts `binary serve` on `data_dir` with extra arguments and environment, and waits
    /// until it reports its address. Its log is kept (see [`BerthProcess::log`]).
    pub fn spawn_with(binary: &Path, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("BERTH_LOG_LEVEL", "info")
            .env_remove("BERTH_ADMIN_PASSWORD")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn berth");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line
                        .split("listening on http://")
                        .nth(1)
                        .or_else(|| line.split("listening on https://").nth(1))
                    {
                        // Up to the end of the address, in text or JSON log lines.
                        let addr: String = rest
                            .chars()
                            .take_while(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')
                            })
                            .collect();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("address in log line"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("berth did not report its address");
            }
        };
        BerthProcess { child, addr, log }
    }

    /// What the process wrote to stderr so far, line by line.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id, to read its resource use from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would: no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a client tool on `PATH`. Locally a missing tool skips the test (returns `None`
/// and says so); under `CI` it fails, because CI installs every tool.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing_tool(name, "skipping");
    }
    found
}

/// A tool CI installs is missing: under `CI` that fails the test; locally it says what
/// happens instead (`consequence`: skipping, or a fallback).
pub(crate) fn missing_tool(name: &str, consequence: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is required under CI but not installed"
    );
    eprintln!("{name} is not installed: {consequence}");
}

/// Runs `cleanup` in a shell once this test process has exited, however it exits (a
/// panic, an abort, SIGKILL): servers a test starts never outlive it. The shell polls for
/// the test process, so it needs no signal from it, and runs in a process group of its
/// own, so that a signal to the test's group (a `timeout` wrapper) does not take it along.
pub(crate) fn after_exit(cleanup: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; {cleanup}",
        parent = std::process::id()
    );
    Command::new("sh")
        .process_group(0)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cleanup shell")
}

/// Polls `condition` until it holds or `timeout` passes; tests wait on facts, not sleeps.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}
