//! Connections between ClaudeFS processes.
//!
//! Every listener (log, segments, metadata) accepts through
//! [`Security::accept`] (the admin gateway's HTTP through
//! [`Security::accept_https`]) and every client dials through
//! [`Security::connect`]: mutual TLS 1.3 (rustls) under the cluster CA,
//! the peer's [`Principal`] read from its certificate. A cluster without
//! TLS exists only behind an explicit development flag
//! ([`Security::plaintext`]); its peers are [`Peer::Plaintext`], trusted
//! as anything.
//!
//! Knows nothing of the protocols carried: callers decide what each
//! principal may do.

pub mod ca;
pub mod principal;
pub mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use principal::{ClientPolicy, Principal};

/// How long a TLS handshake may take before the connection is closed
/// (a slow-loris peer holds a slot no longer than this).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
/// One stream both ways (HTTP servers want it whole).
pub type BoxIo = Box<dyn Io>;

/// A byte stream both ways: a TCP socket or a TLS session over one.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("tls configuration: {0}")]
    Config(String),
    #[error("connect to {addr}: {error}")]
    Connect { addr: SocketAddr, error: String },
    #[error("tls handshake: {0}")]
    Handshake(String),
    #[error("tls handshake did not finish within {TLS_HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("peer certificate: {0}")]
    PeerIdentity(String),
}

/// Who is at the other end of an accepted or dialed connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A development cluster without TLS: nothing is proven.
    Plaintext,
    Cert(Principal),
    /// TLS without a client certificate, accepted only where a mount
    /// trades a token for one ([`Security::accept_enrolling`]): it may do
    /// nothing else.
    Anonymous,
}

impl Peer {
    /// Whether the peer may act as node `id` (a plaintext peer may
    /// claim anything).
    pub fn is_node(&self, id: u64) -> bool {
        match self {
            Peer::Plaintext => true,
            Peer::Cert(p) => *p == Principal::Node(id),
            Peer::Anonymous => false,
        }
    }

    /// Whether the peer may use administrative calls: nodes and
    /// administrators.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Peer::Plaintext | Peer::Cert(Principal::Node(_) | Principal::Admin(_))
        )
    }

    /// The identity policy for file-system requests: a mount's as its
    /// certificate grants, everyone else's trusted.
    pub fn client_policy(&self) -> ClientPolicy {
        match self {
            Peer::Cert(Principal::Client { policy, .. }) => policy.clone(),
            // Never serves file-system requests; squashed regardless.
            Peer::Anonymous => ClientPolicy::default(),
            _ => ClientPolicy::trusted(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Plaintext => f.write_str("plaintext peer"),
            Peer::Cert(p) => p.fmt(f),
            Peer::Anonymous => f.write_str("peer without a certificate"),
        }
    }
}

/// An established connection, split for one reader and one writer.
pub struct Conn {
    pub peer: Peer,
    pub reader: BoxRead,
    pub writer: BoxWrite,
}

/// Where a process's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.crt`, `dir/<stem>.crt`, `dir/<stem>.key`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// How this process connects: plaintext (development only) or mutual
/// TLS with its own certificate. Cheap to clone.
#[derive(Clone)]
pub struct Security(Arc<Mode>);

enum Mode {
    Plaintext,
    Anonymous(AnonymousClient),
    Tls {
        acceptor: TlsAcceptor,
        /// Also accepts a client without a certificate (`Peer::Anonymous`).
        enroll_acceptor: TlsAcceptor,
        /// HTTP over TLS (the admin gateway): a client certificate is
        /// optional, ALPN `http/1.1`.
        https_acceptor: TlsAcceptor,
        connector: TlsConnector,
        client: Arc<rustls::ClientConfig>,
        me: Principal,
    },
}

/// A client without a certificate of its own, checking servers against
/// the CA: a mount trading a token for its certificate.
struct AnonymousClient {
    connector: TlsConnector,
}

/// A connection made without an async runtime ([`Security::connect_blocking`]):
/// for tools and for tests that write raw frames.
pub enum BlockingConn {
    Plain(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl BlockingConn {
    /// The socket underneath (for timeouts).
    pub fn tcp(&self) -> &std::net::TcpStream {
        match self {
            BlockingConn::Plain(s) => s,
            BlockingConn::Tls(s) => s.get_ref(),
        }
    }
}

impl std::io::Read for BlockingConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingConn::Plain(s) => s.read(buf),
            BlockingConn::Tls(s) => s.read(buf),
        }
    }
}

impl std::io::Write for BlockingConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingConn::Plain(s) => s.write(buf),
            BlockingConn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BlockingConn::Plain(s) => s.flush(),
            BlockingConn::Tls(s) => s.flush(),
        }
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Mode::Plaintext => f.write_str("Security::Plaintext"),
            Mode::Anonymous(_) => f.write_str("Security::Anonymous"),
            Mode::Tls { me, .. } => write!(f, "Security::Tls({me})"),
        }
    }
}

