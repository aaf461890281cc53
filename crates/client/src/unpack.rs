//! Stacking layers into a root filesystem, by the OCI image-spec's rules: each layer is a
//! tar (plain, gzip or zstd: told by its first bytes) applied over the ones before;
//! `.wh.<name>` deletes `<name>` of a lower layer and `.wh..wh..opq` empties its
//! directory of what lower layers put there; hard links may point at files of lower
//! layers.
//!
//! Nothing is ever written outside the root. Entry paths must be relative without `..`;
//! directories on the way are resolved inside the root — an absolute symlink is taken
//! as relative to the root, as it would be inside a container — and a relative symlink
//! climbing above the root is refused; the last component is never followed (what is
//! there is replaced); hard links must name a path inside the root. Files are created
//! with `O_NOFOLLOW | O_EXCL` after whatever was there is removed.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would write outside the root.
    #[error("{path}: {why}, refused")]
    Outside {
        /// The entry's path as the layer names it.
        path: String,
        /// What was wrong with it.
        why: &'static str,
    },
    /// The layer is not a readable tar (or its compression is broken).
    #[error("the layer is not a readable archive: {0}")]
    Archive(String),
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// What happened.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How to apply layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackOptions {
    /// Keep the layer's owners (needs root). Off: everything belongs to the caller, an
    /// owner other than root is recorded in the `user.rootlesscontainers` attribute, and
    /// device nodes are skipped (rootless).
    pub keep_owners: bool,
}

/// What applying a layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerReport {
    /// Entries applied.
    pub entries: u64,
    /// Whiteouts applied (files deleted, directories made opaque).
    pub whiteouts: u64,
    /// Device nodes not created (rootless).
    pub skipped_devices: u64,
    /// Extended attributes the file system refused.
    pub skipped_xattrs: u64,
}

/// How many symlinks one path may pass through.
const MAX_LINK_HOPS: usize = 40;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// The layer's bytes, decompressed as its first bytes say.
fn decompress<'a, R: Read + 'a>(layer: R) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let mut reader = BufReader::with_capacity(256 * 1024, layer);
    let head = reader
        .fill_buf()
        .map_err(|e| UnpackError::Archive(e.to_string()))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
            .map_err(|e| UnpackError::Archive(format!("zstd: {e}")))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

/// An entry path's components: relative, without `..` (refused) and without `.`/empty.
fn components<'p>(raw: &'p [u8], shown: &str) -> Result<Vec<&'p OsStr>, UnpackError> {
    if raw.starts_with(b"/") {
        return Err(UnpackError::Outside {
            path: shown.to_owned(),
            why: "an absolute path",
        });
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Outside {
                    path: shown.to_owned(),
                    why: "a path with ..",
                })
            }
            part => parts.push(OsStr::from_bytes(part)),
        }
    }
    Ok(parts)
}

/// The real directory `parts` name under `root`, resolving symlinks inside the root and
/// (with `create`) making missing directories.
fn resolve_dir(
    root: &Path,
    parts: &[&OsStr],
    create: bool,
    shown: &str,
    unlocked: &mut Unlocked,
) -> Result<PathBuf, UnpackError> {
    let mut pending: VecDeque<OsString> = parts.iter().map(|p| p.to_os_string()).collect();
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if at.pop().is_none() {
                return Err(UnpackError::Outside {
                    path: shown.to_owned(),
                    why: "a symlink on the way leads outside the root",
                });
            }
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let here: PathBuf = at
            .iter()
            .fold(root.to_owned(), |p, c| p.join(c))
            .join(&part);
        match fs::symlink_metadata(&here) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(UnpackError::Outside {
                        path: shown.to_owned(),
                        why: "too many symlinks on the way",
                    });
                }
                let target = fs::read_link(&here).map_err(io(&here))?;
                let bytes = target.as_os_str().as_bytes();
                if bytes.starts_with(b"/") {
                    // Inside a container this is the root's path: resolve it from there.
                    at.clear();
                }
                let target_parts: Vec<OsString> = bytes
                    .split(|b| *b == b'/')
                    .filter(|p| !p.is_empty())
                    .map(|p| OsStr::from_bytes(p).to_os_string())
                    .collect();
                for p in target_parts.into_iter().rev() {
                    pending.push_front(p);
                }
            }
            Ok(meta) if meta.is_dir() => at.push(part),
            Ok(_) => {
                // A file where a directory is needed: a later layer replaces it.
                if !create {
                    return Err(UnpackError::Io {
                        path: shown.to_owned(),
                        source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
                    });
                }
                let parent = at.iter().fold(root.to_owned(), |p, c| p.join(c));
                unlocked.open(&parent)?;
                fs::remove_file(&here).map_err(io(&here))?;
                fs::create_dir(&here).map_err(io(&here))?;
                at.push(part);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let parent = at.iter().fold(root.to_owned(), |p, c| p.join(c));
                unlocked.open(&parent)?;
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&here)
                    .map_err(io(&here))?;
                at.push(part);
            }
            Err(e) => return Err(io(&here)(e)),
        }
    }
    Ok(at.iter().fold(root.to_owned(), |p, c| p.join(c)))
}

