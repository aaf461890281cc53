//! HTTPS served by `berth serve` itself: certificates from a test CA made here with
//! `openssl`, real clients that verify them (curl, skopeo, containerd's ctr, docker), HTTP/2
//! through ALPN, mutual TLS, and a certificate renewed under a client that keeps asking.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_testkit::{tool, wait_until, BerthProcess};

use crate::clients::{build_layout, layout_manifest_digest, run, run_with_stdin, Daemons};

/// A certificate authority made for one test, and the certificates it signs.
pub(crate) struct TestCa {
    dir: PathBuf,
    name: String,
}

impl TestCa {
    /// A new ECDSA P-256 authority called `name` in `dir`.
    pub(crate) fn new(dir: &Path, name: &str) -> Self {
        let ca = TestCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &ca.path("key.pem"),
            "-out",
            &ca.path("crt.pem"),
        ]);
        ca
    }

    fn path(&self, what: &str) -> String {
        self.dir
            .join(format!("{}-{what}", self.name))
            .display()
            .to_string()
    }

    /// The authority's certificate, for clients to trust.
    pub(crate) fn cert(&self) -> PathBuf {
        PathBuf::from(self.path("crt.pem"))
    }

    /// Issues a certificate for `cn` (valid for 127.0.0.1 and localhost, as server or
    /// client) with a key of `key_type` (`rsa:2048` or `ec`); returns (certificate, key).
    pub(crate) fn issue(&self, cn: &str, key_type: &str) -> (PathBuf, PathBuf) {
        let key = self.path(&format!("{cn}-key.pem"));
        let csr = self.path(&format!("{cn}.csr"));
        let crt = self.path(&format!("{cn}-crt.pem"));
        let ext = self.path(&format!("{cn}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let mut args = vec!["req", "-new", "-newkey", key_type, "-nodes"];
        if key_type == "ec" {
            args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        let subject = format!("/CN={cn}");
        args.extend(["-subj", &subject, "-keyout", &key, "-out", &csr]);
        openssl(&args);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path("crt.pem"),
            "-CAkey",
            &self.path("key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
        (PathBuf::from(crt), PathBuf::from(key))
    }
}

fn openssl(args: &[&str]) {
    run(Command::new("openssl").args(args));
}

/// `berth serve` over HTTPS with `cert` and `key` (and extra arguments).
fn serve_tls(
    data: &Path,
    cert: &Path,
    key: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> BerthProcess {
    let mut all = vec![
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    BerthProcess::spawn_with(Path::new(env!("CARGO_BIN_EXE_berth")), data, &all, env)
}

/// A test CA and `berth serve` over HTTPS with a certificate it issued (a `key_type` key),
/// builtin auth and the administrator password `admin-password`. Bind the three in this
/// order: the server stops before its directory goes.
fn secured(key_type: &str) -> (tempfile::TempDir, TestCa, BerthProcess) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let (cert, key) = ca.issue("server", key_type);
    let admin = [("BERTH_ADMIN_PASSWORD", "admin-password")];
    let berth = serve_tls(&dir.path().join("data"), &cert, &key, &[], &admin);
    (dir, ca, berth)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap()
}

/// A blocking client trusting only `ca`.
fn client_trusting(ca: &Path) -> reqwest::blocking::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn curl_gets_https_with_http2_and_the_token_realm_is_https() {
    if tool("curl").is_none() || tool("openssl").is_none() {
        return;
    }
    let (_dir, ca, berth) = secured("rsa:2048");
    let https = berth.url().replace("http://", "https://");
    let ca_arg = ca.cert().display().to_string();

    // HTTP/2 is chosen through ALPN; the challenge sends clients to an https realm.
    let out = curl(&[
        "--cacert",
        &ca_arg,
        "--http2",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-w",
        "version=%{http_version}\n",
        &format!("{https}/v2/"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("version=2"), "{text}");
    assert!(text.starts_with("http/2 401"), "{text}");
    let port = https.rsplit(':').next().unwrap();
    assert!(
        text.contains(&format!("realm=\"https://127.0.0.1:{port}/token\"")),
        "{text}"
    );
    // HTTP/1.1 still works, and credentials through the token endpoint.
    let out = curl(&[
        "--cacert",
        &ca_arg,
        "--http1.1",
        "-u",
        "admin:admin-password",
        "-w",
        "\n%{http_version} %{http_code}",
        &format!("{https}/token?service=berth"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("1.1 200"), "{text}");
    // A client that does not trust the authority is refused by its own TLS check.
    let out = curl(&["-o", "/dev/null", &format!("{https}/healthz")]);
    assert!(!out.status.success());
    // Plain HTTP on the TLS port gets no answer it could mistake for one.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/healthz", berth.url()),
    ]);
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_authority() {
    if tool("curl").is_none() || tool("openssl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let clients = TestCa::new(dir.path(), "clients");
    let strangers = TestCa::new(dir.path(), "strangers");
    let (cert, key) = ca.issue("server", "ec");
    let (client_cert, client_key) = clients.issue("builder", "ec");
    let (stranger_cert, stranger_key) = strangers.issue("stranger", "ec");
    let data = dir.path().join("data");
    let client_ca = clients.cert().display().to_string();
    let berth = serve_tls(
        &data,
        &cert,
        &key,
        &["--auth", "none", "--tls-client-ca-file", &client_ca],
        &[],
    );
    let url = format!("{}/v2/", berth.url().replace("http://", "https://"));
    let ca_arg = ca.cert().display().to_string();
    let code = |extra: &[&str]| {
        let mut args = vec!["--cacert", &ca_arg, "-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        args.push(&url);
        String::from_utf8_lossy(&curl(&args).stdout).into_owned()
    };
    let (cc, ck) = (
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    assert_eq!(code(&["--cert", &cc, "--key", &ck]), "200");
    assert_ne!(code(&[]), "200", "no client certificate");
    let (sc, sk) = (
        stranger_cert.display().to_string(),
        stranger_key.display().to_string(),
    );
    assert_ne!(
        code(&["--cert", &sc, "--key", &sk]),
        "200",
        "a certificate from another authority"
    );
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_or_a_failed_request() {
    if tool("openssl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new(dir.path(), "old");
    let new_ca = TestCa::new(dir.path(), "new");
    let (old_cert, old_key) = old_ca.issue("server", "ec");
    let (new_cert, new_key) = new_ca.issue("server", "rsa:2048");
    let cert = dir.path().join("live-cert.pem");
    let key = dir.path().join("live-key.pem");
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    let data = dir.path().join("data");
    let berth = serve_tls(&data, &cert, &key, &["--auth", "none"], &[]);
    let url = format!("{}/v2/", berth.url().replace("http://", "https://"));

    // A client trusting both authorities loops requests, on kept-alive and new
    // connections, while the certificate changes under it.
    let roots = [
        std::fs::read(old_ca.cert()).unwrap(),
        std::fs::read(new_ca.cert()).unwrap(),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looping = {
        let (stop, done, failed, url) = (stop.clone(), done.clone(), failed.clone(), url.clone());
        std::thread::spawn(move || {
            let trusting_both = || {
                let mut builder = reqwest::blocking::Client::builder()
                    .tls_built_in_root_certs(false)
                    .timeout(Duration::from_secs(10));
                for pem in &roots {
                    builder =
                        builder.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
                }
                builder.build().unwrap()
            };
            let kept_alive = trusting_both();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) && round < 20_000 {
                round += 1;
                // Most requests reuse a connection; every fifth opens a new one.
                let fresh = (round % 5 == 0).then(trusting_both);
                let client = fresh.as_ref().unwrap_or(&kept_alive);
                match client.get(&url).send() {
                    Ok(r) if r.status().is_success() => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let new_only = client_trusting(&new_ca.cert());
    assert!(
        new_only.get(&url).send().is_err(),
        "the old certificate is served first"
    );
    assert!(wait_until(Duration::from_secs(10), || done
        .load(Ordering::Relaxed)
        > 20));

    // Renewal by rewriting the files: picked up without a signal.
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || new_only
            .get(&url)
            .send()
            .is_ok()),
        "the renewed certificate is served: {:?}",
        berth.log()
    );
    // And on SIGHUP: back to the old one, at once.
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    run(Command::new("kill").args(["-HUP", &berth.pid().to_string()]));
    let old_only = client_trusting(&old_ca.cert());
    assert!(
        wait_until(Duration::from_secs(5), || old_only.get(&url).send().is_ok()),
        "SIGHUP reloads: {:?}",
        berth.log()
    );
    let before = done.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || done
        .load(Ordering::Relaxed)
        > before + 20));
    stop.store(true, Ordering::Relaxed);
    looping.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across the renewals"
    );

    // A broken renewal (a key that does not match) keeps the working certificate.
    std::fs::copy(&new_cert, &cert).unwrap();
    run(Command::new("kill").args(["-HUP", &berth.pid().to_string()]));
    assert!(wait_until(Duration::from_secs(5), || berth
        .log()
        .iter()
        .any(|l| l.contains("keeping the certificate in use"))));
    assert!(old_only.get(&url).send().is_ok());
}

/// Removes docker's per-registry certificate directory when the test ends, however.
struct CertsD(PathBuf);

impl Drop for CertsD {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn skopeo_docker_and_ctr_push_and_pull_verifying_the_test_ca() {
    let (Some(skopeo), Some(umoci), Some(containerd), Some(ctr), Some(dockerd), Some(_)) = (
        tool("skopeo"),
        tool("umoci"),
        tool("containerd"),
        tool("ctr"),
        tool("dockerd"),
        tool("docker"),
    ) else {
        return;
    };
    let (dir, ca, berth) = secured("ec");
    let host = berth.url().trim_start_matches("http://").to_owned();
    let creds = "admin:admin-password";

    // skopeo: the authority in a certificate directory, credentials on the command line.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    build_layout(&umoci, &layout);
    let src = layout.join("src");
    let dest = format!("docker://{host}/secure/skopeo:v1");
    run(Command::new(&skopeo)
        .args(["copy", "--dest-cert-dir"])
        .arg(&certs)
        .args(["--dest-creds", creds])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&dest));
    let back = dir.path().join("back");
    run(Command::new(&skopeo)
        .args(["copy", "--src-cert-dir"])
        .arg(&certs)
        .args(["--src-creds", creds, &dest])
        .arg(format!("oci:{}:v1", back.display())));
    assert_eq!(layout_manifest_digest(&back), layout_manifest_digest(&src));
    // Without the authority skopeo refuses the server.
    let refused = Command::new(&skopeo)
        .args(["inspect", "--raw", "--creds", creds, &dest])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // docker: the authority in certs.d/<host:port>/ca.crt.
    let certs_d = CertsD(PathBuf::from("/etc/docker/certs.d").join(&host));
    std::fs::create_dir_all(&certs_d.0).unwrap();
    std::fs::copy(ca.cert(), certs_d.0.join("ca.crt")).unwrap();
    let daemons = Daemons::start(&containerd, Some(&dockerd));
    let docker = |args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new("docker");
        c.args(["-H", &daemons.docker_host()])
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", dir.path().join("docker-config"));
        match stdin {
            Some(input) => run_with_stdin(&mut c, input),
            None => run(&mut c),
        }
    };
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("msg.txt"), "hello over TLS\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY msg.txt /msg.txt\nCMD [\"/true\"]\n",
    )
    .unwrap();
    let image = format!("{host}/secure/docker:v1");
    docker(&["build", "-q", "-t", &image, ctx.to_str().unwrap()], None);
    docker(
        &["login", "-u", "admin", "--password-stdin", &host],
        Some("admin-password"),
    );
    docker(&["push", &image], None);
    docker(&["rmi", &image], None);
    docker(&["pull", &image], None);

    // containerd's ctr: the authority named in a hosts directory.
    let hosts = dir.path().join("hosts");
    std::fs::create_dir_all(hosts.join(&host)).unwrap();
    std::fs::write(
        hosts.join(&host).join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{}\"\n",
            ca.cert().display()
        ),
    )
    .unwrap();
    let ctr_cmd = |args: &[&str]| {
        let mut c = Command::new(&ctr);
        c.arg("--address")
            .arg(daemons.containerd_socket())
            .args(["--namespace", "berth-tls"])
            .args(args);
        run(&mut c)
    };
    let hosts_dir = hosts.display().to_string();
    ctr_cmd(&[
        "images",
        "pull",
        "--hosts-dir",
        &hosts_dir,
        "--user",
        creds,
        &image,
    ]);
    let copy = format!("{host}/secure/ctr:v1");
    ctr_cmd(&["images", "tag", &image, &copy]);
    ctr_cmd(&[
        "images",
        "push",
        "--hosts-dir",
        &hosts_dir,
        "--user",
        creds,
        &copy,
    ]);
    let listed = run(Command::new("curl").args([
        "-sS",
        "--cacert",
        ca.cert().to_str().unwrap(),
        "-u",
        creds,
        &format!("https://{host}/v2/secure/ctr/tags/list"),
    ]));
    assert!(listed.contains("\"v1\""), "{listed}");
    drop(daemons);
}

#[test]
fn berth_copy_trusts_the_ca_docker_keeps_for_a_registry_or_one_given() {
    let (dir, ca, secure) = secured("ec");
    let host = secure.url().trim_start_matches("http://").to_owned();
    let plain = berth_testkit::TestRegistry::start();
    let (digest, _) = crate::push_image(&plain.url(), "team/app", "v1", &[b"layer"]);
    let home = dir.path().join("home");
    let berth = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .env("HOME", &home)
            .env("DOCKER_CONFIG", home.join(".docker"))
            .env_remove("BERTH_SRC_CREDS")
            .env_remove("BERTH_DEST_CREDS")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let source = format!("{}/team/app:v1", plain.host());
    let target = format!("{host}/secure/app:v1");
    let creds = "admin:admin-password";

    // No CA anywhere: loopback means plain HTTP, which a TLS server does not speak.
    let (ok, out) = berth(&["copy", "--dest-creds", creds, &source, &target]);
    assert!(!ok && out.contains("unreachable"), "{out}");

    // A CA that did not sign the server's certificate is refused as such.
    let other = TestCa::new(dir.path(), "other");
    let wrong = other.cert();
    let (ok, out) = berth(&[
        "copy",
        "--ca-file",
        wrong.to_str().unwrap(),
        "--dest-creds",
        creds,
        &target,
        &source,
    ]);
    assert!(!ok && out.contains("certificate"), "{out}");

    // The CA where docker and podman keep it for this registry: TLS, verified.
    let certs = home.join(".config/containers/certs.d").join(&host);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(ca.cert(), certs.join("ca.crt")).unwrap();
    let (ok, out) = berth(&["copy", "--dest-creds", creds, &source, &target]);
    assert!(ok, "{out}");
    assert!(out.contains(&digest), "{out}");
    let (ok, out) = berth(&["inspect", "--src-creds", creds, &target]);
    assert!(ok && out.contains(&digest), "{out}");

    // Or given on the command line.
    std::fs::remove_dir_all(&certs).unwrap();
    let (ok, out) = berth(&[
        "inspect",
        "--ca-file",
        ca.cert().to_str().unwrap(),
        "--src-creds",
        creds,
        &target,
    ]);
    assert!(ok && out.contains(&digest), "{out}");
}
