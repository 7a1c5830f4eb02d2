//! The proxy's metrics: what the server and the engine count about each connection, the
//! probe's counters and each backend's health and connections read at scrape time, and
//! their Prometheus exposition ([`Metrics::encode`], served over HTTP when
//! [`ProxyBuilder::metrics`](crate::ProxyBuilder::metrics) asks). One
//! [`Metrics`] per engine; the server records through the engine's.
//!
//! Bytes per route are counted when a connection closes, from the kernel's TCP_INFO of
//! the proxy's two sockets (`bytes_received`, less the FIN), in both modes: that is
//! exactly what each peer sent, the first message included. The probe's counters move
//! while a transfer runs, but count only what the kernel redirected (not the first
//! message, nor anything copied) and have no route: they are exported beside, as
//! `splice_proxy_redirected_*`.
//!
//! Label values such as a connection's `mode` or a refusal's `reason` come as the access
//! log writes them: [`ending`](crate::ending) owns them, and records a connection's end
//! here and in its log line at once.

use std::{
    fmt, io,
    net::{SocketAddr, TcpListener},
    sync::{Arc, OnceLock, Weak},
    thread,
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::{backend::Backends, ending::Mode, probe::Probe};

/// Upper bounds, in seconds, of the latency histograms' buckets: from a loopback
/// round trip to the longest sensible timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PairLabels {
    route: String,
    backend: String,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    route: String,
    /// "up": client to backend; "down": backend to client.
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// What the server and the engine record, and the registry that exposes it.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    accepted_helping: Counter,
    routing: Gauge,
    proxied: Family<PairLabels, Counter>,
    active: Family<PairLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    first_message: Histogram,
    connect: HistogramFamily<BackendLabels>,
    connect_failures: Family<BackendLabels, Counter>,
    held: Gauge,
    throttled: Counter,
    spliced_later: Counter,
    switches_given_up: Counter,
    /// The backend set whose states are exported, once a proxy shows it.
    backends: BackendSlot,
}

/// Where [`BackendHealth`] finds the proxy's backend set: weak, so that the metrics,
/// which an engine's user may keep, never keep the set and its checker threads alive.
type BackendSlot = Arc<OnceLock<Weak<Backends>>>;

