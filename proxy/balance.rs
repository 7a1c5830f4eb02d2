//! The order in which a route's backends are tried.
//!
//! A route lists its backends once; a [`Balancer`] turns that list into a per-connection
//! order: the server connects to the first and falls back to the next on failure, so the
//! order is both the load spreading and the failover path. The policy is named by
//! [`Balance`], the `balance` key of a route in routes.toml; each backend has a weight.
//!
//! Whatever the policy, backends that are down (see [`crate::backend`]) come after the
//! healthy ones, in the policy's order: a connection tries them only when no healthy
//! backend accepts. Source-hash keeps its order for the healthy ones, so a client whose
//! backend is down goes where rendezvous hashing sends it next, and comes back after.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::{Backends, Target};

/// The largest `weight` routes.toml accepts.
pub const MAX_WEIGHT: u32 = 1000;

/// How a route spreads connections over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Smooth weighted round-robin (nginx's): over any run of connections each backend
    /// gets its share of the weights, interleaved rather than in bursts.
    #[default]
    RoundRobin,
    /// The backend with the fewest live connections per unit of weight; ties go round
    /// the backends in turn.
    LeastConn,
    /// Consistent hashing on the client's IP address (weighted rendezvous hashing): a
    /// client keeps its backend while the backend list stays, and adding a backend moves
    /// only the clients that the new one takes, its share of them.
    SourceHash,
}

impl Balance {
    /// The name used in routes.toml.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
            Balance::SourceHash => "source-hash",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a `balance` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseBalanceError {
    #[error(
        "{0:?} is not a balance policy (expected \"round-robin\", \"least-conn\" or \"source-hash\")"
    )]
    /// Not one of the policies; the value as given.
    Unknown(String),
}

impl FromStr for Balance {
    type Err = ParseBalanceError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "round-robin" => Ok(Balance::RoundRobin),
            "least-conn" => Ok(Balance::LeastConn),
            "source-hash" => Ok(Balance::SourceHash),
            _ => Err(ParseBalanceError::Unknown(name.to_owned())),
        }
    }
}

/// One entry of a route's `backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightedBackend {
    /// The backend's address.
    pub addr: SocketAddr,
    /// 1..=[`MAX_WEIGHT`]; its share of the route's connections.
    pub weight: u32,
}

impl From<SocketAddr> for WeightedBackend {
    fn from(addr: SocketAddr) -> WeightedBackend {
        WeightedBackend { addr, weight: 1 }
    }
}

impl fmt::Display for WeightedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} weight {}", self.addr, self.weight)
        }
    }
}

/// One route's backends and the state its [`Balance`] policy needs.
///
/// Shared by every worker thread; [`Balancer::order`] takes `&self`. It holds each
/// backend's [`Target`], with the state its proxy keeps for the address, and hands
/// those out: the connect path reports to the state it was given.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    backends: Vec<WeightedBackend>,
    /// Per backend: its address with its state, shared with every other route of the
    /// same proxy that lists the address.
    targets: Vec<Target>,
    /// Ties in least-conn start here. It only ever grows (wrapping is harmless).
    next_start: AtomicUsize,
    /// Smooth weighted round-robin's current weights, one per backend.
    current: Mutex<Vec<i64>>,
}

impl Balancer {
    /// Each backend's state is `set`'s for its address, so the set should track them
    /// first ([`Backends::track`]); an address it does not track is never down and its
    /// connections are not counted.
    pub fn new(policy: Balance, backends: Vec<WeightedBackend>, set: &Backends) -> Balancer {
        let targets = backends.iter().map(|b| set.target(b.addr)).collect();
        Balancer {
            policy,
            current: Mutex::new(vec![0; backends.len()]),
            backends,
            targets,
            next_start: AtomicUsize::new(0),
        }
    }

    /// The backends in file order.
    pub fn backends(&self) -> &[WeightedBackend] {
        &self.backends
    }

