//! splice-proxy: a TCP reverse proxy that routes each connection on its first message and
//! then splices the two sockets inside the kernel with a BPF sockmap: after the first
//! message no payload byte crosses into userspace. Where the kernel cannot splice (no
//! privileges, an old kernel, a socket it refuses) the connection is copied instead.
//!
//! # Running a proxy
//!
//! A running proxy is one value, [`Proxy`]: it owns the loaded probe, the worker threads,
//! the listeners and the metrics endpoint. Start it from a routes file, as the
//! `splice-proxy` command does, or from a router of your own (any
//! `Fn(&FirstMessage) -> Decision`, see [`route::Router`]); everything else has a
//! default ([`ProxyBuilder`], [`Limits`]).
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//!
//! use splice_proxy::{
//!     Proxy,
//!     route::{Decision, FirstMessage, Forward},
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend: SocketAddr = "127.0.0.1:6379".parse()?;
//! let router = move |first: &FirstMessage<'_>| match first.bytes.first() {
//!     Some(b'*') => Decision::Forward(Forward {
//!         route: "redis".into(),
//!         backends: vec![backend.into()],
//!         send_proxy: None,
//!     }),
//!     None if !first.complete => Decision::NeedMore,
//!     _ => Decision::Reject,
//! };
//!
//! let proxy = Proxy::builder(router).listen("127.0.0.1:10000".parse()?).start()?;
//! println!("listening on {}", proxy.local_addr());
//!
//! // Connections are served on the proxy's own threads. When it is time to stop: refuse
//! // new connects and give the live ones 30 s to finish.
//! proxy.shutdown(Duration::from_secs(30));
//! # Ok(())
//! # }
//! ```
//!
//! From a routes file (see README.md for its keys), reloaded the way SIGHUP reloads the
//! command's:
//!
//! ```no_run
//! use std::path::Path;
//!
//! use splice_proxy::{Proxy, Splicing, config::Config};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let routes = Path::new("routes.toml");
//! let proxy = Proxy::from_config(Config::load(routes)?)
//!     .listen("0.0.0.0:10000".parse()?)
//!     .splicing(Splicing::Required)
//!     .start()?;
//! // Later, for connections accepted from then on:
//! proxy.reload(&Config::load(routes)?);
//! # Ok(())
//! # }
//! ```
//!
//! Splicing needs root, or CAP_BPF and CAP_NET_ADMIN, to load the probe;
//! [`Splicing::Auto`], the default, copies every connection (and warns why, through
//! `tracing`) when it cannot. Dropping a [`Proxy`] resets the connections it holds and
//! returns once its threads have ended; [`Proxy::shutdown`] lets them finish first.
//!
//! # The pieces
//!
//! Each owns its own state:
//! - [`config`]: routes.toml, parsed and validated.
//! - [`admission`]: connections held against `max_connections`, and refusals.
//! - [`route`]: matchers and the route table that picks a route for a first message.
//! - [`balance`]: the order in which a route's backends are tried.
//! - [`backend`]: a proxy's backend set: each address's live connections and health, and
//!   the threads that check it.
//! - [`proxy_protocol`]: the PROXY protocol header `send_proxy` writes to backends.
//! - [`probe`]: the loaded eBPF programs and their maps.
//! - [`budget`]: the bounds on what the kernel may hold for spliced directions, and the
//!   account of it.
//! - [`logging`]: how log lines are written: colours only at a terminal, JSON escaped.
//! - [`ending`]: how a connection ended: its access-log line and the metrics counted at
//!   its end, the same wherever it ended.
//! - [`metrics`]: what is counted about connections, and its Prometheus exposition.
//! - [`privileges`]: becoming an unprivileged user once the probe and listeners are set up.
//! - [`splice`]: the engine whose workers are the event loops: they accept, and own each
//!   connection after its first message.
//! - the server (crate-private): listeners, routing, and a connection from accept until
//!   it is routed and dialed, in the engine worker that accepted it.
//! - [`Proxy`] (running.rs): all of these started in order, as one value.

#![warn(missing_docs)]

pub mod admission;
pub mod backend;
pub mod balance;
pub mod budget;
pub mod config;
mod count;
pub mod ending;
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
pub use server::{Limits, Steering};
