//! One connection from accept until its first message is routed and written to a
//! backend: an [`Arrival`]. It reads the first message, asks the router, takes its
//! route's place in the admission counts, and dials the route's backends in order. It
//! never waits itself: each call does what the sockets allow now and says what to wait
//! for next ([`Step`]), and the worker that accepted it waits in its one event loop, so
//! a connection lives on one thread, in one loop, from accept to close.
//!
//! A connection that ends here gets the access-log line of every connection
//! ([`crate::ending`]), with what was known when it ended.

use std::{
    fmt::Display,
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Instant,
};

use socket2::{Domain, Protocol, Socket, Type};

use super::{InFlight, Routing};
use crate::{
    admission::Ticket,
    backend::{BackendState, Lease},
    ending::{ConnectionEnd, ConnectionInfo, Refusal},
    metrics::Metrics,
    route::{Decision, FirstMessage, Forward},
    socket,
    splice::{Connection, poll},
};

/// The first message's buffer to start with: most first messages fit in a few KiB, so
/// the buffer grows towards `first_message_max` only when a message fills it, instead of
/// zeroing 16 KiB for every connection.
const INITIAL_FIRST_MESSAGE_BUFFER: usize = 2048;

/// Which of an arrival's sockets a [`Step::Wait`] waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// The client, for more of its first message.
    Client,
    /// The backend being dialed, for its connect to complete or room to write.
    Upstream,
}

/// What an arrival needs after a call.
// A waiting arrival is moved into its worker's slot; a box would cost an allocation per
// connection that waits.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step {
    /// Call [`Arrival::advance`] on `arrival` again when `on` is ready for `interest`, or
    /// at `deadline` if that comes first.
    Wait {
        arrival: Arrival,
        on: Waiting,
        interest: u32,
        deadline: Option<Instant>,
    },
    /// Routed, connected, and the first message written: the engine takes it from here.
    /// Drop `in_flight` once the engine has adopted it, so that in flight plus live
    /// never misses it.
    Forward {
        connection: Connection,
        in_flight: InFlight,
        /// The length of the PROXY header written into the upstream before the first
        /// message (0 without one).
        header: u64,
    },
    /// Closed here, and logged.
    Closed,
}

/// A connection being routed and dialed.
pub(crate) struct Arrival {
    client: OwnedFd,
    client_addr: SocketAddr,
    accepted: Instant,
    routing: Arc<Routing>,
    ticket: Ticket,
    /// Counts it until the engine adopted it; also the way to the server's admission
    /// counts and metrics.
    in_flight: InFlight,
    state: State,
}

enum State {
    /// `len` bytes of the first message are in `bytes`.
    Reading { bytes: Vec<u8>, len: usize },
    /// The first message decided `forward`; `attempt` dials the backend before `next`.
    Dialing {
        route: Route,
        next: usize,
        attempt: Attempt,
    },
    /// Transient, while a call moves the state on.
    Done,
}

/// Where the first message goes, and what each backend must take.
struct Route {
    forward: Forward,
    /// The PROXY header, if any, and the first message.
    out: Vec<u8>,
    /// The length of the client's first message, which `out` ends with.
    first: u64,
}

/// The connection as dialed, for the engine.
struct Dialed {
    upstream: OwnedFd,
    backend: SocketAddr,
    lease: Option<Lease>,
    route: Arc<str>,
    forwarded: u64,
    header: u64,
}

/// One backend being dialed.
struct Attempt {
    backend: SocketAddr,
    socket: OwnedFd,
    state: Option<Arc<BackendState>>,
    started: Instant,
    written: usize,
    /// A send has gone through, so the connect has completed.
    connected: bool,
}

impl Arrival {
    /// A connection just accepted (its socket non-blocking), holding `ticket`.
    pub(super) fn new(
        client: OwnedFd,
        client_addr: SocketAddr,
        routing: Arc<Routing>,
        ticket: Ticket,
        in_flight: InFlight,
    ) -> Arrival {
        let max = routing.limits.first_message_max;
        Arrival {
            client,
            client_addr,
            accepted: Instant::now(),
            routing,
            ticket,
            in_flight,
            state: State::Reading {
                bytes: vec![0; max.min(INITIAL_FIRST_MESSAGE_BUFFER)],
                len: 0,
            },
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.in_flight.shared.metrics
    }

    /// The client's socket.
    pub fn client(&self) -> BorrowedFd<'_> {
        self.client.as_fd()
    }

