//! Owner and group names, resolved through the node's name service
//! (`/etc/passwd`, `/etc/group`, or LDAP/SSSD where NSS is set up so), as
//! `ls -l` does: an id without an entry is shown as its number.

use std::collections::HashMap;
use std::ffi::CStr;

/// Buffer for one passwd or group record; larger records are retried with
/// a bigger buffer up to [`RECORD_BYTES_MAX`].
const RECORD_BYTES: usize = 4096;
const RECORD_BYTES_MAX: usize = 1 << 20;

/// Names looked up during one flush (a flush starts a new cache, so a
/// renamed user shows at the next one).
#[derive(Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn user(&mut self, uid: u32) -> &str {
        self.users
            .entry(uid)
            .or_insert_with(|| user_name(uid).unwrap_or_else(|| uid.to_string()))
    }

    pub fn group(&mut self, gid: u32) -> &str {
        self.groups
            .entry(gid)
            .or_insert_with(|| group_name(gid).unwrap_or_else(|| gid.to_string()))
    }
}

fn user_name(uid: u32) -> Option<String> {
    let mut len = RECORD_BYTES;
    while len <= RECORD_BYTES_MAX {
        let mut buf = vec![0u8; len];
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r
        // writes the record's strings into `buf` (of the length given)
        // and sets `result` to `&mut pw` on success or null if none.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE {
            len *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string
        // inside `buf`, which is alive here.
        return Some(
            unsafe { CStr::from_ptr(pw.pw_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    None
}

fn group_name(gid: u32) -> Option<String> {
    let mut len = RECORD_BYTES;
    while len <= RECORD_BYTES_MAX {
        let mut buf = vec![0u8; len];
        // SAFETY: as in `user_name`, for getgrgid_r and a group record.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE {
            len *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || gr.gr_name.is_null() {
            return None;
        }
        // SAFETY: gr_name points to a NUL-terminated string in `buf`.
        return Some(
            unsafe { CStr::from_ptr(gr.gr_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_an_unknown_id_is_its_number() {
        let mut n = Names::default();
        assert_eq!(n.user(0), "root");
        assert_eq!(n.group(0), "root");
        assert_eq!(n.user(3_999_999_999), "3999999999");
    }
}
