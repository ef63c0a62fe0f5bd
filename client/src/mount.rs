//! `cfs mount`: connects to the cluster, mounts with FUSE and serves until
//! unmounted (or SIGTERM/SIGINT, which unmount).

use std::path::Path;
use std::sync::Arc;

use cfs_proto::ops::{Request as MReq, RequestFrame};
use cfs_proto::rpc::StatFs;
use fuser::MountOption;
use tracing::{info, warn};

use crate::conn::{Invalidation, MetaClient};
use crate::data::DataPath;
use crate::fs::CfsFs;
use crate::options::MountOptions;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("no metadata server answered ({0})")]
    NoServer(String),
    #[error("segment store: {0}")]
    Segments(String),
    #[error("mount {path}: {source}")]
    Fuse {
        path: String,
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Mounts the cluster at `mountpoint` and serves it until it is unmounted.
pub fn mount(mountpoint: &Path, opts: MountOptions) -> Result<(), MountError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cfs-client")
        .build()
        .map_err(MountError::Runtime)?;
    let (meta, inval_rx) = MetaClient::new(
        opts.servers.clone(),
        opts.cluster_id.clone(),
        opts.security.clone(),
        opts.timeout,
    );
    meta.set_follow_leader(opts.follow_leader);
    if let Some(addr) = opts.metrics_listen {
        let bound = rt
            .block_on(crate::metrics_http::serve(addr, meta.stats.clone()))
            .map_err(MountError::Runtime)?;
        info!(%bound, "mount metrics at http://{bound}/metrics");
        if let Some(f) = &opts.metrics_url_file {
            std::fs::write(f, format!("http://{bound}/metrics\n")).map_err(MountError::Runtime)?;
        }
    }
    let welcome = rt.block_on(async {
        match meta.rpc(StatFs, false).await {
            Ok(_) => meta
                .welcome()
                .ok_or_else(|| MountError::NoServer("no welcome".into())),
            Err(e) => Err(MountError::NoServer(e.to_string())),
        }
    })?;
    let tenants = Arc::new(crate::tenants::Tenants::default());
    let data = Arc::new(
        DataPath::new(
            &opts.cluster_id,
            opts.security.clone(),
            &welcome.segment_servers,
            opts.cache_bytes,
            meta.stats.clone(),
            tenants.clone(),
        )
        .map_err(MountError::Segments)?,
    );
    {
        // A writer idle this long seals its segment (see
        // `DataPath::seal_idle`).
        let data = data.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(crate::data::SEAL_IDLE_AFTER / 2);
            loop {
                tick.tick().await;
                data.seal_idle(crate::data::SEAL_IDLE_AFTER).await;
            }
        });
    }
    if opts.cache_mode != crate::options::CacheMode::Strict {
        let _g = rt.enter();
        meta.keep_leases();
    }
    let fs = CfsFs::new(
        rt.handle().clone(),
        meta.clone(),
        data,
        tenants,
        opts.clone(),
    );
    let known = fs.known();
    let forget = fs.forget_cached();
    let kernel = fs.kernel_slot();
    // nosuid and nodev unless asked: a file system shared over the network
    // must not let whoever can write to it plant a setuid-root program or
    // a device node on this machine.
    let options = vec![
        MountOption::FSName("cfs".into()),
        MountOption::Subtype("cfs".into()),
        MountOption::DefaultPermissions,
        MountOption::AllowOther,
        if opts.allow_dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if opts.allow_suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        MountOption::RW,
        MountOption::Async,
    ];
    let mut session =
        fuser::Session::new(fs, mountpoint, &options).map_err(|source| MountError::Fuse {
            path: mountpoint.display().to_string(),
            source,
        })?;
    info!(mountpoint = %mountpoint.display(), node = welcome.node_id, "mounted");
    let notifier = session.notifier();
    let _ = kernel.set(notifier.clone());
    let cache = meta.cache.clone();
    std::thread::Builder::new()
        .name("cfs-invalidate".into())
        .spawn(move || invalidate_loop(inval_rx, notifier, known, forget, cache))
        .map_err(MountError::Runtime)?;
    // SIGTERM/SIGINT: unmount, which ends the session loop below.
    let mp = mountpoint.to_path_buf();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        info!("signal: unmounting");
        unmount(&mp);
    });
    let r = session.run();
    info!("unmounted");
    r.map_err(|source| MountError::Fuse {
        path: mountpoint.display().to_string(),
        source,
    })
}

/// Unmounts `mountpoint` (lazily, so busy mounts go too).
pub fn unmount(mountpoint: &Path) -> bool {
    for cmd in [("fusermount3", &["-u", "-z"][..]), ("umount", &["-l"][..])] {
        if let Ok(s) = std::process::Command::new(cmd.0)
            .args(cmd.1)
            .arg(mountpoint)
            .status()
        {
            if s.success() {
                return true;
            }
        }
    }
    false
}

type Known = Arc<dyn Fn() -> Vec<u64> + Send + Sync>;
type Forget = Arc<dyn Fn(u64) + Send + Sync>;

fn invalidate_loop(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Invalidation>,
    notifier: fuser::Notifier,
    known: Known,
    forget: Forget,
    cache: Arc<crate::cache::MetaCache>,
) {
    while let Some(first) = rx.blocking_recv() {
        // What has queued up meanwhile goes in the same batch: one
        // acknowledgement for all of it.
        let mut batch = vec![first];
        while batch.len() < INVALIDATION_BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut acks: Vec<(u64, u64, tokio::sync::mpsc::UnboundedSender<RequestFrame>)> =
            Vec::new();
        for m in batch {
            if !m.own || cache.watched(m.ino, &m.entry) {
                apply_invalidation(&notifier, &known, &forget, m.ino, &m.entry);
            }
            cache.applied(m.gen, m.seq);
            match acks.iter_mut().find(|(g, _, _)| *g == m.gen) {
                Some(a) => a.1 = a.1.max(m.seq),
                None => acks.push((m.gen, m.seq, m.acker)),
            }
        }
        for (_, seq, acker) in acks {
            if seq > 0 {
                let _ = acker.send(RequestFrame {
                    id: 0,
                    fresh: false,
                    req: MReq::InvalAck { seq },
                });
            }
        }
    }
}

/// Invalidations applied between two acknowledgements at most.
const INVALIDATION_BATCH_MAX: usize = 1024;

/// Drops the kernel's (and this mount's per-file) caches of `ino` (0:
/// everything it knows) or of one directory entry.
fn apply_invalidation(
    notifier: &fuser::Notifier,
    known: &Known,
    forget: &Forget,
    ino: u64,
    entry: &Option<(u64, Vec<u8>)>,
) {
    if ino == 0 {
        // The mount's own per-file state of inodes the kernel forgot too.
        forget(0);
    }
    let inodes = if ino == 0 { known() } else { vec![ino] };
    for i in inodes {
        forget(i);
        match entry {
            Some((parent, name)) => {
                let _ = notifier.inval_entry(*parent, std::ffi::OsStr::from_bytes_compat(name));
            }
            None => {
                if let Err(e) = notifier.inval_inode(i, 0, 0) {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        warn!(ino = i, "invalidate: {e}");
                    }
                }
            }
        }
    }
}

trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(b)
    }
}
