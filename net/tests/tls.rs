//! Mutual TLS over loopback with real certificates from [`Ca`].

use std::time::Duration;

use cfs_net::ca::Ca;
use cfs_net::{ClientPolicy, NetError, Peer, Principal, Security, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn security(ca: &Ca, dir: &std::path::Path, who: Principal, stem: &str) -> Security {
    ca.issue_files(&who, 1, dir, stem).unwrap();
    Security::load(&TlsFiles::in_dir(dir, stem)).unwrap()
}

/// Accepts one connection with `server`; returns what the server saw
/// and whether the dialer could talk.
async fn handshake(
    server: Security,
    client: Security,
) -> (Result<Peer, String>, Result<Peer, String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        match server.accept(s).await {
            Ok(mut c) => {
                let mut b = [0u8; 4];
                c.reader
                    .read_exact(&mut b)
                    .await
                    .map_err(|e| e.to_string())?;
                c.writer.write_all(&b).await.map_err(|e| e.to_string())?;
                c.writer.flush().await.map_err(|e| e.to_string())?;
                Ok(c.peer)
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let cl = async {
        let mut c = client
            .connect(addr, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        c.writer
            .write_all(b"ping")
            .await
            .map_err(|e| e.to_string())?;
        c.writer.flush().await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        c.reader
            .read_exact(&mut b)
            .await
            .map_err(|e| e.to_string())?;
        if &b != b"ping" {
            return Err(format!("echo was {b:?}"));
        }
        Ok(c.peer)
    }
    .await;
    (srv.await.unwrap(), cl)
}

#[tokio::test]
async fn peers_learn_each_others_principal() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let node = security(&ca, d.path(), Principal::Node(2), "node-2");
    let policy = ClientPolicy {
        trust_root: false,
        uid_map: vec![(1000, 4000)],
        gid_map: vec![],
        ..Default::default()
    };
    let mount = security(
        &ca,
        d.path(),
        Principal::Client {
            name: "m1".into(),
            policy: policy.clone(),
        },
        "mount",
    );
    let (s, c) = handshake(node, mount).await;
    assert_eq!(
        s.unwrap(),
        Peer::Cert(Principal::Client {
            name: "m1".into(),
            policy
        })
    );
    assert_eq!(c.unwrap(), Peer::Cert(Principal::Node(2)));
}

#[tokio::test]
async fn another_clusters_certificate_is_refused_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (Ca::generate("a").unwrap(), Ca::generate("b").unwrap());
    let da = d.path().join("a");
    let db = d.path().join("b");
    let node_a = security(&a, &da, Principal::Node(1), "node-1");
    let admin_b = security(&b, &db, Principal::Admin("x".into()), "admin");
    let (s, c) = handshake(node_a.clone(), admin_b).await;
    assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
    // A node of cluster b dialing cluster a's node: refused too.
    let node_b = security(&b, &db, Principal::Node(1), "node-1");
    let (s, c) = handshake(node_a, node_b).await;
    assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
}

#[tokio::test]
async fn a_plaintext_dialer_gets_nothing_from_a_tls_listener() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let node = security(&ca, d.path(), Principal::Node(1), "node-1");
    let (s, c) = handshake(node, Security::plaintext()).await;
    assert!(s.is_err(), "{s:?}");
    assert!(c.is_err(), "{c:?}");
}

#[tokio::test]
async fn a_server_that_is_not_a_node_is_refused_by_dialers() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    // An administrator certificate posing as a server: its certificate
    // lacks the node name (and serverAuth), so the dialer refuses it.
    let admin = security(&ca, d.path(), Principal::Admin("x".into()), "admin");
    let mount = security(
        &ca,
        d.path(),
        Principal::Client {
            name: "m".into(),
            policy: ClientPolicy::default(),
        },
        "mount",
    );
    let (_, c) = handshake(admin, mount).await;
    assert!(c.is_err(), "{c:?}");
}

#[test]
fn a_saved_ca_loads_and_issues_certificates_its_peers_accept() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    ca.save(d.path()).unwrap();
    let again = Ca::load(d.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = security(&ca, d.path(), Principal::Node(1), "node-1");
    let admin = security(&again, d.path(), Principal::Admin("a".into()), "admin");
    let (s, c) = rt.block_on(handshake(node, admin));
    assert_eq!(s.unwrap(), Peer::Cert(Principal::Admin("a".into())));
    assert_eq!(c.unwrap(), Peer::Cert(Principal::Node(1)));
    let key = std::fs::metadata(d.path().join("ca.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert!(matches!(
        Security::load(&TlsFiles::in_dir(d.path(), "missing")),
        Err(NetError::File { .. })
    ));
}
