//! Throwaway S3 servers: Garage (`cargo install garage`), single node, on loopback ports,
//! with one bucket and one key made at start. Garage checks signatures, unlike S3 fakes
//! that accept any secret. The shared server is started on first use; each registry gets
//! its own key prefix in its bucket. A test may also start one of its own and kill and
//! restart it (an outage). Either is killed, and its directory removed, when the test
//! process exits, however it exits (see [`crate::after_exit`]).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use berth_storage::S3Config;

use crate::{after_exit, missing_tool, wait_until};

/// A running Garage.
pub struct GarageServer {
    binary: PathBuf,
    dir: PathBuf,
    s3: u16,
    admin: u16,
    access_key_id: String,
    secret_access_key: String,
    server: Mutex<Option<Child>>,
    _cleanup: Child,
}

/// Garage's `s3_region` here.
const REGION: &str = "garage";
/// The bucket made at start.
const BUCKET: &str = "berth-test";

static GARAGE: OnceLock<Option<GarageServer>> = OnceLock::new();

/// The shared server, started on first call; `None` when Garage is not installed
/// (locally; under `CI` that is a failure, since CI installs it).
pub fn shared_garage() -> Option<&'static GarageServer> {
    GARAGE
        .get_or_init(|| GarageServer::start_private_or("blobs stay on the file system"))
        .as_ref()
}

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

impl GarageServer {
    /// A server of the calling test's own; `None` when Garage is not installed (locally).
    pub fn start_private() -> Option<Self> {
        Self::start_private_or("skipping")
    }

    fn start_private_or(consequence: &str) -> Option<Self> {
        let Some(binary) = garage_binary() else {
            missing_tool("garage", consequence);
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("berth-s3")
            .tempdir_in("/tmp")
            .expect("temp dir")
            .keep();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        std::fs::write(
            dir.join("garage.toml"),
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display(),
                secret = hex(32),
            ),
        )
        .expect("garage config");
        // Whatever server runs from this directory when the test process ends is killed.
        let cleanup = after_exit(&format!(
            "kill -9 $(cat '{d}/pid' 2>/dev/null) 2>/dev/null; rm -rf '{d}'",
            d = dir.display()
        ));
        let garage = GarageServer {
            binary,
            dir,
            s3,
            admin,
            access_key_id: format!("GK{}", hex(12)),
            secret_access_key: hex(32),
            server: Mutex::new(None),
            _cleanup: cleanup,
        };
        garage.resume();
        Some(garage)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3)
    }

    /// The settings a registry needs to keep its blobs here, under `prefix`.
    pub fn s3_config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: REGION.into(),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            path_style: true,
            redirect: None,
        }
    }

    /// Kills the server (SIGKILL: a crash).
    pub fn stop(&self) {
        if let Some(mut child) = self.server.lock().expect("server lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again, on the same data and ports) and waits until it is healthy;
    /// the default bucket and key are made from the environment.
    pub fn resume(&self) {
        let log = std::fs::File::create(self.dir.join("log")).expect("log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting garage");
        std::fs::write(self.dir.join("pid"), child.id().to_string()).expect("pid file");
        *self.server.lock().expect("server lock") = Some(child);
        let health = format!("127.0.0.1:{}", self.admin);
        let up = wait_until(Duration::from_secs(60), || http_ok(&health, "/health"));
        assert!(
            up,
            "garage did not become healthy: {}",
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }
}

impl Drop for GarageServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
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
