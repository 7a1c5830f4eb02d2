//! What one proxy knows about each backend address its routes list: its live
//! connections (for least-conn) and its health.
//!
//! A [`Backends`] set owns these states and their health-check threads; the running
//! proxy creates one and keeps it, so two proxies in one process never share a state.
//! Building a route table from a routes file brings the set to that file's addresses
//! ([`Backends::track`]): an address that stays keeps its state (live connections,
//! health), a new one starts up and idle, and a removed one is dropped from the set. Each
//! balancer hands out [`Target`]s that carry their address's state, and a connection
//! holds it through its [`Lease`]: the connect path reads the state it was given and
//! never looks an address up. A removed address's state lives on while old routes or
//! connections hold it, and its checker ends with it.
//!
//! Health is tracked when the routes give the address a [`HealthCheck`] with an
//! interval: a thread connects to it every interval (active check), and the server
//! reports its own connects (passive check). After `fails` failures in a row the
//! backend is down; the next success, of either kind, brings it back up.

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle, Thread},
    time::{Duration, Instant},
};

/// How a backend's health is checked: `health_interval` and `health_fails` in
/// routes.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// Time between two active checks; zero turns health tracking off (the backend is
    /// never down, connections just fall over to the next backend when it refuses).
    pub interval: Duration,
    /// Failures in a row, of active checks and of the server's connects, that take the
    /// backend down.
    pub fails: u32,
    /// How long an active check waits for the connect.
    pub timeout: Duration,
}

impl HealthCheck {
    /// No checks: the backend is always taken to be up.
    pub const OFF: HealthCheck = HealthCheck {
        interval: Duration::ZERO,
        fails: 1,
        timeout: Duration::ZERO,
    };

    /// Whether the backend is checked at all (an interval is set).
    pub fn is_on(&self) -> bool {
        !self.interval.is_zero()
    }
}

/// `health_interval 2s, health_fails 3`, or `health off`, as `--check` prints it.
impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_on() {
            write!(
                f,
                "health_interval {}, health_fails {}",
                humantime::format_duration(self.interval),
                self.fails
            )
        } else {
            f.write_str("health off")
        }
    }
}

/// One backend address.
#[derive(Debug)]
pub struct BackendState {
    addr: SocketAddr,
    /// Connections the engine holds to it (see [`Lease`]).
    active: AtomicUsize,
    /// Failed connects in a row, active and passive.
    fails: AtomicU32,
    down: AtomicBool,
    health: Mutex<Health>,
}

#[derive(Debug)]
struct Health {
    check: HealthCheck,
    /// The thread checking this backend, if one runs; woken when the settings change
    /// or the state is dropped.
    checker: Option<Thread>,
}

/// The backends of one proxy's routes: each address's state, and the threads that
/// check their health. The proxy creates it and keeps it for its life; route tables
/// built from it hold its states through their [`Target`]s. Dropping it ends its
/// health-check threads and waits for them (at most one connect timeout).
#[derive(Debug, Default)]
pub struct Backends {
    tracked: Mutex<Tracked>,
    /// Tells the checker threads to end: set when the set is dropped, so that none
    /// outlives its proxy even while something else still holds a state.
    closed: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Tracked {
    /// The addresses the routes list now.
    current: HashMap<SocketAddr, Arc<BackendState>>,
    /// Addresses the routes listed before a reload, while old routes or connections
    /// still hold their states: listed again, they keep their counts; until then the
    /// metrics still show them.
    retired: HashMap<SocketAddr, Weak<BackendState>>,
    /// Every checker thread started, joined when the set is dropped; finished ones are
    /// let go at the next [`Backends::track`].
    checkers: Vec<JoinHandle<()>>,
}

impl Backends {
    /// An empty set: no address tracked, no thread started.
    pub fn new() -> Backends {
        Backends::default()
    }

