//! The `splice-proxy` command: parses the command line and routes.toml, loads the probe,
//! binds the listeners, drops privileges (`--user`), and runs the server until SIGTERM
//! or SIGINT; SIGHUP reloads the routes.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use clap::{Parser, ValueEnum};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use splice_proxy::logging;
use splice_proxy::{
    config::Config,
    metrics,
    privileges::{self, Identity},
    probe::{self, Backlog, Probe},
    route::RouteTable,
    server::{Limits, Listeners, Server},
    splice::{SPLICED_SEND_BUFFER, SpliceEngine},
};

/// A TCP reverse proxy that routes each connection on its first message (TLS SNI and
/// ALPN, HTTP Host and path, a byte prefix, bytes at an offset, a regex, a length, or a
/// default route), then splices client and backend inside the kernel with a BPF
/// sockmap: after the first message no payload byte crosses into this process.
///
/// Splicing needs root (or CAP_BPF and CAP_NET_ADMIN) and a kernel with SOCKHASH
/// (4.18+). Logs go to stderr, one line per connection; RUST_LOG (e.g. "debug") sets the level.
///
/// SIGHUP re-reads the routes file for new connections (a broken file keeps the old
/// routes); SIGTERM or SIGINT stops accepting and waits for live connections up to
/// --shutdown-grace, then closes the rest and exits 0.
#[derive(Parser, Debug)]
#[command(version, about, long_about, max_term_width = 100)]
struct Args {
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10000")]
    listen: SocketAddr,

    /// The routes file (TOML; see README.md for every key).
    #[arg(long, value_name = "FILE")]
    routes: PathBuf,

    /// Validate the routes file, print the routes (matchers, backends and weights,
    /// balance policy, health checks), and exit 0 if it is valid, 1 if not.
    #[arg(long)]
    check: bool,

    /// How bytes move after the first message.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,

