//! Every proxied connection ends once both of its sides are gone, whatever order their
//! data, FINs and resets come in, spliced or copied: its descriptors close, it leaves
//! the maps and the counts, and it gets exactly one access-log line (issue 16).
//!
//! The access log of the in-process proxies is captured as JSON lines; each client
//! connects from its own loopback address, so that its line can be told from every other
//! connection's even when the kernel reuses a port.

mod support;

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use support::*;

const FIRST: &[u8] = b"HELLO";
/// How long a connection may take to end once both sides are gone or have closed their
/// side: well under the engine's 10 s drain-stall limit, which must never be what ends
/// one of these connections.
const BOUND: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(10);

/// The tests measure the process's descriptors: one at a time.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// The access log, captured.

/// Every line the proxies of this process logged, as JSON objects.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn capture_log() {
    // Every test calls it; the first installs the subscriber.
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter("splice_proxy=info")
        .with_writer(|| Capture)
        .try_init();
}

/// The access-log lines (those with an `end`) of connections from `ip`.
fn access_lines(ip: IpAddr) -> Vec<serde_json::Value> {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let prefix = format!("{ip}:");
    String::from_utf8_lossy(&log)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["end"].is_string()
                && line["client"]
                    .as_str()
                    .is_some_and(|client| client.starts_with(&prefix))
        })
        .collect()
}

/// Waits (bounded) for the access line of the connection from `ip`.
fn wait_access_line(ip: IpAddr, within: Duration) -> Option<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = access_lines(ip).pop() {
            return Some(line);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The loopback address client `index` of test `test` connects from: 127.T.H.L.
fn client_ip(test: u8, index: usize) -> IpAddr {
    let index = u16::try_from(index).expect("fewer than 65536 clients per test");
    let [high, low] = index.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, test, high, low))
}

fn connect_from(ip: IpAddr, to: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(ip, 0).into())
        .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    socket
        .connect(&to.into())
        .unwrap_or_else(|e| panic!("connect {to} from {ip}: {e}"));
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

fn accept_within(listener: &TcpListener, within: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return stream;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the proxy connected to no backend"
                );
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Asserts that the proxy is back where it started: no connection live or held, the maps
/// empty, the descriptors closed.
fn assert_all_ended(proxy: &Proxy, fds_before: &[(i32, String)]) {
    proxy.wait_idle(WAIT);
    proxy.wait_held(0, WAIT);
    wait_fds_back(fds_before, WAIT);
}

// ---------------------------------------------------------------------------------------
// 1. The leak of issue 16: a backend answers and closes; the client, not yet knowing,
// writes two more requests, then reads EOF and closes.

fn keep_alive_close_race(mode: Moving, test: u8) {
    let _lock = alone();
    capture_log();
    const CLIENTS: usize = 5;
    let (go, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    // Answers once told the pair is handed off (before, the engine would copy a pair
    // whose upstream already closed), then closes: a FIN, and a reset for anything
    // that arrives after.
    let backend = Backend::start(move |mut stream| {
        if read_exactly(&mut stream, FIRST.len()).is_ok()
            && gate.lock().unwrap().recv_timeout(WAIT).is_ok()
        {
            let _ = stream.write_all(b"REPLY");
        }
    });
    let routes = format!(
        "max_connections = 3\n{}",
        prefix_routes("HELLO", &[backend.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    let fds_before = settled_fds(Duration::from_millis(100), WAIT);
    for index in 0..CLIENTS {
        let ip = client_ip(test, index);
        let mut client = connect_from(ip, proxy.addr);
        client.write_all(FIRST).unwrap();
        proxy.wait_handed_off(1, WAIT);
        go.send(()).unwrap();
        assert_eq!(read_exactly(&mut client, 5).unwrap(), b"REPLY");
        // The backend's FIN reaches the proxy; then the first request draws the
        // backend's reset, and the second meets an upstream that is gone.
        thread::sleep(Duration::from_millis(20));
        for _ in 0..2 {
            // Either may fail once the proxy has passed the reset on.
            let _ = client.write_all(b"NEXT REQUEST");
            thread::sleep(Duration::from_millis(20));
        }
        let _ = read_to_end_hashed(&mut client);
        drop(client);
        let line = wait_access_line(ip, BOUND)
            .unwrap_or_else(|| panic!("client {index}: no access line within {BOUND:?}"));
        assert!(
            ["closed", "reset"].contains(&line["end"].as_str().unwrap_or_default()),
            "{line}"
        );
        proxy.wait_idle(BOUND);
    }
    // max_connections = 3 would refuse this one had the five stayed.
    let ip = client_ip(test, CLIENTS);
    let mut client = connect_from(ip, proxy.addr);
    client.write_all(FIRST).unwrap();
    proxy.wait_handed_off(1, WAIT);
    go.send(()).unwrap();
    assert_eq!(
        read_to_end_hashed(&mut client).unwrap(),
        (5, sha256(b"REPLY"))
    );
    drop(client);
    assert_all_ended(&proxy, &fds_before);
    for index in 0..=CLIENTS {
        let lines = access_lines(client_ip(test, index));
        assert_eq!(lines.len(), 1, "client {index}: {lines:?}");
    }
}

#[test]
fn keep_alive_close_race_splice() {
    keep_alive_close_race(SPLICE, 1);
}

#[test]
fn keep_alive_close_race_splice_parser() {
    keep_alive_close_race(SPLICE_PARSER, 2);
}

#[test]
fn keep_alive_close_race_copy() {
    keep_alive_close_race(COPY, 3);
}
