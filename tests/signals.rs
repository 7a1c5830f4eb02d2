//! The binary under signals, as an operator sends them: SIGHUP reloads the routes for new
//! connections and leaves live ones alone (a broken file keeps the old routes), SIGTERM
//! stops accepting, lets live transfers finish intact and exits 0, and a grace period
//! bounds how long it waits. And the library's side: after `Proxy::stop_accepting`,
//! `Proxy::shutdown` returns once the last connection has closed, `replace_routing` is a
//! reload for a program's own router, and dropping a proxy resets its connections and
//! ends its threads. Every wait is bounded and every transfer checked by hash.

mod support;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use splice_proxy::{
    Limits, Proxy, Splicing,
    route::{Decision, FirstMessage, Forward},
};
use support::*;

const LOG_LIMIT: Duration = Duration::from_secs(10);

/// A routes file sending first messages that start with "a" to `backend`.
fn routes_to(backend: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"a\"\nprefix = \"a\"\n{}\n",
        backends_toml(&[backend])
    )
}

/// Connects, sends the first message "a-hello" and reads the backend's one-byte greeting
/// and the echo of the first message: the connection is handed off. Returns the stream
/// and the greeting (which backend answered).
fn greeted(proxy: SocketAddr) -> (TcpStream, u8) {
    let mut stream = connect(proxy);
    stream.write_all(b"a-hello").unwrap();
    let answer = read_exactly(&mut stream, 8).expect("greeting and echo");
    assert_eq!(&answer[1..], b"a-hello", "echo of the first message");
    (stream, answer[0])
}

/// Echoes `data` through `stream` (written while reading), checks the hash, closes.
fn echo_checked(mut stream: TcpStream, data: Arc<Vec<u8>>) {
    let expected = (data.len() as u64, sha256(&data));
    let echoed = write_while_reading(&mut stream, data).expect("echo exchange");
    assert_eq!(echoed, expected, "echo through the proxy");
}