    /// The socket of the backend being dialed, if it is dialing.
    pub fn upstream(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            State::Dialing { attempt, .. } => Some(attempt.socket.as_fd()),
            _ => None,
        }
    }

    /// Does what the sockets allow now: reads, routes, dials, writes. Call it once
    /// after [`Arrival::new`], then whenever what the last [`Step::Wait`] named is
    /// ready or its deadline has passed.
    pub fn advance(mut self) -> Step {
        loop {
            let step = match std::mem::replace(&mut self.state, State::Done) {
                State::Reading { bytes, len } => self.read(bytes, len),
                State::Dialing {
                    route,
                    next,
                    attempt,
                } => self.dial(route, next, attempt),
                State::Done => return Step::Closed,
            };
            match step {
                Progress::Again => continue,
                Progress::Wait {
                    on,
                    interest,
                    deadline,
                } => {
                    return Step::Wait {
                        arrival: self,
                        on,
                        interest,
                        deadline,
                    };
                }
                Progress::Forward(dialed) => return self.forward(dialed),
                Progress::Closed => return Step::Closed,
            }
        }
    }

    fn forward(self, dialed: Dialed) -> Step {
        Step::Forward {
            connection: Connection {
                client: self.client,
                upstream: dialed.upstream,
                forwarded: dialed.forwarded,
                idle_timeout: self.routing.limits.idle_timeout,
                ticket: self.ticket,
                info: ConnectionInfo {
                    client: self.client_addr,
                    route: dialed.route,
                    backend: dialed.backend,
                    accepted: self.accepted,
                },
                lease: dialed.lease,
            },
            in_flight: self.in_flight,
            header: dialed.header,
        }
    }

    /// Reads until the router decides, `first_message_max` bytes arrived, the client
    /// half-closed, or `first_message_timeout` passed since accept: a client that
    /// trickles bytes does not push the deadline back.
    fn read(&mut self, mut bytes: Vec<u8>, mut len: usize) -> Progress {
        let limits = &self.routing.limits;
        let deadline = self.accepted + limits.first_message_timeout;
        let max = limits.first_message_max;
        loop {
            if len == bytes.len() && len < max {
                bytes.resize(max.min(2 * len), 0);
            }
            let complete = if Instant::now() >= deadline || len == max {
                true
            } else {
                match socket::read_queued(self.client.as_fd(), &mut bytes[len..]) {
                    Ok(0) => true,
                    Ok(n) => {
                        len += n;
                        len == max
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.state = State::Reading { bytes, len };
                        return Progress::Wait {
                            on: Waiting::Client,
                            interest: poll::READABLE | poll::READ_CLOSED,
                            deadline: Some(deadline),
                        };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return self.close(
                            len as u64,
                            None,
                            None,
                            Refusal::ClientGone,
                            format_args!("the client failed before a route was decided: {e}"),
                        );
                    }
                }
            };
            let decision = self.routing.router.decide(&FirstMessage {
                bytes: &bytes[..len],
                complete,
                client: self.client_addr,
            });
            if complete || !matches!(decision, Decision::NeedMore) {
                bytes.truncate(len);
                return self.route(bytes, decision);
            }
        }
    }

    /// Acts on the router's decision about the whole first message `first`.
    fn route(&mut self, first: Vec<u8>, decision: Decision) -> Progress {
        self.metrics()
            .first_message_decided(self.accepted.elapsed());
        let read = first.len() as u64;
        let forward = match decision {
            Decision::Forward(forward) => forward,
            Decision::Reject | Decision::NeedMore => {
                // A slowloris client ends here: what it trickled in by the deadline
                // decided nothing.
                let why = if self.accepted.elapsed() >= self.routing.limits.first_message_timeout {
                    "no route matched what it sent within first_message_timeout"
                } else {
                    "no route matches its first message"
                };
                return self.close(read, None, None, Refusal::NoRoute, why);
            }
            Decision::Reset => {
                // As the routes asked: the client learns at once that nothing it sent
                // was taken, whether or not all its bytes were read (a close with bytes
                // unread resets anyway, one without would not).
                let _ = socket::reset_on_close(self.client.as_fd());
                return self.close(
                    read,
                    None,
                    None,
                    Refusal::Unparsed,
                    "its first message started as TLS or HTTP but could not be parsed",
                );
            }
        };
        let route = Arc::clone(&forward.route);
        let route_max = self.routing.limits.route_max_connections(&route);
        if let Err(refused) =
            self.in_flight
                .shared
                .admission
                .enter_route(&mut self.ticket, &route, route_max)
        {
            let _ = socket::reset_on_close(self.client.as_fd());
            return self.close(
                read,
                Some(route),
                None,
                Refusal::RouteMaxConnections,
                refused,
            );
        }
        let header = match forward.send_proxy {
            Some(version) => match socket2::SockRef::from(&self.client)
                .local_addr()
                .and_then(|local| {
                    local
                        .as_socket()
                        .ok_or_else(|| io::Error::other("the client's socket is not IP"))
                })
                .and_then(|local| version.header(self.client_addr, local))
            {
                Ok(header) => header,
                Err(e) => {
                    return self.close(
                        read,
                        Some(route),
                        None,
                        Refusal::Setup,
                        format_args!("the PROXY {version} header could not be made: {e}"),
                    );
                }
            },
            None => Vec::new(),
        };
        // Wholly written before the hand-off, so that spliced bytes cannot overtake it;
        // the header in the same write, so that a backend reading it reads it whole.
        let out = if header.is_empty() {
            first
        } else {
            [header.as_slice(), &first].concat()
        };
        let route = Route {
            forward,
            out,
            first: read,
        };
        self.try_backends(route, 0)
    }

    /// Tries the route's backends from `next` on until one connects or all failed.
    fn try_backends(&mut self, route: Route, mut next: usize) -> Progress {
        while let Some(target) = route.forward.backends.get(next) {
            next += 1;
            let backend = target.addr;
            // The state the route's balancer gave with the address, if the proxy tracks it.
            let state = target.state().cloned();
            match connect(backend) {
                Ok(socket) => {
                    let attempt = Attempt {
                        backend,
                        socket,
                        state,
                        started: Instant::now(),
                        written: 0,
                        connected: false,
                    };
                    self.state = State::Dialing {
                        route,
                        next,
                        attempt,
                    };
                    return Progress::Again;
                }
                Err(Failed::NoSocket(e)) => {
                    return self.close(
                        route.first,
                        Some(route.forward.route),
                        None,
                        Refusal::Setup,
                        format_args!("the proxy could not make a socket to connect with: {e}"),
                    );
                }
                Err(Failed::Connect(e) | Failed::Write(e)) => {
                    self.connect_failed(&route.forward.route, backend, state.as_deref(), &e);
                }
            }
        }
        self.close(
            route.first,
            Some(route.forward.route),
            None,
            Refusal::NoBackend,
            "no backend of the route accepted a connection",
        )
    }

    /// Writes the first message to the backend being dialed, as far as it takes it now.
    fn dial(&mut self, route: Route, next: usize, mut attempt: Attempt) -> Progress {
        match attempt.write(&route.out) {
            Ok(true) => {
                self.metrics()
                    .backend_connected(attempt.backend, attempt.started.elapsed());
                let lease = attempt.state.as_ref().map(|state| {
                    state.connected("a connection");
                    state.lease()
                });
                Progress::Forward(Dialed {
                    upstream: attempt.socket,
                    backend: attempt.backend,
                    lease,
                    route: route.forward.route,
                    // The client's bytes only: the header is the proxy's.
                    forwarded: route.first,
                    header: route.out.len() as u64 - route.first,
                })
            }
            Ok(false) => {
                let deadline = (!attempt.connected)
                    .then(|| attempt.started + self.routing.limits.connect_timeout);
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    let timed_out = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
                    self.connect_failed(
                        &route.forward.route,
                        attempt.backend,
                        attempt.state.as_deref(),
                        &timed_out,
                    );
                    return self.try_backends(route, next);
                }
                self.state = State::Dialing {
                    route,
                    next,
                    attempt,
                };
                Progress::Wait {
                    on: Waiting::Upstream,
                    interest: poll::WRITABLE,
                    deadline,
                }
            }
            Err(Failed::Connect(e)) => {
                let state = attempt.state.as_deref();
                self.connect_failed(&route.forward.route, attempt.backend, state, &e);
                self.try_backends(route, next)
            }
            Err(Failed::Write(e)) => self.close(
                route.first,
                Some(route.forward.route),
                Some(attempt.backend),
                Refusal::BackendWrite,
                format_args!("writing the first message to the backend failed: {e}"),
            ),
            Err(Failed::NoSocket(e)) => self.close(
                route.first,
                Some(route.forward.route),
                None,
                Refusal::Setup,
                format_args!("the proxy could not make a socket to connect with: {e}"),
            ),
        }
    }

    /// Each attempt counts for or against the backend's health, unless the proxy failed
    /// before it reached the backend.
    fn connect_failed(
        &self,
        route: &str,
        backend: SocketAddr,
        state: Option<&BackendState>,
        error: &io::Error,
    ) {
        self.metrics().backend_connect_failed(backend);
        tracing::warn!(client = %self.client_addr, %route, %backend, "backend did not accept a connection: {error}");
        if let Some(state) = state {
            state.connect_failed("a connection", error);
        }
    }

    /// Closes the connection because its worker could not wait for it (epoll refused the
    /// socket): logged and counted like every connection that ends here.
    pub fn abandon(self, why: impl Display) {
        let read = match &self.state {
            State::Reading { len, .. } => *len as u64,
            State::Dialing { route, .. } => route.first,
            State::Done => 0,
        };
        self.close(read, None, None, Refusal::Setup, why);
    }

    /// Closes the connection here, before the engine has it: it gets the access-log
    /// line of every connection, with what was known when it ended, and its refusal is
    /// counted.
    fn close(
        &self,
        bytes_up: u64,
        route: Option<Arc<str>>,
        backend: Option<SocketAddr>,
        reason: Refusal,
        why: impl Display,
    ) -> Progress {
        ConnectionEnd::refused(reason, self.client_addr, self.accepted, bytes_up)
            .toward(route.as_deref(), backend)
            .record(self.metrics(), Some(&why));
        Progress::Closed
    }
}

