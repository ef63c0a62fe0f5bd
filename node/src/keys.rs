//! `cfs admin keys`: tenants' data keys (docs/decisions.md D51), asked of
//! a local cluster's metadata service with the administrator's
//! certificate: make a tenant's first key, rotate it (new stripes use the
//! new key; the collector re-encrypts the old ones in the background),
//! list keys and re-encryption progress. No key bytes ever leave the
//! nodes through these.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use cfs_client::conn::MetaClient;
use cfs_proto::rpc::{ListTenantKeys, MakeTenantKey};
use cfs_proto::tenant::{valid_tenant, KeyReport};

/// How long one key request may take (it waits for a log commit).
const KEYS_TIMEOUT: Duration = Duration::from_secs(20);

async fn client(dir: &Path) -> anyhow::Result<std::sync::Arc<MetaClient>> {
    let cfgs = crate::cluster::load_configs(dir)?;
    let Some(c) = cfgs.first() else {
        bail!("no cluster in {}", dir.display());
    };
    let servers = crate::cluster::meta_servers(&cfgs);
    let security = crate::cluster::admin_security(dir)?;
    Ok(MetaClient::new(servers, c.cluster_id.clone(), security, KEYS_TIMEOUT).0)
}

fn explain(tenant: &str, e: cfs_proto::types::Errno) -> anyhow::Error {
    let why = match e.0 {
        libc::EEXIST => "it has a key already (rotate it instead)".to_string(),
        libc::ENOKEY => "it has no key yet (create one first)".to_string(),
        libc::EKEYREJECTED => {
            "the node has no master key, or not this cluster's (master_key_file, CFS_MASTER_KEY)"
                .to_string()
        }
        libc::EACCES => "only an administrator's certificate may manage keys".to_string(),
        _ => e.to_string(),
    };
    anyhow::anyhow!("tenant {tenant}: {why}")
}

/// Makes `tenant`'s first key, or (`rotate`) its next generation.
pub async fn make(dir: &Path, tenant: &str, rotate: bool) -> anyhow::Result<KeyReport> {
    if !valid_tenant(tenant) {
        bail!("{tenant:?} is not a tenant name: letters, digits and '-', 1 to 63 characters");
    }
    let c = client(dir).await?;
    c.rpc(
        MakeTenantKey {
            tenant: tenant.to_string(),
            rotate,
        },
        false,
    )
    .await
    .map_err(|e| explain(tenant, e))
}

/// Every tenant's keys and re-encryption progress.
pub async fn report(dir: &Path) -> anyhow::Result<KeyReport> {
    let c = client(dir).await?;
    c.rpc(ListTenantKeys, true)
        .await
        .map_err(|e| anyhow::anyhow!("listing keys: {e}"))
        .context("cfs admin keys list")
}

/// The report as a table: one line per key generation, then progress.
pub fn render(r: &KeyReport) -> String {
    let mut out = String::from("TENANT  GENERATION  KEY\n");
    for k in &r.keys {
        out.push_str(&format!("{}  {}  {}\n", k.tenant, k.generation, k.id.0));
    }
    if !r.reencryption.is_empty() {
        out.push_str("\nRE-ENCRYPTION  TO KEY  MOVED  LEFT\n");
        for p in &r.reencryption {
            out.push_str(&format!(
                "{}  {}  {} B  {} B{}\n",
                p.tenant,
                p.to.0,
                p.moved_bytes,
                p.left_bytes,
                if p.left_bytes == 0 { "  (done)" } else { "" }
            ));
        }
    }
    out
}
