//! The accepting side, and the only module that knows the async runtime (glommio): one
//! executor per core, each with its own SO_REUSEPORT listener. A connection lives here
//! from accept until its first message is routed and written to a backend; then both
//! sockets go to the [`SpliceEngine`] as plain fds.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{
    GlommioError, LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles,
    net::{TcpListener, TcpStream},
    spawn_local,
    timer::timeout,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    config::Config,
    route::{Decision, FirstMessage, Forward, Router},
    splice::{Connection, ConnectionInfo, SpliceEngine},
};

/// How long a connection may take before it is handed to the engine.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wait at most this long for the client's first bytes to decide a route; then the
    /// route is decided on what arrived (the default route for server-speaks-first
    /// protocols).
    pub first_message_timeout: Duration,
    /// Inspect at most this many bytes.
    pub first_message_max: usize,
    /// Per backend; on failure the route's next backend is tried.
    pub connect_timeout: Duration,
}

impl From<&Config> for Limits {
    fn from(config: &Config) -> Limits {
        Limits {
            first_message_timeout: config.first_message_timeout,
            first_message_max: config.first_message_max,
            connect_timeout: config.connect_timeout,
        }
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
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The running executors.
pub struct Server {
    executors: PoolThreadHandles<()>,
    local_addr: SocketAddr,
}

impl Server {
    /// Starts one executor per listener; each accepts, routes with `router` and hands
    /// connections to `engine`.
    pub fn start(
        listeners: Listeners,
        router: Arc<dyn Router>,
        limits: Limits,
        engine: Arc<SpliceEngine>,
    ) -> io::Result<Server> {
        let local_addr = listeners.local_addr;
        let count = listeners.sockets.len();
        // Each executor takes one listener; a Mutex hands them out exactly once.
        let sockets = Arc::new(std::sync::Mutex::new(listeners.sockets));
        let executors = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(count))
            .name("splice-accept")
            .on_all_shards(move || {
                let fd = sockets.lock().ok().and_then(|mut sockets| sockets.pop());
                let router = Arc::clone(&router);
                let engine = Arc::clone(&engine);
                async move {
                    let Some(fd) = fd else { return };
                    // SAFETY: `fd` is a bound, listening socket that we own and give away.
                    let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
                    accept_loop(listener, router, limits, engine).await;
                }
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Server {
            executors,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Blocks until every executor has stopped (they stop only if their listener fails).
    pub fn join(self) {
        for result in self.executors.join_all() {
            if let Err(e) = result {
                tracing::error!("an accept executor stopped: {e}");
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Arc<dyn Router>,
    limits: Limits,
    engine: Arc<SpliceEngine>,
) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let router = Arc::clone(&router);
                let engine = Arc::clone(&engine);
                spawn_local(async move { serve(stream, router.as_ref(), limits, &engine).await })
                    .detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One connection from accept to hand-off.
async fn serve(mut client: TcpStream, router: &dyn Router, limits: Limits, engine: &SpliceEngine) {
    let accepted = Instant::now();
    let Ok(client_addr) = client.peer_addr() else {
        return; // Reset before we looked: nothing to serve.
    };
    let (first, decision) = match read_first_message(&mut client, client_addr, router, limits).await
    {
        Ok(read) => read,
        Err(e) => {
            tracing::info!(client = %client_addr, "connection closed before routing: {e}");
            return;
        }
    };
    let forward = match decision {
        Decision::Forward(forward) => forward,
        Decision::Reject | Decision::NeedMore => {
            tracing::info!(client = %client_addr, bytes = first.len(), "connection closed: no route matches its first message");
            return;
        }
    };
    let Some((upstream, backend)) = connect(&forward, limits.connect_timeout, client_addr).await
    else {
        tracing::warn!(client = %client_addr, route = %forward.route, "connection closed: no backend of the route accepted a connection");
        return;
    };
    let mut upstream = upstream;
    if let Err(e) = upstream.write_all(&first).await {
        tracing::warn!(client = %client_addr, route = %forward.route, %backend, "connection closed: writing the first message to the backend failed: {e}");
        return;
    }
    // Neither proxy hop should add Nagle's delay: the endpoints choose their own.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let handoff = owned_fd(&client).and_then(|client| Ok((client, owned_fd(&upstream)?)));
    match handoff {
        Ok((client_fd, upstream_fd)) => engine.adopt(Connection {
            client: client_fd,
            upstream: upstream_fd,
            forwarded: first.len() as u64,
            info: ConnectionInfo {
                client: client_addr,
                route: forward.route,
                backend,
                accepted,
            },
        }),
        Err(e) => {
            tracing::warn!(client = %client_addr, "connection closed: duplicating its socket failed: {e}")
        }
    }
}

/// glommio's streams close their socket when dropped and cannot give it up, so the
/// engine gets a duplicate; dropping the stream then closes only the original number.
fn owned_fd(stream: &TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: the stream is alive for the whole call, so its fd is open.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    fd.try_clone_to_owned()
}

/// Reads until the router decides, `first_message_max` bytes arrived, the client
/// half-closed, or `first_message_timeout` passed.
async fn read_first_message(
    client: &mut TcpStream,
    client_addr: SocketAddr,
    router: &dyn Router,
    limits: Limits,
) -> io::Result<(Vec<u8>, Decision)> {
    let deadline = Instant::now() + limits.first_message_timeout;
    let mut bytes = vec![0u8; limits.first_message_max];
    let mut len = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let complete = if remaining.is_zero() || len == bytes.len() {
            true
        } else {
            let read = timeout(remaining, async {
                client
                    .read(&mut bytes[len..])
                    .await
                    .map_err(GlommioError::from)
            })
            .await;
            match read {
                Ok(0) => true,
                Ok(n) => {
                    len += n;
                    len == bytes.len()
                }
                Err(GlommioError::TimedOut(_)) => true,
                Err(e) => return Err(io::Error::other(e.to_string())),
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

/// Tries the route's backends in order; returns the first that accepts.
async fn connect(
    forward: &Forward,
    connect_timeout: Duration,
    client: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    for &backend in &forward.backends {
        match TcpStream::connect_timeout(backend, connect_timeout).await {
            Ok(stream) => return Some((stream, backend)),
            Err(e) => {
                tracing::warn!(%client, route = %forward.route, %backend, "backend did not accept a connection: {e}")
            }
        }
    }
    None
}
