//! The disk edge of the log: a directory of files the WAL writes through.
//!
//! Two implementations: [`FsDisk`] (real files, `fdatasync`) and [`SimDisk`]
//! (in memory; a crash keeps only what was synced, plus a random, possibly
//! torn, prefix of what was not). The WAL is generic over [`Disk`] so the
//! deterministic simulation exercises the same recovery code as production.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;

/// A directory of files.
pub trait Disk: Send + Sync + 'static {
    type File: DiskFile;
    /// Names of the files in the directory, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Self::File>;
    /// Creates `name` holding `len` zero bytes, durably (data synced). The
    /// directory entry becomes durable with the next [`Disk::sync_dir`].
    fn create_zeroed(&self, name: &str, len: u64) -> io::Result<()>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Whole content of a file.
    fn read_all(&self, name: &str) -> io::Result<Vec<u8>>;
    /// `len` bytes of a file from `offset`.
    fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Where this disk lives, for error messages.
    fn describe(&self, name: &str) -> String;
}

/// One open file.
pub trait DiskFile: Send + 'static {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed `write_at` durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Bytes an unprivileged writer may still use on the file system that
/// holds `dir` (`statvfs`: `f_bavail` × `f_frsize`).
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized
    // out-parameter that statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Real files in one directory.
#[derive(Clone, Debug)]
pub struct FsDisk {
    dir: PathBuf,
    faults: DiskFaults,
}

/// Faults of the real disk, for the Jepsen suite (see
/// `runtime::Faults`): off in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskFaults {
    /// Writes are held in memory until `sync_data`, so a kill loses them.
    pub lose_unsynced: bool,
    /// `sync_data` only writes what was held for more than
    /// [`FSYNC_LIE_LAG`], and does not sync: acknowledged data can be lost.
    pub fsync_lies: bool,
}

/// How far a lying `fdatasync` lags behind.
pub const FSYNC_LIE_LAG: std::time::Duration = std::time::Duration::from_millis(200);

impl FsDisk {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        Self::with_faults(dir, DiskFaults::default())
    }

    /// [`FsDisk::new`] with injected faults.
    pub fn with_faults(dir: impl AsRef<Path>, faults: DiskFaults) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(FsDisk {
            dir: dir.as_ref().to_path_buf(),
            faults,
        })
    }
}

/// Zero-fill chunk for [`FsDisk::create_zeroed`].
const ZERO_CHUNK_BYTES: usize = 1 << 20;

impl Disk for FsDisk {
    type File = FsFile;

    fn list(&self) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            if let Some(n) = e.file_name().to_str() {
                v.push(n.to_string());
            }
        }
        v.sort();
        Ok(v)
    }

    fn open(&self, name: &str) -> io::Result<FsFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        Ok(FsFile {
            file: f,
            faults: self.faults,
            held: Vec::new(),
        })
    }

    fn create_zeroed(&self, name: &str, len: u64) -> io::Result<()> {
        // Written zeros, not fallocate: writes into already-written blocks
        // need no extent conversion, so fdatasync stays one data flush
        // (measured in docs/decisions.md).
        let path = self.dir.join(name);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(ZERO_CHUNK_BYTES);
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn read_all(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }

    fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = File::open(self.dir.join(name))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

pub struct FsFile {
    file: File,
    faults: DiskFaults,
    /// Writes not yet given to the file (fault injection only).
    held: Vec<(std::time::Instant, u64, Vec<u8>)>,
}

impl DiskFile for FsFile {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.faults.lose_unsynced {
            self.held
                .push((std::time::Instant::now(), offset, buf.to_vec()));
            return Ok(());
        }
        self.file.write_all_at(buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        if self.faults.fsync_lies {
            let now = std::time::Instant::now();
            let keep = self
                .held
                .iter()
                .position(|(t, _, _)| now.duration_since(*t) < FSYNC_LIE_LAG)
                .unwrap_or(self.held.len());
            for (_, off, b) in self.held.drain(..keep) {
                self.file.write_all_at(&b, off)?;
            }
            return Ok(());
        }
        for (_, off, b) in self.held.drain(..) {
            self.file.write_all_at(&b, off)?;
        }
        self.file.sync_data()
    }
}

// ---------------------------------------------------------------------------
// Simulated disk
// ---------------------------------------------------------------------------

#[derive(Default, Clone, Debug)]
struct SimFileState {
    /// What survives a crash.
    durable: Vec<u8>,
    /// What reads see now.
    current: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes).
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Default, Debug)]
struct SimDiskState {
    /// Files as the directory durably names them.
    durable_names: BTreeMap<String, u64>,
    /// Files as the directory names them now.
    names: BTreeMap<String, u64>,
    files: BTreeMap<u64, SimFileState>,
    next_file_id: u64,
    /// Fail every operation (a dead device) while set.
    failed: bool,
    /// Counts of syncs, for tests that check group commit.
    syncs: u64,
}

/// In-memory disk for the simulation. Clones share state, so a "crashed"
/// replica can be restarted on the same disk.
#[derive(Clone, Default, Debug)]
pub struct SimDisk {
    state: Arc<Mutex<SimDiskState>>,
}

