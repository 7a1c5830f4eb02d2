//! The client side of each workload. Every workload is bounded by its duration and by
//! a count, every socket operation by a timeout, and every byte that comes back is
//! checked.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::wire::{self, Damaged, GO, Header, Op, Pattern};

/// No socket operation waits longer than this: a proxy that stalls fails the run.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A bulk stream stops at this rate times the duration, whichever comes first.
const BULK_BYTES_PER_SECOND: f64 = 12.5e9;
/// The ping-pong request and response size.
const REQUEST: usize = 1024;
/// Bounds on the count of requests and connections of one run (and so on memory for
/// their latencies).
const MAX_REQUESTS: usize = 2_000_000;
const MAX_CONNECTIONS: usize = 1_000_000;
/// Client threads of the connection-rate workload, each connecting in a loop.
pub const CONNECT_CLIENTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Bulk { upload: bool, streams: usize },
    PingPong { connections: usize },
    ConnectionRate,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Bulk {
            upload: true,
            streams: 1,
        },
        Workload::Bulk {
            upload: true,
            streams: 4,
        },
        Workload::Bulk {
            upload: false,
            streams: 1,
        },
        Workload::Bulk {
            upload: false,
            streams: 4,
        },
        Workload::PingPong { connections: 1 },
        Workload::PingPong { connections: 32 },
        Workload::ConnectionRate,
    ];

    /// The families `--workloads` selects by.
    pub const FAMILIES: [&'static str; 3] = ["bulk", "ping-pong", "connection-rate"];

    pub fn family(self) -> &'static str {
        match self {
            Workload::Bulk { .. } => "bulk",
            Workload::PingPong { .. } => "ping-pong",
            Workload::ConnectionRate => "connection-rate",
        }
    }

    pub fn title(self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match self {
            Workload::Bulk { upload, streams } => format!(
                "bulk {}, {}",
                if upload { "upload" } else { "download" },
                plural(streams, "stream")
            ),
            Workload::PingPong { connections } => {
                format!("ping-pong 1 KiB, {}", plural(connections, "connection"))
            }
            Workload::ConnectionRate => format!(
                "connection rate (connect, 64 B echo, close), {}",
                plural(CONNECT_CLIENTS, "client")
            ),
        }
    }
}

/// What one run of a workload did.
pub struct Outcome {
    /// Bytes (bulk), requests (ping-pong) or connections (connection rate) completed.
    pub units: u64,
    pub elapsed: Duration,
    /// Per request or connection, in nanoseconds; empty for bulk.
    pub latencies: Vec<u64>,
}

