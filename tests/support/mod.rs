//! What the end-to-end tests share: a proxy running in this process with the real probe
//! loaded, the real `splice-proxy` binary, backends on 127.0.0.1, deterministic payloads
//! and their hashes, and the process's open fds. Every wait is bounded.
#![allow(dead_code)] // Each test file uses a different part of this module.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use splice_proxy::{Splicing, config::Config, probe::Probe};

/// Every blocking socket in the tests gives up after this long, so a bug hangs no test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// How a test proxy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moving {
    Splice,
    Copy,
}

pub const SPLICE: Moving = Moving::Splice;
pub const COPY: Moving = Moving::Copy;

/// A proxy in this process (the library's [`splice_proxy::Proxy`], which it derefs to),
/// with the waits and counts the tests ask of it. Dropping it stops it.
pub struct Proxy {
    pub addr: SocketAddr,
    running: splice_proxy::Proxy,
}

impl std::ops::Deref for Proxy {
    type Target = splice_proxy::Proxy;

    fn deref(&self) -> &splice_proxy::Proxy {
        &self.running
    }
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 with `routes` (the text of a routes.toml). A
    /// splicing proxy that cannot load the probe fails the test with the reason.
    pub fn start(routes: &str, moving: Moving) -> Proxy {
        Proxy::start_sized(routes, moving, 1 << 14)
    }

    /// As [`Proxy::start`], with maps that hold `map_capacity` sockets (two per spliced
    /// connection).
    pub fn start_sized(routes: &str, moving: Moving, map_capacity: u32) -> Proxy {
        let config =
            Config::parse(routes, Path::new("test-routes.toml")).expect("test routes parse");
        let splicing = match moving {
            Moving::Splice => Splicing::Required,
            Moving::Copy => Splicing::Off,
        };
        let running = splice_proxy::Proxy::from_config(config)
            .workers(2)
            .map_capacity(map_capacity)
            .splicing(splicing)
            .start()
            .unwrap_or_else(|e| {
                panic!(
                    "the proxy must start (tests run as root on a kernel with sockmap): {e} ({e:?})"
                )
            });
        Proxy {
            addr: running.local_addr(),
            running,
        }
    }

    /// The loaded probe, when splicing.
    pub fn probe(&self) -> Option<&Arc<Probe>> {
        self.engine().probe()
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    /// Waits until the proxy's admission counts `count` connections held.
    pub fn wait_held(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.admission().held() != count {
            assert!(
                Instant::now() < deadline,
                "the proxy holds {} connections, not {count}, after {limit:?}",
                self.admission().held()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until every connection the engine adopted has closed and (when splicing)
    /// both maps are empty; panics with what is left after `limit`.
    pub fn wait_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let live = self.engine().live();
            let entries = self.probe().map_or((0, 0), |p| p.entries());
            let flows = self.probe().map_or((0, 0), |p| p.flow_entries());
            if live == 0 && entries == (0, 0) && flows == (0, 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {limit:?}: {live} connections still live, map entries (SPLICED, PEER_OF) = {entries:?}, (FLOW, CREDIT) = {flows:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Bytes the probe has redirected so far (0 when copying).
    pub fn redirected_bytes(&self) -> u64 {
        self.probe().map_or(0, |p| {
            p.counters().expect("read probe counters").redirected_bytes
        })
    }
}

/// Bytes read through read(2)/recv(2) by this process's proxy threads (the workers,
/// named `splice-*`, which also read each first message), from /proc: the proof that
/// spliced bytes never reached userspace.
pub fn proxy_threads_read_bytes() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("splice") {
            continue;
        }
        let io = std::fs::read_to_string(task.path().join("io")).unwrap_or_default();
        total += io
            .lines()
            .find_map(|line| line.strip_prefix("rchar: "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// `len` bytes that differ at every offset and between seeds, so that a lost, repeated
/// or reordered block changes the hash.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Reads until EOF, hashing as it goes; returns (bytes, hash).
pub fn read_to_end_hashed(stream: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, hasher.finalize().into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A backend on 127.0.0.1:0 that runs `serve` on its own thread for each connection.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<Mutex<usize>>,
}

impl Backend {
    pub fn start<F>(serve: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Backend::start_on(
            TcpListener::bind("127.0.0.1:0").expect("bind backend"),
            serve,
        )
    }

    /// Like [`Backend::start`], on a listener the caller prepared.
    pub fn start_on<F>(listener: TcpListener, serve: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let count = Arc::clone(&accepted);
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                *count.lock().unwrap() += 1;
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let serve = Arc::clone(&serve);
                thread::spawn(move || serve(stream));
            }
        });
        Backend { addr, accepted }
    }

    /// Echoes every byte, then half-closes after the client's FIN.
    pub fn echo() -> Backend {
        Backend::start(|mut stream| {
            let mut reader = stream.try_clone().unwrap();
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        })
    }

    /// Sends `greeting` first (a server-speaks-first protocol), then echoes.
    pub fn greeter(greeting: &'static [u8]) -> Backend {
        Backend::start(move |mut stream| {
            if stream.write_all(greeting).is_err() {
                return;
            }
            let mut reader = stream.try_clone().unwrap();
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        })
    }

    /// Reports (bytes, hash) of everything each connection sent, through the channel.
    pub fn sink() -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            if let Ok(result) = read_to_end_hashed(&mut stream) {
                let _ = tx.lock().unwrap().send(result);
            }
        });
        (backend, rx)
    }

    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then closed).
pub fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The `splice-proxy` binary, started with `args`; stderr is collected line by line.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_splice-proxy")
}

impl ProxyProcess {
    /// Starts the binary and, unless it exits first, waits for its "listening on ADDR"
    /// line (bounded) to learn the address.
    pub fn start(args: &[&str]) -> ProxyProcess {
        ProxyProcess::spawn(Command::new(binary()).args(args))
    }

