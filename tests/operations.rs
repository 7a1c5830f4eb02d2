//! What an operator sees of the running binary: the metrics, scraped with curl and
//! checked against known traffic (the byte counters equal the bytes sent, the probe's
//! counters rise by what it redirected), and the access log, whose JSON form is one
//! object per line with every field. Every transfer is checked by hash; every wait is
//! bounded.

mod support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use support::*;

const LOG_LIMIT: Duration = Duration::from_secs(10);
const FIRST: &[u8] = b"HELLO proxy\n";

/// Routes: "hello" to `echo`; "dead" (first messages starting with DEAD) to an address
/// where nothing listens; anything else matches nothing.
fn routes(name: &str, echo: SocketAddr, dead: SocketAddr) -> PathBuf {
    routes_file(
        name,
        &format!(
            "connect_timeout = \"2s\"\n\n\
             [[route]]\nname = \"hello\"\nprefix = \"HELLO\"\nbackends = [\"{echo}\"]\n\n\
             [[route]]\nname = \"dead\"\nprefix = \"DEAD\"\nbackends = [\"{dead}\"]\n"
        ),
    )
}

/// The first message, its echo (after which the engine owns the connection: the client
/// is not streaming at the hand-off, so a splicing proxy splices it), then `len` bytes
/// both ways, checked by hash. Returns the client's address and the bytes it sent.
fn echo_exchange(proxy: SocketAddr, len: usize, seed: u64) -> (SocketAddr, u64) {
    let mut client = connect(proxy);
    client.write_all(FIRST).unwrap();
    assert_eq!(read_exactly(&mut client, FIRST.len()).unwrap(), FIRST);
    let data = Arc::new(payload(len, seed));
    let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (len as u64, sha256(&data)), "echo of {len} bytes");
    (client.local_addr().unwrap(), (FIRST.len() + len) as u64)
}

/// Sends `first` and expects the proxy to close without a byte; returns the client's
/// address.
fn closed_without_reply(proxy: SocketAddr, first: &[u8]) -> SocketAddr {
    let mut client = connect(proxy);
    client.write_all(first).unwrap();
    let mut rest = Vec::new();
    // A close with unread bytes may come as a reset: either way, nothing arrives.
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the proxy answered {rest:?}");
    client.local_addr().unwrap()
}

/// One scrape of /metrics: every sample line, as (name with labels, value).
struct Scrape {
    text: String,
    samples: Vec<(String, f64)>,
}