    /// From now on tracks exactly `checks`' addresses, each checked as its
    /// [`HealthCheck`] says (a routes file gives one check per address). An address
    /// already tracked keeps its connections and health, though changed settings start
    /// it from up; a new one starts up and idle, with a checker thread if its checks
    /// are on; one no longer listed leaves the set and stops being checked once the
    /// routes and connections that hold it are gone.
    pub fn track(&self, checks: impl IntoIterator<Item = (SocketAddr, HealthCheck)>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let Tracked {
            current,
            retired,
            checkers,
        } = &mut *tracked;
        let mut next = HashMap::new();
        for (addr, check) in checks {
            let state = next
                .get(&addr)
                .or_else(|| current.get(&addr))
                .cloned()
                .or_else(|| retired.get(&addr).and_then(Weak::upgrade))
                .unwrap_or_else(|| Arc::new(BackendState::new(addr)));
            if let Some(checker) = state.set_check(check, &self.closed) {
                checkers.push(checker);
            }
            next.insert(addr, state);
        }
        for (addr, state) in std::mem::replace(current, next) {
            if !current.contains_key(&addr) {
                retired.insert(addr, Arc::downgrade(&state));
            }
        }
        retired.retain(|addr, state| state.strong_count() > 0 && !current.contains_key(addr));
        checkers.retain(|checker| !checker.is_finished());
    }

    /// Where a route sends connections to `addr`: with its state if the set tracks the
    /// address, untracked (never down, not counted) if not.
    pub fn target(&self, addr: SocketAddr) -> Target {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        Target {
            addr,
            state: tracked.current.get(&addr).cloned(),
        }
    }

    /// Every state the routes list, or old routes and connections still hold, by
    /// address: for the metrics.
    pub fn states(&self) -> Vec<Arc<BackendState>> {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let mut states: Vec<Arc<BackendState>> = (tracked.current.values().cloned())
            .chain(tracked.retired.values().filter_map(Weak::upgrade))
            .collect();
        states.sort_by_key(|state| state.addr);
        states
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        let tracked = self.tracked.get_mut().unwrap_or_else(|e| e.into_inner());
        for checker in &tracked.checkers {
            checker.thread().unpark();
        }
        for checker in tracked.checkers.drain(..) {
            // A checker that panicked has nothing left to stop.
            let _ = checker.join();
        }
    }
}

/// One backend a connection may be sent to: its address, and the state of the
/// proxy's that counts its connections and tracks its health, if the proxy tracks it
/// (the backends of a route table are; an address a custom [`Router`] names is not).
///
/// [`Router`]: crate::route::Router
#[derive(Clone)]
pub struct Target {
    /// The backend's address.
    pub addr: SocketAddr,
    state: Option<Arc<BackendState>>,
}

impl Target {
    /// The state the connect path reports to and takes its [`Lease`] from.
    pub fn state(&self) -> Option<&Arc<BackendState>> {
        self.state.as_ref()
    }
}

/// An untracked target: a custom router's.
impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target { addr, state: None }
    }
}

/// The same address, with the same state (or both untracked).
impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        self.addr == other.addr
            && match (&self.state, &other.state) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for Target {}

/// Whether it is a target at that address, tracked or not.
impl PartialEq<SocketAddr> for Target {
    fn eq(&self, addr: &SocketAddr) -> bool {
        self.addr == *addr
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("tracked", &self.state.is_some())
            .finish()
    }
}

impl BackendState {
    /// Up and idle, not checked until [`Backends::track`] says how.
    fn new(addr: SocketAddr) -> BackendState {
        BackendState {
            addr,
            active: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            down: AtomicBool::new(false),
            health: Mutex::new(Health {
                check: HealthCheck::OFF,
                checker: None,
            }),
        }
    }

