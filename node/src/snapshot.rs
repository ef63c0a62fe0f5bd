//! `cfs admin snapshot`: copy-on-write snapshots of a directory on a
//! mount (docs/decisions.md D52). A snapshot is one log entry (the
//! `trusted.claudefs.snapshot.create` request on the directory) that makes
//! a read-only copy of the subtree's metadata at `DIR/.snapshots/NAME`,
//! naming the same stripes: browsing it is reading files, restoring it is
//! copying them (by reference: `copy_file_range` on a mount shares
//! stripes, so a restore writes no file data).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cfs_proto::types::{SNAPSHOTS_DIR, SNAPSHOT_CREATE_XATTR, SNAPSHOT_DELETE_XATTR};

/// The most entries a restore copies (a snapshot holds at most
/// `SNAPSHOT_INODES_MAX` inodes, and names can only be more through hard
/// links).
pub const RESTORE_ENTRIES_MAX: usize = 1_000_000;

/// One snapshot of a directory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// When it was taken (its root's change time), seconds since the epoch.
    pub taken: i64,
    pub path: PathBuf,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
        bail!("{name:?} is not a snapshot name: 1 to 255 bytes, no '/', not . or ..");
    }
    Ok(())
}

fn snapshots_of(dir: &Path) -> PathBuf {
    dir.join(os(SNAPSHOTS_DIR))
}

/// Explains an error the namespace gave a snapshot request.
fn why(e: &std::io::Error, dir: &Path, name: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EXDEV) => format!(
            "{}'s subtree spans metadata shards (directories near the root are spread over \
             shards, D19): snapshot a directory at least two levels down, e.g. /projects/x",
            dir.display()
        ),
        Some(libc::EEXIST) => format!("{} already has a snapshot named {name}", dir.display()),
        Some(libc::ENOENT) => format!("{} has no snapshot named {name}", dir.display()),
        Some(libc::EPERM) => "needs root on a mount that keeps root (--trust-root)".into(),
        Some(libc::EROFS) => format!("{} is itself in a snapshot", dir.display()),
        Some(libc::EFBIG) => format!(
            "{}'s subtree has more than {} inodes: snapshot smaller subtrees",
            dir.display(),
            cfs_proto::types::SNAPSHOT_INODES_MAX
        ),
        Some(libc::EOPNOTSUPP) => {
            format!("{} is not on a cfs mount", dir.display())
        }
        _ => e.to_string(),
    }
}

fn must_be_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    Ok(())
}

/// Makes the directory's changes so far durable (the mount's fsync waits
/// for every change it sent to be decided in the log).
fn sync(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Snapshots `dir` as `dir/.snapshots/name`.
pub fn create(dir: &Path, name: &str) -> anyhow::Result<SnapshotInfo> {
    check_name(name)?;
    must_be_dir(dir)?;
    xattr::set(dir, os(SNAPSHOT_CREATE_XATTR), name.as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "snapshot {name} of {}: {}",
            dir.display(),
            why(&e, dir, name)
        )
    })?;
    sync(dir)?;
    let path = snapshots_of(dir).join(name);
    let taken = std::fs::symlink_metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .ctime();
    Ok(SnapshotInfo {
        name: name.into(),
        taken,
        path,
    })
}

/// `dir`'s snapshots, oldest first.
pub fn list(dir: &Path) -> anyhow::Result<Vec<SnapshotInfo>> {
    must_be_dir(dir)?;
    let snaps = snapshots_of(dir);
    let rd = match std::fs::read_dir(&snaps) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", snaps.display())),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("listing {}", snaps.display()))?;
        let md = e
            .metadata()
            .with_context(|| format!("reading {}", e.path().display()))?;
        out.push(SnapshotInfo {
            name: e.file_name().to_string_lossy().into_owned(),
            taken: md.ctime(),
            path: e.path(),
        });
    }
    out.sort_by(|a, b| (a.taken, &a.name).cmp(&(b.taken, &b.name)));
    Ok(out)
}

/// Deletes `dir/.snapshots/name`: the data only it named is freed by the
/// collector.
pub fn delete(dir: &Path, name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    must_be_dir(dir)?;
    xattr::set(dir, os(SNAPSHOT_DELETE_XATTR), name.as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "deleting snapshot {name} of {}: {}",
            dir.display(),
            why(&e, dir, name)
        )
    })?;
    sync(dir)
}

/// What a restore copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub dirs: u64,
    pub files: u64,
    pub links: u64,
    pub bytes: u64,
}

