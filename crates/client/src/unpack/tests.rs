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