    /// Whether health is tracked: otherwise it is never down.
    pub fn is_checked(&self) -> bool {
        self.check().is_on()
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections to it the engine holds now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::Relaxed);
        Lease {
            state: Arc::clone(self),
        }
    }

    /// Whether new connections should avoid it: health is tracked and its last
    /// `health_fails` connects failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// A connect to it succeeded: `how` says whose ("a health check", "a connection").
    pub fn connected(&self, how: &str) {
        self.fails.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("backend {} up: {how} connected", self.addr);
        }
    }

    /// A connect to it failed: `how` says whose, `why` how.
    pub fn connect_failed(&self, how: &str, why: &dyn fmt::Display) {
        let check = self.check();
        if !check.is_on() {
            return;
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if fails >= check.fails && !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "backend {} down: {fails} connects in a row failed, the last by {how}: {why}",
                self.addr
            );
        }
    }

    fn check(&self) -> HealthCheck {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).check
    }

    /// Checks it as `check` says from now on. Returns the checker thread it started,
    /// if the checks are on and none ran; one already running is woken to read the new
    /// settings. The checkers end when `closed` is set.
    fn set_check(
        self: &Arc<Self>,
        check: HealthCheck,
        closed: &Arc<AtomicBool>,
    ) -> Option<JoinHandle<()>> {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if health.check == check {
            return None;
        }
        health.check = check;
        // New settings, new count: the old one was against another threshold.
        self.fails.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(
                "backend {} taken as up: its health check changed",
                self.addr
            );
        }
        match &health.checker {
            Some(checker) => {
                checker.unpark();
                None
            }
            None if check.is_on() => {
                let (state, closed) = (Arc::downgrade(self), Arc::clone(closed));
                let spawned = thread::Builder::new()
                    .name("health-check".to_owned())
                    .spawn(move || run_checks(state, &closed));
                match spawned {
                    Ok(handle) => {
                        health.checker = Some(handle.thread().clone());
                        Some(handle)
                    }
                    Err(e) => {
                        tracing::error!(
                            "backend {}: cannot start its health check, so only connection \
                             failures count: {e}",
                            self.addr
                        );
                        None
                    }
                }
            }
            None => None,
        }
    }
}

impl Drop for BackendState {
    fn drop(&mut self) {
        let health = self.health.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(checker) = &health.checker {
            checker.unpark();
        }
    }
}

/// The checker thread of one backend: connects every interval, the first time one
/// interval after it starts, until the state is gone, its checks are turned off or its
/// set is dropped (`closed`). It holds the state only while checking, so that it never
/// keeps a removed backend alive.
fn run_checks(state: Weak<BackendState>, closed: &AtomicBool) {
    let mut next: Option<Instant> = None;
    loop {
        if closed.load(Ordering::Acquire) {
            return;
        }
        let Some(strong) = state.upgrade() else {
            return;
        };
        let check = {
            let mut health = strong.health.lock().unwrap_or_else(|e| e.into_inner());
            if !health.check.is_on() {
                health.checker = None;
                return;
            }
            health.check
        };
        let now = Instant::now();
        let due = match next {
            Some(due) if now >= due => {
                let timeout = check.timeout.min(check.interval);
                match TcpStream::connect_timeout(&strong.addr, timeout) {
                    Ok(_) => strong.connected("a health check"),
                    Err(e) => strong.connect_failed("a health check", &e),
                }
                Instant::now() + check.interval
            }
            // A reload may have shortened the interval while we slept.
            Some(due) => due.min(now + check.interval),
            None => now + check.interval,
        };
        next = Some(due);
        drop(strong);
        // Unparked early when the settings change, or the state or its set is dropped.
        thread::park_timeout(due.saturating_duration_since(Instant::now()));
    }
}

