//! `berth pull` into the store and `berth unpack` into a root filesystem, on an image made
//! here with GNU tar: a second layer that changes, deletes (whiteout) and makes a
//! directory opaque. The result is compared, path by path, with `umoci unpack` of the same
//! image; so is a Debian root filesystem from debootstrap (owners and devices included), and
//! layers docker and buildah wrote.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use reqwest::StatusCode;
use serde_json::json;

use crate::*;

fn run(command: &mut Command) -> String {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(root: &Path, path: &str, body: &str) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

/// A tar of `dir` made by GNU tar (gzip-compressed if asked), and its uncompressed digest.
fn tar_of(dir: &Path, gzip: bool) -> (Vec<u8>, String) {
    tar_made(dir, gzip, &["--owner=0", "--group=0"])
}

/// [`tar_of`] keeping each file's owner.
fn tar_keeping_owners(dir: &Path, gzip: bool) -> (Vec<u8>, String) {
    tar_made(dir, gzip, &[])
}

fn tar_made(dir: &Path, gzip: bool, options: &[&str]) -> (Vec<u8>, String) {
    let out = Command::new("tar")
        .args(["--sort=name", "--numeric-owner"])
        .args(options)
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(out.status.success());
    let plain = out.stdout;
    let diff_id = sha256(&plain);
    if !gzip {
        return (plain, diff_id);
    }
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&plain).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out.stdout, diff_id)
}

/// Pushes a two-layer image: the second layer changes a file, deletes one, replaces a
/// directory's contents (opaque), adds a hard link and a symlink.
fn push_layered_image(base: &str, repo: &str, tag: &str) {
    let work = tempfile::tempdir().unwrap();
    let lower = work.path().join("lower");
    write(&lower, "etc/config", "lower\n");
    write(&lower, "etc/doomed", "bye\n");
    write(&lower, "opaque/old", "old\n");
    write(&lower, "opaque/sub/deep", "deep\n");
    write(&lower, "usr/lib/libx.so", "lib\n");
    std::fs::set_permissions(
        lower.join("usr/lib/libx.so"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let upper = work.path().join("upper");
    write(&upper, "etc/config", "upper\n");
    write(&upper, "etc/.wh.doomed", "");
    write(&upper, "opaque/.wh..wh..opq", "");
    write(&upper, "opaque/new", "new\n");
    std::fs::hard_link(upper.join("opaque/new"), upper.join("etc/new-link")).unwrap();
    std::os::unix::fs::symlink("/usr/lib/libx.so", upper.join("etc/libx-link")).unwrap();
    let (one, one_diff) = tar_of(&lower, false);
    let (two, two_diff) = tar_of(&upper, true);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [one_diff, two_diff]},
        "config": {},
    }))
    .unwrap();
    let config_digest = push_blob(base, repo, &config);
    let one_digest = push_blob(base, repo, &one);
    let two_digest = push_blob(base, repo, &two);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": one_digest, "size": one.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": two_digest, "size": two.len()},
        ],
    }))
    .unwrap();
    let r = put_manifest(
        base,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// Every path under `root`: its type, permission bits, size, content digest or link target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree_of(root, false)
}

/// [`tree`], with each path's owner too, and device numbers.
fn tree_of(root: &Path, owners: bool) -> BTreeMap<String, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.mode() & 0o7777;
            let kind = meta.file_type();
            let mut what = if kind.is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                pending.push(path.clone());
                format!("dir {mode:o}")
            } else if kind.is_char_device() || kind.is_block_device() {
                format!(
                    "{} {mode:o} device {}",
                    if kind.is_char_device() {
                        "char"
                    } else {
                        "block"
                    },
                    meta.rdev()
                )
            } else if kind.is_fifo() {
                format!("fifo {mode:o}")
            } else {
                format!(
                    "file {mode:o} {} {} links {}",
                    meta.len(),
                    sha256(&std::fs::read(&path).unwrap()),
                    meta.nlink()
                )
            };
            if owners {
                what.push_str(&format!(" owner {}:{}", meta.uid(), meta.gid()));
            }
            out.insert(rel, what);
        }
    }
    out
}

/// The entries of two trees that differ, for a readable failure.
fn differences(ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (path, what) in ours {
        match theirs.get(path) {
            Some(other) if other == what => {}
            Some(other) => text.push_str(&format!("{path}: berth {what} / umoci {other}\n")),
            None => text.push_str(&format!("{path}: only berth has it ({what})\n")),
        }
    }
    for (path, what) in theirs {
        if !ours.contains_key(path) {
            text.push_str(&format!("{path}: only umoci has it ({what})\n"));
        }
    }
    text
}

