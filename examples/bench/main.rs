//! The splice-proxy benchmark: one run measures each target side by side on 127.0.0.1:
//!
//! - `direct`: the client talks to the backend with no proxy (the limit),
//! - `splice-verdict`: splice-proxy in splice mode (`splice-hashed`, on request: with
//!   `--steering hash`), `copy`: splice-proxy copying in userspace,
//! - `haproxy`: HAProxy in `mode tcp` with `option splice-request` and
//!   `option splice-response`, as its users configure it for speed (`haproxy-auto`, on
//!   request: with `option splice-auto` instead),
//! - `nginx`: the nginx `stream` module,
//!
//! under these workloads, each a few seconds and bounded in time and count:
//!
//! - bulk: 1 and 4 streams, upload and download, in Gbit/s, every byte verified at the
//!   sink against a reference block (see `wire.rs`), and the peak memory the machine
//!   gave the run, kernel included (MemAvailable's largest fall, see `measure.rs`);
//! - ping-pong: 1 KiB request and response at 1 and 32 connections: requests/s and
//!   latency percentiles in microseconds, every response compared with its request;
//! - connection rate: connect, 64-byte first message, echo, close: connections/s and
//!   latency percentiles;
//! - CPU: per GB (bulk), per 10k requests and per 10k connections, for the proxy's
//!   processes (/proc/<pid>/stat) and for the whole machine (/proc/stat, less other
//!   processes' user time; see `measure.rs`);
//! - hold: 100,000 connections open at once (`--hold`), each checked to carry bytes,
//!   with the proxy's memory, descriptors and BPF map memory per connection
//!   (`hold.rs`), once per target; spread over several instances of each proxy when
//!   one process may not hold that many descriptors.
//!
//! Each workload runs `--repeats` times per target, interleaved across the targets so
//! that a burst of outside load hits them alike; a table per workload shows medians,
//! the range of the first figure, and every figure's ratio to direct, and notes the
//! runs that were disturbed (a wide range, or other processes busy during a run) or that
//! failed.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench
//! cargo run --release --example bench -- --quick --skip-missing   # smoke test
//! cargo run --release --example bench -- --workloads bulk --targets splice-verdict
//! scripts/bench-full    # waits (bounded) for a quiet machine, runs, keeps the report
//! cargo test --release --example bench                            # the tool's own tests
//! ```
//!
//! `--quick` runs every workload briefly and once: it checks bytes, not speed. The exit
//! status is non-zero if any run failed or any byte check failed, in either mode.
//! BENCHMARKS.md has the standings, the latest full run and what every figure means;
//! the investigations behind them are in benchmarks/.
//!
//! The proxies run as child processes with configs generated into a temporary
//! directory and are killed when the bench ends, however it ends (`process.rs`).
//! splice-proxy is the real binary built next to this example, so build it first; it
//! needs root to load its probe. HAProxy and nginx come from Debian (`apt-get install
//! haproxy nginx libnginx-mod-stream`); a missing one is an error, or a warning and a
//! skipped target with `--skip-missing`. The backends are a second process (this
//! executable with `--backend`), so that their CPU time never mixes with the clients'.

mod backend;
mod hold;
mod measure;
mod process;
mod report;
mod targets;
mod wire;
mod workloads;