pub fn run(
    workload: Workload,
    addr: SocketAddr,
    duration: Duration,
    pattern: &Pattern,
) -> anyhow::Result<Outcome> {
    match workload {
        Workload::Bulk { upload, streams } => bulk(addr, upload, streams, duration, pattern),
        Workload::PingPong { connections } => ping_pong(addr, connections, duration),
        Workload::ConnectionRate => connection_rate(addr, duration),
    }
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Connects and exchanges the header: once the echo is back, the proxy has handed the
/// connection over.
fn open(addr: SocketAddr, header: Header) -> anyhow::Result<TcpStream> {
    let mut stream = connect(addr)?;
    wire::handshake(&mut stream, &header).context("header exchange")?;
    Ok(stream)
}

/// `streams` connections each moving a verified stream for `duration`, all started
/// together; the elapsed time runs until the last one is verified at its sink.
fn bulk(
    addr: SocketAddr,
    upload: bool,
    streams: usize,
    duration: Duration,
    pattern: &Pattern,
) -> anyhow::Result<Outcome> {
    let byte_limit = (BULK_BYTES_PER_SECOND * duration.as_secs_f64()) as u64;
    let op = if upload { Op::Upload } else { Op::Download };
    let connections = (0..streams)
        .map(|id| {
            open(
                addr,
                Header {
                    op,
                    duration,
                    byte_limit,
                    id: id as u64,
                },
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let deadline = start + duration;
    let bytes = thread::scope(|scope| {
        let threads: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(i, stream)| {
                scope.spawn(move || {
                    let moved = if upload {
                        upload_stream(stream, pattern, deadline, byte_limit)
                    } else {
                        download_stream(stream, pattern)
                    };
                    moved.with_context(|| format!("stream {i}"))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .map_err(|_| anyhow!("a stream thread panicked"))?
            })
            .sum::<anyhow::Result<u64>>()
    })?;
    Ok(Outcome {
        units: bytes,
        elapsed: start.elapsed(),
        latencies: Vec::new(),
    })
}

/// Sends, closes the write side, and reads the backend's verdict on what arrived.
fn upload_stream(
    mut stream: TcpStream,
    pattern: &Pattern,
    deadline: Instant,
    byte_limit: u64,
) -> anyhow::Result<u64> {
    let sent = wire::send_stream(&mut stream, pattern, deadline, byte_limit).context("sending")?;
    stream.shutdown(Shutdown::Write).context("closing")?;
    let mut verdict = String::new();
    (&mut stream)
        .take(1024)
        .read_to_string(&mut verdict)
        .context("reading the backend's verdict")?;
    let verdict = verdict.trim();
    if let Some(received) = verdict.strip_prefix("OK ") {
        if received.parse::<u64>().ok() != Some(sent) {
            return Err(Damaged(format!(
                "sent {sent} bytes, the backend verified {received}"
            ))
            .into());
        }
        Ok(sent)
    } else if let Some(why) = verdict.strip_prefix("DAMAGED ") {
        Err(Damaged(format!("the backend received a damaged stream: {why}")).into())
    } else {
        bail!("the backend failed: {verdict:?}")
    }
}

fn download_stream(mut stream: TcpStream, pattern: &Pattern) -> anyhow::Result<u64> {
    stream.write_all(&[GO]).context("sending the go byte")?;
    wire::receive_stream(&mut stream, pattern).map_err(wire::StreamError::into_error)
}

/// One request in flight per connection, all connections served by one thread polling
/// them: the next request leaves as soon as the previous response is verified.
fn ping_pong(addr: SocketAddr, connections: usize, duration: Duration) -> anyhow::Result<Outcome> {
    let mut exchanges = (0..connections)
        .map(|id| Exchange::open(addr, id as u64))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut polled: Vec<libc::pollfd> = exchanges
        .iter()
        .map(|exchange| libc::pollfd {
            fd: exchange.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let start = Instant::now();
    let deadline = start + duration;
    for exchange in &mut exchanges {
        exchange.send()?;
    }
    let mut latencies = Vec::with_capacity(MAX_REQUESTS.min(1 << 20));
    let mut active = exchanges.len();
    let mut last_progress = start;
    while active > 0 {
        if poll(&mut polled)? == 0 {
            if last_progress.elapsed() > IO_TIMEOUT {
                bail!("no response for {IO_TIMEOUT:?}");
            }
            continue;
        }
        for (exchange, polled) in exchanges.iter_mut().zip(&mut polled) {
            if polled.revents == 0 {
                continue;
            }
            let Some(latency) = exchange.receive()? else {
                continue;
            };
            latencies.push(latency);
            last_progress = Instant::now();
            if last_progress < deadline && latencies.len() < MAX_REQUESTS {
                exchange.send()?;
            } else {
                polled.fd = -1; // poll skips negative descriptors
                active -= 1;
            }
        }
    }
    Ok(Outcome {
        units: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
    })
}

/// Waits up to 100 ms for readable descriptors; returns how many are ready.
fn poll(fds: &mut [libc::pollfd]) -> anyhow::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        match usize::try_from(ready) {
            Ok(ready) => return Ok(ready),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("poll");
                }
            }
        }
    }
}

/// One ping-pong connection.
struct Exchange {
    stream: TcpStream,
    id: u64,
    seq: u64,
    request: Box<[u8; REQUEST]>,
    response: Box<[u8; REQUEST]>,
    received: usize,
    sent_at: Instant,
}

impl Exchange {
    fn open(addr: SocketAddr, id: u64) -> anyhow::Result<Exchange> {
        let header = Header {
            op: Op::Echo,
            duration: Duration::ZERO,
            byte_limit: 0,
            id,
        };
        let stream = open(addr, header)?;
        stream.set_nonblocking(true)?;
        let mut request = Box::new([0u8; REQUEST]);
        for (i, byte) in request.iter_mut().enumerate() {
            *byte = (i * 7 + id as usize) as u8;
        }
        Ok(Exchange {
            stream,
            id,
            seq: 0,
            request,
            response: Box::new([0u8; REQUEST]),
            received: 0,
            sent_at: Instant::now(),
        })
    }

    /// Sends the next request, numbered so that a stale or misrouted response fails.
    fn send(&mut self) -> anyhow::Result<()> {
        self.seq += 1;
        self.request[..8].copy_from_slice(&self.seq.to_le_bytes());
        self.request[8..16].copy_from_slice(&self.id.to_le_bytes());
        self.sent_at = Instant::now();
        write_request(&mut self.stream, &self.request[..]).context("sending a request")
    }

    /// Reads what has arrived; the latency in nanoseconds once the whole response is
    /// in and equal to the request.
    fn receive(&mut self) -> anyhow::Result<Option<u64>> {
        loop {
            match self.stream.read(&mut self.response[self.received..]) {
                Ok(0) => bail!("connection {} closed during a request", self.id),
                Ok(n) => self.received += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading a response"),
            }
            if self.received == REQUEST {
                let latency = self.sent_at.elapsed().as_nanos() as u64;
                self.received = 0;
                if self.response != self.request {
                    let at = (0..REQUEST)
                        .find(|&i| self.response[i] != self.request[i])
                        .unwrap_or(0);
                    return Err(Damaged(format!(
                        "connection {} request {}: response byte {at} differs from the request",
                        self.id, self.seq
                    ))
                    .into());
                }
                return Ok(Some(latency));
            }
        }
    }
}

/// Writes a whole request on a non-blocking socket. Its send buffer is empty in a
/// ping-pong, so this is one `write`; should it ever fill, the socket blocks (within
/// its send timeout) for the rest.
fn write_request(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stream.set_nonblocking(false)?;
                let rest = stream.write_all(&bytes[written..]);
                stream.set_nonblocking(true)?;
                return rest;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`CONNECT_CLIENTS`] threads, each opening a connection, exchanging the 64-byte header
/// (the first message, echoed) and closing, in a loop.
fn connection_rate(addr: SocketAddr, duration: Duration) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let deadline = start + duration;
    let next_id = AtomicU64::new(0);
    let per_client = MAX_CONNECTIONS / CONNECT_CLIENTS;
    let latencies = thread::scope(|scope| {
        let clients: Vec<_> = (0..CONNECT_CLIENTS)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<u64>> {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline && latencies.len() < per_client {
                        let began = Instant::now();
                        let header = Header {
                            op: Op::Echo,
                            duration: Duration::ZERO,
                            byte_limit: 0,
                            id: next_id.fetch_add(1, Ordering::Relaxed),
                        };
                        drop(open(addr, header)?);
                        latencies.push(began.elapsed().as_nanos() as u64);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for client in clients {
            all.extend(
                client
                    .join()
                    .map_err(|_| anyhow!("a client thread panicked"))??,
            );
        }
        anyhow::Ok(all)
    })?;
    Ok(Outcome {
        units: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
    })
}
