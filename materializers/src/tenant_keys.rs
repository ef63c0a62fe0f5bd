//! Tenants' keys and re-encryption progress in the namespace (D51):
//! records the first shard keeps, applied from `Op::AddTenantKey` and
//! `Op::ReencryptProgress`, and their reads. The keys are sealed under
//! the master key: nothing here can open them, and nothing here needs to.

use cfs_proto::tenant::{
    valid_tenant, KeyId, Reencryption, TenantKeyRecord, WrappedKey, TENANT_GENERATIONS_MAX,
};

use crate::keys;
use crate::ops::Applied;
use crate::store::{decode, DbError, NamespaceDb, Txn};
use crate::types::*;

use crate::apply::{Fail, R2};

/// Adds the next generation of `tenant`'s key: its first (`rotate ==
/// false`; EEXIST if it has one) or one more (`rotate`; ENOKEY if it has
/// none). Key ids come from the shard's counter, so every replica numbers
/// them alike.
pub(crate) fn add(
    t: &mut Txn<'_>,
    shard: ShardId,
    now: Nanos,
    tenant: &str,
    rotate: bool,
    wrapped: &WrappedKey,
) -> R2<Applied> {
    if !valid_tenant(tenant) || wrapped.sealed.len() != 48 {
        return Err(Fail::Fs(Errno::EINVAL));
    }
    let prefix = keys::tenant_keys_prefix(shard, tenant);
    let have = t.scan(&prefix, &keys::prefix_end(&prefix))?.len() as u32;
    match (have, rotate) {
        (0, true) => return Err(Fail::Fs(Errno::ENOKEY)),
        (1.., false) => return Err(Fail::Fs(Errno::EEXIST)),
        (n, _) if n >= TENANT_GENERATIONS_MAX => return Err(Fail::Fs(Errno::ENOSPC)),
        _ => {}
    }
    let id: u64 = t.get(&keys::next_key_id(shard))?.unwrap_or(1);
    t.put(keys::next_key_id(shard), &(id + 1));
    let generation = have + 1;
    t.put(
        keys::tenant_key(shard, tenant, generation),
        &TenantKeyRecord {
            tenant: tenant.to_string(),
            id: KeyId(id),
            generation,
            wrapped: wrapped.clone(),
            made: now,
        },
    );
    Ok(Applied::None)
}

/// Records how far re-encrypting a tenant has gone (the last word wins).
pub(crate) fn progress(t: &mut Txn<'_>, shard: ShardId, p: &Reencryption) -> R2<Applied> {
    if !valid_tenant(&p.tenant) {
        return Err(Fail::Fs(Errno::EINVAL));
    }
    t.put(keys::reencryption(shard, &p.tenant), p);
    Ok(Applied::None)
}

/// Every generation of `tenant`'s key on `shard`, oldest first.
pub fn of_tenant(
    db: &NamespaceDb,
    shard: ShardId,
    tenant: &str,
) -> Result<Vec<TenantKeyRecord>, DbError> {
    collect(db, &keys::tenant_keys_prefix(shard, tenant))
}

/// Every tenant's keys on `shard`, by tenant then generation.
pub fn all(db: &NamespaceDb, shard: ShardId) -> Result<Vec<TenantKeyRecord>, DbError> {
    collect(db, &keys::all_tenant_keys(shard))
}

/// The re-encryption progress of every tenant on `shard`.
pub fn reencryption(db: &NamespaceDb, shard: ShardId) -> Result<Vec<Reencryption>, DbError> {
    collect(db, &keys::all_reencryption(shard))
}

fn collect<T: serde::de::DeserializeOwned>(
    db: &NamespaceDb,
    prefix: &[u8],
) -> Result<Vec<T>, DbError> {
    let mut out = Vec::new();
    db.for_each_prefixed(prefix, |k, v| {
        out.push(decode(k, v)?);
        Ok(())
    })?;
    Ok(out)
}
