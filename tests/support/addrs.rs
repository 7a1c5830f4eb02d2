//! Addresses on 127.0.0.1: free ones for a daemon to bind, one where nothing listens,
//! and a bounded wait for something to listen.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// An address on 127.0.0.1 that was free a moment ago, for a daemon to bind (nginx,
/// HAProxy, redis-server, openssl s_server). Its port lies below the kernel's ephemeral
/// range: one from there (what binding port 0 gives) could be taken, before the daemon
/// binds it, as the local port of a connection that a test running alongside opens, and
/// the daemon would fail to start. Each call of the process takes the next port.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_start: usize = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    const SPAN: usize = 8192;
    assert!(
        ephemeral_start > SPAN + 1024,
        "no room below the ephemeral ports"
    );
    let first = ephemeral_start - SPAN;
    // Offset by pid, so that two suites run at once mostly take different ports.
    let offset = std::process::id() as usize;
    for _ in 0..SPAN {
        let port = first + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in {first}..{ephemeral_start}");
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// Waits (bounded) until something accepts on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then closed).
pub fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}
