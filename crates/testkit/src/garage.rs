//! A throwaway S3 server for the test process: Garage (`cargo install garage`), single
//! node, on loopback ports, with one bucket and one key made at start; stopped (and its
//! directory removed) by a watchdog shell when the test process exits. Each registry gets
//! its own key prefix in the bucket. Garage checks signatures, unlike S3 fakes that accept
//! any secret.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::wait_until;

/// Where the shared S3 server listens and how to sign for it.
pub struct GarageServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Garage's `s3_region`.
    pub region: String,
    /// The bucket made at start.
    pub bucket: String,
    /// Its access key id.
    pub access_key_id: String,
    /// Its secret key.
    pub secret_access_key: String,
    _watchdog: std::process::Child,
}

static GARAGE: OnceLock<Option<GarageServer>> = OnceLock::new();

/// The `garage` binary: on `PATH` or where `cargo install` puts it.
fn garage_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(home.join("bin").join("garage")).filter(|p| p.is_file())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn hex(bytes: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < bytes * 2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(bytes * 2);
    out
}

/// The shared server, started on first call; `None` when Garage is not installed
/// (locally; under `CI` that is a failure, since CI installs it).
pub fn shared_garage() -> Option<&'static GarageServer> {
    GARAGE
        .get_or_init(|| {
            let Some(binary) = garage_binary() else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "Garage is required under CI but not installed"
                );
                eprintln!("Garage is not installed: blobs stay on the file system");
                return None;
            };
            Some(start(&binary))
        })
        .as_ref()
}

/// A configured (not yet started) single-node Garage in a temporary directory.
struct Prepared {
    dir: PathBuf,
    s3: u16,
    admin: u16,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    bucket: String,
}

fn prepare() -> Prepared {
    let dir = tempfile::Builder::new()
        .prefix("berth-s3")
        .tempdir_in("/tmp")
        .expect("temp dir")
        .keep();
    let (s3, rpc, admin) = (free_port(), free_port(), free_port());
    let region = "garage".to_owned();
    std::fs::write(
        dir.join("garage.toml"),
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"{region}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            d = dir.display(),
            secret = hex(32),
        ),
    )
    .expect("garage config");
    Prepared {
        dir,
        s3,
        admin,
        region,
        access_key_id: format!("GK{}", hex(12)),
        secret_access_key: hex(32),
        bucket: "berth-test".to_owned(),
    }
}

impl Prepared {
    /// `garage server`, with the default bucket and key made from the environment.
    fn command(&self, binary: &std::path::Path) -> Command {
        let mut c = Command::new(binary);
        c.arg("-c")
            .arg(self.dir.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket);
        c
    }

    fn wait_healthy(&self) {
        let health = format!("127.0.0.1:{}", self.admin);
        let up = wait_until(Duration::from_secs(60), || http_ok(&health, "/health"));
        assert!(
            up,
            "garage did not become healthy: {}",
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }
}

fn start(binary: &std::path::Path) -> GarageServer {
    let Prepared {
        dir,
        s3,
        admin,
        region,
        access_key_id,
        secret_access_key,
        bucket,
    } = prepare();
    let script = format!(
        "'{garage}' -c '{d}/garage.toml' server --single-node --default-bucket >'{d}/log' 2>&1 & g=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $g 2>/dev/null; do sleep 0.5; done; \
         kill $g 2>/dev/null; wait $g; rm -rf '{d}'",
        garage = binary.display(),
        d = dir.display(),
        parent = std::process::id(),
    );
    let watchdog = Command::new("sh")
        .args(["-c", &script])
        .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key_id)
        .env("GARAGE_DEFAULT_SECRET_KEY", &secret_access_key)
        .env("GARAGE_DEFAULT_BUCKET", &bucket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting garage");
    let health = format!("127.0.0.1:{admin}");
    let up = wait_until(Duration::from_secs(60), || http_ok(&health, "/health"));
    assert!(
        up,
        "garage did not become healthy: {}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    GarageServer {
        endpoint: format!("http://127.0.0.1:{s3}"),
        region,
        bucket,
        access_key_id,
        secret_access_key,
        _watchdog: watchdog,
    }
}

/// A bare `GET` that answers whether the status was 200 (no HTTP client needed).
fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).is_ok() && answer.ends_with(b"200")
}

/// A Garage server of one test's own, which it may kill and start again on the same data
/// and ports (an S3 outage). Killed and removed on drop, and by a watchdog if the test
/// process dies first.
pub struct PrivateGarage {
    binary: PathBuf,
    prepared: Prepared,
    child: Option<std::process::Child>,
    _watchdog: std::process::Child,
}

impl PrivateGarage {
    /// Starts one; `None` when Garage is not installed (locally).
    pub fn start() -> Option<Self> {
        let Some(binary) = garage_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "Garage is required under CI but not installed"
            );
            eprintln!("skipping: Garage is not installed");
            return None;
        };
        let prepared = prepare();
        // The watchdog only cleans up: it kills whatever Garage runs on this config.
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; \
             pkill -f '{d}/garage.toml'; rm -rf '{d}'",
            parent = std::process::id(),
            d = prepared.dir.display(),
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
        let mut garage = PrivateGarage {
            binary,
            prepared,
            child: None,
            _watchdog: watchdog,
        };
        garage.resume();
        Some(garage)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.prepared.s3)
    }

    /// The settings a registry needs to keep its blobs here.
    pub fn s3_config(&self) -> berth_storage::S3Config {
        berth_storage::S3Config {
            endpoint: Some(self.endpoint()),
            region: self.prepared.region.clone(),
            bucket: self.prepared.bucket.clone(),
            prefix: "registry".into(),
            access_key_id: self.prepared.access_key_id.clone(),
            secret_access_key: self.prepared.secret_access_key.clone(),
            path_style: true,
            redirect: None,
        }
    }

    /// Kills the server (SIGKILL: a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data and ports, and waits until it is healthy.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.prepared.dir.join("log")).expect("log");
        let child = self
            .prepared
            .command(&self.binary)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting garage");
        self.child = Some(child);
        self.prepared.wait_healthy();
    }
}

impl Drop for PrivateGarage {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.prepared.dir);
    }
}
