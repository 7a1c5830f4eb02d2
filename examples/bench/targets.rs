//! What the bench measures: the backend reached directly, and each proxy in front of it.
//! Each proxy runs as a child process on 127.0.0.1 with a config generated into the
//! bench's temporary directory, two workers or threads each (one per core here), and
//! otherwise the defaults a user gets, plus what the comparison calls for, as their users
//! configure them for speed: `option splice-request` and `option splice-response` with
//! 1 MiB pipes for HAProxy (`haproxy-auto`, with `option splice-auto`, on request), 4m
//! buffers for nginx.

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    process::Child,
    wire::{self, Header, Op},
};

/// How long a proxy may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Workers (nginx and splice-proxy), threads (HAProxy).
const PROXY_THREADS: usize = 2;

/// HAProxy's pipe size for splicing (`tune.pipesize`): the largest a pipe may have
/// without raising `fs.pipe-max-size`. With the system's default of 64 KiB, one stream
/// ran at 13-14 Gbit/s; with 1 MiB at 20-22, and with 4 MiB (the sysctl raised) no
/// faster (benchmarks/bulk.md, "The peers' buffers").
const HAPROXY_PIPE_SIZE: usize = 1 << 20;

/// nginx stream's buffer for each direction of a bench connection (`proxy_buffer_size`,
/// 16k by default): one stream ran at 12-13 Gbit/s with the default, 19-23 with 1m,
/// 26-27 with 4m, and no faster with 16m (benchmarks/bulk.md, "The peers' buffers"). The
/// hold's connections keep the default, as an operator holding 100,000 would.
const NGINX_BUFFER: &str = "4m";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    SpliceVerdict,
    /// `splice-verdict` with `--steering hash`, the default before steering by CPU: on
    /// request, to compare the two.
    SpliceHashed,
    Copy,
    Haproxy,
    HaproxyAuto,
    Nginx,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::SpliceVerdict,
        Kind::SpliceHashed,
        Kind::Copy,
        Kind::Haproxy,
        Kind::HaproxyAuto,
        Kind::Nginx,
    ];

    /// The targets a run without `--targets` measures: `haproxy-auto` only compares
    /// HAProxy's two ways to splice, `splice-hashed` splice-proxy's two ways to spread
    /// connections over its workers.
    pub const DEFAULT: [Kind; 5] = [
        Kind::Direct,
        Kind::SpliceVerdict,
        Kind::Copy,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::SpliceVerdict => "splice-verdict",
            Kind::SpliceHashed => "splice-hashed",
            Kind::Copy => "copy",
            Kind::Haproxy => "haproxy",
            Kind::HaproxyAuto => "haproxy-auto",
            Kind::Nginx => "nginx",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Direct => "client to backend, no proxy: the limit",
            Kind::SpliceVerdict => {
                "splice-proxy --mode splice, steered by CPU (stream verdict only)"
            }
            Kind::SpliceHashed => "splice-proxy --mode splice --steering hash",
            Kind::Copy => "splice-proxy --mode copy (userspace copy)",
            Kind::Haproxy => {
                "HAProxy, mode tcp, option splice-request + splice-response, 1 MiB pipes"
            }
            Kind::HaproxyAuto => "HAProxy, mode tcp, option splice-auto",
            Kind::Nginx => "nginx stream proxy_pass, 4m buffers",
        }
    }

    fn is_splice_proxy(self) -> bool {
        matches!(self, Kind::SpliceVerdict | Kind::SpliceHashed | Kind::Copy)
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// A proxy's program.
pub enum Program {
    SpliceProxy(PathBuf),
    Haproxy(PathBuf),
    Nginx {
        binary: PathBuf,
        /// The stream module to load, when nginx has it as a dynamic module.
        stream_module: Option<PathBuf>,
        /// util-linux's unshare, to run nginx in a PID namespace of its own.
        unshare: PathBuf,
    },
}

/// Finds the program a target runs (None for direct, which runs none); `Err` says what
/// is missing and how to install it.
pub fn locate(kind: Kind) -> Result<Option<Program>, String> {
    let program = match kind {
        Kind::Direct => return Ok(None),
        Kind::SpliceVerdict | Kind::SpliceHashed | Kind::Copy => {
            Program::SpliceProxy(splice_proxy_binary()?)
        }
        Kind::Haproxy | Kind::HaproxyAuto => Program::Haproxy(
            find_program("haproxy")
                .ok_or_else(|| "haproxy is not installed: apt-get install haproxy".to_owned())?,
        ),
        Kind::Nginx => {
            let binary = find_program("nginx").ok_or_else(|| {
                "nginx is not installed: apt-get install nginx libnginx-mod-stream".to_owned()
            })?;
            let stream_module = nginx_stream_module(&binary)?;
            let unshare = find_program("unshare").ok_or_else(|| {
                "unshare is not installed (it runs nginx in a PID namespace): apt-get install util-linux"
                    .to_owned()
            })?;
            Program::Nginx {
                binary,
                stream_module,
                unshare,
            }
        }
    };
    Ok(Some(program))
}

/// The splice-proxy binary next to this example: target/<profile>/splice-proxy, when this
/// is target/<profile>/examples/bench.
fn splice_proxy_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the bench executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} has no grandparent directory", exe.display()))?;
    let binary = profile_dir.join("splice-proxy");
    if !binary.is_file() {
        return Err(format!(
            "{} is not built: run `cargo build --release` first",
            binary.display()
        ));
    }
    warn_if_stale(&binary);
    Ok(binary)
}

