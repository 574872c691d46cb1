//! The server name of a TLS connection, read from its ClientHello without consuming it (Envoy's
//! `tls_inspector`), so that `tls` routes can match `sniHosts` and the bytes still reach the
//! endpoint untouched.
//!
//! Invariants: only `peek`s the socket (the relay later sends every byte); gives up — routing
//! then goes on without a name — when the bytes are not TLS, the hello does not fit in
//! [`MAX_HELLO`], or nothing complete arrives within the wait.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// The largest ClientHello looked at.
const MAX_HELLO: usize = 16 * 1024;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// A complete ClientHello, with its server name if it sent one.
    Complete(Option<String>),
    Incomplete,
    NotTls,
}

/// The SNI of the ClientHello waiting on `stream`, within `wait`.
pub async fn peek(stream: &TcpStream, wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        match parse(&buf[..n]) {
            Hello::Complete(name) => return name,
            Hello::NotTls => return None,
            Hello::Incomplete if n == 0 || n == buf.len() => return None,
            Hello::Incomplete => {}
        }
        // A peek returns at once while any byte waits: pause before looking again.
        if n == seen {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen = n;
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// Reads the bytes as the start of a TLS connection (rustls's `Acceptor`, which parses the
/// ClientHello and nothing more).
fn parse(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Hello::NotTls;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            Hello::Complete(accepted.client_hello().server_name().map(str::to_string))
        }
        Ok(None) => Hello::Incomplete,
        Err(_) => Hello::NotTls,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_gives_its_server_name_and_partial_or_plain_bytes_do_not() {
        let hello = client_hello("a.secure.test");
        assert_eq!(parse(&hello), Hello::Complete(Some("a.secure.test".into())));
        assert_eq!(parse(&hello[..hello.len() / 2]), Hello::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        // An IP address is not sent as SNI.
        assert_eq!(parse(&client_hello("198.18.0.1")), Hello::Complete(None));
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_for_the_relay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hello = client_hello("b.secure.test");
        let (first, rest) = hello.split_at(10);
        let (first, rest) = (first.to_vec(), rest.to_vec());
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The hello in two pieces, the second late.
            s.write_all(&first).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&rest).await.unwrap();
            s
        });
        let (mut server, _) = l.accept().await.unwrap();
        assert_eq!(
            peek(&server, Duration::from_secs(5)).await.as_deref(),
            Some("b.secure.test")
        );
        let mut all = vec![0u8; hello.len()];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut all)
            .await
            .unwrap();
        assert_eq!(all, hello, "every byte is still there");
        drop(client.await.unwrap());
        // Plain text is given up on at once.
        let c = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"hello\n").await.unwrap();
            s
        });
        let (server, _) = l.accept().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(peek(&server, Duration::from_secs(5)).await, None);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(c.await.unwrap());
    }
}
