//! CPU accounting from /proc, the memory a run takes, latency percentiles, and what the
//! machine is.
//!
//! A proxy's own CPU is the utime + stime of its processes (/proc/<pid>/stat, all threads
//! included). That misses what the kernel does for it in softirq and kworker context,
//! which is where a sockmap splice does its work, so the machine's CPU is read too
//! (/proc/stat). The machine is shared, so the user time of every process that is not
//! the bench's (bench, backends, proxy) is counted separately as "others": it is taken
//! out of the machine figure and, when it is large, marks the run as disturbed. The
//! system time of other processes cannot be told apart from our softirq work and stays
//! in; it is small next to a compiler's user time.
//!
//! A spliced byte waits in the kernel (socket buffers, pipes, the psock's queue), not in
//! the proxy's memory, so a run's memory is read for the whole machine, kernel and
//! processes alike: the largest fall of MemAvailable (/proc/meminfo) below its value at
//! the run's start, sampled by a thread. Other processes' allocations during the run
//! count in it too.

use std::{
    fs,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// CPU ticks of one process (all its threads).
#[derive(Debug, Clone, Copy, Default)]
struct ProcessTicks {
    user: u64,
    system: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct MachineTicks {
    /// user + nice over all CPUs.
    user: u64,
    /// Every state but idle and iowait, over all CPUs.
    busy: u64,
}

/// The processes whose CPU a run reads.
pub struct Processes<'a> {
    pub bench: u32,
    pub backend: u32,
    pub proxy: &'a [u32],
}

/// CPU counters at one instant.
pub struct Snapshot {
    at: Instant,
    machine: MachineTicks,
    ours: ProcessTicks,
    proxy: ProcessTicks,
}

impl Snapshot {
    pub fn take(processes: &Processes<'_>) -> Snapshot {
        let proxy = sum(processes.proxy.iter().map(|&pid| process_ticks(pid)));
        let bench_and_backend = sum([processes.bench, processes.backend].map(process_ticks));
        Snapshot {
            at: Instant::now(),
            machine: machine_ticks(),
            ours: sum([bench_and_backend, proxy]),
            proxy,
        }
    }
}

/// CPU used between two snapshots, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The proxy's processes.
    pub proxy: f64,
    /// The whole machine, less the user time of other processes.
    pub machine: f64,
    /// Other processes' user time as a share of the machine's capacity.
    pub others_share: f64,
}

impl Usage {
    pub fn between(before: &Snapshot, after: &Snapshot) -> Usage {
        let tick = 1.0 / ticks_per_second();
        let machine_user = after.machine.user.saturating_sub(before.machine.user);
        let machine_busy = after.machine.busy.saturating_sub(before.machine.busy);
        let ours_user = after.ours.user.saturating_sub(before.ours.user);
        let others_user = machine_user.saturating_sub(ours_user);
        let proxy = (after.proxy.user + after.proxy.system)
            .saturating_sub(before.proxy.user + before.proxy.system);
        let capacity = after.at.duration_since(before.at).as_secs_f64() * cpus() as f64;
        Usage {
            proxy: proxy as f64 * tick,
            machine: machine_busy.saturating_sub(others_user) as f64 * tick,
            others_share: others_user as f64 * tick / capacity.max(f64::MIN_POSITIVE),
        }
    }
}

fn sum(ticks: impl IntoIterator<Item = ProcessTicks>) -> ProcessTicks {
    ticks
        .into_iter()
        .fold(ProcessTicks::default(), |acc, t| ProcessTicks {
            user: acc.user + t.user,
            system: acc.system + t.system,
        })
}

/// A process that is gone counts as zero: its time is lost, not an error.
fn process_ticks(pid: u32) -> ProcessTicks {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return ProcessTicks::default();
    };
    let fields = crate::process::stat_fields(&stat);
    let field = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0);
    ProcessTicks {
        user: field(11),
        system: field(12),
    }
}

fn machine_ticks() -> MachineTicks {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return MachineTicks::default();
    };
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let value = |i: usize| values.get(i).copied().unwrap_or(0);
    MachineTicks {
        user: value(0) + value(1),
        busy: value(0) + value(1) + value(2) + value(5) + value(6) + value(7),
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// How often the memory watch reads MemAvailable: often enough to catch a peak that
/// lasts a fraction of a second, while a read of /proc/meminfo costs microseconds.
const MEMORY_INTERVAL: Duration = Duration::from_millis(10);
/// A watch takes at most this many samples (ten minutes' worth), so that its thread
/// ends even if its stop never comes; a run is far shorter.
const MEMORY_SAMPLES: usize = 60_000;

/// Watches the machine's MemAvailable from `start` to `stop`.
pub struct MemoryWatch {
    start: u64,
    /// Dropped to stop the sampler, which notices at once.
    stop: mpsc::Sender<()>,
    sampler: thread::JoinHandle<u64>,
}

impl MemoryWatch {
    /// None where MemAvailable cannot be read or the sampler cannot start: the figure
    /// is then missing, as a CPU figure that cannot be read is zero, not an error.
    pub fn start() -> Option<MemoryWatch> {
        let start = mem_available()?;
        let (stop, stopped) = mpsc::channel();
        let sampler = thread::Builder::new()
            .name("memory-watch".to_owned())
            .spawn(move || lowest_available(start, &stopped))
            .ok()?;
        Some(MemoryWatch {
            start,
            stop,
            sampler,
        })
    }

    /// The largest fall of MemAvailable below its value at the start, in bytes; None if
    /// the sampler panicked.
    pub fn stop(self) -> Option<u64> {
        drop(self.stop);
        let lowest = self.sampler.join().ok()?;
        Some(self.start.saturating_sub(lowest))
    }
}

/// Reads MemAvailable every [`MEMORY_INTERVAL`] until the watch stops, and returns the
/// lowest value read; a failed read is skipped.
fn lowest_available(start: u64, stop: &mpsc::Receiver<()>) -> u64 {
    let mut lowest = start;
    for _ in 0..MEMORY_SAMPLES {
        if stop.recv_timeout(MEMORY_INTERVAL) != Err(mpsc::RecvTimeoutError::Timeout) {
            break;
        }
        if let Some(available) = mem_available() {
            lowest = lowest.min(available);
        }
    }
    lowest
}

/// MemAvailable in bytes: the kernel's estimate of what could be allocated without
/// swapping, which socket buffers and other unreclaimable kernel memory lower.
fn mem_available() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let value = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Percentiles {
    /// From latencies in nanoseconds (sorted here); None if there are none.
    pub fn of(mut nanos: Vec<u64>) -> Option<Percentiles> {
        if nanos.is_empty() {
            return None;
        }
        nanos.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * nanos.len() as f64).ceil() as usize).clamp(1, nanos.len());
            nanos[rank - 1] as f64 / 1000.0
        };
        Some(Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        })
    }
}

/// The median, smallest and largest of some values.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    /// (max - min) / median.
    pub fn relative_range(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=1000).map(|n| n * 1000).collect()).expect("values");
        assert_eq!((p.p50, p.p99, p.p999), (500.0, 990.0, 999.0));
    }

    #[test]
    fn spread_median() {
        let s = Spread::of([3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((s.relative_range() - 1.0).abs() < 1e-9);
    }
}
