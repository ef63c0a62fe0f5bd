//! Fuzz target for the segment protocol's decoder (bolero; see
//! log/tests/fuzz.rs for how these run): no input may panic or allocate
//! without bound.

use cfs_segments::proto::{decode, Request, Response};

#[test]
fn segment_messages() {
    bolero::check!().for_each(|input: &[u8]| {
        let _ = decode::<Request>(input);
        let _ = decode::<Response>(input);
    });
}
