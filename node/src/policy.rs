//! `cfs admin policy`: a subtree's data policy, set on a directory of a
//! mount and inherited by what is created in it from then on (as Lustre's
//! `lfs setstripe` sets a directory's layout): how stripes are compressed
//! (docs/decisions.md D49, the `trusted.claudefs.compress` extended
//! attribute) and whether they are deduplicated (D50,
//! `trusted.claudefs.dedupe`). The namespace validates both (a value that
//! does not parse is refused with EINVAL and changes nothing) and copies
//! them to new children.

use std::path::Path;

use anyhow::{bail, Context};
use cfs_proto::tenant::{valid_tenant, TENANT_XATTR};
use cfs_proto::types::{on_off, parse_on_off, Compression, COMPRESS_XATTR, DEDUPE_XATTR};

fn os(name: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(name)
}

/// A subtree's policy; `None` fields: the writing mount's setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub compress: Option<Compression>,
    pub dedupe: Option<bool>,
    /// The tenant whose key seals new files' stripes (D51); `None`: not
    /// sealed.
    pub tenant: Option<String>,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.compress {
            Some(c) => write!(f, "compress {c}")?,
            None => f.write_str("compress (mount default)")?,
        }
        match self.dedupe {
            Some(d) => write!(f, ", dedupe {}", on_off(d))?,
            None => f.write_str(", dedupe (mount default)")?,
        }
        match &self.tenant {
            Some(t) => write!(f, ", encrypt {t}"),
            None => f.write_str(", encrypt off"),
        }
    }
}

/// Sets the parts of `path`'s policy that `p` names (root only: `trusted.`
/// attributes); the others stay as they are.
pub fn set(path: &Path, p: Policy) -> anyhow::Result<()> {
    if !path.is_dir() {
        bail!(
            "{}: not a directory (a policy is set on a directory and inherited by what is created in it)",
            path.display()
        );
    }
    if p == Policy::default() {
        bail!("nothing to set: give --compress, --dedupe and/or --encrypt");
    }
    if let Some(t) = p.tenant.as_deref().filter(|t| !valid_tenant(t)) {
        bail!("{t:?} is not a tenant name: letters, digits and '-', 1 to 63 characters");
    }
    let what = |w: &str| {
        format!(
            "setting the {w} policy of {} (needs root, on a cfs mount)",
            path.display()
        )
    };
    if let Some(c) = p.compress {
        xattr::set(path, os(COMPRESS_XATTR), c.to_string().as_bytes())
            .with_context(|| what("compression"))?;
    }
    if let Some(d) = p.dedupe {
        xattr::set(path, os(DEDUPE_XATTR), on_off(d).as_bytes()).with_context(|| what("dedupe"))?;
    }
    if let Some(t) = &p.tenant {
        xattr::set(path, os(TENANT_XATTR), t.as_bytes()).map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::ENOKEY) => {
                    format!("tenant {t} has no key (cfs admin keys create {t} --dir DIR)")
                }
                Some(libc::EACCES) => {
                    format!("this mount's certificate does not name tenant {t}")
                }
                _ => e.to_string(),
            };
            anyhow::anyhow!("{}: {why}", what("encryption"))
        })?;
    }
    Ok(())
}

/// `path`'s policy.
pub fn get(path: &Path) -> anyhow::Result<Policy> {
    let read = |name: &[u8]| {
        xattr::get(path, os(name))
            .with_context(|| format!("reading the policy of {}", path.display()))
    };
    let compress = match read(COMPRESS_XATTR)? {
        None => None,
        Some(b) => Some(
            String::from_utf8_lossy(&b)
                .trim()
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
    };
    let dedupe = match read(DEDUPE_XATTR)? {
        None => None,
        Some(b) => Some(parse_on_off(&b).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: dedupe policy {:?} is not on/off",
                path.display(),
                String::from_utf8_lossy(&b)
            )
        })?),
    };
    let tenant = read(TENANT_XATTR)?.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    Ok(Policy {
        compress,
        dedupe,
        tenant,
    })
}

/// Removes `path`'s policy: files created in it from then on take the
/// writing mount's `--compress` and `--dedupe`.
pub fn clear(path: &Path) -> anyhow::Result<()> {
    for name in [COMPRESS_XATTR, DEDUPE_XATTR, TENANT_XATTR] {
        match xattr::remove(path, os(name)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("clearing the policy of {}", path.display()))
            }
        }
    }
    Ok(())
}
