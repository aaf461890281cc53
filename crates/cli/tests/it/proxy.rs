//! Pull-through caches (`[[proxy_cache]]`): a berth process whose project `hub` mirrors
//! another registry. The first pull goes upstream once, even for many clients at once;
//! later pulls stay local; a corrupted upstream blob is never stored and never served
//! whole; a cut upstream leaves what was cached pullable; pushes are refused.

use std::path::Path;
use std::sync::Arc;

use berth_testkit::{BerthProcess, CuttableProxy};
use reqwest::StatusCode;

use crate::*;

/// A berth whose `[[proxy_cache]]` tables are `tables` (loopback upstreams allowed).
fn cache(dir: &Path, tables: &str) -> BerthProcess {
    let config = dir.join("berth.toml");
    std::fs::write(
        &config,
        format!("[outbound]\nallow_cidrs = [\"127.0.0.0/8\"]\n\n{tables}"),
    )
    .unwrap();
    BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.join("data"),
        &["--auth", "none", "--config", config.to_str().unwrap()],
        &[],
    )
}

fn table(project: &str, upstream: &str, ttl: u64) -> String {
    format!("[[proxy_cache]]\nproject = \"{project}\"\nurls = [\"{upstream}\"]\ntag_ttl_secs = {ttl}\n\n")
}

