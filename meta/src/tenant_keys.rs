//! Tenants' data keys on the metadata service (docs/decisions.md D51):
//! the master key that seals them in the log, making a tenant's first key
//! and rotating it (administrators only), and opening them for a mount
//! whose certificate names the tenant.
//!
//! The master key comes from a file or the environment of every node
//! (`master_key_file`, `CFS_MASTER_KEY`), never from the log: the log
//! holds each data key only sealed under it (XChaCha20-Poly1305, the
//! cluster id and tenant as associated data), so a copy of the log or of
//! the namespace database alone opens nothing.

use std::path::Path;

use cfs_proto::tenant::{ChunkKeyBytes, ClearKey, TenantKeyRecord, TenantKeys, WrappedKey};
use cfs_proto::types::Errno;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The environment variable a master key may come from (64 hex digits),
/// when no file is configured.
pub const MASTER_KEY_ENV: &str = "CFS_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("reading the master key {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("the master key must be 64 hex digits (32 bytes), optionally followed by a newline")]
    Format,
}

/// The cluster's master key: seals and opens tenants' keys.
pub struct MasterKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn from_hex(text: &str) -> Result<Self, MasterKeyError> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(MasterKeyError::Format);
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(t.get(2 * i..2 * i + 2).ok_or(MasterKeyError::Format)?, 16)
                .map_err(|_| MasterKeyError::Format)?;
        }
        Ok(MasterKey {
            cipher: XChaCha20Poly1305::new((&key).into()),
        })
    }

    /// Reads a key file of 64 hex digits.
    pub fn load(path: &Path) -> Result<Self, MasterKeyError> {
        let text = std::fs::read_to_string(path).map_err(|error| MasterKeyError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_hex(&text)
    }

    /// A new random master key as a key file holds it.
    pub fn generate_hex() -> String {
        let key: [u8; 32] = rand::random();
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn aad(cluster_id: &str, tenant: &str) -> Vec<u8> {
        format!("claudefs tenant key v1\n{cluster_id}\n{tenant}").into_bytes()
    }

    /// `key` sealed for `tenant` of `cluster_id`.
    pub fn wrap(&self, cluster_id: &str, tenant: &str, key: &[u8; 32]) -> WrappedKey {
        let nonce: [u8; 24] = rand::random();
        let aad = Self::aad(cluster_id, tenant);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: &aad,
                },
            )
            // A 32-byte message never exceeds the cipher's limit.
            .unwrap_or_default();
        WrappedKey { nonce, sealed }
    }

    /// The key `w` seals, if this master key sealed it for `tenant` of
    /// `cluster_id`.
    pub fn unwrap(&self, cluster_id: &str, tenant: &str, w: &WrappedKey) -> Option<[u8; 32]> {
        let aad = Self::aad(cluster_id, tenant);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&w.nonce),
                Payload {
                    msg: &w.sealed,
                    aad: &aad,
                },
            )
            .ok()?;
        plain.try_into().ok()
    }
}

/// The key a tenant's chunk ids are made with: derived from its first
/// key, so it stays the same across rotations (chunks written before a
/// rotation are still found after it) and no other tenant can compute it.
pub fn chunk_key(first: &[u8; 32]) -> ChunkKeyBytes {
    ChunkKeyBytes(blake3::derive_key(
        "ClaudeFS 2026-12-04 tenant chunk content address",
        first,
    ))
}

/// Opens every generation of a tenant's key (`records` oldest first):
/// ENOKEY if there is none, EKEYREJECTED if `master` does not open one
/// (the wrong master key on this node).
pub fn open_all(
    master: &MasterKey,
    cluster_id: &str,
    tenant: &str,
    records: &[TenantKeyRecord],
) -> Result<TenantKeys, Errno> {
    let mut keys = Vec::with_capacity(records.len());
    for r in records {
        let Some(key) = master.unwrap(cluster_id, tenant, &r.wrapped) else {
            tracing::error!(
                tenant,
                key = %r.id,
                "the master key does not open this tenant key: this node has the wrong master key"
            );
            return Err(Errno::EKEYREJECTED);
        };
        keys.push(ClearKey {
            id: r.id,
            generation: r.generation,
            key,
        });
    }
    let first = keys.first().ok_or(Errno::ENOKEY)?;
    Ok(TenantKeys {
        tenant: tenant.to_string(),
        chunk_key: chunk_key(&first.key),
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_proto::tenant::KeyId;

    fn record(m: &MasterKey, tenant: &str, g: u32, key: [u8; 32]) -> TenantKeyRecord {
        TenantKeyRecord {
            tenant: tenant.into(),
            id: KeyId(u64::from(g) + 10),
            generation: g,
            wrapped: m.wrap("c1", tenant, &key),
            made: 0,
        }
    }

    #[test]
    fn keys_open_only_with_their_master_cluster_and_tenant() {
        let m = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let other = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let w = m.wrap("c1", "a", &[5; 32]);
        assert_eq!(w.sealed.len(), 48);
        assert!(!w.sealed.windows(4).any(|x| x == [5; 4]));
        assert_eq!(m.unwrap("c1", "a", &w), Some([5; 32]));
        assert_eq!(other.unwrap("c1", "a", &w), None);
        assert_eq!(m.unwrap("c2", "a", &w), None);
        assert_eq!(m.unwrap("c1", "b", &w), None);
        let recs = vec![record(&m, "a", 1, [1; 32]), record(&m, "a", 2, [2; 32])];
        let keys = open_all(&m, "c1", "a", &recs).unwrap();
        assert_eq!(keys.keys.len(), 2);
        assert_eq!(keys.keys[1].key, [2; 32]);
        // The chunk key follows the first generation, not the newest.
        assert_eq!(keys.chunk_key, chunk_key(&[1; 32]));
        assert_eq!(open_all(&other, "c1", "a", &recs), Err(Errno::EKEYREJECTED));
        assert_eq!(open_all(&m, "c1", "a", &[]), Err(Errno::ENOKEY));
    }

    #[test]
    fn master_keys_are_64_hex_digits() {
        assert!(MasterKey::from_hex(&format!("{}\n", "ab".repeat(32))).is_ok());
        for bad in [
            "",
            "ab",
            &"zz".repeat(32),
            &"ab".repeat(33),
            "é".repeat(32).as_str(),
        ] {
            assert!(MasterKey::from_hex(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            format!("{:?}", MasterKey::from_hex(&"ab".repeat(32)).unwrap()),
            "MasterKey(..)"
        );
    }
}