    /// Starts the binary on 127.0.0.1:0 with `routes`, `--mode mode` and the layout the
    /// tests use on this 2-core machine (2 workers), then `extra`;
    /// fails the test unless it listens.
    pub fn serve(routes: &Path, mode: &str, extra: &[&str]) -> ProxyProcess {
        let proxy = ProxyProcess::launch(routes, mode, extra);
        proxy.addr();
        proxy
    }

    /// As [`ProxyProcess::serve`], for a test that expects the binary may refuse to
    /// start: it does not wait for it to listen.
    pub fn launch(routes: &Path, mode: &str, extra: &[&str]) -> ProxyProcess {
        let routes = routes.to_str().expect("routes path is UTF-8");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--routes",
            routes,
            "--mode",
            mode,
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        ProxyProcess::start(&args)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| {
            panic!(
                "splice-proxy did not start listening; stderr:\n{}",
                self.stderr()
            )
        })
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until stderr has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a routes file into a fresh temporary directory and returns its path.
pub fn routes_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splice-proxy-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Added for tests/splice.rs: routes, hand-off waits, shared payloads, backends that
// stream, reply after EOF or report how a read ended, and abortive closes.

impl Proxy {
    /// Waits until the engine owns `count` connections and, when splicing, all of them
    /// are in both maps (two sockets each): the point after which bytes take the
    /// kernel's path. Panics with what it saw after `limit`.
    pub fn wait_handed_off(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let live = self.engine().live();
            let entries = self.probe().map_or((0, 0), |p| p.entries());
            let wanted = if self.is_splicing() {
                (2 * count, 2 * count)
            } else {
                (0, 0)
            };
            if live == count && entries == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {limit:?}: {live} connections live (want {count}), \
                 map entries (SPLICED, PEER_OF) = {entries:?} (want {wanted:?})"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `backends = ["a", "b"]` for a routes file.
pub fn backends_toml(backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!("backends = [{}]", list.join(", "))
}

/// A routes file with one route, taking first messages that start with `prefix`.
pub fn prefix_routes(prefix: &str, backends: &[SocketAddr]) -> String {
    format!(
        "[[route]]\nname = \"prefix\"\nprefix = \"{prefix}\"\n{}\n",
        backends_toml(backends)
    )
}

/// A routes file whose only route is the default, with the given first-message timeout
/// (e.g. "200ms").
pub fn default_routes(first_message_timeout: &str, backends: &[SocketAddr]) -> String {
    format!(
        "first_message_timeout = \"{first_message_timeout}\"\n\n\
         [[route]]\nname = \"default\"\ndefault = true\n{}\n",
        backends_toml(backends)
    )
}

/// `payload(len, seed)`, generated once per process and shared: the big payloads take a
/// noticeable time to generate and several tests send the same one.
pub fn shared_payload(len: usize, seed: u64) -> Arc<Vec<u8>> {
    type Cache = std::collections::BTreeMap<(usize, u64), Arc<Vec<u8>>>;
    static CACHE: Mutex<Cache> = Mutex::new(Cache::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(
        cache
            .entry((len, seed))
            .or_insert_with(|| Arc::new(payload(len, seed))),
    )
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256_concat(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Writes `data` from a second thread (then half-closes) while this thread reads until
/// EOF; returns (bytes, hash) of what came back. For an echo both sides stream at once,
/// so neither can fill the other's buffers and stall.
pub fn write_while_reading(
    stream: &mut TcpStream,
    data: Arc<Vec<u8>>,
) -> io::Result<(u64, [u8; 32])> {
    let mut writer = stream.try_clone()?;
    let writing = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let read = read_to_end_hashed(stream);
    let written = writing.join().expect("writer thread panicked");
    written?;
    read
}

/// Reads exactly `len` bytes and returns them.
pub fn read_exactly(stream: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Closes `stream` with an RST instead of a FIN (SO_LINGER 0), as a crashed or
/// aborting peer does.
pub fn close_with_reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// How a read until the end went: bytes and hash at EOF, or the error, and when it ended.
pub type ReadOutcome = (io::Result<(u64, [u8; 32])>, Instant);

impl Backend {
    /// Reads `trigger` bytes (the first message, and whatever the client sends to say
    /// "go"), then sends `data` and closes.
    pub fn streamer(trigger: usize, data: Arc<Vec<u8>>) -> Backend {
        Backend::start(move |mut stream| {
            if read_exactly(&mut stream, trigger).is_ok() {
                let _ = stream.write_all(&data);
            }
        })
    }

    /// Reads until the client's FIN and reports (bytes, hash) of it, then answers with
    /// `reply` and closes: the reply travels after the request direction half-closed.
    pub fn reply_after_eof(reply: Arc<Vec<u8>>) -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            if let Ok(result) = read_to_end_hashed(&mut stream) {
                let _ = tx.lock().unwrap().send(result);
                let _ = stream.write_all(&reply);
            }
        });
        (backend, rx)
    }

    /// Sends `data` and half-closes from one thread while reading until EOF on another;
    /// reports (bytes, hash) of what it read.
    pub fn send_and_sink(data: Arc<Vec<u8>>) -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let data = Arc::clone(&data);
            let writing = thread::spawn(move || {
                let _ = writer.write_all(&data);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let read = read_to_end_hashed(&mut stream);
            let _ = writing.join();
            if let Ok(result) = read {
                let _ = tx.lock().unwrap().send(result);
            }
        });
        (backend, rx)
    }

    /// Reads until EOF or an error and reports how it ended, and when.
    pub fn sink_outcome() -> (Backend, mpsc::Receiver<ReadOutcome>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            let result = read_to_end_hashed(&mut stream);
            let _ = tx.lock().unwrap().send((result, Instant::now()));
        });
        (backend, rx)
    }

