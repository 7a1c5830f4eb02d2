//! How a connection ended, said in one place: its access-log line and what the metrics
//! count at its end.
//!
//! A connection ends in one of three places: the server closes it before it is proxied
//! (no route, no backend, a limit, a client that left; or refused at accept beyond
//! `max_connections`), the engine fails to set it up, or the engine finishes a proxied
//! pair. Each builds a `ConnectionEnd` from what it knew and calls
//! `ConnectionEnd::record`. Kept here rather than at each of those places so that
//! every line has the same fields in the same order, the same target and the same
//! `end` values, and so that the metrics' label values are the log's: README's "Access
//! log" documents the line, and operators and the tests parse it.
//!
//! The metrics are a sink for label values: this module knows which values there are
//! and when each is counted, [`Metrics`] only how they are exported.

use std::{
    fmt::{self, Display},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::metrics::Metrics;

/// The target of every access-log line, wherever the connection ended: what README
/// documents and what the lines of proxied connections have always had, so that one
/// filter (`RUST_LOG=splice_proxy::splice=warn`) reaches every connection's end.
const ACCESS_LOG_TARGET: &str = "splice_proxy::splice";

/// Why a connection ended: the `end` field of its access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// Proxied, and both ends closed their side.
    Closed,
    /// Proxied, and a side reset or failed, or the proxy shut down before it ended.
    Reset,
    /// Proxied, and reset because no byte moved for its idle timeout.
    Idle,
    /// Never proxied: closed before the engine moved its bytes.
    Refused(Refusal),
}

impl End {
    /// The value, as the access log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Reset => "reset",
            End::Idle => "idle",
            End::Refused(refusal) => refusal.as_str(),
        }
    }

    /// Whether its line is a warning: a backend, a limit or the proxy itself ended it,
    /// which is the operator's business. A client that left or sent what no route
    /// takes is the client's, and a proxied connection's end is the normal course.
    fn is_for_the_operator(self) -> bool {
        match self {
            End::Closed | End::Reset | End::Idle => false,
            End::Refused(Refusal::ClientGone | Refusal::NoRoute | Refusal::Unparsed) => false,
            End::Refused(
                Refusal::NoBackend
                | Refusal::BackendWrite
                | Refusal::Setup
                | Refusal::MaxConnections
                | Refusal::RouteMaxConnections,
            ) => true,
        }
    }
}

impl Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection ended before the engine proxied it: the `reason` label of
/// `splice_proxy_connections_refused_total`, and the `end` of its access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The client closed or reset before a route was decided.
    ClientGone,
    /// No route matched the first message, and there is no default route.
    NoRoute,
    /// The first message claimed TLS or HTTP and could not be parsed, and the routes
    /// say `on_unparsed = "reset"`: reset.
    Unparsed,
    /// No backend of the route accepted a connection.
    NoBackend,
    /// Writing the first message to the backend failed.
    BackendWrite,
    /// Handing the sockets to the engine failed (duplicating or registering them).
    Setup,
    /// The proxy held its `max_connections`: reset at accept.
    MaxConnections,
    /// The route the first message chose held its `max_connections`.
    RouteMaxConnections,
}

impl Refusal {
    /// The value, as the metrics and the access log write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClientGone => "client_gone",
            Refusal::NoRoute => "no_route",
            Refusal::Unparsed => "unparsed",
            Refusal::NoBackend => "no_backend",
            Refusal::BackendWrite => "backend_write_failed",
            Refusal::Setup => "setup_failed",
            Refusal::MaxConnections => "max_connections",
            Refusal::RouteMaxConnections => "route_max_connections",
        }
    }
}

impl Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection's bytes move after its first message, for logs and metrics. A pair
/// with either direction in the kernel counts as spliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// At least one direction moves in the kernel.
    Splice,
    /// Both directions are copied in userspace.
    Copy,
}

impl Mode {
    /// The label value, as the metrics and the access log write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        }
    }
}

/// What the access log says about a connection the engine is given: who, where to,
/// and since when.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// The route's name.
    pub route: Arc<str>,
    /// The backend's address.
    pub backend: SocketAddr,
    /// When it was accepted: its duration counts from here.
    pub accepted: Instant,
}

/// One connection that ended, with what its access-log line and the metrics say about
/// it. Made by [`ConnectionEnd::proxied`] or [`ConnectionEnd::refused`], then
/// [`record`](ConnectionEnd::record)ed.
#[derive(Debug)]
pub(crate) struct ConnectionEnd<'a> {
    client: SocketAddr,
    accepted: Instant,
    /// Bytes the client sent, by the kernel's count (or, before the engine, what the
    /// proxy read of it).
    bytes_up: u64,
    /// Bytes the backend sent; 0 for a connection never proxied, whose backend's bytes
    /// (if it sent any) did not reach the client.
    bytes_down: u64,
    stage: Stage<'a>,
}