    /// Every backend once, in the order this connection should try them: the policy's
    /// order, healthy backends first.
    pub fn order(&self, client: SocketAddr) -> Vec<Target> {
        if self.backends.is_empty() {
            return Vec::new();
        }
        let up: Vec<bool> = (self.targets.iter())
            .map(|target| target.state().is_none_or(|state| !state.is_down()))
            .collect();
        let indices = match self.policy {
            Balance::RoundRobin => self.round_robin(&up),
            Balance::LeastConn => self.least_conn(),
            Balance::SourceHash => self.source_hash(client.ip()),
        };
        let (healthy, down): (Vec<usize>, Vec<usize>) = indices.into_iter().partition(|&i| up[i]);
        healthy
            .into_iter()
            .chain(down)
            .map(|i| self.targets[i].clone())
            .collect()
    }

    /// nginx's smooth weighted round-robin over the backends that are up (all of them if
    /// none is): every one's current weight grows by its weight, the largest is chosen
    /// and pays back the total. The others follow in file order after it. A backend
    /// that is down takes no turns, so its share goes to the others by their weights.
    fn round_robin(&self, up: &[bool]) -> Vec<usize> {
        let n = self.backends.len();
        let any_up = up.iter().any(|&up| up);
        let first = {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let mut total = 0i64;
            let mut best: Option<usize> = None;
            for (i, backend) in self.backends.iter().enumerate() {
                if any_up && !up[i] {
                    continue;
                }
                let weight = i64::from(backend.weight);
                current[i] += weight;
                total += weight;
                if best.is_none_or(|best| current[i] > current[best]) {
                    best = Some(i);
                }
            }
            let best = best.unwrap_or(0);
            current[best] -= total;
            best
        };
        (0..n).map(|k| (first + k) % n).collect()
    }

    /// Fewest live connections per unit of weight first; equal loads in rotating order
    /// so that idle backends share new connections.
    fn least_conn(&self) -> Vec<usize> {
        let n = self.backends.len();
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<(usize, u64)> = (0..n)
            .map(|k| {
                let i = (start + k) % n;
                let active = self.targets[i].state().map_or(0, |state| state.active());
                (i, active as u64)
            })
            .collect();
        // a/wa < b/wb  <=>  a*wb < b*wa; the sort is stable, so ties keep the rotation.
        order.sort_by(|&(a, load_a), &(b, load_b)| {
            let (wa, wb) = (
                u64::from(self.backends[a].weight),
                u64::from(self.backends[b].weight),
            );
            (load_a * wb).cmp(&(load_b * wa))
        });
        order.into_iter().map(|(i, _)| i).collect()
    }

    /// Weighted rendezvous (highest random weight) hashing: every backend scores the
    /// client, `-weight / ln(u)` with `u` uniform in (0, 1) from a hash of client and
    /// backend, and the order is by score. A client's scores do not depend on the other
    /// backends, so adding one moves only the clients it outscores everyone for; and
    /// the order after the first is where the client goes when its backend is down.
    fn source_hash(&self, client: IpAddr) -> Vec<usize> {
        let mut scored: Vec<(usize, f64)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, backend)| (i, hrw_score(client, backend)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().map(|(i, _)| i).collect()
    }
}

/// The rendezvous score of `backend` for `client`: larger wins.
fn hrw_score(client: IpAddr, backend: &WeightedBackend) -> f64 {
    let mut hash = Fnv::default();
    match client {
        IpAddr::V4(ip) => hash.write(&ip.octets()),
        IpAddr::V6(ip) => hash.write(&ip.octets()),
    }
    hash.write(&[0xff]);
    match backend.addr.ip() {
        IpAddr::V4(ip) => hash.write(&ip.octets()),
        IpAddr::V6(ip) => hash.write(&ip.octets()),
    }
    hash.write(&backend.addr.port().to_be_bytes());
    let bits = mix64(hash.0);
    // 53 random bits, in (0, 1): never 0, so ln is finite and negative.
    let unit = ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(backend.weight) / unit.ln()
}