impl Metrics {
    /// Metrics for an engine; with a probe, its counters are exported too.
    pub(crate) fn new(probe: Option<Arc<Probe>>) -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("splice_proxy"),
            accepted: Counter::default(),
            accepted_helping: Counter::default(),
            routing: Gauge::default(),
            proxied: Family::default(),
            active: Family::default(),
            refused: Family::default(),
            bytes: Family::default(),
            first_message: latency_histogram(),
            connect: Family::new_with_constructor(latency_histogram),
            connect_failures: Family::default(),
            held: Gauge::default(),
            throttled: Counter::default(),
            spliced_later: Counter::default(),
            switches_given_up: Counter::default(),
            backends: BackendSlot::default(),
        };
        metrics.registered(probe)
    }

    fn registered(mut self, probe: Option<Arc<Probe>>) -> Metrics {
        let registry = &mut self.registry;
        registry.register(
            "connections_accepted",
            "Connections accepted from clients",
            self.accepted.clone(),
        );
        registry.register(
            "connections_accepted_helping",
            "Connections a worker accepted from another worker's listener, helping it empty a queue it had fallen behind on; counted in connections_accepted too",
            self.accepted_helping.clone(),
        );
        registry.register(
            "connections_routing",
            "Connections accepted and not yet proxied: reading their first message or connecting to a backend",
            self.routing.clone(),
        );
        registry.register(
            "connections",
            "Connections handed to the engine, by route, backend and mode (splice or copy)",
            self.proxied.clone(),
        );
        registry.register(
            "connections_active",
            "Connections being proxied now, by route, backend and mode",
            self.active.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before being proxied, by reason",
            self.refused.clone(),
        );
        registry.register_with_unit(
            "transferred",
            "Bytes each peer sent through closed connections (first message included), by route and direction: up is client to backend, down is backend to client; counted from TCP_INFO at close",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register_with_unit(
            "first_message",
            "Time from accept until the first message decided a route",
            Unit::Seconds,
            self.first_message.clone(),
        );
        registry.register_with_unit(
            "backend_connect",
            "Time to connect to a backend that accepted, by backend",
            Unit::Seconds,
            self.connect.clone(),
        );
        registry.register(
            "backend_connect_failures",
            "Connects to a backend that failed or timed out, by backend",
            self.connect_failures.clone(),
        );
        registry.register_with_unit(
            "splice_held",
            "Bytes the kernel holds for spliced directions beyond their sockets' buffers (redirected, not yet in the destination's send queue), as the engine last measured them; each direction holds at most splice_backlog_max, all together at most splice_backlog_total",
            Unit::Bytes,
            self.held.clone(),
        );
        registry.register(
            "splice_throttles",
            "Times a spliced direction ran out of credit and parked its bytes, because its reader was slower than its sender by more than splice_backlog_max",
            self.throttled.clone(),
        );
        registry.register(
            "connections_spliced_later",
            "Connections copied at first and spliced once they streamed or outlived --splice-after; counted under mode copy in connections_total",
            self.spliced_later.clone(),
        );
        registry.register(
            "splice_switches_given_up",
            "Attempts to splice a copied connection given up because a direction could not drain into its destination (a reader that does not read); each is tried again after a doubling delay, and the connection is copied meanwhile",
            self.switches_given_up.clone(),
        );
        registry.register_collector(Box::new(BackendHealth(Arc::clone(&self.backends))));
        if let Some(probe) = probe {
            registry.register_collector(Box::new(ProbeCounters(probe)));
        }
        self
    }

    /// Exports the states of `backends`, the set of the proxy this engine runs, from now
    /// on. Only the first set shown is: an engine runs one proxy.
    pub(crate) fn show_backends(&self, backends: &Arc<Backends>) {
        let _ = self.backends.set(Arc::downgrade(backends));
    }

    /// The bytes the kernel holds for spliced directions changed by `delta`.
    pub(crate) fn held(&self, delta: i64) {
        self.held.inc_by(delta);
    }

    /// A connection [`Metrics::proxy_started`] counted as copied is spliced from now on.
    pub(crate) fn spliced_later(&self, route: &str, backend: SocketAddr) {
        self.active
            .get_or_create(&pair_labels(route, backend, Mode::Copy.as_str()))
            .dec();
        self.active
            .get_or_create(&pair_labels(route, backend, Mode::Splice.as_str()))
            .inc();
        self.spliced_later.inc();
    }

    /// Attempts to splice copied connections were given up `times` more times.
    pub(crate) fn switches_given_up(&self, times: u64) {
        self.switches_given_up.inc_by(times);
    }

    /// Spliced directions parked `times` more times.
    pub(crate) fn throttled(&self, times: u64) {
        self.throttled.inc_by(times);
    }

    /// A client connected; it counts as routing until [`Metrics::routed`].
    pub(crate) fn accepted(&self) {
        self.accepted.inc();
        self.routing.inc();
    }

    /// A connection [`Metrics::accepted`] counted was accepted by a worker helping
    /// another.
    pub(crate) fn accepted_helping(&self) {
        self.accepted_helping.inc();
    }

    /// A connection counted by [`Metrics::accepted`] left the server: handed to the
    /// engine, or closed.
    pub(crate) fn routed(&self) {
        self.routing.dec();
    }

    /// A route was decided this long after accept.
    pub(crate) fn first_message_decided(&self, after: Duration) {
        self.first_message.observe(after.as_secs_f64());
    }

    /// A connect to `backend` succeeded after this long.
    pub(crate) fn backend_connected(&self, backend: SocketAddr, after: Duration) {
        self.connect
            .get_or_create(&backend_labels(backend))
            .observe(after.as_secs_f64());
    }

    /// A connect to `backend` failed or timed out.
    pub(crate) fn backend_connect_failed(&self, backend: SocketAddr) {
        self.connect_failures
            .get_or_create(&backend_labels(backend))
            .inc();
    }

    /// A connection ended before the engine had it, for `reason` (an
    /// [`ending::Refusal`](crate::ending::Refusal)'s value).
    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The engine took a connection and moves it in `mode` (an
    /// [`ending::Mode`](crate::ending::Mode)'s value).
    pub(crate) fn proxy_started(&self, route: &str, backend: SocketAddr, mode: &'static str) {
        let labels = pair_labels(route, backend, mode);
        self.proxied.get_or_create(&labels).inc();
        self.active.get_or_create(&labels).inc();
    }

    /// A connection [`Metrics::proxy_started`] counted closed, after its peers sent
    /// `up` (client) and `down` (backend) bytes.
    pub(crate) fn proxy_closed(
        &self,
        route: &str,
        backend: SocketAddr,
        mode: &'static str,
        up: u64,
        down: u64,
    ) {
        self.active
            .get_or_create(&pair_labels(route, backend, mode))
            .dec();
        for (direction, bytes) in [("up", up), ("down", down)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    route: route.to_owned(),
                    direction,
                })
                .inc_by(bytes);
        }
    }

    /// The Prometheus exposition of every metric (OpenMetrics text, which Prometheus
    /// scrapes as it does its own text format).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = text::encode(&mut out, &self.registry) {
            // Only a collector fails, and the probe collector returns no error of its
            // own: keep what was encoded rather than serve nothing.
            tracing::warn!("encoding the metrics failed: {e}");
        }
        out
    }
}