/// Requests the upstream berth answered for a route template and method.
fn upstream_requests(upstream: &str, route: &str, method: &str) -> u64 {
    let text = http()
        .get(format!("{upstream}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("berth_http_requests_total")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("method=\"{method}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn get(url: &str) -> reqwest::blocking::Response {
    http()
        .get(url)
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap()
}

#[test]
fn a_proxy_project_fetches_once_then_serves_from_the_cache() {
    let upstream = start();
    let layer: Vec<u8> = (0..6 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
    let (digest, manifest) = push_image(&upstream.url(), "library/app", "v1", &[&layer, b"small"]);
    let dir = tempfile::tempdir().unwrap();
    let berth = cache(dir.path(), &table("hub", &upstream.url(), 300));
    let base = format!("{}/v2/hub/library/app", berth.url());

    let r = get(&format!("{base}/manifests/v1"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().unwrap().to_vec(), manifest);
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers: Vec<String> = parsed["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    // HEAD of a blob not cached yet: answered from an upstream HEAD, nothing fetched.
    let r = http()
        .head(format!("{base}/blobs/{}", layers[0]))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), layer.len().to_string());
    assert_eq!(
        upstream_requests(&upstream.url(), "/v2/{name}/blobs/{digest}", "GET"),
        0
    );

    // One range of a blob not cached: forwarded, answered 206, not cached.
    let r = http()
        .get(format!("{base}/blobs/{}", layers[1]))
        .header("range", "bytes=1-3")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), "bytes 1-3/5");
    assert_eq!(r.bytes().unwrap().as_ref(), b"mal");

    // Many first pulls of the big layer at once: one upstream fetch, every client whole.
    let url = Arc::new(format!("{base}/blobs/{}", layers[0]));
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = http().get(url.as_str()).send().unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                sha256(&r.bytes().unwrap())
            })
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.join().unwrap(), layers[0]);
    }
    assert_eq!(
        upstream_requests(&upstream.url(), "/v2/{name}/blobs/{digest}", "GET"),
        2,
        "the range, and one upstream fetch for eight clients"
    );

    // Pulled again, and the rest: tag within its TTL and cached blobs stay local.
    let before_manifests =
        upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "HEAD")
            + upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "GET");
    for _ in 0..20 {
        assert_eq!(
            get(&format!("{base}/manifests/v1")).status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        sha256(&get(&format!("{base}/blobs/{}", layers[0])).bytes().unwrap()),
        layers[0]
    );
    assert_eq!(
        sha256(&get(&format!("{base}/blobs/{}", layers[1])).bytes().unwrap()),
        layers[1]
    );
    assert_eq!(
        upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "HEAD")
            + upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "GET"),
        before_manifests,
        "a fresh tag is not asked about again"
    );
    assert_eq!(
        upstream_requests(&upstream.url(), "/v2/{name}/blobs/{digest}", "GET"),
        3
    );
    let metrics = get(&format!("{}/metrics", berth.url())).text().unwrap();
    assert!(
        metrics.contains("berth_proxy_misses_total{project=\"hub\"} 4"),
        "manifest, range, two blobs: {metrics}"
    );

    // What the upstream lacks is unknown here too; writes are refused.
    let r = get(&format!("{base}/manifests/nope"));
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let r = http()
        .post(format!("{base}/blobs/uploads/"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    let r = http()
        .delete(format!("{base}/manifests/{digest}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
}

#[test]
fn a_corrupted_upstream_blob_is_never_stored_nor_served_whole() {
    let up_dir = tempfile::tempdir().unwrap();
    let upstream = BerthProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &up_dir.path().join("data"),
    );
    let layer: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
    let (_, manifest) = push_image(&upstream.url(), "library/bad", "v1", &[&layer]);
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let digest = parsed["layers"][0]["digest"].as_str().unwrap().to_owned();
    // Flip one byte of the upstream's stored blob, behind its back.
    let hex = digest.trim_start_matches("sha256:");
    let file = up_dir
        .path()
        .join("data/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1_000_000] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let berth = cache(dir.path(), &table("hub", &upstream.url(), 300));
    let url = format!("{}/v2/hub/library/bad/blobs/{digest}", berth.url());
    for _ in 0..2 {
        let r = http().get(&url).send().unwrap();
        // The status and length went out before the bytes; the body stops short.
        assert!(r.bytes().is_err(), "a body that cannot be whole");
    }
    let r = http().head(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK, "from the upstream's HEAD");
    let metrics = get(&format!("{}/metrics", berth.url())).text().unwrap();
    assert!(
        metrics.contains("berth_proxy_misses_total{project=\"hub\"} 2"),
        "never cached: {metrics}"
    );
    upstream.kill();
}

#[test]
fn a_cut_upstream_leaves_what_was_cached_pullable() {
    let upstream = start();
    let relay = CuttableProxy::start(upstream.host().parse().unwrap());
    let (digest, manifest) = push_image(&upstream.url(), "library/app", "v1", &[b"cached layer"]);
    push_image(&upstream.url(), "library/app", "v2", &[b"never pulled"]);
    let dir = tempfile::tempdir().unwrap();
    // A TTL of 0: every tag pull asks the upstream first.
    let berth = cache(
        dir.path(),
        &table("hub", &format!("http://{}", relay.addr()), 0),
    );
    let base = format!("{}/v2/hub/library/app", berth.url());
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = parsed["layers"][0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&format!("{base}/manifests/v1")).status(),
        StatusCode::OK
    );
    // Read whole: the fill is done (and verified) once the last byte arrives.
    assert_eq!(
        sha256(&get(&format!("{base}/blobs/{layer}")).bytes().unwrap()),
        layer
    );

    relay.cut();
    let r = get(&format!("{base}/manifests/v1"));
    assert_eq!(r.status(), StatusCode::OK, "stale, by tag");
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(
        get(&format!("{base}/manifests/{digest}")).status(),
        StatusCode::OK
    );
    let r = get(&format!("{base}/blobs/{layer}"));
    assert_eq!(r.status(), StatusCode::OK, "{:#?}", berth.log());
    assert_eq!(sha256(&r.bytes().unwrap()), layer);
    let r = get(&format!("{base}/manifests/v2"));
    assert_eq!(
        r.status(),
        StatusCode::BAD_GATEWAY,
        "nothing cached to stand in"
    );
    let metrics = get(&format!("{}/metrics", berth.url())).text().unwrap();
    assert!(
        metrics.contains("berth_proxy_stale_serves_total{project=\"hub\"} 1"),
        "{metrics}"
    );
    relay.restore();
    assert_eq!(
        get(&format!("{base}/manifests/v2")).status(),
        StatusCode::OK
    );
}

#[test]
fn an_upstream_the_outbound_guard_refuses_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, table("hub", "http://127.0.0.1:5000", 300)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "none",
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("hub") && text.contains("127.0.0.1"), "{text}");
    for bad in [
        "file:///etc/passwd",
        "http://user:pw@example.com",
        "http://example.com/v2/x",
    ] {
        std::fs::write(
            &config,
            format!(
                "[outbound]\nallow_cidrs = [\"127.0.0.0/8\"]\n{}",
                table("hub", bad, 1)
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--auth",
                "none",
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} refused");
    }
}

#[test]
fn skopeo_ctr_and_docker_pull_through_the_cache() {
    use berth_testkit::tool;
    use std::process::Command;
    let (Some(umoci), Some(skopeo)) = (tool("umoci"), tool("skopeo")) else {
        eprintln!("skipped: umoci and skopeo are not installed");
        return;
    };
    let upstream = start();
    let work = tempfile::tempdir().unwrap();
    crate::clients::build_layout(&umoci, work.path());
    let source = work.path().join("src");
    let pushed = crate::clients::layout_manifest_digest(&source);
    crate::clients::run(
        Command::new(&skopeo)
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", source.display()))
            .arg(format!("docker://{}/library/app:v1", upstream.host())),
    );
    // One cache routed to by containerd's ns, one serving as docker's mirror.
    let dir = tempfile::tempdir().unwrap();
    let tables = format!(
        "{}\nns = \"docker.io\"\n",
        table("hub", &upstream.url(), 300).trim_end()
    );
    let berth = cache(dir.path(), &tables);
    let host = berth.url().trim_start_matches("http://").to_owned();
    let mirror_dir = tempfile::tempdir().unwrap();
    let tables = format!(
        "{}\ndocker_mirror = true\n",
        table("hub", &upstream.url(), 300).trim_end()
    );
    let docker_mirror = cache(mirror_dir.path(), &tables);

    // skopeo, by the project prefix: the same manifest, the same layers.
    let back = work.path().join("back");
    crate::clients::run(
        Command::new(&skopeo)
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/hub/library/app:v1"))
            .arg(format!("oci:{}:v1", back.display())),
    );
    assert_eq!(crate::clients::layout_manifest_digest(&back), pushed);

    // podman, into a store of its own: the digest it records is the pushed one.
    if let Some(podman) = berth_testkit::tool("podman") {
        let store = work.path().join("podman");
        let podman_cmd = || {
            let mut c = Command::new(&podman);
            c.arg("--root")
                .arg(store.join("root"))
                .arg("--runroot")
                .arg(store.join("run"))
                .args(["--storage-driver", "vfs"]);
            c
        };
        let image = format!("{host}/hub/library/app:v1");
        crate::clients::run(podman_cmd().args(["pull", "--tls-verify=false", &image]));
        let recorded = crate::clients::run(podman_cmd().args([
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            &image,
        ]));
        assert_eq!(recorded.trim(), pushed);
    }

    // An ns no cache answers to is refused, never dialled.
    let r = get(&format!(
        "{}/v2/library/app/manifests/v1?ns=evil.example",
        berth.url()
    ));
    assert_oci_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    // Without ns, and no mirror mode, an upstream name is just an unknown repository.
    let r = get(&format!("{}/v2/library/app/manifests/v1", berth.url()));
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // The mirror puts library/ before a one-part name.
    let r = get(&format!("{}/v2/app/manifests/v1", docker_mirror.url()));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), pushed);

    let (Some(containerd), Some(ctr)) = (tool("containerd"), tool("ctr")) else {
        return;
    };
    // containerd with the cache as docker.io's mirror in hosts.toml: it sends ?ns=docker.io.
    let hosts = work.path().join("hosts/docker.io");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"https://registry-1.docker.io\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let dockerd = tool("dockerd").filter(|_| tool("docker").is_some());
    let mirror = format!("--registry-mirror={}", docker_mirror.url());
    let daemons = crate::clients::Daemons::start_with(&containerd, dockerd.as_deref(), &[&mirror]);
    let out = crate::clients::run(
        Command::new(&ctr)
            .arg("--address")
            .arg(daemons.containerd_socket())
            .args(["images", "pull", "--hosts-dir"])
            .arg(work.path().join("hosts"))
            .arg("docker.io/library/app:v1"),
    );
    assert!(out.contains("done") || out.contains("elapsed"), "{out}");
    let served = berth_testkit::wait_until(std::time::Duration::from_secs(5), || {
        berth
            .log()
            .iter()
            .any(|l| l.contains("path=\"/v2/library/app/manifests/v1\" status=200"))
    });
    assert!(served, "ctr pulled through the ns route: {:?}", berth.log());

    // docker with the cache as its registry mirror: `app:v1` is docker.io/library/app:v1.
    if dockerd.is_some() {
        crate::clients::run(Command::new("docker").args([
            "-H",
            &daemons.docker_host(),
            "pull",
            "app:v1",
        ]));
        let ids = crate::clients::run(Command::new("docker").args([
            "-H",
            &daemons.docker_host(),
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "app:v1",
        ]));
        assert!(ids.contains(&pushed), "{ids}");
    }
}