/// FNV-1a: stable across Rust versions and processes, unlike std's hasher, so a
/// client's backend survives a restart.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// splitmix64's finalizer: FNV's low-entropy high bits become uniform.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendState, HealthCheck};
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 3, 1], port))
    }

    fn weighted(port: u16, weight: u32) -> WeightedBackend {
        WeightedBackend {
            addr: addr(port),
            weight,
        }
    }

    fn plain(ports: &[u16]) -> Vec<WeightedBackend> {
        ports.iter().map(|&port| addr(port).into()).collect()
    }

    /// A balancer whose backends are tracked, unchecked, in a set of its own.
    fn balancer(policy: Balance, backends: Vec<WeightedBackend>) -> Balancer {
        balancer_in(&Backends::new(), HealthCheck::OFF, policy, backends)
    }

    /// A balancer whose backends `set` tracks, checked as `check` says.
    fn balancer_in(
        set: &Backends,
        check: HealthCheck,
        policy: Balance,
        backends: Vec<WeightedBackend>,
    ) -> Balancer {
        set.track(backends.iter().map(|backend| (backend.addr, check)));
        Balancer::new(policy, backends, set)
    }

    /// The addresses of `balancer`'s order for `client`.
    fn addrs(balancer: &Balancer, client: SocketAddr) -> Vec<SocketAddr> {
        balancer
            .order(client)
            .iter()
            .map(|target| target.addr)
            .collect()
    }

    fn client(n: u32) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 40000)
    }

    const CLIENT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    #[test]
    fn names_round_trip() {
        for policy in [Balance::RoundRobin, Balance::LeastConn, Balance::SourceHash] {
            assert_eq!(policy.name().parse(), Ok(policy));
            assert_eq!(policy.to_string(), policy.name());
        }
        assert_eq!(Balance::default(), Balance::RoundRobin);
    }

    #[test]
    fn unknown_policy_is_refused() {
        let error = "roundrobin".parse::<Balance>().unwrap_err();
        assert_eq!(error, ParseBalanceError::Unknown("roundrobin".to_owned()));
        assert!(error.to_string().contains("\"roundrobin\""), "{error}");
        assert!(error.to_string().contains("\"source-hash\""), "{error}");
    }

    #[test]
    fn round_robin_rotates_the_start() {
        let (a, b, c) = (addr(9001), addr(9002), addr(9003));
        let balancer = balancer(Balance::RoundRobin, plain(&[9001, 9002, 9003]));
        assert_eq!(addrs(&balancer, CLIENT), [a, b, c]);
        assert_eq!(addrs(&balancer, CLIENT), [b, c, a]);
        assert_eq!(addrs(&balancer, CLIENT), [c, a, b]);
        assert_eq!(addrs(&balancer, CLIENT), [a, b, c]);
        assert_eq!(balancer.backends(), plain(&[9001, 9002, 9003]));
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a, then again.
        let balancer = balancer(
            Balance::RoundRobin,
            vec![weighted(9011, 5), weighted(9012, 1), weighted(9013, 1)],
        );
        let firsts: Vec<u16> = (0..14)
            .map(|_| addrs(&balancer, CLIENT)[0].port())
            .collect();
        let round = [9011, 9011, 9012, 9011, 9013, 9011, 9011];
        assert_eq!(firsts[..7], round);
        assert_eq!(firsts[7..], round);
        // Every backend is in every order, once.
        let mut order = addrs(&balancer, CLIENT);
        order.sort();
        assert_eq!(order, [addr(9011), addr(9012), addr(9013)]);
    }

    #[test]
    fn single_and_no_backend() {
        let a = addr(9001);
        for policy in [Balance::RoundRobin, Balance::LeastConn, Balance::SourceHash] {
            let single = balancer(policy, plain(&[9001]));
            assert_eq!(addrs(&single, CLIENT), [a]);
            assert_eq!(addrs(&single, CLIENT), [a]);
            let none = balancer(policy, Vec::new());
            assert!(addrs(&none, CLIENT).is_empty());
        }
    }

    #[test]
    fn round_robin_is_balanced_across_threads() {
        const THREADS: usize = 8;
        const CALLS_PER_THREAD: usize = 3 * 500;
        let backends = plain(&[9021, 9022, 9023]);
        let balancer = Arc::new(balancer(Balance::RoundRobin, backends.clone()));

        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let balancer = Arc::clone(&balancer);
                std::thread::spawn(move || {
                    let mut firsts = HashMap::new();
                    for _ in 0..CALLS_PER_THREAD {
                        let order = addrs(&balancer, CLIENT);
                        assert_eq!(order.len(), 3);
                        *firsts.entry(order[0]).or_insert(0usize) += 1;
                    }
                    firsts
                })
            })
            .collect();

        let mut firsts: HashMap<SocketAddr, usize> = HashMap::new();
        for worker in workers {
            for (backend, count) in worker.join().unwrap() {
                *firsts.entry(backend).or_default() += count;
            }
        }
        // Smooth round-robin under a lock hands out exact shares.
        for backend in &backends {
            assert_eq!(
                firsts[&backend.addr],
                THREADS * CALLS_PER_THREAD / 3,
                "{firsts:?}"
            );
        }
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let set = Backends::new();
        let balancer = balancer_in(
            &set,
            HealthCheck::OFF,
            Balance::LeastConn,
            vec![weighted(9031, 1), weighted(9032, 1), weighted(9033, 2)],
        );
        let lease = |addr: SocketAddr| set.target(addr).state().map(|state| state.lease());
        let (a, b, c) = (addr(9031), addr(9032), addr(9033));
        // All idle: ties rotate.
        let firsts: Vec<_> = (0..3).map(|_| addrs(&balancer, CLIENT)[0]).collect();
        assert_eq!(firsts, [a, b, c]);
        let held_a = [lease(a), lease(a)];
        let held_c = [lease(c), lease(c)];
        // a: 2/1, b: 0/1, c: 2/2 = 1.
        for _ in 0..4 {
            assert_eq!(addrs(&balancer, CLIENT), [b, c, a]);
        }
        let held_b = [lease(b), lease(b)];
        // a: 2, b: 2, c: 1.
        assert_eq!(addrs(&balancer, CLIENT)[0], c);
        drop(held_a);
        assert_eq!(addrs(&balancer, CLIENT)[0], a);
        drop((held_b, held_c));
    }

    /// Which backend each of `clients` clients gets first.
    fn firsts(balancer: &Balancer, clients: u32) -> Vec<SocketAddr> {
        (0..clients)
            .map(|n| addrs(balancer, client(n))[0])
            .collect()
    }

    #[test]
    fn source_hash_pins_clients_and_follows_weights() {
        let backends = vec![weighted(9041, 1), weighted(9042, 1), weighted(9043, 2)];
        let balancer = balancer(Balance::SourceHash, backends);
        let once = firsts(&balancer, 4000);
        assert_eq!(once, firsts(&balancer, 4000), "a client keeps its backend");
        // The port is not hashed: the same IP from another port goes the same way.
        let moved_port = SocketAddr::new(client(7).ip(), 55555);
        assert_eq!(addrs(&balancer, moved_port)[0], once[7]);
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for backend in &once {
            *counts.entry(*backend).or_default() += 1;
        }
        // Expected 1000, 1000, 2000; binomial spread is about 30-40.
        for (port, expected) in [(9041, 1000), (9042, 1000), (9043, 2000)] {
            let got = counts[&addr(port)];
            assert!(got.abs_diff(expected) < 200, "{port}: {got} ({counts:?})");
        }
    }

    #[test]
    fn source_hash_moves_few_clients_when_a_backend_is_added() {
        const CLIENTS: u32 = 10_000;
        for n in [2u16, 3, 5] {
            let before: Vec<u16> = (0..n).map(|k| 9050 + k).collect();
            let mut after = before.clone();
            after.push(9050 + n);
            let old = firsts(&balancer(Balance::SourceHash, plain(&before)), CLIENTS);
            let new = firsts(&balancer(Balance::SourceHash, plain(&after)), CLIENTS);
            let moved = old.iter().zip(&new).filter(|(o, n)| o != n).count();
            // Every client that moved went to the new backend.
            assert!(
                old.iter()
                    .zip(&new)
                    .all(|(o, nw)| o == nw || nw.port() == 9050 + n)
            );
            let share = f64::from(CLIENTS) / f64::from(n + 1);
            assert!(
                (moved as f64) < share * 1.1,
                "{n} -> {} backends: {moved} of {CLIENTS} clients moved, expected about {share:.0}",
                n + 1
            );
            assert!((moved as f64) > share * 0.9, "{moved}");
        }
    }

    #[test]
    fn source_hash_fails_over_in_a_stable_order() {
        let balancer = balancer(Balance::SourceHash, plain(&[9061, 9062, 9063]));
        for n in 0..50 {
            let order = addrs(&balancer, client(n));
            assert_eq!(order.len(), 3);
            assert_eq!(order, addrs(&balancer, client(n)));
        }
    }

    /// Checked an hour apart (so no check runs during the test), down after one
    /// failed connect.
    const HOURLY: HealthCheck = HealthCheck {
        interval: std::time::Duration::from_secs(3600),
        fails: 1,
        timeout: std::time::Duration::from_secs(1),
    };

    /// Takes `addr`, which `set` tracks with [`HOURLY`] checks, down.
    fn take_down(set: &Backends, addr: SocketAddr) -> Arc<BackendState> {
        let state = Arc::clone(set.target(addr).state().expect("tracked"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        state.connect_failed("a test", &refused);
        assert!(state.is_down());
        state
    }

    #[test]
    fn down_backends_come_last_and_round_robin_shares_their_turns() {
        let backends = vec![weighted(9071, 1), weighted(9072, 1), weighted(9073, 2)];
        let (a, b, c) = (addr(9071), addr(9072), addr(9073));
        let set = Backends::new();
        let round_robin = balancer_in(&set, HOURLY, Balance::RoundRobin, backends.clone());
        let least_conn = balancer_in(&set, HOURLY, Balance::LeastConn, backends.clone());
        let source_hash = balancer_in(&set, HOURLY, Balance::SourceHash, backends);
        let hashed_before: Vec<Vec<SocketAddr>> =
            (0..200).map(|n| addrs(&source_hash, client(n))).collect();
        let down = take_down(&set, c);
        let firsts: Vec<SocketAddr> = (0..10).map(|_| addrs(&round_robin, CLIENT)[0]).collect();
        assert_eq!(firsts, [a, b, a, b, a, b, a, b, a, b]);
        for _ in 0..4 {
            let order = addrs(&round_robin, CLIENT);
            assert_eq!(order[2], c, "{order:?}");
            assert_eq!(addrs(&least_conn, CLIENT)[2], c);
        }
        for (n, before) in (0..200).zip(&hashed_before) {
            let healthy: Vec<SocketAddr> = before.iter().copied().filter(|&x| x != c).collect();
            let order = addrs(&source_hash, client(n));
            assert_eq!(order[..2], healthy[..], "client {n}");
            assert_eq!(order[2], c);
        }
        down.connected("a test");
        let firsts: Vec<SocketAddr> = (0..8).map(|_| addrs(&round_robin, CLIENT)[0]).collect();
        assert_eq!(firsts.iter().filter(|&&x| x == c).count(), 4, "{firsts:?}");
        for (n, before) in (0..200).zip(&hashed_before) {
            assert_eq!(
                &addrs(&source_hash, client(n)),
                before,
                "client {n} is back"
            );
        }
    }
}
