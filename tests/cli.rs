//! The `splice-proxy` command as a user runs it: its help, `--check` on good and broken
//! routes files, and real exchanges in each `--mode`, as root and as nobody (through
//! `setpriv`, so that the probe cannot load). Every wait is bounded and every exchange is
//! checked by hash.

mod support;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use support::*;

const EXIT_LIMIT: Duration = Duration::from_secs(10);
const LOG_LIMIT: Duration = Duration::from_secs(10);

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Runs the binary with `args` to its end.
fn run(args: &[&str]) -> (i32, String, String) {
    let output = output_within(Command::new(binary()).args(args), EXIT_LIMIT);
    (
        output
            .status
            .code()
            .expect("exited, not killed by a signal"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_names_the_options() {
    let (code, stdout, stderr) = run(&["--help"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    for option in ["--listen", "--routes", "--check", "--mode", "--steering"] {
        assert!(
            stdout.contains(option),
            "--help does not mention {option}:\n{stdout}"
        );
    }
}

#[test]
fn check_prints_every_route_of_the_sample_files() {
    let routes = examples_dir().join("routes.toml");
    let (code, stdout, stderr) = run(&["--routes", routes.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    for line in [
        "connect_timeout 2s, health_interval 2s, health_fails 3\n",
        r#"route "ping": prefix "PING" -> 127.0.0.1:9001, 127.0.0.1:9002 weight 2 (round-robin; health_interval 2s, health_fails 3)"#,
        r#"route "v2": at 4 = "v2" -> 127.0.0.1:9002"#,
        r#"route "api": http_path_prefix "/api/" -> 127.0.0.1:9001 (round-robin; health_interval 2s, health_fails 3; send_proxy v1)"#,
        r#"route "fallback": default -> 127.0.0.1:9009"#,
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    let mplex = examples_dir().join("mplex-routes.toml");
    let (code, stdout, stderr) = run(&["--routes", mplex.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    for tag in ["600", "601", "602"] {
        let line =
            format!(r#"route "tag-{tag}": at 20 = "{tag}", length 290..=294 -> 127.0.0.1:5{tag}"#);
        assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    }

    let production = examples_dir().join("production-routes.toml");
    let (code, stdout, stderr) = run(&["--routes", production.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    for line in [
        r#"route "api-tls": sni "api.example.com" -> 192.0.2.10:443, 192.0.2.11:443 weight 2 (least-conn; health_interval 2s, health_fails 3)"#,
        "max_connections 200000\n",
        "idle_timeout 15m\n",
        "on_unparsed reset\n",
        r#"route "admin": http_host "admin.example.com", http_path_prefix "/admin/" -> 192.0.2.60:80"#,
        r#"route "admin-denied": http_path_prefix "/admin/" -> 192.0.2.61:80"#,
        r#"route "redis": regex '^\*[0-9]+\r\n' -> 192.0.2.40:6379, 192.0.2.41:6379 (source-hash"#,
        r#"route "www-tls-h2": sni "*.example.com", alpn ["h2"] -> 192.0.2.20:443"#,
        r#"route "api-http": http_host "api.example.com" -> 192.0.2.10:80"#,
        r#"route "fallback": default -> 192.0.2.50:8080 (round-robin; health_interval 2s, health_fails 3; send_proxy v2)"#,
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
}

#[test]
fn check_names_the_file_line_and_key_of_an_error() {
    let cases = [
        (
            "syntax",
            "connect_timeout = \"2s\"\n[[route]]\nname = \"web\nbackends = [\"127.0.0.1:9001\"]\n",
            3,
            "name",
            "TOML syntax",
        ),
        (
            "unknown-key",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nbakends = [\"127.0.0.1:9001\"]\n",
            4,
            "bakends",
            "unknown field",
        ),
        (
            "bad-backend",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nbackends = [\n  \"127.0.0.1:9001\",\n  \"localhost:9002\",\n]\n",
            6,
            "backends",
            "\"localhost:9002\" is not an address",
        ),
        (
            "weight",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nbackends = [\n  { addr = \"127.0.0.1:9001\", weight = 0 },\n]\n",
            5,
            "weight",
            "0 is out of range: must be 1..=1000",
        ),
        (
            "balance",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nbalance = \"leastconn\"\nbackends = [\"127.0.0.1:9001\"]\n",
            4,
            "balance",
            "\"leastconn\" is not a balance policy",
        ),
        (
            "health-interval",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nhealth_interval = \"10ms\"\nbackends = [\"127.0.0.1:9001\"]\n",
            4,
            "health_interval",
            "\"10ms\" is out of range",
        ),
        (
            "send-proxy",
            "[[route]]\nname = \"web\"\nprefix = \"GET \"\nbackends = [\"127.0.0.1:9001\"]\nsend_proxy = \"v3\"\n",
            5,
            "send_proxy",
            "\"v3\" is not a PROXY protocol version (expected \"v1\" or \"v2\")",
        ),
        (
            "on-unparsed",
            "first_message_max = 512\non_unparsed = \"deny\"\n[[route]]\nname = \"web\"\nprefix = \"GET \"\nbackends = [\"127.0.0.1:9001\"]\n",
            2,
            "on_unparsed",
            "\"deny\" is not what to do with a first message that claimed TLS or HTTP",
        ),
        (
            "path-prefix",
            "[[route]]\nname = \"deny\"\nhttp_path_prefix = \"/%61dmin/\"\nbackends = [\"127.0.0.1:9001\"]\n",
            3,
            "http_path_prefix",
            "normalizes to \"/admin/\"",
        ),
        (
            "health-fails",
            "health_fails = 2\n[[route]]\nname = \"web\"\nprefix = \"GET \"\nbackends = [\"127.0.0.1:9001\"]\n",
            1,
            "health_fails",
            "set health_interval too",
        ),
    ];
    for (name, text, line, key, problem) in cases {
        let file = routes_file(&format!("cli-broken-{name}"), text);
        let file = file.to_str().unwrap();
        let (code, stdout, stderr) = run(&["--routes", file, "--check"]);
        assert_eq!(code, 1, "{name}: stdout {stdout:?}, stderr {stderr:?}");
        let place = format!("{file}:{line}: ");
        assert!(
            stderr.contains(&place),
            "{name}: no {place:?} in {stderr:?}"
        );
        let key = format!("key \"{key}\"");
        assert!(stderr.contains(&key), "{name}: no {key} in {stderr:?}");
        assert!(
            stderr.contains(problem),
            "{name}: no {problem:?} in {stderr:?}"
        );
        assert!(
            stdout.is_empty(),
            "{name}: a broken file printed routes: {stdout:?}"
        );
    }
}

#[test]
fn a_missing_routes_file_is_named() {
    let missing =
        std::env::temp_dir().join(format!("splice-proxy-{}-missing.toml", std::process::id()));
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["--routes", missing, "--check"],
        vec!["--routes", missing, "--listen", "127.0.0.1:0"],
    ] {
        let (code, _, stderr) = run(&args);
        assert_ne!(code, 0);
        assert!(
            stderr.contains(missing),
            "{stderr:?} does not name {missing}"
        );
        assert!(stderr.contains("No such file"), "{stderr:?}");
    }
}

/// A routes file like examples/routes.toml, pointing at `echo` and at an address where
/// nothing listens.
fn echo_routes(name: &str, echo: SocketAddr) -> PathBuf {
    routes_file(
        name,
        &format!(
            "first_message_timeout = \"3s\"\nconnect_timeout = \"2s\"\n\n\
             [[route]]\nname = \"hello\"\nprefix = \"HELLO\"\nbackends = [\"{echo}\"]\n\n\
             [[route]]\nname = \"fallback\"\ndefault = true\nbackends = [\"{}\"]\n",
            refused_addr()
        ),
    )
}

/// One connection through the proxy at `proxy` to an echo backend: the first message,
/// its echo (after which the engine owns the connection), then `len` more bytes both
/// ways, checked by hash. Returns the client's address and the bytes sent.
fn echo_exchange(proxy: SocketAddr, len: usize, seed: u64) -> (SocketAddr, u64) {
    let first = b"HELLO proxy\n";
    let mut client = connect(proxy);
    client.write_all(first).unwrap();
    let mut echo = vec![0; first.len()];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(echo, first);
    let data = Arc::new(payload(len, seed));
    let (echoed, hash) = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(
        (echoed, hash),
        (len as u64, sha256(&data)),
        "echo of {len} bytes"
    );
    (client.local_addr().unwrap(), (first.len() + len) as u64)
}

/// The access-log line of the connection from `client`, checked field by field.
fn check_log(
    proxy: &ProxyProcess,
    client: SocketAddr,
    backend: SocketAddr,
    mode: &str,
    bytes: u64,
) {
    let line = proxy.wait_for_log(&format!("client={client} "), LOG_LIMIT);
    // A pipe is not a terminal: no colour codes, with or without NO_COLOR.
    assert!(!line.contains('\x1b'), "colour codes in {line:?}");
    for field in [
        "route=hello".to_owned(),
        format!("backend={backend}"),
        format!("mode=\"{mode}\""),
        format!("bytes_up={bytes}"),
        format!("bytes_down={bytes}"),
    ] {
        assert!(line.contains(&field), "no {field} in {line:?}");
    }
}

/// The binary as root with `--mode mode` in front of `backend`, once it says it listens
/// and moves bytes as `moves` ("splice" or "copy"); then one echo exchange of `len`
/// bytes (seeded by `seed`), checked by hash and by its access-log line. The connection
/// is spliced right after its first message (`--splice-after 0s`): a short exchange is
/// otherwise copied.
fn proxy_and_log(name: &str, mode: &str, moves: &str, len: usize, seed: u64) -> ProxyProcess {
    let backend = Backend::echo();
    let routes = echo_routes(name, backend.addr);
    let proxy = ProxyProcess::start(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
        "--mode",
        mode,
        "--splice-after",
        "0s",
    ]);
    proxy.wait_for_log(&format!("({moves} mode"), LOG_LIMIT);
    let (client, bytes) = echo_exchange(proxy.addr(), len, seed);
    check_log(&proxy, client, backend.addr, moves, bytes);
    proxy
}

#[test]
fn splice_mode_proxies_and_logs_each_connection() {
    proxy_and_log("cli-splice", "splice", "splice", 4 << 20, 1);
}

#[test]
fn copy_mode_proxies_and_logs_copy() {
    proxy_and_log("cli-copy", "copy", "copy", 4 << 20, 2);
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: all zeroes is an empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size is `set`'s, which the call fills.
    let rc = unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) };
    assert_eq!(
        rc,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// The first CPU the calling thread may run on.
fn first_cpu() -> usize {
    allowed_cpus()[0]
}

/// Runs thread `tid` (0: the calling thread) on `cpu` only.
fn pin(tid: libc::pid_t, cpu: usize) {
    // SAFETY: all zeroes is an empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from allowed_cpus, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the size is `set`'s.
    let rc = unsafe { libc::sched_setaffinity(tid, size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity({tid}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs the calling thread on one CPU only, the first it may run on.
fn pin_to_one_cpu() {
    pin(0, first_cpu());
}

/// Makes the calling thread real-time (SCHED_FIFO): no ordinary thread runs on its CPU
/// until it blocks or calls [`ordinary`]. How the tests hold a worker off its CPU.
fn real_time() {
    set_policy(libc::SCHED_FIFO, 1);
}

/// Makes the calling thread an ordinary one again.
fn ordinary() {
    set_policy(libc::SCHED_OTHER, 0);
}

fn set_policy(policy: libc::c_int, priority: libc::c_int) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param; 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler({policy}): {}",
        std::io::Error::last_os_error()
    );
}

/// The process `pid`'s worker threads (`splice-N`): name, thread id, and the times each
/// has slept and been woken.
fn workers(pid: u32) -> Vec<(String, libc::pid_t, u64)> {
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .unwrap_or_default()
        };
        let name = field("Name:");
        if name
            .strip_prefix("splice-")
            .is_some_and(|index| index.parse::<usize>().is_ok())
        {
            let tid = task.file_name().to_str().unwrap().parse().unwrap();
            let switches = field("voluntary_ctxt_switches:").parse().unwrap();
            workers.push((name, tid, switches));
        }
    }
    workers.sort();
    workers
}

/// The process `pid`'s `count` workers, once each has named its thread: a thread takes
/// its name once it runs, which can be after the proxy logs that it listens.
fn wait_for_workers(pid: u32, count: usize) -> Vec<(String, libc::pid_t, u64)> {
    let deadline = Instant::now() + LOG_LIMIT;
    loop {
        let workers = workers(pid);
        if workers.len() == count {
            return workers;
        }
        assert!(
            Instant::now() < deadline,
            "after {LOG_LIMIT:?}, {} workers named: {workers:?}",
            workers.len()
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// The steering tests' option: each connection copied for the command's default 100 ms,
/// as users run it (`ProxyProcess::serve` splices at once unless told). They give no
/// `--steering`: splicing, the default steers by CPU.
const AS_USERS_RUN_IT: [&str; 2] = ["--splice-after", "100ms"];

/// Splicing, connections are steered by CPU by default: those of a client on one CPU all
/// go to one worker, and every one is served; from clients on any CPU, every one is
/// served too. The listener each CPU's connections reach is the server module's unit
/// test.
#[test]
fn steered_by_cpu_every_connection_is_served() {
    let backend = Backend::echo();
    let routes = echo_routes("cli-steer", backend.addr);
    let proxy = ProxyProcess::serve(&routes, "splice", &AS_USERS_RUN_IT);
    proxy.wait_for_log(", connections steered by CPU)", LOG_LIMIT);
    let addr = proxy.addr();

    // Each connection wakes its worker several times (accept, the first message, the
    // echo, the closes); the other worker wakes about once a second for its sweep.
    let pid = proxy.child.id();
    let before = wait_for_workers(pid, 2);
    thread::spawn(move || {
        pin_to_one_cpu();
        for exchange in 0..200 {
            echo_exchange(addr, 16, exchange);
        }
    })
    .join()
    .unwrap();
    let after = workers(pid);
    let mut woken: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|((_, _, now), (_, _, then))| now - then)
        .collect();
    woken.sort();
    assert!(
        woken.len() == 2 && woken[1] >= 200 && woken[1] >= 10 * woken[0],
        "200 connections from one CPU woke the workers {before:?} -> {after:?}"
    );

    let clients: Vec<_> = (0..4)
        .map(|client| {
            thread::spawn(move || {
                for exchange in 0..8 {
                    echo_exchange(addr, 64 << 10, 100 + client * 8 + exchange);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

/// Steered by CPU, a worker that falls behind on its listener gets help: the other
/// worker accepts from its queue too, and every connection is served. To fall behind on
/// demand, the client runs as a real-time thread on the CPU of the worker its
/// connections go to, with that worker pinned there: it opens all its connections
/// before the worker can run, so they all wait in the worker's queue.
#[test]
fn steered_by_cpu_a_worker_that_falls_behind_gets_help() {
    const CONNECTIONS: usize = 200;
    let message = |index: usize| format!("HELLO {index:>5}\n").into_bytes();
    let backend = Backend::echo();
    let routes = echo_routes("cli-help", backend.addr);
    let proxy = ProxyProcess::serve(
        &routes,
        "splice",
        &[AS_USERS_RUN_IT.as_slice(), &["--metrics", "127.0.0.1:0"]].concat(),
    );
    let addr = proxy.addr();
    let metrics = proxy.metrics_addr();
    let cpu = first_cpu();
    let (_, owner, _) = wait_for_workers(proxy.child.id(), 2)[cpu % 2];
    pin(owner, cpu);

    let clients = thread::spawn(move || {
        pin(0, cpu);
        real_time();
        // Loopback completes each handshake in this thread's connect, queueing the
        // connection, and its first message, without the worker.
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|index| {
                let mut client = connect(addr);
                client.write_all(&message(index)).unwrap();
                client
            })
            .collect();
        ordinary();
        clients
    })
    .join()
    .unwrap();
    for (index, mut client) in clients.into_iter().enumerate() {
        let mut echo = vec![0; message(index).len()];
        client.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message(index), "connection {index}");
    }

    let mut scrape = connect(metrics);
    scrape.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut exposition = String::new();
    scrape.read_to_string(&mut exposition).unwrap();
    let helped: u64 = exposition
        .lines()
        .find_map(|line| line.strip_prefix("splice_proxy_connections_accepted_helping_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no helping count in:\n{exposition}"));
    assert!(
        helped > 0 && helped < CONNECTIONS as u64,
        "{helped} of {CONNECTIONS} connections queued on one worker were accepted by the other"
    );
}

/// Connections waiting in the accept queues of the listeners on `port`: a listening
/// socket's `rx_queue` in /proc/net/tcp is its accept queue's length.
fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let queue = usize::from_str_radix(fields.get(4)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && fields.get(3)? == &"0A").then_some(queue)
        })
        .sum()
}

/// A flood of connects does not hold up the connections a worker already serves: it
/// accepts a batch per pass of its loop, then turns to its other events. A real-time
/// client holding the worker's CPU (with both workers pinned there, so that the help
/// adds no CPU) opens a flood of connections that only close, then resets a copied
/// connection the worker serves. The access log, written by the worker in the order it
/// did things, must show that connection's end before a quarter or more of what was
/// queued then: 252-425 of 488-561 in 8 runs, and 0 or 1 when a worker accepted until
/// its queue was empty. Where the client cannot hold the worker off (the kernel
/// matrix's emulated guests), it has nothing to check.
#[test]
fn a_flood_of_connects_does_not_hold_up_a_workers_connections() {
    const CONNECTIONS: usize = 1500;
    let [cpu, other, ..] = allowed_cpus()[..] else {
        panic!("this test needs two CPUs: {:?}", allowed_cpus());
    };
    // The backend's threads start from this one and keep its CPU: away from the
    // workers', where they would wait behind them.
    pin(0, other);
    let backend = Backend::echo();
    // No default route: a flood connection, which only closes, is refused as soon as
    // it is accepted and read, and logged then.
    let routes = routes_file("cli-flood", &prefix_routes("HELLO", &[backend.addr]));
    let proxy = ProxyProcess::serve(&routes, "copy", &["--steering", "cpu"]);
    proxy.wait_for_log(", connections steered by CPU)", LOG_LIMIT);
    let addr = proxy.addr();
    for (_, worker, _) in wait_for_workers(proxy.child.id(), 2) {
        pin(worker, cpu);
    }

    let (served, flood, queued) = thread::spawn(move || {
        pin(0, cpu);
        let mut served = connect(addr);
        served.write_all(b"HELLO flood\n").unwrap();
        let mut echo = [0; 12];
        served.read_exact(&mut echo).unwrap();
        real_time();
        let flood: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let client = connect(addr);
                client.shutdown(std::net::Shutdown::Write).unwrap();
                client
            })
            .collect();
        let queued = accept_queue(addr.port());
        // A reset ends the connection in the pass that sees it, with no round trip to
        // the backend.
        let served_from = served.local_addr().unwrap();
        socket2::SockRef::from(&served)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(served);
        ordinary();
        (served_from, flood, queued)
    })
    .join()
    .unwrap();
    if queued < 256 {
        // In the kernel matrix's emulated guests the client's connects let the worker
        // run (4 of 1,500 were queued on 6.1): no queue to test with there.
        eprintln!(
            "only {queued} of {CONNECTIONS} connects were queued: the worker was not held off, nothing to check"
        );
        return;
    }

    let served = format!("client={served} ");
    let flood: Vec<String> = flood
        .iter()
        .map(|client| format!("client={} ", client.local_addr().unwrap()))
        .collect();
    let deadline = Instant::now() + LOG_LIMIT;
    while proxy.log_lines("no_route").len() < CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "after {LOG_LIMIT:?}, {} of {CONNECTIONS} flood connections logged",
            proxy.log_lines("no_route").len()
        );
        thread::sleep(Duration::from_millis(10));
    }
    proxy.wait_for_log(&served, LOG_LIMIT);
    let lines = proxy.log_lines("client=");
    let at = lines
        .iter()
        .position(|line| line.contains(&served))
        .unwrap();
    let after = lines[at..]
        .iter()
        .filter(|line| flood.iter().any(|client| line.contains(client.as_str())))
        .count();
    assert!(
        after >= queued / 4,
        "{queued} connects were queued when a served connection was reset, and only {after} were logged after it"
    );
}

/// The binary as user nobody with no capabilities. nobody must be able to reach and run
/// it: if some directory above it is closed to others, it runs from a copy in a
/// world-readable temporary directory.
fn unprivileged(args: &[&str]) -> Command {
    let binary = Path::new(binary());
    let open_to_others = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005)
    };
    let program = if binary.ancestors().skip(1).all(open_to_others) && open_to_others(binary) {
        binary.to_owned()
    } else {
        let dir = std::env::temp_dir().join(format!("splice-proxy-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("splice-proxy");
        if !copy.exists() {
            std::fs::copy(binary, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    };
    let mut command = external("setpriv", "util-linux");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(program)
        .args(args);
    command
}

#[test]
fn splice_mode_without_privileges_exits_with_the_reason() {
    let routes = echo_routes("cli-nobody-splice", refused_addr());
    let mut proxy = ProxyProcess::spawn(&mut unprivileged(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
        "--mode",
        "splice",
    ]));
    let status = proxy.wait_exit(EXIT_LIMIT);
    let stderr = proxy.stderr();
    assert!(
        !status.success(),
        "it ran without privileges; stderr:\n{stderr}"
    );
    assert!(proxy.addr.is_none(), "it listened; stderr:\n{stderr}");
    for reason in [
        "--mode splice: the probe could not be loaded",
        "needs root, or CAP_BPF and CAP_NET_ADMIN",
    ] {
        assert!(stderr.contains(reason), "no {reason:?} in:\n{stderr}");
    }
}

#[test]
fn auto_mode_without_privileges_warns_once_and_copies() {
    let backend = Backend::echo();
    let routes = echo_routes("cli-nobody-auto", backend.addr);
    let proxy = ProxyProcess::spawn(&mut unprivileged(&[
        "--listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
        "--mode",
        "auto",
    ]));
    let addr = proxy.addr();
    // Copying, by hash: steered, a CPU that receives most connections would leave one
    // worker copying every stream.
    proxy.wait_for_log("(copy mode", LOG_LIMIT);
    proxy.wait_for_log(", connections spread by hash)", LOG_LIMIT);
    for seed in 0..3 {
        let (client, bytes) = echo_exchange(addr, 1 << 20, 10 + seed);
        check_log(&proxy, client, backend.addr, "copy", bytes);
    }
    let warnings = proxy.log_lines("the probe could not be loaded");
    assert_eq!(
        warnings.len(),
        1,
        "want one warning; stderr:\n{}",
        proxy.stderr()
    );
    assert!(warnings[0].contains("WARN"), "{warnings:?}");
}

/// `--mode auto` as root splices only on a kernel where the bound on a spliced direction
/// is tested (6.1 on); on an older one it says why in one line and copies every
/// connection. The kernel matrix (scripts/test-kernels) runs this on both kinds. Its
/// connections are steered by CPU where it splices, spread by hash where it copies.
#[test]
fn auto_mode_splices_only_where_the_bound_is_tested() {
    let release = splice_proxy::probe::kernel_release().expect("/proc/sys/kernel/osrelease");
    let tested = splice_proxy::probe::bound_is_tested_on(&release);
    let moves = if tested { "splice" } else { "copy" };
    let proxy = proxy_and_log("cli-auto", "auto", moves, 1 << 20, 20);
    let steering = if tested {
        "steered by CPU"
    } else {
        "spread by hash"
    };
    proxy.wait_for_log(&format!(", connections {steering})"), LOG_LIMIT);
    let warnings = proxy.log_lines(&format!("kernel {release}: the bound"));
    let want = if tested { 0 } else { 1 };
    assert_eq!(
        warnings.len(),
        want,
        "kernel {release}: want {want} warning; stderr:\n{}",
        proxy.stderr()
    );
}
