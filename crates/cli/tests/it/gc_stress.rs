//! Concurrency stress: writers push images that share base layers, a deleter deletes some,
//! and garbage collection runs in a loop with a short grace period, all at once. At the
//! end every remaining tag must pull completely and verify, and every stored blob must hash
//! to its name. Bounded in time; `BERTH_STRESS_SECS` and `BERTH_STRESS_WRITERS` make it
//! bigger (see README).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::{http, image_manifest, pull_problems, run_gc, sha256};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Counters {
    pushes: AtomicU64,
    retries: AtomicU64,
    deletes: AtomicU64,
    collections: AtomicU64,
    blobs_removed: AtomicU64,
}

/// How long past the run's end a push may keep hearing that its digest is being deleted.
/// The last collection starts before the run's end and finishes within a second here; a
/// digest busy for longer means a collection stopped half-way (the collector thread's own
/// failure is then reported at its join).
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

/// Pushes one blob the way clients do: HEAD first, upload if absent, retry (after a short
/// pause) when the registry says a collection is deleting the same digest.
fn ensure_blob(base: &str, repo: &str, bytes: &[u8], counters: &Counters, give_up: Instant) {
    let digest = sha256(bytes);
    loop {
        if http()
            .head(format!("{base}/v2/{repo}/blobs/{digest}"))
            .send()
            .unwrap()
            .status()
            == StatusCode::OK
        {
            return;
        }
        let r = http()
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
            .body(bytes.to_vec())
            .send()
            .unwrap();
        match r.status() {
            StatusCode::CREATED => return,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    Instant::now() < give_up,
                    "{digest} was still being deleted {BUSY_PATIENCE:?} after the run's end"
                );
                std::thread::sleep(Duration::from_millis(20));
                counters.retries.fetch_add(1, Ordering::Relaxed)
            }
            other => panic!(
                "blob upload answered {other}: {}",
                r.text().unwrap_or_default()
            ),
        };
    }
}

