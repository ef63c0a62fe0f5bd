//! One-time mount tokens: `cfs admin token create` mints one, `cfs mount
//! --token` trades it at a node for a client certificate.
//!
//! A token is self-contained and signed, like a bootstrap token that
//! needs no lookup: `cfs1.<payload>.<mac>` (base64url), the payload
//! naming the token (a random id), its expiry and the client certificate
//! it is good for (the mount's name and access policy, in the
//! subjectAltName form of [`crate::principal`]). The MAC is HMAC-SHA256
//! under a key derived from the CA's private key ([`TokenKey`]): only
//! someone holding the CA key mints one, and only a node holding it (the
//! one that signs the certificate anyway) checks one. Using a token once
//! is recorded in the replicated log by the node that accepts it, which
//! refuses an id already recorded (`cfs_meta`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;

use crate::principal::{ClientPolicy, Principal};

/// The token format's prefix (its version).
pub const PREFIX: &str = "cfs1";
/// The longest a token is valid for.
pub const TTL_MAX_SECS: u64 = 7 * 24 * 3600;
/// The longest token text accepted (bounds parsing a hostile one).
pub const TOKEN_BYTES_MAX: usize = 4096;

/// What a valid token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountToken {
    /// Random: what the log records as used.
    pub id: u128,
    /// Seconds since the Unix epoch after which it is refused.
    pub expires_unix: u64,
    /// The client certificate it is traded for.
    pub client: Principal,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a mount token")]
    Malformed,
    #[error("the token's signature does not match this cluster's CA")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("a token grants a client certificate, not {0}")]
    NotClient(String),
    #[error("a token is valid for at most {TTL_MAX_SECS} s")]
    TooLong,
    #[error("bad client name or policy: {0}")]
    Principal(String),
}

/// The HMAC key tokens are signed with, derived from the CA's private
/// key (PKCS#8 DER): never stored or sent.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn from_ca_key(ca_key_der: &[u8]) -> Self {
        let d = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"claudefs mount token v1\0".as_slice(), ca_key_der].concat(),
        );
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, d.as_ref()))
    }

    /// A token for `name` with `policy`, valid until `expires_unix`.
    pub fn mint(
        &self,
        name: &str,
        policy: ClientPolicy,
        now_unix: u64,
        ttl_secs: u64,
    ) -> Result<String, TokenError> {
        if ttl_secs > TTL_MAX_SECS {
            return Err(TokenError::TooLong);
        }
        let client = Principal::Client {
            name: name.to_string(),
            policy,
        };
        let names = client
            .names()
            .map_err(|e| TokenError::Principal(e.to_string()))?;
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| TokenError::Malformed)?;
        let payload = format!(
            "{:032x}\n{}\n{}",
            u128::from_be_bytes(id),
            now_unix + ttl_secs,
            names.join("\n")
        );
        let tag = hmac::sign(&self.0, payload.as_bytes());
        Ok(format!(
            "{PREFIX}.{}.{}",
            B64.encode(payload),
            B64.encode(tag.as_ref())
        ))
    }

    /// What `token` grants, if this key signed it and it has not expired
    /// at `now_unix`. (Whether it was used already is the log's to say.)
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<MountToken, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(p), Some(t), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let payload = B64.decode(p).map_err(|_| TokenError::Malformed)?;
        let tag = B64.decode(t).map_err(|_| TokenError::Malformed)?;
        // Constant time; nothing of the payload is believed before it.
        hmac::verify(&self.0, &payload, &tag).map_err(|_| TokenError::BadSignature)?;
        let text = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let mut lines = text.split('\n');
        let id = lines
            .next()
            .and_then(|l| u128::from_str_radix(l, 16).ok())
            .ok_or(TokenError::Malformed)?;
        let expires_unix = lines
            .next()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or(TokenError::Malformed)?;
        let client =
            Principal::from_names(lines).map_err(|e| TokenError::Principal(e.to_string()))?;
        if !matches!(client, Principal::Client { .. }) {
            return Err(TokenError::NotClient(client.to_string()));
        }
        if now_unix > expires_unix {
            return Err(TokenError::Expired);
        }
        Ok(MountToken {
            id,
            expires_unix,
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ClientPolicy {
        ClientPolicy {
            trust_root: false,
            uid_map: vec![(1000, 4242)],
            gid_map: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn a_token_grants_what_it_was_minted_for_until_it_expires() {
        let k = TokenKey::from_ca_key(b"ca key one");
        let t = k.mint("gpu", policy(), 1_000, 600).unwrap();
        let m = k.verify(&t, 1_500).unwrap();
        assert_eq!(m.expires_unix, 1_600);
        assert_eq!(
            m.client,
            Principal::Client {
                name: "gpu".into(),
                policy: policy()
            }
        );
        assert_eq!(k.verify(&t, 1_601), Err(TokenError::Expired));
        // Two tokens for the same grant are two tokens.
        let t2 = k.mint("gpu", policy(), 1_000, 600).unwrap();
        assert_ne!(k.verify(&t2, 1_500).unwrap().id, m.id);
    }

    #[test]
    fn forged_altered_and_foreign_tokens_are_refused() {
        let k = TokenKey::from_ca_key(b"ca key one");
        let other = TokenKey::from_ca_key(b"ca key two");
        let t = k.mint("gpu", policy(), 1_000, 600).unwrap();
        assert_eq!(other.verify(&t, 1_000), Err(TokenError::BadSignature));
        // The payload rewritten to trust root, the MAC kept.
        let mut parts: Vec<&str> = t.split('.').collect();
        let payload = String::from_utf8(B64.decode(parts[1]).unwrap()).unwrap();
        let forged = B64.encode(format!("{payload}\ntrust-root.policy.cfs.internal"));
        parts[1] = &forged;
        assert_eq!(
            k.verify(&parts.join("."), 1_000),
            Err(TokenError::BadSignature)
        );
        for junk in [
            "",
            "cfs1",
            "cfs1..",
            "cfs2.a.b",
            "cfs1.!!.??",
            &"x".repeat(5000),
        ] {
            assert!(k.verify(junk, 1_000).is_err(), "{junk:?}");
        }
        assert_eq!(
            k.mint("gpu", policy(), 0, TTL_MAX_SECS + 1),
            Err(TokenError::TooLong)
        );
        assert!(k.mint("bad name", policy(), 0, 60).is_err());
    }
}
