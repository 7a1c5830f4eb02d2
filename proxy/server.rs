//! The accepting side, and the only module that knows the async runtime (glommio): one
//! executor per core, each with its own SO_REUSEPORT listener. A connection lives here
//! from accept until its first message is routed and written to a backend; then both
//! sockets go to the [`SpliceEngine`] as plain fds.
//!
//! The routing (router and limits) sits in a [`RoutingSlot`] that can be replaced while
//! the server runs: each connection reads it once, at accept, and keeps what it read.
//! [`Server::stop_accepting`] closes the listeners for a graceful shutdown.
//!
//! Every connection holds a [`Ticket`] of the server's [`Admission`] from accept until
//! it closes: a client beyond `max_connections` (the proxy's at accept, its route's
//! once routed) is reset at once and counted.

use std::{
    borrow::Cow,
    cell::Cell,
    collections::HashMap,
    fmt::Display,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use futures_lite::AsyncWriteExt;
use glommio::{
    GlommioError, LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles,
    net::{TcpListener, TcpStream},
    spawn_local,
    timer::timeout,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    admission::{Admission, Refused, Ticket},
    backend::{self, Lease},
    config::Config,
    metrics::{Metrics, Refusal},
    route::{Decision, FirstMessage, Forward, Router},
    socket,
    splice::{Connection, ConnectionInfo, SpliceEngine},
};

/// How long a connection may take before it is handed to the engine, and how many the
/// proxy and each route hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wait at most this long for the client's first bytes to decide a route; then the
    /// route is decided on what arrived (the default route for server-speaks-first
    /// protocols).
    pub first_message_timeout: Duration,
    /// Inspect at most this many bytes.
    pub first_message_max: usize,
    /// Per backend; on failure the route's next backend is tried.
    pub connect_timeout: Duration,
    /// Connections the proxy holds at once; `None`: no limit.
    pub max_connections: Option<usize>,
    /// A connection handed to the engine is reset once no byte has moved either way for
    /// this long; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Connections each route holds at once, by route name; a route not listed has no
    /// limit of its own.
    pub route_max_connections: HashMap<Arc<str>, usize>,
}

impl Limits {
    fn route_max_connections(&self, route: &str) -> Option<usize> {
        self.route_max_connections.get(route).copied()
    }
}

impl From<&Config> for Limits {
    fn from(config: &Config) -> Limits {
        Limits {
            first_message_timeout: config.first_message_timeout,
            first_message_max: config.first_message_max,
            connect_timeout: config.connect_timeout,
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            route_max_connections: config
                .routes
                .iter()
                .filter_map(|route| Some((route.name.as_str().into(), route.max_connections?)))
                .collect(),
        }
    }
}

/// What a connection is routed with: the router and the limits, taken together so that a
/// reload changes both at once.
pub struct Routing {
    pub router: Arc<dyn Router>,
    pub limits: Limits,
}

/// The [`Routing`] new connections use, replaceable while the server runs (the binary
/// replaces it on SIGHUP). A connection loads it once, when it is accepted, and keeps
/// that routing until it is handed off, so a replacement never changes a connection
/// that is already reading its first message. Loading it takes no lock.
pub struct RoutingSlot(ArcSwap<Routing>);

impl RoutingSlot {
    pub fn new(router: Arc<dyn Router>, limits: Limits) -> RoutingSlot {
        RoutingSlot(ArcSwap::from_pointee(Routing { router, limits }))
    }

    /// The routing a connection accepted now gets.
    pub fn current(&self) -> Arc<Routing> {
        self.0.load_full()
    }

    /// Routes connections accepted from now on with `router` and `limits`.
    pub fn replace(&self, router: Arc<dyn Router>, limits: Limits) {
        self.0.store(Arc::new(Routing { router, limits }));
    }
}

/// Listening sockets, bound before any executor starts so that the address (and a port
/// the kernel chose for `:0`) is known and shared by every executor.
pub struct Listeners {
    sockets: Vec<OwnedFd>,
    local_addr: SocketAddr,
}

