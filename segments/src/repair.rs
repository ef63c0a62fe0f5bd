//! Repair: recreate the fragments a failed node held, on the survivors.
//!
//! 1. Ask every survivor what it holds (`List`): for each segment, which
//!    fragment indices, which stripes, its layout and original placement.
//! 2. A fragment index is lost if the failed node was its original home and
//!    no survivor holds it.
//! 3. For each lost fragment, pick a target survivor (one that holds no
//!    fragment of that segment if possible, else the least loaded), then for
//!    every stripe read `k` verified fragments, recompute the lost one and
//!    append it to the target; seal it if the segment is sealed.
//!
//! Readers find moved fragments by asking the other nodes when a
//! fragment's original node fails (see `client::StripeReader`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_bytes::ByteBuf;

use crate::client::{ClientError, SegmentClient};
use crate::ec::Codec;
use crate::format::SegmentId;
use crate::layout::Layout;
use crate::proto::{Request, Response};

/// Progress of a repair, reported after every stripe.
#[derive(Clone, Debug, Default)]
pub struct RepairProgress {
    pub fragments_total: usize,
    pub fragments_done: usize,
    pub stripes_total: usize,
    pub stripes_done: usize,
    pub bytes_written: u64,
}

/// What a repair did.
#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    pub progress: RepairProgress,
    /// (segment, fragment, new node)
    pub moved: Vec<(SegmentId, u8, u64)>,
    /// Fragments that could not be rebuilt, and why.
    pub failed: Vec<(SegmentId, u8, String)>,
}

struct SegmentView {
    layout: Layout,
    nodes: Vec<u64>,
    sealed: bool,
    /// fragment index -> (node, stripes held)
    holders: BTreeMap<u8, Vec<(u64, BTreeSet<u32>)>>,
}

/// Rebuilds everything `failed` held onto `survivors`.
pub async fn repair_node(
    client: Arc<SegmentClient>,
    failed: u64,
    survivors: &[u64],
    mut progress: impl FnMut(&RepairProgress),
) -> Result<RepairReport, ClientError> {
    let mut segs: BTreeMap<SegmentId, SegmentView> = BTreeMap::new();
    for &n in survivors {
        for info in client.list(n).await? {
            let v = segs.entry(info.key.segment).or_insert_with(|| SegmentView {
                layout: info.layout,
                nodes: info.nodes.clone(),
                sealed: false,
                holders: BTreeMap::new(),
            });
            v.sealed |= info.sealed;
            v.holders
                .entry(info.key.fragment)
                .or_default()
                .push((n, info.stripes.iter().copied().collect()));
        }
    }
    // Work list: (segment, lost fragment index, target node, stripes).
    let mut work = Vec::new();
    let mut load: BTreeMap<u64, usize> = survivors.iter().map(|n| (*n, 0)).collect();
    for (seg, v) in &segs {
        for (i, home) in v.nodes.iter().enumerate() {
            let i = i as u8;
            if *home != failed || v.holders.contains_key(&i) {
                continue;
            }
            let holding: BTreeSet<u64> = v.holders.values().flatten().map(|(n, _)| *n).collect();
            let target = survivors
                .iter()
                .copied()
                .filter(|n| !holding.contains(n))
                .min_by_key(|n| load[n])
                .or_else(|| survivors.iter().copied().min_by_key(|n| load[n]));
            let Some(target) = target else { continue };
            *load.entry(target).or_default() += 1;
            let stripes: BTreeSet<u32> = v
                .holders
                .values()
                .flatten()
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            work.push((*seg, i, target, stripes));
        }
    }
    let mut report = RepairReport::default();
    report.progress.fragments_total = work.len();
    report.progress.stripes_total = work.iter().map(|w| w.3.len()).sum();
    progress(&report.progress);
    for (seg, lost, target, stripes) in work {
        let v = &segs[&seg];
        let codec = Codec::new(v.layout).map_err(|e| ClientError::Placement(e.to_string()))?;
        let mut nodes = v.nodes.clone();
        nodes[lost as usize] = target;
        let mut ok = true;
        for stripe in stripes {
            match copy_stripe(&client, &codec, seg, v, lost, stripe, target, &nodes).await {
                Ok(bytes) => report.progress.bytes_written += bytes,
                Err(e) => {
                    report
                        .failed
                        .push((seg, lost, format!("stripe {stripe}: {e}")));
                    ok = false;
                    break;
                }
            }
            report.progress.stripes_done += 1;
            progress(&report.progress);
        }
        if ok {
            if v.sealed {
                client
                    .call(
                        target,
                        Request::Seal {
                            segment: seg,
                            fragment: lost,
                        },
                    )
                    .await?;
            }
            report.moved.push((seg, lost, target));
        }
        report.progress.fragments_done += 1;
        progress(&report.progress);
    }
    Ok(report)
}

/// Rebuilds fragment `lost` of one stripe and appends it to `target`;
/// returns the bytes written.
#[allow(clippy::too_many_arguments)]
async fn copy_stripe(
    client: &SegmentClient,
    codec: &Codec,
    seg: SegmentId,
    v: &SegmentView,
    lost: u8,
    stripe: u32,
    target: u64,
    nodes: &[u64],
) -> Result<u64, String> {
    let frag = rebuild_stripe(client, codec, seg, v, lost, stripe).await?;
    let len = frag.len() as u64;
    let append = Request::Append {
        segment: seg,
        fragment: lost,
        layout: v.layout,
        nodes: nodes.to_vec(),
        stripe,
        data: ByteBuf::from(frag),
    };
    match client
        .call(target, append)
        .await
        .map_err(|e| e.to_string())?
    {
        Response::Appended { .. } => Ok(len),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

async fn rebuild_stripe(
    client: &SegmentClient,
    codec: &Codec,
    seg: SegmentId,
    v: &SegmentView,
    lost: u8,
    stripe: u32,
) -> Result<Vec<u8>, String> {
    let k = v.layout.k as usize;
    let mut frags: Vec<Option<Vec<u8>>> = vec![None; v.layout.width()];
    let mut have = 0;
    let mut errors = Vec::new();
    for (i, holders) in &v.holders {
        if have >= k {
            break;
        }
        for (node, stripes) in holders {
            if !stripes.contains(&stripe) {
                continue;
            }
            // The server verifies the fragment's blake3 before answering.
            match client.read_fragment(*node, seg, *i, stripe).await {
                Ok((d, _)) => {
                    frags[*i as usize] = Some(d);
                    have += 1;
                    break;
                }
                Err(e) => errors.push(format!("fragment {i} on node {node}: {e}")),
            }
        }
    }
    if have < k {
        return Err(format!(
            "only {have} of {k} fragments readable: {}",
            errors.join("; ")
        ));
    }
    codec
        .reconstruct_all(&mut frags)
        .map_err(|e| e.to_string())?;
    frags[lost as usize]
        .take()
        .ok_or_else(|| "reconstruction produced nothing".to_string())
}
