//! Several berth nodes sharing one PostgreSQL schema and one blob store (a prefix in the
//! S3 bucket, or a shared directory without Garage): what one node accepts, every node serves; an upload may move between nodes
//! mid-way; concurrent pushes of the same layers through different nodes and a collection
//! on one node while another pushes lose nothing; background jobs take turns by lease.

use std::time::{Duration, Instant};

use berth_meta::{Database, MaintenanceStore};
use berth_registry::GcOptions;
use berth_testkit::{shared_cluster, unique_schema, MetaBackend, Options, TestRegistry};
use reqwest::StatusCode;
use serde_json::Value;

use crate::{header, http, pull_problems, push_blob, push_image, sha256};

/// `n` nodes on one new schema of the shared cluster and one data directory; `None`
/// without PostgreSQL (locally).
fn nodes(n: usize, gc: GcOptions) -> Option<(Vec<TestRegistry>, tempfile::TempDir, String)> {
    shared_cluster()?;
    let dir = tempfile::tempdir().unwrap();
    let schema = unique_schema();
    let nodes = (0..n)
        .map(|_| {
            TestRegistry::start_opts(Options {
                meta: MetaBackend::Postgres,
                postgres_schema: Some(schema.clone()),
                data_dir: Some(dir.path().to_owned()),
                blobs: crate::BLOBS,
                s3_prefix: Some(schema.clone()),
                gc: gc.clone(),
                ..Options::default()
            })
        })
        .collect();
    Some((nodes, dir, schema))
}