impl Scrape {
    fn get(addr: SocketAddr) -> Scrape {
        let output = output_within(
            external("curl", "curl").args([
                "-sS",
                "--fail",
                "--max-time",
                "10",
                &format!("http://{addr}/metrics"),
            ]),
            Duration::from_secs(15),
        );
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("metrics are UTF-8");
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample: {line:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {line:?}"));
                (series.to_owned(), value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// The sum of the samples of `name` that carry every one of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
                series_name == name
                    && labels
                        .iter()
                        .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples
            .iter()
            .any(|(series, _)| series.split_once('{').map_or(series.as_str(), |(n, _)| n) == name)
    }
}

/// Scrapes until `done` holds (bounded): counters at close move just after the client
/// saw the close.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + LOG_LIMIT;
    loop {
        let scrape = Scrape::get(addr);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {LOG_LIMIT:?}; last scrape:\n{}",
            scrape.text
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_count_known_spliced_traffic() {
    let echo = Backend::echo();
    let dead = refused_addr();
    let routes = routes("ops-metrics-splice", echo.addr, dead);
    let proxy = ProxyProcess::serve(&routes, "splice", &["--metrics", "127.0.0.1:0"]);
    let metrics = proxy.metrics_addr();
    let before = Scrape::get(metrics);
    assert_eq!(before.sum("splice_proxy_redirected_bytes_total", &[]), 0.0);

    let sizes = [0, 1, 100_000, 1 << 20, 3 << 20];
    let mut sent = 0;
    for (seed, len) in sizes.into_iter().enumerate() {
        sent += echo_exchange(proxy.addr(), len, seed as u64).1;
    }
    closed_without_reply(proxy.addr(), b"NOPE");
    closed_without_reply(proxy.addr(), b"DEAD beef");
    let served = sizes.len() as f64;

    let hello = [("route", "hello")];
    let scrape = scrape_until(metrics, "every connection closed and counted", |s| {
        s.sum("splice_proxy_connections_accepted_total", &[]) == served + 2.0
            && s.sum("splice_proxy_connections_routing", &[]) == 0.0
            && s.sum("splice_proxy_connections_active", &[]) == 0.0
            && s.sum("splice_proxy_transferred_bytes_total", &hello) == 2.0 * sent as f64
    });
    let backend = echo.addr.to_string();
    let dead = dead.to_string();
    let expect = [
        (
            "splice_proxy_connections_total",
            vec![
                ("route", "hello"),
                ("backend", backend.as_str()),
                ("mode", "splice"),
            ],
            served,
        ),
        (
            "splice_proxy_connections_total",
            vec![("mode", "copy")],
            0.0,
        ),
        (
            "splice_proxy_transferred_bytes_total",
            vec![("route", "hello"), ("direction", "up")],
            sent as f64,
        ),
        (
            "splice_proxy_transferred_bytes_total",
            vec![("route", "hello"), ("direction", "down")],
            sent as f64,
        ),
        (
            "splice_proxy_connections_refused_total",
            vec![("reason", "no_route")],
            1.0,
        ),
        (
            "splice_proxy_connections_refused_total",
            vec![("reason", "no_backend")],
            1.0,
        ),
        ("splice_proxy_connections_refused_total", vec![], 2.0),
        (
            "splice_proxy_first_message_seconds_count",
            vec![],
            served + 2.0,
        ),
        (
            "splice_proxy_backend_connect_seconds_count",
            vec![("backend", backend.as_str())],
            served,
        ),
        (
            "splice_proxy_backend_connect_failures_total",
            vec![("backend", dead.as_str())],
            1.0,
        ),
        ("splice_proxy_redirect_failures_total", vec![], 0.0),
        ("splice_proxy_redirect_dropped_bytes_total", vec![], 0.0),
        ("splice_proxy_resent_bytes_passed_total", vec![], 0.0),
        ("splice_proxy_unsequenced_messages_total", vec![], 0.0),
    ];
    for (name, labels, value) in expect {
        assert_eq!(
            scrape.sum(name, &labels),
            value,
            "{name} {labels:?}; scrape:\n{}",
            scrape.text
        );
    }
    // The kernel took every byte after the first message: each payload both ways, and
    // the backend's echo of the first message.
    assert_eq!(
        spliced_bytes(&scrape),
        (2 * sent - sizes.len() as u64 * FIRST.len() as u64) as f64,
        "{}",
        scrape.text
    );
    for name in [
        "splice_proxy_connections_accepted",
        "splice_proxy_connections_routing",
        "splice_proxy_connections",
        "splice_proxy_connections_active",
        "splice_proxy_connections_refused",
        "splice_proxy_transferred_bytes",
        "splice_proxy_first_message_seconds",
        "splice_proxy_backend_connect_seconds",
        "splice_proxy_backend_connect_failures",
        "splice_proxy_redirected_bytes",
        "splice_proxy_redirected_messages",
        "splice_proxy_redirect_failures",
        "splice_proxy_redirect_dropped_bytes",
        "splice_proxy_resent_bytes_cut",
        "splice_proxy_resent_bytes_passed",
        "splice_proxy_unsequenced_messages",
    ] {
        assert!(
            scrape.text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{}",
            scrape.text
        );
    }
}

#[test]
fn metrics_label_copied_connections_and_serve_only_get_metrics() {
    let echo = Backend::echo();
    let routes = routes("ops-metrics-copy", echo.addr, refused_addr());
    let proxy = ProxyProcess::serve(&routes, "copy", &["--metrics", "127.0.0.1:0"]);
    let metrics = proxy.metrics_addr();
    let (_, sent) = echo_exchange(proxy.addr(), 2 << 20, 7);
    let scrape = scrape_until(metrics, "the connection closed and counted", |s| {
        s.sum("splice_proxy_transferred_bytes_total", &[]) == 2.0 * sent as f64
    });
    let backend = echo.addr.to_string();
    let labels = [
        ("route", "hello"),
        ("backend", backend.as_str()),
        ("mode", "copy"),
    ];
    assert_eq!(scrape.sum("splice_proxy_connections_total", &labels), 1.0);
    assert_eq!(scrape.sum("splice_proxy_connections_active", &labels), 0.0);
    assert!(
        !scrape.has("splice_proxy_redirected_bytes_total"),
        "no probe, no probe counters:\n{}",
        scrape.text
    );

    let status = |args: &[&str]| {
        let output = output_within(
            external("curl", "curl")
                .args([
                    "-sS",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{content_type}",
                ])
                .args(args),
            Duration::from_secs(15),
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        status(&[&format!("http://{metrics}/metrics")]),
        "200 application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(status(&[&format!("http://{metrics}/")]).starts_with("404 "));
    assert!(status(&["-X", "POST", &format!("http://{metrics}/metrics")]).starts_with("405 "));
}

/// The JSON access-log line of the connection from `client` (bounded wait).
fn access_line(proxy: &ProxyProcess, client: SocketAddr) -> serde_json::Value {
    let needle = format!("\"client\":\"{client}\"");
    let deadline = Instant::now() + LOG_LIMIT;
    loop {
        let lines = proxy.log_lines(&needle);
        if let Some(line) = lines.iter().find(|line| line.contains("\"end\":")) {
            return serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {client} within {LOG_LIMIT:?}; stderr:\n{}",
            proxy.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn json_log_is_one_object_per_line_with_every_access_field() {
    let echo = Backend::echo();
    let dead = refused_addr();
    let routes = routes("ops-json", echo.addr, dead);
    let mut proxy = ProxyProcess::serve(&routes, "splice", &["--log-format", "json"]);
    let (client, sent) = echo_exchange(proxy.addr(), 1 << 20, 3);
    let unrouted = closed_without_reply(proxy.addr(), b"NOPE");
    let unconnected = closed_without_reply(proxy.addr(), b"DEAD beef");

    let line = access_line(&proxy, client);
    let backend = echo.addr.to_string();
    for (field, value) in [
        ("message", serde_json::json!("connection")),
        ("level", serde_json::json!("INFO")),
        ("route", serde_json::json!("hello")),
        ("backend", serde_json::json!(backend)),
        ("mode", serde_json::json!("splice")),
        ("bytes_up", serde_json::json!(sent)),
        ("bytes_down", serde_json::json!(sent)),
        ("end", serde_json::json!("closed")),
    ] {
        assert_eq!(line[field], value, "{field} in {line}");
    }
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );
    assert!(line["timestamp"].is_string(), "{line}");

    let line = access_line(&proxy, unrouted);
    assert_eq!(line["end"], "no_route", "{line}");
    assert_eq!(line["bytes_up"], 4, "{line}");
    assert!(line.get("route").is_none(), "{line}");
    let line = access_line(&proxy, unconnected);
    assert_eq!(line["end"], "no_backend", "{line}");
    assert_eq!(line["route"], "dead", "{line}");
    assert_eq!(line["level"], "WARN", "{line}");

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(LOG_LIMIT).success());
    let stderr = proxy.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 6, "{stderr}");
    let mut messages = BTreeMap::new();
    for line in lines {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {line:?}"));
        assert!(object.is_object(), "{line}");
        *messages
            .entry(object["message"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(messages.get("shutdown complete"), Some(&1), "{messages:?}");
}

#[test]
fn json_log_escapes_c1_controls_and_unicode_line_breaks_from_clients() {
    let echo = Backend::echo();
    let routes = routes_file(
        "ops-json-escapes",
        &format!(
            "[[route]]\nname = \"web\"\nhttp_host = \"b.example.com\"\nbackends = [\"{}\"]\n",
            echo.addr
        ),
    );
    let routes = routes.to_str().expect("routes path is UTF-8");
    let mut proxy = ProxyProcess::spawn(
        Command::new(binary())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--routes",
                routes,
                "--mode",
                "copy",
            ])
            .args(["--workers", "1", "--log-format", "json"])
            .env("RUST_LOG", "debug"),
    );
    // A Host with CSI (U+009B, what ESC [ is to a terminal), NEL (U+0085) and the line
    // separator U+2028, which the HTTP parser takes as obs-text: logged at debug level.
    let host = "evil\u{9b}2J\u{85}x\u{2028}y";
    let client = closed_without_reply(
        proxy.addr(),
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
    );
    access_line(&proxy, client);
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(LOG_LIMIT).success());

    let stderr = proxy.stderr();
    let mut hosts = Vec::new();
    for line in stderr.lines() {
        assert!(
            !line.contains(['\u{9b}', '\u{85}', '\u{2028}']),
            "a raw control or line break in {line:?}"
        );
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {line:?}"));
        if let Some(logged) = object.get("host") {
            hosts.push(logged.clone());
        }
    }
    // Escaped, not replaced: the JSON reader gets the very value.
    assert_eq!(hosts, [serde_json::json!(host)], "{stderr}");
}

/// The numeric id of `name` in /etc/passwd or /etc/group.
fn id_of(file: &str, name: &str) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name)).then(|| fields.nth(1).unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in {file}"))
}

/// A routes file that user nobody can read, for SIGHUP.
fn readable_by_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Whether this kernel refuses bpf() to a process without CAP_BPF, on maps it already
/// holds too: before 5.11, while unprivileged BPF is disabled (Debian's default). There
/// the proxy cannot splice after `--user`.
fn bpf_needs_capabilities() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .is_ok_and(|value| value.trim() != "0");
    kernel_before_5_11() && disabled
}

/// Kernels before 5.11 also charge BPF maps to RLIMIT_MEMLOCK (the unit's LimitMEMLOCK).
fn kernel_before_5_11() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) < (5, 11)
}

