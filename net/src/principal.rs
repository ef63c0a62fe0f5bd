//! Who is at the other end of a connection, as its certificate says.
//!
//! The cluster CA signs every certificate; the names in its
//! subjectAltName say what it is for (one role, and for mounts the
//! access policy the administrator granted when issuing it):
//!
//! | name | meaning |
//! |---|---|
//! | `node-<id>.cfs.internal` | the node with that id |
//! | `node.cfs.internal` | any node: the name clients check when they dial a server |
//! | `admin-<name>.cfs.internal` | an administrator (tools, the Jepsen suite) |
//! | `client-<name>.cfs.internal` | a mount |
//! | `trust-root.policy.cfs.internal` | the mount's uid 0 stays root (else squashed) |
//! | `uid-<from>-<to>.map.cfs.internal` | the mount's uid `from` is the cluster's `to` |
//! | `gid-<from>-<to>.map.cfs.internal` | the same for a gid |
//! | `tenant-<name>.key.cfs.internal` | the mount may have tenant `name`'s data keys (D51) |
//! | `any-tenant.key.cfs.internal` | the mount may have every tenant's data keys |
//!
//! The policy lives in the signed certificate, like an SSH certificate's
//! options: changing it means issuing a new certificate.

use std::fmt;

/// The suffix of every name this crate puts in a certificate.
pub const DOMAIN: &str = "cfs.internal";
/// The name every node certificate carries, checked by dialing clients.
pub const ANY_NODE: &str = "node.cfs.internal";
/// The uid and gid a squashed root becomes.
pub const NOBODY: u32 = 65534;
/// Names one certificate may carry (bounds parsing a hostile one).
pub const NAMES_MAX: usize = 256;

/// What a mount may do with identities, granted in its certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientPolicy {
    /// uid 0 stays root; otherwise it becomes [`NOBODY`].
    pub trust_root: bool,
    /// The mount's uid → the cluster's uid.
    pub uid_map: Vec<(u32, u32)>,
    pub gid_map: Vec<(u32, u32)>,
    /// Tenants whose data keys the mount may have (docs/decisions.md
    /// D51): it reads and writes their encrypted files, no others.
    pub tenants: Vec<String>,
    /// Every tenant's keys (the mount of a local cluster, trusted peers).
    pub any_tenant: bool,
}

impl ClientPolicy {
    /// The policy of a principal that needs none (nodes, administrators,
    /// a development cluster without TLS).
    pub fn trusted() -> Self {
        ClientPolicy {
            trust_root: true,
            any_tenant: true,
            ..Default::default()
        }
    }

    /// Whether the mount may have `tenant`'s data keys.
    pub fn may_use_tenant(&self, tenant: &str) -> bool {
        self.any_tenant || self.tenants.iter().any(|t| t == tenant)
    }

    /// The cluster's uid for the mount's `uid`: mapped first, then root
    /// squashed unless trusted.
    pub fn uid(&self, uid: u32) -> u32 {
        let u = map(&self.uid_map, uid);
        if u == 0 && !self.trust_root {
            NOBODY
        } else {
            u
        }
    }

    pub fn gid(&self, gid: u32) -> u32 {
        let g = map(&self.gid_map, gid);
        if g == 0 && !self.trust_root {
            NOBODY
        } else {
            g
        }
    }

    fn names(&self) -> Vec<String> {
        let mut n = Vec::new();
        if self.trust_root {
            n.push(format!("trust-root.policy.{DOMAIN}"));
        }
        for (a, b) in &self.uid_map {
            n.push(format!("uid-{a}-{b}.map.{DOMAIN}"));
        }
        for (a, b) in &self.gid_map {
            n.push(format!("gid-{a}-{b}.map.{DOMAIN}"));
        }
        if self.any_tenant {
            n.push(format!("any-tenant.key.{DOMAIN}"));
        }
        for t in &self.tenants {
            n.push(format!("tenant-{t}.key.{DOMAIN}"));
        }
        n
    }
}

fn map(m: &[(u32, u32)], id: u32) -> u32 {
    m.iter().find(|(a, _)| *a == id).map_or(id, |(_, b)| *b)
}

/// The identity a certificate proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Node(u64),
    Admin(String),
    Client { name: String, policy: ClientPolicy },
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Node(id) => write!(f, "node {id}"),
            Principal::Admin(n) => write!(f, "admin {n}"),
            Principal::Client { name, .. } => write!(f, "client {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrincipalError {
    #[error("the certificate names no ClaudeFS role")]
    NoRole,
    #[error("the certificate names more than one role")]
    Ambiguous,
    #[error("the certificate carries more than {NAMES_MAX} names")]
    TooManyNames,
    #[error("a name in the certificate is malformed: {0:?}")]
    Malformed(String),
    #[error("bad name {0:?}: only letters, digits and '-' (1 to 63 characters)")]
    BadLabel(String),
}

/// A label for a name part: what DNS allows, so every certificate
/// library accepts it.
pub fn check_label(s: &str) -> Result<(), PrincipalError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(PrincipalError::BadLabel(s.to_string()))
    }
}