#[test]
fn sighup_routes_new_connections_by_the_new_file_and_leaves_live_ones() {
    let a = Backend::greeter(b"A");
    let b = Backend::greeter(b"B");
    let routes = routes_file("sighup-good", &routes_to(a.addr));
    let mut proxy = ProxyProcess::serve(&routes, "splice", &[]);

    let (before, greeting) = greeted(proxy.addr());
    assert_eq!(greeting, b'A', "before the reload");
    let before_client = before.local_addr().unwrap();

    std::fs::write(&routes, routes_to(b.addr)).unwrap();
    proxy.signal(libc::SIGHUP);
    let line = proxy.wait_for_log("reloaded", LOG_LIMIT);
    assert!(
        line.contains(&format!("reloaded 1 routes from {}", routes.display())),
        "{line:?}"
    );

    let (after, greeting) = greeted(proxy.addr());
    assert_eq!(greeting, b'B', "a new connection after the reload");
    echo_checked(after, shared_payload(1 << 20, 11));

    // The connection from before the reload still works, spliced, to A.
    echo_checked(before, shared_payload(8 << 20, 12));
    let line = proxy.wait_for_log(&format!("client={before_client} "), LOG_LIMIT);
    for field in [format!("backend={}", a.addr), "mode=\"splice\"".to_owned()] {
        assert!(line.contains(&field), "no {field} in {line:?}");
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 1));

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(LOG_LIMIT).success(), "{}", proxy.stderr());
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_routes_and_says_why() {
    let a = Backend::greeter(b"A");
    let routes = routes_file("sighup-broken", &routes_to(a.addr));
    let proxy = ProxyProcess::serve(&routes, "splice", &[]);

    // Line 3: a prefix must be a string.
    std::fs::write(
        &routes,
        "[[route]]\nname = \"a\"\nprefix = 7\nbackends = [\"127.0.0.1:9\"]\n",
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    let line = proxy.wait_for_log("reload failed", LOG_LIMIT);
    assert!(line.contains("WARN"), "{line:?}");
    assert!(
        line.contains(&format!("{}:3:", routes.display())),
        "the warning names the file and line: {line:?}"
    );
    assert!(line.contains("prefix"), "and the key: {line:?}");
    assert!(proxy.log_lines("reloaded").is_empty(), "{}", proxy.stderr());

    let (stream, greeting) = greeted(proxy.addr());
    assert_eq!(greeting, b'A', "the old routes still route");
    echo_checked(stream, shared_payload(1 << 20, 13));
}

/// Writes `data` in `chunk`s with `pause` between them, then half-closes, while this
/// thread reads the echo until EOF; `progress` counts the bytes read so far.
fn paced_echo(
    mut stream: TcpStream,
    data: Arc<Vec<u8>>,
    chunk: usize,
    pause: Duration,
    progress: Arc<AtomicU64>,
) -> io::Result<(u64, [u8; 32])> {
    let mut writer = stream.try_clone()?;
    let writing = thread::spawn(move || -> io::Result<()> {
        for piece in data.chunks(chunk) {
            writer.write_all(piece)?;
            thread::sleep(pause);
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
                progress.store(total, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    writing.join().expect("writer thread panicked")?;
    Ok((total, hasher.finalize().into()))
}

#[test]
fn sigterm_refuses_new_connections_and_lets_live_transfers_finish() {
    const LEN: usize = 32 << 20;
    let backend = Backend::echo();
    let routes = routes_file("sigterm-drain", &routes_to(backend.addr));
    let mut proxy = ProxyProcess::serve(&routes, "splice", &["--shutdown-grace", "60s"]);
    let addr = proxy.addr();

    let data = shared_payload(LEN, 21);
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let mut stream = connect(addr);
            // The first message, then about 2 s of paced streaming.
            stream.write_all(b"a").unwrap();
            assert_eq!(read_exactly(&mut stream, 1).unwrap(), b"a");
            let progress = Arc::new(AtomicU64::new(0));
            let seen = Arc::clone(&progress);
            let data = Arc::clone(&data);
            let client = thread::spawn(move || {
                paced_echo(stream, data, 512 << 10, Duration::from_millis(30), seen)
            });
            (client, progress)
        })
        .collect();
    // Mid-transfer: every client has had some of its echo back.
    let deadline = Instant::now() + LOG_LIMIT;
    while clients
        .iter()
        .any(|(_, progress)| progress.load(Ordering::SeqCst) == 0)
    {
        assert!(Instant::now() < deadline, "the transfers did not start");
        thread::sleep(Duration::from_millis(5));
    }

    proxy.signal(libc::SIGTERM);
    let signalled = Instant::now();
    proxy.wait_for_log("shutting down: 3 connections live", LOG_LIMIT);
    match TcpStream::connect(addr) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a connection was accepted after SIGTERM"),
    }
    for (i, (_, progress)) in clients.iter().enumerate() {
        assert!(
            (progress.load(Ordering::SeqCst) as usize) < LEN,
            "client {i} had finished before the shutdown began: the test proves nothing"
        );
    }
    for (i, (client, _)) in clients.into_iter().enumerate() {
        let echoed = client.join().expect("client thread").expect("echo");
        assert_eq!(echoed, (LEN as u64, sha256(&data)), "client {i}");
    }
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}; stderr:\n{}", proxy.stderr());
    assert!(signalled.elapsed() < Duration::from_secs(30));
    assert_eq!(proxy.log_lines("shutdown complete").len(), 1);
    assert!(proxy.log_lines("grace period over").is_empty());
    assert_eq!(proxy.log_lines("mode=\"splice\"").len(), 3);
}

#[test]
fn sigterm_closes_what_outlives_the_grace_period() {
    let backend = Backend::echo();
    let routes = routes_file(
        "sigterm-grace",
        &format!(
            "first_message_timeout = \"60s\"\n{}",
            routes_to(backend.addr)
        ),
    );
    let mut proxy = ProxyProcess::serve(&routes, "splice", &["--shutdown-grace", "1s"]);
    let addr = proxy.addr();

    // A spliced connection that never ends, and one that never sends its first message.
    let mut spliced = connect(addr);
    spliced.write_all(b"a-idle").unwrap();
    assert_eq!(read_exactly(&mut spliced, 6).unwrap(), b"a-idle");
    let mut silent = connect(addr);
    thread::sleep(Duration::from_millis(100)); // accepted by now

    proxy.signal(libc::SIGTERM);
    let signalled = Instant::now();
    proxy.wait_for_log("shutting down: 2 connections live", LOG_LIMIT);
    let status = proxy.wait_exit(LOG_LIMIT);
    let took = signalled.elapsed();
    assert!(status.success(), "{status}; stderr:\n{}", proxy.stderr());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 1 s grace"
    );
    assert_eq!(
        proxy
            .log_lines("grace period over: closing 2 connections")
            .len(),
        1,
        "{}",
        proxy.stderr()
    );

    // The engine reset the spliced connection and logged it.
    let reset = proxy.log_lines("the proxy is shutting down");
    assert_eq!(reset.len(), 1, "{}", proxy.stderr());
    assert!(reset[0].contains("end=\"reset\""), "{:?}", reset[0]);

    // Both clients see their connection end (a reset or an EOF), not a timeout.
    for (name, stream) in [("spliced", &mut spliced), ("silent", &mut silent)] {
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("{name}: expected the connection closed, got {other:?}"),
        }
    }
}

/// The library's proxies of this file run one at a time: the drop test counts the
/// process's worker threads.
static IN_PROCESS: Mutex<()> = Mutex::new(());