fn berth(args: &[&str], home: &Path) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("HOME", home)
        .env("DOCKER_CONFIG", home.join(".docker"))
        .env("XDG_RUNTIME_DIR", home)
        .env_remove("XDG_DATA_HOME"))
}

#[test]
fn pull_and_unpack_stack_layers_as_umoci_does() {
    let reg = start();
    push_layered_image(&reg.url(), "team/fs", "v1");
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let rootfs = home.path().join("rootfs");
    let image = format!("{}/team/fs:v1", reg.host());

    let out = berth(
        &[
            "pull",
            &image,
            "--platform",
            "linux/amd64",
            "--store",
            store.to_str().unwrap(),
            "--unpack",
            rootfs.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(out.contains("3 blobs downloaded"), "{out}");
    assert!(out.contains("unpacked 2 layers"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/config")).unwrap(),
        "upper\n"
    );
    assert!(!rootfs.join("etc/doomed").exists(), "whiteout");
    assert!(!rootfs.join("etc/.wh.doomed").exists());
    let mut opaque: Vec<String> = std::fs::read_dir(rootfs.join("opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opaque.sort();
    assert_eq!(opaque, vec!["new"], "opaque directory");
    assert_eq!(
        std::fs::metadata(rootfs.join("etc/new-link"))
            .unwrap()
            .ino(),
        std::fs::metadata(rootfs.join("opaque/new")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("etc/libx-link")).unwrap(),
        Path::new("/usr/lib/libx.so")
    );

    // Again: everything is in the store already.
    let out = berth(
        &[
            "pull",
            &image,
            "--platform",
            "linux/amd64",
            "--store",
            store.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(
        out.contains("0 blobs downloaded") && out.contains("3 already in the store"),
        "{out}"
    );

    // The default store is under the user's data directory.
    let out = berth(&["pull", &image, "--platform", "linux/amd64"], home.path());
    assert!(out.contains("3 blobs downloaded"), "{out}");
    assert!(home
        .path()
        .join(".local/share/berth/store/index.json")
        .is_file());

    // The same image unpacked by umoci, from a layout berth writes.
    let Some(umoci) = berth_testkit::tool("umoci") else {
        return;
    };
    let layout = home.path().join("layout");
    berth(
        &["copy", &image, &format!("oci:{}:v1", layout.display())],
        home.path(),
    );
    let bundle = home.path().join("bundle");
    run(Command::new(umoci)
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let from_layout = home.path().join("from-layout");
    let out = berth(
        &[
            "unpack",
            &format!("oci:{}:v1", layout.display()),
            from_layout.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(out.contains("unpacked 2 layers"), "{out}");
    let ours = tree(&from_layout);
    let theirs = tree(&bundle.join("rootfs"));
    assert_eq!(ours, theirs, "berth unpack and umoci unpack differ");
    assert_eq!(ours, tree(&rootfs), "pull --unpack and unpack agree");
}

#[test]
fn unpack_refuses_what_it_cannot_do_and_says_why() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["unpack", "oci:/nonexistent/layout:v1"])
        .arg(home.path().join("root"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no OCI image layout"));
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["pull", "127.0.0.1:1/team/fs:v1", "--platform", "linux"])
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected os/arch"));
}

#[test]
fn layers_buildah_writes_unpack_as_umoci_unpacks_them() {
    let (Some(buildah), Some(umoci)) =
        (berth_testkit::tool("buildah"), berth_testkit::tool("umoci"))
    else {
        return;
    };
    let reg = start();
    let dir = tempfile::tempdir().unwrap();
    let storage = |args: &[&str]| {
        let mut c = Command::new(&buildah);
        c.arg("--root")
            .arg(dir.path().join("root"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    // Layer one: files and a directory; layer two deletes a file and a directory (buildah
    // writes whiteouts for them), changes a file and adds a symlink.
    let container = run(&mut storage(&["from", "scratch"])).trim().to_owned();
    let mount = std::path::PathBuf::from(run(&mut storage(&["mount", &container])).trim());
    write(&mount, "etc/keep", "keep\n");
    write(&mount, "etc/gone", "gone\n");
    write(&mount, "var/cache/a", "a\n");
    write(&mount, "var/cache/b", "b\n");
    run(&mut storage(&["umount", &container]));
    run(&mut storage(&[
        "commit",
        "--quiet",
        &container,
        "localhost/layers:one",
    ]));
    run(&mut storage(&["rm", &container]));
    let container = run(&mut storage(&["from", "localhost/layers:one"]))
        .trim()
        .to_owned();
    let mount = std::path::PathBuf::from(run(&mut storage(&["mount", &container])).trim());
    std::fs::remove_file(mount.join("etc/gone")).unwrap();
    std::fs::remove_dir_all(mount.join("var/cache")).unwrap();
    write(&mount, "etc/keep", "changed\n");
    std::os::unix::fs::symlink("keep", mount.join("etc/alias")).unwrap();
    run(&mut storage(&["umount", &container]));
    run(&mut storage(&[
        "commit",
        "--quiet",
        &container,
        "localhost/layers:two",
    ]));
    let remote = format!("{}/buildah/layers:two", reg.host());
    run(&mut storage(&[
        "push",
        "--tls-verify=false",
        "localhost/layers:two",
        &format!("docker://{remote}"),
    ]));

    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let rootfs = dir.path().join("rootfs");
    let out = berth(
        &[
            "pull",
            &remote,
            "--platform",
            "linux/amd64",
            "--store",
            dir.path().join("store").to_str().unwrap(),
            "--unpack",
            rootfs.to_str().unwrap(),
        ],
        &home,
    );
    assert!(out.contains("unpacked 2 layers"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/keep")).unwrap(),
        "changed\n"
    );
    assert!(!rootfs.join("etc/gone").exists());
    assert!(!rootfs.join("var/cache").exists());

    let layout = dir.path().join("layout");
    berth(
        &["copy", &remote, &format!("oci:{}:two", layout.display())],
        &home,
    );
    let bundle = dir.path().join("bundle");
    run(Command::new(umoci)
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:two", layout.display()))
        .arg(&bundle));
    assert_eq!(
        tree(&rootfs),
        tree(&bundle.join("rootfs")),
        "berth and umoci differ on buildah's layers"
    );
}

#[test]
fn without_root_read_only_directories_are_filled_and_emptied() {
    let Some(setpriv) = berth_testkit::tool("setpriv") else {
        return;
    };
    let uid = run(Command::new("id").arg("-u"));
    if uid.trim() != "0" {
        eprintln!("skipping: switching to another user needs root");
        return;
    }
    let reg = start();
    let work = tempfile::tempdir().unwrap();
    let staging = work.path().join("staging");
    // Layer one: read-only directories, one of them nested in another.
    let lower = staging.join("lower");
    write(&lower, "ro/old", "old\n");
    write(&lower, "gone/sub/file", "f\n");
    for dir in ["ro", "gone/sub", "gone"] {
        std::fs::set_permissions(lower.join(dir), std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    // Layer two: a file into the read-only directory, and the read-only tree whited out.
    let upper = staging.join("upper");
    write(&upper, "ro/new", "new\n");
    write(&upper, ".wh.gone", "");
    std::fs::set_permissions(upper.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let (one, one_diff) = tar_of(&lower, false);
    let (two, two_diff) = tar_of(&upper, false);
    let base = reg.url();
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [one_diff, two_diff]}})).unwrap();
    let (c, l1, l2) = (
        push_blob(&base, "ro/fs", &config),
        push_blob(&base, "ro/fs", &one),
        push_blob(&base, "ro/fs", &two),
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l1, "size": one.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l2, "size": two.len()},
        ],
    }))
    .unwrap();
    assert_eq!(
        put_manifest(
            &base,
            "ro/fs",
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
            &manifest
        )
        .status(),
        StatusCode::CREATED
    );

    // The layout and a copy of the binary, owned by `nobody`, who then unpacks.
    let layout = work.path().join("layout");
    berth(
        &[
            "copy",
            &format!("{}/ro/fs:v1", reg.host()),
            &format!("oci:{}:v1", layout.display()),
        ],
        work.path(),
    );
    let binary = work.path().join("berth");
    std::fs::copy(env!("CARGO_BIN_EXE_berth"), &binary).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    run(Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&layout)
        .arg(&binary));
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("chown").arg("65534:65534").arg(&rootfs));
    let out = run(Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .arg("unpack")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&rootfs)
        .env("HOME", work.path()));
    assert!(out.contains("unpacked 2 layers"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("ro/new")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("ro/old")).unwrap(),
        "old\n"
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("ro")).unwrap().mode() & 0o777,
        0o555,
        "the mode comes back"
    );
    assert!(
        !rootfs.join("gone").exists(),
        "a read-only tree is whited out"
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("ro/new")).unwrap().uid(),
        65534,
        "owned by the caller"
    );
}

/// Pushes an image of `layers` (each a tar, gzip-compressed or not, and its diff ID).
fn push_layers(base: &str, repo: &str, tag: &str, layers: &[(Vec<u8>, String, bool)]) {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>()},
        "config": {"Cmd": ["/bin/bash"]},
    }))
    .unwrap();
    let config_digest = push_blob(base, repo, &config);
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|(bytes, _, gzip)| {
            json!({
                "mediaType": if *gzip { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" },
                "digest": push_blob(base, repo, bytes),
                "size": bytes.len(),
            })
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let r = put_manifest(
        base,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// `berth pull --unpack` of `image` and `umoci unpack` of the same image (copied into a
/// layout by skopeo) give the same tree, owners and devices included when run as root.
fn assert_unpacks_as_umoci(
    (umoci, skopeo): (&Path, &Path),
    image: &str,
    work: &Path,
    name: &str,
    as_root: bool,
) {
    let home = work.join(format!("{name}-home"));
    std::fs::create_dir_all(&home).unwrap();
    let rootfs = work.join(format!("{name}-berth"));
    let mut pull = vec![
        "pull",
        image,
        "--platform",
        "linux/amd64",
        "--unpack",
        rootfs.to_str().unwrap(),
    ];
    if as_root {
        pull.push("--keep-owners");
    }
    let out = berth(&pull, &home);
    assert!(out.contains("unpacked"), "{out}");
    // umoci reads only OCI manifests: skopeo converts Docker's (the layers stay as
    // they are), and makes umoci's copy independently of berth.
    let layout = work.join(format!("{name}-layout"));
    run(Command::new(skopeo)
        .args(["copy", "--format", "oci", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:v1", layout.display())));
    let bundle = work.join(format!("{name}-umoci"));
    let mut unpack = Command::new(umoci);
    unpack.arg("unpack");
    if !as_root {
        unpack.arg("--rootless");
    }
    run(unpack
        .arg("--image")
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let ours = tree_of(&rootfs, as_root);
    let theirs = tree_of(&bundle.join("rootfs"), as_root);
    assert!(ours.len() > 10, "{name}: an image with files");
    assert!(
        ours == theirs,
        "{name}: berth and umoci differ:\n{}",
        differences(&ours, &theirs)
    );
}

#[test]
fn a_debian_image_and_docker_layers_over_it_unpack_as_umoci_unpacks_them() {
    let (Some(debootstrap), Some(umoci), Some(skopeo)) = (
        berth_testkit::tool("debootstrap"),
        berth_testkit::tool("umoci"),
        berth_testkit::tool("skopeo"),
    ) else {
        eprintln!("skipped: debootstrap, umoci and skopeo are not all installed");
        return;
    };
    let as_root = run(Command::new("id").arg("-u")).trim() == "0";
    if !as_root {
        eprintln!("skipped: debootstrap needs root");
        return;
    }
    let reg = start();
    let work = tempfile::tempdir().unwrap();
    let lower = work.path().join("debian");
    let mut bootstrap = Command::new(debootstrap);
    bootstrap
        .args(["--variant=minbase", "bookworm"])
        .arg(&lower);
    // The archive apt itself uses here, where the sources name one.
    if let Some(mirror) = apt_archive() {
        bootstrap.arg(mirror);
    }
    run(&mut bootstrap);
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = lower.join(cache);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "deb") || cache.ends_with("lists") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    // The second layer adds, changes and deletes files, deletes a directory, makes one
    // opaque, and adds files owned by another user, a hard link and a symlink.
    let upper = work.path().join("upper");
    write(&upper, "etc/motd", "changed by the second layer\n");
    write(&upper, "etc/.wh.issue.net", "");
    write(&upper, "var/.wh.backups", "");
    write(&upper, "usr/share/doc/.wh..wh..opq", "");
    write(&upper, "usr/share/doc/README", "only this is left\n");
    write(&upper, "home/tester/notes", "private\n");
    std::fs::hard_link(
        upper.join("home/tester/notes"),
        upper.join("home/tester/same"),
    )
    .unwrap();
    std::fs::set_permissions(
        upper.join("home/tester/notes"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        upper.join("home/tester"),
        std::fs::Permissions::from_mode(0o2750),
    )
    .unwrap();
    run(Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(upper.join("home/tester")));
    std::fs::create_dir_all(upper.join("usr/local/bin")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/env", upper.join("usr/local/bin/env")).unwrap();
    let (one, one_diff) = tar_keeping_owners(&lower, true);
    let (two, two_diff) = tar_keeping_owners(&upper, false);
    push_layers(
        &reg.url(),
        "debian/base",
        "v1",
        &[(one, one_diff, true), (two, two_diff, false)],
    );
    let image = format!("{}/debian/base:v1", reg.host());
    assert_unpacks_as_umoci((&umoci, &skopeo), &image, work.path(), "debian", as_root);
    let rootfs = work.path().join("debian-berth");
    assert!(!rootfs.join("etc/issue.net").exists() && !rootfs.join("var/backups").exists());
    assert_eq!(
        std::fs::read_dir(rootfs.join("usr/share/doc"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("home/tester/notes"))
            .unwrap()
            .uid(),
        1000
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("etc/shadow")).unwrap().gid(),
        std::fs::metadata(lower.join("etc/shadow")).unwrap().gid(),
        "a group other than root's is kept"
    );
    // Rootless, the owners are recorded as umoci records them.
    let layout = format!("{}:v1", work.path().join("debian-layout").display());
    let rootless = work.path().join("debian-rootless");
    berth(
        &[
            "unpack",
            &format!("oci:{layout}"),
            rootless.to_str().unwrap(),
        ],
        &work.path().join("debian-home"),
    );
    let bundle = work.path().join("debian-umoci-rootless");
    run(Command::new(&umoci)
        .args(["unpack", "--rootless", "--image", &layout])
        .arg(&bundle));
    let owner_attribute = |path: &Path| {
        run(Command::new("python3")
            .args([
                "-c",
                "import os, sys; print(os.getxattr(sys.argv[1], 'user.rootlesscontainers').hex())",
            ])
            .arg(path))
    };
    for path in ["home/tester/notes", "home/tester", "etc/shadow"] {
        assert_eq!(
            owner_attribute(&rootless.join(path)),
            owner_attribute(&bundle.join("rootfs").join(path)),
            "{path}"
        );
    }
    assert_eq!(
        owner_attribute(&rootless.join("home/tester/notes")).trim(),
        "08e80710e807"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(rootfs.join("dev/null"))
        .unwrap()
        .file_type()
        .is_char_device());

    // Layers docker writes: a build over the same image, pushed by docker.
    let (Some(containerd), Some(dockerd), Some(_)) = (
        berth_testkit::tool("containerd"),
        berth_testkit::tool("dockerd"),
        berth_testkit::tool("docker"),
    ) else {
        return;
    };
    let daemons = crate::clients::Daemons::start(&containerd, Some(&dockerd));
    let docker = |args: &[&str]| {
        run(Command::new("docker")
            .args(["-H", &daemons.docker_host()])
            .args(args)
            .env("DOCKER_BUILDKIT", "0"))
    };
    let context = work.path().join("context");
    write(&context, "etc/motd", "changed by docker\n");
    write(&context, "etc/app/settings.toml", "level = 3\n");
    write(&context, "opt/app/bin/run", "#!/bin/sh\necho run\n");
    std::fs::set_permissions(
        context.join("opt/app/bin/run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {image}\nCOPY etc/ /etc/\nCOPY opt/ /opt/\n"),
    )
    .unwrap();
    let built = format!("{}/debian/docker:v1", reg.host());
    docker(&["build", "-q", "-t", &built, context.to_str().unwrap()]);
    docker(&["push", &built]);
    assert_unpacks_as_umoci((&umoci, &skopeo), &built, work.path(), "docker", as_root);
    assert_eq!(
        std::fs::read_to_string(work.path().join("docker-berth/etc/motd")).unwrap(),
        "changed by docker\n"
    );
}

/// The Debian archive apt is set up with (the first `URIs:` of a `.sources` file, or the
/// first `deb` line of `sources.list`, that is not the security archive), if any.
fn apt_archive() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            if entry
                .path()
                .extension()
                .is_some_and(|x| x == "sources" || x == "list")
            {
                texts.extend(std::fs::read_to_string(entry.path()));
            }
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list"));
    texts.iter().flat_map(|t| t.lines()).find_map(|line| {
        let line = line.trim();
        let uri = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().next()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace().find(|w| w.starts_with("http"))
        } else {
            None
        }?;
        (uri.starts_with("http") && uri.ends_with("/debian")).then(|| uri.to_owned())
    })
}
