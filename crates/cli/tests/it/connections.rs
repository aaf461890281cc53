//! Connections a hostile client opens and holds: silent sockets by the ten thousand,
//! headers sent a byte at a time, bodies that stop, bodies refused before they are read.
//! Each is bounded, and the clients that behave keep being served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{tool, BerthProcess};
use reqwest::StatusCode;

use crate::{http, push_image};

/// `berth serve --auth none` with `[limits]` lines in a config file.
fn serve_with_limits(dir: &Path, limits: &str) -> BerthProcess {
    let config = dir.join("berth.toml");
    std::fs::write(&config, format!("[limits]\n{limits}\n")).unwrap();
    BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.join("data"),
        &["--auth", "none", "--config", config.to_str().unwrap()],
        &[],
    )
}

fn addr_of(berth: &BerthProcess) -> SocketAddr {
    berth.url().trim_start_matches("http://").parse().unwrap()
}

/// Reads until the server closes; `None` if it is still open after `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        match stream.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => {}
        }
    }
    None
}

#[test]
fn silent_trickling_and_idle_connections_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let berth = serve_with_limits(dir.path(), "header_timeout_secs = 2");
    let addr = addr_of(&berth);

    let mut silent = TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(8)).is_some(),
        "a connection that never speaks"
    );

    let mut trickling = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickling.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    assert!(
        cut || closed_within(&mut trickling, Duration::from_secs(3)).is_some(),
        "a header sent a byte at a time"
    );
    assert!(started.elapsed() < Duration::from_secs(9));

    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer =
        closed_within(&mut idle, Duration::from_secs(8)).expect("an idle keep-alive is closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "it was answered first"
    );
}

#[test]
fn a_stalled_body_fails_and_a_slow_moving_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let berth = serve_with_limits(
        dir.path(),
        "body_stall_timeout_secs = 2\nheader_timeout_secs = 30",
    );
    let addr = addr_of(&berth);
    let start_upload = || {
        let r = http()
            .post(format!("{}/v2/slow/blob/blobs/uploads/", berth.url()))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.headers()["location"].to_str().unwrap().to_owned()
    };

    // Ten bytes declared, four sent, then nothing: the request fails, the session stays.
    let location = start_upload();
    let mut stalled = TcpStream::connect(addr).unwrap();
    write!(
        stalled,
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 10\r\n\r\nabcd"
    )
    .unwrap();
    let started = Instant::now();
    let answer = closed_within(&mut stalled, Duration::from_secs(10))
        .expect("a stalled body ends the request");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("no body bytes"), "{answer}");

    // A byte every 700 ms for five seconds: slower than the limit in total, never stalled.
    let location = start_upload();
    let body: Vec<u8> = (0..7u8).collect();
    let mut slow = TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    for byte in &body {
        std::thread::sleep(Duration::from_millis(700));
        slow.write_all(&[*byte]).unwrap();
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = [0u8; 64];
    let n = slow.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

#[test]
fn a_request_refused_before_its_body_is_read_says_the_connection_closes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "").unwrap();
    let berth = BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[("BERTH_ADMIN_PASSWORD", "admin-password")],
    );
    // An anonymous push with a body: refused by access control, body unread.
    let r = http()
        .put(format!("{}/v2/p/r/manifests/v1", berth.url()))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(vec![b'x'; 100_000])
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["connection"], "close");
    // A request without a body keeps its connection.
    let r = http().get(format!("{}/v2/", berth.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("connection").is_none());
}

