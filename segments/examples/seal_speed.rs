//! Which implementation seals and which opens a stripe's frames
//! (docs/decisions.md D51): XChaCha20-Poly1305 from the `chacha20poly1305`
//! crate against HChaCha20 + `ring`'s ChaCha20-Poly1305 (the same bytes),
//! each sealing and opening the 64 KiB frames of 512 KiB stripes of
//! random bytes as `seal::seal` and `seal::open_frames` do (each frame
//! copied into a new buffer, then sealed or opened in place), one thread.
//! Prints MB/s, medians of `RUNS` (default 5) passes over `MIB` (default
//! 256) MiB, then checks `seal`/`open_frames` round trip.
//!
//! Usage: cargo run --release -p cfs-segments --example seal_speed

use std::time::Instant;

use cfs_segments::seal::{open_frames, seal, DataKey};
use cfs_stripe::{KeyId, Packing, FRAME_BYTES, SEAL_TAG_BYTES};
use chacha20::cipher::consts::U10;
use chacha20::cipher::generic_array::GenericArray;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

const STRIPE: usize = 512 << 10;
const FRAME: usize = FRAME_BYTES as usize;
const TAG: usize = SEAL_TAG_BYTES as usize;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// MB/s of `f` run once per stripe over `stripes`, medians of `runs`.
fn rate(runs: usize, stripes: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..stripes {
                    f();
                }
                (stripes * STRIPE) as f64 / t.elapsed().as_secs_f64() / 1e6
            })
            .collect(),
    )
}

fn main() {
    let runs = env("RUNS", 5);
    let stripes = env("MIB", 256) * (1 << 20) / STRIPE;
    let key: [u8; 32] = rand::random();
    let nonce: [u8; 24] = rand::random();
    let data: Vec<u8> = (0..STRIPE).map(|_| rand::random::<u8>()).collect();

    let xchacha = XChaCha20Poly1305::new((&key).into());
    let xnonce = XNonce::from(nonce);
    let sub = chacha20::hchacha::<U10>((&key).into(), GenericArray::from_slice(&nonce[..16]));
    let ring_key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &sub).expect("key"));
    let ring_nonce = || {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&nonce[16..]);
        Nonce::assume_unique_for_key(n)
    };

    let seal_crate = |data: &[u8]| {
        let mut out = Vec::with_capacity(data.len() + data.len() / FRAME * TAG + TAG);
        for frame in data.chunks(FRAME) {
            let start = out.len();
            out.extend_from_slice(frame);
            let tag = xchacha
                .encrypt_in_place_detached(&xnonce, b"", &mut out[start..])
                .expect("seal");
            out.extend_from_slice(&tag);
        }
        out
    };
    let seal_ring = |data: &[u8]| {
        let mut out = Vec::with_capacity(data.len() + data.len() / FRAME * TAG + TAG);
        for frame in data.chunks(FRAME) {
            let start = out.len();
            out.extend_from_slice(frame);
            let tag = ring_key
                .seal_in_place_separate_tag(ring_nonce(), Aad::from(b""), &mut out[start..])
                .expect("seal");
            out.extend_from_slice(tag.as_ref());
        }
        out
    };
    let sealed = seal_crate(&data);
    assert_eq!(sealed, seal_ring(&data), "the two ciphers differ");
    let open_crate = |sealed: &[u8]| {
        let mut out = Vec::with_capacity(STRIPE);
        for part in sealed.chunks(FRAME + TAG) {
            let (body, tag) = part.split_at(part.len() - TAG);
            let start = out.len();
            out.extend_from_slice(body);
            xchacha
                .decrypt_in_place_detached(&xnonce, b"", &mut out[start..], tag.into())
                .expect("open");
        }
        out
    };
    let open_ring = |sealed: &[u8]| {
        let mut out = Vec::with_capacity(STRIPE);
        for part in sealed.chunks(FRAME + TAG) {
            let (body, tag) = part.split_at(part.len() - TAG);
            let start = out.len();
            out.extend_from_slice(body);
            let tag = Tag::try_from(tag).expect("tag");
            ring_key
                .open_in_place_separate_tag(
                    ring_nonce(),
                    Aad::from(b""),
                    tag,
                    &mut out[start..],
                    0..,
                )
                .expect("open");
        }
        out
    };
    let rows = [
        (
            "chacha20poly1305 crate",
            "seal",
            rate(runs, stripes, || {
                std::hint::black_box(seal_crate(&data));
            }),
        ),
        (
            "HChaCha20 + ring",
            "seal",
            rate(runs, stripes, || {
                std::hint::black_box(seal_ring(&data));
            }),
        ),
        (
            "chacha20poly1305 crate",
            "open",
            rate(runs, stripes, || {
                std::hint::black_box(open_crate(&sealed));
            }),
        ),
        (
            "HChaCha20 + ring",
            "open",
            rate(runs, stripes, || {
                std::hint::black_box(open_ring(&sealed));
            }),
        ),
    ];
    let k = DataKey::new(KeyId(1), &key);
    let n = data.len() as u32;
    let (stored, _, s) = seal(data.clone(), Packing::Plain, n, &k).expect("seal");
    let ends: Vec<u32> = (1..=STRIPE.div_ceil(FRAME) as u32)
        .map(|i| i * (FRAME + TAG) as u32)
        .collect();
    let cfs = [
        (
            "cfs seal::seal",
            "seal",
            rate(runs, stripes, || {
                let _ = std::hint::black_box(seal(data.clone(), Packing::Plain, n, &k));
            }),
        ),
        (
            "cfs seal::open_frames",
            "open",
            rate(runs, stripes, || {
                let _ = std::hint::black_box(open_frames(&stored, &ends, 0..ends.len(), n, &s, &k));
            }),
        ),
    ];
    println!("| implementation | direction | MB/s (median of {runs}) |");
    println!("|---|---|---|");
    for (who, dir, r) in rows.iter().chain(&cfs) {
        println!("| {who} | {dir} | {r:.0} |");
    }
    println!(
        "ring/crate: seal {:.2}, open {:.2}",
        rows[1].2 / rows[0].2,
        rows[3].2 / rows[2].2
    );

    // `seal` and `open_frames` round trip.
    let opened = open_frames(&stored, &ends, 0..ends.len(), n, &s, &k).expect("open");
    assert_eq!(opened, data);
}
