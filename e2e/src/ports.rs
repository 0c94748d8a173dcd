//! Free loopback ports.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use crate::HarnessError;

static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback TCP port that was free a moment ago (the kernel picks it: bind to
/// 127.0.0.1:0), never the same one twice in this process.
pub fn free_port() -> Result<u16, HarnessError> {
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| HarnessError::io("could not bind a loopback port", e))?
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        let seen: HashSet<u16> = handed_out.iter().copied().collect();
        if !seen.contains(&port) {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err(HarnessError::io(
        "could not find a loopback port not used before",
        std::io::ErrorKind::AddrInUse.into(),
    ))
}
