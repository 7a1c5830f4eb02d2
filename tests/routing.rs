//! Routing on what a real client sends first, end to end and spliced: TLS clients
//! (`curl`, `openssl s_client`) reaching `openssl s_server` backends by SNI and ALPN with
//! the handshake completed through the sockmap, `curl` reaching HTTP backends by Host and
//! path, a ClientHello trickled in byte by byte, and garbled or truncated hellos that
//! match no TLS route while the proxy goes on serving. Then access control as README.md's
//! "Failing closed" sets it up: request heads and hellos the parsers refuse or never
//! finish go to the default route, or are reset with `on_unparsed = "reset"`, and the
//! spellings of /admin/ reach the /admin/ routes while the backend gets them as sent.
//!
//! Every child process is killed when its guard drops, and every wait is bounded.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use splice_proxy::route::Parsed;
use splice_proxy::route::tls::parse_client_hello;
use support::{
    Backend, IO_TIMEOUT, Proxy, SPLICE, external, free_addr, output_within, sha256, wait_listening,
};

const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "splice-proxy-routing-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `openssl s_server -WWW` on 127.0.0.1 with a fresh self-signed certificate for
/// `common_name`, serving `page.txt` (which holds `page`) from its own directory.
struct TlsBackend {
    addr: SocketAddr,
    _server: ChildGuard,
    _dir: TempDir,
}

