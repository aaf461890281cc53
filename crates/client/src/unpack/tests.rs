//! Layer stacks, escapes and compressions, and arbitrary archives (property test).

use super::*;
use std::os::unix::fs::MetadataExt;

/// One tar entry, with any path bytes (the tar writer's own checks are bypassed, so
/// hostile archives can be made).
#[derive(Debug, Clone)]
pub(super) enum E {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8], u32),
    Symlink(&'static str, &'static str),
    Link(&'static str, &'static str),
}

pub(super) fn raw_entry(
    out: &mut Vec<u8>,
    path: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    body: &[u8],
    mode: u32,
) {
    let mut header = tar::Header::new_gnu();
    {
        let old = header.as_old_mut();
        old.name[..path.len().min(100)].copy_from_slice(&path[..path.len().min(100)]);
        old.linkname[..link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(body.len() as u64);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    let pad = (512 - body.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

pub(super) fn layer(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        match e {
            E::Dir(p, mode) => raw_entry(
                &mut out,
                p.as_bytes(),
                tar::EntryType::Directory,
                b"",
                b"",
                *mode,
            ),
            E::File(p, body, mode) => raw_entry(
                &mut out,
                p.as_bytes(),
                tar::EntryType::Regular,
                b"",
                body,
                *mode,
            ),
            E::Symlink(p, t) => raw_entry(
                &mut out,
                p.as_bytes(),
                tar::EntryType::Symlink,
                t.as_bytes(),
                b"",
                0o777,
            ),
            E::Link(p, t) => raw_entry(
                &mut out,
                p.as_bytes(),
                tar::EntryType::Link,
                t.as_bytes(),
                b"",
                0o644,
            ),
        }
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// A root inside a parent that also holds `outside/`, to see escapes land.
fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    let outside = parent.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    (parent, root, outside)
}

fn apply(root: &Path, entries: &[E]) -> Result<LayerReport, UnpackError> {
    apply_layer(root, &layer(entries)[..], UnpackOptions::default())
}

fn read(root: &Path, p: &str) -> Option<String> {
    fs::read_to_string(root.join(p)).ok()
}

#[test]
fn upper_files_replace_lower_ones_and_whiteouts_delete() {
    let (_p, root, _) = sandbox();
    apply(
        &root,
        &[
            E::Dir("etc", 0o755),
            E::File("etc/a", b"lower", 0o644),
            E::File("etc/b", b"b", 0o644),
            E::Dir("var/lib/x", 0o755),
            E::File("var/lib/x/f", b"f", 0o644),
        ],
    )
    .unwrap();
    let report = apply(
        &root,
        &[
            E::File("etc/a", b"upper", 0o600),
            E::File("etc/.wh.b", b"", 0o644),
            E::File("var/lib/.wh.x", b"", 0o644),
        ],
    )
    .unwrap();
    assert_eq!(read(&root, "etc/a").as_deref(), Some("upper"));
    assert_eq!(
        fs::metadata(root.join("etc/a")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(!root.join("etc/b").exists());
    assert!(!root.join("etc/.wh.b").exists(), "whiteouts are not files");
    assert!(!root.join("var/lib/x").exists(), "a directory goes whole");
    assert!(root.join("var/lib").is_dir());
    assert_eq!(report.whiteouts, 2);
}

#[test]
fn an_opaque_directory_keeps_only_this_layers_files() {
    let (_p, root, _) = sandbox();
    apply(
        &root,
        &[
            E::Dir("d", 0o755),
            E::File("d/old", b"o", 0o644),
            E::Dir("d/sub", 0o755),
            E::File("d/sub/deep", b"x", 0o644),
        ],
    )
    .unwrap();
    // The marker after one new file and before another: both stay.
    apply(
        &root,
        &[
            E::File("d/new1", b"1", 0o644),
            E::File("d/.wh..wh..opq", b"", 0o644),
            E::File("d/new2", b"2", 0o644),
        ],
    )
    .unwrap();
    let mut names: Vec<String> = fs::read_dir(root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["new1", "new2"]);
}

#[test]
fn hard_links_reach_lower_layers_and_kinds_replace_each_other() {
    let (_p, root, _) = sandbox();
    apply(
        &root,
        &[
            E::File("bin/tool", b"elf", 0o755),
            E::Dir("x", 0o755),
            E::File("y", b"file", 0o644),
        ],
    )
    .unwrap();
    apply(
        &root,
        &[
            E::Link("bin/alias", "bin/tool"),
            E::File("x", b"now a file", 0o644),
            E::Dir("y", 0o700),
            E::File("y/inside", b"i", 0o644),
        ],
    )
    .unwrap();
    let a = fs::metadata(root.join("bin/alias")).unwrap();
    let t = fs::metadata(root.join("bin/tool")).unwrap();
    assert_eq!(a.ino(), t.ino(), "one inode");
    assert_eq!(read(&root, "x").as_deref(), Some("now a file"));
    assert_eq!(read(&root, "y/inside").as_deref(), Some("i"));
    assert_eq!(fs::metadata(root.join("y")).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn absolute_symlinks_resolve_inside_the_root() {
    let (_p, root, outside) = sandbox();
    // usr-merge style: /lib -> /usr/lib, then a file written through it.
    apply(
        &root,
        &[
            E::Dir("usr/lib", 0o755),
            E::Symlink("lib", "/usr/lib"),
            E::Symlink("escape", "/"),
        ],
    )
    .unwrap();
    apply(
        &root,
        &[
            E::File("lib/libc.so", b"so", 0o644),
            E::File("escape/etc-file", b"e", 0o644),
        ],
    )
    .unwrap();
    assert_eq!(read(&root, "usr/lib/libc.so").as_deref(), Some("so"));
    assert_eq!(
        read(&root, "etc-file").as_deref(),
        Some("e"),
        "/ is the root's /"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn a_read_only_directory_is_still_filled() {
    let (_p, root, _) = sandbox();
    apply(&root, &[E::Dir("ro", 0o555), E::File("ro/f", b"f", 0o444)]).unwrap();
    assert_eq!(read(&root, "ro/f").as_deref(), Some("f"));
    assert_eq!(fs::metadata(root.join("ro")).unwrap().mode() & 0o777, 0o555);
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn escapes_are_refused_with_a_clear_error() {
    for (entries, words) in [
        (vec![E::File("../evil", b"x", 0o644)], "a path with .."),
        (vec![E::File("a/../../evil", b"x", 0o644)], "a path with .."),
        (
            vec![E::File("/etc/passwd", b"x", 0o644)],
            "an absolute path",
        ),
        (
            vec![E::Symlink("up", "../.."), E::File("up/evil", b"x", 0o644)],
            "leads outside the root",
        ),
        (
            vec![
                E::Symlink("up", "../outside"),
                E::File("up/evil", b"x", 0o644),
            ],
            "leads outside the root",
        ),
        (vec![E::Link("l", "../outside/x")], "a path with .."),
        (vec![E::Link("l", "/")], "a hard link to the root"),
        (vec![E::File(".wh..", b"", 0o644)], "a whiteout of no name"),
    ] {
        let (_p, root, outside) = sandbox();
        let err = apply(&root, &entries).unwrap_err();
        assert!(err.to_string().contains(words), "{entries:?}: {err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{entries:?}");
        assert!(!_p.path().join("evil").exists());
    }
}

#[test]
fn gzip_and_zstd_layers_are_read() {
    use std::io::Write;
    let tar = layer(&[E::File("hello", b"world", 0o644)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst =
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
    for bytes in [gz, zst, tar.clone()] {
        let (_p, root, _) = sandbox();
        apply_layer(&root, &bytes[..], UnpackOptions::default()).unwrap();
        assert_eq!(read(&root, "hello").as_deref(), Some("world"));
    }
    let (_p, root, _) = sandbox();
    let err = apply_layer(
        &root,
        &b"\x1f\x8bnot gzip at all"[..],
        UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::Archive(_)), "{err}");
}

/// What a path holds after a stack of layers.
#[derive(Debug)]
enum Want {
    File(&'static str),
    Dir,
    Symlink(&'static str),
    Absent,
    /// The same inode as another path.
    SameFile(&'static str),
    /// A directory holding exactly these names.
    Holds(&'static [&'static str]),
    /// Permission bits.
    Mode(u32),
}

fn check(root: &Path, stack: &str, path: &str, want: &Want) {
    let meta = fs::symlink_metadata(root.join(path));
    let shown = format!("stack {stack:?}, path {path:?}: want {want:?}, have {meta:?}");
    match want {
        Want::File(body) => {
            assert!(meta.as_ref().is_ok_and(|m| m.is_file()), "{shown}");
            assert_eq!(read(root, path).as_deref(), Some(*body), "{shown}");
        }
        Want::Dir => assert!(meta.is_ok_and(|m| m.is_dir()), "{shown}"),
        Want::Symlink(target) => {
            assert!(meta.is_ok_and(|m| m.file_type().is_symlink()), "{shown}");
            assert_eq!(
                fs::read_link(root.join(path)).unwrap(),
                Path::new(target),
                "{shown}"
            );
        }
        Want::Absent => assert!(meta.is_err(), "{shown}"),
        Want::SameFile(other) => {
            let other = fs::metadata(root.join(other)).unwrap();
            assert_eq!(meta.unwrap().ino(), other.ino(), "{shown}");
        }
        Want::Holds(names) => {
            let mut have: Vec<String> = fs::read_dir(root.join(path))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            have.sort();
            assert_eq!(have, *names, "{shown}");
        }
        Want::Mode(mode) => assert_eq!(meta.unwrap().mode() & 0o7777, *mode, "{shown}"),
    }
}

/// Layer stacks, one rule of the image specification's changeset rules each, applied
/// in order to an empty root and checked path by path.
#[test]
fn layer_stacks_follow_the_changeset_rules() {
    type Stack = (&'static str, Vec<Vec<E>>, Vec<(&'static str, Want)>);
    let stacks: Vec<Stack> = vec![
        (
            "a whiteout deletes a lower file and only that",
            vec![
                vec![E::File("d/a", b"a", 0o644), E::File("d/b", b"b", 0o644)],
                vec![E::File("d/.wh.a", b"", 0o644)],
            ],
            vec![
                ("d/a", Want::Absent),
                ("d/b", Want::File("b")),
                ("d/.wh.a", Want::Absent),
            ],
        ),
        (
            "a whiteout of a directory deletes its whole tree",
            vec![
                vec![
                    E::File("t/x/y/z", b"z", 0o644),
                    E::File("t/keep", b"k", 0o644),
                ],
                vec![E::File("t/.wh.x", b"", 0o644)],
            ],
            vec![("t/x", Want::Absent), ("t", Want::Holds(&["keep"]))],
        ),
        (
            "a whiteout of nothing changes nothing",
            vec![
                vec![E::File("d/a", b"a", 0o644)],
                vec![
                    E::File("d/.wh.ghost", b"", 0o644),
                    E::File("e/.wh.ghost", b"", 0o644),
                ],
            ],
            vec![("d", Want::Holds(&["a"])), ("e", Want::Holds(&[]))],
        ),
        (
            "a whiteout of a symlink deletes the link, not its target",
            vec![
                vec![E::File("real", b"r", 0o644), E::Symlink("alias", "real")],
                vec![E::File(".wh.alias", b"", 0o644)],
            ],
            vec![("alias", Want::Absent), ("real", Want::File("r"))],
        ),
        (
            "deleted, then made again in a later layer",
            vec![
                vec![E::File("f", b"one", 0o644)],
                vec![E::File(".wh.f", b"", 0o644)],
                vec![E::File("f", b"three", 0o600)],
            ],
            vec![("f", Want::File("three")), ("f", Want::Mode(0o600))],
        ),
        (
            "a whiteout and a new file of the same name in one layer: the new file stays",
            vec![
                vec![E::Dir("d", 0o755), E::File("d/x", b"x", 0o644)],
                vec![
                    E::File(".wh.d", b"", 0o644),
                    E::File("d", b"a file now", 0o644),
                ],
            ],
            vec![("d", Want::File("a file now"))],
        ),
        (
            "an opaque directory hides every lower entry, deep ones too",
            vec![
                vec![E::File("o/a", b"a", 0o644), E::File("o/s/t/u", b"u", 0o644)],
                vec![E::File("o/.wh..wh..opq", b"", 0o644)],
            ],
            vec![("o", Want::Dir), ("o", Want::Holds(&[]))],
        ),
        (
            "an opaque directory with deletions and additions of its layer",
            vec![
                vec![E::File("o/a", b"a", 0o644), E::File("o/b", b"b", 0o644)],
                vec![
                    E::File("o/.wh..wh..opq", b"", 0o644),
                    E::File("o/b", b"new b", 0o644),
                    E::File("o/sub/c", b"c", 0o644),
                ],
                vec![E::File("o/sub/.wh.c", b"", 0o644)],
            ],
            vec![
                ("o", Want::Holds(&["b", "sub"])),
                ("o/b", Want::File("new b")),
                ("o/sub", Want::Holds(&[])),
            ],
        ),
        (
            "an opaque directory where a lower layer had a file",
            vec![
                vec![E::File("p", b"file", 0o644)],
                vec![
                    E::Dir("p", 0o755),
                    E::File("p/.wh..wh..opq", b"", 0o644),
                    E::File("p/in", b"i", 0o644),
                ],
            ],
            vec![("p", Want::Holds(&["in"]))],
        ),
        (
            "a file replaces a directory tree",
            vec![
                vec![E::File("k/deep/er", b"e", 0o644)],
                vec![E::File("k", b"flat", 0o644)],
            ],
            vec![("k", Want::File("flat"))],
        ),
        (
            "a directory replaces a symlink, and is not written through it",
            vec![
                vec![E::Dir("target", 0o755), E::Symlink("s", "target")],
                vec![E::Dir("s", 0o700), E::File("s/inside", b"i", 0o644)],
            ],
            vec![
                ("s", Want::Dir),
                ("s", Want::Mode(0o700)),
                ("target", Want::Holds(&[])),
            ],
        ),
        (
            "a file replaces a symlink, and is not written through it",
            vec![
                vec![
                    E::File("target", b"keep me", 0o644),
                    E::Symlink("s", "target"),
                ],
                vec![E::File("s", b"own", 0o644)],
            ],
            vec![("s", Want::File("own")), ("target", Want::File("keep me"))],
        ),
        (
            "a symlink replaces a file",
            vec![
                vec![E::File("f", b"f", 0o644)],
                vec![E::Symlink("f", "/etc/elsewhere")],
            ],
            vec![("f", Want::Symlink("/etc/elsewhere"))],
        ),
        (
            "a hard link outlives the whiteout of its target",
            vec![
                vec![E::File("bin/tool", b"elf", 0o755)],
                vec![E::Link("bin/alias", "bin/tool")],
                vec![E::File("bin/.wh.tool", b"", 0o644)],
            ],
            vec![("bin/tool", Want::Absent), ("bin/alias", Want::File("elf"))],
        ),
        (
            "a hard link in the same layer, to a file earlier in it",
            vec![vec![
                E::File("a", b"same", 0o640),
                E::Link("b", "a"),
                E::Link("c", "b"),
            ]],
            vec![
                ("b", Want::SameFile("a")),
                ("c", Want::SameFile("a")),
                ("c", Want::Mode(0o640)),
            ],
        ),
        (
            "a hard link replaces the file at its path",
            vec![
                vec![E::File("one", b"1", 0o644), E::File("two", b"2", 0o644)],
                vec![E::Link("two", "one")],
            ],
            vec![("two", Want::SameFile("one")), ("two", Want::File("1"))],
        ),
        (
            "a directory entry again only changes its mode; its files stay",
            vec![
                vec![E::Dir("m", 0o755), E::File("m/f", b"f", 0o644)],
                vec![E::Dir("m", 0o750)],
            ],
            vec![("m", Want::Mode(0o750)), ("m", Want::Holds(&["f"]))],
        ),
        (
            "parents a layer does not list are made",
            vec![vec![E::File("no/parents/listed", b"x", 0o644)]],
            vec![
                ("no/parents", Want::Dir),
                ("no/parents/listed", Want::File("x")),
            ],
        ),
        (
            "a relative symlink through a lower directory symlink lands inside",
            vec![
                vec![E::Dir("usr/lib", 0o755), E::Symlink("lib", "usr/lib")],
                vec![
                    E::File("lib/x.so", b"so", 0o644),
                    E::Symlink("lib/y.so", "x.so"),
                ],
            ],
            vec![
                ("usr/lib/x.so", Want::File("so")),
                ("usr/lib/y.so", Want::Symlink("x.so")),
            ],
        ),
        (
            "setuid, setgid and sticky bits are kept",
            vec![vec![
                E::File("bin/su", b"s", 0o4755),
                E::Dir("shared", 0o2775),
                E::Dir("tmp", 0o1777),
            ]],
            vec![
                ("bin/su", Want::Mode(0o4755)),
                ("shared", Want::Mode(0o2775)),
                ("tmp", Want::Mode(0o1777)),
            ],
        ),
    ];
    assert!(stacks.len() >= 20);
    for (name, layers, wants) in &stacks {
        let (_p, root, outside) = sandbox();
        for (i, entries) in layers.iter().enumerate() {
            apply(&root, entries).unwrap_or_else(|e| panic!("{name}: layer {i}: {e}"));
        }
        for (path, want) in wants {
            check(&root, name, path, want);
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{name}");
    }
}

/// Without `keep_owners` files are the caller's; an owner other than root is recorded in
/// `user.rootlesscontainers`, encoded as the rootless-containers protobuf.
#[test]
fn rootless_unpacks_record_the_owner_in_an_attribute() {
    assert_eq!(
        rootless_owner(1000, 1000),
        vec![0x08, 0xe8, 0x07, 0x10, 0xe8, 0x07]
    );
    assert_eq!(
        rootless_owner(0, 42),
        vec![0x08, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x10, 42],
        "root is the unchanged ID"
    );
    let mut tar = Vec::new();
    for (path, uid) in [("owned", 1000u64), ("roots", 0)] {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
    }
    tar.extend(std::iter::repeat_n(0u8, 1024));
    let (_p, root, _) = sandbox();
    let report = apply_layer(&root, &tar[..], UnpackOptions::default()).unwrap();
    let mut value = vec![0u8; 64];
    match rustix::fs::getxattr(root.join("owned"), ROOTLESS_OWNER_XATTR, &mut value) {
        Ok(n) => assert_eq!(&value[..n], &rootless_owner(1000, 1000)[..]),
        // A file system without user attributes: counted, not fatal.
        Err(_) => assert_eq!(report.skipped_xattrs, 1),
    }
    assert!(rustix::fs::getxattr(root.join("roots"), ROOTLESS_OWNER_XATTR, &mut value).is_err());
    assert_eq!(
        fs::metadata(root.join("owned")).unwrap().uid(),
        rustix::process::geteuid().as_raw()
    );
}

/// Device nodes are made only for root (with `keep_owners`); otherwise they are counted
/// as skipped. FIFOs are made either way.
#[test]
fn devices_are_made_as_root_and_skipped_otherwise() {
    use std::os::unix::fs::FileTypeExt;
    let mut tar = Vec::new();
    for (path, kind) in [
        ("dev/null", tar::EntryType::Char),
        ("dev/loop9", tar::EntryType::Block),
        ("run/pipe", tar::EntryType::Fifo),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_entry_type(kind);
        header.set_mode(0o666);
        header.set_size(0);
        header
            .set_device_major(if kind == tar::EntryType::Block { 7 } else { 1 })
            .unwrap();
        header
            .set_device_minor(if kind == tar::EntryType::Block { 9 } else { 3 })
            .unwrap();
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
    }
    tar.extend(std::iter::repeat_n(0u8, 1024));

    let (_p, root, _) = sandbox();
    let report = apply_layer(&root, &tar[..], UnpackOptions::default()).unwrap();
    assert_eq!(report.skipped_devices, 2);
    assert!(!root.join("dev/null").exists() && !root.join("dev/loop9").exists());
    assert!(fs::symlink_metadata(root.join("run/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());

    if !rustix::process::geteuid().is_root() {
        return;
    }
    let (_p, root, _) = sandbox();
    let options = UnpackOptions { keep_owners: true };
    let report = apply_layer(&root, &tar[..], options).unwrap();
    assert_eq!(report.skipped_devices, 0);
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.mode() & 0o777, 0o666);
    let block = fs::symlink_metadata(root.join("dev/loop9")).unwrap();
    assert!(block.file_type().is_block_device());
    assert_eq!(block.rdev(), rustix::fs::makedev(7, 9));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn path() -> impl Strategy<Value = String> {
        let part = prop::sample::select(vec![
            "a",
            "b",
            "..",
            ".",
            "",
            ".wh.a",
            ".wh.b",
            ".wh..wh..opq",
            ".wh.",
            ".wh..",
            "outside",
            "root",
        ]);
        (any::<bool>(), prop::collection::vec(part, 1..5)).prop_map(|(absolute, parts)| {
            let joined = parts.join("/");
            if absolute {
                format!("/{joined}")
            } else {
                joined
            }
        })
    }

    fn entry() -> impl Strategy<Value = (u8, String, String)> {
        (0u8..4, path(), path())
    }

    fn build(entries: &[(u8, String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, p, target) in entries {
            let (kind, link, body): (tar::EntryType, &[u8], &[u8]) = match kind {
                0 => (tar::EntryType::Regular, b"", b"payload"),
                1 => (tar::EntryType::Directory, b"", b""),
                2 => (tar::EntryType::Symlink, target.as_bytes(), b""),
                _ => (tar::EntryType::Link, target.as_bytes(), b""),
            };
            raw_entry(&mut out, p.as_bytes(), kind, link, body, 0o755);
        }
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever two layers say, nothing is written beside the root and nothing
        /// panics.
        #[test]
        fn arbitrary_layers_never_write_outside_the_root(
            lower in prop::collection::vec(entry(), 0..12),
            upper in prop::collection::vec(entry(), 0..12),
        ) {
            let parent = tempfile::tempdir().unwrap();
            let root = parent.path().join("root");
            let outside = parent.path().join("outside");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&outside).unwrap();
            for entries in [&lower, &upper] {
                let _ = apply_layer(&root, &build(entries)[..], UnpackOptions::default());
            }
            let beside: Vec<_> = fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            prop_assert_eq!(beside.len(), 2, "{:?}", beside);
            prop_assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
            // Leave nothing read-only behind for the temporary directory's removal.
            let _ = std::process::Command::new("chmod").arg("-R").arg("u+rwx").arg(&root).status();
        }
    }
}
