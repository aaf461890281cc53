//! Blob downloads over real connections, both ways a blob file goes out (copied through a
//! read-ahead thread, the default, and handed to `sendfile`): whole blobs and ranges that
//! cross the slices and chunks, several responses in a row on one keep-alive connection
//! (the framing must survive a file body), and clients that leave mid-download.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::{http, push_blob, sha256};

/// Deterministic bytes of a given length, different at every offset.
fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect()
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: status, headers (lowercase
/// names), body.
fn read_response(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    (status, headers, body)
}

fn get(path: &str, host: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

/// A registry on this suite's backends, sending blob files with `sendfile` or not.
fn start(sendfile: bool) -> berth_testkit::TestRegistry {
    crate::start_opts(berth_testkit::Options {
        sendfile,
        ..Default::default()
    })
}

#[test]
fn large_blobs_whole_ranged_and_back_to_back_on_one_connection() {
    for sendfile in [false, true] {
        whole_ranged_and_back_to_back(sendfile);
    }
}

fn whole_ranged_and_back_to_back(sendfile: bool) {
    let reg = start(sendfile);
    let base = reg.url();
    // Three slices and an odd tail; pushed in one request, so written with direct I/O and
    // not in the page cache when first read.
    let data = pattern(9 * 1024 * 1024 + 12_345);
    let digest = push_blob(&base, "dl/big", &data);
    let small = b"a small blob".to_vec();
    let small_digest = push_blob(&base, "dl/big", &small);
    let host = base.trim_start_matches("http://").to_owned();
    let blob = format!("/v2/dl/big/blobs/{digest}");

    let stream = TcpStream::connect(&host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);

    // Pipelined: whole blob, a range across two slice boundaries, the small blob, a HEAD,
    // a suffix range, and the API base; each answer must be exactly right and in order.
    let start = 4 * 1024 * 1024 - 10;
    let end = 8 * 1024 * 1024 + 10;
    let requests = [
        get(&blob, &host, ""),
        get(&blob, &host, &format!("Range: bytes={start}-{end}\r\n")),
        get(&format!("/v2/dl/big/blobs/{small_digest}"), &host, ""),
        format!("HEAD {blob} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        get(&blob, &host, "Range: bytes=-5000\r\n"),
        get("/v2/", &host, ""),
    ];
    writer.write_all(requests.concat().as_bytes()).unwrap();

    let (status, _, body) = read_response(&mut reader);
    assert_eq!(status, 200);
    assert!(body == data, "whole blob differs");
    assert_eq!(sha256(&body), digest);

    let (status, headers, body) = read_response(&mut reader);
    assert_eq!(status, 206);
    assert!(headers.contains(&(
        "content-range".to_owned(),
        format!("bytes {start}-{end}/{}", data.len())
    )));
    assert!(body == data[start..=end], "range differs");

    let (status, _, body) = read_response(&mut reader);
    assert_eq!((status, body), (200, small.clone()));

    // HEAD: the length, no body (read_response must not read one).
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = Some(v.trim().to_owned());
        }
    }
    assert_eq!(length, Some(data.len().to_string()));

    let (status, _, body) = read_response(&mut reader);
    assert_eq!(status, 206);
    assert!(body == data[data.len() - 5000..], "suffix range differs");

    let (status, _, body) = read_response(&mut reader);
    assert_eq!((status, body), (200, b"{}".to_vec()));
}

#[test]
fn clients_leaving_mid_download_do_not_disturb_others() {
    for sendfile in [false, true] {
        leaving_mid_download(sendfile);
    }
}

fn leaving_mid_download(sendfile: bool) {
    let reg = start(sendfile);
    let base = reg.url();
    let data = pattern(24 * 1024 * 1024);
    let digest = push_blob(&base, "dl/leave", &data);
    let host = base.trim_start_matches("http://").to_owned();
    let blob = format!("/v2/dl/leave/blobs/{digest}");

    // Ten clients read a little of the blob and hang up.
    for _ in 0..10 {
        let mut stream = TcpStream::connect(&host).unwrap();
        stream.write_all(get(&blob, &host, "").as_bytes()).unwrap();
        let mut some = vec![0u8; 256 * 1024];
        stream.read_exact(&mut some).unwrap();
        drop(stream);
    }
    // A client that stops reading (its socket buffer full) while others download.
    let mut stalled = TcpStream::connect(&host).unwrap();
    stalled.write_all(get(&blob, &host, "").as_bytes()).unwrap();

    let threads: Vec<_> = (0..3)
        .map(|_| {
            let url = format!("{base}{blob}");
            std::thread::spawn(move || http().get(url).send().unwrap().bytes().unwrap())
        })
        .collect();
    for t in threads {
        let body = t.join().unwrap();
        assert!(body[..] == data[..], "a concurrent download differs");
    }
    // The stalled client, reading at last, still gets every byte in order.
    let mut reader = BufReader::new(stalled);
    let (status, _, body) = read_response(&mut reader);
    assert_eq!(status, 200);
    assert!(body == data, "the stalled download differs");
}
