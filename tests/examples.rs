//! The examples as a user runs them: each is started as its own process, its report is
//! checked, and then this test sends its own bytes through it and checks them exactly.
//!
//! Finding the binaries: cargo builds examples for `cargo test` only when it builds every
//! target (not for `cargo test --test examples`), and tells a test the path of `[[bin]]`
//! targets only (`CARGO_BIN_EXE_*`). So this test builds them itself, once per process,
//! with the cargo that built it, into the same target directory and profile: this test
//! binary is `<target>/<profile>/deps/examples-<hash>`, and cargo puts the examples in
//! `<target>/<profile>/examples/`. When they are up to date the build is a no-op of well
//! under a second; when they are stale it rebuilds them, so no test runs an old example.
//! (It assumes no `--target <triple>`, which would add a directory level.)

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use support::*;

const EXAMPLES: [&str; 3] = ["echo", "mplex", "embed"];

/// The built example `name`, fresh.
fn example(name: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<PathBuf> = OnceLock::new();
    let profile_dir = PROFILE_DIR.get_or_init(|| {
        let test_binary = std::env::current_exe().expect("current_exe");
        let profile_dir = test_binary
            .parent()
            .and_then(Path::parent)
            .expect("the test binary is in <target>/<profile>/deps")
            .to_owned();
        let target_dir = profile_dir.parent().expect("<target>");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(profile) => profile,
            None => panic!("no profile in {}", profile_dir.display()),
        };
        let mut build = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        build
            .args(["build", "--profile", profile, "--target-dir"])
            .arg(target_dir)
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        for example in EXAMPLES {
            build.args(["--example", example]);
        }
        let output = output_within(&mut build, Duration::from_secs(600));
        assert!(
            output.status.success(),
            "{build:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir
    });
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// An example running as its own process; its stdout and stderr are collected line by
/// line. Killed when dropped.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(name: &str, args: &[&str]) -> Running {
        // NO_COLOR unset: into pipes, the examples must leave colour out by themselves.
        let mut child = Command::new(example(name))
            .args(args)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start example {name}: {e}"));
        let collect = |pipe: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (bounded) for a stdout line that starts with `prefix`.
    fn line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return line.clone();
            }
            let exited = self.child.try_wait().expect("try_wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no stdout line starting with {prefix:?} within {limit:?} (exit: {exited:?});\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address in a line such as "echo: listening on 127.0.0.1:7000 (...)".
    fn addr(&mut self, prefix: &str) -> SocketAddr {
        let line = self.line(prefix, Duration::from_secs(20));
        let rest = &line[prefix.len()..];
        rest.split_whitespace()
            .next()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address after {prefix:?} in {line:?}"))
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `first`, expects `header` and the echo of `first` back, then `len` more bytes
/// both ways, checked by hash.
fn tagged_echo(proxy: SocketAddr, first: &[u8], header: &str, len: usize, seed: u64) {
    let mut client = connect(proxy);
    client.write_all(first).unwrap();
    let mut reply = vec![0; header.len() + first.len()];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply[..header.len()]),
        header,
        "which backend answered {} bytes starting {:?}",
        first.len(),
        &first[..first.len().min(24)].escape_ascii().to_string()
    );
    assert!(reply[header.len()..] == *first, "echo of the first message");
    let data = Arc::new(payload(len, seed));
    let (echoed, hash) = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(
        (echoed, hash),
        (len as u64, sha256(&data)),
        "echo of {len} more bytes"
    );
}

/// Sends `first` and expects the connection closed without a single byte of reply.
fn closed_without_reply(proxy: SocketAddr, first: &[u8]) {
    let mut client = connect(proxy);
    client.write_all(first).unwrap();
    let mut reply = Vec::new();
    // A reset is as good as a FIN here: what matters is that nothing came back.
    let _ = client.read_to_end(&mut reply);
    assert!(
        reply.is_empty(),
        "{} bytes answered with {:?}",
        first.len(),
        reply.escape_ascii().to_string()
    );
}

#[test]
fn echo_echoes_in_the_kernel_and_empties_the_maps() {
    let mut echo = Running::start("echo", &["--listen", "127.0.0.1:0"]);
    let addr = echo.addr("echo: listening on ");

    // A first connection stays open while the second one runs.
    let mut held = connect(addr);
    held.write_all(b"hello").unwrap();
    let mut hello = [0; 5];
    held.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");

    // Once "ping" is back the socket is in the maps (only a half-closed client is not
    // admitted), so the megabyte takes the kernel's path.
    let mut client = connect(addr);
    client.write_all(b"ping").unwrap();
    let mut ping = [0; 4];
    client.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"ping");
    let data = Arc::new(payload(1 << 20, 7));
    let (echoed, hash) = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!((echoed, hash), (1 << 20, sha256(&data)));
    let line = echo.line(
        &format!("closed {}: ", client.local_addr().unwrap()),
        Duration::from_secs(10),
    );
    assert!(
        line.ends_with(&format!(
            ": echoed {} bytes in the kernel; the maps now hold 1 sockets in SPLICED, 1 in PEER_OF",
            4 + (1 << 20)
        )),
        "{line}"
    );

    let (rest, _) = write_while_reading(&mut held, Arc::new(Vec::new())).unwrap();
    assert_eq!(rest, 0);
    let line = echo.line(
        &format!("closed {}: ", held.local_addr().unwrap()),
        Duration::from_secs(10),
    );
    assert!(
        line.ends_with(
            ": echoed 5 bytes in the kernel; the maps now hold 0 sockets in SPLICED, 0 in PEER_OF"
        ),
        "{line}"
    );
}