#[test]
fn what_one_node_accepts_every_node_serves_and_uploads_move_between_nodes() {
    let Some((nodes, _dir, _)) = nodes(3, GcOptions::default()) else {
        return;
    };
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (digest, _) = push_image(&a.url(), "team/app", "v1", &[b"layer one", b"layer two"]);
    for node in &nodes {
        assert!(pull_problems(&node.url(), "team/app", "v1").is_empty());
        let catalog: Value = http()
            .get(format!("{}/v2/_catalog", node.url()))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(catalog["repositories"], serde_json::json!(["team/app"]));
    }
    let r = http()
        .delete(format!("{}/v2/team/app/manifests/{digest}", b.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = http()
        .get(format!("{}/v2/team/app/manifests/v1", c.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A chunked upload: opened on A, a chunk through A, a chunk through B, status on C,
    // finished on A.
    let blob: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (first, second) = blob.split_at(1024 * 1024 + 17);
    let r = http()
        .post(format!("{}/v2/team/app/blobs/uploads/", a.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    let patch = |node: &TestRegistry, start: usize, chunk: &[u8]| {
        http()
            .patch(format!("{}{location}", node.url()))
            .header(
                "content-range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .header("content-type", "application/octet-stream")
            .body(chunk.to_vec())
            .send()
            .unwrap()
    };
    assert_eq!(patch(a, 0, first).status(), StatusCode::ACCEPTED);
    let r = patch(b, first.len(), second);
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().unwrap_or_default()
    );
    let r = http().get(format!("{}{location}", c.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), format!("0-{}", blob.len() - 1));
    let r = http()
        .put(format!("{}{location}?digest={}", a.url(), sha256(&blob)))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().unwrap_or_default()
    );
    let got = http()
        .get(format!("{}/v2/team/app/blobs/{}", c.url(), sha256(&blob)))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(sha256(&got), sha256(&blob));
}

#[test]
fn a_manifest_deleted_through_one_node_is_not_served_by_another_past_the_cache_ttl() {
    let Some((nodes, _dir, _)) = nodes(2, GcOptions::default()) else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    let (digest, _) = push_image(&a.url(), "team/app", "v1", &[b"a cached layer"]);
    let get = |node: &TestRegistry| {
        http()
            .get(format!("{}/v2/team/app/manifests/{digest}", node.url()))
            .send()
            .unwrap()
            .status()
    };
    // Both nodes now hold a copy.
    assert_eq!(get(a), StatusCode::OK);
    assert_eq!(get(b), StatusCode::OK);
    let r = http()
        .delete(format!("{}/v2/team/app/manifests/{digest}", a.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let deleted = Instant::now();
    assert_eq!(get(a), StatusCode::NOT_FOUND, "the deleting node at once");
    // The other serves its copy, read before the deletion, for less than the TTL after
    // it: an OK for a request sent later than that would be a copy kept too long.
    loop {
        let sent = Instant::now();
        match get(b) {
            StatusCode::NOT_FOUND => break,
            StatusCode::OK => assert!(
                sent.duration_since(deleted) < berth_registry::MANIFEST_CACHE_TTL,
                "served {:?} after the deletion",
                sent.duration_since(deleted)
            ),
            other => panic!("{other}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // And by tag no node ever served it after the deletion: tags are never cached.
    assert_eq!(
        http()
            .get(format!("{}/v2/team/app/manifests/v1", b.url()))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn concurrent_pushes_of_shared_layers_through_different_nodes() {
    let Some((nodes, _dir, _)) = nodes(2, GcOptions::default()) else {
        return;
    };
    let urls: Vec<String> = nodes.iter().map(TestRegistry::url).collect();
    let shared: [&[u8]; 2] = [
        b"base layer shared by every image",
        b"runtime layer shared too",
    ];
    std::thread::scope(|s| {
        for i in 0..8 {
            let url = urls[i % urls.len()].clone();
            s.spawn(move || {
                let own = format!("layer of image {i}");
                push_image(
                    &url,
                    "team/shared",
                    &format!("t{i}"),
                    &[shared[0], shared[1], own.as_bytes()],
                );
            });
        }
    });
    for url in &urls {
        for i in 0..8 {
            let problems = pull_problems(url, "team/shared", &format!("t{i}"));
            assert!(problems.is_empty(), "{problems:?}");
        }
    }
}

#[test]
fn collection_on_one_node_while_another_pushes_keeps_every_tag() {
    let eager = GcOptions {
        blob_grace: Duration::ZERO,
        upload_max_age: Duration::from_secs(3600),
        ..GcOptions::default()
    };
    let Some((nodes, _dir, _)) = nodes(2, eager) else {
        return;
    };
    let (pusher, collector) = (nodes[0].url(), nodes[1].url());
    // At least 12 acknowledged pushes while collections run (bounded by 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let pushing = std::sync::atomic::AtomicBool::new(true);
    let mut acknowledged = Vec::new();
    let mut collections = 0;
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut n = 0;
            while pushing.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http()
                    .post(format!("{collector}/api/v1/gc"))
                    .send()
                    .unwrap();
                assert!(r.status() == StatusCode::OK || r.status() == StatusCode::CONFLICT);
                n += 1;
                // A collection every 50 ms: far more often than any real schedule.
                std::thread::sleep(Duration::from_millis(50));
            }
            n
        });
        let mut i = 0;
        while acknowledged.len() < 12 && Instant::now() < deadline {
            i += 1;
            let tag = format!("p{i}");
            // A push can lose a race with the collection (its blob unlinked before its
            // manifest): the client sees an error and pushes again, as real clients do.
            for _attempt in 0..10 {
                let layer = format!("layer {i}");
                let config = format!(r#"{{"tag":"{tag}"}}"#);
                let ok = [layer.as_bytes(), config.as_bytes()].iter().all(|b| {
                    http()
                        .post(format!(
                            "{pusher}/v2/team/gc/blobs/uploads/?digest={}",
                            sha256(b)
                        ))
                        .body(b.to_vec())
                        .send()
                        .is_ok_and(|r| r.status() == StatusCode::CREATED)
                });
                let manifest = crate::image_manifest(
                    (&sha256(config.as_bytes()), config.len()),
                    &[(&sha256(layer.as_bytes()), layer.len())],
                );
                let put = ok
                    && http()
                        .put(format!("{pusher}/v2/team/gc/manifests/{tag}"))
                        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                        .body(manifest)
                        .send()
                        .is_ok_and(|r| r.status() == StatusCode::CREATED);
                if put {
                    acknowledged.push(tag.clone());
                    break;
                }
            }
        }
        pushing.store(false, std::sync::atomic::Ordering::Relaxed);
        collections = gc.join().unwrap();
    });
    assert!(
        collections > 0 && acknowledged.len() >= 12,
        "{collections} collections, {} pushes",
        acknowledged.len()
    );
    for url in [&pusher, &collector] {
        for tag in &acknowledged {
            let problems = pull_problems(url, "team/gc", tag);
            assert!(problems.is_empty(), "{problems:?}");
        }
    }
}

#[test]
fn collections_take_turns_by_lease() {
    let Some((nodes, _dir, schema)) = nodes(2, GcOptions::default()) else {
        return;
    };
    let url = shared_cluster().unwrap().url().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime
        .block_on(Database::connect_postgres(&url, Some(&schema)))
        .unwrap();
    // Another node is collecting: both of these nodes refuse to start a second collection.
    assert!(runtime
        .block_on(store.try_lease("gc", "elsewhere", 60_000))
        .unwrap());
    for node in &nodes {
        let r = http()
            .post(format!("{}/api/v1/gc", node.url()))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let dry = http()
            .post(format!("{}/api/v1/gc?dry_run=true", node.url()))
            .send()
            .unwrap();
        assert_eq!(dry.status(), StatusCode::OK, "a dry run needs no lease");
    }
    // That node dies: its lease expires and a live node takes over.
    runtime
        .block_on(store.release_lease("gc", "elsewhere"))
        .unwrap();
    assert!(runtime
        .block_on(store.try_lease("gc", "elsewhere", 1))
        .unwrap());
    std::thread::sleep(Duration::from_millis(10));
    push_blob(&nodes[0].url(), "team/lease", b"some blob");
    let r = http()
        .post(format!("{}/api/v1/gc", nodes[1].url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Released after the collection: the other node may run the next one.
    let r = http()
        .post(format!("{}/api/v1/gc", nodes[0].url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn two_berth_processes_share_s3_and_postgres_and_each_others_tokens() {
    use crate::auth::Who;
    use berth_testkit::{shared_garage, BerthProcess};
    let (Some(pg), Some(garage)) = (shared_cluster(), shared_garage()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let schema = unique_schema();
    let s3 = garage.s3_config(&schema);
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[meta]\npostgres_url = \"{}\"\npostgres_schema = \"{schema}\"\n\
             [storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\n\
             bucket = \"{}\"\nprefix = \"{schema}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            pg.url(),
            s3.endpoint.as_deref().unwrap_or_default(),
            s3.region,
            s3.bucket,
            s3.access_key_id,
            s3.secret_access_key
        ),
    )
    .unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let args = ["--config", config.to_str().unwrap()];
    let env = [("BERTH_ADMIN_PASSWORD", "two-node-admin")];
    let a = BerthProcess::spawn_with(binary, &dir.path().join("a"), &args, &env);
    let b = BerthProcess::spawn_with(binary, &dir.path().join("b"), &args, &env);
    let admin = Who::user("admin", "two-node-admin");
    for node in [&a, &b] {
        let r = http().get(format!("{}/readyz", node.url())).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    // Push through A with a token A issued ...
    let token: Value = admin
        .request(
            &http(),
            reqwest::Method::GET,
            &format!(
                "{}/token?service=berth&scope=repository:team/app:pull,push",
                a.url()
            ),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let layer = b"a layer pushed through node A".to_vec();
    let r = http()
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={}",
            a.url(),
            sha256(&layer)
        ))
        .bearer_auth(&token)
        .body(layer.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // ... and pull it through B with the same token: the signing key is shared.
    let r = http()
        .get(format!("{}/v2/team/app/blobs/{}", b.url(), sha256(&layer)))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().unwrap().as_ref(), layer.as_slice());

    // A chunked upload opened on B, continued on A, finished on B.
    let blob: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let (first, second) = blob.split_at(700_001);
    let r = http()
        .post(format!("{}/v2/team/app/blobs/uploads/", b.url()))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    for (node, start, chunk) in [(&b, 0, first), (&a, first.len(), second)] {
        let r = http()
            .patch(format!("{}{location}", node.url()))
            .bearer_auth(&token)
            .header(
                "content-range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = http()
        .put(format!("{}{location}?digest={}", b.url(), sha256(&blob)))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().unwrap_or_default()
    );

    // Maintenance commands work on the shared stores beside the running nodes (their
    // own data directory holds nothing, unless the blobs fell back to the file system).
    std::fs::create_dir_all(dir.path().join("maintenance")).unwrap();
    for command in ["gc", "check"] {
        let out = std::process::Command::new(binary)
            .args([command, "--config", config.to_str().unwrap(), "--data-dir"])
            .arg(dir.path().join("maintenance"))
            .env("BERTH_LOG_LEVEL", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "berth {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(report.is_object(), "{report}");
    }

    // Node A goes away; B serves everything.
    a.kill();
    for digest in [sha256(&layer), sha256(&blob)] {
        let r = http()
            .get(format!("{}/v2/team/app/blobs/{digest}", b.url()))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(sha256(&r.bytes().unwrap()), digest);
    }
}

/// Options in the operator's connection string reach the server beside those berth adds
/// (no JIT, the schema's search path): a read-only default makes creating the schema fail.
#[test]
fn connection_options_in_the_url_are_kept() {
    let Some(cluster) = shared_cluster() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let read_only = format!(
        "{} options='-c default_transaction_read_only=on'",
        cluster.url()
    );
    let refused = runtime
        .block_on(Database::connect_postgres(
            &read_only,
            Some(&unique_schema()),
        ))
        .err()
        .expect("a read-only connection cannot create its schema");
    assert!(refused.to_string().contains("read-only"), "{refused}");
    runtime
        .block_on(Database::connect_postgres(
            cluster.url(),
            Some(&unique_schema()),
        ))
        .expect("the same server without the option");
}

#[test]
fn nodes_sharing_a_store_fetch_a_cold_blob_from_the_upstream_once() {
    use berth_testkit::{HubOptions, HubServer};
    if shared_cluster().is_none() {
        return;
    }
    let hub = HubServer::start(HubOptions::default());
    let layer: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 233) as u8).collect();
    let (_, _, layers) = hub.push_image("library/app", "v1", &[&layer]);
    // Slow enough that both nodes ask while the first fetch runs.
    hub.throttle(Some(4 * 1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let schema = unique_schema();
    let webhooks = berth_webhooks::WebhookSettings {
        outbound: berth_outbound::OutboundPolicy::allowing(&["127.0.0.0/8"]).unwrap(),
        ..Default::default()
    };
    let nodes: Vec<TestRegistry> = (0..2)
        .map(|_| {
            TestRegistry::start_opts(Options {
                meta: MetaBackend::Postgres,
                postgres_schema: Some(schema.clone()),
                data_dir: Some(dir.path().to_owned()),
                blobs: crate::BLOBS,
                s3_prefix: Some(schema.clone()),
                webhooks: Some(webhooks.clone()),
                ..Options::default()
            })
        })
        .collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    let r = http()
        .post(format!("{}/api/v1/projects", a.url()))
        .json(&serde_json::json!({"name": "hub", "proxy_cache": {"urls": [hub.url()]}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // The other node follows the stored settings within its reload period.
    let followed = berth_testkit::wait_until(Duration::from_secs(15), || {
        http()
            .get(format!("{}/api/v1/projects/hub/proxy-cache", b.url()))
            .send()
            .is_ok_and(|r| r.status() == StatusCode::OK)
    });
    assert!(followed, "node b never served the cache");
    let pulls: Vec<_> = [a.url(), b.url(), a.url(), b.url()]
        .into_iter()
        .map(|base| {
            let url = format!("{base}/v2/hub/library/app/blobs/{}", layers[0]);
            std::thread::spawn(move || sha256(&http().get(url).send().unwrap().bytes().unwrap()))
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.join().unwrap(), layers[0]);
    }
    let fetched = hub.fetches(&layers[0]);
    assert_eq!(
        fetched,
        1,
        "one upstream fetch for two nodes: {:?}",
        hub.requests()
    );
}

/// PUTs of manifests the registry at `base` answered.
fn manifest_puts(base: &str) -> u64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("berth_http_requests_total")
                && l.contains("route=\"/v2/{name}/manifests/{reference}\"")
                && l.contains("method=\"PUT\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn replication_runs_each_task_on_one_node_and_follows_pushes_to_any_node() {
    if shared_cluster().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let schema = unique_schema();
    let webhooks = berth_webhooks::WebhookSettings {
        outbound: berth_outbound::OutboundPolicy::allowing(&["127.0.0.0/8"]).unwrap(),
        ..Default::default()
    };
    let nodes: Vec<TestRegistry> = (0..2)
        .map(|_| {
            TestRegistry::start_opts(Options {
                meta: MetaBackend::Postgres,
                postgres_schema: Some(schema.clone()),
                data_dir: Some(dir.path().to_owned()),
                blobs: crate::BLOBS,
                s3_prefix: Some(schema.clone()),
                webhooks: Some(webhooks.clone()),
                ..Options::default()
            })
        })
        .collect();
    let (a, b) = (nodes[0].url(), nodes[1].url());
    let target = TestRegistry::start();
    let mut images = Vec::new();
    for i in 0..12 {
        let base = if i % 2 == 0 { &a } else { &b };
        let tag = format!("v{i}");
        let layer = format!("layer {i}");
        let (digest, _) = push_image(base, "team/app", &tag, &[layer.as_bytes()]);
        images.push((tag, digest));
    }
    let r = http()
        .post(format!("{a}/api/v1/registries"))
        .json(&serde_json::json!({"name": "target", "url": target.url()}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .post(format!("{a}/api/v1/replication/policies"))
        .json(
            &serde_json::json!({"name": "all", "direction": "push", "registry": "target",
                                  "source": "team/**", "concurrency": 4}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Started through the other node: both work on it, each task once.
    let url = format!("{b}/api/v1/replication/policies/all/executions");
    let r = http().post(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
    let mut run = Value::Null;
    let ended = berth_testkit::wait_until(Duration::from_secs(60), || {
        run = http().get(&url).send().unwrap().json::<Value>().unwrap()[0].clone();
        run["status"] != "running"
    });
    assert!(ended, "{run}");
    assert_eq!(run["succeeded"], 12, "{run}");
    assert!(
        run["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["attempts"] == 1),
        "{run}"
    );
    assert_eq!(manifest_puts(&target.url()), 12, "each image stored once");
    for (tag, digest) in &images {
        let r = http()
            .head(format!("{}/v2/team/app/manifests/{tag}", target.url()))
            .header("accept", berth_client::MANIFEST_TYPES)
            .send()
            .unwrap();
        assert_eq!(header(&r, "docker-content-digest"), *digest);
    }

    // The event trigger: pushes to either node, each replicated once.
    let r = http()
        .post(format!("{a}/api/v1/replication/policies"))
        .json(
            &serde_json::json!({"name": "follow", "direction": "push", "registry": "target",
                                  "source": "live/**", "trigger": "event"}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut live = Vec::new();
    for i in 0..6 {
        let base = if i % 2 == 0 { &a } else { &b };
        let layer = format!("live {i}");
        let (digest, _) = push_image(base, "live/app", &format!("t{i}"), &[layer.as_bytes()]);
        live.push((format!("t{i}"), digest));
    }
    let arrived = berth_testkit::wait_until(Duration::from_secs(30), || {
        live.iter().all(|(tag, digest)| {
            http()
                .head(format!("{}/v2/live/app/manifests/{tag}", target.url()))
                .header("accept", berth_client::MANIFEST_TYPES)
                .send()
                .is_ok_and(|r| {
                    r.status() == StatusCode::OK && header(&r, "docker-content-digest") == *digest
                })
        })
    });
    assert!(arrived);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        manifest_puts(&target.url()),
        12 + 6,
        "each push replicated once"
    );
}
