//! Tenants and their data keys (docs/decisions.md D51): a tenant is a
//! name set on a subtree (`cfs admin policy set DIR --encrypt TENANT`, the
//! [`TENANT_XATTR`] attribute, inherited by what is created in it); the
//! stripes of its files are sealed with the tenant's newest key and
//! deduplicated only against the tenant's own chunks. The log keeps each
//! key sealed under the cluster's master key ([`WrappedKey`]), never in
//! the clear; a metadata service opens it for a mount whose certificate
//! names the tenant.

use serde::{Deserialize, Serialize};

pub use cfs_stripe::KeyId;

use crate::types::Nanos;

/// The extended attribute that names a subtree's tenant (root only, as
/// every `trusted.` attribute; copied to what is created in it).
pub const TENANT_XATTR: &[u8] = b"trusted.claudefs.tenant";

/// Generations one tenant may have (each rotation adds one).
pub const TENANT_GENERATIONS_MAX: u32 = 1024;

/// Whether `name` may name a tenant: letters, digits and `-`, 1 to 63
/// characters, not starting or ending with `-` (what a certificate name
/// part allows, so mounts can be granted it).
pub fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A data key sealed under the master key (XChaCha20-Poly1305; the
/// associated data binds the cluster and the tenant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub nonce: [u8; 24],
    /// The 32 key bytes and the 16-byte tag.
    pub sealed: Vec<u8>,
}

/// One generation of a tenant's key as the namespace keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKeyRecord {
    pub tenant: String,
    pub id: KeyId,
    /// 1 for the tenant's first key, one more per rotation.
    pub generation: u32,
    pub wrapped: WrappedKey,
    /// When the entry that made it was proposed.
    pub made: Nanos,
}

/// How far re-encrypting a tenant's stripes under its newest key has
/// gone, as the collector last logged it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencryption {
    pub tenant: String,
    /// The key stripes are being moved to.
    pub to: KeyId,
    /// Bytes of file data moved to it so far.
    pub moved_bytes: u64,
    /// Bytes of file data still under older keys at the last pass.
    pub left_bytes: u64,
    pub at: Nanos,
}

/// A key in the clear, as a metadata service hands it to a mount over
/// its authenticated connection (never logged, never stored).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearKey {
    pub id: KeyId,
    pub generation: u32,
    pub key: [u8; 32],
}

impl std::fmt::Debug for ClearKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClearKey({}, generation {})", self.id, self.generation)
    }
}

/// What a mount needs to write and read a tenant's files: every
/// generation of its key (the newest last: new stripes use it) and the
/// key its chunk ids are made with (its dedupe domain).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKeys {
    pub tenant: String,
    pub keys: Vec<ClearKey>,
    pub chunk_key: ChunkKeyBytes,
}

/// The key a tenant's chunk ids are made with (never printed).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkKeyBytes(pub [u8; 32]);

impl std::fmt::Debug for ChunkKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKeyBytes(..)")
    }
}

/// What an administrator sees of the keys: no key bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub tenant: String,
    pub id: KeyId,
    pub generation: u32,
    pub made: Nanos,
}

/// The cluster's keys and re-encryption progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    pub keys: Vec<KeyInfo>,
    pub reencryption: Vec<Reencryption>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_certificate_labels() {
        for ok in ["a", "genomics", "lab-2", &"x".repeat(63)] {
            assert!(valid_tenant(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a b", "ü", &"x".repeat(64), "a/b"] {
            assert!(!valid_tenant(bad), "{bad}");
        }
    }

    #[test]
    fn keys_are_never_printed() {
        let k = ClearKey {
            id: KeyId(3),
            generation: 2,
            key: [0xab; 32],
        };
        assert!(!format!("{k:?}").contains("171"));
        assert!(!format!("{k:?}").to_lowercase().contains("ab, ab"));
        assert_eq!(format!("{:?}", ChunkKeyBytes([7; 32])), "ChunkKeyBytes(..)");
    }
}
