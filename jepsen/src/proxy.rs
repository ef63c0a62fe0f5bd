//! A fault-injecting TCP proxy for one directed link between two nodes.
//!
//! Each node dials every peer and sends only on its own outbound link
//! (cfs-log's transport), so a proxy per ordered pair (from, to) controls
//! exactly what `from` can tell `to`: dropping it is a one-way partition,
//! dropping both directions a full one. This kernel has no netem, so delay
//! is injected here too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the link does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Up,
    /// Black hole: connections stay open but nothing gets through; the
    /// connections alive when the fault began are cut when it ends, so the
    /// framed streams start clean.
    Down,
    /// Every chunk is held `ms` ± `jitter` ms (order kept).
    Delay {
        ms: u64,
        jitter: u64,
    },
}

/// A running proxy.
pub struct Link {
    pub listen: SocketAddr,
    state: watch::Sender<LinkState>,
    /// Bumped when a fault ends: connections of an older generation close.
    generation: watch::Sender<u64>,
}

impl Link {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Arc<Link>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let (state, _) = watch::channel(LinkState::Up);
        let (generation, _) = watch::channel(0u64);
        let link = Arc::new(Link {
            listen,
            state,
            generation,
        });
        let l2 = link.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                let l3 = l2.clone();
                tokio::spawn(async move {
                    let _ = l3.serve(sock, target).await;
                });
            }
        });
        Ok(link)
    }

    pub fn set(&self, s: LinkState) {
        let old = *self.state.borrow();
        if old != s {
            self.state.send_replace(s);
            if old == LinkState::Down {
                self.generation.send_modify(|g| *g += 1);
            }
        }
    }

    async fn serve(&self, client: TcpStream, target: SocketAddr) -> std::io::Result<()> {
        let gen = *self.generation.borrow();
        let mut gen_rx = self.generation.subscribe();
        let server = TcpStream::connect(target).await?;
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let a = pump(cr, sw, self.state.subscribe());
        let b = pump(sr, cw, self.state.subscribe());
        tokio::select! {
            _ = a => {}
            _ = b => {}
            _ = gen_rx.wait_for(|g| *g != gen) => {}
        }
        Ok(())
    }
}

/// Copies one direction, applying the link state to each chunk.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    state: watch::Receiver<LinkState>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let st = *state.borrow();
            let at = match st {
                LinkState::Up => Instant::now(),
                LinkState::Down => continue,
                LinkState::Delay { ms, jitter } => {
                    let j = if jitter > 0 {
                        rand::random::<u64>() % (2 * jitter + 1)
                    } else {
                        jitter
                    };
                    Instant::now() + Duration::from_millis((ms + j).saturating_sub(jitter))
                }
            };
            if tx.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        let mut last = Instant::now();
        while let Some((at, bytes)) = rx.recv().await {
            // Keep order: never release a chunk before the one ahead.
            let at = at.max(last);
            last = at;
            tokio::time::sleep_until(at.into()).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