impl Principal {
    /// The subjectAltNames that make a certificate this principal.
    pub fn names(&self) -> Result<Vec<String>, PrincipalError> {
        Ok(match self {
            Principal::Node(id) => vec![format!("node-{id}.{DOMAIN}"), ANY_NODE.to_string()],
            Principal::Admin(n) => {
                check_label(n)?;
                vec![format!("admin-{n}.{DOMAIN}")]
            }
            Principal::Client { name, policy } => {
                check_label(name)?;
                for t in &policy.tenants {
                    check_label(t)?;
                }
                let mut v = vec![format!("client-{name}.{DOMAIN}")];
                v.extend(policy.names());
                v
            }
        })
    }

    /// The principal named by a certificate's subjectAltNames. Names
    /// outside [`DOMAIN`] are ignored.
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Principal, PrincipalError> {
        let mut role: Option<Principal> = None;
        let mut policy = ClientPolicy::default();
        let set = |p: Principal, role: &mut Option<Principal>| {
            if role.as_ref().is_some_and(|r| *r != p) {
                return Err(PrincipalError::Ambiguous);
            }
            *role = Some(p);
            Ok(())
        };
        for (i, name) in names.into_iter().enumerate() {
            if i >= NAMES_MAX {
                return Err(PrincipalError::TooManyNames);
            }
            let Some(head) = name.strip_suffix(DOMAIN).and_then(|h| h.strip_suffix('.')) else {
                continue;
            };
            let bad = || PrincipalError::Malformed(name.to_string());
            if head == "node" {
                continue;
            } else if let Some(id) = head.strip_prefix("node-") {
                set(Principal::Node(id.parse().map_err(|_| bad())?), &mut role)?;
            } else if let Some(n) = head.strip_prefix("admin-") {
                check_label(n)?;
                set(Principal::Admin(n.to_string()), &mut role)?;
            } else if let Some(n) = head.strip_prefix("client-") {
                check_label(n)?;
                set(
                    Principal::Client {
                        name: n.to_string(),
                        policy: ClientPolicy::default(),
                    },
                    &mut role,
                )?;
            } else if head == "trust-root.policy" {
                policy.trust_root = true;
            } else if head == "any-tenant.key" {
                policy.any_tenant = true;
            } else if let Some(t) = head
                .strip_prefix("tenant-")
                .and_then(|h| h.strip_suffix(".key"))
            {
                check_label(t)?;
                policy.tenants.push(t.to_string());
            } else if let Some(m) = head.strip_suffix(".map") {
                let (kind, pair) = m.split_once('-').ok_or_else(bad)?;
                let (a, b) = pair.split_once('-').ok_or_else(bad)?;
                let pair = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                match kind {
                    "uid" => policy.uid_map.push(pair),
                    "gid" => policy.gid_map.push(pair),
                    _ => return Err(bad()),
                }
            } else {
                return Err(bad());
            }
        }
        match role {
            Some(Principal::Client { name, .. }) => Ok(Principal::Client { name, policy }),
            Some(p) => Ok(p),
            None => Err(PrincipalError::NoRole),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [
            Principal::Node(7),
            Principal::Admin("ops".into()),
            Principal::Client {
                name: "gpu-3".into(),
                policy: ClientPolicy {
                    trust_root: true,
                    uid_map: vec![(1000, 2000)],
                    gid_map: vec![(100, 200), (0, 300)],
                    tenants: vec!["genomics".into(), "lab-2".into()],
                    any_tenant: false,
                },
            },
        ] {
            let names = p.names().unwrap();
            assert_eq!(
                Principal::from_names(names.iter().map(String::as_str)),
                Ok(p)
            );
        }
    }

    #[test]
    fn two_roles_or_none_are_refused() {
        assert_eq!(
            Principal::from_names(["node-1.cfs.internal", "admin-x.cfs.internal"]),
            Err(PrincipalError::Ambiguous)
        );
        assert_eq!(
            Principal::from_names(["node.cfs.internal", "example.org"]),
            Err(PrincipalError::NoRole)
        );
        assert!(Principal::from_names(["node-x.cfs.internal"]).is_err());
        assert!(
            Principal::from_names(["uid-1.map.cfs.internal", "client-a.cfs.internal"]).is_err()
        );
        assert!(Principal::Admin("a.b".into()).names().is_err());
    }

    #[test]
    fn root_is_squashed_unless_trusted_and_maps_apply_first() {
        let p = ClientPolicy {
            trust_root: false,
            uid_map: vec![(1000, 0), (5, 6)],
            gid_map: vec![],
            ..Default::default()
        };
        assert_eq!(p.uid(0), NOBODY);
        assert_eq!(p.uid(1000), NOBODY);
        assert_eq!(p.uid(5), 6);
        assert_eq!(p.uid(7), 7);
        assert_eq!(p.gid(0), NOBODY);
        assert_eq!(ClientPolicy::trusted().uid(0), 0);
    }

    #[test]
    fn tenants_are_granted_by_name() {
        let p = ClientPolicy {
            tenants: vec!["a".into()],
            ..Default::default()
        };
        assert!(p.may_use_tenant("a"));
        assert!(!p.may_use_tenant("b"));
        assert!(ClientPolicy::trusted().may_use_tenant("b"));
        assert!(
            Principal::from_names(["client-x.cfs.internal", "tenant-a.b.key.cfs.internal"])
                .is_err()
        );
    }
}