/// How far a connection got before it ended, and what was known of it there.
#[derive(Debug)]
enum Stage<'a> {
    /// The engine moved its bytes, in `mode`, until it ended `end`.
    Proxied {
        route: &'a str,
        backend: SocketAddr,
        mode: Mode,
        /// Times either spliced direction parked because its reader was slower.
        throttled: u32,
        end: End,
    },
    /// It ended before the engine moved its bytes, with the route and the backend it
    /// had by then, if any.
    Refused {
        reason: Refusal,
        route: Option<&'a str>,
        backend: Option<SocketAddr>,
    },
}

impl<'a> ConnectionEnd<'a> {
    /// A connection the engine proxied in `mode` until it ended `end` (closed, reset or
    /// idle), after its peers sent `bytes_sent` (client, backend) and its spliced
    /// directions parked `throttled` times.
    pub(crate) fn proxied(
        info: &'a ConnectionInfo,
        end: End,
        mode: Mode,
        bytes_sent: (u64, u64),
        throttled: u32,
    ) -> ConnectionEnd<'a> {
        let (bytes_up, bytes_down) = bytes_sent;
        ConnectionEnd {
            client: info.client,
            accepted: info.accepted,
            bytes_up,
            bytes_down,
            stage: Stage::Proxied {
                route: &info.route,
                backend: info.backend,
                mode,
                throttled,
                end,
            },
        }
    }

    /// A connection from `client`, accepted at `accepted`, closed for `reason` before
    /// the engine moved its bytes, after the proxy read `bytes_up` of the client's.
    /// [`ConnectionEnd::toward`] adds the route and backend it had.
    pub(crate) fn refused(
        reason: Refusal,
        client: SocketAddr,
        accepted: Instant,
        bytes_up: u64,
    ) -> ConnectionEnd<'a> {
        ConnectionEnd {
            client,
            accepted,
            bytes_up,
            bytes_down: 0,
            stage: Stage::Refused {
                reason,
                route: None,
                backend: None,
            },
        }
    }

    /// The route and the backend a refused connection had chosen when it ended, as far
    /// as it got. A proxied one has both already.
    pub(crate) fn toward(
        mut self,
        chosen_route: Option<&'a str>,
        chosen_backend: Option<SocketAddr>,
    ) -> ConnectionEnd<'a> {
        if let Stage::Refused { route, backend, .. } = &mut self.stage {
            *route = chosen_route;
            *backend = chosen_backend;
        }
        self
    }

    /// Why it ended, as the access log's `end` says.
    fn end(&self) -> End {
        match self.stage {
            Stage::Proxied { end, .. } => end,
            Stage::Refused { reason, .. } => End::Refused(reason),
        }
    }

    /// Counts the end in `metrics` and writes the connection's access-log line, message
    /// `connection`, or `connection: {why}` with a `why`. A refusal at accept
    /// (`max_connections`) gets no line of its own: a flood must not become a flood of
    /// lines, so admission logs those within its budget.
    pub(crate) fn record(self, metrics: &Metrics, why: Option<&dyn Display>) {
        let end = self.end();
        let (route, backend, mode, throttled) = match self.stage {
            Stage::Proxied {
                route,
                backend,
                mode,
                throttled,
                ..
            } => {
                metrics.proxy_closed(
                    route,
                    backend,
                    mode.as_str(),
                    self.bytes_up,
                    self.bytes_down,
                );
                (Some(route), Some(backend), Some(mode), Some(throttled))
            }
            Stage::Refused {
                reason,
                route,
                backend,
            } => {
                metrics.refused(reason.as_str());
                (route, backend, None, None)
            }
        };
        if end == End::Refused(Refusal::MaxConnections) {
            return;
        }
        // Absent fields (`None`) are left out of the line: a connection that ended
        // before a route, a backend or the engine has no such field.
        let client = tracing::field::display(self.client);
        let route = route.map(tracing::field::display);
        let backend = backend.map(tracing::field::display);
        let mode = mode.map(Mode::as_str);
        let (bytes_up, bytes_down) = (self.bytes_up, self.bytes_down);
        let duration_ms = millis(self.accepted.elapsed());
        let end_value = end.as_str();
        let message = Message(why);
        // The same line at either level: tracing's level must be known at compile time.
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: ACCESS_LOG_TARGET,
                    client,
                    route,
                    backend,
                    mode,
                    bytes_up,
                    bytes_down,
                    duration_ms,
                    end = end_value,
                    throttled,
                    "{message}"
                )
            };
        }
        if end.is_for_the_operator() {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

/// The access-log line's message: `connection`, and why after a colon when there is
/// more to say than its `end`.
struct Message<'a>(Option<&'a dyn Display>);

impl Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(why) => write!(f, "connection: {why}"),
            None => f.write_str("connection"),
        }
    }
}

