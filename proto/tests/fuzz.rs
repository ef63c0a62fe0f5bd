//! Fuzz target for the metadata protocol's decoder, as the service reads
//! a client's frames (bolero; see log/tests/fuzz.rs for how these run):
//! no input may panic or allocate without bound.

use cfs_proto::ops::RequestFrame;

#[test]
fn metadata_requests() {
    bolero::check!().for_each(|input: &[u8]| {
        let _ = cfs_frame::decode_body::<RequestFrame>(input, 1 << 20);
    });
}