/// On such a kernel, `--mode splice --user` exits at start with one line that says why.
fn assert_refuses_to_splice_as_user(mut proxy: ProxyProcess) {
    let status = proxy.wait_exit(LOG_LIMIT);
    assert!(!status.success(), "{}", proxy.stderr());
    assert_eq!(
        proxy.log_lines("cannot splice after dropping them").len(),
        1,
        "{}",
        proxy.stderr()
    );
}

#[test]
fn user_nobody_keeps_splicing_with_no_capabilities_left() {
    let echo = Backend::echo();
    let routes = routes("ops-user", echo.addr, refused_addr());
    readable_by_all(&routes);
    let extra = [
        "--user",
        "nobody",
        "--group",
        "nogroup",
        "--metrics",
        "127.0.0.1:0",
    ];
    if bpf_needs_capabilities() {
        return assert_refuses_to_splice_as_user(ProxyProcess::launch(&routes, "splice", &extra));
    }
    let proxy = ProxyProcess::serve(&routes, "splice", &extra);
    proxy.wait_for_log("running as nobody:nogroup", LOG_LIMIT);
    let metrics = proxy.metrics_addr();
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if wmem_max < splice_proxy::splice::SPLICED_SEND_BUFFER {
        proxy.wait_for_log("sysctl net.core.wmem_max=16777216 restores them", LOG_LIMIT);
    }

    // Every thread, the ones started before the switch included.
    let (uid, gid) = (
        id_of("/etc/passwd", "nobody"),
        id_of("/etc/group", "nogroup"),
    );
    let pid = proxy.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() > 1, "only {} threads", tasks.len());
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .trim()
                .to_owned()
        };
        assert_eq!(field("Uid"), [uid.as_str(); 4].join("\t"), "{status}");
        assert_eq!(field("Gid"), [gid.as_str(); 4].join("\t"), "{status}");
        assert_eq!(field("Groups"), "", "{status}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(caps), "0000000000000000", "{caps} in {status}");
        }
        assert_eq!(field("NoNewPrivs"), "1", "{status}");
    }

    // The map fds opened as root still splice: the probe counts every byte after the
    // first message (each payload both ways, and the echo of the first message).
    let sizes = [1 << 20, 4 << 20];
    let mut sent = 0;
    for (seed, len) in sizes.into_iter().enumerate() {
        sent += echo_exchange(proxy.addr(), len, 20 + seed as u64).1;
    }
    let redirected = 2 * sent - sizes.len() as u64 * FIRST.len() as u64;
    let scrape = scrape_until(metrics, "both connections closed", |s| {
        s.sum("splice_proxy_transferred_bytes_total", &[]) == 2.0 * sent as f64
    });
    assert_eq!(
        scrape.sum("splice_proxy_connections_total", &[("mode", "splice")]),
        sizes.len() as f64,
        "{}",
        scrape.text
    );
    assert_eq!(spliced_bytes(&scrape), redirected as f64, "{}", scrape.text);

    // SIGHUP re-reads the file as nobody.
    let mut text = std::fs::read_to_string(&routes).unwrap();
    text.push_str(&format!(
        "\n[[route]]\nname = \"again\"\nprefix = \"AGAIN\"\nbackends = [\"{}\"]\n",
        echo.addr
    ));
    std::fs::write(&routes, text).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("reloaded 3 routes", LOG_LIMIT);
    echo_exchange(proxy.addr(), 1 << 20, 30);
}