/// A python process holding `count` connections from 127.0.0.2 to `addr` for `hold`.
fn hold_connections(addr: SocketAddr, count: usize, hold: Duration) -> Child {
    let script = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
count = min(count, hard - 64)  # a machine with fewer descriptors gets a smaller flood
held, failed = [], 0
deadline = time.time() + hold
for _ in range(count):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT: the port at connect
        s.bind(("127.0.0.2", 0))
        s.settimeout(2)
        s.connect((host, port))
        held.append(s)
    except OSError:
        failed += 1
        s.close()
    if time.time() > deadline:
        break
print(len(held), failed, count, flush=True)
time.sleep(max(0, deadline - time.time()))
"#;
    Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .arg(count.to_string())
        .arg(hold.as_secs_f64().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills its processes when the test ends, however.
struct Holders(Vec<Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn twenty_thousand_silent_connections_do_not_stop_pulls_or_health_checks() {
    if tool("python3").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The default header timeout (30 s) is longer than the test: only the cap and the
    // eviction of silent connections keep the server reachable.
    let berth = serve_with_limits(dir.path(), "");
    let addr = addr_of(&berth);
    let blob = vec![7u8; 256 * 1024];
    let reg_url = berth.url();
    push_image(&reg_url, "flood/app", "v1", &[&blob]);
    let digest = crate::sha256(&blob);

    let hold = Duration::from_secs(40);
    let mut holders = Holders(vec![
        hold_connections(addr, 10_000, hold),
        hold_connections(addr, 10_000, hold),
    ]);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut pulls = 0;
    let mut slowest = Duration::ZERO;
    // Pull and check health on new connections while the flood builds up and holds.
    while started.elapsed() < Duration::from_secs(25) {
        let t = Instant::now();
        let health = client
            .get(format!("{reg_url}/healthz"))
            .send()
            .expect("/healthz answers");
        assert_eq!(health.status(), StatusCode::OK);
        let manifest = client
            .get(format!("{reg_url}/v2/flood/app/manifests/v1"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .expect("the manifest pull is answered");
        assert_eq!(manifest.status(), StatusCode::OK);
        let bytes = client
            .get(format!("{reg_url}/v2/flood/app/blobs/{digest}"))
            .send()
            .and_then(|r| r.bytes())
            .expect("the blob pull is answered");
        assert_eq!(bytes.len(), blob.len());
        slowest = slowest.max(t.elapsed());
        pulls += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut opened, mut attempted) = (0, 0);
    for child in &mut holders.0 {
        let _ = child.kill();
        let _ = child.wait();
        let mut line = String::new();
        if let Some(out) = child.stdout.as_mut() {
            let _ = out.read_to_string(&mut line);
        }
        let numbers: Vec<usize> = line
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        opened += numbers.first().copied().unwrap_or(0);
        attempted += numbers.get(2).copied().unwrap_or(0);
    }
    drop(holders);
    eprintln!(
        "{opened} of {attempted} silent connections opened; {pulls} pulls, slowest {slowest:?}"
    );
    assert!(
        attempted > 0 && opened * 100 >= attempted * 95,
        "the flood got its connections: {opened} of {attempted}"
    );
    assert!(pulls >= 20);
    assert!(berth.log().iter().all(|l| !l.contains("panicked")));
}

#[test]
fn out_of_descriptors_the_server_backs_off_makes_room_and_keeps_answering() {
    if berth_testkit::tool("prlimit").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Few descriptors and a connection cap above them: accept itself runs out (EMFILE).
    let wrapper = dir.path().join("berth-with-few-descriptors");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec prlimit --nofile=96:96 {} \"$@\"\n",
            env!("CARGO_BIN_EXE_berth")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "[limits]\nmax_connections = 10000\n").unwrap();
    let berth = BerthProcess::spawn_with(
        &wrapper,
        &dir.path().join("data"),
        &["--auth", "none", "--config", config.to_str().unwrap()],
        &[],
    );
    let addr = addr_of(&berth);
    let idle: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() > 96, "more connections than descriptors");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/healthz", berth.url()))
        .send()
        .expect("answered despite the full descriptor table");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        berth
            .log()
            .iter()
            .any(|l| l.contains("out of file descriptors")),
        "{:?}",
        berth.log()
    );
    drop(idle);
}
