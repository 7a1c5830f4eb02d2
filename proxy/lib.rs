//! splice-proxy: a TCP reverse proxy that routes each connection on its first message and
//! then splices the two sockets inside the kernel with a BPF sockmap.
//!
//! The pieces, each owning its own state:
//! - [`config`]: routes.toml, parsed and validated.
//! - [`admission`]: connections held against `max_connections`, and refusals.
//! - [`route`]: matchers and the route table that picks a route for a first message.
//! - [`balance`]: the order in which a route's backends are tried.
//! - [`backend`]: what is known about each backend address: live connections.
//! - [`proxy_protocol`]: the PROXY protocol header `send_proxy` writes to backends.
//! - [`probe`]: the loaded eBPF programs and their maps.
//! - [`logging`]: how log lines are written: colours only at a terminal, JSON escaped.
//! - [`metrics`]: what is counted about connections, and its Prometheus exposition.
//! - [`privileges`]: becoming an unprivileged user once the probe and listeners are set up.
//! - [`splice`]: the engine whose workers are the event loops: they accept, and own each
//!   connection after its first message.
//! - [`server`]: listeners, routing, and a connection from accept until it is routed
//!   and dialed (`Arrival`, server/arrival.rs), in the engine worker that accepted it.

pub mod admission;
pub mod backend;
pub mod balance;
pub mod config;
mod count;
pub mod logging;
pub mod metrics;
pub mod privileges;
pub mod probe;
pub mod proxy_protocol;
pub mod route;
mod running;
mod server;
mod socket;
pub mod splice;

pub use running::{Proxy, ProxyBuilder, ProxyError, Splicing};
pub use server::Limits;
