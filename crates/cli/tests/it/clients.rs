//! Real clients against a real berth on loopback: skopeo, umoci, podman/buildah, docker,
//! containerd's ctr and the ORAS Python SDK. A tool that is missing skips its test locally
//! and fails it under CI, where `.ci/run` installs every one of them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_testkit::{tool, wait_until, TestRegistry};
use reqwest::StatusCode;
use serde_json::Value;

use crate::auth::{api, Who};
use crate::{header, http};

/// Runs a command, failing the test with its output if it fails; returns stdout.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The manifest digest the registry serves for `repo:tag`.
fn served_digest(reg: &TestRegistry, repo: &str, tag: &str) -> String {
    let r = http()
        .head(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{repo}:{tag} is served");
    header(&r, "docker-content-digest")
}

pub(crate) fn layout_manifest_digest(layout: &Path) -> String {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// An OCI layout holding `src:v1` with two layers, built offline with umoci.
pub(crate) fn build_layout(umoci: &Path, dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let layout = dir.join("src");
    run(Command::new(umoci).args(["init", "--layout"]).arg(&layout));
    run(Command::new(umoci)
        .args(["new", "--image"])
        .arg(format!("{}:v1", layout.display())));
    let image = format!("{}:v1", layout.display());
    let mut files = Vec::new();
    for (step, (name, content)) in [
        (
            "data/random.bin",
            (0..3 * 1024 * 1024u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
                .collect::<Vec<u8>>(),
        ),
        ("etc/greeting.txt", b"hello from berth\n".to_vec()),
    ]
    .into_iter()
    .enumerate()
    {
        let bundle = dir.join(format!("bundle{step}"));
        run(Command::new(umoci)
            .args(["unpack", "--image", &image])
            .arg(&bundle));
        let path = bundle.join("rootfs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &content).unwrap();
        run(Command::new(umoci)
            .args(["repack", "--image", &image])
            .arg(&bundle));
        files.push((PathBuf::from(name), content));
    }
    run(Command::new(umoci).args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));
    files
}

#[test]
fn skopeo_copies_a_layout_in_and_out_and_umoci_unpacks_the_pull() {
    let (Some(skopeo), Some(umoci)) = (tool("skopeo"), tool("umoci")) else {
        return;
    };
    let reg = crate::start();
    let dir = tempfile::tempdir().unwrap();
    let files = build_layout(&umoci, dir.path());
    let host = reg.host();
    let src = dir.path().join("src");
    let dest = format!("docker://{host}/clients/skopeo:v1");
    run(Command::new(&skopeo)
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&dest));
    let original = layout_manifest_digest(&src);
    assert_eq!(served_digest(&reg, "clients/skopeo", "v1"), original);

    let raw = run(Command::new(&skopeo).args(["inspect", "--raw", "--tls-verify=false", &dest]));
    let manifest: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);

    let back = dir.path().join("back");
    run(Command::new(&skopeo)
        .args(["copy", "--src-tls-verify=false", &dest])
        .arg(format!("oci:{}:v1", back.display())));
    assert_eq!(
        layout_manifest_digest(&back),
        original,
        "same manifest digest after the round trip"
    );

    // Conversion to Docker schema 2 inside the registry, tag listing, delete.
    let v2s2 = format!("docker://{host}/clients/skopeo:v1-v2s2");
    run(Command::new(&skopeo).args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &dest,
        &v2s2,
    ]));
    let tags: Value = serde_json::from_str(&run(Command::new(&skopeo).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{host}/clients/skopeo"),
    ])))
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v1-v2s2"]));
    run(Command::new(&skopeo).args(["delete", "--tls-verify=false", &v2s2]));
    let r = http()
        .get(format!("{}/v2/clients/skopeo/manifests/v1-v2s2", reg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The pulled image unpacks to the same files.
    let bundle = dir.path().join("unpacked");
    run(Command::new(&umoci)
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", back.display()))
        .arg(&bundle));
    for (name, content) in files {
        assert_eq!(
            std::fs::read(bundle.join("rootfs").join(&name)).unwrap(),
            content,
            "{}",
            name.display()
        );
    }
}

#[test]
fn podman_pushes_and_pulls_a_buildah_image() {
    let (Some(buildah), Some(podman)) = (tool("buildah"), tool("podman")) else {
        return;
    };
    let reg = crate::start();
    let dir = tempfile::tempdir().unwrap();
    let storage = |cmd: &Path| {
        let mut c = Command::new(cmd);
        c.arg("--root")
            .arg(dir.path().join("root"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    };
    let host = reg.host();
    // Base layer, then a second layer on top of it.
    let mut image = String::from("scratch");
    for (tag, file, content) in [
        ("base", "blob.bin", vec![9u8; 2 * 1024 * 1024]),
        ("v1", "app.txt", b"second layer\n".to_vec()),
    ] {
        let container = run(storage(&buildah).args(["from", &image]))
            .trim()
            .to_owned();
        let mount = PathBuf::from(run(storage(&buildah).args(["mount", &container])).trim());
        std::fs::create_dir_all(mount.join("data")).unwrap();
        std::fs::write(mount.join("data").join(file), content).unwrap();
        run(storage(&buildah).args(["umount", &container]));
        run(storage(&buildah).args(["config", "--cmd", "[\"/bin/true\"]", &container]));
        image = format!("localhost/clients/podman:{tag}");
        run(storage(&buildah).args(["commit", "--quiet", &container, &image]));
        run(storage(&buildah).args(["rm", &container]));
    }
    let remote = format!("{host}/clients/podman:v1");
    run(storage(&podman).args(["push", "--tls-verify=false", &image, &remote]));
    let manifest: Value = http()
        .get(format!("{}/v2/clients/podman/manifests/v1", reg.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);

    run(storage(&podman).args(["rmi", "--all", "--force"]));
    run(storage(&podman).args(["pull", "--tls-verify=false", &remote]));
    let digest =
        run(storage(&podman).args(["image", "inspect", "--format", "{{.Digest}}", &remote]));
    assert_eq!(digest.trim(), served_digest(&reg, "clients/podman", "v1"));
}

#[test]
fn oras_python_sdk_pushes_pulls_and_attaches_a_referrer() {
    let Some(python) = oras_python() else {
        return;
    };
    let reg = crate::start();
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oras_artifacts.py");
    let out = run(Command::new(&python)
        .arg(script)
        .arg(reg.host())
        .arg(dir.path()));
    assert!(out.contains("found the referrer"), "{out}");
}

/// A Python with the ORAS SDK: the venv `.ci/install-test-clients` creates, unless
/// `BERTH_TEST_PYTHON` names another. `None` (skip) locally without it; under CI a
/// missing SDK fails the test.
pub(crate) fn oras_python() -> Option<PathBuf> {
    let default_venv =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/clients-venv/bin/python");
    let python = match std::env::var_os("BERTH_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None if default_venv.exists() => default_venv,
        None => tool("python3")?,
    };
    let has_oras = Command::new(&python)
        .args(["-c", "import oras.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_oras {
        assert!(
            std::env::var_os("CI").is_none(),
            "the ORAS SDK is required under CI (set BERTH_TEST_PYTHON)"
        );
        eprintln!("skipping: the ORAS Python SDK is not installed");
        return None;
    }
    Some(python)
}

/// A private containerd and, on top of it, a private dockerd, each stopped by PID on drop.
pub(crate) struct Daemons {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Daemons {
    pub(crate) fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub(crate) fn docker_host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    pub(crate) fn start(containerd: &Path, dockerd: Option<&Path>) -> Self {
        Self::start_with(containerd, dockerd, &[])
    }

    /// [`Daemons::start`], with extra arguments for dockerd (`--registry-mirror …`).
    pub(crate) fn start_with(
        containerd: &Path,
        dockerd: Option<&Path>,
        dockerd_args: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/croot\"\nstate = \"{0}/cstate\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n",
                d.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new(containerd)
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemons = Daemons {
            dir,
            children: vec![child],
        };
        let socket = daemons.containerd_socket();
        assert!(
            wait_until(Duration::from_secs(30), || socket.exists()),
            "containerd did not start"
        );
        if let Some(dockerd) = dockerd {
            let d = daemons.dir.path().to_owned();
            let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
            let child = Command::new(dockerd)
                .arg("--data-root")
                .arg(d.join("droot"))
                .arg("--exec-root")
                .arg(d.join("dexec"))
                .arg("--pidfile")
                .arg(d.join("docker.pid"))
                .arg("-H")
                .arg(daemons.docker_host())
                .args([
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--ip-masq=false",
                ])
                .arg("--containerd")
                .arg(&socket)
                .args(dockerd_args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            daemons.children.push(child);
            let host = daemons.docker_host();
            let up = wait_until(Duration::from_secs(60), || {
                Command::new("docker")
                    .args(["-H", &host, "version"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            assert!(
                up,
                "dockerd did not start: {}",
                std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
            );
        }
        daemons
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            // SIGTERM first so dockerd unmounts what it mounted; SIGKILL if it lingers.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let pid_gone = wait_until(Duration::from_secs(15), || {
                child.try_wait().is_ok_and(|s| s.is_some())
            });
            if !pid_gone {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[test]
fn docker_and_ctr_push_and_pull() {
    let (Some(containerd), Some(ctr), Some(dockerd), Some(_docker)) = (
        tool("containerd"),
        tool("ctr"),
        tool("dockerd"),
        tool("docker"),
    ) else {
        return;
    };
    let reg = crate::start();
    let host = reg.host();
    let daemons = Daemons::start(&containerd, Some(&dockerd));
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        c.args(["-H", &daemons.docker_host()])
            .args(args)
            .env("DOCKER_BUILDKIT", "0");
        run(&mut c)
    };
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("msg.txt"), "hello from docker\n").unwrap();
    std::fs::write(ctx.path().join("blob.bin"), vec![5u8; 1024 * 1024]).unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY msg.txt /data/msg.txt\nCOPY blob.bin /data/blob.bin\nCMD [\"/bin/true\"]\n").unwrap();
    let image = format!("{host}/clients/docker:v1");
    docker(&["build", "-q", "-t", &image, &ctx.path().to_string_lossy()]);
    docker(&["push", &image]);
    let r = http()
        .get(format!("{}/v2/clients/docker/manifests/v1", reg.url()))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .unwrap();
    assert_eq!(
        header(&r, "content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let manifest: Value = r.json().unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    let pushed = served_digest(&reg, "clients/docker", "v1");

    docker(&["rmi", &image]);
    docker(&["pull", &image]);
    let repo_digests = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &image,
    ]);
    assert!(
        repo_digests.contains(&pushed),
        "{repo_digests} should contain {pushed}"
    );

    // containerd's own client against the same daemon.
    let address = daemons.containerd_socket();
    let ctr_cmd = |args: &[&str]| {
        let mut c = Command::new(&ctr);
        c.arg("--address")
            .arg(&address)
            .args(["--namespace", "berth-test"])
            .args(args);
        run(&mut c)
    };
    ctr_cmd(&["images", "pull", "--plain-http", &image]);
    let copy = format!("{host}/clients/ctr:v1");
    ctr_cmd(&["images", "tag", &image, &copy]);
    ctr_cmd(&["images", "push", "--plain-http", &copy]);
    assert_eq!(served_digest(&reg, "clients/ctr", "v1"), pushed);

    // The same daemons against a registry with access control: `docker login` follows
    // the token flow (and stores a refresh token), then push and pull a private project.
    let secured = crate::start_with_auth(berth_auth::AuthSettings::default());
    let admin = Who::admin();
    let (s, _) = api(
        &secured,
        &admin,
        reqwest::Method::POST,
        "/users",
        Some(serde_json::json!({"name": "dockeruser", "password": "docker-password"})),
    );
    assert_eq!(s, StatusCode::CREATED);
    let config = tempfile::tempdir().unwrap();
    let docker_as = |args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new("docker");
        c.arg("--config")
            .arg(config.path())
            .args(["-H", &daemons.docker_host()])
            .args(args)
            .env("DOCKER_BUILDKIT", "0");
        match stdin {
            Some(input) => run_with_stdin(&mut c, input),
            None => run(&mut c),
        }
    };
    let secured_host = secured.host();
    docker_as(
        &[
            "login",
            "-u",
            "dockeruser",
            "--password-stdin",
            &secured_host,
        ],
        Some("docker-password"),
    );
    let stored = std::fs::read_to_string(config.path().join("config.json")).unwrap();
    assert!(
        stored.contains("identitytoken"),
        "docker keeps a refresh token, not the password: {stored}"
    );
    let private = format!("{secured_host}/dockeruser/app:v1");
    docker_as(&["tag", &image, &private], None);
    docker_as(&["push", &private], None);
    docker_as(&["rmi", &private], None);
    docker_as(&["pull", &private], None);
    docker_as(&["logout", &secured_host], None);
    docker_as(&["rmi", &private], None);
    let mut anonymous = Command::new("docker");
    anonymous.arg("--config").arg(config.path()).args([
        "-H",
        &daemons.docker_host(),
        "pull",
        &private,
    ]);
    let out = anonymous.output().unwrap();
    assert!(
        !out.status.success(),
        "an anonymous pull of a private project fails"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("docker login") || said.contains("authentication required"),
        "docker tells the user to log in, not a bare `unauthorized`: {said}"
    );
    // A robot account of the project logs in with docker and pulls.
    let (s, robot) = api(
        &secured,
        &admin,
        reqwest::Method::POST,
        "/projects/dockeruser/robots",
        Some(serde_json::json!({"name": "puller", "permissions": ["pull"]})),
    );
    assert_eq!(s, StatusCode::CREATED, "{robot}");
    docker_as(
        &[
            "login",
            "-u",
            robot["name"].as_str().unwrap(),
            "--password-stdin",
            &secured_host,
        ],
        Some(robot["secret"].as_str().unwrap()),
    );
    docker_as(&["pull", &private], None);
    // The pull-only robot's push is refused at once with a reason (not retried for a
    // minute behind a bare `unauthorized`).
    let started = std::time::Instant::now();
    let mut refused = Command::new("docker");
    refused.arg("--config").arg(config.path()).args([
        "-H",
        &daemons.docker_host(),
        "push",
        &private,
    ]);
    let out = refused.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a pull-only robot cannot push");
    assert!(
        said.contains("denied"),
        "docker says the push was denied: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused without a minute of retries: {:?} {said}",
        started.elapsed()
    );
    // ctr with Basic credentials through the token flow.
    let copy = format!("{secured_host}/dockeruser/ctr:v1");
    ctr_cmd(&["images", "tag", &image, &copy]);
    ctr_cmd(&[
        "images",
        "push",
        "--plain-http",
        "--user",
        "dockeruser:docker-password",
        &copy,
    ]);
    drop(daemons);
}

/// Runs a command with `input` on its standard input; returns stdout.
pub(crate) fn run_with_stdin(cmd: &mut Command, input: &str) -> String {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