    /// Reads exactly `request` bytes, then sends `reply` and keeps the connection open
    /// until the client closes: a request/response server that waits for whole requests.
    pub fn request_reply(request: usize, reply: &'static [u8]) -> Backend {
        Backend::start(move |mut stream| {
            if read_exactly(&mut stream, request).is_ok() && stream.write_all(reply).is_ok() {
                let _ = read_to_end_hashed(&mut stream);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Added for tests/cli.rs and tests/examples.rs: the binary under a command the test
// builds (e.g. without privileges), bounded waits for a process, echo round trips.

impl ProxyProcess {
    /// As [`ProxyProcess::start`], for a command the caller built around the binary (its
    /// stdout and stderr are taken over): e.g. the binary run by `setpriv` as nobody.
    /// Logs at info unless the command sets RUST_LOG.
    pub fn spawn(command: &mut Command) -> ProxyProcess {
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(addr) = rest.split_whitespace().next().and_then(|a| a.parse().ok())
                {
                    let _ = tx.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        // Returns early, without an address, if the process exits (the pipe closes).
        let addr = rx.recv_timeout(Duration::from_secs(10)).ok();
        ProxyProcess {
            child,
            addr,
            stderr,
        }
    }

    /// Waits (bounded) for the process to exit and for the rest of its stderr; panics
    /// with what it logged if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader thread ends at EOF; give it a moment to store the last lines.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of stderr containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

/// Runs `command` to its end with stdout and stderr collected; kills it and panics if it
/// runs longer than `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    wait_output(child, limit).unwrap_or_else(|| panic!("{command:?} still running after {limit:?}"))
}

/// Waits for `child` (spawned with piped stdout and stderr) to end, reading its output
/// meanwhile so that it never blocks on a full pipe. `None` if it ran longer than
/// `limit`: then it has been killed.
pub fn wait_output(mut child: Child, limit: Duration) -> Option<std::process::Output> {
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    Some(std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

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

/// Raises the soft RLIMIT_NOFILE to the hard one, which needs no privilege; returns it.
/// For a test that holds more sockets than a login shell's soft limit of 1024 allows.
pub fn soft_nofile_to_hard() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .expect("raise the soft RLIMIT_NOFILE to the hard one");
    hard
}

/// Fds the process may hold beyond its count before a load: backend threads finishing.
pub const FD_SLACK: usize = 4;

/// This process's open fds once they have not changed for `quiet` (waiting at most
/// `limit`): workers and backend threads open and close theirs a little late.
pub fn settled_fds(quiet: Duration, limit: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + limit;
    let mut last = open_fd_targets();
    loop {
        thread::sleep(quiet);
        let now = open_fd_targets();
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Waits (bounded) until the process has no more open fds than `before` plus
/// [`FD_SLACK`]; the panic lists (the first 20 of) the fds that are new.
pub fn wait_fds_back(before: &[(i32, String)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = open_fd_targets();
        if now.len() <= before.len() + FD_SLACK {
            return;
        }
        if Instant::now() >= deadline {
            let new: Vec<_> = now.iter().filter(|fd| !before.contains(fd)).collect();
            let shown = &new[..new.len().min(20)];
            panic!(
                "{} fds open {within:?} after the load, {} before; new (first 20): {shown:?}",
                now.len(),
                before.len()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// This process's open fds and what each refers to (`socket:[inode]`,
/// `anon_inode:[eventpoll]`, ...), for a leak report that says what leaked.
pub fn open_fd_targets() -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

impl Proxy {
    /// The probe's counters since it was loaded (all 0 when copying).
    pub fn counters(&self) -> splice_proxy::probe::Counters {
        self.probe().map_or_else(Default::default, |p| {
            p.counters().expect("read probe counters")
        })
    }
}

// ---------------------------------------------------------------------------------------
// Added for tests/signals.rs: signals to the binary.

impl ProxyProcess {
    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) with a child's pid that we have not reaped (Drop reaps it).
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            sent,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The programs the tests run as real peers and tools (redis, HAProxy, nginx, openssl,
// curl, ...). scripts/test installs them; a test that finds one missing fails, never skips.

/// A command for `program`, which Debian's `package` installs. The program is looked up
/// first, so that a missing one fails the test with what to install, where the spawn would
/// fail with only "No such file or directory". The sbin directories are searched too: a
/// root shell from `su` without `-` does not have them on PATH, and nginx and HAProxy
/// live there.
#[track_caller]
pub fn external(program: &str, package: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file());
    match found {
        Some(found) => Command::new(found),
        None => not_installed(program, package),
    }
}

/// Fails the test, at its caller's line: `what` is missing, and Debian's `package`
/// installs it.
#[track_caller]
pub fn not_installed(what: &str, package: &str) -> ! {
    panic!(
        "{what} is not installed: the tests need Debian's {package} package \
         (apt-get install {package}; scripts/test installs everything the tests use)"
    )
}

/// Runs `test` on a thread in a network namespace of its own, whose loopback behaves like
/// a congested link to a peer without SACK: a 1500-byte MTU, a token bucket that drops
/// what overflows its 64 KB queue, and `tcp_sack` off, so that TCP recovers by
/// retransmitting from the first lost byte and re-segments what it sends again (it may
/// merge segments the receiver already has into the retransmission). Everything the test
/// starts (proxy, backends, clients) runs in that namespace: threads inherit it.
///
/// The queue is smaller than a spliced source's first receive window (128 KiB, twice
/// that after the kernel's doubling), so that a sender overflows it even where it cannot
/// outrun the rate: with a 100 KB queue the emulated 6.1 and 6.12 guests lost nothing
/// once the engine owned that window, and the test, which needs losses, failed there.
/// At 30 KB the copy mode on the host stalled in retransmission backoff.
pub fn on_a_lossy_loopback<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            unshared,
            0,
            "unshare(CLONE_NEWNET) (needs root): {}",
            io::Error::last_os_error()
        );
        for (program, args) in [
            ("ip", &["link", "set", "lo", "mtu", "1500", "up"][..]),
            (
                "tc",
                &[
                    "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst", "64kb",
                    "limit", "64kb",
                ][..],
            ),
        ] {
            let status = external(program, "iproute2").args(args).status().unwrap();
            assert!(status.success(), "{program} {args:?}: {status}");
        }
        std::fs::write("/proc/sys/net/ipv4/tcp_sack", "0").unwrap();
        test()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------------------------
// Added for tests/pair_ends.rs: which pairs the engine has set up, and how.

/// Pairs an engine has set up since it started, by how it moves their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetUp {
    /// In the maps (both sockets, or the upstream alone when the client closed during
    /// the hand-off): the pairs the access log says `mode = "splice"` of at their end.
    pub spliced: u64,
    pub copied: u64,
}

impl SetUp {
    pub fn total(self) -> u64 {
        self.spliced + self.copied
    }
}

impl Proxy {
    /// The pairs the engine has set up so far, from its metrics: a pair counts once it
    /// is in the maps or registered for copying, never before, and never stops counting.
    pub fn set_up(&self) -> SetUp {
        let mut set_up = SetUp::default();
        for line in self.engine().metrics().encode().lines() {
            let Some(sample) = line.strip_prefix("splice_proxy_connections_total{") else {
                continue;
            };
            let (labels, count) = sample
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let count: u64 = count
                .parse()
                .unwrap_or_else(|e| panic!("not a count ({e}): {line:?}"));
            if labels.contains("mode=\"splice\"") {
                set_up.spliced += count;
            } else {
                set_up.copied += count;
            }
        }
        set_up
    }
}