/// Copies snapshot `name` of `dir` to `to` (which must not exist, and is
/// best on the same mount, where file data is shared rather than copied):
/// contents, modes, owners, times, extended attributes (policies
/// included), symlinks, hard links, fifos and device nodes.
pub fn restore(dir: &Path, name: &str, to: &Path) -> anyhow::Result<Restored> {
    check_name(name)?;
    let from = snapshots_of(dir).join(name);
    if !from.is_dir() {
        bail!("{} has no snapshot named {name}", dir.display());
    }
    if std::fs::symlink_metadata(to).is_ok() {
        bail!("{} exists: restore into a new path", to.display());
    }
    let mut r = Restored::default();
    // Inode in the snapshot → the path it was first copied to.
    let mut linked: HashMap<u64, PathBuf> = HashMap::new();
    // Directories, parents first; their times and modes are set last,
    // children first, once nothing more is written in them.
    let mut dirs: Vec<(PathBuf, PathBuf)> = vec![(from.clone(), to.to_path_buf())];
    let mut i = 0;
    let mut entries = 0usize;
    while i < dirs.len() {
        let (src, dst) = dirs[i].clone();
        i += 1;
        std::fs::create_dir(&dst).with_context(|| format!("creating {}", dst.display()))?;
        // Policies first (a tenant, compression): its files are made under
        // them.
        copy_xattrs(&src, &dst)?;
        r.dirs += 1;
        let rd = std::fs::read_dir(&src).with_context(|| format!("listing {}", src.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("listing {}", src.display()))?;
            entries += 1;
            if entries > RESTORE_ENTRIES_MAX {
                bail!(
                    "{} has more than {RESTORE_ENTRIES_MAX} entries",
                    from.display()
                );
            }
            let s = e.path();
            let d = dst.join(e.file_name());
            let md = std::fs::symlink_metadata(&s)
                .with_context(|| format!("reading {}", s.display()))?;
            let ft = md.file_type();
            if ft.is_dir() {
                dirs.push((s, d));
                continue;
            }
            if md.nlink() > 1 {
                if let Some(first) = linked.get(&md.ino()) {
                    std::fs::hard_link(first, &d)
                        .with_context(|| format!("linking {}", d.display()))?;
                    r.links += 1;
                    continue;
                }
                linked.insert(md.ino(), d.clone());
            }
            if ft.is_symlink() {
                let target =
                    std::fs::read_link(&s).with_context(|| format!("reading {}", s.display()))?;
                std::os::unix::fs::symlink(&target, &d)
                    .with_context(|| format!("creating {}", d.display()))?;
            } else if ft.is_file() {
                r.bytes += copy_file(&s, &d)?;
            } else {
                mknod(&d, md.mode(), md.rdev())?;
            }
            r.files += 1;
            if !ft.is_symlink() {
                copy_xattrs(&s, &d)?;
            }
            copy_meta(&s, &d, &md)?;
        }
    }
    for (src, dst) in dirs.iter().rev() {
        let md =
            std::fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
        copy_meta(src, dst, &md)?;
    }
    sync(to)?;
    Ok(r)
}

fn copy_file(s: &Path, d: &Path) -> anyhow::Result<u64> {
    let mut src = std::fs::File::open(s).with_context(|| format!("opening {}", s.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d)
        .with_context(|| format!("creating {}", d.display()))?;
    // `io::copy` between files is `copy_file_range`: on the same mount
    // the new file names the snapshot's stripes (D50), nothing is read.
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("copying {} to {}", s.display(), d.display()))
}

fn mknod(d: &Path, mode: u32, rdev: u64) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(d.as_os_str().as_bytes())
        .with_context(|| format!("{}: a path with a NUL byte", d.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, rdev as libc::dev_t) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {}", d.display()));
    }
    Ok(())
}

/// The extended attributes of `s` (ACLs and policies among them) onto `d`.
fn copy_xattrs(s: &Path, d: &Path) -> anyhow::Result<()> {
    let ctx = || {
        format!(
            "copying the extended attributes of {} to {}",
            s.display(),
            d.display()
        )
    };
    for n in xattr::list(s).with_context(ctx)? {
        if let Some(v) = xattr::get(s, &n).with_context(ctx)? {
            xattr::set(d, &n, &v).with_context(ctx)?;
        }
    }
    Ok(())
}

/// Owner, mode and times of `s` onto `d` (a symlink's own, not its
/// target's).
fn copy_meta(s: &Path, d: &Path, md: &std::fs::Metadata) -> anyhow::Result<()> {
    let ctx = || {
        format!(
            "copying the attributes of {} to {}",
            s.display(),
            d.display()
        )
    };
    std::os::unix::fs::lchown(d, Some(md.uid()), Some(md.gid())).with_context(ctx)?;
    if !md.file_type().is_symlink() {
        // After chown, which clears set-id bits.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .with_context(ctx)?;
    }
    let times = [
        libc::timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec(),
        },
        libc::timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec(),
        },
    ];
    let c = std::ffi::CString::new(d.as_os_str().as_bytes()).with_context(ctx)?;
    // SAFETY: `c` is a valid NUL-terminated path and `times` two valid
    // timespecs; both outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(ctx);
    }
    Ok(())
}