use std::{
    net::SocketAddr,
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;

use crate::{
    backend::{Backend, HoldBackend},
    measure::{MemoryWatch, Processes, Snapshot, Usage},
    process::TempDir,
    report::{Cell, Sample},
    targets::{HoldPlan, Kind, Program, Target},
    wire::{Damaged, Pattern},
    workloads::Workload,
};

/// Benchmarks splice-proxy against a direct connection, HAProxy and nginx on 127.0.0.1.
#[derive(Parser, Debug)]
#[command(max_term_width = 100)]
struct Args {
    /// Smoke test: every workload once and briefly; checks bytes, not speed.
    #[arg(long)]
    quick: bool,

    /// Skip a target whose program is not installed (with a warning) instead of failing.
    #[arg(long)]
    skip_missing: bool,

    /// Seconds per run [default: 2, or 0.2 with --quick].
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,

    /// Runs of each workload per target [default: 3, or 1 with --quick].
    #[arg(long, value_name = "N")]
    repeats: Option<usize>,

    /// Only these targets, comma-separated: direct, splice-verdict, splice-hashed, copy,
    /// haproxy, haproxy-auto, nginx [default: all but splice-hashed and haproxy-auto].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    targets: Vec<String>,

    /// Only these workloads, comma-separated: bulk, ping-pong, connection-rate, hold
    /// [default: all].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    workloads: Vec<String>,

    /// Connections the hold workload keeps open at once [default: 100000, or 200 with
    /// --quick].
    #[arg(long, value_name = "N")]
    hold: Option<usize>,

    /// splice-proxy's `splice_backlog_max` in bytes [default: its own default]: what the
    /// kernel may hold per spliced direction, which bulk throughput and CPU depend on.
    #[arg(long, value_name = "BYTES")]
    splice_backlog: Option<u64>,

    /// Run as the bench's backend process (the bench starts it itself).
    #[arg(long, hide = true)]
    backend: bool,

    /// Run as a hold shard's echo server (the bench starts it itself).
    #[arg(long, hide = true)]
    hold_backend: bool,

    /// Run as a hold shard's opening process (the bench starts it itself).
    #[arg(long, hide = true, value_name = "FIRST:COUNT:ADDRS")]
    hold_open: Option<String>,
}

/// Bounds on the knobs, so that a typo cannot start an hour-long run.
const MAX_SECONDS: f64 = 30.0;
const MAX_REPEATS: usize = 10;
const MAX_HOLD: usize = 200_000;
/// The hold workload's name in `--workloads`: it runs once per target, after the others.
const HOLD: &str = "hold";
/// Pause between runs, so that one run's closing connections are done before the next.
const SETTLE: Duration = Duration::from_millis(100);

struct Settings {
    workloads: Vec<Workload>,
    duration: Duration,
    repeats: usize,
    quick: bool,
    /// Connections to hold, if the hold workload runs.
    hold: Option<usize>,
}

impl Settings {
    fn from_args(args: &Args) -> anyhow::Result<Settings> {
        let seconds = args.seconds.unwrap_or(if args.quick { 0.2 } else { 2.0 });
        if !(0.05..=MAX_SECONDS).contains(&seconds) {
            bail!("--seconds must be between 0.05 and {MAX_SECONDS}");
        }
        let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 3 });
        if !(1..=MAX_REPEATS).contains(&repeats) {
            bail!("--repeats must be between 1 and {MAX_REPEATS}");
        }
        for family in &args.workloads {
            if !Workload::FAMILIES.contains(&family.as_str()) && family != HOLD {
                bail!(
                    "unknown workload {family:?}; the workloads are {}, {HOLD}",
                    Workload::FAMILIES.join(", ")
                );
            }
        }
        let hold = args.hold.unwrap_or(if args.quick { 200 } else { 100_000 });
        if !(1..=MAX_HOLD).contains(&hold) {
            bail!("--hold must be between 1 and {MAX_HOLD}");
        }
        let hold =
            (args.workloads.is_empty() || args.workloads.iter().any(|f| f == HOLD)).then_some(hold);
        let workloads = Workload::ALL
            .into_iter()
            .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|f| f == w.family()))
            .collect();
        Ok(Settings {
            workloads,
            duration: Duration::from_secs_f64(seconds),
            repeats,
            quick: args.quick,
            hold,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    targets::SPLICE_BACKLOG
        .set(args.splice_backlog)
        .expect("set once, before any target starts");
    let result = if args.backend {
        backend::run().map(|()| true)
    } else if args.hold_backend {
        backend::run_hold_only().map(|()| true)
    } else if let Some(share) = &args.hold_open {
        hold::Share::parse(share)
            .and_then(|share| hold::open_and_hold(&share))
            .map(|()| true)
    } else {
        run(&args)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether every run passed.
fn run(args: &Args) -> anyhow::Result<bool> {
    let settings = Settings::from_args(args)?;
    let kinds = selected_kinds(&args.targets)?;
    stop::install().context("installing the signal handlers")?;
    // How many instances of each proxy share the hold workload's connections.
    let mut shards = 1;
    if let Some(wanted) = settings.hold {
        // A proxy holds two descriptors per connection, and the children inherit the
        // limit; without CAP_SYS_RESOURCE it stops at the hard limit.
        let limit = raise_fd_limit(2 * wanted as u64 + FD_MARGIN)?;
        let possible = (limit.saturating_sub(FD_MARGIN) / 2).max(1) as usize;
        shards = wanted.div_ceil(possible);
        if shards > 1 {
            eprintln!(
                "note: the descriptor limit is {limit} and cannot be raised (raising the hard limit \
                 needs CAP_SYS_RESOURCE): a proxy holds 2 per connection, so the hold workload \
                 spreads {wanted} connections over {shards} instances of each proxy, at most \
                 {} each",
                wanted.div_ceil(shards)
            );
        }
    }

    let mut programs = Vec::new();
    for kind in kinds {
        match targets::locate(kind) {
            Ok(program) => programs.push((kind, program)),
            Err(why) if args.skip_missing => {
                eprintln!("warning: skipping {}: {why}", kind.name());
            }
            Err(why) => bail!("{}: {why} (or pass --skip-missing to skip it)", kind.name()),
        }
    }

    // Declared first, dropped last: the children are gone before their directory.
    let mut dir = TempDir::new()?;
    let backend = Backend::start()?;
    let hold_plan = HoldPlan {
        backends: &backend.hold,
        connections: settings.hold.unwrap_or(0).div_ceil(shards),
    };
    let mut targets = Vec::new();
    for (kind, program) in &programs {
        targets.push(match program {
            None => Target::direct(backend.addr, &hold_plan),
            Some(program) => {
                Target::start(*kind, program, backend.addr, &hold_plan, dir.path(), 0)?
            }
        });
    }

    let load_before = measure::load_average();
    print_preamble(&settings, &targets, &load_before);
    let started = Instant::now();
    let results = run_all(&settings, &mut targets, backend.process.id())?;

    let held = match settings.hold {
        Some(connections) => {
            let shards = Shards {
                count: shards,
                programs: &programs,
                backend: backend.addr,
                dir: dir.path(),
            };
            Some((connections, run_hold(connections, &shards, &mut targets)?))
        }
        None => None,
    };

    for (workload, cells) in &results {
        println!("\n{}", workload.title());
        print!("{}", report::workload_table(*workload, cells));
    }
    if let Some((connections, rows)) = &held {
        let spread = match shards {
            1 => String::new(),
            _ => format!(", over {shards} instances of each proxy"),
        };
        println!(
            "\nhold {connections} connections (64 B echoed at open, 16 B more once all are open{spread})"
        );
        print!("{}", hold::table(*connections, rows));
    }
    print_summary(&settings, &results, &targets, started.elapsed());

    let passed = results
        .iter()
        .flat_map(|(_, cells)| cells)
        .all(|cell| cell.failures.is_empty())
        && held
            .iter()
            .flat_map(|(_, rows)| rows)
            .all(|(_, held)| held.is_ok());
    if !passed {
        dir.keep();
        println!(
            "\nSOME RUNS FAILED (see the notes). Configs and proxy logs are kept in {}",
            dir.path().display()
        );
    }
    Ok(passed)
}

fn selected_kinds(names: &[String]) -> anyhow::Result<Vec<Kind>> {
    if names.is_empty() {
        return Ok(Kind::DEFAULT.to_vec());
    }
    let mut kinds = Vec::new();
    for name in names {
        let kind = Kind::parse(name).with_context(|| {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!(
                "unknown target {name:?}; the targets are {}",
                known.join(", ")
            )
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    // Ratios need direct.
    if !kinds.contains(&Kind::Direct) {
        kinds.insert(0, Kind::Direct);
    }
    Ok(kinds)
}

/// Every workload, `repeats` rounds of every target in turn.
fn run_all(
    settings: &Settings,
    targets: &mut [Target],
    backend_pid: u32,
) -> anyhow::Result<Vec<(Workload, Vec<Cell>)>> {
    let pattern = Pattern::new();
    let total = settings.workloads.len() * settings.repeats * targets.len();
    let mut done = 0;
    let mut results = Vec::new();
    for &workload in &settings.workloads {
        let mut cells: Vec<Cell> = targets.iter().map(|t| Cell::new(t.kind)).collect();
        for _ in 0..settings.repeats {
            for (target, cell) in targets.iter_mut().zip(&mut cells) {
                if stop::requested() {
                    bail!("interrupted");
                }
                done += 1;
                let progress = format!(
                    "[{done:3}/{total}] {} | {}",
                    workload.title(),
                    target.kind.name()
                );
                match run_once(workload, target, backend_pid, settings.duration, &pattern) {
                    Ok(sample) => {
                        eprintln!("{progress} | {:.2}", sample.rate);
                        cell.samples.push(sample);
                    }
                    Err(e) => {
                        eprintln!("{progress} | FAILED: {e:#}");
                        if e.chain().any(|cause| cause.is::<Damaged>()) {
                            cell.damaged += 1;
                        }
                        cell.failures.push(format!("{e:#}"));
                    }
                }
                std::thread::sleep(SETTLE);
            }
        }
        results.push((workload, cells));
    }
    Ok(results)
}

/// What it takes to start a target's extra instances for the hold workload.
struct Shards<'a> {
    /// Instances per target, the target itself included.
    count: usize,
    /// Each target's program, in the targets' order.
    programs: &'a [(Kind, Option<Program>)],
    backend: SocketAddr,
    dir: &'a Path,
}

/// The hold workload, once per target: over the target alone, or over it and
/// `shards - 1` more instances of it, each with a hold backend process of its own,
/// started for the workload and stopped after it.
fn run_hold(
    connections: usize,
    shards: &Shards,
    targets: &mut [Target],
) -> anyhow::Result<Vec<(Kind, Result<hold::Held, String>)>> {
    let mut rows = Vec::new();
    let total = targets.len();
    for (index, (target, (_, program))) in targets.iter_mut().zip(shards.programs).enumerate() {
        if stop::requested() {
            bail!("interrupted");
        }
        let progress = format!(
            "[{}/{}] hold {connections} connections | {}",
            index + 1,
            total,
            target.kind.name()
        );
        let per_shard = connections.div_ceil(shards.count);
        let outcome = start_shards(target.kind, program.as_ref(), shards, per_shard)
            .and_then(|mut extra| {
                let mut fleet: Vec<&mut Target> = std::iter::once(&mut *target)
                    .chain(extra.iter_mut().map(|(_, instance)| instance))
                    .collect();
                let held = hold::run(&mut fleet, connections);
                for (_, instance) in &extra {
                    target.adopt_log(instance);
                }
                held
            })
            .map_err(|e| format!("{e:#}"));
        match &outcome {
            Ok(held) => eprintln!("{progress} | opened in {:.1} s", held.open_seconds),
            Err(e) => eprintln!("{progress} | FAILED: {e}"),
        }
        rows.push((target.kind, outcome));
        std::thread::sleep(SETTLE);
    }
    Ok(rows)
}

/// A target's instances beyond the first, each with its hold backend.
fn start_shards(
    kind: Kind,
    program: Option<&Program>,
    shards: &Shards,
    per_shard: usize,
) -> anyhow::Result<Vec<(HoldBackend, Target)>> {
    (1..shards.count)
        .map(|shard| {
            let backend = HoldBackend::start()?;
            let plan = HoldPlan {
                backends: &backend.hold,
                connections: per_shard,
            };
            let instance = match program {
                None => Target::direct(shards.backend, &plan),
                Some(program) => {
                    Target::start(kind, program, shards.backend, &plan, shards.dir, shard)?
                }
            };
            Ok((backend, instance))
        })
        .collect()
}

/// Descriptors a proxy keeps beside two per held connection: HAProxy's and nginx's
/// connection tables are sized for the hold plus this.
const FD_MARGIN: u64 = 4096;

/// Raises this process's descriptor limit (soft and hard) towards `wanted`, within the
/// kernel's fs.nr_open, and returns the limit reached: the hard limit itself where it
/// cannot be raised (no CAP_SYS_RESOURCE). The proxies and backends inherit it.
fn raise_fd_limit(wanted: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(hard);
    let limit = wanted.min(nr_open).max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, limit, limit).is_ok() {
        return Ok(limit);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok(hard)
}

fn run_once(
    workload: Workload,
    target: &mut Target,
    backend_pid: u32,
    duration: Duration,
    pattern: &Pattern,
) -> anyhow::Result<Sample> {
    target.check_alive()?;
    let processes = Processes {
        bench: std::process::id(),
        backend: backend_pid,
        proxy: target.pids(),
    };
    let before = Snapshot::take(&processes);
    // Only bulk holds enough in the kernel to show; elsewhere the sampler's wake-ups
    // would only touch the latencies.
    let memory = matches!(workload, Workload::Bulk { .. })
        .then(MemoryWatch::start)
        .flatten();
    let outcome = workloads::run(workload, target.addr, duration, pattern)?;
    let peak_memory = memory.and_then(MemoryWatch::stop);
    let after = Snapshot::take(&processes);
    target.check_alive()?;
    Ok(Sample::new(
        workload,
        outcome,
        Usage::between(&before, &after),
        peak_memory,
        target.kind != Kind::Direct,
    ))
}

fn print_preamble(settings: &Settings, targets: &[Target], load: &str) {
    println!("splice-proxy benchmark (examples/bench)");
    println!(
        "machine: {} CPUs, Linux {}, load average {load} (1, 5, 15 min) at the start",
        measure::cpus(),
        measure::kernel()
    );
    println!(
        "{}: {} run(s) of {:.1} s per workload and target, interleaved across targets",
        if settings.quick {
            "quick mode (figures are not measurements)"
        } else {
            "full mode"
        },
        settings.repeats,
        settings.duration.as_secs_f64()
    );
    println!("targets:");
    for target in targets {
        println!("  {:<15} {}", target.kind.name(), target.kind.describe());
    }
    println!(
        "figures: medians over the runs; min-max: the range of the first figure; x: the figure\n\
         before it divided by direct's. CPU in seconds per GB moved (bulk) or per 10k requests\n\
         or connections: proxy = the proxy's processes, machine = all CPUs less other\n\
         processes' user time. peak mem MiB (bulk): the largest fall of the machine's\n\
         MemAvailable below its value at the run's start, kernel memory included. Notes:\n\
         range = the first figure's range is wider than {:.0}% of its median; others = other\n\
         processes used more than {:.0}% of the machine in a run.",
        report::DISTURBED_RANGE * 100.0,
        report::DISTURBED_OTHERS * 100.0
    );
}

fn print_summary(
    settings: &Settings,
    results: &[(Workload, Vec<Cell>)],
    targets: &[Target],
    elapsed: Duration,
) {
    print_splice_counts(targets);
    let cells: Vec<&Cell> = results.iter().flat_map(|(_, cells)| cells).collect();
    let disturbed = cells.iter().filter(|cell| cell.disturbed()).count();
    println!(
        "\n{disturbed} of {} workload/target cells disturbed; load average {} at the end (the\n\
         bench's own threads count in it: the \"others\" notes tell outside load); the run took {:.0} s{}",
        cells.len(),
        measure::load_average(),
        elapsed.as_secs_f64(),
        if settings.quick { " (quick mode)" } else { "" }
    );
}

/// Whether splice-proxy spliced what it was asked to: a connection it copies instead
/// would make a splice figure a copy figure.
fn print_splice_counts(targets: &[Target]) {
    // The proxy logs a connection when it closes: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(300));
    let counts: Vec<String> = targets
        .iter()
        .filter_map(|target| {
            let (spliced, copied) = target.splice_counts()?;
            Some(format!(
                "  {:<15} {spliced} spliced, {copied} copied",
                target.kind.name()
            ))
        })
        .collect();
    if !counts.is_empty() {
        println!("\nsplice-proxy connections by mode, from the logs of each target's instances:");
        println!("{}", counts.join("\n"));
    }
}

/// Ctrl-C and friends end the bench between two runs, through the normal return path,
/// so that every guard kills its child.
mod stop {
    use super::{AtomicBool, Ordering};

    static REQUESTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        REQUESTED.store(true, Ordering::SeqCst);
    }

    pub fn install() -> std::io::Result<()> {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            // glibc's signal() installs it with SA_RESTART.
            let previous = unsafe {
                libc::signal(
                    signal,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
            if previous == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }
}
