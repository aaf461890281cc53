//! Upload sessions: POST/PATCH/PUT, status, cancel, out-of-order chunks, wrong digests and
//! bodies that break off.

use std::io::{Read, Write};
use std::net::TcpStream;

use berth_oci::{Algorithm, DigestHasher};
use reqwest::StatusCode;

use crate::{assert_oci_error, header, http, sha256};

fn start(base: &str, repo: &str) -> String {
    let r = http()
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-0");
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    let location = header(&r, "location");
    assert!(
        location.starts_with(&format!("/v2/{repo}/blobs/uploads/")),
        "{location}"
    );
    format!("{base}{location}")
}

#[test]
fn chunked_upload_with_status_and_out_of_order_chunks() {
    let reg = crate::start();
    let base = reg.url();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = sha256(&data);
    let location = start(&base, "team/app");

    let r = http()
        .patch(&location)
        .header("content-type", "application/octet-stream")
        .header("content-range", "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-99999");
    let location = format!("{base}{}", header(&r, "location"));

    // A chunk that skips ahead is refused with the current range.
    let r = http()
        .patch(&location)
        .header("content-range", "200000-299999")
        .body(data[200_000..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "range"), "0-99999");
    // So is one that rewinds.
    let r = http()
        .patch(&location)
        .header("content-range", "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID");

    let r = http().get(&location).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-99999");
    assert!(header(&r, "location").contains("/blobs/uploads/"));

    // A streamed chunk without Content-Range is appended at the end.
    let r = http()
        .patch(&location)
        .body(data[100_000..200_000].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-199999");

    // The last chunk rides on the PUT.
    let r = http()
        .put(format!("{location}?digest={digest}"))
        .header("content-range", "200000-299999")
        .body(data[200_000..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/team/app/blobs/{digest}")
    );
    assert_eq!(header(&r, "docker-content-digest"), digest);

    let r = http()
        .get(format!("{base}/v2/team/app/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    // The finished session is gone.
    let r = http().get(&location).send().unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn post_then_put_and_sha512() {
    let reg = crate::start();
    let base = reg.url();
    let location = start(&base, "team/app");
    let body = b"monolithic after POST".to_vec();
    let digest = sha256(&body);
    let r = http()
        .put(format!("{location}?digest={digest}"))
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let location = start(&base, "team/app");
    let mut h = DigestHasher::new(Algorithm::Sha512);
    h.update(b"sha512 content");
    let d512 = h.finish().to_string();
    let r = http()
        .patch(&location)
        .body(b"sha512 content".to_vec())
        .send()
        .unwrap();
    let location = format!("{base}{}", header(&r, "location"));
    let r = http()
        .put(format!("{location}?digest={d512}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!("{base}/v2/team/app/blobs/{d512}"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), b"sha512 content");

    // Monolithic POST of an empty blob.
    let empty = sha256(b"");
    let r = http()
        .post(format!("{base}/v2/team/app/blobs/uploads/?digest={empty}"))
        .body(Vec::new())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .head(format!("{base}/v2/team/app/blobs/{empty}"))
        .send()
        .unwrap();
    assert_eq!(header(&r, "content-length"), "0");
}

#[test]
fn wrong_digest_is_refused_and_nothing_is_published() {
    let reg = crate::start();
    let base = reg.url();
    let claimed = sha256(b"what the client claims");
    let r = http()
        .post(format!(
            "{base}/v2/team/app/blobs/uploads/?digest={claimed}"
        ))
        .body(b"other bytes".to_vec())
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    assert_eq!(
        http()
            .head(format!("{base}/v2/team/app/blobs/{claimed}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let actual = sha256(b"other bytes");
    assert_eq!(
        http()
            .head(format!("{base}/v2/team/app/blobs/{actual}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    let location = start(&base, "team/app");
    http()
        .patch(&location)
        .body(b"chunk".to_vec())
        .send()
        .unwrap();
    let r = http()
        .put(format!("{location}?digest={claimed}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    // The session survives a wrong digest, so the client can finish it correctly.
    let r = http()
        .put(format!("{location}?digest={}", sha256(b"chunk")))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let location = start(&base, "team/app");
    let r = http()
        .put(format!("{location}?digest=sha256:short"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let r = http().put(&location).send().unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let r = http()
        .post(format!("{base}/v2/team/app/blobs/uploads/?digest=md5:abc"))
        .body(b"x".to_vec())
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

#[test]
fn bad_content_range_and_unknown_sessions() {
    let reg = crate::start();
    let base = reg.url();
    let location = start(&base, "team/app");
    for bad in ["abc", "5-1", "-5", "0-"] {
        let r = http()
            .patch(&location)
            .header("content-range", bad)
            .body(b"hello".to_vec())
            .send()
            .unwrap();
        assert_oci_error(r, StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID");
    }
    // Content-Range that disagrees with the body's length.
    let r = http()
        .patch(&location)
        .header("content-range", "0-9")
        .body(b"hello".to_vec())
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "SIZE_INVALID");
    let r = http().get(&location).send().unwrap();
    assert_eq!(header(&r, "range"), "0-0", "nothing was written");

    let unknown = format!("{base}/v2/team/app/blobs/uploads/2b0ac5a6-0000-4000-8000-000000000000");
    for r in [
        http().get(&unknown).send().unwrap(),
        http().patch(&unknown).body(b"x".to_vec()).send().unwrap(),
        http()
            .put(format!("{unknown}?digest={}", sha256(b"x")))
            .send()
            .unwrap(),
        http().delete(&unknown).send().unwrap(),
        http()
            .get(format!("{base}/v2/team/app/blobs/uploads/..%2f..%2fetc"))
            .send()
            .unwrap(),
        http()
            .get(format!("{base}/v2/team/app/blobs/uploads/not-a-uuid"))
            .send()
            .unwrap(),
    ] {
        assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    }

    // A session belongs to its repository.
    let foreign = location.replace("/team/app/", "/team/other/");
    let r = http().patch(&foreign).body(b"x".to_vec()).send().unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");

    // Cancel.
    let r = http().delete(&location).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = http().get(&location).send().unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

/// A client that promises more bytes than it sends and hangs up: the bytes that arrived
/// stay in the session, nothing is published, and the client can resume from the offset.
#[test]
fn truncated_body_keeps_a_resumable_session() {
    let reg = crate::start();
    let base = reg.url();
    let location = start(&base, "team/app");
    let path = location.trim_start_matches(&base).to_owned();
    let data = vec![7u8; 64 * 1024];
    let digest = sha256(&data);
    {
        let mut conn = TcpStream::connect(reg.host()).unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            reg.host(),
            data.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&data[..20_000]).unwrap();
        conn.flush().unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
    }
    let mut held = 0u64;
    assert!(
        berth_testkit::wait_until(std::time::Duration::from_secs(5), || {
            let r = http().get(&location).send().unwrap();
            held = header(&r, "range")
                .split('-')
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                + 1;
            held == 20_000
        }),
        "session holds the bytes that arrived, got {held}"
    );
    assert_eq!(
        http()
            .head(format!("{base}/v2/team/app/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let r = http()
        .patch(&location)
        .header("content-range", format!("20000-{}", data.len() - 1))
        .body(data[20_000..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = http()
        .put(format!("{location}?digest={digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// Sends a chunk at `start` and returns where the next one goes, checking the range.
fn patch_chunk(base: &str, location: &str, start: usize, bytes: &[u8]) -> String {
    let end = start + bytes.len() - 1;
    let r = http()
        .patch(location)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("{start}-{end}"))
        .body(bytes.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), format!("0-{end}"));
    format!("{base}{}", header(&r, "location"))
}

/// Chunks smaller than, equal to and larger than the object store's multipart part
/// (8 MiB), one of them broken off in the middle of a part, make exactly the pushed
/// bytes: on S3, whole parts go out as they fill and the rest waits in the session.
#[test]
fn chunks_of_any_size_across_part_boundaries_and_a_break() {
    const MIB: usize = 1024 * 1024;
    let reg = crate::start();
    let base = reg.url();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..26 * MIB + 123)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let digest = sha256(&data);
    let mut location = start(&base, "team/big");
    location = patch_chunk(&base, &location, 0, &data[..1]);
    location = patch_chunk(&base, &location, 1, &data[1..3 * MIB]);

    // 12 MiB announced, 10 MiB sent, then the connection ends: a part went out, the
    // rest of what arrived is kept too.
    let path = location.trim_start_matches(&base).to_owned();
    {
        let mut conn = TcpStream::connect(reg.host()).unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: {}-{}\r\nContent-Length: {}\r\n\r\n",
            reg.host(),
            3 * MIB,
            15 * MIB - 1,
            12 * MIB
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&data[3 * MIB..13 * MIB]).unwrap();
        conn.flush().unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
    }
    let mut held = 0usize;
    assert!(
        berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
            let r = http().get(&location).send().unwrap();
            held = header(&r, "range")
                .split('-')
                .nth(1)
                .and_then(|end| end.parse::<usize>().ok())
                .map_or(0, |end| end + 1);
            held == 13 * MIB
        }),
        "the session holds what arrived, got {held}"
    );
    location = patch_chunk(&base, &location, 13 * MIB, &data[13 * MIB..21 * MIB]);
    location = patch_chunk(&base, &location, 21 * MIB, &data[21 * MIB..26 * MIB + 7]);
    let r = http()
        .put(format!("{location}?digest={digest}"))
        .header(
            "content-range",
            format!("{}-{}", 26 * MIB + 7, data.len() - 1),
        )
        .body(data[26 * MIB + 7..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let blob = format!("{base}/v2/team/big/blobs/{digest}");
    let r = http().get(&blob).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256(&r.bytes().unwrap()), digest);
    for boundary in [8 * MIB, 16 * MIB, 24 * MIB] {
        let r = http()
            .get(&blob)
            .header("range", format!("bytes={}-{}", boundary - 5, boundary + 4))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            r.bytes().unwrap().as_ref(),
            &data[boundary - 5..boundary + 5]
        );
    }
    let r = http().get(&location).send().unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn a_blob_pushed_whole_is_published_and_a_refused_one_stays_in_its_session() {
    let reg = crate::start();
    let base = reg.url();
    // On the file system such a blob never gets an entry in `uploads/` (an anonymous file
    // is linked into place), which the directory's modification time shows.
    let on_disk = crate::BLOBS == berth_testkit::BlobBackend::Filesystem;
    let uploads = reg.data_dir().join("uploads");
    let changed = || on_disk.then(|| std::fs::metadata(&uploads).unwrap().modified().unwrap());
    // Past the clock tick in which the registry made the directory.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = changed();

    // POST, then PUT with the whole body; and a single POST with `?digest=`.
    let config = b"{\"architecture\":\"amd64\"}".to_vec();
    let location = start(&base, "team/app");
    let r = http()
        .put(format!("{location}?digest={}", sha256(&config)))
        .body(config.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let layer: Vec<u8> = (0..65_536u32).map(|i| (i * 13 % 251) as u8).collect();
    let r = http()
        .post(format!(
            "{base}/v2/team/app/blobs/uploads/?digest={}",
            sha256(&layer)
        ))
        .body(layer.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(changed(), before, "no entry was made in uploads/");
    for bytes in [&config, &layer] {
        let r = http()
            .get(format!("{base}/v2/team/app/blobs/{}", sha256(bytes)))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().unwrap().as_ref(), bytes.as_slice());
    }

    // A whole body under the wrong digest is refused and kept in its session, as a chunk
    // is: the session is then finished with the right digest and no body.
    let body = b"the bytes themselves".to_vec();
    let location = start(&base, "team/app");
    let r = http()
        .put(format!("{location}?digest={}", sha256(b"something else")))
        .body(body.clone())
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let r = http()
        .put(format!("{location}?digest={}", sha256(&body)))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!("{base}/v2/team/app/blobs/{}", sha256(&body)))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), body.as_slice());
    if on_disk {
        assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);
    }
}
