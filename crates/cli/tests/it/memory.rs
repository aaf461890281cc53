//! Streaming, checked where it matters: a 2 GiB blob pushed and pulled through a real
//! `berth` process must not raise its peak resident memory past 100 MiB.

use std::io::Read;
use std::path::Path;

use berth_oci::{Algorithm, DigestHasher};
use berth_testkit::BerthProcess;
use reqwest::StatusCode;

const SIZE: u64 = 2 * 1024 * 1024 * 1024;

/// Deterministic pseudo-random bytes of a fixed length, generated on the fly so the test
/// itself never holds the blob either.
struct Generated {
    left: u64,
    state: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 {
            self.left.min(buf.len() as u64) as usize
        } else {
            n
        };
        for chunk in buf[..n].chunks_mut(8) {
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn digest_of_generated() -> String {
    let mut reader = Generated {
        left: SIZE,
        state: 1,
    };
    let mut hasher = DigestHasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish().to_string();
        }
        hasher.update(&buf[..n]);
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn two_gib_push_and_pull_stay_under_100_mib_rss() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data_dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    let digest = digest_of_generated();

    let body = reqwest::blocking::Body::sized(
        Generated {
            left: SIZE,
            state: 1,
        },
        SIZE,
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/v2/big/blob/blobs/uploads/?digest={digest}"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let mut r = client
        .get(format!("{base}/v2/big/blob/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut hasher = DigestHasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    assert_eq!(total, SIZE);
    assert_eq!(hasher.finish().to_string(), digest);

    let peak = peak_rss_kib(server.pid());
    eprintln!("peak RSS after a 2 GiB push and pull: {} MiB", peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    server.kill();
}
