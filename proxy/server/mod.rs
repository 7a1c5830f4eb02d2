//! The accepting side: listeners, the routing new connections get, and the counts of
//! connections between accept and hand-off. Each listener (one SO_REUSEPORT socket per
//! worker) belongs to one worker of the [`SpliceEngine`], which accepts on it in its own
//! event loop and carries each connection through its first message (`Arrival`, in
//! arrival.rs) and into the engine on the same thread: one owner per connection, from
//! accept to close. The kernel gives each new connection to one listener of the group:
//! by the CPU that processed its SYN when the proxy splices, by a hash of its addresses
//! when it copies ([`Steering`]). A worker that falls behind on its listener's queue asks
//! the others to accept from it too (the engine's `HELP_AFTER`).
//!
//! The routing (router and limits) sits in a `RoutingSlot` that can be replaced while
//! the server runs: each connection reads it once, at accept, and keeps what it read.
//! `Server::stop_accepting` closes the listeners for a graceful shutdown.
//!
//! Every connection holds a [`Ticket`](crate::admission::Ticket) of the server's
//! [`Admission`] from accept until it closes: a client beyond `max_connections` (the
//! proxy's at accept, its route's once routed) is reset at once and counted.

mod arrival;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

pub(crate) use arrival::{Arrival, Step, Waiting};

use crate::{
    admission::Admission,
    config::Config,
    count::ConnectionCount,
    ending::{ConnectionEnd, Refusal},
    metrics::Metrics,
    route::Router,
    socket,
    splice::SpliceEngine,
};

/// How long a connection may take before it is handed to the engine, and how many the
/// proxy and each route hold. [`Limits::default`] is what a routes file without these
/// keys gets.
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
    pub(crate) fn route_max_connections(&self, route: &str) -> Option<usize> {
        self.route_max_connections.get(route).copied()
    }
}

impl Default for Limits {
    /// The defaults of routes.toml: 3 s and 16 KiB for the first message, 2 s per
    /// backend's connect, and no limit on connections or idleness.
    fn default() -> Limits {
        Limits {
            first_message_timeout: Duration::from_secs(3),
            first_message_max: 16 * 1024,
            connect_timeout: Duration::from_secs(2),
            max_connections: None,
            idle_timeout: None,
            route_max_connections: HashMap::new(),
        }
    }
}

/// The limits a routes file sets.
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
pub(crate) struct Routing {
    pub router: Arc<dyn Router>,
    pub limits: Limits,
}

/// The [`Routing`] new connections use, replaceable while the server runs (a reload
/// replaces it). A connection loads it once, when it is accepted, and keeps
/// that routing until it is handed off, so a replacement never changes a connection
/// that is already reading its first message. Loading it takes no lock.
pub(crate) struct RoutingSlot(ArcSwap<Routing>);

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

/// Which worker's listener the kernel gives a new connection to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steering {
    /// By CPU when the proxy splices, by hash when it copies every connection (`--mode
    /// copy`, or a probe that could not load). Spliced, a worker does little per byte,
    /// so one CPU receiving most connections costs little, and steering measured faster
    /// in every placement of the clients tried; copying, one worker would copy every
    /// stream (benchmarks/connection-path.md, "Steering by default").
    #[default]
    Auto,
    /// By a hash of its addresses: an even spread, whichever CPUs receive connections.
    ByHash,
    /// By the CPU that processes its SYN, modulo the workers: the connection's packets
    /// and the worker that serves it then tend to meet on one CPU, with fewer wake-ups
    /// across CPUs (benchmarks/connection-path.md, "Steering by CPU"). Where one CPU
    /// receives most connections, its worker takes them all until it falls behind; then
    /// the other workers help it empty its queue.
    ByCpu,
}

/// Listening sockets, bound before any worker accepts so that the address (and a port
/// the kernel chose for `:0`) is known and shared by every worker.
pub(crate) struct Listeners {
    sockets: Vec<OwnedFd>,
    local_addr: SocketAddr,
}

