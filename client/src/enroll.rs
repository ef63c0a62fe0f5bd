//! Trading a one-time mount token for this mount's certificate
//! (`cfs mount --token`): a key pair made here (the private key never
//! leaves the machine), a certificate request sent with the token to a
//! node over TLS without a client certificate (the node checked against
//! the cluster CA), and the certificate the node's CA signs back.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cfs_proto::ops::MESSAGE_BYTES_MAX;
use cfs_proto::ops::{Reply, Request, RequestFrame, ServerMsg};
use tokio::io::AsyncWriteExt;

/// How long one node may take to answer.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate and its private key, PEM.
pub struct Enrolled {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Net(#[from] cfs_net::NetError),
    #[error("{addr}: {error}")]
    Io { addr: SocketAddr, error: String },
    #[error("{addr} refused the token: {errno} (expired, used already, or not of this cluster: the node's log says which)")]
    Refused {
        addr: SocketAddr,
        errno: cfs_proto::types::Errno,
    },
    #[error("{addr} answered something other than a certificate")]
    Protocol { addr: SocketAddr },
    #[error("no metadata server took the token: {0}")]
    NoServer(String),
}

/// Trades `token` at the first of `servers` that answers, checking them
/// against the CA certificate in `ca`; `name` is the mount's name in its
/// request (the token decides what the certificate says).
pub async fn enroll(
    servers: &[SocketAddr],
    ca: &Path,
    token: &str,
    name: &str,
) -> Result<Enrolled, EnrollError> {
    let security = cfs_net::Security::anonymous(ca)?;
    let (csr_der, key_pem) = cfs_net::ca::mount_request(name)?;
    let mut tried = Vec::new();
    for &addr in servers {
        match tokio::time::timeout(
            ENROLL_TIMEOUT,
            trade(&security, addr, token, csr_der.clone()),
        )
        .await
        {
            Ok(Ok(cert_pem)) => return Ok(Enrolled { cert_pem, key_pem }),
            // A refusal is final: the token is bad, or used (perhaps by
            // this very request, answered too late): another node would
            // refuse it too.
            Ok(Err(e @ EnrollError::Refused { .. })) => return Err(e),
            Ok(Err(e)) => tried.push(e.to_string()),
            Err(_) => tried.push(format!("{addr}: no answer within {ENROLL_TIMEOUT:?}")),
        }
    }
    Err(EnrollError::NoServer(tried.join("; ")))
}

async fn trade(
    security: &cfs_net::Security,
    addr: SocketAddr,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<String, EnrollError> {
    let io = |e: String| EnrollError::Io { addr, error: e };
    let mut conn = security.connect(addr, Duration::from_secs(5)).await?;
    let frame = RequestFrame {
        id: 1,
        fresh: false,
        req: Request::Enroll {
            token: token.to_string(),
            csr_der,
        },
    };
    let mut out = Vec::new();
    cfs_frame::encode_with(&mut out, |o| bincode::serialize_into(o, &frame))
        .map_err(|e| io(e.to_string()))?;
    conn.writer
        .write_all(&out)
        .await
        .map_err(|e| io(e.to_string()))?;
    conn.writer.flush().await.map_err(|e| io(e.to_string()))?;
    let mut reader = cfs_frame::BodyReader::new(conn.reader, MESSAGE_BYTES_MAX);
    let msg = reader
        .next_with(|b| cfs_frame::decode_body::<ServerMsg>(b, MESSAGE_BYTES_MAX))
        .await
        .map_err(|e| io(format!("{e:?}")))?
        .map_err(io)?;
    match msg {
        ServerMsg::Reply {
            result: Ok(Reply::Enrolled { cert_pem }),
            ..
        } => Ok(cert_pem),
        ServerMsg::Reply {
            result: Err(errno), ..
        } => Err(EnrollError::Refused { addr, errno }),
        _ => Err(EnrollError::Protocol { addr }),
    }
}