/// A duration in milliseconds to the microsecond, as the access log gives it: a number
/// in both log formats, and readable.
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// What a test's subscriber wrote.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Written {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The lines `record` writes, in the binary's text format without the time, with
    /// each `duration_ms` value replaced by `D`; and the metrics it counted.
    fn recorded(ends: Vec<(ConnectionEnd<'_>, Option<&dyn Display>)>) -> (Vec<String>, String) {
        let written = Written::default();
        let writer = written.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        let metrics = Metrics::new(None);
        tracing::subscriber::with_default(subscriber, || {
            for (end, why) in ends {
                end.record(&metrics, why);
            }
        });
        let text = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        let lines = text
            .lines()
            .map(|line| {
                let (before, after) = line.split_once("duration_ms=").unwrap();
                let (_, rest) = after.split_once(' ').unwrap();
                format!("{before}duration_ms=D {rest}")
            })
            .collect();
        (lines, metrics.encode())
    }

    #[test]
    fn every_end_reads_as_the_access_log_and_the_metrics_write_it() {
        let ends = [
            (End::Closed, "closed"),
            (End::Reset, "reset"),
            (End::Idle, "idle"),
            (End::Refused(Refusal::ClientGone), "client_gone"),
            (End::Refused(Refusal::NoRoute), "no_route"),
            (End::Refused(Refusal::Unparsed), "unparsed"),
            (End::Refused(Refusal::NoBackend), "no_backend"),
            (End::Refused(Refusal::BackendWrite), "backend_write_failed"),
            (End::Refused(Refusal::Setup), "setup_failed"),
            (End::Refused(Refusal::MaxConnections), "max_connections"),
            (
                End::Refused(Refusal::RouteMaxConnections),
                "route_max_connections",
            ),
        ];
        for (end, written) in ends {
            assert_eq!(end.to_string(), written);
            if let End::Refused(refusal) = end {
                assert_eq!(refusal.to_string(), written);
            }
        }
    }

    #[test]
    fn lines_have_the_fields_readme_documents_in_order() {
        let info = ConnectionInfo {
            client: "192.0.2.1:40000".parse().unwrap(),
            route: "web".into(),
            backend: "198.51.100.7:80".parse().unwrap(),
            accepted: Instant::now(),
        };
        let reset = io::Error::other("SO_ERROR on the client: reset");
        let (lines, metrics) = recorded(vec![
            (
                ConnectionEnd::proxied(&info, End::Closed, Mode::Splice, (12, 34), 2),
                None,
            ),
            (
                ConnectionEnd::proxied(&info, End::Reset, Mode::Copy, (1, 0), 0),
                Some(&reset),
            ),
            (
                ConnectionEnd::refused(Refusal::NoRoute, info.client, info.accepted, 5),
                Some(&"no route matches its first message"),
            ),
            (
                ConnectionEnd::refused(Refusal::NoBackend, info.client, info.accepted, 5)
                    .toward(Some("web"), None),
                Some(&"no backend of the route accepted a connection"),
            ),
            (
                ConnectionEnd::refused(Refusal::Setup, info.client, info.accepted, 7)
                    .toward(Some(&info.route), Some(info.backend)),
                Some(&"setting it up failed: EBADF"),
            ),
            // Counted, but logged within admission's budget rather than here.
            (
                ConnectionEnd::refused(Refusal::MaxConnections, info.client, info.accepted, 0),
                Some(&"the proxy holds its max_connections"),
            ),
        ]);
        assert_eq!(
            lines,
            [
                r#" INFO splice_proxy::splice: connection client=192.0.2.1:40000 route=web backend=198.51.100.7:80 mode="splice" bytes_up=12 bytes_down=34 duration_ms=D end="closed" throttled=2"#,
                r#" INFO splice_proxy::splice: connection: SO_ERROR on the client: reset client=192.0.2.1:40000 route=web backend=198.51.100.7:80 mode="copy" bytes_up=1 bytes_down=0 duration_ms=D end="reset" throttled=0"#,
                r#" INFO splice_proxy::splice: connection: no route matches its first message client=192.0.2.1:40000 bytes_up=5 bytes_down=0 duration_ms=D end="no_route""#,
                r#" WARN splice_proxy::splice: connection: no backend of the route accepted a connection client=192.0.2.1:40000 route=web bytes_up=5 bytes_down=0 duration_ms=D end="no_backend""#,
                r#" WARN splice_proxy::splice: connection: setting it up failed: EBADF client=192.0.2.1:40000 route=web backend=198.51.100.7:80 bytes_up=7 bytes_down=0 duration_ms=D end="setup_failed""#,
            ]
        );
        for counted in [
            "splice_proxy_connections_refused_total{reason=\"no_route\"} 1",
            "splice_proxy_connections_refused_total{reason=\"no_backend\"} 1",
            "splice_proxy_connections_refused_total{reason=\"setup_failed\"} 1",
            "splice_proxy_connections_refused_total{reason=\"max_connections\"} 1",
            "splice_proxy_transferred_bytes_total{route=\"web\",direction=\"up\"} 13",
            "splice_proxy_transferred_bytes_total{route=\"web\",direction=\"down\"} 34",
        ] {
            assert!(metrics.contains(counted), "no {counted} in {metrics}");
        }
    }
}