#[test]
fn a_hub_like_upstream_gets_its_tokens_its_heads_and_its_rate_limit_respected() {
    use berth_testkit::{HubOptions, HubServer};
    let hub = HubServer::start(HubOptions {
        credentials: Some(("puller".to_owned(), "hub-secret".to_owned())),
        rate_limit: Some(4),
    });
    let (v1, _, layers) = hub.push_image("library/app", "v1", &[b"layer one"]);
    let (v2, _, _) = hub.push_image("library/app", "v2", &[b"layer two"]);
    hub.push_image("library/app", "v3", &[b"layer three"]);
    hub.push_image("library/app", "v4", &[b"layer four"]);
    hub.push_image("library/app", "v5", &[b"layer five"]);
    let dir = tempfile::tempdir().unwrap();
    let tables = format!(
        "{}\nusername = \"puller\"\npassword = \"hub-secret\"\nrate_limit_reserve = 1\n",
        table("hub", &hub.url(), 0).trim_end()
    );
    let berth = cache(dir.path(), &tables);
    let base = format!("{}/v2/hub/library/app", berth.url());
    let pull = |reference: &str| {
        http()
            .get(format!("{base}/manifests/{reference}"))
            .header("accept", berth_client::MANIFEST_TYPES)
            // The client's own credentials, which must never reach the upstream.
            .basic_auth("client-user", Some("client-password"))
            .send()
            .unwrap()
    };

    // A client's HEAD of a tag not cached: one HEAD upstream, no GET (GETs are rationed).
    let r = http()
        .head(format!("{base}/manifests/v2"))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), v2);
    assert_eq!(hub.count("GET", "/manifests/"), 0);

    // The first pull: token flow with the configured credentials, one GET by digest.
    let r = pull("v1");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), v1);
    let blob = get(&format!("{base}/blobs/{}", layers[0]));
    assert_eq!(blob.bytes().unwrap().as_ref(), b"layer one");
    // Again (TTL 0): a HEAD revalidates, the bytes are not fetched again.
    assert_eq!(pull("v1").status(), StatusCode::OK);
    assert_eq!(hub.count("GET", "/manifests/"), 1, "{:?}", hub.requests());
    let requests = hub.requests();
    assert!(
        requests.iter().all(|r| r
            .authorization
            .as_deref()
            .is_none_or(|a| !a.contains("Y2xpZW50"))),
        "the client's credentials never go upstream: {requests:?}"
    );
    assert!(requests.iter().filter(|r| r.path == "/token").all(|r| r
        .authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Basic "))));

    // Spend the hub's limit down to the reserve: v2 and v3 are fetched (remaining 2, then 1).
    assert_eq!(pull("v2").status(), StatusCode::OK);
    assert_eq!(pull("v3").status(), StatusCode::OK);
    let metrics = get(&format!("{}/metrics", berth.url())).text().unwrap();
    assert!(
        metrics.contains("berth_proxy_upstream_rate_limit_remaining{project=\"hub\"} 1"),
        "{metrics}"
    );
    // At the reserve: cached tags are served without asking the hub at all.
    let before = hub.requests().len();
    for _ in 0..5 {
        assert_eq!(pull("v1").status(), StatusCode::OK);
    }
    assert_eq!(
        hub.requests().len(),
        before,
        "nothing sent while at the reserve"
    );
    // What is not cached still goes up, until the hub says 429; then it is a 502.
    assert_eq!(pull("v4").status(), StatusCode::OK);
    let r = pull("v5");
    assert_eq!(
        r.status(),
        StatusCode::BAD_GATEWAY,
        "the hub's 429, passed on"
    );
    assert!(r.text().unwrap().contains("TOOMANYREQUESTS"));
    assert_oci_error(pull("latest"), StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    assert_eq!(pull("v2").status(), StatusCode::OK, "cached, still served");
}

#[test]
fn the_first_pull_streams_while_the_upstream_is_still_sending() {
    use berth_testkit::{HubOptions, HubServer};
    use std::io::Read;
    let hub = HubServer::start(HubOptions::default());
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 239) as u8).collect();
    let (_, _, layers) = hub.push_image("library/slow", "v1", &[&big]);
    hub.throttle(Some(1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let berth = cache(dir.path(), &table("hub", &hub.url(), 300));
    let mut r = http()
        .get(format!(
            "{}/v2/hub/library/slow/blobs/{}",
            berth.url(),
            layers[0]
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut first = vec![0u8; 64 * 1024];
    r.read_exact(&mut first).unwrap();
    let sent_when_first_arrived = hub.sent(&layers[0]);
    assert!(
        sent_when_first_arrived < big.len() as u64,
        "the client had bytes before the upstream finished ({sent_when_first_arrived} of {} sent)",
        big.len()
    );
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    assert_eq!(sha256(&first), layers[0]);

    // A byte flipped upstream: the body breaks off and nothing is cached.
    hub.throttle(None);
    let (_, _, flipped) = hub.push_image("library/flip", "v1", &[&big[..1024 * 1024]]);
    hub.flip_bytes(true);
    let url = format!("{}/v2/hub/library/flip/blobs/{}", berth.url(), flipped[0]);
    assert!(http().get(&url).send().unwrap().bytes().is_err());
    hub.flip_bytes(false);
    assert_eq!(
        sha256(&http().get(&url).send().unwrap().bytes().unwrap()),
        flipped[0]
    );
    let fetched = hub.fetches(&flipped[0]);
    assert_eq!(fetched, 2, "fetched again: the bad bytes were not kept");
}

#[test]
fn distribution_as_upstream_a_thousand_warm_pulls_stay_local_and_a_cut_loses_nothing() {
    let Some(distribution) = crate::copy::Distribution::start() else {
        eprintln!("skipped: docker-registry is not installed");
        return;
    };
    let relay = CuttableProxy::start(distribution.addr.parse().unwrap());
    // Distribution takes no single-request uploads: the images go there by berth copy.
    let staging = start();
    let mut pushed = Vec::new();
    for tag in ["v1", "v2", "v3"] {
        let layer = format!("layer of {tag}").into_bytes();
        let (digest, manifest) =
            push_image(&staging.url(), "library/app", tag, &[&layer, b"shared"]);
        let copied = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["copy", "--all-platforms"])
            .arg(format!("{}/library/app:{tag}", staging.host()))
            .arg(format!("{}/library/app:{tag}", distribution.addr))
            .output()
            .unwrap();
        assert!(
            copied.status.success(),
            "{}",
            String::from_utf8_lossy(&copied.stderr)
        );
        pushed.push((tag, digest, manifest));
    }

    let dir = tempfile::tempdir().unwrap();
    let berth = cache(
        dir.path(),
        &table("hub", &format!("http://{}", relay.addr()), 300),
    );
    let base = format!("{}/v2/hub/library/app", berth.url());
    let pull_all = |tag: &str, digest: &str, manifest: &[u8]| {
        let r = get(&format!("{base}/manifests/{tag}"));
        assert_eq!(r.status(), StatusCode::OK, "{tag}");
        assert_eq!(header(&r, "docker-content-digest"), digest);
        assert_eq!(
            get(&format!("{base}/manifests/{digest}")).status(),
            StatusCode::OK
        );
        let parsed: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        let config = parsed["config"]["digest"].as_str().unwrap().to_owned();
        let layers = parsed["layers"].as_array().unwrap().iter();
        for blob in layers
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .chain([config])
        {
            let bytes = get(&format!("{base}/blobs/{blob}")).bytes().unwrap();
            assert_eq!(sha256(&bytes), blob, "{tag}: {blob}");
        }
    };
    for (tag, digest, manifest) in &pushed {
        pull_all(tag, digest, manifest);
    }
    let metrics = || get(&format!("{}/metrics", berth.url())).text().unwrap();
    let misses = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("berth_proxy_misses_total{project=\"hub\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap()
    };
    let before = misses(&metrics());
    // A thousand pulls of a cached tag within its TTL: nothing goes upstream (the
    // upstream is cut meanwhile, so any attempt would count as a stale serve).
    relay.cut();
    for _ in 0..1000 {
        assert_eq!(
            get(&format!("{base}/manifests/v1")).status(),
            StatusCode::OK
        );
    }
    let text = metrics();
    assert_eq!(misses(&text), before);
    assert!(
        text.contains("berth_proxy_stale_serves_total{project=\"hub\"} 0"),
        "{text}"
    );
    // With the upstream cut, every tag and digest pulled before still pulls, whole.
    for (tag, digest, manifest) in &pushed {
        pull_all(tag, digest, manifest);
    }
}

#[test]
fn referrers_of_cached_manifests_come_through_the_cache() {
    let upstream = start();
    let (digest, manifest) = push_image(&upstream.url(), "library/app", "v1", &[b"signed layer"]);
    // The subject descriptor's media type is whatever the referrer says; the size is the image's.
    let sbom = crate::copy::push_referrer(&upstream.url(), "library/app", &digest, manifest.len());
    let relay = CuttableProxy::start(upstream.host().parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let berth = cache(
        dir.path(),
        &table("hub", &format!("http://{}", relay.addr()), 300),
    );
    let base = format!("{}/v2/hub/library/app", berth.url());
    assert_eq!(
        get(&format!("{base}/manifests/v1")).status(),
        StatusCode::OK
    );
    let listed: serde_json::Value = get(&format!("{base}/referrers/{digest}")).json().unwrap();
    let digests: Vec<&str> = listed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["digest"].as_str())
        .collect();
    assert_eq!(digests, vec![sbom.as_str()], "{listed}");
    assert_eq!(
        listed["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    // Cached: the referrer itself, and the listing when the upstream is gone.
    relay.cut();
    assert_eq!(
        get(&format!("{base}/manifests/{sbom}")).status(),
        StatusCode::OK
    );
    let listed: serde_json::Value = get(&format!("{base}/referrers/{digest}")).json().unwrap();
    assert_eq!(listed["manifests"][0]["digest"], sbom.as_str());
}

#[test]
fn eviction_keeps_a_cache_under_its_size_cap_and_drops_idle_images() {
    let upstream = start();
    let mut images = Vec::new();
    for n in 0..3u8 {
        let layer: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8 ^ n).collect();
        let (digest, manifest) =
            push_image(&upstream.url(), "library/app", &format!("v{n}"), &[&layer]);
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let layer = parsed["layers"][0]["digest"].as_str().unwrap().to_owned();
        images.push((format!("v{n}"), digest, layer));
    }
    let dir = tempfile::tempdir().unwrap();
    // Room for two of the three images; evicted blobs are collected at once.
    let tables = format!(
        "[gc]\nblob_grace_secs = 0\n\n{}\nmax_bytes = 2500000\n",
        table("hub", &upstream.url(), 300).trim_end()
    );
    let berth = cache(dir.path(), &tables);
    let base = format!("{}/v2/hub/library/app", berth.url());
    let layer_gets = || upstream_requests(&upstream.url(), "/v2/{name}/blobs/{digest}", "GET");
    for (tag, _, layer) in &images {
        assert_eq!(
            get(&format!("{base}/manifests/{tag}")).status(),
            StatusCode::OK
        );
        assert_eq!(
            sha256(&get(&format!("{base}/blobs/{layer}")).bytes().unwrap()),
            *layer
        );
    }
    // The third fill put the project over its cap: the least recently pulled image (v0)
    // went, and a collection took its layer.
    let collected = || {
        berth.log().iter().any(|l| {
            l.contains("garbage collection finished") && l.contains("blobs=1 bytes=1048576")
        })
    };
    let evicted = berth_testkit::wait_until(std::time::Duration::from_secs(10), collected);
    assert!(
        evicted,
        "no eviction: {:?}",
        berth.log().iter().rev().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        get(&format!("{base}/manifests/{}", images[0].1)).status(),
        StatusCode::OK,
        "fetched again by digest"
    );
    let before = layer_gets();
    assert_eq!(
        sha256(
            &get(&format!("{base}/blobs/{}", images[2].2))
                .bytes()
                .unwrap()
        ),
        images[2].2
    );
    assert_eq!(layer_gets(), before, "the newest image is still cached");
    assert_eq!(
        sha256(
            &get(&format!("{base}/blobs/{}", images[0].2))
                .bytes()
                .unwrap()
        ),
        images[0].2
    );
    assert_eq!(
        layer_gets(),
        before + 1,
        "the evicted image's layer came from upstream again"
    );

    // Idle eviction: a cache that drops what was not pulled for a second.
    let idle_dir = tempfile::tempdir().unwrap();
    let tables = format!(
        "[gc]\nblob_grace_secs = 0\n\n{}\nidle_secs = 1\n",
        table("idle", &upstream.url(), 300).trim_end()
    );
    let idle = cache(idle_dir.path(), &tables);
    let idle_base = format!("{}/v2/idle/library/app", idle.url());
    assert_eq!(
        get(&format!("{idle_base}/manifests/v1")).status(),
        StatusCode::OK
    );
    let gone = berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
        idle.log()
            .iter()
            .any(|l| l.contains("evicted from the cache"))
    });
    assert!(gone, "{:?}", idle.log());
    let r = http()
        .get(format!("{}/v2/idle/library/app/tags/list", idle.url()))
        .send()
        .unwrap();
    let tags: serde_json::Value = r.json().unwrap();
    assert!(
        tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "{tags}"
    );
}

#[test]
fn a_cache_made_through_the_api_proxies_survives_a_restart_and_can_be_undone() {
    let upstream = start();
    let (digest, _) = push_image(&upstream.url(), "library/app", "v1", &[b"api layer"]);
    let dir = tempfile::tempdir().unwrap();
    let berth = cache(dir.path(), "");
    let created = http()
        .post(format!("{}/api/v1/projects", berth.url()))
        .json(&serde_json::json!({"name": "mirror", "proxy_cache": {"urls": [upstream.url()], "tag_ttl_secs": 60}}))
        .send()
        .unwrap();
    assert_eq!(
        created.status(),
        StatusCode::CREATED,
        "{}",
        created.text().unwrap_or_default()
    );
    let r = get(&format!(
        "{}/v2/mirror/library/app/manifests/v1",
        berth.url()
    ));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let shown: serde_json::Value = get(&format!(
        "{}/api/v1/projects/mirror/proxy-cache",
        berth.url()
    ))
    .json()
    .unwrap();
    assert_eq!(shown["tag_ttl_secs"], 60);
    assert_eq!(shown["from_config"], false);
    // The settings are stored: another process on the same data serves the project too.
    drop(berth);
    let again = cache(dir.path(), "");
    let r = get(&format!(
        "{}/v2/mirror/library/app/manifests/v2",
        again.url()
    ));
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let r = http()
        .post(format!(
            "{}/v2/mirror/library/app/blobs/uploads/",
            again.url()
        ))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    // Undone: an ordinary project again, which takes pushes and keeps what was cached.
    let r = http()
        .delete(format!(
            "{}/api/v1/projects/mirror/proxy-cache",
            again.url()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = http()
        .post(format!(
            "{}/v2/mirror/library/app/blobs/uploads/",
            again.url()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        get(&format!(
            "{}/v2/mirror/library/app/manifests/v1",
            again.url()
        ))
        .status(),
        StatusCode::OK
    );
}

#[test]
fn a_fill_goes_on_when_its_client_leaves() {
    use berth_testkit::{HubOptions, HubServer};
    use std::io::Read;
    let hub = HubServer::start(HubOptions::default());
    let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 227) as u8).collect();
    let (_, _, layers) = hub.push_image("library/app", "v1", &[&big]);
    hub.throttle(Some(2 * 1024 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let berth = cache(dir.path(), &table("hub", &hub.url(), 300));
    let url = format!("{}/v2/hub/library/app/blobs/{}", berth.url(), layers[0]);
    {
        let mut r = http().get(&url).send().unwrap();
        let mut first = vec![0u8; 1024];
        r.read_exact(&mut first).unwrap();
        // The client hangs up here, a second into a two-second fetch.
    }
    let stored = berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
        get(&format!("{}/metrics", berth.url()))
            .text()
            .unwrap()
            .contains("berth_proxy_fills_in_flight{project=\"hub\"} 0")
    });
    assert!(stored);
    hub.throttle(None);
    assert_eq!(sha256(&get(&url).bytes().unwrap()), layers[0]);
    let fetched = hub.fetches(&layers[0]);
    assert_eq!(
        fetched, 1,
        "the fill finished without its client and was kept"
    );
}

#[test]
fn project_roles_apply_to_cached_content() {
    let upstream = start();
    push_image(&upstream.url(), "library/app", "v1", &[b"private layer"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[outbound]\nallow_cidrs = [\"127.0.0.0/8\"]\n\n{}",
            table("hub", &upstream.url(), 300)
        ),
    )
    .unwrap();
    let berth = BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[("BERTH_ADMIN_PASSWORD", "admin-password")],
    );
    let url = format!("{}/v2/hub/library/app/manifests/v1", berth.url());
    // A private project: anonymous pulls are refused before anything goes upstream.
    let r = get(&url);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "GET")
            + upstream_requests(&upstream.url(), "/v2/{name}/manifests/{reference}", "HEAD"),
        0
    );
    let r = http()
        .get(&url)
        .basic_auth("admin", Some("admin-password"))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Made public, anyone pulls what is cached.
    let r = http()
        .put(format!("{}/api/v1/projects/hub", berth.url()))
        .basic_auth("admin", Some("admin-password"))
        .json(&serde_json::json!({"public": true}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(get(&url).status(), StatusCode::OK);
}
