//! Backends as a route spreads connections over them and keeps them healthy, through
//! the real proxy: redis-cli to a real redis-server, weighted round-robin and
//! source-hash over 1,000 connections, least-conn with held connections (spliced and
//! copied), a backend process killed and restarted under health checks, and checker
//! threads across reloads. Every reply is checked byte for byte.

mod support;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    process::{Child, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use splice_proxy::{
    backend::Backends,
    balance::{Balance, Balancer, WeightedBackend},
};
use support::*;

/// Debian's redis-server on `port`, without persistence; killed when dropped.
struct Redis {
    child: Child,
    addr: SocketAddr,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = external("redis-server", "redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr);
        Redis { child, addr }
    }

    /// SIGKILL, and reaped: nothing listens on its port any more.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs redis-cli against `addr` with `args`, `stdin` piped in; returns its stdout.
fn redis_cli(addr: SocketAddr, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = external("redis-cli", "redis-tools")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = wait_output(child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("redis-cli {args:?} still running after 20s"));
    writer.join().unwrap();
    assert!(
        output.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[test]
fn redis_cli_reaches_redis_server_through_a_prefix_route() {
    let redis = Redis::start(free_port());
    let routes = format!(
        "[[route]]\nname = \"redis\"\nprefix = \"*\"\nbackends = [\"{}\"]\n",
        redis.addr
    );
    for moving in [SPLICE, COPY] {
        let proxy = Proxy::start(&routes, moving);
        assert_eq!(
            redis_cli(proxy.addr, &["SET", "greeting", "hello"], b""),
            b"OK\n"
        );
        assert_eq!(redis_cli(proxy.addr, &["GET", "greeting"], b""), b"hello\n");
        // 2 MiB in hex: larger than any socket buffer, so it streams through the splice.
        let value: String = payload(1 << 20, 7)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(
            redis_cli(proxy.addr, &["-x", "SET", "big"], value.as_bytes()),
            b"OK\n"
        );
        let got = redis_cli(proxy.addr, &["GET", "big"], b"");
        assert_eq!(got.len(), value.len() + 1);
        assert_eq!(sha256(&got[..value.len()]), sha256(value.as_bytes()));
        assert_eq!(redis_cli(proxy.addr, &["STRLEN", "big"], b""), b"2097152\n");
        proxy.wait_idle(Duration::from_secs(10));
    }
}

/// A backend that reads one line from each connection and answers `name` and the line:
/// which backend a connection reached, and that its bytes arrived whole. It keeps the
/// connection until the client closes it.
fn named_backend(name: &'static str) -> Backend {
    Backend::start(move |mut stream| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&line);
                if stream.write_all(&reply).is_err() {
                    return;
                }
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
                return;
            }
        }
    })
}

/// Sends one line through the proxy from `stream` and returns the name of the backend
/// that answered, after checking that it echoed the line exactly.
fn ask(stream: &mut TcpStream, n: usize) -> String {
    let line = format!("hello {n} {}\n", "x".repeat(n % 97));
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        stream
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("connection {n}: {e} after {reply:?}"));
        reply.push(byte[0]);
    }
    let reply = String::from_utf8(reply).unwrap();
    let (name, echoed) = reply.split_once(' ').unwrap();
    assert_eq!(echoed, line, "connection {n}");
    name.to_owned()
}

fn ask_once(proxy: SocketAddr, n: usize) -> String {
    let mut stream = connect(proxy);
    let name = ask(&mut stream, n);
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    name
}

