//! Plain HTTP to a member's REST API, and reading a raw HTTP response.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

/// One plain HTTP request to 127.0.0.1:`port` (HTTP/1.0, so the answer is never
/// chunked): the status and the body.
pub(super) fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut sock = TcpStream::connect_timeout(
        &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    write!(
        sock,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    sock.flush()?;
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// The status code and body of a raw HTTP/1.x response.
pub(super) fn parse_http_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:.200}")))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_response_gives_its_status_and_body() {
        let raw = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"role\": \"replica\"}";
        let (status, body) = parse_http_response(raw).expect("parses");
        assert_eq!(status, 503);
        assert_eq!(body, "{\"role\": \"replica\"}");
        assert!(parse_http_response(b"garbage").is_err());
    }
}
