//! Limits and timeouts, through the proxy with the real probe (and in copy mode).
//! `max_connections` for the proxy and per route refuses clients beyond it at once, with
//! a reset, counts them, and counts connections until they close, whether they are
//! reading their first message or spliced; a reload changes the limits for new
//! connections. `first_message_timeout` closes silent and trickling (slowloris) clients
//! unless a default route takes them; `connect_timeout` gives up on a backend that
//! answers no SYN; `idle_timeout` resets a pair that moves nothing and keeps one that
//! trickles. A proxy out of descriptors closes the client without blaming the backend,
//! and one that cannot accept waits for a free descriptor without spinning.

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

fn route_counts(proxy: &Proxy, route: &str) -> (usize, u64) {
    proxy
        .admission()
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
    proxy.wait_held(3, WAIT);
    proxy.wait_handed_off(2, WAIT);

    assert_refused(proxy.addr, b"a3");
    assert_eq!(proxy.admission().refused(), 1);
    assert_eq!(proxy.admission().held(), 3);

    drop(first);
    proxy.wait_handed_off(1, WAIT);
    proxy.wait_held(2, WAIT);
    echo_checked(held(proxy.addr, b"a4"), 1);
    echo_checked(second, 2);
    drop(silent);
    proxy.wait_held(0, WAIT);
    proxy.wait_idle(WAIT);
    assert_eq!(proxy.admission().refused(), 1);
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
        proxy.admission().refused(),
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

/// The binary logs each refusal with the client and the limit, counts it in its metrics,
/// and a SIGHUP changes the limit for new connections while the one it holds goes on.
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
    let proxy = ProxyProcess::serve(&routes, "splice", &["--metrics", "127.0.0.1:0"]);
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

    let metrics = proxy.metrics_addr();
    let scrape = output_within(
        external("curl", "curl").args(["-sS", &format!("http://{metrics}/metrics")]),
        WAIT,
    );
    let text = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        text.lines()
            .any(|line| line
                == "splice_proxy_connections_refused_total{reason=\"max_connections\"} 2"),
        "two refusals by max_connections in the metrics:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Timeouts: first message, connect, idle.

/// The start of an HTTP request head that a client then trickles a header value into,
/// a byte at a time: an HTTP route can never decide on it.
const ENDLESS_HEAD: &[u8] = b"GET / HTTP/1.1\r\nX-Slow: ";

/// Routes HTTP requests for "a.example" to `backend`, with a short first-message
/// timeout; `default` adds a default route to it as well.
fn http_routes(backend: SocketAddr, default: bool) -> String {
    let mut routes = format!(
        "first_message_timeout = \"500ms\"\n\n\
         [[route]]\nname = \"web\"\nhttp_host = \"a.example\"\n{}\n",
        backends_toml(&[backend])
    );
    if default {
        routes += &format!(
            "\n[[route]]\nname = \"fallback\"\ndefault = true\n{}\n",
            backends_toml(&[backend])
        );
    }
    routes
}

/// Writes `head`, then one byte every 50ms until a write fails or `limit` passes, from
/// its own thread; returns the bytes it wrote when it stops.
fn trickle(
    stream: &TcpStream,
    head: &'static [u8],
    limit: Duration,
) -> thread::JoinHandle<Vec<u8>> {
    let mut writer = stream.try_clone().unwrap();
    writer.set_nodelay(true).unwrap();
    thread::spawn(move || {
        let mut written = Vec::new();
        if writer.write_all(head).is_err() {
            return written;
        }
        written.extend_from_slice(head);
        let started = Instant::now();
        while started.elapsed() < limit {
            thread::sleep(Duration::from_millis(50));
            if writer.write_all(b"a").is_err() {
                break;
            }
            written.push(b'a');
        }
        written
    })
}

/// Reads until the proxy ends the connection: EOF or a reset, within `limit`.
fn assert_closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the proxy did not close the connection within {limit:?}: {e}"),
        }
    }
    started.elapsed()
}

/// A client that sends nothing, without a default route, is closed at the
/// first-message timeout.
fn silent_client_closed(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&http_routes(echo.addr, false), mode);
    let mut client = proxy.connect();
    assert_closed_within(&mut client, PROMPT);
    proxy.wait_held(0, WAIT);
    assert_eq!(echo.accepted(), 0);
}

/// A slowloris client trickles a request head that never ends: the deadline runs from
/// accept, so its bytes do not push it back, and it is closed at the timeout.
fn trickling_client_closed(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&http_routes(echo.addr, false), mode);
    let mut client = proxy.connect();
    let writer = trickle(&client, ENDLESS_HEAD, Duration::from_secs(10));
    assert_closed_within(&mut client, PROMPT);
    drop(client);
    let written = writer.join().unwrap();
    assert!(written.len() < ENDLESS_HEAD.len() + 100, "kept trickling");
    proxy.wait_held(0, WAIT);
    assert_eq!(echo.accepted(), 0);
}

