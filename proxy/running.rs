//! A running proxy as one value: [`Proxy`] owns the probe, the engine's workers, the
//! listeners and the metrics endpoint, and [`ProxyBuilder`] starts it, in the order the
//! kernel and privileges ask for (probe and sockets first, threads last).
//!
//! Dropping a [`Proxy`] resets what it holds and joins its threads (see its docs).

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    admission::Admission,
    backend::Backends,
    budget::Backlog,
    config::Config,
    metrics,
    privileges::{self, Identity, PrivilegeError},
    probe::{self, Probe, ProbeError},
    route::{RouteTable, Router},
    server::{Limits, Listeners, Server, Steering},
    splice::DEFAULT_SPLICE_AFTER,
    splice::{Closer, SPLICED_SEND_BUFFER, SpliceEngine},
};

/// What failed while a proxy started or was changed. Messages name the step and the
/// address; causes are their `source()`, except where noted.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// [`Splicing::Required`] and the probe did not load. Its cause is in the message,
    /// reduced to the innermost error: the probe's errors repeat it at every level.
    #[error("the probe could not be loaded: {}", with_root_cause(.0))]
    ProbeLoad(ProbeError),
    /// Binding the listeners failed.
    #[error("listening on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the kernel refused it.
        #[source]
        source: std::io::Error,
    },
    /// Binding or starting the metrics endpoint failed.
    #[error("the metrics endpoint on {addr}")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Becoming the user of [`ProxyBuilder::run_as`] failed.
    #[error("dropping privileges")]
    Privileges(#[source] PrivilegeError),
    /// [`Splicing::Required`] with [`ProxyBuilder::run_as`], on a kernel that refuses the
    /// probe's maps to a process without capabilities (before 5.11). The cause is in the
    /// message, as for [`ProxyError::ProbeLoad`].
    #[error(
        "this kernel refuses the probe's maps to a process without capabilities ({}), so it cannot splice after dropping them",
        with_root_cause(.0)
    )]
    MapsRefused(ProbeError),
    /// Starting the engine's worker threads failed.
    #[error("starting the splice workers")]
    Engine(#[source] std::io::Error),
    /// Handing the listeners to the workers failed.
    #[error("starting to accept")]
    Accept(#[source] std::io::Error),
    /// [`Steering::ByCpu`] was asked and the kernel refused the listeners' program.
    #[error("steering the listeners on {addr} by CPU")]
    Steer {
        /// The address listened on.
        addr: SocketAddr,
        /// Why the kernel refused it.
        #[source]
        source: std::io::Error,
    },
    /// [`Proxy::stop_accepting`] could not shut a listener.
    #[error("stopping the listeners")]
    StopAccepting(#[source] std::io::Error),
}

/// Whether a proxy splices in the kernel or copies in userspace. Either way a
/// connection the kernel refuses to splice (one that half-closed during the hand-off,
/// say) is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Splicing {
    /// Splice where it is sound: if the probe cannot load, or the kernel is older than
    /// those the bound on a spliced direction is tested on, warn once and copy.
    #[default]
    Auto,
    /// Splice, or fail to start when the probe cannot load; on an untested kernel, warn
    /// and splice anyway.
    Required,
    /// Copy every connection; the probe is not loaded.
    Off,
}

/// Where a proxy's routes come from. A routes file's table is built at start, after
/// privileges are dropped: building it starts the backends' health-check threads.
enum Routes {
    File(Config),
    Router(Arc<dyn Router>),
}

/// How to start a [`Proxy`]: everything but the routes has a default.
#[must_use = "a builder does nothing until start() is called"]
pub struct ProxyBuilder {
    routes: Routes,
    /// `None`: the routes file's, or [`Limits::default`] for a router.
    limits: Option<Limits>,
    listen: SocketAddr,
    workers: usize,
    steering: Steering,
    splicing: Splicing,
    map_capacity: u32,
    splice_after: Duration,
    backlog: Backlog,
    metrics: Option<SocketAddr>,
    run_as: Option<Identity>,
}

impl ProxyBuilder {
    fn new(routes: Routes, backlog: Backlog) -> ProxyBuilder {
        ProxyBuilder {
            routes,
            limits: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 0,
            steering: Steering::Auto,
            splicing: Splicing::Auto,
            map_capacity: proxy_probe::DEFAULT_MAP_CAPACITY,
            splice_after: DEFAULT_SPLICE_AFTER,
            backlog,
            metrics: None,
            run_as: None,
        }
    }

    /// Where clients connect; port 0 lets the kernel pick one ([`Proxy::local_addr`]
    /// says which). Default: 127.0.0.1:0.
    pub fn listen(mut self, addr: SocketAddr) -> ProxyBuilder {
        self.listen = addr;
        self
    }

    /// Worker threads, each with its own listener and event loop; a connection stays on
    /// the worker that accepted it. Default: 0, one per CPU.
    pub fn workers(mut self, workers: usize) -> ProxyBuilder {
        self.workers = workers;
        self
    }

    /// Which worker's listener gets a new connection. Default: [`Steering::Auto`], by CPU
    /// when splicing.
    pub fn steering(mut self, steering: Steering) -> ProxyBuilder {
        self.steering = steering;
        self
    }

    /// Splice, or copy. Default: [`Splicing::Auto`].
    pub fn splicing(mut self, splicing: Splicing) -> ProxyBuilder {
        self.splicing = splicing;
        self
    }

    /// Sockets the probe's maps hold, two per spliced connection; connections beyond
    /// are copied. Default: 262144.
    pub fn map_capacity(mut self, sockets: u32) -> ProxyBuilder {
        self.map_capacity = sockets;
        self
    }

    /// How long a connection is copied in userspace before it is spliced, unless a read
    /// of it fills a 64 KiB buffer first (it streams): a short exchange costs less
    /// copied than spliced. Zero splices every connection right after its first
    /// message. Connections handed to the engine with `adopt` are spliced at once.
    /// Default: 100 ms.
    pub fn splice_after(mut self, after: Duration) -> ProxyBuilder {
        self.splice_after = after;
        self
    }

    /// The timeouts and connection limits, instead of the routes file's (a
    /// [`Proxy::reload`] brings the new file's). Default: the routes file's, or
    /// [`Limits::default`] for a router.
    pub fn limits(mut self, limits: Limits) -> ProxyBuilder {
        self.limits = Some(limits);
        self
    }

    /// Bytes the kernel may hold for one spliced direction and for all of them (a
    /// routes file's `splice_backlog_max` and `splice_backlog_total`). Default: the
    /// file's, or 32 MiB and 512 MiB.
    pub fn backlog(mut self, backlog: Backlog) -> ProxyBuilder {
        self.backlog = backlog;
        self
    }

    /// Serve Prometheus metrics at `http://ADDR/metrics`. Default: off.
    pub fn metrics(mut self, addr: SocketAddr) -> ProxyBuilder {
        self.metrics = Some(addr);
        self
    }

    /// Once the probe is loaded and the listeners are bound, become `identity`, with no
    /// supplementary groups and no capabilities. It must be the process's first thread
    /// to start, and no other may run yet (see [`privileges::drop_to`]). Default: keep
    /// the process's user.
    pub fn run_as(mut self, identity: Identity) -> ProxyBuilder {
        self.run_as = Some(identity);
        self
    }

    /// Loads the probe (unless [`Splicing::Off`]), binds the listeners and the metrics
    /// endpoint, drops privileges ([`ProxyBuilder::run_as`]), and starts the workers,
    /// which accept from then on.
    pub fn start(self) -> Result<Proxy, ProxyError> {
        let mut probe = match self.splicing {
            Splicing::Off => None,
            Splicing::Required => {
                Some(Probe::load(self.map_capacity, self.backlog).map_err(ProxyError::ProbeLoad)?)
            }
            Splicing::Auto => match Probe::load(self.map_capacity, self.backlog) {
                Ok(probe) => Some(probe),
                Err(e) => {
                    tracing::warn!(
                        "the probe could not be loaded, so every connection is copied in userspace: {}",
                        with_root_cause(&e)
                    );
                    None
                }
            },
        };
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let listeners =
            Listeners::bind(self.listen, workers).map_err(|source| ProxyError::Bind {
                addr: self.listen,
                source,
            })?;
        let metrics_listener = self
            .metrics
            .map(|addr| match TcpListener::bind(addr) {
                Ok(listener) => Ok((addr, listener)),
                Err(source) => Err(ProxyError::Metrics { addr, source }),
            })
            .transpose()?;
        // Before any thread starts: each thread keeps the capabilities it was started
        // with.
        if let Some(identity) = &self.run_as {
            privileges::drop_to(identity).map_err(ProxyError::Privileges)?;
            tracing::info!(
                "running as {}:{} ({}:{}) with no capabilities",
                identity.user,
                identity.group,
                identity.uid,
                identity.gid
            );
            // Kernels before 5.11 (Debian 11's 5.10 among them) refuse every bpf()
            // command, on maps already open too, to a process without CAP_BPF or
            // CAP_SYS_ADMIN while unprivileged BPF is disabled: then the maps are useless
            // from here on.
            if let Some(loaded) = &probe
                && let Err(e) = loaded.counters()
            {
                let refused = ProxyError::MapsRefused(e);
                match self.splicing {
                    Splicing::Required => return Err(refused),
                    _ => {
                        tracing::warn!("{refused}: every connection is copied in userspace");
                        probe = None;
                    }
                }
            }
            if probe.is_some() {
                warn_if_send_buffers_capped();
            }
        }
        if probe.is_some()
            && let Some(release) = probe::kernel_release()
            && !probe::bound_is_tested_on(&release)
        {
            let why = format!(
                "kernel {release}: the bound on a spliced direction (splice_backlog_max) is tested on 6.1, 6.12 and 6.18, not on older kernels, and on 5.10 a throttled direction stalled and once delivered wrong bytes (docs/flow-control.md)"
            );
            match self.splicing {
                Splicing::Required => tracing::warn!("{why}; splicing as asked"),
                _ => {
                    tracing::warn!("{why}: every connection is copied in userspace");
                    probe = None;
                }
            }
        }

        let by_cpu = match self.steering {
            Steering::Auto => probe.is_some(),
            Steering::ByCpu => true,
            Steering::ByHash => false,
        };
        let steering = match by_cpu.then(|| listeners.steer_by_cpu()) {
            None => Steering::ByHash,
            Some(Ok(())) => Steering::ByCpu,
            Some(Err(source)) if self.steering == Steering::Auto => {
                tracing::warn!(
                    "connections are spread by a hash of their addresses: steering the listeners by CPU failed: {source}"
                );
                Steering::ByHash
            }
            Some(Err(source)) => {
                return Err(ProxyError::Steer {
                    addr: listeners.local_addr(),
                    source,
                });
            }
        };
        let engine = SpliceEngine::new(probe.map(Arc::new), workers, self.splice_after)
            .map_err(ProxyError::Engine)?;
        let metrics = metrics_listener
            .map(|(addr, listener)| {
                metrics::serve(listener, Arc::clone(engine.metrics()))
                    .map_err(|source| ProxyError::Metrics { addr, source })
            })
            .transpose()?;
        // The proxy's own: another proxy in the process that lists the same addresses
        // keeps its own counts and health.
        let backends = Arc::new(Backends::new());
        engine.metrics().show_backends(&backends);
        let (router, limits): (Arc<dyn Router>, Limits) = match self.routes {
            Routes::File(config) => (
                Arc::new(RouteTable::new(&config, &backends)),
                self.limits.unwrap_or_else(|| Limits::from(&config)),
            ),
            Routes::Router(router) => (router, self.limits.unwrap_or_default()),
        };
        let server =
            Server::start(listeners, router, limits, &engine).map_err(ProxyError::Accept)?;
        Ok(Proxy {
            engine,
            server,
            steering,
            metrics,
            backends,
        })
    }
}

/// A running proxy: it accepts on its listeners, routes each connection on its first
/// message, and splices or copies it until it closes, on threads of its own.
///
/// Dropping it ends it at once: its listeners refuse new connects, every connection it
/// holds is reset and logged (a connection cannot outlive the probe, whose programs
/// detach when it is dropped, and a reset tells both peers the stream was cut rather
/// than ended), and the drop returns once its threads have ended. [`Proxy::shutdown`]
/// lets the connections finish first.
pub struct Proxy {
    // Dropped first: the workers end, resetting what they hold, before the listeners'
    // duplicates and the metrics endpoint close.
    engine: SpliceEngine,
    server: Server,
    /// How its listeners are steered: [`Steering::ByCpu`] or [`Steering::ByHash`].
    steering: Steering,
    metrics: Option<metrics::Endpoint>,
    /// Dropped last, once the routes and connections that hold its states are gone: it
    /// ends the health-check threads. Shared only with the metrics, weakly.
    backends: Arc<Backends>,
}

impl Proxy {
    /// A proxy that routes with `router` (a [`RouteTable`], or any
    /// `Fn(&FirstMessage) -> Decision`), with [`Limits::default`] unless
    /// [`ProxyBuilder::limits`] says otherwise.
    ///
    /// [`FirstMessage`]: crate::route::FirstMessage
    /// [`Decision`]: crate::route::Decision
    pub fn builder(router: impl Router) -> ProxyBuilder {
        ProxyBuilder::new(Routes::Router(Arc::new(router)), Backlog::default())
    }

    /// A proxy that routes as a routes file says, with its limits and its
    /// `splice_backlog_max`.
    pub fn from_config(config: Config) -> ProxyBuilder {
        let backlog = Backlog {
            bytes: config.splice_backlog_max,
            total: config.splice_backlog_total,
        };
        ProxyBuilder::new(Routes::File(config), backlog)
    }

    /// Where it accepts clients (the port the kernel chose, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where it serves metrics, if [`ProxyBuilder::metrics`] asked.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(metrics::Endpoint::local_addr)
    }

    /// How new connections are given to its workers, as decided at start:
    /// [`Steering::ByCpu`] or [`Steering::ByHash`], never [`Steering::Auto`].
    pub fn steering(&self) -> Steering {
        self.steering
    }

    /// Whether it splices (the probe is loaded), or copies every connection.
    pub fn is_splicing(&self) -> bool {
        self.engine.probe().is_some()
    }

    /// Routes connections accepted from now on as `config` says, with its limits, and
    /// bounds spliced directions by its `splice_backlog_max` and `splice_backlog_total`
    /// from their next grant, and pairs that join from now on.
    /// Connections already accepted keep the routing they started with. The listen
    /// address is not part of a routes file and stays.
    pub fn reload(&self, config: &Config) {
        self.server.routing().replace(
            Arc::new(RouteTable::new(config, &self.backends)),
            Limits::from(config),
        );
        if let Some(probe) = self.engine.probe() {
            probe.set_backlog(Backlog {
                bytes: config.splice_backlog_max,
                total: config.splice_backlog_total,
            });
        }
    }

    /// Routes connections accepted from now on with `router` and `limits`; those
    /// already accepted keep the routing they started with.
    pub fn replace_routing(&self, router: impl Router, limits: Limits) {
        self.server.routing().replace(Arc::new(router), limits);
    }

    /// Stops accepting: from now on connects are refused. Connections already accepted
    /// go on. Calling it again does nothing.
    pub fn stop_accepting(&self) -> Result<(), ProxyError> {
        self.server
            .stop_accepting()
            .map_err(ProxyError::StopAccepting)
    }

    /// Connections it holds: accepted and not yet closed.
    pub fn connections(&self) -> usize {
        self.server.in_flight() + self.engine.live()
    }

    /// Connections accepted and not yet handed to the engine: still reading their first
    /// message, or connecting to a backend.
    pub fn in_flight(&self) -> usize {
        self.server.in_flight()
    }

    /// Stops accepting, waits up to `grace` for every connection it holds (reading its
    /// first message, connecting, spliced or copied) to end, then resets what is left
    /// and stops. The wait ends when the last connection closes, or when a [`Closer`]
    /// closes them all. Logs how many were live, and how it ended.
    pub fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        if let Err(e) = self.server.stop_accepting() {
            tracing::error!("stopping the listeners failed: {e}");
        }
        tracing::info!("shutting down: {} connections live", self.connections());
        // With the listeners shut, the count in flight only falls, and a connection
        // counts as live before it stops counting in flight: waiting for one and then
        // the other misses none.
        if self.server.wait_handed_off(deadline) && self.engine.wait_closed(deadline) {
            tracing::info!("shutdown complete");
        } else {
            tracing::info!(
                "grace period over: closing {} connections",
                self.connections()
            );
        }
        // Dropping resets what is left, each with its access-log line, before it returns.
    }

    /// A handle that resets every connection from any thread: e.g. to end a
    /// [`Proxy::shutdown`]'s grace early when an operator asks twice.
    pub fn closer(&self) -> Closer {
        self.engine.closer()
    }

    /// The engine: its live count, its metrics, the probe, and
    /// [`SpliceEngine::adopt`] for connections a program accepted itself.
    pub fn engine(&self) -> &SpliceEngine {
        &self.engine
    }

    /// Connections held, by the proxy and by each route, and clients refused by
    /// `max_connections`.
    pub fn admission(&self) -> &Arc<Admission> {
        self.server.admission()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // First, so that connects are refused rather than left in a backlog no worker
        // reads any more.
        if let Err(e) = self.server.stop_accepting() {
            tracing::error!("stopping the listeners failed: {e}");
        }
    }
}

