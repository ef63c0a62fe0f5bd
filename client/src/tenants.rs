//! The tenants' keys this mount holds (docs/decisions.md D51): fetched
//! from a metadata service when a file of the tenant is opened, kept in
//! memory only, refreshed after [`KEYS_FRESH_FOR`] so that a rotation
//! reaches new writes within that time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_proto::tenant::{KeyId, TenantKeys};
use cfs_segments::seal::{DataKey, KeyRing};

use crate::dedupe::ChunkKey;

/// How long a tenant's keys are used before they are asked again (a
/// rotation makes new stripes use the new key within this).
pub const KEYS_FRESH_FOR: Duration = Duration::from_secs(5);
/// Tenants whose keys one mount keeps at most.
pub const TENANTS_MAX: usize = 1024;

/// How one tenant's stripes are written: its newest key and its dedupe
/// domain's chunk key.
pub struct TenantSeal {
    pub tenant: String,
    pub key: Arc<DataKey>,
    pub chunk_key: ChunkKey,
    fetched: Instant,
}

/// The tenants' keys this mount has, and the ring its readers open
/// sealed stripes with.
#[derive(Default)]
pub struct Tenants {
    ring: Arc<KeyRing>,
    seals: Mutex<HashMap<String, Arc<TenantSeal>>>,
    /// The chunk key of the tenant each key id belongs to: a sealed
    /// chunk's id is checked with it.
    chunk_keys: Mutex<HashMap<KeyId, ChunkKey>>,
}

impl Tenants {
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.clone()
    }

    /// `tenant`'s keys if fetched less than [`KEYS_FRESH_FOR`] ago.
    pub fn fresh(&self, tenant: &str) -> Option<Arc<TenantSeal>> {
        self.seals
            .lock()
            .expect("tenant seals lock")
            .get(tenant)
            .filter(|s| s.fetched.elapsed() < KEYS_FRESH_FOR)
            .cloned()
    }

    /// Keeps what a metadata service sent; `None` if it holds no key.
    pub fn learn(&self, keys: TenantKeys) -> Option<Arc<TenantSeal>> {
        let chunk_key = ChunkKey::from_bytes(keys.chunk_key.0);
        let mut newest: Option<Arc<DataKey>> = None;
        let mut by_id = self.chunk_keys.lock().expect("chunk keys lock");
        if by_id.len() >= cfs_segments::seal::KEY_RING_MAX {
            by_id.clear();
        }
        for k in keys.keys.iter() {
            let dk = Arc::new(DataKey::new(k.id, &k.key));
            self.ring.insert(dk.clone());
            by_id.insert(k.id, chunk_key.clone());
            newest = Some(dk);
        }
        drop(by_id);
        let seal = Arc::new(TenantSeal {
            tenant: keys.tenant.clone(),
            key: newest?,
            chunk_key,
            fetched: Instant::now(),
        });
        let mut seals = self.seals.lock().expect("tenant seals lock");
        if seals.len() >= TENANTS_MAX && !seals.contains_key(&keys.tenant) {
            seals.clear();
        }
        seals.insert(keys.tenant, seal.clone());
        Some(seal)
    }

    /// Whether this mount can open stripes sealed with `id`.
    pub fn has_key(&self, id: KeyId) -> bool {
        self.ring.contains(id)
    }

    /// The chunk key of the tenant that `id` belongs to.
    pub fn chunk_key_of(&self, id: KeyId) -> Option<ChunkKey> {
        self.chunk_keys
            .lock()
            .expect("chunk keys lock")
            .get(&id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_proto::tenant::{ChunkKeyBytes, ClearKey};

    fn keys(tenant: &str, ids: &[u64]) -> TenantKeys {
        TenantKeys {
            tenant: tenant.into(),
            keys: ids
                .iter()
                .map(|i| ClearKey {
                    id: KeyId(*i),
                    generation: *i as u32,
                    key: [*i as u8; 32],
                })
                .collect(),
            chunk_key: ChunkKeyBytes([tenant.len() as u8; 32]),
        }
    }

    #[test]
    fn the_newest_key_writes_and_every_generation_reads() {
        let t = Tenants::default();
        assert!(t.fresh("a").is_none());
        let s = t.learn(keys("a", &[1, 4])).unwrap();
        assert_eq!(s.key.id(), KeyId(4));
        assert!(t.has_key(KeyId(1)) && t.has_key(KeyId(4)) && !t.has_key(KeyId(2)));
        assert!(t.fresh("a").is_some());
        assert!(t.fresh("b").is_none());
        // Another tenant's chunk ids are made with its own key.
        t.learn(keys("bb", &[2]));
        let (a, b) = (
            t.chunk_key_of(KeyId(1)).unwrap(),
            t.chunk_key_of(KeyId(2)).unwrap(),
        );
        assert_ne!(a.id(b"same bytes"), b.id(b"same bytes"));
        assert!(t.learn(keys("c", &[])).is_none());
    }
}