/// With a default route the same slowloris client is served there once the timeout
/// passes, and every byte it trickled, before and after, arrives.
fn trickling_client_takes_the_default(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&http_routes(echo.addr, true), mode);
    let client = proxy.connect();
    let writer = trickle(&client, ENDLESS_HEAD, Duration::from_millis(1500));
    let mut reader = client.try_clone().unwrap();
    let echoed = thread::spawn(move || read_to_end_hashed(&mut reader));
    let written = writer.join().unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let echoed = echoed.join().unwrap().unwrap();
    assert_eq!(echoed, (written.len() as u64, sha256(&written)));
    assert_eq!(echo.accepted(), 1);
    drop(client);
    proxy.wait_idle(WAIT);
}

#[test]
fn silent_client_closed_splice() {
    silent_client_closed(SPLICE);
}

#[test]
fn trickling_client_closed_splice() {
    trickling_client_closed(SPLICE);
}

#[test]
fn trickling_client_closed_copy() {
    trickling_client_closed(COPY);
}

#[test]
fn trickling_client_takes_the_default_splice() {
    trickling_client_takes_the_default(SPLICE);
}

#[test]
fn trickling_client_takes_the_default_copy() {
    trickling_client_takes_the_default(COPY);
}

/// An address that completes no handshake: a listener with a backlog of 0 that never
/// accepts, whose queue a connection already fills, so the kernel drops further SYNs
/// (and the connecting side retransmits them, as with an unreachable host).
struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _filler: TcpStream,
}

impl Blackhole {
    fn new() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let filler = TcpStream::connect_timeout(&addr, WAIT).expect("the queue's one place");
        let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            probe.is_err(),
            "a second connect completed: the backlog is not full"
        );
        Blackhole {
            addr,
            _listener: listener,
            _filler: filler,
        }
    }
}

