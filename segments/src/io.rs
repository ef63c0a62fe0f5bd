//! The disk I/O engine of a segment store: io_uring with O_DIRECT where
//! the file system supports it, io_uring with buffered files where it does
//! not (tmpfs), plain pread/pwrite where io_uring is unavailable. Chosen once
//! at start by probing, then reported in logs and metrics.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

use io_uring::{opcode, types, IoUring};

use crate::layout::ALIGN_BYTES;

/// Submission queue entries: the most writes one batch submits at once.
const RING_ENTRIES: u32 = 256;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IoMode {
    UringDirect,
    UringBuffered,
    Plain,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoMode::UringDirect => "io_uring+O_DIRECT",
            IoMode::UringBuffered => "io_uring",
            IoMode::Plain => "pread/pwrite",
        })
    }
}

/// A zeroed buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through &self, like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(ALIGN_BYTES), ALIGN_BYTES)
            .expect("valid layout")
    }

    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        let len = len.div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size; a null return is handled.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// Copies `parts` one after another into a new aligned buffer.
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut b = AlignedBuf::zeroed(total);
        let mut at = 0;
        for p in parts {
            b.as_mut_slice()[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

pub struct IoEngine {
    mode: IoMode,
    ring: Option<IoUring>,
}

fn direct_works(dir: &Path) -> bool {
    let probe = dir.join(".direct-probe");
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|f| f.write_all_at(AlignedBuf::zeroed(ALIGN_BYTES).as_slice(), 0));
    let _ = std::fs::remove_file(&probe);
    r.is_ok()
}

impl IoEngine {
    /// Picks the best mode that works for files in `dir`. `allow_uring`
    /// false forces plain I/O (for comparison and for kernels without it).
    pub fn probe(dir: &Path, allow_uring: bool) -> Self {
        let ring = if allow_uring {
            IoUring::new(RING_ENTRIES).ok()
        } else {
            None
        };
        let mode = match (&ring, direct_works(dir)) {
            (Some(_), true) => IoMode::UringDirect,
            (Some(_), false) => IoMode::UringBuffered,
            (None, _) => IoMode::Plain,
        };
        IoEngine { mode, ring }
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    pub fn open(&self, path: &Path, create: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if create {
            o.create_new(true);
        }
        if self.mode == IoMode::UringDirect {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    }

    /// Writes every buffer at its offset; one result per write. A short
    /// write is an error (ENOSPC when the device is full).
    pub fn write_batch(&mut self, writes: &[(RawFd, u64, &AlignedBuf)]) -> Vec<io::Result<()>> {
        let Some(ring) = self.ring.as_mut() else {
            return writes
                .iter()
                .map(|(fd, off, buf)| pwrite_all(*fd, *off, buf.as_slice()))
                .collect();
        };
        let mut results: Vec<io::Result<()>> = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(RING_ENTRIES as usize) {
            let mut res: Vec<Option<io::Result<()>>> = (0..chunk.len()).map(|_| None).collect();
            for (i, (fd, off, buf)) in chunk.iter().enumerate() {
                let e =
                    opcode::Write::new(types::Fd(*fd), buf.as_slice().as_ptr(), buf.len() as u32)
                        .offset(*off)
                        .build()
                        .user_data(i as u64);
                // SAFETY: the buffer outlives the submission: we wait for
                // every completion of this chunk before returning.
                unsafe {
                    ring.submission()
                        .push(&e)
                        .expect("queue has room for a chunk")
                };
            }
            if let Err(e) = ring.submit_and_wait(chunk.len()) {
                return writes
                    .iter()
                    .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                    .collect();
            }
            let mut done = 0;
            while done < chunk.len() {
                for cqe in ring.completion() {
                    let i = cqe.user_data() as usize;
                    let want = chunk[i].2.len() as i32;
                    res[i] = Some(match cqe.result() {
                        r if r == want => Ok(()),
                        r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                        r => Err(io::Error::new(
                            io::ErrorKind::StorageFull,
                            format!("short write: {r} of {want} bytes (device full?)"),
                        )),
                    });
                    done += 1;
                }
                if done < chunk.len() {
                    if let Err(e) = ring.submit_and_wait(1) {
                        return writes
                            .iter()
                            .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                            .collect();
                    }
                }
            }
            results.extend(res.into_iter().map(|r| r.expect("every completion seen")));
        }
        results
    }

    /// `fdatasync`s every file; one result per file.
    pub fn sync_batch(&mut self, fds: &[RawFd]) -> Vec<io::Result<()>> {
        let Some(ring) = self.ring.as_mut() else {
            return fds.iter().map(|fd| fdatasync(*fd)).collect();
        };
        let mut out = Vec::with_capacity(fds.len());
        for chunk in fds.chunks(RING_ENTRIES as usize) {
            for (i, fd) in chunk.iter().enumerate() {
                let e = opcode::Fsync::new(types::Fd(*fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(i as u64);
                // SAFETY: no buffers are involved in an fsync.
                unsafe {
                    ring.submission()
                        .push(&e)
                        .expect("queue has room for a chunk")
                };
            }
            let mut res: Vec<Option<io::Result<()>>> = (0..chunk.len()).map(|_| None).collect();
            let mut done = 0;
            while done < chunk.len() {
                if let Err(e) = ring.submit_and_wait(chunk.len() - done) {
                    return fds
                        .iter()
                        .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                        .collect();
                }
                for cqe in ring.completion() {
                    let r = cqe.result();
                    res[cqe.user_data() as usize] = Some(if r < 0 {
                        Err(io::Error::from_raw_os_error(-r))
                    } else {
                        Ok(())
                    });
                    done += 1;
                }
            }
            out.extend(res.into_iter().map(|r| r.expect("every completion seen")));
        }
        out
    }

    /// Reads every `(file, offset, len)` at once; one result per read.
    pub fn read_batch(&mut self, reads: &[(&File, u64, usize)]) -> Vec<io::Result<AlignedBuf>> {
        if self.ring.is_none() || reads.len() <= 1 {
            return reads
                .iter()
                .map(|(f, off, len)| self.read(f, *off, *len))
                .collect();
        }
        let ring = self.ring.as_mut().expect("checked");
        let mut out: Vec<io::Result<AlignedBuf>> = Vec::with_capacity(reads.len());
        for chunk in reads.chunks(RING_ENTRIES as usize) {
            let mut bufs: Vec<AlignedBuf> = chunk
                .iter()
                .map(|(_, _, len)| AlignedBuf::zeroed(*len))
                .collect();
            for (i, ((f, off, len), b)) in chunk.iter().zip(bufs.iter_mut()).enumerate() {
                let e = opcode::Read::new(
                    types::Fd(f.as_raw_fd()),
                    b.as_mut_slice().as_mut_ptr(),
                    *len as u32,
                )
                .offset(*off)
                .build()
                .user_data(i as u64);
                // SAFETY: `bufs` outlives the submissions; we wait for all.
                unsafe {
                    ring.submission()
                        .push(&e)
                        .expect("queue has room for a chunk")
                };
            }
            let mut res: Vec<Option<i32>> = vec![None; chunk.len()];
            let mut done = 0;
            let mut failed: Option<io::Error> = None;
            while done < chunk.len() {
                if let Err(e) = ring.submit_and_wait(chunk.len() - done) {
                    failed = Some(e);
                    break;
                }
                for cqe in ring.completion() {
                    res[cqe.user_data() as usize] = Some(cqe.result());
                    done += 1;
                }
            }
            if let Some(e) = failed {
                out.extend(
                    chunk
                        .iter()
                        .map(|_| Err(io::Error::new(e.kind(), e.to_string()))),
                );
                continue;
            }
            for ((r, b), (f, off, len)) in res.into_iter().zip(bufs).zip(chunk) {
                out.push(match r {
                    Some(r) if r as usize == *len => Ok(b),
                    Some(r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    // A short read: finish it the simple way.
                    _ => self_read_fallback(f, *off, *len),
                });
            }
        }
        out
    }

    /// Reads `len` bytes (aligned) at `off`.
    pub fn read(&mut self, file: &File, off: u64, len: usize) -> io::Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(len);
        let Some(ring) = self.ring.as_mut() else {
            file.read_exact_at(buf.as_mut_slice(), off)?;
            return Ok(buf);
        };
        let mut done = 0usize;
        while done < len {
            let e = opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                buf.as_mut_slice()[done..].as_mut_ptr(),
                (len - done) as u32,
            )
            .offset(off + done as u64)
            .build();
            // SAFETY: `buf` outlives the operation; we wait for it below.
            unsafe { ring.submission().push(&e).expect("ring has room") };
            ring.submit_and_wait(1)?;
            let r = ring
                .completion()
                .next()
                .map(|c| c.result())
                .ok_or_else(|| io::Error::other("io_uring: missing completion"))?;
            if r < 0 {
                return Err(io::Error::from_raw_os_error(-r));
            }
            if r == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += r as usize;
        }
        Ok(buf)
    }
}

fn self_read_fallback(f: &File, off: u64, len: usize) -> io::Result<AlignedBuf> {
    let mut b = AlignedBuf::zeroed(len);
    f.read_exact_at(b.as_mut_slice(), off)?;
    Ok(b)
}

fn pwrite_all(fd: RawFd, off: u64, buf: &[u8]) -> io::Result<()> {
    // SAFETY: borrowing a raw fd the caller keeps open for the call.
    let f =
        std::mem::ManuallyDrop::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    f.write_all_at(buf, off)
}

fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the caller keeps open.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_writes_reads_and_syncs() {
        let dir = std::env::temp_dir().join(format!("cfs-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for allow in [true, false] {
            let mut io = IoEngine::probe(&dir, allow);
            let path = dir.join(format!("f-{allow}"));
            let _ = std::fs::remove_file(&path);
            let f = io.open(&path, true).unwrap();
            let a = AlignedBuf::from_parts(&[&[1u8; 5000]]);
            let b = AlignedBuf::from_parts(&[&[2u8; 4096]]);
            let r = io.write_batch(&[(f.as_raw_fd(), 0, &a), (f.as_raw_fd(), 8192, &b)]);
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            assert!(io.sync_batch(&[f.as_raw_fd()])[0].is_ok());
            let got = io.read(&f, 8192, 4096).unwrap();
            assert_eq!(got.as_slice(), &[2u8; 4096][..]);
            let got = io.read(&f, 0, 8192).unwrap();
            assert_eq!(&got.as_slice()[..5000], &[1u8; 5000][..]);
            assert_eq!(&got.as_slice()[5000..], &[0u8; 3192][..]);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