fn route_toml(balance: &str, backends: &[(SocketAddr, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(addr, weight)| format!("{{ addr = \"{addr}\", weight = {weight} }}"))
        .collect();
    format!(
        "[[route]]\nname = \"hello\"\nprefix = \"hello \"\nbalance = \"{balance}\"\n\
         backends = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn weights_three_to_one_over_a_thousand_connections() {
    let (a, b) = (named_backend("a"), named_backend("b"));
    let proxy = Proxy::start(
        &route_toml("round-robin", &[(a.addr, 3), (b.addr, 1)]),
        SPLICE,
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in 0..1000 {
        *counts.entry(ask_once(proxy.addr, n)).or_default() += 1;
    }
    // Smooth weighted round-robin is exact over whole rounds: 250 rounds of a a b a.
    assert_eq!(counts["a"], 750, "{counts:?}");
    assert_eq!(counts["b"], 250, "{counts:?}");
    proxy.wait_idle(Duration::from_secs(10));
}

/// A connection from `source` (any 127.0.0.0/8 address is this host's).
fn connect_from(source: IpAddr, proxy: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket.connect(&proxy.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

#[test]
fn source_hash_pins_each_client_address_and_follows_the_weights() {
    let (a, b) = (named_backend("a"), named_backend("b"));
    let backends = [(a.addr, 3), (b.addr, 1)];
    let proxy = Proxy::start(&route_toml("source-hash", &backends), SPLICE);
    // The library's own balancer, to tell which backend each client should reach.
    let expected = Balancer::new(
        Balance::SourceHash,
        backends
            .iter()
            .map(|&(addr, weight)| WeightedBackend { addr, weight })
            .collect(),
        // Untracked: source-hash orders by address alone.
        &Backends::new(),
    );
    let name_of = |addr: SocketAddr| if addr == a.addr { "a" } else { "b" };
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut first_backend: HashMap<IpAddr, String> = HashMap::new();
    // 1,000 connections from 500 client addresses, each twice.
    for n in 0..1000u32 {
        let k = n % 500;
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            1 + (k / 250) as u8,
            0,
            1 + (k % 250) as u8,
        ));
        let mut stream = connect_from(source, proxy.addr);
        let name = ask(&mut stream, n as usize);
        drop(stream);
        let want = name_of(expected.order(SocketAddr::new(source, 1))[0].addr);
        assert_eq!(name, want, "client {source}");
        let first = first_backend.entry(source).or_insert_with(|| name.clone());
        assert_eq!(*first, name, "client {source} moved");
        *counts.entry(name).or_default() += 1;
    }
    // Weights 3:1 expect 750 and 250; the binomial spread over 500 addresses is ~20.
    assert!((650..=850).contains(&counts["a"]), "{counts:?}");
    assert_eq!(counts["a"] + counts["b"], 1000);
    proxy.wait_idle(Duration::from_secs(10));
}

#[test]
fn least_conn_sends_new_connections_to_the_backend_with_fewer_live_ones() {
    for moving in [SPLICE, COPY] {
        let (a, b) = (named_backend("a"), named_backend("b"));
        let proxy = Proxy::start(
            &route_toml("least-conn", &[(a.addr, 1), (b.addr, 1)]),
            moving,
        );
        let mut held: Vec<(String, TcpStream)> = (0..6)
            .map(|n| {
                let mut stream = connect(proxy.addr);
                (ask(&mut stream, n), stream)
            })
            .collect();
        let on = |held: &[(String, TcpStream)], name: &str| {
            held.iter().filter(|(n, _)| n == name).count()
        };
        assert_eq!((on(&held, "a"), on(&held, "b")), (3, 3), "{moving:?}");
        // Close the connections to a; the engine counts them until it closes them.
        held.retain(|(name, _)| name != "a");
        proxy.wait_handed_off(3, Duration::from_secs(10));
        for n in 6..9 {
            let mut stream = connect(proxy.addr);
            let name = ask(&mut stream, n);
            assert_eq!(name, "a", "{moving:?}: a has {} live, b 3", n - 6);
            held.push((name, stream));
        }
        // Now 3 and 3 again: the next two go one each.
        let mut next: Vec<String> = (9..11)
            .map(|n| {
                let mut stream = connect(proxy.addr);
                let name = ask(&mut stream, n);
                held.push((name.clone(), stream));
                name
            })
            .collect();
        next.sort();
        assert_eq!(next, ["a", "b"], "{moving:?}");
        drop(held);
        proxy.wait_idle(Duration::from_secs(10));
    }
}

/// Asks redis at `proxy` which instance answered: each was given a `who` key.
fn who(proxy: SocketAddr) -> String {
    let reply = redis_cli(proxy, &["GET", "who"], b"");
    String::from_utf8(reply).unwrap().trim_end().to_owned()
}

fn start_named_redis(port: u16, name: &str) -> Redis {
    let redis = Redis::start(port);
    assert_eq!(redis_cli(redis.addr, &["SET", "who", name], b""), b"OK\n");
    redis
}

#[test]
fn a_killed_backend_is_taken_out_within_two_intervals_and_back_after_restart() {
    const INTERVAL: Duration = Duration::from_millis(500);
    let (port_a, port_b) = (free_port(), free_port());
    let a = start_named_redis(port_a, "a");
    let _b = start_named_redis(port_b, "b");
    let routes = routes_file(
        "health",
        &format!(
            "health_interval = \"500ms\"\nhealth_fails = 2\n\n\
             [[route]]\nname = \"redis\"\nprefix = \"*\"\nbackends = [\"{}\", \"127.0.0.1:{port_b}\"]\n",
            a.addr
        ),
    );
    let proxy = ProxyProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
    ]);
    let spread = |count: usize| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..count {
            *counts.entry(who(proxy.addr())).or_default() += 1;
        }
        counts
    };
    let counts = spread(10);
    assert_eq!((counts["a"], counts["b"]), (5, 5), "{counts:?}");

    let killed_at = Instant::now();
    a.kill();
    let down = proxy.wait_for_log(
        &format!("backend 127.0.0.1:{port_a} down"),
        Duration::from_secs(10),
    );
    let took = killed_at.elapsed();
    assert!(
        down.contains("2 connects in a row failed, the last by a health check"),
        "{down}"
    );
    // Two checks fail within two intervals of the kill; the rest is scheduling on a
    // busy machine, not the proxy.
    assert!(
        took < 2 * INTERVAL + Duration::from_millis(700),
        "down after {took:?}"
    );
    let refused_before = proxy.log_lines("did not accept").len();
    let counts = spread(10);
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
    assert_eq!(
        proxy.log_lines("did not accept").len(),
        refused_before,
        "the proxy still tried the dead backend"
    );

    let _a = start_named_redis(port_a, "a");
    let up = proxy.wait_for_log(
        &format!("backend 127.0.0.1:{port_a} up"),
        Duration::from_secs(10),
    );
    assert!(up.contains("a health check connected"), "{up}");
    let counts = spread(10);
    assert_eq!((counts["a"], counts["b"]), (5, 5), "{counts:?}");
}