fn dead() -> io::Error {
    io::Error::other("simulated device failure")
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimDiskState> {
        // The simulation is single threaded; a poisoned lock means a test
        // already panicked.
        self.state.lock().expect("sim disk lock")
    }

    /// Simulates power loss: every file keeps its synced bytes plus a random
    /// prefix of its unsynced writes, the last of which may be torn at any
    /// byte; the directory keeps its synced names.
    pub fn crash(&self, rng: &mut impl Rng) {
        let mut s = self.lock();
        for f in s.files.values_mut() {
            let mut content = f.durable.clone();
            let keep = rng.gen_range(0..=f.unsynced.len());
            for (i, (off, bytes)) in f.unsynced.iter().enumerate().take(keep) {
                let n = if i + 1 == keep && rng.gen_bool(0.5) {
                    rng.gen_range(0..=bytes.len())
                } else {
                    bytes.len()
                };
                apply_write(&mut content, *off, &bytes[..n]);
            }
            f.durable = content.clone();
            f.current = content;
            f.unsynced.clear();
        }
        s.names = s.durable_names.clone();
        let live: std::collections::BTreeSet<u64> = s.names.values().copied().collect();
        s.files.retain(|id, _| live.contains(id));
    }

    /// Makes the device fail (or work again).
    pub fn set_failed(&self, failed: bool) {
        self.lock().failed = failed;
    }

    /// How many data syncs have run.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// Flips one bit of a file's durable and current content (bit rot).
    pub fn flip_bit(&self, name: &str, byte: usize, bit: u8) {
        let mut s = self.lock();
        let id = s.names[name];
        let f = s.files.get_mut(&id).expect("file");
        f.current[byte] ^= 1 << bit;
        f.durable[byte] ^= 1 << bit;
    }
}

fn apply_write(content: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let end = off as usize + bytes.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[off as usize..end].copy_from_slice(bytes);
}

impl Disk for SimDisk {
    type File = SimFile;

    fn list(&self) -> io::Result<Vec<String>> {
        let s = self.lock();
        if s.failed {
            return Err(dead());
        }
        Ok(s.names.keys().cloned().collect())
    }

    fn open(&self, name: &str) -> io::Result<SimFile> {
        let s = self.lock();
        if s.failed {
            return Err(dead());
        }
        let id = *s
            .names
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(SimFile {
            disk: self.clone(),
            id,
        })
    }

    fn create_zeroed(&self, name: &str, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.failed {
            return Err(dead());
        }
        let id = s.next_file_id;
        s.next_file_id += 1;
        let content = vec![0u8; len as usize];
        s.files.insert(
            id,
            SimFileState {
                durable: content.clone(),
                current: content,
                unsynced: Vec::new(),
            },
        );
        s.names.insert(name.to_string(), id);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.lock();
        if s.failed {
            return Err(dead());
        }
        let id = s
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.names.insert(to.to_string(), id);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.lock();
        if s.failed {
            return Err(dead());
        }
        s.names
            .remove(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.failed {
            return Err(dead());
        }
        s.durable_names = s.names.clone();
        Ok(())
    }

    fn read_all(&self, name: &str) -> io::Result<Vec<u8>> {
        let s = self.lock();
        if s.failed {
            return Err(dead());
        }
        let id = s
            .names
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(s.files[id].current.clone())
    }

    fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let all = self.read_all(name)?;
        all.get(offset as usize..offset as usize + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }

    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }
}

pub struct SimFile {
    disk: SimDisk,
    id: u64,
}

impl DiskFile for SimFile {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.disk.lock();
        if s.failed {
            return Err(dead());
        }
        let f = s.files.get_mut(&self.id).ok_or_else(dead)?;
        apply_write(&mut f.current, offset, buf);
        f.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut s = self.disk.lock();
        if s.failed {
            return Err(dead());
        }
        s.syncs += 1;
        let f = s.files.get_mut(&self.id).ok_or_else(dead)?;
        f.durable = f.current.clone();
        f.unsynced.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sim_crash_keeps_synced_and_prefix_of_unsynced() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let d = SimDisk::new();
            d.create_zeroed("a", 16).unwrap();
            d.sync_dir().unwrap();
            let mut f = d.open("a").unwrap();
            f.write_at(0, b"1234").unwrap();
            f.sync_data().unwrap();
            f.write_at(4, b"5678").unwrap();
            d.crash(&mut rng);
            let c = d.read_all("a").unwrap();
            assert_eq!(&c[..4], b"1234");
            // Unsynced bytes are a prefix of "5678" followed by zeros.
            let tail = &c[4..8];
            let k = tail.iter().take_while(|b| **b != 0).count();
            assert_eq!(&tail[..k], &b"5678"[..k]);
        }
    }

    #[test]
    fn sim_unsynced_dir_entries_vanish() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let d = SimDisk::new();
        d.create_zeroed("x", 4).unwrap();
        d.crash(&mut rng);
        assert!(d.list().unwrap().is_empty());
    }
}