impl Listeners {
    /// Binds `count` SO_REUSEPORT sockets to `addr`: the kernel spreads new connections
    /// over them, one per worker, by a hash of their addresses until
    /// [`Listeners::steer_by_cpu`].
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

    /// Gives each new connection to the listener numbered after the CPU that processes
    /// its SYN ([`Steering::ByCpu`]). One listener needs no steering.
    pub fn steer_by_cpu(&self) -> io::Result<()> {
        if self.sockets.len() > 1 {
            socket::steer_reuseport_by_cpu(self.sockets[0].as_fd(), self.sockets.len())?;
        }
        Ok(())
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: one setsockopt per connection fewer.
    socket.set_tcp_nodelay(true)?;
    // A worker accepts until the queue is empty, and must not then wait in accept.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The running server. Its listeners are in the engine's workers; it keeps duplicates
/// of them to shut them down.
pub(crate) struct Server {
    local_addr: SocketAddr,
    listening: Vec<OwnedFd>,
    shared: Arc<Shared>,
}

impl Server {
    /// Gives each listener to a worker of `engine`, which accepts on it, routes with
    /// `router` and `limits` (replaceable later through [`Server::routing`]) and keeps
    /// the connections it accepted until they close.
    pub fn start(
        listeners: Listeners,
        router: Arc<dyn Router>,
        limits: Limits,
        engine: &SpliceEngine,
    ) -> io::Result<Server> {
        let listening = listeners
            .sockets
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            routing: RoutingSlot::new(router, limits),
            admission: Arc::new(Admission::new()),
            metrics: Arc::clone(engine.metrics()),
            stopping: AtomicBool::new(false),
            in_flight: ConnectionCount::default(),
        });
        for listener in listeners.sockets {
            engine.listen(Front {
                listener: Arc::new(listener),
                shared: Arc::clone(&shared),
            });
        }
        Ok(Server {
            local_addr: listeners.local_addr,
            listening,
            shared,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The routing new connections get: replace it to reload routes and limits.
    pub fn routing(&self) -> &RoutingSlot {
        &self.shared.routing
    }

    /// Stops accepting: from now on connects to the address are refused. Connections
    /// already accepted go on. Calling it again does nothing.
    pub fn stop_accepting(&self) -> io::Result<()> {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut result = Ok(());
        for fd in &self.listening {
            // On a listening socket SHUT_RD stops listening (the kernel resets what is
            // still in the accept queue and refuses new connects) and wakes the worker
            // that watches it, whose accept then fails with EINVAL. Closing the fd would
            // do neither while the worker holds the socket.
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
        self.shared.in_flight.get()
    }

    /// Connections held, by the proxy and by each route, and clients refused by
    /// `max_connections`: for metrics.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.shared.admission
    }

    /// Waits until no connection is in flight or `deadline` passes; true if none is.
    /// Once the server has stopped accepting, none comes back.
    pub fn wait_handed_off(&self, deadline: Instant) -> bool {
        self.shared.in_flight.wait_zero(deadline)
    }
}

/// What the listeners' workers share with the server.
struct Shared {
    routing: RoutingSlot,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    stopping: AtomicBool,
    /// Connections accepted and not yet handed to the engine (or closed).
    in_flight: ConnectionCount,
}

/// Counts a connection in flight, server-wide and in the metrics, until dropped; the
/// arrival it belongs to reaches the server's admission and metrics through it.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
}

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.add();
        shared.metrics.accepted();
        InFlight {
            shared: Arc::clone(shared),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.metrics.routed();
        self.shared.in_flight.remove();
    }
}

/// A listener, in the worker that accepts on it; a clone goes to another worker for
/// as long as it helps empty the listener's queue.
#[derive(Clone)]
pub(crate) struct Front {
    listener: Arc<OwnedFd>,
    shared: Arc<Shared>,
}

/// What [`Front::accept`] found.
// An arrival is moved once, into its worker; a box would cost an allocation per
// connection to make the other variants no smaller.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Accepted {
    /// A connection to carry through its first message.
    Arrival(Arrival),
    /// A connection refused by `max_connections`, closed with a reset and logged.
    Refused,
    /// Nothing queued: wait for the listener to be readable again.
    Nothing,
    /// The server stopped accepting: drop the front.
    Stopped,
    /// Accept failed (EMFILE and friends): try again a little later, instead of
    /// spinning, and keep serving.
    Failed(io::Error),
}