#[test]
fn an_unknown_user_is_named() {
    let routes = routes("ops-no-user", refused_addr(), refused_addr());
    let output = output_within(
        Command::new(binary()).args([
            "--listen",
            "127.0.0.1:0",
            "--routes",
            routes.to_str().unwrap(),
            "--mode",
            "copy",
            "--user",
            "no-such-user-here",
        ]),
        LOG_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--user no-such-user-here: no user named \"no-such-user-here\""),
        "{stderr}"
    );
}

/// examples/splice-proxy.service, with its ExecStart binary replaced by the one under test.
fn systemd_unit() -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/splice-proxy.service"),
    )
    .unwrap();
    unit.replace("/usr/local/bin/splice-proxy", binary())
}

/// The value of `key=` in the unit (the last one wins, as in systemd).
fn unit_setting(unit: &str, key: &str) -> String {
    unit.lines()
        .filter_map(|line| line.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

/// systemd is not PID 1 here, so the unit cannot run: systemd-analyze checks it, and the
/// binary runs the way the unit starts it (as root with the unit's bounding set, no new
/// privileges, then --user) and must splice.
#[test]
fn the_systemd_unit_is_valid_and_its_capabilities_suffice() {
    let unit = systemd_unit();
    let dir = std::env::temp_dir().join(format!("splice-proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("splice-proxy.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = output_within(
        external("systemd-analyze", "systemd")
            .arg("verify")
            .arg(&path),
        Duration::from_secs(30),
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let shutdown_grace = humantime::parse_duration(
        unit.split("--shutdown-grace ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("ExecStart sets --shutdown-grace"),
    )
    .unwrap();
    let stop_timeout = humantime::parse_duration(&unit_setting(&unit, "TimeoutStopSec")).unwrap();
    assert!(
        stop_timeout > shutdown_grace + Duration::from_secs(1),
        "TimeoutStopSec {stop_timeout:?} must leave the drain of {shutdown_grace:?} time to end"
    );
    assert_eq!(unit_setting(&unit, "KillSignal"), "SIGTERM");
    assert_eq!(unit_setting(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit_setting(&unit, "NoNewPrivileges"), "yes");

    // setpriv names capabilities without CAP_, in lower case.
    let bounding: Vec<String> = unit_setting(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let echo = Backend::echo();
    let routes = routes("ops-unit", echo.addr, refused_addr());
    readable_by_all(&routes);
    // The unit's LimitMEMLOCK, which only kernels before 5.11 look at: raising it needs
    // CAP_SYS_RESOURCE, which the test may not have where it does not matter.
    let mut command = if kernel_before_5_11() {
        let limit = match unit_setting(&unit, "LimitMEMLOCK").as_str() {
            "infinity" => "unlimited".to_owned(),
            bytes => bytes.to_owned(),
        };
        let mut prlimit = external("prlimit", "util-linux");
        let setpriv = external("setpriv", "util-linux");
        prlimit
            .arg(format!("--memlock={limit}:{limit}"))
            .arg(setpriv.get_program());
        prlimit
    } else {
        external("setpriv", "util-linux")
    };
    let proxy = ProxyProcess::spawn(
        command
            .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
            .args(["--inh-caps=-all", "--no-new-privs"])
            .arg(binary())
            .args(["--listen", "127.0.0.1:0", "--routes"])
            .arg(&routes)
            .args([
                "--mode",
                "splice",
                "--splice-after",
                "0s",
                "--metrics",
                "127.0.0.1:0",
                "--user",
                "nobody",
            ]),
    );
    if bpf_needs_capabilities() {
        return assert_refuses_to_splice_as_user(proxy);
    }
    proxy.addr();
    proxy.wait_for_log("running as nobody", LOG_LIMIT);
    let metrics = proxy.metrics_addr();
    let (_, sent) = echo_exchange(proxy.addr(), 2 << 20, 40);
    let scrape = scrape_until(metrics, "the connection closed", |s| {
        s.sum("splice_proxy_transferred_bytes_total", &[]) == 2.0 * sent as f64
    });
    assert_eq!(
        spliced_bytes(&scrape),
        (2 * sent - FIRST.len() as u64) as f64,
        "{}",
        scrape.text
    );
}

#[test]
fn metrics_show_each_backends_health_and_connections() {
    let echo = Backend::echo();
    let dead = refused_addr();
    let routes = routes_file(
        "ops-health",
        &format!(
            "health_interval = \"100ms\"\nhealth_fails = 2\n\n\
             [[route]]\nname = \"hello\"\nprefix = \"HELLO\"\nbackends = [\"{}\", \"{dead}\"]\n\n\
             [[route]]\nname = \"unchecked\"\nprefix = \"PLAIN\"\nhealth_interval = \"0s\"\n\
             backends = [\"{}\"]\n",
            echo.addr,
            refused_addr()
        ),
    );
    let proxy = ProxyProcess::serve(&routes, "splice", &["--metrics", "127.0.0.1:0"]);
    let metrics = proxy.metrics_addr();
    let (echo, dead) = (echo.addr.to_string(), dead.to_string());
    let scrape = scrape_until(metrics, "the dead backend down", |s| {
        s.sum("splice_proxy_backend_up", &[("backend", &dead)]) == 0.0
            && s.has("splice_proxy_backend_up")
    });
    assert_eq!(
        scrape.sum("splice_proxy_backend_up", &[("backend", &echo)]),
        1.0
    );
    assert_eq!(
        scrape.sum("splice_proxy_backend_health_checked", &[("backend", &echo)]),
        1.0
    );
    assert_eq!(
        scrape.sum("splice_proxy_backend_health_checked", &[]),
        2.0,
        "{}",
        scrape.text
    );
    assert!(
        scrape.text.contains("# HELP splice_proxy_backend_up "),
        "{}",
        scrape.text
    );

    // A held connection shows in the backend's count, and leaves it when it closes.
    let mut held = connect(proxy.addr());
    held.write_all(FIRST).unwrap();
    assert_eq!(read_exactly(&mut held, FIRST.len()).unwrap(), FIRST);
    scrape_until(metrics, "one connection to the live backend", |s| {
        s.sum("splice_proxy_backend_connections", &[("backend", &echo)]) == 1.0
    });
    drop(held);
    scrape_until(metrics, "no connection to the live backend", |s| {
        s.sum("splice_proxy_backend_connections", &[("backend", &echo)]) == 0.0
    });
}

/// Every accepted connection gets its access line, even one whose client reset before
/// the proxy read a byte: the proxy is stopped while the clients connect and reset, so
/// that it accepts them already closed. The kernel keeps no peer address for a closed
/// socket, but accept gives the one it had, so each line still names its client.
#[test]
fn a_client_reset_before_it_was_read_still_gets_a_line() {
    const CLIENTS: usize = 5;
    let echo = Backend::echo();
    let routes = routes("ops-gone", echo.addr, refused_addr());
    let proxy = ProxyProcess::serve(&routes, "splice", &["--log-format", "json"]);
    proxy.signal(libc::SIGSTOP);
    let mut clients: Vec<String> = (0..CLIENTS)
        .map(|_| {
            let client = connect(proxy.addr());
            let addr = client.local_addr().unwrap().to_string();
            close_with_reset(client);
            addr
        })
        .collect();
    proxy.signal(libc::SIGCONT);
    let deadline = Instant::now() + LOG_LIMIT;
    let lines = loop {
        let lines: Vec<serde_json::Value> = proxy
            .log_lines("\"end\":\"client_gone\"")
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        if lines.len() >= CLIENTS {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {CLIENTS} reset clients logged within {LOG_LIMIT:?}; stderr:\n{}",
            lines.len(),
            proxy.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(lines.len(), CLIENTS, "{lines:?}");
    let mut logged: Vec<String> = lines
        .iter()
        .map(|line| {
            let message = line["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with("connection: the client failed before a route was decided: ")
                    && message.ends_with("(os error 104)"),
                "{line}"
            );
            line["client"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    clients.sort();
    logged.sort();
    assert_eq!(logged, clients);
}

/// Bytes the probe took after the first messages: redirected, or parked for the engine
/// to copy because a direction ran out of credit (a reader slower than its sender).
fn spliced_bytes(scrape: &Scrape) -> f64 {
    scrape.sum("splice_proxy_redirected_bytes_total", &[])
        + scrape.sum("splice_proxy_parked_bytes_total", &[])
}
