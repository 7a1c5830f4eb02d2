//! Admission: how many connections the proxy, and each route, holds against its
//! `max_connections`, and how many clients each limit refused.
//!
//! The server takes a [`Ticket`] when it accepts a connection and adds the route to it
//! once the first message is routed; the ticket travels with the connection into the
//! splice engine and gives its places back when it is dropped, which is when the
//! connection is closed, wherever that happens. So a count is "accepted (or routed) and
//! not yet closed", including connections still reading their first message and pairs
//! the engine splices or copies.
//!
//! Counts are per route name and outlive a reload: a route that keeps its name after
//! SIGHUP keeps counting the connections it already holds against its new limit. A
//! name seen once keeps its (small) entry for the life of the proxy. Every worker finds
//! its route's count on every routed connection, so the names are read without a lock:
//! only the first connection of a name not seen before takes one, to add it.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

/// A flood of refused clients must not become a flood of log lines: at most this many
/// refusals are logged per second, and the next line logged says how many were not. The
/// counters stay exact.
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// The connection counts and refusal counters of one proxy. Shared by its workers;
/// every method may be called from any thread.
pub struct Admission {
    proxy: Arc<Count>,
    /// Replaced whole when a name is added: the names are few and added once each.
    routes: ArcSwap<HashMap<Arc<str>, Arc<Count>>>,
    /// Held while a name is added, so that two workers adding names at once keep both.
    adding: Mutex<()>,
    log_budget: Mutex<LogWindow>,
}

#[derive(Default)]
struct Count {
    held: AtomicUsize,
    refused: AtomicU64,
}

impl Count {
    /// Takes a place unless `max` are taken.
    fn take(&self, max: Option<usize>) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                max.is_none_or(|max| held < max).then_some(held + 1)
            })
            .is_ok()
    }
}

/// The places one connection holds: in the proxy, and once it is routed, in its route.
/// Dropping it gives them back.
#[derive(Default)]
pub struct Ticket {
    proxy: Option<Arc<Count>>,
    route: Option<Arc<Count>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        for count in [&self.proxy, &self.route].into_iter().flatten() {
            count.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("proxy", &self.proxy.is_some())
            .field("route", &self.route.is_some())
            .finish()
    }
}

/// Which limit turned a client away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The proxy held its own `max_connections` (`max`).
    #[error("the proxy already holds max_connections ({max}) connections")]
    Proxy {
        /// The limit.
        max: usize,
    },
    /// The route `route` held its `max_connections` (`max`).
    #[error("route {route:?} already holds its max_connections ({max}) connections")]
    Route {
        /// The route's name.
        route: Arc<str>,
        /// Its limit.
        max: usize,
    },
}

/// One route's counts, as [`Admission::routes`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCounts {
    /// The route's name.
    pub route: Arc<str>,
    /// Connections routed here and not yet closed.
    pub held: usize,
    /// Clients refused because the route held its `max_connections`.
    pub refused: u64,
}

struct LogWindow {
    start: Instant,
    logged: u32,
    /// Refusals not logged in the window that started at `start`.
    unlogged: u64,
}

impl Default for Admission {
    fn default() -> Admission {
        Admission::new()
    }
}

impl Admission {
    /// Counts at zero, for a proxy that holds nothing yet.
    pub fn new() -> Admission {
        Admission {
            proxy: Arc::default(),
            routes: ArcSwap::default(),
            adding: Mutex::new(()),
            log_budget: Mutex::new(LogWindow {
                start: Instant::now(),
                logged: 0,
                unlogged: 0,
            }),
        }
    }

    /// A place for a connection just accepted, unless the proxy already holds `max`
    /// (`None`: no limit). A refusal is counted.
    pub fn admit(&self, max: Option<usize>) -> Result<Ticket, Refused> {
        if self.proxy.take(max) {
            return Ok(Ticket {
                proxy: Some(Arc::clone(&self.proxy)),
                route: None,
            });
        }
        self.proxy.refused.fetch_add(1, Ordering::Relaxed);
        Err(Refused::Proxy {
            max: max.unwrap_or_default(),
        })
    }