/// A first message of `len` bytes with `tag` at offset 20.
fn tagged(len: usize, tag: &[u8; 3], seed: u64) -> Vec<u8> {
    let mut message = payload(len, seed);
    if let Some(window) = message.get_mut(20..23) {
        window.copy_from_slice(tag);
    }
    message
}

#[test]
fn mplex_routes_on_the_tag_and_closes_the_rest() {
    // examples/mplex-routes.toml as it is, but with backend ports that are free here.
    let mut routes = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mplex-routes.toml"),
    )
    .unwrap();
    let mut backends = Vec::new();
    for tag in ["600", "601", "602"] {
        let fixed = format!("\"127.0.0.1:5{tag}\"");
        assert!(
            routes.contains(&fixed),
            "mplex-routes.toml has no backend {fixed}"
        );
        let free = refused_addr();
        routes = routes.replace(&fixed, &format!("\"{free}\""));
        backends.push((tag, free));
    }
    let routes = routes_file("examples-mplex", &routes);
    let mut mplex = Running::start(
        "mplex",
        &[
            "--routes",
            routes.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--serve",
        ],
    );
    let proxy = mplex.addr("mplex: serving on ");

    // The demo's own report.
    let listening = mplex.line("mplex: proxy listening on ", Duration::ZERO);
    assert!(listening.contains("(splice mode)"), "{listening}");
    for (label, len, (tag, backend)) in [
        ("shortest", 290, backends[0]),
        ("middle", 292, backends[1]),
        ("longest", 294, backends[2]),
    ] {
        let line = mplex.line(&format!("{label} "), Duration::ZERO);
        assert!(
            line.ends_with(&format!(
                "({len} bytes, tag {tag}): answered by backend {backend}, echo intact"
            )),
            "{line}"
        );
    }
    for (label, len, tag) in [
        ("too short", 289, "600"),
        ("too long", 295, "601"),
        ("unknown tag", 292, "603"),
    ] {
        let line = mplex.line(&format!("{label} "), Duration::ZERO);
        assert!(
            line.contains(&format!(
                "({len} bytes, tag {tag}): closed without a reply after "
            )),
            "{line}"
        );
    }
    assert_eq!(
        mplex.line("mplex: all", Duration::ZERO),
        "mplex: all as expected"
    );

    // Then this test's own clients, all at once (the short ones wait for the timeout).
    let mut clients = Vec::new();
    for (seed, (tag, backend)) in backends.into_iter().enumerate() {
        for len in [290, 294] {
            let first = tagged(len, tag.as_bytes().try_into().unwrap(), seed as u64);
            let header = format!("backend {backend}\n");
            clients.push(thread::spawn(move || {
                tagged_echo(proxy, &first, &header, 256 << 10, seed as u64)
            }));
        }
    }
    for (len, tag) in [
        (289, b"600"),
        (295, b"601"),
        (292, b"603"),
        (292, b"60\0"),
        (20, b"600"),
    ] {
        let first = tagged(len, tag, 9);
        clients.push(thread::spawn(move || closed_without_reply(proxy, &first)));
    }
    for client in clients {
        client
            .join()
            .unwrap_or_else(|_| panic!("a client failed;\n{}", mplex.output()));
    }

    // Its logs went into a pipe: no colour codes in them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mplex.output().contains("connection") {
        assert!(
            Instant::now() < deadline,
            "no access log line;\n{}",
            mplex.output()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!mplex.output().contains('\x1b'), "{}", mplex.output());
}

#[test]
fn embed_routes_with_its_own_function() {
    let mut embed = Running::start("embed", &["--listen", "127.0.0.1:0", "--serve"]);
    let proxy = embed.addr("embed: serving on ");

    let listening = embed.line("embed: proxy listening on ", Duration::ZERO);
    assert!(listening.contains("(splice mode)"), "{listening}");
    for (first, backend) in [
        (r#""GET /index.html\n""#, "web"),
        (r#""HELLO there\n""#, "other"),
    ] {
        let line = embed.line(first, Duration::ZERO);
        assert!(
            line.ends_with(&format!(
                "-> answered by backend {backend}, 1 MiB echo intact"
            )),
            "{line}"
        );
    }
    assert_eq!(
        embed.line("embed: all", Duration::ZERO),
        "embed: all as expected"
    );

    tagged_echo(
        proxy,
        b"GET /a HTTP/1.0\r\n\r\n",
        "backend web\n",
        1 << 20,
        1,
    );
    tagged_echo(
        proxy,
        b"POST /a HTTP/1.0\r\n\r\n",
        "backend other\n",
        1 << 20,
        2,
    );
    tagged_echo(proxy, b"G", "backend other\n", 4096, 3);

    // "GE" could still become "GET ": the router waits for more before deciding.
    let mut client = connect(proxy);
    client.write_all(b"GE").unwrap();
    thread::sleep(Duration::from_millis(100));
    client.write_all(b"T /slow\n").unwrap();
    let mut reply = [0; 22];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"backend web\nGET /slow\n");
}
