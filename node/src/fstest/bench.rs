//! `cfs fsbench DIR`: file system workloads timed in-process (no process
//! per file), printed as `metric value unit` lines for bench/fs.sh.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

pub struct BenchConfig {
    pub files: usize,
    pub small_files: usize,
    pub seq_mib: usize,
    pub tarball: Option<std::path::PathBuf>,
    /// Threads of the parallel pass (0: none).
    pub threads: usize,
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn rate(n: usize, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64()
}

/// Runs every workload under `dir/cfs-bench` and prints the figures.
pub fn run(dir: &Path, cfg: &BenchConfig) -> anyhow::Result<()> {
    let root = dir.join("cfs-bench");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;

    // Metadata: create, stat, unlink in one directory.
    let d = root.join("meta");
    std::fs::create_dir(&d)?;
    let t = Instant::now();
    for i in 0..cfg.files {
        std::fs::File::create(d.join(format!("file-{i}")))?;
    }
    println!("create {:.0} ops/s", rate(cfg.files, t));
    let t = Instant::now();
    for i in 0..cfg.files {
        std::fs::metadata(d.join(format!("file-{i}")))?;
    }
    println!("stat {:.0} ops/s", rate(cfg.files, t));
    // The same names again at once: what the caches answer.
    let t = Instant::now();
    for i in 0..cfg.files {
        std::fs::metadata(d.join(format!("file-{i}")))?;
    }
    println!("stat_cached {:.0} ops/s", rate(cfg.files, t));
    let t = Instant::now();
    for i in 0..cfg.files {
        std::fs::remove_file(d.join(format!("file-{i}")))?;
    }
    println!("unlink {:.0} ops/s", rate(cfg.files, t));

    // Metadata in a tree: the same number of files in sqrt(files)
    // directories of sqrt(files) files each (100 x 100 for 10 000).
    let side = ((cfg.files as f64).sqrt() as usize).max(1);
    let d = root.join("tree-meta");
    std::fs::create_dir(&d)?;
    for a in 0..side {
        std::fs::create_dir(d.join(format!("d{a}")))?;
    }
    let each = |f: &mut dyn FnMut(std::path::PathBuf) -> std::io::Result<()>| {
        for a in 0..side {
            for b in 0..side {
                f(d.join(format!("d{a}")).join(format!("f{b}")))?;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let t = Instant::now();
    each(&mut |p| std::fs::File::create(p).map(|_| ()))?;
    println!("create_tree {:.0} ops/s", rate(side * side, t));
    let t = Instant::now();
    each(&mut |p| std::fs::metadata(p).map(|_| ()))?;
    println!("stat_tree {:.0} ops/s", rate(side * side, t));
    let t = Instant::now();
    each(&mut |p| std::fs::remove_file(p))?;
    println!("unlink_tree {:.0} ops/s", rate(side * side, t));

    if cfg.threads > 0 {
        parallel(&root.join("par"), cfg)?;
    }

    // Directories: mkdir and rmdir (on cfs about half of them are placed
    // on another shard than their parent: a cross-shard transaction each).
    let dirs = (cfg.files / 10).max(1);
    let d = root.join("dirs");
    std::fs::create_dir(&d)?;
    let t = Instant::now();
    for i in 0..dirs {
        std::fs::create_dir(d.join(format!("dir-{i}")))?;
    }
    println!("mkdir {:.0} ops/s", rate(dirs, t));
    let t = Instant::now();
    for i in 0..dirs {
        std::fs::remove_dir(d.join(format!("dir-{i}")))?;
    }
    println!("rmdir {:.0} ops/s", rate(dirs, t));

    // Small files: 4 KiB written with fsync, then read back cold.
    let d = root.join("small");
    std::fs::create_dir(&d)?;
    let block = vec![0x5au8; 4096];
    let t = Instant::now();
    for i in 0..cfg.small_files {
        let mut f = std::fs::File::create(d.join(format!("s-{i}")))?;
        f.write_all(&block)?;
        f.sync_all()?;
    }
    println!("small_write_fsync {:.0} files/s", rate(cfg.small_files, t));
    drop_caches();
    let mut buf = Vec::with_capacity(8192);
    let t = Instant::now();
    for i in 0..cfg.small_files {
        buf.clear();
        std::fs::File::open(d.join(format!("s-{i}")))?.read_to_end(&mut buf)?;
        anyhow::ensure!(buf.len() == 4096, "short small file");
    }
    println!("small_read {:.0} files/s", rate(cfg.small_files, t));

    // Sequential: 1 MiB requests, fsync at the end; read back cold.
    let p = root.join("seq.bin");
    let mib = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&p)?;
        for _ in 0..cfg.seq_mib {
            f.write_all(&mib)?;
        }
        f.sync_all()?;
    }
    println!(
        "seq_write {:.1} MB/s",
        cfg.seq_mib as f64 * 1.048576 / t.elapsed().as_secs_f64()
    );
    drop_caches();
    let mut rbuf = vec![0u8; 1 << 20];
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&p)?;
        let mut total = 0usize;
        loop {
            let n = f.read(&mut rbuf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        anyhow::ensure!(total == cfg.seq_mib << 20, "short sequential read");
    }
    println!(
        "seq_read {:.1} MB/s",
        cfg.seq_mib as f64 * 1.048576 / t.elapsed().as_secs_f64()
    );
    std::fs::remove_file(&p)?;

    // A real tree: extract, then remove.
    if let Some(tar) = &cfg.tarball {
        let d = root.join("tree");
        std::fs::create_dir(&d)?;
        let t = Instant::now();
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(tar)
            .arg("-C")
            .arg(&d)
            .status()?;
        anyhow::ensure!(st.success(), "tar -x failed");
        println!("tar_x {:.2} s", t.elapsed().as_secs_f64());
        drop_caches();
        for (name, args) in [("find", vec!["-H"]), ("du", vec!["-s"])] {
            let t = Instant::now();
            let out = std::process::Command::new(name)
                .args(&args)
                .arg(&d)
                .output()?;
            anyhow::ensure!(out.status.success(), "{name} failed");
            println!("{name} {:.2} s", t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let st = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&d)
            .status()?;
        anyhow::ensure!(st.success(), "rm -rf failed");
        println!("rm_rf {:.2} s", t.elapsed().as_secs_f64());
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// The parallel pass, as mdtest runs it: `threads` workers, each in its own
/// directories (the kernel serializes changes within one directory), the
/// same `files` in total; create, stat, unlink, then 4 KiB files written
/// with fsync and read back cold. Rates count every worker's operations
/// over the wall time of the slowest.
fn parallel(root: &Path, cfg: &BenchConfig) -> anyhow::Result<()> {
    let n = cfg.threads;
    let per = (cfg.files / n).max(1);
    let small_per = (cfg.small_files / n).max(1);
    let dirs: Vec<std::path::PathBuf> = (0..n).map(|w| root.join(format!("w{w}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let phase = |name: &str,
                 count: usize,
                 unit: &str,
                 f: &(dyn Fn(&Path, usize) -> std::io::Result<()> + Sync)|
     -> anyhow::Result<()> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = dirs
                .iter()
                .map(|d| s.spawn(move || (0..count).try_for_each(|i| f(d, i))))
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("bench worker panicked"))
        })
        .with_context(|| format!("parallel {name}"))?;
        println!("{name}_x{n} {:.0} {unit}", rate(count * n, t));
        Ok(())
    };
    let file = |d: &Path, i: usize| d.join(format!("f{i}"));
    phase("create", per, "ops/s", &|d, i| {
        std::fs::File::create(file(d, i)).map(|_| ())
    })?;
    phase("stat", per, "ops/s", &|d, i| {
        std::fs::metadata(file(d, i)).map(|_| ())
    })?;
    phase("unlink", per, "ops/s", &|d, i| {
        std::fs::remove_file(file(d, i))
    })?;
    let block = vec![0x5au8; 4096];
    phase("small_write_fsync", small_per, "files/s", &|d, i| {
        let mut f = std::fs::File::create(d.join(format!("s{i}")))?;
        f.write_all(&block)?;
        f.sync_all()
    })?;
    drop_caches();
    phase("small_read", small_per, "files/s", &|d, i| {
        let mut buf = Vec::with_capacity(8192);
        std::fs::File::open(d.join(format!("s{i}")))?.read_to_end(&mut buf)?;
        if buf.len() != 4096 {
            return Err(std::io::Error::other("short small file"));
        }
        Ok(())
    })?;
    std::fs::remove_dir_all(root)?;
    Ok(())
}