use std::os::unix::fs::DirBuilderExt;

/// Directories made writable for a moment: without root, a directory a lower layer made
/// read-only (0555) cannot otherwise be filled or emptied. Each gets its mode back when
/// the layer is done.
pub(crate) struct Unlocked {
    root_user: bool,
    modes: Vec<(PathBuf, u32)>,
}

impl Unlocked {
    fn new() -> Self {
        Unlocked {
            root_user: rustix::process::geteuid().is_root(),
            modes: Vec::new(),
        }
    }

    /// Lets the owner write into `dir` (a real directory inside the root), if it could not.
    fn open(&mut self, dir: &Path) -> Result<(), UnpackError> {
        if self.root_user {
            return Ok(());
        }
        let meta = fs::symlink_metadata(dir).map_err(io(dir))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() && mode & 0o300 != 0o300 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700)).map_err(io(dir))?;
            if !self.modes.iter().any(|(p, _)| p == dir) {
                self.modes.push((dir.to_owned(), mode));
            }
        }
        Ok(())
    }

    /// Puts the modes back, deepest first; a directory removed meanwhile is skipped.
    fn restore(self) -> Result<(), UnpackError> {
        for (dir, mode) in self.modes.into_iter().rev() {
            if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(io(&dir))?;
            }
        }
        Ok(())
    }
}

