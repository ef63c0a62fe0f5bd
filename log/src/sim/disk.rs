//! The simulated disk that can lose power in the middle of an fsync.

use super::*;

/// A [`SimDisk`] that can also lose power in the middle of an fsync: the
/// data write has reached the device but is not durable, the fsync fails,
/// and the crash that follows keeps a random, possibly torn, prefix of it.
/// (Between steps every write is already synced, so only this exercises
/// torn tails and lost unsynced writes.)
#[derive(Clone, Default)]
pub struct CrashDisk {
    pub(super) disk: SimDisk,
    pub(super) power_cut: Arc<AtomicBool>,
}

impl CrashDisk {
    /// `Some(true)`: the next fsyncs fail as if power were lost; `Some(false)`:
    /// the device fails every operation (EIO); `None`: healthy.
    pub fn inject(&self, fault: Option<bool>) {
        self.power_cut.store(fault == Some(true), Ordering::SeqCst);
        self.disk.set_failed(fault == Some(false));
    }

    /// Power loss: see [`SimDisk::crash`]. The disk is healthy afterwards.
    pub fn crash(&self, rng: &mut impl Rng) {
        self.inject(None);
        self.disk.crash(rng);
    }
}

impl Disk for CrashDisk {
    type File = CrashFile;
    fn list(&self) -> io::Result<Vec<String>> {
        self.disk.list()
    }
    fn open(&self, name: &str) -> io::Result<CrashFile> {
        Ok(CrashFile {
            file: self.disk.open(name)?,
            power_cut: self.power_cut.clone(),
        })
    }
    fn create_zeroed(&self, name: &str, len: u64) -> io::Result<()> {
        self.disk.create_zeroed(name, len)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.disk.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.disk.sync_dir()
    }
    fn read_all(&self, name: &str) -> io::Result<Vec<u8>> {
        self.disk.read_all(name)
    }
    fn read_range(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.disk.read_range(name, offset, len)
    }
    fn describe(&self, name: &str) -> String {
        self.disk.describe(name)
    }
}

/// A file of a [`CrashDisk`].
pub struct CrashFile {
    pub(super) file: SimFile,
    pub(super) power_cut: Arc<AtomicBool>,
}

impl DiskFile for CrashFile {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_at(offset, buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        if self.power_cut.load(Ordering::SeqCst) {
            return Err(io::Error::other("simulated power loss during fsync"));
        }
        self.file.sync_data()
    }
}