impl TlsBackend {
    fn start(common_name: &str, page: &str) -> TlsBackend {
        let dir = TempDir::new(common_name);
        let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
        let output = output_within(
            external("openssl", "openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .arg("-subj")
                .arg(format!("/CN={common_name}"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            COMMAND_LIMIT,
        );
        assert!(
            output.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(dir.0.join("page.txt"), page).unwrap();

        let addr = free_addr();
        let server = ChildGuard(
            external("openssl", "openssl")
                .args(["s_server", "-WWW", "-accept", &addr.to_string()])
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .current_dir(&dir.0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn openssl s_server"),
        );
        wait_listening(addr);
        TlsBackend {
            addr,
            _server: server,
            _dir: dir,
        }
    }
}

/// `backends = ["a", "b"]` for a routes file.
fn backends_toml(backends: &[SocketAddr]) -> String {
    let quoted: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!("backends = [{}]", quoted.join(", "))
}

/// What `curl` printed (the body) and said on stderr (`-v`: the certificate subject).
struct Fetched {
    body: Vec<u8>,
    verbose: String,
}

/// `curl` for `url` with `args`; fails the test unless it succeeds.
fn curl(args: &[&str], url: &str) -> Fetched {
    let output = output_within(
        external("curl", "curl")
            .args(["-sS", "-v", "--max-time", "20"])
            .args(args)
            .arg(url),
        COMMAND_LIMIT,
    );
    let verbose = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "curl {args:?} {url}:\n{verbose}");
    Fetched {
        body: output.stdout,
        verbose,
    }
}

/// `curl -k https://HOST:PORT/page.txt` with HOST resolved to the proxy.
fn curl_tls(proxy: SocketAddr, host: &str, extra: &[&str]) -> Fetched {
    let port = proxy.port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let mut args = vec!["-k", "--resolve", &resolve];
    args.extend_from_slice(extra);
    curl(&args, &format!("https://{host}:{port}/page.txt"))
}

/// `openssl s_client` through the proxy with stdin closed: it completes the handshake,
/// prints the session and leaves. Returns what it printed.
fn s_client(proxy: SocketAddr, args: &[&str]) -> String {
    let output = output_within(
        external("openssl", "openssl")
            .args(["s_client", "-connect", &proxy.to_string()])
            .args(args),
        COMMAND_LIMIT,
    );
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "s_client {args:?}:\n{printed}");
    printed
}

/// The subject line of the server certificate `openssl s_client` printed.
fn subject(printed: &str) -> &str {
    printed
        .lines()
        .find(|line| line.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject in:\n{printed}"))
}

/// An HTTP/1.1 backend that answers every request with `name`, the request line and the
/// Host header it got, then closes.
fn http_backend(name: &'static str) -> Backend {
    Backend::start(move |mut stream| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head);
        let request_line = head.lines().next().unwrap_or_default();
        let host = (head.lines())
            .find_map(|line| line.strip_prefix("Host: "))
            .unwrap_or("-");
        let body = format!("{name}: {request_line} ({host})\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    })
}

/// A ClientHello a real client sends: `openssl s_client` connected to a listener here,
/// read until the hello is complete.
fn captured_client_hello(server_name: &str) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = ChildGuard(
        external("openssl", "openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(["-servername", server_name, "-alpn", "h2,http/1.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client"),
    );
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut hello = Vec::new();
    let mut buf = [0u8; 4096];
    while !matches!(parse_client_hello(&hello), Parsed::Done(_)) {
        let n = stream.read(&mut buf).expect("read the ClientHello");
        assert!(n > 0, "s_client closed before its ClientHello was complete");
        hello.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    drop(client);
    hello
}

/// Backends that record every connection's bytes, and the proxy's routes to them: "a"
/// for SNI a.example.com, "b" for *.b.example.com, and a default route.
struct Sinks {
    a: (Backend, std::sync::mpsc::Receiver<(u64, [u8; 32])>),
    b: (Backend, std::sync::mpsc::Receiver<(u64, [u8; 32])>),
    fallback: (Backend, std::sync::mpsc::Receiver<(u64, [u8; 32])>),
}

impl Sinks {
    fn start() -> Sinks {
        Sinks {
            a: Backend::sink(),
            b: Backend::sink(),
            fallback: Backend::sink(),
        }
    }

    fn routes(&self, top: &str, with_default: bool) -> String {
        let mut routes = format!(
            "{top}\n[[route]]\nname = \"a\"\nsni = \"a.example.com\"\n{}\n\
             [[route]]\nname = \"b\"\nsni = \"*.b.example.com\"\n{}\n",
            backends_toml(&[self.a.0.addr]),
            backends_toml(&[self.b.0.addr]),
        );
        if with_default {
            routes += &format!(
                "[[route]]\nname = \"fallback\"\ndefault = true\n{}\n",
                backends_toml(&[self.fallback.0.addr])
            );
        }
        routes
    }

    /// Asserts that exactly `sent` reached the backend of `route` on one connection, and
    /// nothing reached the others.
    #[track_caller]
    fn assert_only(&self, route: &str, sent: &[u8]) {
        let expected = (sent.len() as u64, sha256(sent));
        for (name, (backend, received)) in
            [("a", &self.a), ("b", &self.b), ("fallback", &self.fallback)]
        {
            if name == route {
                let got = received
                    .recv_timeout(IO_TIMEOUT)
                    .unwrap_or_else(|_| panic!("nothing reached {name}"));
                assert_eq!(got, expected, "what reached {name}");
            } else {
                assert!(
                    received.try_recv().is_err(),
                    "a connection reached {name} ({} accepted)",
                    backend.accepted()
                );
            }
        }
    }
}

/// Sends `bytes` through the proxy and half-closes, one byte per write (each its own
/// segment: TCP_NODELAY, and a pause) when `trickle`.
fn send(proxy: &Proxy, bytes: &[u8], trickle: bool) -> std::net::TcpStream {
    let mut stream = proxy.connect();
    stream.set_nodelay(true).unwrap();
    if trickle {
        for byte in bytes {
            stream.write_all(std::slice::from_ref(byte)).unwrap();
            thread::sleep(Duration::from_millis(2));
        }
    } else {
        stream.write_all(bytes).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    stream
}

#[test]
fn sni_and_alpn_reach_their_tls_backends_through_the_splice() {
    let a = TlsBackend::start("a.example.com", "backend a\n");
    let b = TlsBackend::start("b.example.com", "backend b\n");
    let proxy = Proxy::start(
        &format!(
            "[[route]]\nname = \"a\"\nsni = \"a.example.com\"\n{}\n\
             [[route]]\nname = \"wild\"\nsni = \"*.example.com\"\n{}\n\
             [[route]]\nname = \"h2-only\"\nalpn = [\"h2\"]\n{}\n\
             [[route]]\nname = \"h1\"\nalpn = [\"http/1.1\", \"http/1.0\"]\n{}\n",
            backends_toml(&[a.addr]),
            backends_toml(&[b.addr]),
            backends_toml(&[a.addr]),
            backends_toml(&[b.addr]),
        ),
        SPLICE,
    );
    let redirected_before = proxy.redirected_bytes();

    // curl: SNI from the URL's host, the whole HTTPS exchange spliced.
    for (host, page, common_name) in [
        ("a.example.com", "backend a\n", "CN=a.example.com"),
        ("A.Example.COM", "backend a\n", "CN=a.example.com"),
        ("b.example.com", "backend b\n", "CN=b.example.com"),
        ("deep.sub.example.com", "backend b\n", "CN=b.example.com"),
    ] {
        let fetched = curl_tls(proxy.addr, host, &[]);
        assert_eq!(fetched.body, page.as_bytes(), "{host}");
        assert!(
            fetched.verbose.contains(&format!("subject: {common_name}")),
            "{host}: {}",
            fetched.verbose
        );
    }

    // openssl s_client: by name, and without a name by ALPN.
    let printed = s_client(proxy.addr, &["-servername", "a.example.com"]);
    assert_eq!(subject(&printed), "subject=CN = a.example.com");
    let printed = s_client(proxy.addr, &["-servername", "x.example.com"]);
    assert_eq!(subject(&printed), "subject=CN = b.example.com");
    let printed = s_client(proxy.addr, &["-noservername", "-alpn", "h2"]);
    assert_eq!(subject(&printed), "subject=CN = a.example.com");
    let printed = s_client(proxy.addr, &["-noservername", "-alpn", "http/1.1"]);
    assert_eq!(subject(&printed), "subject=CN = b.example.com");
    // TLS 1.2 and 1.0 hellos route the same way (the handshake itself is the
    // backend's business: OpenSSL 3's default security level refuses TLS 1.0).
    let printed = s_client(proxy.addr, &["-servername", "a.example.com", "-tls1_2"]);
    assert_eq!(subject(&printed), "subject=CN = a.example.com");
    assert!(printed.contains("Protocol  : TLSv1.2"), "{printed}");

    // The handshakes after the ClientHello and the pages went through the kernel.
    assert!(
        proxy.redirected_bytes() > redirected_before,
        "nothing was spliced"
    );
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn http_host_and_path_prefix_reach_their_http_backends() {
    let api = http_backend("api");
    let web = http_backend("web");
    let fallback = http_backend("fallback");
    let proxy = Proxy::start(
        &format!(
            "[[route]]\nname = \"api\"\nhttp_path_prefix = \"/api/\"\n{}\n\
             [[route]]\nname = \"web\"\nhttp_host = \"b.example.com\"\n{}\n\
             [[route]]\nname = \"fallback\"\ndefault = true\n{}\n",
            backends_toml(&[api.addr]),
            backends_toml(&[web.addr]),
            backends_toml(&[fallback.addr]),
        ),
        SPLICE,
    );
    let port = proxy.addr.port();
    let via_proxy = |host: &str, path: &str| {
        let resolve = format!("{host}:{port}:127.0.0.1");
        curl(
            &["--resolve", &resolve],
            &format!("http://{host}:{port}{path}"),
        )
        .body
    };
    for (host, path, expected) in [
        (
            "b.example.com",
            "/",
            "web: GET / HTTP/1.1 (b.example.com:PORT)\n",
        ),
        (
            "B.EXAMPLE.com",
            "/index.html",
            "web: GET /index.html HTTP/1.1 (B.EXAMPLE.com:PORT)\n",
        ),
        (
            "b.example.com",
            "/api/v1?x=1",
            "api: GET /api/v1?x=1 HTTP/1.1 (b.example.com:PORT)\n",
        ),
        (
            "c.example.com",
            "/api/",
            "api: GET /api/ HTTP/1.1 (c.example.com:PORT)\n",
        ),
        (
            "c.example.com",
            "/",
            "fallback: GET / HTTP/1.1 (c.example.com:PORT)\n",
        ),
        (
            "c.example.com",
            "/apix",
            "fallback: GET /apix HTTP/1.1 (c.example.com:PORT)\n",
        ),
    ] {
        let expected = expected.replace("PORT", &port.to_string());
        assert_eq!(
            String::from_utf8(via_proxy(host, path)).unwrap(),
            expected,
            "{host}{path}"
        );
    }

    // Through the proxy as an HTTP proxy: the absolute-form target names the host.
    let fetched = curl(
        &["--proxy", &format!("http://{}", proxy.addr)],
        "http://b.example.com/x",
    );
    assert_eq!(
        fetched.body,
        b"web: GET http://b.example.com/x HTTP/1.1 (b.example.com)\n"
    );
    // HTTP/1.0 without a Host header: only the path can match.
    let fetched = curl(
        &["--http1.0", "-H", "Host:"],
        &format!("http://{}/api/z", proxy.addr),
    );
    assert_eq!(fetched.body, b"api: GET /api/z HTTP/1.0 (-)\n");
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn a_client_hello_trickled_byte_by_byte_routes_by_its_name() {
    let hello_b = captured_client_hello("www.b.example.com");
    let hello_a = captured_client_hello("a.example.com");
    let sinks = Sinks::start();
    let proxy = Proxy::start(&sinks.routes("", true), SPLICE);

    drop(send(&proxy, &hello_b, true));
    sinks.assert_only("b", &hello_b);
    drop(send(&proxy, &hello_a, true));
    sinks.assert_only("a", &hello_a);
    // And whole, with what a client sends after it.
    let mut more = hello_a.clone();
    more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
    drop(send(&proxy, &more, false));
    sinks.assert_only("a", &more);
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn garbled_and_truncated_hellos_match_no_tls_route() {
    let hello = captured_client_hello("a.example.com");
    let sinks = Sinks::start();
    let proxy = Proxy::start(
        &sinks.routes("first_message_timeout = \"500ms\"", true),
        SPLICE,
    );

    // Garbled: a handshake record whose message is not a ClientHello.
    let mut garbled = hello.clone();
    garbled[5] = 2;
    drop(send(&proxy, &garbled, false));
    sinks.assert_only("fallback", &garbled);
    // Garbled further in: a session id longer than the message.
    let mut garbled = hello.clone();
    garbled[43] = 0xff;
    drop(send(&proxy, &garbled, true));
    sinks.assert_only("fallback", &garbled);
    // Truncated, then the client half-closes.
    let truncated = &hello[..hello.len() / 2];
    drop(send(&proxy, truncated, false));
    sinks.assert_only("fallback", truncated);
    // Truncated, and the client waits: routed when first_message_timeout passes, and
    // the connection stays usable (the sink reads until the client's FIN).
    let mut waiting = proxy.connect();
    waiting.write_all(&hello[..100]).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    while sinks.fallback.0.accepted() < 4 {
        assert!(
            Instant::now() < deadline,
            "not routed after first_message_timeout"
        );
        thread::sleep(Duration::from_millis(10));
    }
    waiting.write_all(b"more").unwrap();
    waiting.shutdown(Shutdown::Write).unwrap();
    sinks.assert_only("fallback", &[&hello[..100], b"more"].concat());
    // Not TLS at all.
    let plain = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n";
    drop(send(&proxy, plain, false));
    sinks.assert_only("fallback", plain);

    // The proxy goes on serving good hellos.
    drop(send(&proxy, &hello, false));
    sinks.assert_only("a", &hello);
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn without_a_default_route_bad_hellos_are_closed_and_oversized_ones_never_match() {
    let hello = captured_client_hello("a.example.com");
    let sinks = Sinks::start();
    let strict = Proxy::start(&sinks.routes("", false), SPLICE);

    let mut garbled = hello.clone();
    garbled[5] = 2;
    let mut closed = send(&strict, &garbled, false);
    let mut rest = Vec::new();
    // Closed without a byte: EOF, or a reset if the garbage was still unread.
    let read = closed.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{read:?} {rest:?}");
    drop(send(&strict, &hello, false));
    sinks.assert_only("a", &hello);

    // A first_message_max smaller than the hello: it can never be read whole.
    let small = Proxy::start(&sinks.routes("first_message_max = 64", true), SPLICE);
    drop(send(&small, &hello, false));
    sinks.assert_only("fallback", &hello);

    // Many connections of garbage do not disturb the proxy: a record and handshake
    // header that agree, then a version that is not TLS and random bytes.
    let mut garbage_hello = vec![0x16, 0x03, 0x01, 0x01, 0x27, 0x01, 0x00, 0x01, 0x23, 0x7f];
    garbage_hello.extend_from_slice(&support::payload(290, 7));
    for _ in 0..20 {
        let mut stream = send(&strict, &garbage_hello, false);
        let _ = stream.read_to_end(&mut Vec::new());
    }
    drop(send(&strict, &hello, false));
    sinks.assert_only("a", &hello);
    strict.wait_idle(IO_TIMEOUT);
    small.wait_idle(IO_TIMEOUT);
}

/// The access-control table of README.md's "Failing closed": /admin/ for the admin host,
/// a deny route for anyone else's /admin/, a TLS route, and the public site as the
/// default; served by two proxies, one with `on_unparsed = "default"` and one with
/// `"reset"`. Small limits, so that a long or stalled head is quick to make.
struct AccessControl {
    admin: Backend,
    denied: Backend,
    tls: Backend,
    public: Backend,
    lenient: Proxy,
    strict: Proxy,
}

/// What became of one connection.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// A backend answered this (the body, when it is an HTTP response).
    Answer(String),
    /// The connection was reset.
    Reset,
}

impl AccessControl {
    fn start() -> AccessControl {
        let admin = http_backend("admin");
        let denied = http_backend("denied");
        let tls = http_backend("tls");
        let public = http_backend("public");
        let routes = |on_unparsed: &str| {
            format!(
                "first_message_max = 512\nfirst_message_timeout = \"300ms\"\n\
                 on_unparsed = \"{on_unparsed}\"\n\
                 [[route]]\nname = \"admin\"\nhttp_host = \"admin.example.com\"\n\
                 http_path_prefix = \"/admin/\"\n{}\n\
                 [[route]]\nname = \"denied\"\nhttp_path_prefix = \"/admin/\"\n{}\n\
                 [[route]]\nname = \"tls\"\nsni = \"a.example.com\"\n{}\n\
                 [[route]]\nname = \"public\"\ndefault = true\n{}\n",
                backends_toml(&[admin.addr]),
                backends_toml(&[denied.addr]),
                backends_toml(&[tls.addr]),
                backends_toml(&[public.addr]),
            )
        };
        AccessControl {
            lenient: Proxy::start(&routes("default"), SPLICE),
            strict: Proxy::start(&routes("reset"), SPLICE),
            admin,
            denied,
            tls,
            public,
        }
    }

    /// Connections each backend has accepted: admin, denied, tls, public.
    fn accepted(&self) -> [usize; 4] {
        [&self.admin, &self.denied, &self.tls, &self.public].map(Backend::accepted)
    }

    /// Sends `first`, then after `pause` `rest`, half-closes, and reads the answer.
    fn exchange(proxy: &Proxy, first: &[u8], pause: Duration, rest: &[u8]) -> Served {
        let mut stream = proxy.connect();
        // A reset that arrives while the client writes or waits is reported to the first
        // call after it, and only to that one: every call is asked.
        let was_reset = |result: std::io::Result<()>| {
            result.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        };
        let mut reset = was_reset(stream.write_all(first));
        thread::sleep(pause);
        reset |= stream.take_error().is_ok_and(|error| {
            error.is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        });
        reset |= was_reset(stream.write_all(rest));
        reset |= was_reset(stream.shutdown(Shutdown::Write));
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) if reset => Served::Reset,
            Ok(_) => {
                let answer = String::from_utf8_lossy(&answer);
                let body = answer
                    .split_once("\r\n\r\n")
                    .map_or(&*answer, |(_, body)| body);
                Served::Answer(body.to_owned())
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Served::Reset,
            Err(e) => panic!("reading the answer to {}: {e}", first.escape_ascii()),
        }
    }
}

/// Request heads asking for /admin/ that the HTTP parser refuses or never finishes, as
/// (what is wrong, what is sent first, a pause, what is sent after it).
fn unparsed_admin_requests() -> Vec<(&'static str, Vec<u8>, Duration, Vec<u8>)> {
    let whole = |head: &[u8]| head.to_vec();
    let mut long = b"GET /admin/ HTTP/1.1\r\nHost: www.example.com\r\nX-Pad: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 600));
    long.extend(b"\r\n\r\n");
    let stall = Duration::from_millis(700);
    vec![
        (
            "a head over first_message_max",
            long,
            Duration::ZERO,
            vec![],
        ),
        (
            "a head stalled past first_message_timeout",
            whole(b"GET /admin/ HTTP/1.1\r\nHost: www.example.com\r\n"),
            stall,
            whole(b"\r\n"),
        ),
        (
            "a request line stalled past first_message_timeout",
            whole(b"GET /adm"),
            stall,
            whole(b"in/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n"),
        ),
        (
            "duplicate Host headers",
            whole(
                b"GET /admin/ HTTP/1.1\r\nHost: admin.example.com\r\nHost: www.example.com\r\n\r\n",
            ),
            Duration::ZERO,
            vec![],
        ),
        (
            "an obs-fold line",
            whole(b"GET /admin/ HTTP/1.1\r\nHost: www.example.com\r\nX-A: a\r\n folded\r\n\r\n"),
            Duration::ZERO,
            vec![],
        ),
        (
            "a space before the Host colon",
            whole(b"GET /admin/ HTTP/1.1\r\nHost : admin.example.com\r\n\r\n"),
            Duration::ZERO,
            vec![],
        ),
        (
            "a bare CR",
            whole(b"GET /admin/ HTTP/1.1\rHost: www.example.com\r\n\r\n"),
            Duration::ZERO,
            vec![],
        ),
        (
            "two spaces in the request line",
            whole(b"GET  /admin/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n"),
            Duration::ZERO,
            vec![],
        ),
    ]
}

#[test]
fn unparsed_requests_for_admin_take_the_default_route_unless_reset() {
    let table = AccessControl::start();
    for (what, first, pause, rest) in unparsed_admin_requests() {
        // Lenient: the public site gets it, /admin/ and all: the hole the setting closes.
        let before = table.accepted();
        let served = AccessControl::exchange(&table.lenient, &first, pause, &rest);
        let Served::Answer(answer) = served else {
            panic!("{what}: the lenient proxy reset it");
        };
        assert!(answer.starts_with("public: GET "), "{what}: {answer:?}");
        let [admin, denied, tls, public] = before;
        assert_eq!(table.accepted(), [admin, denied, tls, public + 1], "{what}");

        // Strict: reset, and no backend saw it.
        let before = table.accepted();
        let served = AccessControl::exchange(&table.strict, &first, pause, &rest);
        assert_eq!(served, Served::Reset, "{what}");
        assert_eq!(table.accepted(), before, "{what}: a backend got it");
    }
    table.lenient.wait_idle(IO_TIMEOUT);
    table.strict.wait_idle(IO_TIMEOUT);
}

#[test]
fn unparsed_client_hellos_take_the_default_route_unless_reset() {
    let hello = captured_client_hello("a.example.com");
    let table = AccessControl::start();
    let mut garbled = hello.clone();
    garbled[43] = 0xff; // the session id's length
    let truncated = hello[..hello.len() / 2].to_vec();
    for (what, message, pause) in [
        ("a garbled ClientHello", garbled, Duration::ZERO),
        (
            "a truncated ClientHello, then FIN",
            truncated.clone(),
            Duration::ZERO,
        ),
        (
            "a ClientHello stalled past first_message_timeout",
            truncated,
            Duration::from_millis(700),
        ),
    ] {
        let before = table.accepted();
        let served = AccessControl::exchange(&table.lenient, &message, pause, &[]);
        assert_eq!(served, Served::Answer(String::new()), "{what}");
        let [admin, denied, tls, public] = before;
        assert_eq!(table.accepted(), [admin, denied, tls, public + 1], "{what}");

        let before = table.accepted();
        let served = AccessControl::exchange(&table.strict, &message, pause, &[]);
        assert_eq!(served, Served::Reset, "{what}");
        assert_eq!(table.accepted(), before, "{what}: a backend got it");
    }
    // A whole hello reaches its route on both.
    for proxy in [&table.lenient, &table.strict] {
        let before = table.accepted();
        let served = AccessControl::exchange(proxy, &hello, Duration::ZERO, &[]);
        assert_eq!(served, Served::Answer(String::new()));
        let [admin, denied, tls, public] = before;
        assert_eq!(table.accepted(), [admin, denied, tls + 1, public]);
    }
    table.lenient.wait_idle(IO_TIMEOUT);
    table.strict.wait_idle(IO_TIMEOUT);
}

#[test]
fn spellings_of_admin_reach_the_admin_routes_and_are_forwarded_as_sent() {
    let table = AccessControl::start();
    for path in [
        "/admin/",
        "/%61dmin/",
        "//admin/",
        "/./admin/",
        "/api/../admin/",
    ] {
        for proxy in [&table.lenient, &table.strict] {
            for (host, route) in [
                ("admin.example.com", "admin"),
                ("www.example.com", "denied"),
            ] {
                let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
                let served =
                    AccessControl::exchange(proxy, request.as_bytes(), Duration::ZERO, &[]);
                let answer = format!("{route}: GET {path} HTTP/1.1 ({host})\n");
                assert_eq!(served, Served::Answer(answer), "{request:?}");
            }
        }
    }
    // What the reset mode still serves: other paths, other protocols, silent clients.
    for proxy in [&table.lenient, &table.strict] {
        let request = b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
        let served = AccessControl::exchange(proxy, request, Duration::ZERO, &[]);
        let answer = "public: GET /index.html HTTP/1.1 (www.example.com)\n";
        assert_eq!(served, Served::Answer(answer.to_owned()));
        let other = b"SSH-2.0-OpenSSH_9.2\r\n\r\n";
        let served = AccessControl::exchange(proxy, other, Duration::ZERO, &[]);
        let answer = "public: SSH-2.0-OpenSSH_9.2 (-)\n";
        assert_eq!(served, Served::Answer(answer.to_owned()));
        // Nothing until the timeout has routed it to the default route, then a request.
        let later = b"GET /admin/ HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
        let served = AccessControl::exchange(proxy, b"", Duration::from_millis(700), later);
        let answer = "public: GET /admin/ HTTP/1.1 (www.example.com)\n";
        assert_eq!(served, Served::Answer(answer.to_owned()));
    }
    table.lenient.wait_idle(IO_TIMEOUT);
    table.strict.wait_idle(IO_TIMEOUT);
}
