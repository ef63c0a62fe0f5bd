//! Fuzz targets for what the log decodes from the network and from disk
//! (bolero). Under `cargo test` each runs as a random-input test for 1 s
//! (`BOLERO_RANDOM_TEST_TIME_MS` or `BOLERO_RANDOM_ITERATIONS` to change
//! it, `BOLERO_RANDOM_MAX_LEN` for the input length); with a fuzzing engine
//! (`cargo bolero test --engine libfuzzer`, which needs a nightly
//! toolchain) the same targets are coverage-guided. docs/security.md
//! records the longer runs.
//!
//! Every target: no input may panic, hang or allocate without bound;
//! what decodes, encodes back to what decodes the same.

use cfs_log::disk::{Disk, DiskFile, SimDisk};
use cfs_log::wal::{NodeWal, WalConfig};
use cfs_log::wire::Wire;
use cfs_log::Entry;

#[test]
fn frames() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(Some((payload, used))) = cfs_log::frame::decode(input, 1 << 20) {
            assert!(used <= input.len());
            assert_eq!(payload.len() + cfs_log::frame::FRAME_HEADER_BYTES, used);
        }
    });
}

#[test]
fn wire_messages() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(w) = Wire::decode(input) {
            let mut out = Vec::new();
            w.encode_frame(&mut out);
            let (body, _) = cfs_log::frame::decode(&out, usize::MAX)
                .expect("a frame we wrote")
                .expect("a whole frame");
            assert!(Wire::decode(body).is_ok(), "{w:?} does not decode back");
        }
    });
}

#[test]
fn log_entries() {
    bolero::check!().for_each(|input: &[u8]| {
        if let Ok(e) = Entry::decode(input) {
            assert_eq!(Entry::decode(&e.encode()).ok().as_ref(), Some(&e));
        }
    });
}

fn write(d: &SimDisk, name: &str, bytes: &[u8]) {
    d.create_zeroed(name, bytes.len() as u64).unwrap();
    let mut f = d.open(name).unwrap();
    f.write_at(0, bytes).unwrap();
    f.sync_data().unwrap();
    d.sync_dir().unwrap();
}

fn open(d: SimDisk) {
    let cfg = WalConfig {
        segment_bytes: 8192,
        background_prealloc: false,
        memory_bytes_max: 1 << 20,
    };
    // Ok or a clear error, never a panic.
    let _ = NodeWal::open(d, cfg);
}

/// A WAL directory whose one segment holds the input as is.
#[test]
fn wal_recovery_of_raw_bytes() {
    bolero::check!().for_each(|input: &[u8]| {
        let d = SimDisk::new();
        write(&d, "FORMAT", b"cfs-wal 3\n");
        let mut seg = input.to_vec();
        seg.resize(seg.len().max(8192), 0);
        write(&d, "seg-0000000000000000.wal", &seg);
        open(d);
    });
}

/// A WAL segment of well-formed frames (good checksums, this segment's
/// tag) whose record bodies are the input's bytes: the record decoder and
/// replay see arbitrary content.
#[test]
fn wal_recovery_of_framed_records() {
    bolero::check!().for_each(|input: &[u8]| {
        let d = SimDisk::new();
        write(&d, "FORMAT", b"cfs-wal 3\n");
        let mut seg = Vec::new();
        let mut rest = input;
        while !rest.is_empty() && seg.len() < 6000 {
            let n = (rest[0] as usize % 64).min(rest.len() - 1);
            let body = &rest[1..1 + n];
            rest = &rest[1 + n..];
            let mut payload = Vec::with_capacity(16 + body.len());
            payload.extend_from_slice(&0u64.to_le_bytes()); // segment 0
            payload.extend_from_slice(&7u64.to_le_bytes()); // its salt
            payload.extend_from_slice(body);
            cfs_log::frame::encode_into(&mut seg, &payload);
        }
        seg.resize(seg.len().max(8192), 0);
        write(&d, "seg-0000000000000000.wal", &seg);
        open(d);
    });
}