/// One connection to a backend, counted for least-conn until dropped. The engine drops
/// it with the connection's state, when the connection ends.
#[derive(Debug)]
pub struct Lease {
    state: Arc<BackendState>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The state `backends` tracks for `addr`, checked as `check` says.
    fn tracked(backends: &Backends, addr: SocketAddr, check: HealthCheck) -> Arc<BackendState> {
        backends.track([(addr, check)]);
        let target = backends.target(addr);
        Arc::clone(target.state().expect("tracked"))
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], port))
    }

    #[test]
    fn leases_count_connections() {
        let backends = Backends::new();
        let state = tracked(&backends, addr(7001), HealthCheck::OFF);
        let first = state.lease();
        let second = state.lease();
        assert_eq!(state.active(), 2);
        drop(first);
        assert_eq!(state.active(), 1);
        drop(second);
        assert_eq!(state.active(), 0);
    }

    #[test]
    fn a_set_keeps_the_states_it_still_tracks_and_forgets_dropped_ones() {
        let backends = Backends::new();
        let (kept, removed) = (addr(7002), addr(7003));
        backends.track([(kept, HealthCheck::OFF), (removed, HealthCheck::OFF)]);
        let lease = backends.target(kept).state().unwrap().lease();
        let held = Arc::clone(backends.target(removed).state().unwrap());
        backends.track([(kept, HealthCheck::OFF)]);
        assert_eq!(backends.target(kept).state().unwrap().active(), 1);
        assert!(backends.target(removed).state().is_none());
        // Still held by an old route: still in the metrics, and kept if listed again.
        assert_eq!(backends.states().len(), 2);
        backends.track([(kept, HealthCheck::OFF), (removed, HealthCheck::OFF)]);
        assert!(Arc::ptr_eq(
            backends.target(removed).state().unwrap(),
            &held
        ));
        backends.track([(kept, HealthCheck::OFF)]);
        drop(held);
        assert_eq!(backends.states().len(), 1);
        assert!(
            backends.target(addr(7004)).state().is_none(),
            "never listed"
        );
        drop(lease);
    }

    #[test]
    fn two_sets_do_not_share_states() {
        let (one, two) = (Backends::new(), Backends::new());
        let check = check(3_600_000, 1);
        let (in_one, in_two) = (
            tracked(&one, addr(7005), check),
            tracked(&two, addr(7005), check),
        );
        let _lease = in_one.lease();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        in_one.connect_failed("a connection", &refused);
        assert!(in_one.is_down());
        assert_eq!(in_one.active(), 1);
        assert!(!in_two.is_down());
        assert_eq!(in_two.active(), 0);
    }

    fn check(interval_ms: u64, fails: u32) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(interval_ms),
            fails,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn connect_failures_in_a_row_take_it_down_and_a_success_brings_it_up() {
        // An hour between active checks: only the first one runs during the test.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backends = Backends::new();
        let state = tracked(
            &backends,
            listener.local_addr().unwrap(),
            check(3_600_000, 3),
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for _ in 0..2 {
            state.connect_failed("a connection", &refused);
        }
        assert!(!state.is_down());
        state.connected("a connection");
        for _ in 0..2 {
            state.connect_failed("a connection", &refused);
        }
        assert!(!state.is_down(), "a success resets the count");
        state.connect_failed("a connection", &refused);
        assert!(state.is_down());
        state.connected("a connection");
        assert!(!state.is_down());
    }

    #[test]
    fn without_checks_failures_never_take_it_down() {
        let backends = Backends::new();
        let state = tracked(&backends, addr(7006), HealthCheck::OFF);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for _ in 0..10 {
            state.connect_failed("a connection", &refused);
        }
        assert!(!state.is_down());
    }

    /// Waits (bounded) until `state` is down or up as `down` says.
    fn wait_for(state: &BackendState, down: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.is_down() != down {
            assert!(Instant::now() < deadline, "still down = {}", !down);
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn active_checks_follow_a_listener_that_goes_and_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Backends::new();
        let state = tracked(&backends, addr, check(20, 2));
        drop(listener);
        wait_for(&state, true);
        let _listener = TcpListener::bind(addr).unwrap();
        wait_for(&state, false);
    }

    #[test]
    fn the_checker_ends_with_its_state_or_its_checks() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (dropped_addr, off) = (addr(7007), addr(7008));
        let backends = Backends::new();
        let dropped = tracked(&backends, dropped_addr, check(3_600_000, 1));
        let turned_off = tracked(&backends, off, check(3_600_000, 1));
        let weak = Arc::downgrade(&dropped);
        assert!(dropped.health.lock().unwrap().checker.is_some());
        // No longer listed, and no longer held.
        backends.track([(off, check(3_600_000, 1))]);
        drop(dropped);
        // The checker holds the state for the moment of a check, never longer.
        while weak.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the checker keeps its state alive"
            );
            thread::sleep(Duration::from_millis(5));
        }
        backends.track([(off, HealthCheck::OFF)]);
        while turned_off.health.lock().unwrap().checker.is_some() {
            assert!(Instant::now() < deadline, "the checker did not stop");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn dropping_the_set_ends_its_checkers_though_a_state_is_still_held() {
        let backends = Backends::new();
        // Checked an hour apart: the checker sleeps through the test unless woken.
        let held = tracked(&backends, addr(7009), check(3_600_000, 1));
        let (done, dropped) = std::sync::mpsc::channel();
        // The drop joins the checkers, so it returns only once they have ended.
        thread::spawn(move || {
            drop(backends);
            let _ = done.send(());
        });
        dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the set's drop ended its checker");
        assert_eq!(Arc::strong_count(&held), 1, "the checker let the state go");
    }
}
