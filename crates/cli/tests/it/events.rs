//! The event log's promise, tested across a crash: a consumer reads events through its
//! cursor while pushes run, the server is killed with SIGKILL and started again, and in
//! the end every acknowledged push has exactly one event and no refused push has any.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_meta::{Change, Database, EventLog};
use berth_testkit::{wait_until, BerthProcess};
use reqwest::StatusCode;

use crate::common::{http, image_manifest, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// What the pushing client learned of its attempts, by tag.
#[derive(Default)]
struct Outcomes {
    acknowledged: HashSet<String>,
    refused: HashSet<String>,
}

/// One attempt: a fresh blob and a manifest over it, tagged `t<n>`; every third attempt
/// is a manifest naming a blob that was never pushed (refused with 400), tagged `bad<n>`.
/// Returns the tag and whether it was acknowledged; `None` when the server was unreachable.
fn attempt(base: &str, n: usize) -> Option<(String, bool)> {
    let client = http();
    let layer = format!("layer {n}").into_bytes();
    let layer_digest = sha256(&layer);
    let (tag, layer_ref) = if n.is_multiple_of(3) {
        (
            format!("bad{n}"),
            sha256(format!("never pushed {n}").as_bytes()),
        )
    } else {
        let r = client
            .post(format!(
                "{base}/v2/events/app/blobs/uploads/?digest={layer_digest}"
            ))
            .body(layer.clone())
            .send()
            .ok()?;
        if r.status() != StatusCode::CREATED {
            return None;
        }
        (format!("t{n}"), layer_digest.clone())
    };
    let manifest = image_manifest((&layer_ref, layer.len()), &[(&layer_ref, layer.len())]);
    let r = client
        .put(format!("{base}/v2/events/app/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .ok()?;
    match r.status() {
        StatusCode::CREATED => Some((tag, true)),
        StatusCode::BAD_REQUEST => Some((tag, false)),
        _ => None,
    }
}

/// Pushes until stopped; a connection error (the server is down) ends the attempt
/// unacknowledged, neither refused nor accepted.
fn push_until(base: String, stop: Arc<AtomicBool>, outcomes: Arc<Mutex<Outcomes>>, from: usize) {
    let mut n = from;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        match attempt(&base, n) {
            Some((tag, true)) => {
                outcomes.lock().unwrap().acknowledged.insert(tag);
            }
            Some((tag, false)) => {
                outcomes.lock().unwrap().refused.insert(tag);
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The consumer: reads after its cursor, counts manifest pushes by tag, advances.
struct Consumer {
    db: Database,
    position: i64,
    pushes: HashMap<String, usize>,
    last_seq: i64,
}

impl Consumer {
    async fn open(meta_db: &Path) -> Self {
        let db = Database::open_sqlite(meta_db).expect("open the metadata store");
        let position = db
            .claim_cursor("test-consumer", "test", 600_000)
            .await
            .unwrap()
            .expect("the cursor is free");
        Consumer {
            db,
            position,
            pushes: HashMap::new(),
            last_seq: 0,
        }
    }

    async fn read(&mut self) -> usize {
        let events = self.db.events_after(self.position, 100).await.unwrap();
        for event in &events {
            assert!(event.seq > self.last_seq, "sequence goes up");
            self.last_seq = event.seq;
            if let Change::ManifestPushed {
                tag: Some((tag, _)),
                ..
            } = &event.change
            {
                *self.pushes.entry(tag.clone()).or_default() += 1;
            }
        }
        if let Some(last) = events.last() {
            assert!(self
                .db
                .advance_cursor("test-consumer", "test", last.seq)
                .await
                .unwrap());
            self.position = last.seq;
        }
        events.len()
    }
}

#[test]
fn a_consumer_sees_every_acknowledged_push_once_across_a_kill() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data_dir = tempfile::tempdir().unwrap();
    let meta_db = data_dir.path().join("meta.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));

    let server = BerthProcess::spawn(binary, data_dir.path());
    let mut consumer = runtime.block_on(Consumer::open(&meta_db));
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (base, stop, outcomes) = (server.url(), stop.clone(), outcomes.clone());
        std::thread::spawn(move || push_until(base, stop, outcomes, 0))
    };
    // Read while pushes run, then kill the server in the middle of them.
    assert!(wait_until(Duration::from_secs(60), || {
        runtime.block_on(consumer.read());
        outcomes.lock().unwrap().acknowledged.len() >= 30
    }));
    server.kill();
    stop.store(true, Ordering::Relaxed);
    pusher.join().unwrap();

    // Started again: more pushes, and the consumer goes on from its cursor.
    let server = BerthProcess::spawn(binary, data_dir.path());
    for n in 10_000..10_012 {
        let (tag, acknowledged) = attempt(&server.url(), n).expect("server is up");
        let mut outcomes = outcomes.lock().unwrap();
        if acknowledged {
            outcomes.acknowledged.insert(tag);
        } else {
            outcomes.refused.insert(tag);
        }
    }
    while runtime.block_on(consumer.read()) > 0 {}
    let outcomes = outcomes.lock().unwrap();
    assert!(!outcomes.refused.is_empty());
    for tag in &outcomes.acknowledged {
        assert_eq!(
            consumer.pushes.get(tag),
            Some(&1),
            "acknowledged push {tag}"
        );
    }
    for tag in &outcomes.refused {
        assert_eq!(consumer.pushes.get(tag), None, "refused push {tag}");
    }
    // A push that was in flight at the kill may have committed unacknowledged: then it
    // is recorded once too; never twice, and never a tag nobody pushed.
    for (tag, count) in &consumer.pushes {
        assert_eq!(*count, 1, "{tag}");
        assert!(tag.starts_with('t'), "{tag}");
    }
    drop(server);
}