impl Front {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Accepts one connection, or says why not.
    pub fn accept(&self) -> Accepted {
        let (client, addr) = loop {
            match socket::accept(self.listener.as_fd()) {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Nothing,
                // A client that reset while queued, or a signal: take the next.
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(_) if self.shared.stopping.load(Ordering::SeqCst) => {
                    return Accepted::Stopped;
                }
                Err(e) => return Accepted::Failed(e.into()),
            }
        };
        let routing = self.shared.routing.current();
        match self.shared.admission.admit(routing.limits.max_connections) {
            Ok(ticket) => Accepted::Arrival(Arrival::new(
                client,
                addr,
                routing,
                ticket,
                InFlight::new(&self.shared),
            )),
            Err(refused) => {
                // Closed here, it is neither left waiting in the backlog nor costs an
                // arrival; the reset tells the client at once that it was not served (a
                // FIN could pass for a server that speaks first and hung up), and a flood
                // of refusals leaves no TIME_WAIT sockets behind. Logged within the log
                // budget: a flood must not become a flood of lines.
                self.shared.admission.log_refusal(Some(addr), &refused);
                // Counted like every end, but with no line of its own: the one above.
                ConnectionEnd::refused(Refusal::MaxConnections, addr, Instant::now(), 0)
                    .record(&self.shared.metrics, None);
                // A failure leaves an orderly close, which still refuses the client.
                let _ = socket::reset_on_close(client.as_fd());
                Accepted::Refused
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{Ipv4Addr, TcpStream},
        os::fd::AsFd,
        thread,
        time::{Duration, Instant},
    };

    use super::Listeners;
    use crate::socket;

    /// The CPUs this process may run on.
    fn allowed_cpus() -> Vec<usize> {
        // SAFETY: all zeroes is an empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the size is `set`'s, which the call fills.
        let rc = unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) };
        assert_eq!(rc, 0, "sched_getaffinity: {}", io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    }

    /// Runs the calling thread on `cpu` only.
    fn pin_to(cpu: usize) {
        // SAFETY: all zeroes is an empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE (it came from allowed_cpus).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: the size is `set`'s; 0 is the calling thread.
        let rc = unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) };
        assert_eq!(rc, 0, "sched_setaffinity: {}", io::Error::last_os_error());
    }

    /// The index of the listener whose queue the next connection arrives in, and that
    /// no other listener got one.
    fn listener_that_accepts(listeners: &Listeners) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let queued: Vec<usize> = (0..listeners.sockets.len())
                .filter(|&i| socket::accept(listeners.sockets[i].as_fd()).is_ok())
                .collect();
            match queued[..] {
                [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                [index] => return index,
                _ => panic!("listeners {queued:?} accepted, for one connection"),
            }
        }
    }

    #[test]
    fn steered_by_cpu_a_connection_goes_to_the_listener_numbered_after_its_cpu() {
        for count in [2, 3] {
            let listeners = Listeners::bind((Ipv4Addr::LOCALHOST, 0).into(), count).unwrap();
            listeners.steer_by_cpu().unwrap();
            let addr = listeners.local_addr;
            for cpu in allowed_cpus() {
                // On loopback the SYN is processed on the CPU of the thread that connects.
                for _ in 0..4 {
                    let client = thread::spawn(move || {
                        pin_to(cpu);
                        TcpStream::connect(addr).unwrap()
                    })
                    .join()
                    .unwrap();
                    assert_eq!(
                        listener_that_accepts(&listeners),
                        cpu % count,
                        "a connection from CPU {cpu}, {count} listeners"
                    );
                    drop(client);
                }
            }
        }
    }
}