impl Listeners {
    /// Binds `count` SO_REUSEPORT sockets to `addr`: the kernel spreads new connections
    /// over them, one per executor.
    pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Listeners> {
        let first = reuseport_listener(addr)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![OwnedFd::from(first)];
        for _ in 1..count.max(1) {
            sockets.push(OwnedFd::from(reuseport_listener(local_addr)?));
        }
        Ok(Listeners {
            sockets,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: one setsockopt per connection fewer.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The running executors.
pub struct Server {
    executors: PoolThreadHandles<()>,
    local_addr: SocketAddr,
    routing: Arc<RoutingSlot>,
    /// Duplicates of the listening sockets, to shut them down from outside the executors.
    listening: Vec<OwnedFd>,
    stopping: Arc<AtomicBool>,
    /// Connections accepted and not yet handed to the engine (or closed).
    in_flight: Arc<AtomicUsize>,
    admission: Arc<Admission>,
}

impl Server {
    /// Starts one executor per listener; each accepts, routes with `router` and `limits`
    /// (replaceable later through [`Server::routing`]) and hands connections to `engine`.
    pub fn start(
        listeners: Listeners,
        router: Arc<dyn Router>,
        limits: Limits,
        engine: Arc<SpliceEngine>,
    ) -> io::Result<Server> {
        let local_addr = listeners.local_addr;
        let count = listeners.sockets.len();
        let listening = listeners
            .sockets
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let routing = Arc::new(RoutingSlot::new(router, limits));
        let stopping = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let admission = Arc::new(Admission::new());
        let shared = Shared {
            routing: Arc::clone(&routing),
            engine,
            stopping: Arc::clone(&stopping),
            in_flight: Arc::clone(&in_flight),
            admission: Arc::clone(&admission),
        };
        // Each executor takes one listener; a Mutex hands them out exactly once.
        let sockets = Arc::new(std::sync::Mutex::new(listeners.sockets));
        let executors = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(count))
            .name("splice-accept")
            .on_all_shards(move || {
                let fd = sockets.lock().ok().and_then(|mut sockets| sockets.pop());
                let shared = shared.clone();
                async move {
                    let Some(fd) = fd else { return };
                    // SAFETY: `fd` is a bound, listening socket that we own and give away.
                    let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
                    accept_loop(listener, shared).await;
                }
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Server {
            executors,
            local_addr,
            routing,
            listening,
            stopping,
            in_flight,
            admission,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The routing new connections get: replace it to reload routes and limits.
    pub fn routing(&self) -> &Arc<RoutingSlot> {
        &self.routing
    }

    /// Stops accepting: from now on connects to the address are refused. Connections
    /// already accepted go on; each executor stops once those it holds are handed to
    /// the engine or closed. Calling it again does nothing.
    pub fn stop_accepting(&self) -> io::Result<()> {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut result = Ok(());
        for fd in &self.listening {
            // On a listening socket SHUT_RD stops listening (the kernel resets what is
            // still in the accept queue and refuses new connects) and wakes a pending
            // accept, io_uring's included, which then fails with EINVAL. Closing the
            // fd would do neither while the executor's accept holds the socket.
            // SAFETY: shutdown(2) on an fd we own, with a valid `how`.
            if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) } != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
        result
    }

    /// Connections accepted and not yet handed to the engine: still reading their first
    /// message, or connecting to a backend. With [`SpliceEngine::live`] it counts every
    /// connection the proxy holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Connections held, by the proxy and by each route, and clients refused by
    /// `max_connections`: for metrics.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Blocks until every executor has stopped: after [`Server::stop_accepting`], once
    /// their connections are handed off; otherwise only if their listener fails.
    pub fn join(self) {
        for result in self.executors.join_all() {
            if let Err(e) = result {
                tracing::error!("an accept executor stopped: {e}");
            }
        }
    }
}

/// What every executor shares with the server.
#[derive(Clone)]
struct Shared {
    routing: Arc<RoutingSlot>,
    engine: Arc<SpliceEngine>,
    stopping: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    admission: Arc<Admission>,
}

/// Counts a connection in flight, on its executor, server-wide and in the metrics, until
/// dropped.
struct InFlight {
    local: Rc<Cell<usize>>,
    global: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    fn new(local: &Rc<Cell<usize>>, global: &Arc<AtomicUsize>, metrics: &Arc<Metrics>) -> InFlight {
        local.set(local.get() + 1);
        global.fetch_add(1, Ordering::SeqCst);
        metrics.accepted();
        InFlight {
            local: Rc::clone(local),
            global: Arc::clone(global),
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.local.set(self.local.get() - 1);
        self.global.fetch_sub(1, Ordering::SeqCst);
        self.metrics.routed();
    }
}

async fn accept_loop(listener: TcpListener, shared: Shared) {
    let local = Rc::new(Cell::new(0));
    loop {
        let accepted = listener.accept().await;
        if shared.stopping.load(Ordering::SeqCst) {
            // A connection accepted just before the listener shut down is served.
            if let Ok(stream) = accepted {
                admit(stream, &shared, &local);
            }
            break;
        }
        match accepted {
            Ok(stream) => admit(stream, &shared, &local),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // The executor drops its tasks when this returns: wait for them to hand off.
    while local.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves a connection just accepted, or refuses it at once when the proxy holds
/// `max_connections`: closed here, it is neither left waiting in the backlog nor costs
/// a task.
fn admit(stream: TcpStream, shared: &Shared, local: &Rc<Cell<usize>>) {
    let routing = shared.routing.current();
    match shared.admission.admit(routing.limits.max_connections) {
        Ok(ticket) => spawn_serve(stream, ticket, routing, shared, local),
        Err(refused) => refuse(stream, &refused, shared),
    }
}

/// Closes a client refused at accept with a reset, logged within the log budget (a
/// flood must not become a flood of lines) and counted.
fn refuse(stream: TcpStream, refused: &Refused, shared: &Shared) {
    shared
        .admission
        .log_refusal(stream.peer_addr().ok(), refused);
    shared.engine.metrics().refused(Refusal::MaxConnections);
    reset_on_close(&stream);
}

/// Makes dropping `stream` send a reset: a refused client learns at once that it was not
/// served (a FIN could pass for a server that speaks first and hung up), and a flood of
/// refusals leaves no TIME_WAIT sockets behind.
fn reset_on_close(stream: &TcpStream) {
    // A failure leaves an orderly close, which still refuses the client.
    let _ = socket::reset_on_close(fd_of(stream));
}

fn fd_of(stream: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: the stream owns the fd and the borrow cannot outlive the stream.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

fn spawn_serve(
    stream: TcpStream,
    ticket: Ticket,
    routing: Arc<Routing>,
    shared: &Shared,
    local: &Rc<Cell<usize>>,
) {
    // Counted before the task runs, and until after the engine adopted the connection,
    // so that in-flight plus live never misses it.
    let in_flight = InFlight::new(local, &shared.in_flight, shared.engine.metrics());
    let engine = Arc::clone(&shared.engine);
    let admission = Arc::clone(&shared.admission);
    spawn_local(async move {
        serve(stream, ticket, &routing, &engine, &admission).await;
        drop(in_flight);
    })
    .detach();
}

/// One connection from accept to hand-off.
async fn serve(
    client: TcpStream,
    mut ticket: Ticket,
    routing: &Routing,
    engine: &SpliceEngine,
    admission: &Admission,
) {
    let (router, limits) = (routing.router.as_ref(), &routing.limits);
    let metrics = engine.metrics();
    let accepted = Instant::now();
    let mut unserved = Unserved {
        metrics,
        client: None,
        accepted,
        route: None,
        backend: None,
        bytes_up: 0,
    };
    let client_addr = match client.peer_addr() {
        Ok(addr) => addr,
        // Reset before we looked. The kernel keeps no peer address for a closed socket
        // and glommio's accept does not return the one it had, so the line has none;
        // it still gets one, as every accepted connection does.
        Err(e) => {
            return unserved.close(
                Refusal::ClientGone,
                format_args!("the client was gone before its address was read: getpeername: {e}"),
            );
        }
    };
    unserved.client = Some(client_addr);
    let read = read_first_message(&client, client_addr, router, limits, accepted).await;
    let (first, decision) = match read {
        Ok(read) => read,
        Err(e) => {
            return unserved.close(
                Refusal::ClientGone,
                format_args!("the client failed before a route was decided: {e}"),
            );
        }
    };
    metrics.first_message_decided(accepted.elapsed());
    unserved.bytes_up = first.len() as u64;
    let forward = match decision {
        Decision::Forward(forward) => forward,
        Decision::Reject | Decision::NeedMore => {
            // A slowloris client ends here: what it trickled in by the deadline decided
            // nothing.
            let why = if accepted.elapsed() >= limits.first_message_timeout {
                "no route matched what it sent within first_message_timeout"
            } else {
                "no route matches its first message"
            };
            return unserved.close(Refusal::NoRoute, why);
        }
        Decision::Reset => {
            // As the routes asked: the client learns at once that nothing it sent was
            // taken, whether or not all its bytes were read (a close with bytes unread
            // resets anyway, one without would not).
            reset_on_close(&client);
            return unserved.close(
                Refusal::Unparsed,
                "its first message started as TLS or HTTP but could not be parsed",
            );
        }
    };
    unserved.route = Some(Arc::clone(&forward.route));
    let route_max = limits.route_max_connections(&forward.route);
    if let Err(refused) = admission.enter_route(&mut ticket, &forward.route, route_max) {
        reset_on_close(&client);
        return unserved.close(Refusal::RouteMaxConnections, refused);
    }
    let header = match forward.send_proxy {
        Some(version) => match client
            .local_addr()
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|local| version.header(client_addr, local))
        {
            Ok(header) => header,
            Err(e) => {
                return unserved.close(
                    Refusal::Setup,
                    format_args!("the PROXY {version} header could not be made: {e}"),
                );
            }
        },
        None => Vec::new(),
    };
    // Wholly written before the hand-off, so that spliced bytes cannot overtake it; the
    // header in the same write, so that a backend reading it reads it whole.
    let bytes = if header.is_empty() {
        Cow::Borrowed(first.as_slice())
    } else {
        Cow::Owned([header.as_slice(), &first].concat())
    };
    let connected = connect(
        &forward,
        limits.connect_timeout,
        client_addr,
        metrics,
        &bytes,
    )
    .await;
    let (upstream, backend, lease) = match connected {
        Ok(connected) => connected,
        Err(Unconnected::NoBackend) => {
            return unserved.close(
                Refusal::NoBackend,
                "no backend of the route accepted a connection",
            );
        }
        Err(Unconnected::NoSocket(error)) => {
            return unserved.close(
                Refusal::Setup,
                format_args!("the proxy could not make a socket to connect with: {error}"),
            );
        }
        Err(Unconnected::Write { backend, error }) => {
            unserved.backend = Some(backend);
            return unserved.close(
                Refusal::BackendWrite,
                format_args!("writing the first message to the backend failed: {error}"),
            );
        }
    };
    unserved.backend = Some(backend);
    match owned_fd(&client) {
        Ok(client_fd) => engine.adopt(Connection {
            client: client_fd,
            upstream,
            // The client's bytes only: the header is the proxy's.
            forwarded: first.len() as u64,
            idle_timeout: limits.idle_timeout,
            ticket,
            info: ConnectionInfo {
                client: client_addr,
                route: forward.route,
                backend,
                accepted,
            },
            lease,
        }),
        Err(e) => unserved.close(
            Refusal::Setup,
            format_args!("duplicating its socket failed: {e}"),
        ),
    }
}

/// A connection the server closes itself, before the engine has it: it gets the access
/// log line the engine writes for the others, with what was known when it ended, and
/// its refusal is counted.
struct Unserved<'a> {
    metrics: &'a Metrics,
    /// None only for a client that was gone before its address was read.
    client: Option<SocketAddr>,
    accepted: Instant,
    route: Option<Arc<str>>,
    backend: Option<SocketAddr>,
    /// The first message's bytes, as far as they were read.
    bytes_up: u64,
}

impl Unserved<'_> {
    fn close(self, reason: Refusal, why: impl Display) {
        self.metrics.refused(reason);
        let client = self.client.map(tracing::field::display);
        let route = self.route.as_deref().map(tracing::field::display);
        let backend = self.backend.map(tracing::field::display);
        let duration_ms = crate::splice::millis(self.accepted.elapsed());
        let end = reason.as_str();
        // The same line at either level: tracing's level must be known at compile time.
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    client,
                    route,
                    backend,
                    bytes_up = self.bytes_up,
                    bytes_down = 0u64,
                    duration_ms,
                    end,
                    "connection: {why}"
                )
            };
        }
        // A client that left or sent what no route takes is the client's business; a
        // backend that fails is the operator's.
        match reason {
            Refusal::ClientGone | Refusal::NoRoute | Refusal::Unparsed => line!(info),
            Refusal::NoBackend
            | Refusal::BackendWrite
            | Refusal::Setup
            | Refusal::MaxConnections
            | Refusal::RouteMaxConnections => line!(warn),
        }
    }
}

/// glommio's streams close their socket when dropped and cannot give it up, so the
/// engine gets a duplicate; dropping the stream then closes only the original number.
fn owned_fd(stream: &TcpStream) -> io::Result<OwnedFd> {
    fd_of(stream).try_clone_to_owned()
}

/// The first message's buffer to start with; see [`read_first_message`].
const INITIAL_FIRST_MESSAGE_BUFFER: usize = 2048;

/// Reads until the router decides, `first_message_max` bytes arrived, the client
/// half-closed, or `first_message_timeout` passed since `accepted`: a client that
/// trickles bytes does not push the deadline back.
async fn read_first_message(
    client: &TcpStream,
    client_addr: SocketAddr,
    router: &dyn Router,
    limits: &Limits,
    accepted: Instant,
) -> io::Result<(Vec<u8>, Decision)> {
    let deadline = accepted + limits.first_message_timeout;
    let max = limits.first_message_max;
    // Most first messages fit in a few KiB: the buffer grows towards `max` only when
    // they fill it, instead of zeroing 16 KiB for every connection.
    let mut bytes = vec![0u8; max.min(INITIAL_FIRST_MESSAGE_BUFFER)];
    let mut len = 0;
    loop {
        if len == bytes.len() && len < max {
            bytes.resize(max.min(2 * len), 0);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let complete = if remaining.is_zero() || len == max {
            true
        } else {
            // Read what is queued ourselves and wait through glommio only when nothing
            // is: a client's first message has usually arrived by the time it is
            // accepted, and then this costs one recv, where glommio's read costs a timer
            // and, after a short read, a poll it arms for the next read and has to
            // cancel when the socket is handed off.
            match socket::read_queued(fd_of(client), &mut bytes[len..]) {
                Ok(0) => true,
                Ok(n) => {
                    len += n;
                    len == max
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Waits for a byte or the end of the stream without taking it.
                    let arrived =
                        timeout(remaining, async { client.peek(&mut [0; 1]).await }).await;
                    match arrived {
                        Ok(_) => continue,
                        Err(GlommioError::TimedOut(_)) => true,
                        Err(e) => return Err(io::Error::other(e.to_string())),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let decision = router.decide(&FirstMessage {
            bytes: &bytes[..len],
            complete,
            client: client_addr,
        });
        if complete || !matches!(decision, Decision::NeedMore) {
            bytes.truncate(len);
            return Ok((bytes, decision));
        }
    }
}

/// Why no backend took a connection.
enum Unconnected {
    /// Every backend of the route refused, failed or timed out before it took a byte.
    NoBackend,
    /// The proxy could not make a socket (descriptors or memory ran out): no backend's
    /// fault, and the next would fare no better.
    NoSocket(io::Error),
    /// `backend` took some of the first bytes and then failed.
    Write {
        backend: SocketAddr,
        error: io::Error,
    },
}

/// Tries the route's backends in order until one takes `bytes` (the first message,
/// after the PROXY header if any); returns its socket, with a lease on it if a route
/// lists it. Each attempt counts for or against the backend's health, unless the proxy
/// failed before it reached the backend.
async fn connect(
    forward: &Forward,
    connect_timeout: Duration,
    client: SocketAddr,
    metrics: &Metrics,
    bytes: &[u8],
) -> Result<(OwnedFd, SocketAddr, Option<Lease>), Unconnected> {
    for &backend in &forward.backends {
        let state = backend::existing(backend);
        let started = Instant::now();
        match open(backend, bytes, connect_timeout).await {
            Ok(socket) => {
                metrics.backend_connected(backend, started.elapsed());
                let lease = state.map(|state| {
                    state.connected("a connection");
                    state.lease()
                });
                return Ok((socket, backend, lease));
            }
            Err(Failed::Connect(e)) => {
                metrics.backend_connect_failed(backend);
                tracing::warn!(%client, route = %forward.route, %backend, "backend did not accept a connection: {e}");
                if let Some(state) = state {
                    state.connect_failed("a connection", &e);
                }
            }
            Err(Failed::Write(error)) => return Err(Unconnected::Write { backend, error }),
            Err(Failed::NoSocket(error)) => return Err(Unconnected::NoSocket(error)),
        }
    }
    Err(Unconnected::NoBackend)
}

/// How [`open`] failed: before it could try the backend, before the backend took a
/// byte, or after.
enum Failed {
    /// Making or duplicating the socket (EMFILE, ENFILE, ENOBUFS, ENOMEM): a backend
    /// marked down for it would stay down after the proxy recovered.
    NoSocket(io::Error),
    Connect(io::Error),
    Write(io::Error),
}

/// Connects to `backend` and writes all of `bytes`, the connect within `connect_timeout`.
///
/// The socket is the proxy's own, not glommio's: a backend nearby has usually accepted
/// by the time a non-blocking connect returns, so the bytes go out in one send and
/// glommio never sees the socket. glommio's connect would cost an io_uring connect and
/// link timeout, a poll that every glommio stream arms at birth and cancels at drop, a
/// turn of its loop, and a dup to hand the socket off. Only a backend that has not
/// accepted yet, or whose send buffer fills, is waited for through glommio.
async fn open(
    backend: SocketAddr,
    bytes: &[u8],
    connect_timeout: Duration,
) -> Result<OwnedFd, Failed> {
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
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(Failed::Connect(e)),
    }
    let socket = OwnedFd::from(socket);
    // One send at least, even of nothing (a server-speaks-first client may have sent
    // nothing): it also tells whether the connect has completed.
    let mut written = 0;
    loop {
        match socket::write(socket.as_fd(), &bytes[written..]) {
            Ok(0) if written < bytes.len() => {
                return Err(Failed::Write(io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(written, e)),
        }
        if written == bytes.len() {
            return Ok(socket);
        }
    }
    let duplicate = socket.try_clone().map_err(Failed::NoSocket)?;
    // SAFETY: `duplicate` is an open TCP socket that we own and give to the stream, which
    // closes it when dropped; `socket` keeps the connection open for the engine.
    let mut stream = unsafe { TcpStream::from_raw_fd(duplicate.into_raw_fd()) };
    if written == 0 {
        // A send of nothing waits until the connect completes, and fails as it fails.
        let connected = timeout(connect_timeout, async {
            stream.write(&[]).await.map_err(GlommioError::from)
        })
        .await;
        match connected {
            Ok(_) => {}
            Err(GlommioError::TimedOut(_)) => {
                return Err(Failed::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                )));
            }
            Err(e) => return Err(Failed::Connect(io::Error::other(e.to_string()))),
        }
    }
    while written < bytes.len() {
        match stream.write(&bytes[written..]).await {
            Ok(0) => return Err(Failed::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) => return Err(failed(written, e)),
        }
    }
    Ok(socket)
}

/// Before the backend took a byte, a failure is the connect's: a refusal may only show
/// at the first send, and a backend that resets before reading is no better.
fn failed(written: usize, error: io::Error) -> Failed {
    if written == 0 {
        Failed::Connect(error)
    } else {
        Failed::Write(error)
    }
}