    /// Worker threads, each with its own SO_REUSEPORT listener: a connection lives on the
    /// worker that accepted it until it closes; 0 = one per CPU. (`--splice-workers` and
    /// `--executors`, the two thread pools this replaced, are accepted as its names.)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        visible_alias = "splice-workers",
        alias = "executors"
    )]
    workers: usize,

    /// Sockets the probe's maps can hold, two per spliced connection; connections beyond
    /// it are copied.
    #[arg(long, value_name = "N", default_value_t = proxy_probe::DEFAULT_MAP_CAPACITY)]
    map_capacity: u32,

    /// On SIGTERM or SIGINT, how long live connections may take to finish before the
    /// rest are reset (e.g. "30s", "500ms"); a second signal ends it at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// How log lines are written to stderr: text for people, or JSON, one object per
    /// line with the fields at the top level, for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Once the probe is loaded and the listeners are bound, become this user, with no
    /// supplementary groups and no capabilities (the process must start as root). The
    /// routes file must be readable by the user for SIGHUP.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    /// With --user: the group to become, instead of the user's primary group.
    #[arg(long, value_name = "NAME", requires = "user")]
    group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Splice; if the probe cannot load, warn once and copy every connection.
    Auto,
    /// Splice; if the probe cannot load, exit with the reason.
    Splice,
    /// Never splice: copy every connection in userspace.
    Copy,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // tracing-subscriber itself only looks at NO_COLOR, not at where the lines go.
    let logs = tracing_subscriber::fmt()
        .with_ansi(logging::colors_wanted(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    match args.log_format {
        LogFormat::Text => logs.with_writer(std::io::stderr).init(),
        LogFormat::Json => logs
            .with_writer(logging::JsonEscaped(std::io::stderr))
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    let log_format = args.log_format;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match log_format {
                LogFormat::Text => eprintln!("splice-proxy: {e:#}"),
                // Every line a log collector reads must be an object.
                LogFormat::Json => tracing::error!("{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.routes)?;
    if args.check {
        print!("{config}");
        return Ok(());
    }

    let backlog = Backlog {
        bytes: config.splice_backlog_max,
    };
    let mut probe = match args.mode {
        Mode::Copy => None,
        Mode::Splice => Some(Probe::load(args.map_capacity, backlog).map_err(|e| {
            anyhow!(
                "--mode splice: the probe could not be loaded: {}",
                with_root_cause(&e)
            )
        })?),
        Mode::Auto => match Probe::load(args.map_capacity, backlog) {
            Ok(probe) => Some(probe),
            Err(e) => {
                tracing::warn!(
                    "the probe could not be loaded, so every connection is copied in userspace: {}",
                    with_root_cause(&e)
                );
                None
            }
        },
    };
    raise_fd_limit();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let or_cpus = |n: usize| if n == 0 { cpus } else { n };
    let workers = or_cpus(args.workers);
    let listeners = Listeners::bind(args.listen, workers)
        .with_context(|| format!("listening on {}", args.listen))?;
    let metrics_listener = args
        .metrics
        .map(|addr| {
            TcpListener::bind(addr).with_context(|| format!("--metrics: listening on {addr}"))
        })
        .transpose()?;
    // Before the engine starts its threads: each thread keeps the capabilities it was
    // started with.
    if let Some(user) = &args.user {
        let identity = Identity::lookup(user, args.group.as_deref())
            .with_context(|| format!("--user {user}"))?;
        privileges::drop_to(&identity).with_context(|| format!("--user {user}"))?;
        tracing::info!(
            "running as {}:{} ({}:{}) with no capabilities",
            identity.user,
            identity.group,
            identity.uid,
            identity.gid
        );
        // Kernels before 5.11 (Debian 11's 5.10 among them) refuse every bpf() command,
        // on maps already open too, to a process without CAP_BPF or CAP_SYS_ADMIN while
        // unprivileged BPF is disabled: then the maps are useless from here on.
        if let Some(loaded) = &probe
            && let Err(e) = loaded.counters()
        {
            let why = format!(
                "--user: this kernel refuses the probe's maps to a process without capabilities ({}), so it cannot splice after dropping them",
                with_root_cause(&e)
            );
            match args.mode {
                Mode::Splice => {
                    return Err(anyhow!("{why}; run without --user, or with --mode copy"));
                }
                _ => {
                    tracing::warn!("{why}: every connection is copied in userspace");
                    probe = None;
                }
            }
        }
        if probe.is_some() {
            warn_if_send_buffers_capped();
        }
    }
    if probe.is_some()
        && let Some(release) = probe::kernel_release()
        && !probe::bound_is_tested_on(&release)
    {
        let why = format!(
            "kernel {release}: the bound on a spliced direction (splice_backlog_max) is tested on 6.1, 6.12 and 6.18, not on older kernels, and on 5.10 a throttled direction stalled and once delivered wrong bytes (docs/flow-control.md)"
        );
        match args.mode {
            Mode::Splice => tracing::warn!("{why}; splicing as --mode splice asks"),
            _ => {
                tracing::warn!("{why}: every connection is copied in userspace");
                probe = None;
            }
        }
    }
    let mode = if probe.is_some() { "splice" } else { "copy" };

    let engine = Arc::new(
        SpliceEngine::new(probe.map(Arc::new), workers).context("starting the splice workers")?,
    );
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        metrics::serve(listener, Arc::clone(engine.metrics()))
            .context("starting the metrics endpoint")?;
        tracing::info!("metrics at http://{addr}/metrics");
    }
    let limits = Limits::from(&config);
    let router = Arc::new(RouteTable::new(&config));
    // Before the "listening" line, so that a signal sent once it is logged is handled.
    let mut signals =
        Signals::new([SIGHUP, SIGTERM, SIGINT]).context("installing the signal handlers")?;
    let server = Server::start(listeners, router, limits, Arc::clone(&engine))
        .context("starting to accept")?;
    tracing::info!(
        "listening on {} ({mode} mode, {} routes from {})",
        server.local_addr(),
        config.routes.len(),
        args.routes.display()
    );
    for signal in signals.forever() {
        match signal {
            SIGHUP => reload(&server, &engine, &args.routes),
            _ => break,
        }
    }
    shut_down(&server, &engine, &mut signals, args.shutdown_grace);
    Ok(())
}

/// Replaces the routes and limits of new connections with the file's, if it is valid.
/// Connections already accepted keep the routing they started with.
fn reload(server: &Server, engine: &SpliceEngine, routes: &Path) {
    match Config::load(routes) {
        Ok(config) => {
            server
                .routing()
                .replace(Arc::new(RouteTable::new(&config)), Limits::from(&config));
            let backlog = Backlog {
                bytes: config.splice_backlog_max,
            };
            if let Some(probe) = engine.probe()
                && let Err(e) = probe.set_backlog(backlog)
            {
                tracing::warn!(
                    "reload: setting splice_backlog_max failed, keeping the old one: {e}"
                );
            }
            tracing::info!(
                "reloaded {} routes from {}",
                config.routes.len(),
                routes.display()
            );
        }
        Err(e) => tracing::warn!("reload failed, keeping the current routes: {e}"),
    }
}

/// Stops accepting, waits up to `grace` for the connections the proxy holds (reading
/// their first message, or adopted by the engine) to end, then resets what is left.
fn shut_down(server: &Server, engine: &SpliceEngine, signals: &mut Signals, grace: Duration) {
    let deadline = Instant::now() + grace;
    if let Err(e) = server.stop_accepting() {
        tracing::error!("stopping the listeners failed: {e}");
    }
    let live = || server.in_flight() + engine.live();
    tracing::info!("shutting down: {} connections live", live());
    loop {
        if live() == 0 {
            tracing::info!("shutdown complete");
            return;
        }
        let again = signals
            .pending()
            .any(|signal| signal == SIGTERM || signal == SIGINT);
        if again || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    tracing::info!("grace period over: closing {} connections", live());
    engine.shutdown();
    // Let the workers send their resets and log each connection; connections still
    // reading their first message close when the process exits.
    let limit = Instant::now() + Duration::from_secs(1);
    while engine.live() > 0 && Instant::now() < limit {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Every connection holds two descriptors (client and upstream): the usual soft limit of
/// 1024 would refuse connections from the 500th on, while the hard limit (often 500k
/// under systemd) is the operator's real choice. So the soft limit goes up to it.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        Ok(hard)
    });
    match raised {
        Ok(limit) => tracing::debug!("descriptor limit: {limit}"),
        Err(e) => tracing::warn!("raising the descriptor limit to its hard limit failed: {e}"),
    }
}

/// Without CAP_NET_ADMIN the spliced sockets' send buffers stop at net.core.wmem_max,
/// and a splice with small buffers is no faster than a copy: say so once, with the fix.
fn warn_if_send_buffers_capped() {
    let path = "/proc/sys/net/core/wmem_max";
    let Some(max) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
    else {
        return;
    };
    if max < SPLICED_SEND_BUFFER {
        tracing::warn!(
            "without CAP_NET_ADMIN the spliced sockets' send buffers stop at net.core.wmem_max = {max} bytes, \
             not {SPLICED_SEND_BUFFER}, which slows splicing: sysctl net.core.wmem_max={SPLICED_SEND_BUFFER} restores them"
        );
    }
}

/// An error's message and its innermost cause (the OS error, usually). aya's errors
/// repeat their cause at every level, so the whole chain would say it three times.
fn with_root_cause(error: &dyn std::error::Error) -> String {
    let mut root = error;
    while let Some(source) = root.source() {
        root = source;
    }
    if std::ptr::addr_eq(root, error) {
        error.to_string()
    } else {
        format!("{error}: {root}")
    }
}
