//! A full store reported as ENOSPC, and a failed background flush that
//! keeps its bytes and reports to the next fsync and close.
//!
//! Alone in its test binary: a close's report goes to whichever close of
//! the open file description comes first, and a process spawned by a test
//! running beside this one in the same binary inherits the descriptor and
//! closes it at its exec (a flush the mount cannot tell from the test's).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fuse::{drop_kernel_caches, mount_counter, Mount};
use common::Cluster;

#[test]
fn full_devices_give_enospc() {
    let base = std::env::temp_dir().join(format!("cfs-test-fs-enospc-{}", std::process::id()));
    let mut dirs = Vec::new();
    for i in 1..=3 {
        let m = base.join(format!("n{i}"));
        std::fs::create_dir_all(&m).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs needs root");
        dirs.push(m);
    }
    struct Unmount(Vec<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
    let _u = Unmount(dirs.clone());
    let c = Cluster::start_with("fs-enospc", |cfg| {
        cfg.segments_dir = Some(dirs[(cfg.node_id - 1) as usize].clone());
    });
    let url_file = c.dir.join("mnt-metrics-url");
    let m = Mount::new(
        &c,
        "mnt",
        &[
            "--timeout",
            "10",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-url-file",
            url_file.to_str().unwrap(),
        ],
    );
    std::fs::write(m.path.join("small"), b"fits").unwrap();
    use std::io::Write;
    // Incompressible and distinct bytes: the mount compresses what it can
    // (D49) and stores repeated chunks once (D50), and these must take
    // their full size on the devices.
    let big = common::noise(7, 64 << 20);
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(m.path.join("big"))?;
        for part in big.chunks(1 << 20) {
            f.write_all(part)?;
        }
        f.sync_all()
    })();
    let e = r.expect_err("64 MiB cannot fit in 3 × 16 MiB at 2+1");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "got {e}");
    assert_eq!(std::fs::read(m.path.join("small")).unwrap(), b"fits");

    // A background flush that fails keeps its bytes: once there is room
    // again the next fsync reports the failure (once), the bytes are
    // written, and close reports it too.
    use std::os::fd::IntoRawFd;
    // Every device full (a 2+1 stripe is written as long as two are not):
    // each tmpfs shrunk to what it holds plus less than one fragment
    // (256 KiB), retried if a write in flight grew it meanwhile.
    for d in &dirs {
        let shrunk = (0..10).any(|_| {
            let df = Command::new("df")
                .args(["--output=used", "-B1"])
                .arg(d)
                .output()
                .unwrap();
            let used: u64 = String::from_utf8_lossy(&df.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
                .expect("df --output=used");
            let ok = Command::new("mount")
                .args(["-o", &format!("remount,size={}", used + (64 << 10))])
                .arg(d)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(200));
            }
            ok
        });
        assert!(shrunk, "shrinking the tmpfs to what it holds");
    }
    const FAILURES: &str = "claudefs_fuse_background_flush_failures_total";
    let failed_before = mount_counter(&url_file, FAILURES);
    let kept = m.path.join("kept");
    let mut f = std::fs::File::create(&kept).unwrap();
    let pattern = common::noise(251, 9 << 20);
    for chunk in pattern.chunks(1 << 20) {
        // The 8th MiB fills the write buffer: it is flushed behind, and
        // fails (the devices are full).
        f.write_all(chunk).unwrap();
    }
    // The kernel holds written pages (writeback cache): push them to the
    // mount now, without an fsync.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; range 0..0 means the whole file.
        let rc = unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    let until = Instant::now() + Duration::from_secs(60);
    while mount_counter(&url_file, FAILURES) == failed_before {
        assert!(Instant::now() < until, "the background flush never failed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Room again. With mount(2), not mount(8): a child process would
    // inherit the descriptor and its exec would close it, which the file
    // system sees as a close (and reports the error to).
    for d in &dirs {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(d.as_os_str().as_bytes()).unwrap();
        let (src, fstype) = (c"tmpfs", c"tmpfs");
        let data = c"size=96m";
        // SAFETY: valid C strings; remounting a tmpfs this test mounted.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_REMOUNT,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "growing the tmpfs: {}",
            std::io::Error::last_os_error()
        );
    }
    let e = f
        .sync_all()
        .expect_err("the failed background flush is reported");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "got {e}");
    f.sync_all()
        .expect("reported once; the kept bytes are written now");
    let fd = f.into_raw_fd();
    // SAFETY: closing the descriptor just taken from the File.
    let rc = unsafe { libc::close(fd) };
    assert_eq!(
        (rc, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::ENOSPC)),
        "close reports it too"
    );
    drop_kernel_caches();
    assert!(
        std::fs::read(&kept).unwrap() == pattern,
        "no byte was dropped"
    );
}