/// A proxy in this process routing everything to `to`.
fn proxy_to(to: SocketAddr, splicing: Splicing) -> Proxy {
    let router = move |_: &FirstMessage<'_>| {
        Decision::Forward(Forward {
            route: "all".into(),
            backends: vec![to.into()],
            send_proxy: None,
        })
    };
    Proxy::builder(router)
        .limits(Limits {
            first_message_timeout: Duration::from_secs(5),
            first_message_max: 1024,
            connect_timeout: Duration::from_secs(1),
            ..Limits::default()
        })
        .workers(2)
        .splicing(splicing)
        .start()
        .expect("start")
}

#[test]
fn stop_accepting_refuses_connects_and_shutdown_waits_for_every_connection() {
    let _alone = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let backend = Backend::echo();
    let proxy = proxy_to(backend.addr, Splicing::Off);
    let addr = proxy.local_addr();
    echo_checked_plain(addr);

    // A connection reading its first message is in flight until it is handed off.
    let mut pending = connect(addr);
    let deadline = Instant::now() + LOG_LIMIT;
    while proxy.in_flight() == 0 {
        assert!(Instant::now() < deadline, "never accepted");
        thread::sleep(Duration::from_millis(1));
    }
    proxy.stop_accepting().expect("stop accepting");
    proxy.stop_accepting().expect("a second call does nothing");
    match TcpStream::connect(addr) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("connected after stop_accepting"),
    }
    assert_eq!(proxy.in_flight(), 1);

    // A grace far longer than the test waits: returning within it means the last
    // connection closed.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        proxy.shutdown(Duration::from_secs(600));
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "shutdown returned with a connection still in flight"
    );
    pending.write_all(b"late").unwrap();
    assert_eq!(read_exactly(&mut pending, 4).unwrap(), b"late");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "shutdown returned with a connection still live in the engine"
    );
    drop(pending);
    rx.recv_timeout(LOG_LIMIT)
        .expect("shutdown returns once the last connection has closed");
}

#[test]
fn dropping_a_proxy_resets_its_connections_and_ends_its_threads_and_probe() {
    let _alone = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let workers_before = proxy_threads();
    let backend = Backend::echo();
    let proxy = proxy_to(backend.addr, Splicing::Required);
    let addr = proxy.local_addr();
    let probe = Arc::downgrade(proxy.engine().probe().expect("the probe is loaded"));
    // A thread names itself once it runs: until then it has its parent's name.
    let deadline = Instant::now() + LOG_LIMIT;
    while proxy_threads() <= workers_before {
        assert!(Instant::now() < deadline, "no worker thread started");
        thread::sleep(Duration::from_millis(1));
    }
    let mut open = connect(addr);
    open.write_all(b"held").unwrap();
    assert_eq!(read_exactly(&mut open, 4).unwrap(), b"held");

    drop(proxy);
    // The drop returned: the workers are joined, and so are their listeners and the
    // probe (its programs detach with it). A joined thread's task leaves
    // /proc/self/task a moment after the join returns (the kernel finishes its exit
    // after waking the joiner; CI once counted one still there), so its count is
    // awaited; a thread the drop had not joined would stay and fail here.
    let deadline = Instant::now() + LOG_LIMIT;
    while proxy_threads() != workers_before {
        assert!(
            Instant::now() < deadline,
            "{} threads named splice-* after the drop, {workers_before} before the proxy",
            proxy_threads()
        );
        thread::sleep(Duration::from_millis(1));
    }
    assert!(probe.upgrade().is_none(), "the probe outlived the proxy");
    match TcpStream::connect(addr) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("connected after the proxy was dropped"),
    }
    let mut buf = [0u8; 16];
    match open.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes (want a reset) from a dropped proxy's connection"),
    }
}

/// The library's reload for a program's own router: new connections take the new one,
/// and one accepted before keeps the backend it had.
#[test]
fn replace_routing_routes_new_connections_and_leaves_live_ones() {
    let _alone = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let a = Backend::greeter(b"A");
    let b = Backend::greeter(b"B");
    let proxy = proxy_to(a.addr, Splicing::Off);
    let (before, greeting) = greeted(proxy.local_addr());
    assert_eq!(greeting, b'A', "before the replacement");

    let to = b.addr;
    proxy.replace_routing(
        move |_: &FirstMessage<'_>| {
            Decision::Forward(Forward {
                route: "b".into(),
                backends: vec![to.into()],
                send_proxy: None,
            })
        },
        Limits::default(),
    );
    let (after, greeting) = greeted(proxy.local_addr());
    assert_eq!(greeting, b'B', "a new connection after the replacement");
    echo_checked(after, shared_payload(1 << 16, 41));
    echo_checked(before, shared_payload(1 << 16, 42));
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

/// This process's threads named as the engine names its workers.
fn proxy_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("splice-"))
        })
        .count()
}

fn echo_checked_plain(addr: SocketAddr) {
    let mut stream = connect(addr);
    stream.write_all(b"x").unwrap();
    assert_eq!(read_exactly(&mut stream, 1).unwrap(), b"x");
    echo_checked(stream, shared_payload(1 << 16, 31));
}