fn read_file(p: &Path) -> Result<Vec<u8>, NetError> {
    std::fs::read(p).map_err(|e| NetError::File {
        path: p.to_path_buf(),
        error: e.to_string(),
    })
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let bytes = read_file(p)?;
    let v: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| NetError::File {
            path: p.to_path_buf(),
            error: format!("not PEM certificates: {e:?}"),
        })?;
    if v.is_empty() {
        return Err(NetError::File {
            path: p.to_path_buf(),
            error: "no certificate in it".into(),
        });
    }
    Ok(v)
}

/// The principal a leaf certificate names.
pub fn principal_of(der: &[u8]) -> Result<Principal, NetError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| NetError::PeerIdentity(format!("unparsable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| NetError::PeerIdentity(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| NetError::PeerIdentity("no subjectAltName".into()))?;
    let names = san.value.general_names.iter().filter_map(|g| match g {
        x509_parser::extensions::GeneralName::DNSName(n) => Some(*n),
        _ => None,
    });
    Principal::from_names(names).map_err(|e| NetError::PeerIdentity(e.to_string()))
}

fn peer_of(certs: Option<&[CertificateDer<'_>]>) -> Result<Peer, NetError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| NetError::PeerIdentity("no certificate presented".into()))?;
    Ok(Peer::Cert(principal_of(leaf)?))
}

impl Security {
    /// No TLS: for development clusters created with the explicit flag.
    pub fn plaintext() -> Self {
        Security(Arc::new(Mode::Plaintext))
    }

    /// TLS without a certificate of this process's own, servers checked
    /// against the CA certificate(s) in `ca`: only to dial a node and trade
    /// a mount token ([`Security::accept_enrolling`] on its side).
    pub fn anonymous(ca: &Path) -> Result<Self, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| NetError::Config(format!("CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Security(Arc::new(Mode::Anonymous(AnonymousClient {
            connector: TlsConnector::from(Arc::new(client)),
        }))))
    }

    /// Mutual TLS with the certificate, key and CA in `files`.
    pub fn load(files: &TlsFiles) -> Result<Self, NetError> {
        let ca = certs(&files.ca)?;
        let chain = certs(&files.cert)?;
        let me = principal_of(&chain[0])?;
        let key_bytes = read_file(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| NetError::File {
            path: files.key.clone(),
            error: format!("not a PEM private key: {e:?}"),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| NetError::Config(format!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = |e: rustls::Error| NetError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| NetError::Config(e.to_string()))?;
        let server_with = |v| {
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(cfg)?
                .with_client_cert_verifier(v)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(cfg)
        };
        let server = server_with(verifier)?;
        let enroll_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| NetError::Config(e.to_string()))?;
        let enroll_server = server_with(enroll_verifier)?;
        let mut https_server = enroll_server.clone();
        https_server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg)?;
        let client = Arc::new(client);
        Ok(Security(Arc::new(Mode::Tls {
            enroll_acceptor: TlsAcceptor::from(Arc::new(enroll_server)),
            https_acceptor: TlsAcceptor::from(Arc::new(https_server)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(client.clone()),
            client,
            me,
        })))
    }

    /// [`Security::connect`] without an async runtime; the handshake is
    /// complete (and the server checked to be a node) when this returns.
    pub fn connect_blocking(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<BlockingConn, NetError> {
        let err = |error: String| NetError::Connect { addr, error };
        let mut sock =
            std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| err(e.to_string()))?;
        let _ = sock.set_nodelay(true);
        let client = match &*self.0 {
            Mode::Plaintext => return Ok(BlockingConn::Plain(sock)),
            Mode::Anonymous(_) => {
                return Err(NetError::Config(
                    "an anonymous client only trades a mount token".into(),
                ))
            }
            Mode::Tls { client, .. } => client,
        };
        let name = ServerName::try_from(principal::ANY_NODE)
            .map_err(|e| NetError::Config(e.to_string()))?;
        let mut conn = rustls::ClientConnection::new(client.clone(), name)
            .map_err(|e| NetError::Handshake(e.to_string()))?;
        sock.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))
            .map_err(|e| err(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| NetError::Handshake(e.to_string()))?;
        }
        sock.set_read_timeout(None)
            .map_err(|e| err(e.to_string()))?;
        let peer = peer_of(conn.peer_certificates())?;
        if !matches!(peer, Peer::Cert(Principal::Node(_))) {
            return Err(NetError::PeerIdentity(format!(
                "{addr} is {peer}, not a node"
            )));
        }
        Ok(BlockingConn::Tls(Box::new(rustls::StreamOwned::new(
            conn, sock,
        ))))
    }

    pub fn is_tls(&self) -> bool {
        !matches!(&*self.0, Mode::Plaintext)
    }

    /// This process's own principal (`None` without TLS).
    pub fn me(&self) -> Option<&Principal> {
        match &*self.0 {
            Mode::Plaintext | Mode::Anonymous(_) => None,
            Mode::Tls { me, .. } => Some(me),
        }
    }

    /// Completes an accepted connection: the TLS handshake (bounded by
    /// [`TLS_HANDSHAKE_TIMEOUT`]) and the client's certificate.
    pub async fn accept(&self, sock: TcpStream) -> Result<Conn, NetError> {
        self.accept_as(sock, false).await
    }

    /// [`Security::accept`], also admitting a client without a
    /// certificate as [`Peer::Anonymous`] (the caller lets it do nothing
    /// but trade a mount token).
    pub async fn accept_enrolling(&self, sock: TcpStream) -> Result<Conn, NetError> {
        self.accept_as(sock, true).await
    }

    async fn accept_as(&self, sock: TcpStream, enrolling: bool) -> Result<Conn, NetError> {
        let _ = sock.set_nodelay(true);
        match &*self.0 {
            Mode::Anonymous(_) => Err(NetError::Config(
                "an anonymous client accepts no connections".into(),
            )),
            Mode::Plaintext => {
                let (r, w) = sock.into_split();
                Ok(Conn {
                    peer: Peer::Plaintext,
                    reader: Box::new(r),
                    writer: Box::new(w),
                })
            }
            Mode::Tls {
                acceptor,
                enroll_acceptor,
                ..
            } => {
                let acceptor = if enrolling { enroll_acceptor } else { acceptor };
                let s = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock))
                    .await
                    .map_err(|_| NetError::HandshakeTimeout)?
                    .map_err(|e| NetError::Handshake(e.to_string()))?;
                let certs = s.get_ref().1.peer_certificates();
                let peer = if enrolling && certs.is_none_or(|c| c.is_empty()) {
                    Peer::Anonymous
                } else {
                    peer_of(certs)?
                };
                let (r, w) = tokio::io::split(s);
                Ok(Conn {
                    peer,
                    reader: Box::new(r),
                    writer: Box::new(w),
                })
            }
        }
    }

    /// Completes an accepted HTTP connection (the admin gateway): with
    /// TLS, the handshake (bounded by [`TLS_HANDSHAKE_TIMEOUT`]) under this
    /// node's certificate, the client's certificate optional (a browser
    /// has none: [`Peer::Anonymous`], left to prove itself with a token);
    /// a certificate presented must be of this cluster's CA. Without TLS
    /// (the development flag) the stream as it is, [`Peer::Plaintext`].
    pub async fn accept_https(&self, sock: TcpStream) -> Result<(BoxIo, Peer), NetError> {
        let _ = sock.set_nodelay(true);
        match &*self.0 {
            Mode::Anonymous(_) => Err(NetError::Config(
                "an anonymous client accepts no connections".into(),
            )),
            Mode::Plaintext => Ok((Box::new(sock), Peer::Plaintext)),
            Mode::Tls { https_acceptor, .. } => {
                let s = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, https_acceptor.accept(sock))
                    .await
                    .map_err(|_| NetError::HandshakeTimeout)?
                    .map_err(|e| NetError::Handshake(e.to_string()))?;
                let certs = s.get_ref().1.peer_certificates();
                let peer = if certs.is_none_or(|c| c.is_empty()) {
                    Peer::Anonymous
                } else {
                    peer_of(certs)?
                };
                Ok((Box::new(s), peer))
            }
        }
    }

    /// Dials `addr` (within `timeout`) and, with TLS, checks that the
    /// server holds a node certificate of this cluster's CA.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, NetError> {
        let err = |error: String| NetError::Connect { addr, error };
        let sock = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| err(format!("timed out after {timeout:?}")))?
            .map_err(|e| err(e.to_string()))?;
        let _ = sock.set_nodelay(true);
        match &*self.0 {
            Mode::Plaintext => {
                let (r, w) = sock.into_split();
                Ok(Conn {
                    peer: Peer::Plaintext,
                    reader: Box::new(r),
                    writer: Box::new(w),
                })
            }
            Mode::Tls { connector, .. } | Mode::Anonymous(AnonymousClient { connector }) => {
                let name = ServerName::try_from(principal::ANY_NODE)
                    .map_err(|e| NetError::Config(e.to_string()))?;
                let s = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(name, sock))
                    .await
                    .map_err(|_| NetError::HandshakeTimeout)?
                    .map_err(|e| NetError::Handshake(e.to_string()))?;
                let peer = peer_of(s.get_ref().1.peer_certificates())?;
                if !matches!(peer, Peer::Cert(Principal::Node(_))) {
                    return Err(NetError::PeerIdentity(format!(
                        "{addr} is {peer}, not a node"
                    )));
                }
                let (r, w) = tokio::io::split(s);
                Ok(Conn {
                    peer,
                    reader: Box::new(r),
                    writer: Box::new(w),
                })
            }
        }
    }
}
