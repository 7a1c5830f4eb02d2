//! The `splice-proxy` command: parses the command line and routes.toml, loads the probe,
//! and runs the server until it is killed.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, ValueEnum};
use splice_proxy::{
    config::Config,
    probe::{AttachMode, Probe},
    route::RouteTable,
    server::{Limits, Listeners, Server},
    splice::SpliceEngine,
};

/// A TCP reverse proxy that routes each connection on its first message (a byte prefix,
/// bytes at an offset, a length, or a default route), then splices client and backend
/// inside the kernel with a BPF sockmap: after the first message no payload byte
/// crosses into this process.
///
/// Splicing needs root (or CAP_BPF and CAP_NET_ADMIN) and a kernel with SOCKHASH
/// (4.18+). Logs go to stderr, one line per connection; RUST_LOG (e.g. "debug") sets the level.
#[derive(Parser, Debug)]
#[command(version, about, long_about, max_term_width = 100)]
struct Args {
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10000")]
    listen: SocketAddr,

    /// The routes file (TOML; see README.md for every key).
    #[arg(long, value_name = "FILE")]
    routes: PathBuf,

    /// Validate the routes file, print the routes, and exit 0 if it is valid, 1 if not.
    #[arg(long)]
    check: bool,

    /// How bytes move after the first message.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,

    /// Which programs the probe attaches: the stream verdict alone (faster here), or the
    /// stream parser and the verdict.
    #[arg(long, value_enum, default_value_t = Attach::Verdict)]
    attach: Attach,

    /// Executors accepting connections (one SO_REUSEPORT listener each); 0 = one per CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    executors: usize,

    /// Threads that watch spliced connections and copy the rest; 0 = one per CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    splice_workers: usize,

    /// Sockets the probe's maps can hold, two per spliced connection; connections beyond
    /// it are copied.
    #[arg(long, value_name = "N", default_value_t = proxy_probe::DEFAULT_MAP_CAPACITY)]
    map_capacity: u32,
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
enum Attach {
    /// stream_verdict only.
    Verdict,
    /// stream_parser + stream_verdict.
    Parser,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,glommio=error")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splice-proxy: {e:#}");
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

    let attach = match args.attach {
        Attach::Verdict => AttachMode::Verdict,
        Attach::Parser => AttachMode::ParserAndVerdict,
    };
    let probe = match args.mode {
        Mode::Copy => None,
        Mode::Splice => Some(Probe::load(attach, args.map_capacity).map_err(|e| {
            anyhow!(
                "--mode splice: the probe could not be loaded: {}",
                with_root_cause(&e)
            )
        })?),
        Mode::Auto => match Probe::load(attach, args.map_capacity) {
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
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let or_cpus = |n: usize| if n == 0 { cpus } else { n };
    let mode = if probe.is_some() { "splice" } else { "copy" };
    let engine = Arc::new(
        SpliceEngine::new(probe.map(Arc::new), or_cpus(args.splice_workers))
            .context("starting the splice workers")?,
    );

    let listeners = Listeners::bind(args.listen, or_cpus(args.executors))
        .with_context(|| format!("listening on {}", args.listen))?;
    let limits = Limits::from(&config);
    let router = Arc::new(RouteTable::new(&config));
    let server =
        Server::start(listeners, router, limits, engine).context("starting the executors")?;
    tracing::info!(
        "listening on {} ({mode} mode{}, {} routes from {})",
        server.local_addr(),
        if mode == "splice" {
            format!(", {attach}")
        } else {
            String::new()
        },
        config.routes.len(),
        args.routes.display()
    );
    server.join();
    bail!("every executor stopped")
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
