//! The `splice-proxy` command: parses the command line and routes.toml, loads the probe,
//! binds the listeners, drops privileges (`--user`), and runs the server until SIGTERM
//! or SIGINT; SIGHUP reloads the routes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{Context, anyhow};
use clap::{Parser, ValueEnum};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use splice_proxy::{
    Proxy, ProxyError, Splicing, Steering, config::Config, logging, privileges::Identity,
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

    /// Which worker a new connection goes to.
    #[arg(long, value_enum, default_value_t = SteeringArg::Auto)]
    steering: SteeringArg,

    /// Sockets the probe's maps can hold, two per spliced connection; connections beyond
    /// it are copied.
    #[arg(long, value_name = "N", default_value_t = proxy_probe::DEFAULT_MAP_CAPACITY)]
    map_capacity: u32,

    /// How long a connection is copied in userspace before it is spliced, unless a read
    /// of it fills a 64 KiB buffer first (e.g. "100ms", "1s"; default 100ms): short
    /// exchanges cost less copied. "0s" splices every connection right after its first
    /// message.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    splice_after: Option<Duration>,

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SteeringArg {
    /// By CPU when splicing, by hash when copying every connection.
    Auto,
    /// To the worker numbered after the CPU that received it (CPU mod workers): its
    /// packets and its worker then tend to share a CPU. Where one CPU receives most
    /// connections, the other workers help its worker once it falls behind.
    Cpu,
    /// To a worker picked by a hash of its addresses: an even spread.
    Hash,
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
    let identity = args
        .user
        .as_deref()
        .map(|user| {
            Identity::lookup(user, args.group.as_deref()).with_context(|| format!("--user {user}"))
        })
        .transpose()?;
    raise_fd_limit();

    let routes = config.routes.len();
    let mut proxy = Proxy::from_config(config)
        .listen(args.listen)
        .workers(args.workers)
        .steering(match args.steering {
            SteeringArg::Auto => Steering::Auto,
            SteeringArg::Cpu => Steering::ByCpu,
            SteeringArg::Hash => Steering::ByHash,
        })
        .map_capacity(args.map_capacity)
        .splicing(match args.mode {
            Mode::Auto => Splicing::Auto,
            Mode::Splice => Splicing::Required,
            Mode::Copy => Splicing::Off,
        });
    if let Some(after) = args.splice_after {
        proxy = proxy.splice_after(after);
    }
    if let Some(addr) = args.metrics {
        proxy = proxy.metrics(addr);
    }
    if let Some(identity) = identity {
        proxy = proxy.run_as(identity);
    }
    let proxy = proxy.start().map_err(|e| match (&e, &args.user) {
        (ProxyError::ProbeLoad(_), _) => anyhow::Error::new(e).context("--mode splice"),
        (ProxyError::MapsRefused(_), Some(user)) => {
            anyhow!("--user {user}: {e}; run without --user, or with --mode copy")
        }
        (ProxyError::Privileges(_), Some(user)) => {
            anyhow::Error::new(e).context(format!("--user {user}"))
        }
        _ => e.into(),
    })?;
    if let Some(addr) = proxy.metrics_addr() {
        tracing::info!("metrics at http://{addr}/metrics");
    }
    // Before the "listening" line, so that a signal sent once it is logged is handled.
    let mut signals =
        Signals::new([SIGHUP, SIGTERM, SIGINT]).context("installing the signal handlers")?;
    let mode = if proxy.is_splicing() {
        "splice"
    } else {
        "copy"
    };
    let steering = match proxy.steering() {
        Steering::ByCpu => "steered by CPU",
        _ => "spread by hash",
    };
    tracing::info!(
        "listening on {} ({mode} mode, {routes} routes from {}, connections {steering})",
        proxy.local_addr(),
        args.routes.display()
    );
    for signal in signals.forever() {
        match signal {
            SIGHUP => reload(&proxy, &args.routes),
            _ => break,
        }
    }
    // A second SIGTERM or SIGINT ends the grace at once.
    let closer = proxy.closer();
    let handle = signals.handle();
    let second = thread::spawn(move || {
        if signals
            .forever()
            .any(|signal| signal == SIGTERM || signal == SIGINT)
        {
            tracing::info!("a second signal: closing every connection now");
            closer.close_now();
        }
    });
    proxy.shutdown(args.shutdown_grace);
    handle.close();
    second
        .join()
        .map_err(|_| anyhow!("the thread that waits for a second signal panicked"))?;
    Ok(())
}

/// Replaces the routes and limits of new connections with the file's, if it is valid.
/// Connections already accepted keep the routing they started with.
fn reload(proxy: &Proxy, routes: &Path) {
    match Config::load(routes) {
        Ok(config) => {
            proxy.reload(&config);
            tracing::info!(
                "reloaded {} routes from {}",
                config.routes.len(),
                routes.display()
            );
        }
        Err(e) => tracing::warn!("reload failed, keeping the current routes: {e}"),
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