/// An error's message and its innermost cause (the OS error, usually). aya's errors
/// repeat their cause at every level, so the whole chain would say it three times.
fn with_root_cause(error: &dyn std::error::Error) -> String {
    let mut root = error;
    while let Some(source) = root.source() {
        root = source;
    }
    if std::ptr::addr_eq(root, error) {
        error.to_string()
    } else {
        format!("{error}: {root}")
    }
}

/// Without CAP_NET_ADMIN the spliced sockets' send buffers stop at net.core.wmem_max,
/// and a splice with small buffers is no faster than a copy: say so once, with the fix.
fn warn_if_send_buffers_capped() {
    let path = "/proc/sys/net/core/wmem_max";
    let Some(max) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
    else {
        return;
    };
    if max < SPLICED_SEND_BUFFER {
        tracing::warn!(
            "without CAP_NET_ADMIN the spliced sockets' send buffers stop at net.core.wmem_max = {max} bytes, \
             not {SPLICED_SEND_BUFFER}, which slows splicing: sysctl net.core.wmem_max={SPLICED_SEND_BUFFER} restores them"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{config::Config, server::Limits};

    /// A router's default limits are a routes file's: the two must not drift apart.
    #[test]
    fn default_limits_are_a_routes_file_defaults() {
        let file = "[[route]]\nname = \"a\"\nprefix = \"a\"\nbackends = [\"127.0.0.1:9\"]\n";
        let config = Config::parse(file, Path::new("defaults.toml")).unwrap();
        let (from_file, default) = (Limits::from(&config), Limits::default());
        assert_eq!(
            (
                from_file.first_message_timeout,
                from_file.first_message_max,
                from_file.connect_timeout,
                from_file.max_connections,
                from_file.idle_timeout,
            ),
            (
                default.first_message_timeout,
                default.first_message_max,
                default.connect_timeout,
                default.max_connections,
                default.idle_timeout,
            )
        );
        assert!(from_file.route_max_connections.is_empty());
    }
}