    /// Adds a place in `route` to `ticket`, unless the route already holds `max`. A
    /// refusal is counted. A ticket holds one route: entering a second one moves it.
    pub fn enter_route(
        &self,
        ticket: &mut Ticket,
        route: &Arc<str>,
        max: Option<usize>,
    ) -> Result<(), Refused> {
        let count = self.route_count(route);
        if !count.take(max) {
            count.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Route {
                route: Arc::clone(route),
                max: max.unwrap_or_default(),
            });
        }
        if let Some(previous) = ticket.route.replace(count) {
            previous.held.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// The count of `route`, added at zero the first time the name is seen.
    fn route_count(&self, route: &Arc<str>) -> Arc<Count> {
        if let Some(count) = self.routes.load().get(route) {
            return Arc::clone(count);
        }
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        // Another worker may have added it while this one waited.
        let routes = self.routes.load_full();
        if let Some(count) = routes.get(route) {
            return Arc::clone(count);
        }
        let count = Arc::<Count>::default();
        let mut added = HashMap::clone(&routes);
        added.insert(Arc::clone(route), Arc::clone(&count));
        self.routes.store(Arc::new(added));
        count
    }

    /// Connections accepted and not yet closed.
    pub fn held(&self) -> usize {
        self.proxy.held.load(Ordering::Acquire)
    }

    /// Clients refused because the proxy held its `max_connections`.
    pub fn refused(&self) -> u64 {
        self.proxy.refused.load(Ordering::Relaxed)
    }

    /// Every route seen so far, by name.
    pub fn routes(&self) -> Vec<RouteCounts> {
        let routes = self.routes.load();
        let mut counts: Vec<RouteCounts> = routes
            .iter()
            .map(|(route, count)| RouteCounts {
                route: Arc::clone(route),
                held: count.held.load(Ordering::Acquire),
                refused: count.refused.load(Ordering::Relaxed),
            })
            .collect();
        counts.sort_by(|a, b| a.route.cmp(&b.route));
        counts
    }

    /// Logs a refusal, naming the client and the limit, within the log budget.
    pub fn log_refusal(&self, client: Option<SocketAddr>, refused: &Refused) {
        let Some(unlogged_before) = self.log_budget() else {
            return;
        };
        let client = client.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
        if unlogged_before > 0 {
            tracing::warn!(%client, "connection refused: {refused} (and {unlogged_before} more refusals in the second before, not logged)");
        } else {
            tracing::warn!(%client, "connection refused: {refused}");
        }
    }

    /// Whether this refusal may be logged, and if so how many went unlogged in the
    /// previous window.
    fn log_budget(&self) -> Option<u64> {
        let mut window = self.log_budget.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut unlogged_before = 0;
        if now.duration_since(window.start) >= Duration::from_secs(1) {
            unlogged_before = window.unlogged;
            *window = LogWindow {
                start: now,
                logged: 0,
                unlogged: 0,
            };
        }
        if window.logged < REFUSALS_LOGGED_PER_SECOND {
            window.logged += 1;
            Some(unlogged_before)
        } else {
            window.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_places_until_tickets_drop() {
        let admission = Admission::new();
        let web: Arc<str> = "web".into();
        let mut first = admission.admit(Some(2)).unwrap();
        admission.enter_route(&mut first, &web, Some(1)).unwrap();
        let mut second = admission.admit(Some(2)).unwrap();
        assert_eq!(
            admission.enter_route(&mut second, &web, Some(1)),
            Err(Refused::Route {
                route: web.clone(),
                max: 1
            })
        );
        assert_eq!(
            admission.admit(Some(2)).unwrap_err(),
            Refused::Proxy { max: 2 }
        );
        assert_eq!(admission.held(), 2);
        assert_eq!(admission.refused(), 1);
        assert_eq!(
            admission.routes(),
            [RouteCounts {
                route: web.clone(),
                held: 1,
                refused: 1
            }]
        );

        drop(first);
        admission.enter_route(&mut second, &web, Some(1)).unwrap();
        assert_eq!(admission.routes()[0].held, 1);
        drop(second);
        assert_eq!(admission.held(), 0);
        assert_eq!(admission.routes()[0].held, 0);
        assert!(admission.admit(None).is_ok());
    }

    #[test]
    fn names_added_at_once_by_many_workers_are_all_kept() {
        let admission = Arc::new(Admission::new());
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let admission = Arc::clone(&admission);
                std::thread::spawn(move || {
                    (0..50)
                        .map(|n| {
                            // Half the names are every worker's, half this one's own.
                            let route: Arc<str> = match n % 2 {
                                0 => format!("shared-{n}").into(),
                                _ => format!("own-{worker}-{n}").into(),
                            };
                            let mut ticket = admission.admit(None).unwrap();
                            admission.enter_route(&mut ticket, &route, None).unwrap();
                            ticket
                        })
                        .collect::<Vec<Ticket>>()
                })
            })
            .collect();
        let tickets: Vec<Vec<Ticket>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let routes = admission.routes();
        assert_eq!(routes.len(), 25 + 8 * 25);
        for counts in &routes {
            let want = if counts.route.starts_with("shared-") {
                8
            } else {
                1
            };
            assert_eq!(counts.held, want, "{counts:?}");
        }
        drop(tickets);
        assert!(admission.routes().iter().all(|counts| counts.held == 0));
    }

    #[test]
    fn logs_a_bounded_number_of_refusals_per_second() {
        let admission = Admission::new();
        let logged = (0..100)
            .filter(|_| admission.log_budget().is_some())
            .count();
        assert_eq!(logged, REFUSALS_LOGGED_PER_SECOND as usize);
    }
}
