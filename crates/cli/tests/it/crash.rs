//! `kill -9` in the middle of a chunked upload: after a restart no partial blob is visible,
//! the session resumes from what reached the disk, and starting over works too.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use berth_testkit::{wait_until, BerthProcess};
use reqwest::StatusCode;

use crate::{header, http, sha256};

fn upload_offset(location: &str) -> u64 {
    let r = http().get(location).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let range = header(&r, "range");
    let end: u64 = range.split('-').nth(1).unwrap().parse().unwrap();
    if end == 0 {
        0
    } else {
        end + 1
    }
}

/// Every published blob hashes to the digest it is stored under.
fn assert_published_blobs_verify(data_dir: &Path) {
    let root = data_dir.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&root) else {
        return;
    };
    for prefix in prefixes {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let file = blob.unwrap().path();
            let bytes = std::fs::read(&file).unwrap();
            let name = file.file_name().unwrap().to_str().unwrap().to_owned();
            assert_eq!(
                sha256(&bytes),
                format!("sha256:{name}"),
                "blob {name} is whole and verified"
            );
        }
    }
}

#[test]
fn kill_during_chunked_upload_then_resume_or_start_over() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data_dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = sha256(&data);
    let chunk = 1024 * 1024;

    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    let r = http()
        .post(format!("{base}/v2/crash/test/blobs/uploads/"))
        .send()
        .unwrap();
    let path = header(&r, "location");
    let r = http()
        .patch(format!("{base}{path}"))
        .header("content-range", format!("0-{}", chunk - 1))
        .body(data[..chunk].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Second chunk (6 MiB) in flight: three quarters of it sent, then the server dies.
    // (Large bodies are written in batches of a few MiB, so some of it reaches the file.)
    let second = 6 * chunk;
    let sent = 3 * second / 4;
    let host = base.trim_start_matches("http://").to_owned();
    let mut conn = TcpStream::connect(&host).unwrap();
    write!(
        conn,
        "PATCH {path} HTTP/1.1\r\nHost: {host}\r\nContent-Range: {chunk}-{}\r\nContent-Length: {}\r\n\r\n",
        chunk + second - 1,
        second
    )
    .unwrap();
    conn.write_all(&data[chunk..chunk + sent]).unwrap();
    conn.flush().unwrap();
    // Wait until the server has written some of it, so the crash lands mid-chunk.
    let staged = std::fs::read_dir(data_dir.path().join("uploads"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(wait_until(Duration::from_secs(10), || std::fs::metadata(
        &staged
    )
    .map(|m| m.len() > chunk as u64)
    .unwrap_or(false)));
    server.kill();
    drop(conn);

    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    let location = format!("{base}{path}");
    assert_eq!(
        http()
            .head(format!("{base}/v2/crash/test/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_published_blobs_verify(data_dir.path());

    // Resume where the disk says the session ends.
    let offset = upload_offset(&location);
    assert!(
        offset > chunk as u64 && offset <= (chunk + sent) as u64,
        "offset {offset}"
    );
    let r = http()
        .patch(&location)
        .header("content-range", format!("{offset}-{}", data.len() - 1))
        .body(data[offset as usize..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "{}", r.text().unwrap());
    let r = http()
        .put(format!("{location}?digest={digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!("{base}/v2/crash/test/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(sha256(&r.bytes().unwrap()), digest);

    // Start over on another repository: a fresh monolithic push of the same bytes.
    let r = http()
        .post(format!(
            "{base}/v2/crash/other/blobs/uploads/?digest={digest}"
        ))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_published_blobs_verify(data_dir.path());
    server.kill();
}

#[test]
fn kill_before_any_upload_finishes_leaves_nothing_published() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data_dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    // Large enough to be written as it arrives (small bodies are gathered in memory and
    // written with the publication), so that a staged file shows the upload under way.
    let data = vec![42u8; 4 * 1024 * 1024];
    let digest = sha256(&data);
    let host = base.trim_start_matches("http://").to_owned();
    let mut conn = TcpStream::connect(&host).unwrap();
    write!(
        conn,
        "POST /v2/crash/mono/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        data.len()
    )
    .unwrap();
    conn.write_all(&data[..1_000_000]).unwrap();
    conn.flush().unwrap();
    let uploads = data_dir.path().join("uploads");
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_dir(
        &uploads
    )
    .map(|mut d| d.next().is_some())
    .unwrap_or(false)));
    server.kill();
    drop(conn);

    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    assert_eq!(
        http()
            .head(format!("{base}/v2/crash/mono/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(!data_dir
        .path()
        .join("blobs/sha256")
        .join(&digest[7..9])
        .exists());
    let r = http()
        .post(format!(
            "{base}/v2/crash/mono/blobs/uploads/?digest={digest}"
        ))
        .body(data)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    server.kill();
}
