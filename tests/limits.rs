//! Limits, through the proxy with the real probe (and in copy mode): `max_connections`
//! for the proxy and per route refuses clients beyond it at once, with a reset, counts
//! them, and counts connections until they close, whether they are reading their first
//! message or spliced; a reload changes the limits for new connections.

mod support;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use splice_proxy::admission::RouteCounts;
use support::*;

/// Bound for waits on the proxy (hand-off, teardown, counts).
const WAIT: Duration = Duration::from_secs(10);
/// How soon a refused or closed client must learn it.
const PROMPT: Duration = Duration::from_secs(5);
const KIB: usize = 1 << 10;

/// A connection routed to the echo backend by its first message "a", and handed off:
/// its echo came back.
fn held(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(first).unwrap();
    assert_eq!(read_exactly(&mut stream, first.len()).unwrap(), first);
    stream
}

/// Echoes 64 KiB through `stream`, checks the hash, closes.
fn echo_checked(mut stream: TcpStream, seed: u64) {
    let data = Arc::new(payload(64 * KIB, seed));
    let echoed = write_while_reading(&mut stream, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (data.len() as u64, sha256(&data)));
}

/// Connects, sends `first` and expects the proxy to end the connection at once with a
/// reset (or, if the reset raced the write, EOF): not to leave it hanging. Returns the
/// client's address, which the refusal's log line names.
fn assert_refused(addr: SocketAddr, first: &[u8]) -> SocketAddr {
    let mut stream = connect(addr);
    let client = stream.local_addr().unwrap();
    stream.set_read_timeout(Some(PROMPT)).unwrap();
    let started = Instant::now();
    // The reset may arrive before the write: then the write fails, which is fine.
    let _ = stream.write_all(first);
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("a refused client read {other:?} instead of a reset"),
    }
    assert!(started.elapsed() < PROMPT);
    client
}

/// Waits until the proxy holds `count` connections.
fn wait_held(proxy: &Proxy, count: usize) {
    let deadline = Instant::now() + WAIT;
    while proxy.admission.held() != count {
        assert!(
            Instant::now() < deadline,
            "the proxy holds {} connections, not {count}, after {WAIT:?}",
            proxy.admission.held()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn route_counts(proxy: &Proxy, route: &str) -> (usize, u64) {
    proxy
        .admission
        .routes()
        .into_iter()
        .find(|counts| &*counts.route == route)
        .map_or((0, 0), |RouteCounts { held, refused, .. }| (held, refused))
}

/// The proxy's limit counts a connection from accept to close: two handed off and one
/// still silent fill `max_connections = 3`; a fourth client is reset and counted; once
/// the engine closes one pair, a new client is served.
fn proxy_limit(mode: Moving) {
    let echo = Backend::echo();
    let routes = format!(
        "max_connections = 3\nfirst_message_timeout = \"30s\"\n{}",
        prefix_routes("a", &[echo.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    let first = held(proxy.addr, b"a1");
    let second = held(proxy.addr, b"a2");
    let silent = proxy.connect();
    wait_held(&proxy, 3);
    proxy.wait_handed_off(2, WAIT);

    assert_refused(proxy.addr, b"a3");
    assert_eq!(proxy.admission.refused(), 1);
    assert_eq!(proxy.admission.held(), 3);

    drop(first);
    proxy.wait_handed_off(1, WAIT);
    wait_held(&proxy, 2);
    echo_checked(held(proxy.addr, b"a4"), 1);
    echo_checked(second, 2);
    drop(silent);
    wait_held(&proxy, 0);
    proxy.wait_idle(WAIT);
    assert_eq!(proxy.admission.refused(), 1);
    assert_eq!(route_counts(&proxy, "prefix"), (0, 0));
}

#[test]
fn proxy_limit_splice() {
    proxy_limit(SPLICE);
}

#[test]
fn proxy_limit_copy() {
    proxy_limit(COPY);
}

/// A route's limit refuses only clients routed to it, after their first message; other
/// routes go on serving.
fn route_limit(mode: Moving) {
    let echo = Backend::echo();
    let routes = format!(
        "[[route]]\nname = \"limited\"\nprefix = \"a\"\nmax_connections = 1\n{echo}\n\n\
         [[route]]\nname = \"open\"\nprefix = \"b\"\n{echo}\n",
        echo = backends_toml(&[echo.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    let limited = held(proxy.addr, b"a1");
    assert_refused(proxy.addr, b"a2");
    let open = [held(proxy.addr, b"b1"), held(proxy.addr, b"b2")];
    assert_eq!(route_counts(&proxy, "limited"), (1, 1));
    assert_eq!(route_counts(&proxy, "open"), (2, 0));
    assert_eq!(
        proxy.admission.refused(),
        0,
        "the proxy's own limit refused none"
    );

    drop(limited);
    let deadline = Instant::now() + WAIT;
    while route_counts(&proxy, "limited").0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the route's count did not go down"
        );
        thread::sleep(Duration::from_millis(5));
    }
    echo_checked(held(proxy.addr, b"a3"), 3);
    for (seed, stream) in (4..).zip(open) {
        echo_checked(stream, seed);
    }
    proxy.wait_idle(WAIT);
    assert_eq!(route_counts(&proxy, "limited"), (0, 1));
    assert_eq!(route_counts(&proxy, "open"), (0, 0));
}

#[test]
fn route_limit_splice() {
    route_limit(SPLICE);
}

#[test]
fn route_limit_copy() {
    route_limit(COPY);
}

/// The binary logs each refusal with the client and the limit, and a SIGHUP changes the
/// limit for new connections while the one it holds goes on.
#[test]
fn refusals_are_logged_and_a_reload_changes_the_limit() {
    let echo = Backend::echo();
    let routes_with = |max: usize| {
        format!(
            "max_connections = {max}\n{}",
            prefix_routes("a", &[echo.addr])
        )
    };
    let routes = routes_file("limits-reload", &routes_with(1));
    let proxy = ProxyProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
        "--mode",
        "splice",
        "--executors",
        "2",
        "--splice-workers",
        "2",
    ]);
    let addr = proxy.addr();
    let first = held(addr, b"a1");
    let refused = assert_refused(addr, b"a2");
    let line = proxy.wait_for_log(&format!("client={refused}"), WAIT);
    assert!(
        line.contains("connection refused: the proxy already holds max_connections (1)"),
        "{line}"
    );

    std::fs::write(&routes, routes_with(2)).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("reloaded 1 routes", WAIT);
    let second = held(addr, b"a3");
    let refused = assert_refused(addr, b"a4");
    let line = proxy.wait_for_log(&format!("client={refused}"), WAIT);
    assert!(line.contains("max_connections (2)"), "{line}");
    echo_checked(first, 5);
    echo_checked(second, 6);
}