/// What a call did with an arrival's state.
enum Progress {
    /// The state moved on and can go further now.
    Again,
    Wait {
        on: Waiting,
        interest: u32,
        deadline: Option<Instant>,
    },
    Forward(Dialed),
    Closed,
}

impl Attempt {
    /// Writes what is left of `out`; true once all of it went out. One send at least,
    /// even of nothing (a server-speaks-first client may have sent nothing): it also
    /// tells whether the connect has completed.
    /// A send on a socket still connecting fails with `WouldBlock`, and one whose
    /// connect failed with the connect's error.
    fn write(&mut self, out: &[u8]) -> Result<bool, Failed> {
        loop {
            match socket::write(self.socket.as_fd(), &out[self.written..]) {
                Ok(0) if self.written < out.len() => {
                    return Err(Failed::Write(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    self.written += n;
                    self.connected = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Before the backend took a byte, a failure is the connect's: a refusal
                // may only show at the first send, and a backend that resets before
                // reading is no better.
                Err(e) if self.written == 0 => return Err(Failed::Connect(e.into())),
                Err(e) => return Err(Failed::Write(e.into())),
            }
            if self.written == out.len() {
                return Ok(true);
            }
        }
    }
}

/// How dialing a backend failed: before it could try the backend, before the backend
/// took a byte, or after.
enum Failed {
    /// Making the socket (EMFILE, ENFILE, ENOBUFS, ENOMEM): a backend marked down for it
    /// would stay down after the proxy recovered.
    NoSocket(io::Error),
    Connect(io::Error),
    Write(io::Error),
}

/// A non-blocking connect to `backend`. A backend nearby has usually accepted by the
/// time it returns, so the first message goes out in the first send.
fn connect(backend: SocketAddr) -> Result<OwnedFd, Failed> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(Failed::NoSocket)?;
    // Neither proxy hop should add Nagle's delay: the endpoints choose their own. The
    // client's socket has TCP_NODELAY from the listener.
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&backend.into()) {
        Ok(()) => Ok(socket.into()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket.into()),
        Err(e) => Err(Failed::Connect(e)),
    }
}
