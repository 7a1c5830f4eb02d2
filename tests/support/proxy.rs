//! The proxy under test, run in this process: starting it in a mode (splicing with the
//! real probe loaded, or copying), and the waits and counts the tests read from it.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use splice_proxy::{Splicing, config::Config, probe::Probe};

use super::connect;

/// How a test proxy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moving {
    /// Splice each connection right after its first message.
    Splice,
    Copy,
    /// Copy each connection first, and splice it once it has lived [`LATER_AFTER`] or
    /// streamed: the command's default (100 ms there).
    Later,
}

pub const SPLICE: Moving = Moving::Splice;
pub const COPY: Moving = Moving::Copy;
pub const LATER: Moving = Moving::Later;

/// How long a [`Moving::Later`] proxy copies a connection before it splices it.
pub const LATER_AFTER: Duration = Duration::from_millis(20);

/// Sends the proxy's log (its access log says how and why each connection ended) to the
/// output of the test that started it, which the harness prints when that test fails:
/// the proxy's threads inherit their test's output. A failure in a guest then says what
/// the proxy saw.
fn show_log() {
    log_to_test_output(tracing::Level::INFO);
}

/// For a test that serves so many connections that their access lines, which the
/// harness keeps in memory as the test's output, would count in what it measures (the
/// soak checks the process's RSS): only warnings and errors go there. Called before the
/// test starts a proxy, it takes the place of [`show_log`] for the whole test binary.
pub fn log_warnings_only() {
    log_to_test_output(tracing::Level::WARN);
}

/// The process's log subscriber: the first call sets it, later ones change nothing.
fn log_to_test_output(level: tracing::Level) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_max_level(level)
        .try_init();
}

/// Sockets a test proxy's maps hold, unless a test sizes them ([`Proxy::start_sized`]).
const MAP_CAPACITY: u32 = 1 << 14;

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
        Proxy::start_sized(routes, moving, MAP_CAPACITY)
    }

    /// As [`Proxy::start`], with maps that hold `map_capacity` sockets (two per spliced
    /// connection).
    pub fn start_sized(routes: &str, moving: Moving, map_capacity: u32) -> Proxy {
        let (splicing, splice_after) = match moving {
            Moving::Splice => (Splicing::Required, Duration::ZERO),
            Moving::Copy => (Splicing::Off, Duration::ZERO),
            Moving::Later => (Splicing::Required, LATER_AFTER),
        };
        Proxy::start_with(routes, splicing, splice_after, map_capacity)
    }

    /// A splicing proxy that copies each connection for `after` first, or until it
    /// streams.
    pub fn start_splicing_after(routes: &str, after: Duration) -> Proxy {
        Proxy::start_with(routes, Splicing::Required, after, MAP_CAPACITY)
    }

    fn start_with(
        routes: &str,
        splicing: Splicing,
        splice_after: Duration,
        map_capacity: u32,
    ) -> Proxy {
        show_log();
        let config =
            Config::parse(routes, Path::new("test-routes.toml")).expect("test routes parse");
        let running = splice_proxy::Proxy::from_config(config)
            .workers(2)
            .splice_after(splice_after)
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

    /// Connections copied first and spliced since, from the metrics.
    pub fn spliced_later(&self) -> u64 {
        self.metric("splice_proxy_connections_spliced_later_total")
    }

    /// Attempts to splice a copied connection given up, from the metrics.
    pub fn switches_given_up(&self) -> u64 {
        self.metric("splice_proxy_splice_switches_given_up_total")
    }

    /// The value of the metric `name`, a series without labels, from the exposition.
    pub fn metric(&self, name: &str) -> u64 {
        let metrics = self.engine().metrics().encode();
        let sample = metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"));
        sample
            .parse()
            .unwrap_or_else(|e| panic!("{name} is not a whole number ({e}): {sample:?}"))
    }

    /// Waits until [`Proxy::spliced_later`] reads `count`: the engine counts a switch
    /// just after both sockets entered the maps, so [`Proxy::wait_handed_off`] can return
    /// first (an emulated guest once did).
    pub fn wait_spliced_later(&self, count: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.spliced_later() != count {
            assert!(
                Instant::now() < deadline,
                "after {limit:?}: {} connections spliced later, not {count}",
                self.spliced_later()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The probe's counters since it was loaded (all 0 when copying).
    pub fn counters(&self) -> splice_proxy::probe::Counters {
        self.probe().map_or_else(Default::default, |p| {
            p.counters().expect("read probe counters")
        })
    }

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
