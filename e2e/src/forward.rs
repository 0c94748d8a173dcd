//! A TCP forwarder whose connections to the server come from a chosen loopback
//! address. Linux gives every connection to a 127.x.y.z address the source
//! 127.0.0.1, so a server's pg_hba.conf would always see the local client; through
//! [`forward_from`] it sees 127.0.0.2, a client its `127.0.0.1/32` rule does not
//! cover. Bytes pass through untouched (TLS stays end to end).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpSocket};

/// Listens on 127.0.0.1 (a free port, returned) and forwards every connection to
/// `to`, connecting from `from`. Runs on the current tokio runtime, until it ends.
pub async fn forward_from(from: IpAddr, to: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let socket = match to {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(from, 0))?;
                let mut outbound = socket.connect(to).await?;
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Ok(address)
}