/// `cargo run --example bench` does not rebuild the proxy binary: say so if a source
/// file is newer than it.
fn warn_if_stale(binary: &Path) {
    let Ok(built) = fs::metadata(binary).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["proxy", "proxy-probe/src", "Cargo.toml", "build.rs"].map(|p| root.join(p));
    let mut stack: Vec<PathBuf> = sources.to_vec();
    while let Some(path) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&path) {
            stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        } else if fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified > built)
        {
            eprintln!(
                "warning: {} is newer than {}: run `cargo build --release` to measure the current sources",
                path.display(),
                binary.display()
            );
            return;
        }
    }
}

/// Looks in PATH and in the sbin directories, which a non-root PATH may lack.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// nginx's stream module: built in (None), or the dynamic module's path.
fn nginx_stream_module(nginx: &Path) -> Result<Option<PathBuf>, String> {
    let output = Command::new(nginx)
        .arg("-V")
        .output()
        .map_err(|e| format!("running {} -V: {e}", nginx.display()))?;
    // nginx prints its configure arguments on stderr.
    let text = String::from_utf8_lossy(&output.stderr);
    let args: Vec<&str> = text.split_whitespace().collect();
    if args.contains(&"--with-stream") {
        return Ok(None);
    }
    if !args.contains(&"--with-stream=dynamic") {
        return Err("this nginx was built without the stream module".to_owned());
    }
    let dir = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let module = Path::new(dir).join("ngx_stream_module.so");
    if module.is_file() {
        Ok(Some(module))
    } else {
        Err(format!(
            "{} is missing: apt-get install libnginx-mod-stream",
            module.display()
        ))
    }
}

/// What the hold workload needs of every target: where the hold echo server listens
/// and how many connections each proxy must take.
pub struct HoldPlan<'a> {
    pub backends: &'a [SocketAddr],
    pub connections: usize,
}

/// A target ready for clients.
pub struct Target {
    pub kind: Kind,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the hold workload's clients connect (spread over them): the hold echo
    /// server's ports for direct; for a proxy, one address that leads to them.
    pub hold: Vec<SocketAddr>,
    /// The proxy process (None for direct).
    process: Option<Child>,
    /// The proxy's processes (nginx: master and workers), for CPU accounting.
    pids: Vec<u32>,
    /// The proxy's log, then those of the instances it took over (see [`Target::adopt_log`]).
    logs: Vec<PathBuf>,
}