/// Makes every directory under `path` (not following symlinks) writable by its owner, so
/// that a tree with read-only directories can be removed without root.
fn unlock_tree(path: &Path) {
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o700));
        if let Ok(entries) = fs::read_dir(&dir) {
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

/// Removes whatever is at `path` (never following a symlink); nothing if absent.
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => match fs::remove_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unlock_tree(path);
                fs::remove_dir_all(path).map_err(io(path))
            }
            done => done.map_err(io(path)),
        },
        Ok(_) => fs::remove_file(path).map_err(io(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Applies one layer over `root` (which must exist).
pub fn apply_layer<R: Read>(
    root: &Path,
    layer: R,
    options: UnpackOptions,
) -> Result<LayerReport, UnpackError> {
    let mut archive = tar::Archive::new(decompress(layer)?);
    let mut report = LayerReport::default();
    // What this layer made: an opaque whiteout empties a directory of lower layers' files
    // only, whichever order the tar lists them in.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut directory_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut unlocked = Unlocked::new();
    let entries = archive
        .entries()
        .map_err(|e| UnpackError::Archive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| UnpackError::Archive(e.to_string()))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path)
            .chars()
            .take(256)
            .collect::<String>();
        let parts = components(&raw_path, &shown)?;
        let Some((name, parents)) = parts.split_last() else {
            continue; // the root itself
        };
        let dir = resolve_dir(root, parents, true, &shown, &mut unlocked)?;
        unlocked.open(&dir)?;
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE {
            for child in fs::read_dir(&dir).map_err(io(&dir))? {
                let child = child.map_err(io(&dir))?.path();
                if !made.contains(&child) {
                    remove_any(&child)?;
                }
            }
            report.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(UnpackError::Outside {
                    path: shown,
                    why: "a whiteout of no name",
                });
            }
            let target = dir.join(OsStr::from_bytes(hidden));
            if !made.contains(&target) {
                remove_any(&target)?;
            }
            report.whiteouts += 1;
            continue;
        }
        let path = dir.join(name);
        let header = entry.header().clone();
        let mode = header
            .mode()
            .map_err(|e| UnpackError::Archive(e.to_string()))?
            & 0o7777;
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    _ => {
                        remove_any(&path)?;
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&path)
                            .map_err(io(&path))?;
                    }
                }
                directory_modes.push((path.clone(), mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc_nofollow())
                    .mode(0o600)
                    .open(&path)
                    .map_err(io(&path))?;
                std::io::copy(&mut entry, &mut file).map_err(io(&path))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        UnpackError::Archive(format!("{shown}: a symlink without a target"))
                    })?
                    .into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(io(&path))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        UnpackError::Archive(format!("{shown}: a hard link without a target"))
                    })?
                    .into_owned();
                // A hard link names a path of the archive, so `/x` is the root's `x`.
                let relative: &[u8] = {
                    let mut t = &target[..];
                    while let Some(rest) = t.strip_prefix(b"/") {
                        t = rest;
                    }
                    t
                };
                let target_parts = components(relative, &shown)?;
                let Some((target_name, target_parents)) = target_parts.split_last() else {
                    return Err(UnpackError::Outside {
                        path: shown,
                        why: "a hard link to the root",
                    });
                };
                let target_dir = resolve_dir(root, target_parents, false, &shown, &mut unlocked)?;
                let source = target_dir.join(target_name);
                if fs::symlink_metadata(&source).is_ok_and(|m| m.is_dir()) {
                    return Err(UnpackError::Outside {
                        path: shown,
                        why: "a hard link to a directory",
                    });
                }
                if source != path {
                    remove_any(&path)?;
                    fs::hard_link(&source, &path).map_err(io(&path))?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if !options.keep_owners && kind != tar::EntryType::Fifo {
                    report.skipped_devices += 1;
                    continue;
                }
                remove_any(&path)?;
                let file_type = match kind {
                    tar::EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    tar::EntryType::Block => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &path,
                    file_type,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| io(&path)(e.into()))?;
            }
            // PAX and GNU headers are read by the tar reader; anything else is not a file.
            _ => continue,
        }
        if let Ok(Some(extensions)) = entry.pax_extensions() {
            for extension in extensions.flatten() {
                if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    let set = rustix::fs::lsetxattr(
                        &path,
                        OsStr::from_bytes(name),
                        extension.value_bytes(),
                        rustix::fs::XattrFlags::empty(),
                    );
                    if set.is_err() {
                        report.skipped_xattrs += 1;
                    }
                }
            }
        }
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        if options.keep_owners {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(io(&path))?;
        } else if (uid, gid) != (0, 0) && kind != tar::EntryType::Symlink {
            // Rootless: the file is the caller's, and its owner in the image is kept
            // where rootless runtimes and umoci read it back.
            let set = rustix::fs::lsetxattr(
                &path,
                ROOTLESS_OWNER_XATTR,
                &rootless_owner(uid, gid),
                rustix::fs::XattrFlags::empty(),
            );
            if set.is_err() {
                report.skipped_xattrs += 1;
            }
        }
        if !matches!(
            kind,
            tar::EntryType::Symlink | tar::EntryType::Link | tar::EntryType::Directory
        ) {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io(&path))?;
        }
        made.insert(path);
        report.entries += 1;
    }
    // Directory modes last (deepest first), so a read-only directory is still filled.
    unlocked.restore()?;
    for (path, mode) in directory_modes.into_iter().rev() {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io(&path))?;
    }
    Ok(report)
}

/// The extended attribute that keeps a file's owner in a rootless unpack (the
/// rootless-containers convention).
pub const ROOTLESS_OWNER_XATTR: &str = "user.rootlesscontainers";

/// The attribute's value: the protobuf message `Resource { uint32 uid = 1; uint32 gid = 2; }`,
/// where root (the caller, inside a rootless user namespace) is written as the "no
/// change" ID 2³²−1, as umoci writes it. Only for an owner other than root:root.
pub fn rootless_owner(uid: u32, gid: u32) -> Vec<u8> {
    const UNCHANGED: u32 = u32::MAX;
    let mut out = Vec::new();
    for (tag, id) in [(0x08u8, uid), (0x10u8, gid)] {
        let value = if id == 0 { UNCHANGED } else { id };
        out.push(tag);
        let mut rest = value;
        loop {
            let byte = (rest & 0x7f) as u8;
            rest >>= 7;
            if rest == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    out
}

/// `O_NOFOLLOW`: the file just created is never reached through a symlink.
fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

#[cfg(test)]
mod tests;