/// A backend that never answers is given up after connect_timeout for the route's next
/// one, whichever the round-robin starts at.
fn silent_backend_then_next(mode: Moving) {
    let blackhole = Blackhole::new();
    let echo = Backend::echo();
    let routes = format!(
        "connect_timeout = \"300ms\"\n{}",
        prefix_routes("a", &[blackhole.addr, echo.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    for seed in 0..2 {
        echo_checked(held(proxy.addr, b"a"), 10 + seed);
    }
    assert_eq!(echo.accepted(), 2);
    proxy.wait_idle(WAIT);
}

/// A route whose only backend never answers: the client is closed after about the
/// connect timeout, not left waiting for the kernel's SYN retries (over a minute).
fn silent_backend_only(mode: Moving) {
    let blackhole = Blackhole::new();
    let routes = format!(
        "connect_timeout = \"300ms\"\n{}",
        prefix_routes("a", &[blackhole.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    let mut client = proxy.connect();
    client.write_all(b"a").unwrap();
    assert_closed_within(&mut client, PROMPT);
    proxy.wait_held(0, WAIT);
}

/// A backend that completes the handshake only after the proxy's connect has started
/// waiting (its SYN dropped by a full queue, the retransmission a second later taken)
/// still gets the first message, then the spliced stream: the proxy waits for the
/// connect instead of sending into a socket that is not connected yet.
fn late_backend(mode: Moving) {
    let blackhole = Blackhole::new();
    let addr = blackhole.addr;
    let Blackhole {
        _listener: listener,
        _filler: filler,
        ..
    } = blackhole;
    let listener = std::net::TcpListener::from(listener);
    let (client_sent, sent) = std::sync::mpsc::channel();
    let backend = thread::spawn(move || {
        // Let the proxy's first SYN be dropped, then make room for its retransmission.
        sent.recv_timeout(WAIT)
            .expect("the client sent its first message");
        thread::sleep(Duration::from_millis(300));
        let (queued, _) = listener.accept().expect("the filler's connection");
        drop((queued, filler));
        let (mut stream, _) = listener.accept().expect("the proxy's connection");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = stream.try_clone().unwrap();
        let _ = io::copy(&mut reader, &mut stream);
    });
    let routes = format!("connect_timeout = \"5s\"\n{}", prefix_routes("a", &[addr]));
    let proxy = Proxy::start(&routes, mode);
    let mut client = connect(proxy.addr);
    client.write_all(b"a").unwrap();
    client_sent.send(()).unwrap();
    assert_eq!(read_exactly(&mut client, 1).unwrap(), b"a");
    echo_checked(client, 30);
    backend.join().unwrap();
    proxy.wait_idle(WAIT);
}

#[test]
fn late_backend_splice() {
    late_backend(SPLICE);
}

#[test]
fn late_backend_copy() {
    late_backend(COPY);
}

#[test]
fn silent_backend_then_next_splice() {
    silent_backend_then_next(SPLICE);
}

#[test]
fn silent_backend_then_next_copy() {
    silent_backend_then_next(COPY);
}

#[test]
fn silent_backend_only_splice() {
    silent_backend_only(SPLICE);
}

const IDLE: Duration = Duration::from_secs(1);

fn idle_routes(backend: SocketAddr) -> String {
    format!(
        "idle_timeout = \"{}ms\"\n{}",
        IDLE.as_millis(),
        prefix_routes("a", &[backend])
    )
}

/// A pair that moves nothing is reset once the idle timeout passes, by the kernel's
/// clock of its last data (the proxy never sees spliced bytes), and freed.
fn idle_pair_reset(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&idle_routes(echo.addr), mode);
    let mut client = held(proxy.addr, b"a");
    proxy.wait_handed_off(1, WAIT);
    let waited = assert_closed_within(&mut client, IDLE + PROMPT);
    assert!(
        waited >= IDLE / 2,
        "reset after {waited:?}, before the idle timeout"
    );
    proxy.wait_idle(WAIT);
    proxy.wait_held(0, WAIT);
}

/// A client that trickles a byte upstream every 250ms, for three idle timeouts, keeps
/// its pair: bytes moving one way are activity. Every byte arrives.
fn trickling_pair_kept(mode: Moving) {
    let (sink, received) = Backend::sink();
    let proxy = Proxy::start(&idle_routes(sink.addr), mode);
    let mut client = connect(proxy.addr);
    client.set_nodelay(true).unwrap();
    client.write_all(b"a").unwrap();
    proxy.wait_handed_off(1, WAIT);
    let mut sent = b"a".to_vec();
    let started = Instant::now();
    while started.elapsed() < 3 * IDLE {
        thread::sleep(IDLE / 4);
        client
            .write_all(b"b")
            .expect("the proxy closed a pair that was moving bytes");
        sent.push(b'b');
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let got = received.recv_timeout(WAIT).expect("the sink's report");
    assert_eq!(got, (sent.len() as u64, sha256(&sent)));
    assert_closed_within(&mut client, PROMPT);
    proxy.wait_idle(WAIT);
}

#[test]
fn idle_pair_reset_splice() {
    idle_pair_reset(SPLICE);
}

#[test]
fn idle_pair_reset_copy() {
    idle_pair_reset(COPY);
}

#[test]
fn trickling_pair_kept_splice() {
    trickling_pair_kept(SPLICE);
}

#[test]
fn trickling_pair_kept_copy() {
    trickling_pair_kept(COPY);
}

/// The binary logs an idle pair's end as `end="idle"`, and the backend sees the reset.
#[test]
fn idle_pair_is_logged_as_idle() {
    let (backend, outcomes) = Backend::sink_outcome();
    let routes = routes_file("idle", &idle_routes(backend.addr));
    let proxy = ProxyProcess::serve(&routes, "splice", &[]);
    let mut client = connect(proxy.addr());
    client.write_all(b"a").unwrap();
    let client_addr = client.local_addr().unwrap();
    assert_closed_within(&mut client, IDLE + PROMPT);
    let (result, _) = outcomes
        .recv_timeout(WAIT)
        .expect("the backend's read ended");
    assert_eq!(
        result.map(|(len, _)| len).map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "the backend of an idle pair is reset"
    );
    let line = proxy.wait_for_log(&format!("client={client_addr}"), WAIT);
    assert!(line.contains("end=\"idle\""), "{line}");
    assert!(line.contains("mode=\"splice\""), "{line}");
}

/// The proxy binary on `routes` with `args`, allowed `limit` descriptors: prlimit execs
/// it, so it is the same process, with both limits at `limit`.
fn proxy_with_descriptors(limit: usize, args: &[&str], routes: &std::path::Path) -> ProxyProcess {
    let mut command = external("prlimit", "util-linux");
    command
        .arg(format!("--nofile={limit}:{limit}"))
        .arg(binary())
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--routes"])
        .arg(routes);
    ProxyProcess::spawn(&mut command)
}

/// Descriptors below `limit` that the process `pid` has open, once the count has
/// stopped moving. Below the limit: a descriptor inherited from above it (cargo's
/// jobserver pipe) takes no place the limit leaves.
fn settled_fds_below(pid: u32, limit: usize) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the proxy's /proc/<pid>/fd")
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<usize>().ok())
                    .is_some_and(|fd| fd < limit)
            })
            .count()
    };
    let deadline = Instant::now() + WAIT;
    let mut last = count();
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = count();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// A proxy out of descriptors cannot make the upstream socket: the client is closed and
/// logged as the proxy's own failure, and the backend is not blamed. With
/// `health_fails = 1` one blamed connect would take it down.
#[test]
fn a_proxy_out_of_descriptors_does_not_take_the_backend_down() {
    const LIMIT: usize = 160;
    let backend = Backend::echo();
    let routes = routes_file(
        "no-socket",
        &format!(
            "first_message_timeout = \"60s\"\nhealth_interval = \"1h\"\nhealth_fails = 1\n\n{}",
            prefix_routes("a", &[backend.addr])
        ),
    );
    let proxy = proxy_with_descriptors(LIMIT, &[], &routes);
    let pid = proxy.child.id();
    let used = settled_fds_below(pid, LIMIT);
    assert!(
        used + 20 < LIMIT,
        "the proxy starts with {used} descriptors"
    );
    // Each held connection takes two descriptors, a client still silent one: fill up
    // to one short of the limit, so that the next accept succeeds and the socket for
    // its backend cannot be made.
    let gap = LIMIT - 1 - used;
    let mut held_connections: Vec<TcpStream> =
        (0..gap / 2).map(|_| held(proxy.addr(), b"a")).collect();
    let silent = (gap % 2 == 1).then(|| connect(proxy.addr()));
    assert_eq!(settled_fds_below(pid, LIMIT), LIMIT - 1);

    let client = assert_refused(proxy.addr(), b"a");
    let line = proxy.wait_for_log(&format!("client={client}"), WAIT);
    assert!(
        line.contains("end=\"setup_failed\"")
            && line.contains("could not make a socket")
            && line.contains("Too many open files"),
        "{line}"
    );
    // Room for one more connection, once the proxy has closed the ones let go.
    drop(silent);
    drop(held_connections.pop());
    let deadline = Instant::now() + WAIT;
    while settled_fds_below(pid, LIMIT) > LIMIT - 3 {
        assert!(
            Instant::now() < deadline,
            "the proxy kept the closed connections' descriptors"
        );
    }
    echo_checked(held(proxy.addr(), b"a"), 1);
    assert_eq!(
        proxy.log_lines(" down:"),
        Vec::<String>::new(),
        "the backend was taken down"
    );
}

/// A proxy out of descriptors cannot accept: the client waits in the listener's queue
/// while the proxy retries every few milliseconds, without spinning or logging every
/// retry, and is served once a descriptor is free.
#[test]
fn a_proxy_that_cannot_accept_retries_without_spinning_and_then_serves() {
    const LIMIT: usize = 160;
    let backend = Backend::echo();
    let routes = routes_file(
        "no-accept",
        &format!(
            "first_message_timeout = \"60s\"\n\n{}",
            prefix_routes("a", &[backend.addr])
        ),
    );
    let proxy = proxy_with_descriptors(LIMIT, &["--workers", "2"], &routes);
    let pid = proxy.child.id();
    let used = settled_fds_below(pid, LIMIT);
    // Every descriptor taken: two per held connection, one for a silent client.
    let gap = LIMIT - used;
    let mut held_connections: Vec<TcpStream> =
        (0..gap / 2).map(|_| held(proxy.addr(), b"a")).collect();
    let _silent = (gap % 2 == 1).then(|| connect(proxy.addr()));
    assert_eq!(settled_fds_below(pid, LIMIT), LIMIT);

    let mut waiting = connect(proxy.addr());
    waiting.write_all(b"a").unwrap();
    let line = proxy.wait_for_log("accept failed", WAIT);
    assert!(line.contains("Too many open files"), "{line}");
    let cpu_before = process_cpu(pid);
    thread::sleep(Duration::from_secs(2));
    let busy = process_cpu(pid) - cpu_before;
    assert!(
        busy < Duration::from_millis(500),
        "the proxy used {busy:?} of CPU in 2 s while it could not accept"
    );
    // Retried every 10 ms, logged at most once a second by each of the two workers: the
    // worker whose listener holds no client may fail too, since accept4 takes a
    // descriptor before it looks at the queue.
    let lines = proxy.log_lines("accept failed");
    assert!(lines.len() <= 6, "{lines:#?}");

    drop(held_connections.pop());
    waiting.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(read_exactly(&mut waiting, 1).unwrap(), b"a");
    echo_checked(waiting, 2);
}

/// The CPU time, user and system, the process `pid` has used so far.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the proxy's stat");
    // After the command's name, which may hold spaces, in parentheses: utime and stime
    // are the 12th and 13th fields.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}