fn layer(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn concurrent_push_delete_and_gc_lose_nothing() {
    let secs = env_number("BERTH_STRESS_SECS", 6);
    let writers = env_number("BERTH_STRESS_WRITERS", 3);
    // No grace at all: only the transactional protocol stands between a push and a sweep,
    // which is the hardest case for it.
    let reg = crate::gc::eager_registry();
    let base = reg.url();
    let counters = Arc::new(Counters {
        pushes: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        deletes: AtomicU64::new(0),
        collections: AtomicU64::new(0),
        blobs_removed: AtomicU64::new(0),
    });
    let live: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default(); // (repo, tag, digest)
    let deleted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let bases: Arc<Vec<Vec<u8>>> = Arc::new((0..3).map(|i| layer(1000 + i, 64 * 1024)).collect());

    let mut threads = Vec::new();
    for w in 0..writers {
        let (base, counters, live, bases) =
            (base.clone(), counters.clone(), live.clone(), bases.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let repo = format!("stress/app{}", i % 2);
                let tag = format!("w{w}-{i}");
                let shared = &bases[(i % 3) as usize];
                let unique = layer(w * 1_000_000 + i, 16 * 1024);
                let config = format!("{{\"writer\":{w},\"image\":{i}}}").into_bytes();
                loop {
                    for blob in [shared.as_slice(), unique.as_slice(), config.as_slice()] {
                        ensure_blob(&base, &repo, blob, &counters, deadline + BUSY_PATIENCE);
                    }
                    let manifest = image_manifest(
                        (&sha256(&config), config.len()),
                        &[
                            (&sha256(shared), shared.len()),
                            (&sha256(&unique), unique.len()),
                        ],
                    );
                    let r = http()
                        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
                        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                        .body(manifest.clone())
                        .send()
                        .unwrap();
                    match r.status() {
                        StatusCode::CREATED => {
                            live.lock().unwrap().push((
                                repo.clone(),
                                tag.clone(),
                                sha256(&manifest),
                            ));
                            counters.pushes.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // A collection swept a blob between our HEAD and the manifest: the
                        // manifest is refused, never accepted with a hole; push again.
                        StatusCode::BAD_REQUEST => {
                            let body = r.text().unwrap_or_default();
                            assert!(body.contains("MANIFEST_BLOB_UNKNOWN"), "{body}");
                            counters.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("manifest push answered {other}"),
                    }
                }
                i += 1;
            }
        }));
    }
    {
        let (base, counters, live, deleted) = (
            base.clone(),
            counters.clone(),
            live.clone(),
            deleted.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let victim = {
                    let mut live = live.lock().unwrap();
                    n += 7;
                    // Delete about one image in three.
                    let pushed = counters.pushes.load(Ordering::Relaxed);
                    if live.len() < 4 || counters.deletes.load(Ordering::Relaxed) * 3 >= pushed {
                        None
                    } else {
                        let index = n % live.len();
                        Some(live.remove(index))
                    }
                };
                match victim {
                    Some((repo, tag, digest)) => {
                        let r = http()
                            .delete(format!("{base}/v2/{repo}/manifests/{digest}"))
                            .send()
                            .unwrap();
                        assert_eq!(r.status(), StatusCode::ACCEPTED);
                        deleted.lock().unwrap().push((repo, tag));
                        counters.deletes.fetch_add(1, Ordering::Relaxed);
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
    }
    {
        // With no grace at all, an image whose pieces are unreferenced until its manifest
        // lands can lose a piece to every pass: a collector that never pauses starves the
        // writers (that is what the grace period is for). So after each pass it waits for
        // one image to land (or 300 ms), racing the writers still in flight; and it stops
        // with the run, so that every writer finishes the image it is on.
        let (base, counters) = (base.clone(), counters.clone());
        threads.push(std::thread::spawn(move || {
            while Instant::now() < deadline {
                let report = run_gc(&base, "delete_untagged=true");
                counters.collections.fetch_add(1, Ordering::Relaxed);
                counters.blobs_removed.fetch_add(
                    report["blobs_removed"].as_array().unwrap().len() as u64,
                    Ordering::Relaxed,
                );
                let (pushed, paused) = (counters.pushes.load(Ordering::Relaxed), Instant::now());
                while counters.pushes.load(Ordering::Relaxed) == pushed
                    && paused.elapsed() < Duration::from_millis(300)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }
    for t in threads {
        t.join().expect("worker panicked");
    }
    // One last collection after the dust settles.
    let last = run_gc(&base, "delete_untagged=true");
    counters.blobs_removed.fetch_add(
        last["blobs_removed"].as_array().unwrap().len() as u64,
        Ordering::Relaxed,
    );

    let live = live.lock().unwrap();
    let mut lost = Vec::new();
    for (repo, tag, _) in live.iter() {
        lost.extend(pull_problems(&base, repo, tag));
    }
    for (repo, tag) in deleted.lock().unwrap().iter() {
        let r = http()
            .head(format!("{base}/v2/{repo}/manifests/{tag}"))
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "{repo}:{tag} was deleted"
        );
    }
    // Every stored blob verifies against its name (on the file system; in S3 the tags
    // verified above read every referenced blob back).
    let mut stored = 0;
    let root = reg.data_dir().join("blobs/sha256");
    if crate::BLOBS == berth_testkit::BlobBackend::Filesystem {
        for prefix in std::fs::read_dir(&root).unwrap() {
            for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                let file = blob.unwrap().path();
                let bytes = std::fs::read(&file).unwrap();
                assert_eq!(
                    sha256(&bytes)[7..],
                    *file.file_name().unwrap().to_str().unwrap(),
                    "stored blob verifies"
                );
                stored += 1;
            }
        }
    }
    let shared_digest = sha256(&bases[0]);
    eprintln!(
        "stress: {secs}s, {writers} writers: {} pushes ({} retries), {} deletes, {} collections removing {} blobs; \
         {} tags verified, {} blobs stored, {} lost blobs (shared base {})",
        counters.pushes.load(Ordering::Relaxed),
        counters.retries.load(Ordering::Relaxed),
        counters.deletes.load(Ordering::Relaxed),
        counters.collections.load(Ordering::Relaxed),
        counters.blobs_removed.load(Ordering::Relaxed),
        live.len(),
        stored,
        lost.len(),
        &shared_digest[..19],
    );
    assert!(
        counters.pushes.load(Ordering::Relaxed) > 0
            && counters.collections.load(Ordering::Relaxed) > 0
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
}
