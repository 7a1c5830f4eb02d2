//! What the proxy knows about each backend address, shared by every route, worker
//! and routes-file generation that lists it: its live connections (for least-conn) and
//! its health.
//!
//! States live in a process-wide registry keyed by address. A [`Balancer`] holds strong
//! references to the states of its backends, and a connection holds one through its
//! [`Lease`]; the registry only weak ones, so a backend that a reload removes is
//! forgotten (and its checker thread ends) once the last routes and connections that
//! name it are gone, while one that stays keeps its state across a SIGHUP.
//!
//! Health is tracked when the routes give the address a [`HealthCheck`] with an
//! interval: a thread connects to it every interval (active check), and the server
//! reports its own connects (passive check). After `fails` failures in a row the
//! backend is down; the next success, of either kind, brings it back up.
//!
//! [`Balancer`]: crate::balance::Balancer

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    thread::{self, Thread},
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

type Registry = Mutex<HashMap<SocketAddr, Weak<BackendState>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The state of `addr`, created (up, idle) if no live route lists it, now checked as
/// `check` says. A state that stays across a reload keeps its connections and health;
/// changed settings start from up.
pub fn state(addr: SocketAddr, check: HealthCheck) -> Arc<BackendState> {
    let state = {
        let mut states = registry().lock().unwrap_or_else(|e| e.into_inner());
        match states.get(&addr).and_then(Weak::upgrade) {
            Some(state) => state,
            None => {
                states.retain(|_, state| state.strong_count() > 0);
                let state = Arc::new(BackendState {
                    addr,
                    active: AtomicUsize::new(0),
                    fails: AtomicU32::new(0),
                    down: AtomicBool::new(false),
                    health: Mutex::new(Health {
                        check: HealthCheck::OFF,
                        checker: None,
                    }),
                });
                states.insert(addr, Arc::downgrade(&state));
                state
            }
        }
    };
    state.set_check(check);
    state
}

/// The state of `addr` if a live route lists it (a custom [`Router`] may name any
/// address: those are not tracked).
///
/// [`Router`]: crate::route::Router
pub fn existing(addr: SocketAddr) -> Option<Arc<BackendState>> {
    let states = registry().lock().unwrap_or_else(|e| e.into_inner());
    states.get(&addr).and_then(Weak::upgrade)
}

/// Every backend a live route or connection names, for the metrics.
pub fn tracked() -> Vec<Arc<BackendState>> {
    let states = registry().lock().unwrap_or_else(|e| e.into_inner());
    states.values().filter_map(Weak::upgrade).collect()
}

impl BackendState {
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

    fn set_check(self: &Arc<Self>, check: HealthCheck) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if health.check == check {
            return;
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
            Some(checker) => checker.unpark(),
            None if check.is_on() => {
                let weak = Arc::downgrade(self);
                let spawned = thread::Builder::new()
                    .name("health-check".to_owned())
                    .spawn(move || run_checks(weak));
                match spawned {
                    Ok(handle) => health.checker = Some(handle.thread().clone()),
                    Err(e) => tracing::error!(
                        "backend {}: cannot start its health check, so only connection \
                         failures count: {e}",
                        self.addr
                    ),
                }
            }
            None => {}
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
/// interval after it starts, until the state is gone or its checks are turned off. It
/// holds the state only while checking, so that it never keeps a removed backend alive.
fn run_checks(state: Weak<BackendState>) {
    let mut next: Option<Instant> = None;
    loop {
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
        // Unparked early when the settings change or the state is dropped.
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

    #[test]
    fn leases_count_connections() {
        let state = state("127.0.0.2:7001".parse().unwrap(), HealthCheck::OFF);
        let first = state.lease();
        let second = state.lease();
        assert_eq!(state.active(), 2);
        drop(first);
        assert_eq!(state.active(), 1);
        drop(second);
        assert_eq!(state.active(), 0);
    }

    #[test]
    fn the_registry_shares_live_states_and_forgets_dropped_ones() {
        let addr = "127.0.0.2:7002".parse().unwrap();
        let state_a = state(addr, HealthCheck::OFF);
        let lease = state_a.lease();
        assert_eq!(state(addr, HealthCheck::OFF).active(), 1);
        assert!(existing(addr).is_some());
        drop(lease);
        drop(state_a);
        assert!(existing(addr).is_none());
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
        let state = state(listener.local_addr().unwrap(), check(3_600_000, 3));
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
        let state = state("127.0.0.2:7003".parse().unwrap(), HealthCheck::OFF);
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
        let state = state(addr, check(20, 2));
        drop(listener);
        wait_for(&state, true);
        let _listener = TcpListener::bind(addr).unwrap();
        wait_for(&state, false);
    }

    #[test]
    fn the_checker_ends_with_its_state_or_its_checks() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = "127.0.0.2:7004".parse().unwrap();
        let off: SocketAddr = "127.0.0.2:7005".parse().unwrap();
        let dropped = state(addr, check(3_600_000, 1));
        let turned_off = state(off, check(3_600_000, 1));
        let weak = Arc::downgrade(&dropped);
        assert!(dropped.health.lock().unwrap().checker.is_some());
        drop(dropped);
        // The checker holds the state for the moment of a check, never longer.
        while weak.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the checker keeps its state alive"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let again = state(off, HealthCheck::OFF);
        while again.health.lock().unwrap().checker.is_some() {
            assert!(Instant::now() < deadline, "the checker did not stop");
            thread::sleep(Duration::from_millis(5));
        }
        drop(turned_off);
    }
}
