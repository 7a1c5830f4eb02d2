//! What the proxy knows about each backend address, shared by every route, executor
//! and routes-file generation that lists it: its live connections (for least-conn).
//!
//! States live in a process-wide registry keyed by address. A [`Balancer`] holds strong
//! references to the states of its backends; the registry only weak ones, so a backend
//! that a reload removes is forgotten (and its checker stops) once the last routes and
//! connections that name it are gone, while one that stays keeps its state across a
//! SIGHUP.
//!
//! [`Balancer`]: crate::balance::Balancer

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

/// One backend address.
#[derive(Debug)]
pub struct BackendState {
    addr: SocketAddr,
    /// Connections the engine holds to it (see [`Lease`]).
    active: AtomicUsize,
}

type Registry = Mutex<HashMap<SocketAddr, Weak<BackendState>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The state of `addr`, created (healthy, idle) if no live route lists it.
pub fn state(addr: SocketAddr) -> Arc<BackendState> {
    let mut states = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = states.get(&addr).and_then(Weak::upgrade) {
        return state;
    }
    states.retain(|_, state| state.strong_count() > 0);
    let state = Arc::new(BackendState {
        addr,
        active: AtomicUsize::new(0),
    });
    states.insert(addr, Arc::downgrade(&state));
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

impl BackendState {
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

    #[test]
    fn leases_count_connections() {
        let state = state("127.0.0.2:7001".parse().unwrap());
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
        let state_a = state(addr);
        let _lease = state_a.lease();
        assert_eq!(state(addr).active(), 1);
        assert!(existing(addr).is_some());
        drop(_lease);
        drop(state_a);
        assert!(existing(addr).is_none());
    }

}