fn pair_labels(route: &str, backend: SocketAddr, mode: &'static str) -> PairLabels {
    PairLabels {
        route: route.to_owned(),
        backend: backend.to_string(),
        mode,
    }
}

fn backend_labels(backend: SocketAddr) -> BackendLabels {
    BackendLabels {
        backend: backend.to_string(),
    }
}

/// The probe's per-CPU counters, summed when scraped.
struct ProbeCounters(Arc<Probe>);

impl fmt::Debug for ProbeCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeCounters")
    }
}

impl Collector for ProbeCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = match self.0.counters() {
            Ok(counters) => counters,
            Err(e) => {
                tracing::warn!("reading the probe's counters for the metrics failed: {e}");
                return Ok(());
            }
        };
        for (name, help, value) in [
            (
                "redirected_bytes",
                "Bytes the kernel redirected between spliced sockets (all routes; not the first message, nor copied bytes).",
                counters.redirected_bytes,
            ),
            (
                "redirected_messages",
                "Messages (skbs) the kernel redirected between spliced sockets.",
                counters.redirected_messages,
            ),
            (
                "redirect_failures",
                "Messages the kernel dropped because their socket had no peer in the maps.",
                counters.redirect_failures,
            ),
            (
                "redirect_dropped_bytes",
                "Bytes in the messages counted by splice_proxy_redirect_failures_total.",
                counters.dropped_bytes,
            ),
            (
                "resent_bytes_cut",
                "Retransmitted bytes the kernel handed the verdict again and it cut, so that the peer got them once.",
                counters.resent_bytes_cut,
            ),
            (
                "resent_bytes_passed",
                "Retransmitted bytes the verdict could not cut: the peer got them twice (should stay 0).",
                counters.resent_bytes_passed,
            ),
            (
                "unsequenced_messages",
                "Messages the kernel gave the verdict without sequence numbers, so it could not check them for retransmitted bytes (0 on the kernels tested).",
                counters.unsequenced_messages,
            ),
            (
                "parked_bytes",
                "Bytes the kernel parked in their own socket because their direction had no credit left; the engine copies them.",
                counters.parked_bytes,
            ),
            (
                "credit_asks",
                "Times the kernel asked the engine for more credit for a spliced direction.",
                counters.asks,
            ),
            (
                "credit_asks_refused",
                "Credit requests lost to a full ring (the kernel asks again, or the engine finds the park at the close).",
                counters.asks_refused,
            ),
            (
                "untracked_messages",
                "Messages of spliced sockets that had no flow record, redirected without a bound (0 unless something is wrong: a join that finds the flow map full is copied instead).",
                counters.untracked_messages,
            ),
            (
                "splice_budget_refusals",
                "Connections copied instead of spliced because the rest of splice_backlog_total could not give their directions a first credit.",
                self.0.budget().refused(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let promised =
            ConstGauge::new(i64::try_from(self.0.budget().promised()).unwrap_or(i64::MAX));
        promised.encode(encoder.encode_descriptor(
            "splice_budget_promised",
            "Bytes of splice_backlog_total promised to spliced directions now: the most the kernel can come to hold for them beyond their sockets' buffers.",
            Some(&Unit::Bytes),
            promised.metric_type(),
        )?)?;
        Ok(())
    }
}

/// What is exported of one backend's shared state.
struct BackendSample {
    labels: BackendLabels,
    up: bool,
    checked: bool,
    connections: usize,
}

/// One of [`BackendSample`]'s values as a gauge.
type BackendGauge = fn(&BackendSample) -> i64;

/// Every backend the proxy's routes name, read from its state when scraped.
#[derive(Debug)]
struct BackendHealth(BackendSlot);

impl Collector for BackendHealth {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let states =
            (self.0.get().and_then(Weak::upgrade)).map_or_else(Vec::new, |set| set.states());
        let mut backends: Vec<BackendSample> = states
            .into_iter()
            .map(|state| BackendSample {
                labels: backend_labels(state.addr()),
                up: !state.is_down(),
                checked: state.is_checked(),
                connections: state.active(),
            })
            .collect();
        backends.sort_by(|a, b| a.labels.backend.cmp(&b.labels.backend));
        let gauges: [(&str, &str, BackendGauge); 3] = [
            (
                "backend_up",
                "1 if the backend takes new connections, 0 if its health is tracked and its last health_fails connects failed.",
                |b| i64::from(b.up),
            ),
            (
                "backend_health_checked",
                "1 if the backend's health is tracked (health_interval), 0 if it is always taken as up.",
                |b| i64::from(b.checked),
            ),
            (
                "backend_connections",
                "Connections to the backend the engine holds now (what least-conn compares).",
                |b| i64::try_from(b.connections).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for backend in &backends {
                ConstGauge::new(value(backend)).encode(family.encode_family(&backend.labels)?)?;
            }
        }
        Ok(())
    }
}

/// The HTTP endpoint that serves the metrics, on a thread of its own; dropping it stops
/// the thread and closes the listener.
pub(crate) struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Endpoint {
    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the metrics endpoint had panicked");
        }
    }
}

/// Serves `metrics` as `GET /metrics` on `listener` from a thread of its own until the
/// returned endpoint is dropped; any other path is 404, any other method 405.
pub(crate) fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<Endpoint> {
    let server =
        Arc::new(tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?);
    let content_type = tiny_http::Header::from_bytes(
        "Content-Type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
    .map_err(|()| io::Error::other("invalid Content-Type header"))?;
    let serving = Arc::clone(&server);
    // Not named splice-*: the tests count those threads' reads as the proxy's.
    let thread = thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                let response = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, "/metrics") => {
                        tiny_http::Response::from_string(metrics.encode())
                            .with_header(content_type.clone())
                    }
                    (tiny_http::Method::Get, _) => {
                        tiny_http::Response::from_string("not found: try /metrics\n")
                            .with_status_code(404)
                    }
                    _ => tiny_http::Response::from_string("only GET\n").with_status_code(405),
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!("answering a metrics request failed: {e}");
                }
            }
        })?;
    Ok(Endpoint {
        server,
        thread: Some(thread),
    })
}