/// Threads of process `pid` named "health-check".
fn checker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "health-check")
        })
        .count()
}

#[test]
fn reloads_keep_one_checker_per_checked_backend() {
    let backends: Vec<Backend> = (0..4).map(|_| Backend::echo()).collect();
    let routes_for = |picked: &[usize], interval: &str| {
        let list: Vec<SocketAddr> = picked.iter().map(|&i| backends[i].addr).collect();
        format!(
            "health_interval = \"{interval}\"\n\n{}",
            prefix_routes("x", &list)
        )
    };
    let path = routes_file("checkers", &routes_for(&[0, 1, 2], "1s"));
    let proxy = ProxyProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        path.to_str().unwrap(),
    ]);
    let pid = proxy.child.id();
    let wait_threads = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = checker_threads(pid);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{now} checker threads, want {want}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_threads(3);
    let steps: [(&[usize], &str, usize); 5] = [
        (&[2, 3], "1s", 2),
        (&[0, 1, 2, 3], "300ms", 4),
        (&[1], "300ms", 1),
        (&[1, 2], "0s", 0),
        (&[0, 3], "1s", 2),
    ];
    for (picked, interval, want) in steps {
        let reloads = proxy.log_lines("reloaded 1 routes").len();
        std::fs::write(&path, routes_for(picked, interval)).unwrap();
        proxy.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.log_lines("reloaded 1 routes").len() == reloads {
            assert!(
                Instant::now() < deadline,
                "no reload logged:\n{}",
                proxy.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
        wait_threads(want);
    }
    // Still proxying, and the checked backends were never taken down.
    let mut stream = connect(proxy.addr());
    let mut sent = b"x".to_vec();
    sent.extend_from_slice(&payload(100_000, 3));
    let (len, hash) = write_while_reading(&mut stream, Arc::new(sent.clone())).unwrap();
    assert_eq!((len, hash), (sent.len() as u64, sha256(&sent)));
    assert!(proxy.log_lines(" down:").is_empty(), "{}", proxy.stderr());
}

/// The value of `splice_proxy_{name}` for `backend` in `proxy`'s metrics, if exported.
fn backend_gauge(proxy: &Proxy, name: &str, backend: SocketAddr) -> Option<i64> {
    let series = format!("splice_proxy_{name}{{backend=\"{backend}\"}} ");
    let text = proxy.engine().metrics().encode();
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map(|value| value.trim().parse().expect("a gauge's value"))
}

#[test]
fn two_proxies_in_one_process_keep_their_own_backend_state() {
    let echo = Backend::echo();
    let dead = refused_addr();
    // Checked an hour apart, so only the proxies' own connects count; one refusal
    // takes a backend down.
    let routes = format!(
        "health_interval = \"1h\"\nhealth_fails = 1\n\n{}",
        prefix_routes("x", &[dead, echo.addr])
    );
    let (one, two) = (Proxy::start(&routes, COPY), Proxy::start(&routes, COPY));
    // Through the first proxy only: its round-robin tries the dead backend first, whose
    // refusal takes it down there, and then holds a connection to the echo backend.
    let mut held = connect(one.addr);
    held.write_all(b"x1").unwrap();
    let mut echoed = [0; 2];
    held.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"x1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_gauge(&one, "backend_connections", echo.addr) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the first proxy holds no connection"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(backend_gauge(&one, "backend_up", dead), Some(0));
    // The second lists the same addresses and has seen none of it.
    assert_eq!(backend_gauge(&two, "backend_up", dead), Some(1));
    assert_eq!(backend_gauge(&two, "backend_up", echo.addr), Some(1));
    assert_eq!(
        backend_gauge(&two, "backend_connections", echo.addr),
        Some(0)
    );
    // And it still sends its first connection to the backend the other took down.
    let mut stream = connect(two.addr);
    stream.write_all(b"x2").unwrap();
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"x2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_gauge(&two, "backend_up", dead) != Some(0) {
        assert!(Instant::now() < deadline, "the second proxy never tried it");
        thread::sleep(Duration::from_millis(5));
    }
    drop((held, stream));
    one.wait_idle(Duration::from_secs(10));
    two.wait_idle(Duration::from_secs(10));
}
