//! `cfs admin policy`: a subtree's data policy, set on a directory of a
//! mount and inherited by what is created in it from then on (as Lustre's
//! `lfs setstripe` sets a directory's layout). Today the policy is how
//! stripes are compressed (docs/decisions.md D49), kept in the
//! `trusted.claudefs.compress` extended attribute, which the namespace
//! validates (a value that does not parse is refused with EINVAL and
//! changes nothing) and copies to new children.

use std::path::Path;

use anyhow::{bail, Context};
use cfs_proto::types::{Compression, COMPRESS_XATTR};

fn name() -> &'static std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(COMPRESS_XATTR)
}

/// Sets `path`'s compression policy (root only: a `trusted.` attribute).
pub fn set(path: &Path, c: Compression) -> anyhow::Result<()> {
    if !path.is_dir() {
        bail!(
            "{}: not a directory (a policy is set on a directory and inherited by what is created in it)",
            path.display()
        );
    }
    xattr::set(path, name(), c.to_string().as_bytes()).with_context(|| {
        format!(
            "setting the compression policy of {} (needs root, on a cfs mount)",
            path.display()
        )
    })
}

/// `path`'s compression policy; `None`: the writing mount's `--compress`.
pub fn get(path: &Path) -> anyhow::Result<Option<Compression>> {
    let v = xattr::get(path, name())
        .with_context(|| format!("reading the policy of {}", path.display()))?;
    match v {
        None => Ok(None),
        Some(b) => {
            let s = String::from_utf8_lossy(&b);
            s.trim()
                .parse()
                .map(Some)
                .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))
        }
    }
}

/// Removes `path`'s policy: files created in it from then on take the
/// writing mount's `--compress`.
pub fn clear(path: &Path) -> anyhow::Result<()> {
    match xattr::remove(path, name()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("clearing the policy of {}", path.display())),
    }
}