impl Target {
    /// The backend itself, with no proxy.
    pub fn direct(backend: SocketAddr, hold: &HoldPlan) -> Target {
        Target {
            kind: Kind::Direct,
            addr: backend,
            hold: hold.backends.to_vec(),
            process: None,
            pids: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Starts the target's proxy in front of `backend` and waits until a connection
    /// through it works. `shard` tells apart the files of several instances of one proxy
    /// (the hold workload's shards, see `hold.rs`): 0 is the target itself.
    pub fn start(
        kind: Kind,
        program: &Program,
        backend: SocketAddr,
        hold: &HoldPlan,
        dir: &Path,
        shard: usize,
    ) -> anyhow::Result<Target> {
        let name = match shard {
            0 => kind.name().to_owned(),
            _ => format!("{}-shard{shard}", kind.name()),
        };
        let listen = free_port().context("finding a free port")?;
        // splice-proxy tells hold connections apart by their first message; HAProxy and
        // nginx get a second listener.
        let hold_listen = if kind.is_splice_proxy() {
            listen
        } else {
            free_port().context("finding a free port")?
        };
        let log = dir.join(format!("{name}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let place = Placement {
            name: &name,
            listen,
            backend,
            hold_listen,
            hold,
            dir,
            log: &log,
        };
        let mut command = match program {
            Program::SpliceProxy(binary) => splice_proxy_command(kind, binary, &place)?,
            Program::Haproxy(binary) => haproxy_command(kind, binary, &place)?,
            Program::Nginx {
                binary,
                stream_module,
                unshare,
            } => nginx_command(binary, stream_module.as_deref(), unshare, &place)?,
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut process = Child::spawn(&name, command)?;
        if let Err(e) = wait_until_serving(&mut process, listen) {
            let tail = log_tail(&log);
            bail!(
                "{name} did not start: {e:#}\n--- {} ---\n{tail}",
                log.display()
            );
        }
        let pids = process.pids();
        Ok(Target {
            kind,
            addr: listen,
            hold: vec![hold_listen],
            process: Some(process),
            pids,
            logs: vec![log],
        })
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.process {
            Some(process) => process.check_alive(),
            None => Ok(()),
        }
    }

    /// Counts `instance`'s connections among this target's from now on: the hold
    /// workload's extra instances are stopped long before the summary reads the logs.
    pub fn adopt_log(&mut self, instance: &Target) {
        self.logs.extend(instance.logs.iter().cloned());
    }

    /// For splice-proxy: how many connections its logs say were spliced and copied.
    pub fn splice_counts(&self) -> Option<(usize, usize)> {
        if !self.kind.is_splice_proxy() {
            return None;
        }
        let mut counts = (0, 0);
        for log in &self.logs {
            let text = fs::read_to_string(log).ok()?;
            let count = |mode: &str| {
                text.lines()
                    .filter(|line| {
                        line.contains(&format!("mode=\"{mode}\""))
                            || line.contains(&format!("mode={mode} "))
                    })
                    .count()
            };
            counts.0 += count("splice");
            counts.1 += count("copy");
        }
        Some(counts)
    }
}

/// Where a proxy listens, what it forwards to, and where its files go.
struct Placement<'a> {
    /// The instance's name, which its files in `dir` start with.
    name: &'a str,
    listen: SocketAddr,
    backend: SocketAddr,
    /// Where hold connections arrive (for splice-proxy, `listen` itself).
    hold_listen: SocketAddr,
    hold: &'a HoldPlan<'a>,
    /// The bench's temporary directory, for configs.
    dir: &'a Path,
    /// The proxy's stderr (and nginx's error log).
    log: &'a Path,
}

/// `--splice-backlog`, set once in main: every splice-proxy instance's routes get it.
pub static SPLICE_BACKLOG: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn splice_proxy_command(kind: Kind, binary: &Path, place: &Placement) -> anyhow::Result<Command> {
    let routes = place.dir.join(format!("{}-routes.toml", place.name));
    let magic = std::str::from_utf8(wire::MAGIC).expect("the magic is ASCII");
    let hold_magic = std::str::from_utf8(wire::HOLD_MAGIC).expect("the magic is ASCII");
    let hold_backends: Vec<String> = place
        .hold
        .backends
        .iter()
        .map(|addr| format!("\"{addr}\""))
        .collect();
    let backlog = match SPLICE_BACKLOG.get() {
        Some(Some(bytes)) => format!("splice_backlog_max = {bytes}\n"),
        _ => String::new(),
    };
    let config = backlog
        + &format!(
            "# The bench's first messages start with {magic} or {hold_magic}; nothing else is served.\n\
         [[route]]\n\
         name = \"bench\"\n\
         prefix = \"{magic}\"\n\
         backends = [\"{backend}\"]\n\
         [[route]]\n\
         name = \"hold\"\n\
         prefix = \"{hold_magic}\"\n\
         backends = [{hold_backends}]\n",
            backend = place.backend,
            hold_backends = hold_backends.join(", "),
        );
    // Each held connection puts two sockets into each map.
    let map_capacity = (2 * place.hold.connections + 1024)
        .next_power_of_two()
        .max(proxy_probe::DEFAULT_MAP_CAPACITY as usize);
    fs::write(&routes, config).with_context(|| format!("writing {}", routes.display()))?;
    let mode: &[&str] = match kind {
        Kind::SpliceVerdict => &["--mode", "splice"],
        Kind::SpliceHashed => &["--mode", "splice", "--steering", "hash"],
        _ => &["--mode", "copy"],
    };
    let mut command = Command::new(binary);
    command
        .arg("--listen")
        .arg(place.listen.to_string())
        .arg("--routes")
        .arg(&routes)
        .args(mode)
        .args(["--workers", &PROXY_THREADS.to_string()])
        .args(["--map-capacity", &map_capacity.to_string()])
        // One log line per connection, as users run it; its mode field is counted.
        .env("RUST_LOG", "info");
    Ok(command)
}

fn haproxy_command(kind: Kind, binary: &Path, place: &Placement) -> anyhow::Result<Command> {
    let config_path = place.dir.join(format!("{}.cfg", place.name));
    let hold_servers: String = place
        .hold
        .backends
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("    server hold{i} {addr}\n"))
        .collect();
    let config = format!(
        "global\n\
         \x20   nbthread {PROXY_THREADS}\n\
         \x20   maxconn {maxconn}\n\
         \x20   maxpipes 1024\n\
         \x20   tune.pipesize {HAPROXY_PIPE_SIZE}\n\
         defaults\n\
         \x20   mode tcp\n\
         {splice}\
         \x20   timeout connect 5s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         frontend bench\n\
         \x20   bind {listen}\n\
         \x20   default_backend backends\n\
         backend backends\n\
         \x20   server backend {backend}\n\
         frontend hold\n\
         \x20   bind {hold_listen}\n\
         \x20   maxconn {hold}\n\
         \x20   timeout client 10m\n\
         \x20   default_backend hold\n\
         backend hold\n\
         \x20   timeout server 10m\n\
         {hold_servers}",
        // Two descriptors per connection and two per pipe must fit in the descriptor
        // limit (HAProxy refuses to start otherwise): its default of maxconn / 4 pipes
        // would not, and the bulk workloads splice at most 4 connections at once.
        splice = match kind {
            Kind::HaproxyAuto => "    option splice-auto\n",
            _ => "    option splice-request\n    option splice-response\n",
        },
        maxconn = 64 + place.hold.connections,
        hold = place.hold.connections + 64,
        listen = place.listen,
        backend = place.backend,
        hold_listen = place.hold_listen,
    );
    fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut command = Command::new(binary);
    // -db: foreground, one process (its threads), no master.
    command.arg("-db").arg("-f").arg(&config_path);
    Ok(command)
}

fn nginx_command(
    binary: &Path,
    stream_module: Option<&Path>,
    unshare: &Path,
    place: &Placement,
) -> anyhow::Result<Command> {
    let config_path = place.dir.join(format!("{}.conf", place.name));
    let load_module = stream_module
        .map(|module| format!("load_module {};\n", module.display()))
        .unwrap_or_default();
    // proxy_half_close: nginx closes both sides on the client's half-close unless told
    // not to, which would cut off every reply sent after it (the upload verdicts here).
    let hold_servers: String = place
        .hold
        .backends
        .iter()
        .map(|addr| format!("        server {addr};\n"))
        .collect();
    // A held connection takes two of a worker's connections, and reuseport may give
    // one worker most of them.
    let connections = 4096 + 2 * place.hold.connections;
    let config = format!(
        "{load_module}\
         daemon off;\n\
         worker_processes {PROXY_THREADS};\n\
         worker_rlimit_nofile {connections};\n\
         pid {pid};\n\
         error_log {log} warn;\n\
         events {{ worker_connections {connections}; }}\n\
         stream {{\n\
         \x20   server {{\n\
         \x20       listen {listen} reuseport;\n\
         \x20       proxy_pass {backend};\n\
         \x20       proxy_half_close on;\n\
         \x20       proxy_buffer_size {NGINX_BUFFER};\n\
         \x20   }}\n\
         \x20   upstream hold {{\n\
         {hold_servers}         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {hold_listen} reuseport;\n\
         \x20       proxy_pass hold;\n\
         \x20   }}\n\
         }}\n",
        pid = place.dir.join(format!("{}.pid", place.name)).display(),
        log = place.log.display(),
        listen = place.listen,
        backend = place.backend,
        hold_listen = place.hold_listen,
    );
    fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    // nginx's workers outlive a killed master. As the first process of its own PID
    // namespace the master takes them along when it dies, and --kill-child passes the
    // kill of unshare (our child, see process.rs) on to the master: so even a bench
    // killed with SIGKILL leaves no worker behind.
    let mut command = Command::new(unshare);
    command
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(binary);
    // -p and -e keep nginx out of /etc/nginx and /var/log/nginx.
    command
        .arg("-p")
        .arg(place.dir)
        .arg("-e")
        .arg(place.log)
        .arg("-c")
        .arg(&config_path);
    Ok(command)
}

/// Retries an echo handshake through the proxy until one works.
fn wait_until_serving(process: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process.check_alive()?;
        let header = Header {
            op: Op::Echo,
            duration: Duration::ZERO,
            byte_limit: 0,
            id: 0,
        };
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .and_then(|stream| {
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                Ok(stream)
            })
            .map_err(anyhow::Error::from)
            .and_then(|mut stream| wire::handshake(&mut stream, &header));
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("no working connection through {addr} within {START_TIMEOUT:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
