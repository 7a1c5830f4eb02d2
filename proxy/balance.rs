//! The order in which a route's backends are tried.
//!
//! A route lists its backends once; a [`Balancer`] turns that list into a per-connection
//! order: the server connects to the first and falls back to the next on failure, so the
//! order is both the load spreading and the failover path. The policy is named by
//! [`Balance`], the `balance` key of a route in routes.toml.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a route spreads connections over its backends.
///
/// routes.toml also names "least-conn" and "source-hash"; they are not implemented yet,
/// and [`Balance::from_str`] says so instead of quietly falling back to round-robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Each connection starts at the backend after the one the previous connection
    /// started at.
    #[default]
    RoundRobin,
}

impl Balance {
    /// The name used in routes.toml.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Policy names that are part of the routes.toml contract but not implemented yet.
const PLANNED: &[&str] = &["least-conn", "source-hash"];

/// Why a `balance` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseBalanceError {
    #[error("{0:?} is not supported yet (only \"round-robin\" is, for now)")]
    NotSupportedYet(String),
    #[error("{0:?} is not a balance policy (expected \"round-robin\")")]
    Unknown(String),
}

impl FromStr for Balance {
    type Err = ParseBalanceError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "round-robin" => Ok(Balance::RoundRobin),
            planned if PLANNED.contains(&planned) => {
                Err(ParseBalanceError::NotSupportedYet(name.to_owned()))
            }
            _ => Err(ParseBalanceError::Unknown(name.to_owned())),
        }
    }
}

/// One route's backends and the state its [`Balance`] policy needs.
///
/// Shared by every executor thread; [`Balancer::order`] takes `&self`.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    backends: Vec<SocketAddr>,
    /// Where the next connection starts. It only ever grows (wrapping at `usize::MAX`,
    /// where one rotation step is skipped: harmless for spreading load).
    next_start: AtomicUsize,
}

impl Balancer {
    pub fn new(policy: Balance, backends: Vec<SocketAddr>) -> Balancer {
        Balancer {
            policy,
            backends,
            next_start: AtomicUsize::new(0),
        }
    }

    /// The backends in file order.
    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    /// Every backend once, in the order this connection should try them.
    ///
    /// `client` is unused by round-robin; it is here for the planned source-hash policy,
    /// which pins a client address to a backend.
    pub fn order(&self, _client: SocketAddr) -> Vec<SocketAddr> {
        match self.policy {
            Balance::RoundRobin => {
                if self.backends.is_empty() {
                    return Vec::new();
                }
                // Relaxed is enough: the cursor orders nothing else, it only has to hand
                // out distinct values.
                let start = self.next_start.fetch_add(1, Ordering::Relaxed) % self.backends.len();
                let mut order = Vec::with_capacity(self.backends.len());
                order.extend_from_slice(&self.backends[start..]);
                order.extend_from_slice(&self.backends[..start]);
                order
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    const CLIENT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    #[test]
    fn names_round_trip() {
        assert_eq!("round-robin".parse(), Ok(Balance::RoundRobin));
        assert_eq!(Balance::RoundRobin.to_string(), "round-robin");
        assert_eq!(Balance::default(), Balance::RoundRobin);
    }

    #[test]
    fn planned_policies_say_not_supported_yet() {
        for name in ["least-conn", "source-hash"] {
            let error = name.parse::<Balance>().unwrap_err();
            assert_eq!(error, ParseBalanceError::NotSupportedYet(name.to_owned()));
            assert!(error.to_string().contains("not supported yet"), "{error}");
        }
    }

    #[test]
    fn unknown_policy_is_refused() {
        let error = "roundrobin".parse::<Balance>().unwrap_err();
        assert_eq!(error, ParseBalanceError::Unknown("roundrobin".to_owned()));
        assert!(error.to_string().contains("\"roundrobin\""), "{error}");
    }

    #[test]
    fn round_robin_rotates_the_start() {
        let (a, b, c) = (addr(9001), addr(9002), addr(9003));
        let balancer = Balancer::new(Balance::RoundRobin, vec![a, b, c]);
        assert_eq!(balancer.order(CLIENT), [a, b, c]);
        assert_eq!(balancer.order(CLIENT), [b, c, a]);
        assert_eq!(balancer.order(CLIENT), [c, a, b]);
        assert_eq!(balancer.order(CLIENT), [a, b, c]);
        assert_eq!(balancer.backends(), [a, b, c]);
    }

    #[test]
    fn single_and_no_backend() {
        let a = addr(9001);
        let single = Balancer::new(Balance::RoundRobin, vec![a]);
        assert_eq!(single.order(CLIENT), [a]);
        assert_eq!(single.order(CLIENT), [a]);
        let none = Balancer::new(Balance::RoundRobin, Vec::new());
        assert!(none.order(CLIENT).is_empty());
    }

    #[test]
    fn round_robin_is_balanced_across_threads() {
        const THREADS: usize = 8;
        const CALLS_PER_THREAD: usize = 3 * 500;
        let backends = vec![addr(9001), addr(9002), addr(9003)];
        let balancer = Arc::new(Balancer::new(Balance::RoundRobin, backends.clone()));

        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let balancer = Arc::clone(&balancer);
                std::thread::spawn(move || {
                    let mut firsts = HashMap::new();
                    for _ in 0..CALLS_PER_THREAD {
                        let order = balancer.order(CLIENT);
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
        // Every call took a distinct cursor value, so the starts are exactly even.
        for backend in &backends {
            assert_eq!(
                firsts[backend],
                THREADS * CALLS_PER_THREAD / 3,
                "{firsts:?}"
            );
        }
    }
}
