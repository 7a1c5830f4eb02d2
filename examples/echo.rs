//! A sockmap echo server, the classic first example of splicing in the kernel: this
//! program only accepts connections, and the kernel sends every byte a client sends
//! straight back out of the same socket. No payload byte is read in userspace.
//!
//! ```text
//! cargo run --release --example echo -- --listen 127.0.0.1:7000   # as root
//! printf 'hello\n' | nc -N 127.0.0.1 7000
//! ```
//!
//! Each accepted socket joins the probe's maps as its own peer
//! ([`SpliceMaps::loop_back`]): `PEER_OF[cookie]` is the socket itself, so the verdict
//! program redirects what it receives to its own egress. A thread per connection then
//! keeps the echo bounded and waits for the close. The probe redirects only within a
//! credit (a client that sends and never reads must not fill the host's memory), so
//! every 10 ms the thread grants credit up to a backlog past what the kernel has really
//! sent back, and if the client got that far ahead the verdict parks its bytes in the
//! socket, where the thread echoes them itself once the kernel has caught up (the
//! engine does the same with an event-driven loop: proxy/splice/flow.rs). When the
//! client half-closes, the kernel may not have echoed everything that came before the
//! FIN yet (the redirect is asynchronous: docs/kernel.md), so the thread waits
//! until it has, sends its own FIN, takes the socket out of the maps, and prints one
//! line.

use std::{
    io::{self, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use splice_proxy::{
    budget::Backlog,
    probe::{Credit, FLOWING, MapSocket, Probe, SpliceMaps},
};

/// Echoes every byte back inside the kernel (needs root, or CAP_BPF and CAP_NET_ADMIN).
#[derive(Parser)]
struct Args {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
}

/// Bytes the kernel may hold for one connection's echo, past what it has sent back: this
/// program keeps no budget across connections, as the proxy does.
const BACKLOG: u64 = 16 << 20;

/// A half-closed connection whose echo makes no progress for this long is given up on.
const STALL_LIMIT: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let probe = Arc::new(Probe::load(1 << 16, Backlog::default())?);
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    println!("echo: listening on {}", listener.local_addr()?);
    loop {
        // Each connection's thread gets its own handles on the maps.
        let accepted = listener.accept().map_err(anyhow::Error::from);
        let (stream, client, maps) = match accepted.and_then(|(s, a)| Ok((s, a, probe.maps()?))) {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("echo: accept: {e:#}");
                continue;
            }
        };
        let probe = Arc::clone(&probe);
        thread::spawn(move || {
            let outcome = echo(stream, maps).unwrap_or_else(|e| format!("failed: {e}"));
            let (spliced, peer_of) = probe.entries();
            println!(
                "closed {client}: {outcome}; the maps now hold {spliced} sockets in SPLICED, {peer_of} in PEER_OF"
            );
        });
    }
}

/// Serves one connection; says how many bytes were echoed, and where.
fn echo(stream: TcpStream, mut maps: SpliceMaps) -> io::Result<String> {
    let socket = MapSocket::new(stream.as_fd())?;
    // From the insert on only the kernel writes into the socket: count from here.
    let base = socket.byte_counts()?.written;
    // The probe asks for more at a quarter of it; this program does not read the ring,
    // and looks at the flow every millisecond instead.
    if let Err(refused) = maps.loop_back(socket, BACKLOG) {
        // Only ESTABLISHED sockets can join (docs/kernel.md, "Which sockets can join a
        // sockmap"): a client that sent its FIN before we got here, such as `printf hi | nc
        // -N`, is echoed by copying.
        let echoed = io::copy(&mut &stream, &mut &stream)?;
        stream.shutdown(Shutdown::Write)?;
        return Ok(format!("echoed {echoed} bytes in userspace ({refused})"));
    }
    let mut echo = Echo {
        stream: &stream,
        socket,
        base,
        unparked: 0,
    };
    let echoed = socket
        .kick_receive_queue()
        .and_then(|()| echo.wait_for_close(&mut maps));
    maps.leave(socket.cookie, socket.cookie);
    let echoed = echoed?;
    Ok(match echo.unparked {
        0 => format!("echoed {echoed} bytes in the kernel"),
        copied => format!("echoed {echoed} bytes, {copied} of them parked and copied here"),
    })
}

struct Echo<'a> {
    stream: &'a TcpStream,
    socket: MapSocket<'a>,
    /// The socket's `bytes_written` when it joined the maps.
    base: u64,
    /// Parked bytes this thread has read and written back.
    unparked: u64,
}

impl Echo<'_> {
    /// Keeps the echo going until the client half-closes, waits for everything before
    /// its FIN to be echoed, then passes the close on.
    fn wait_for_close(&mut self, maps: &mut SpliceMaps) -> io::Result<u64> {
        let stream = self.stream;
        loop {
            let events = poll(stream, libc::POLLRDHUP, Some(Duration::from_millis(10)))?;
            check(stream, events)?;
            self.keep_flowing(maps)?;
            if events & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                break;
            }
        }
        let mut progress = (0, Instant::now());
        loop {
            self.keep_flowing(maps)?;
            let counts = self.socket.byte_counts()?;
            // The received count includes the FIN.
            let (owed, echoed) = (
                counts.received.saturating_sub(1),
                counts.written - self.base,
            );
            if echoed >= owed {
                stream.shutdown(Shutdown::Write)?;
                return Ok(echoed);
            }
            if echoed != progress.0 {
                progress = (echoed, Instant::now());
            } else if progress.1.elapsed() > STALL_LIMIT {
                return Err(io::Error::other(format!(
                    "the kernel stopped echoing with {} bytes owed",
                    owed - echoed
                )));
            }
            // Sleeps a millisecond, or less if the client resets.
            check(stream, poll(stream, 0, Some(Duration::from_millis(1)))?)?;
        }
    }

    /// Grants credit from what the kernel has echoed; if the verdict parked bytes, echoes
    /// them here once the kernel has sent everything it redirected before them.
    fn keep_flowing(&mut self, maps: &mut SpliceMaps) -> io::Result<()> {
        let flow = maps.flow(self.socket.cookie).map_err(io::Error::other)?;
        let sent_back = self.socket.byte_counts()?.written - self.base;
        let moved = sent_back - self.unparked;
        if flow.state != FLOWING && flow.parked > self.unparked {
            if moved < flow.redirected {
                return Ok(());
            }
            // Blocking writes: a client that does not read holds this thread, not memory.
            let mut buffer = [0; 64 * 1024];
            while self.unparked < flow.parked {
                let n = match (&*self.stream).read_queued(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                (&*self.stream).write_all(&buffer[..n])?;
                self.unparked += n as u64;
            }
            let credit = Credit {
                limit: flow.redirected + BACKLOG,
                ask_at: u64::MAX,
                unparked: self.unparked,
            };
            return maps
                .grant(self.socket.cookie, credit)
                .map_err(io::Error::other);
        }
        let credit = Credit {
            limit: flow.redirected.max(moved + BACKLOG),
            ask_at: u64::MAX,
            unparked: self.unparked,
        };
        maps.grant(self.socket.cookie, credit)
            .map_err(io::Error::other)
    }
}

/// Reads what is queued without waiting, though the socket blocks.
trait ReadQueued {
    fn read_queued(&mut self, buffer: &mut [u8]) -> io::Result<usize>;
}

impl ReadQueued for &TcpStream {
    fn read_queued(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buffer.len()` bytes into `buffer`.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// An error on the socket (a reset) ends the connection, except the EPIPE that verdict-only
/// mode can raise around a close (docs/kernel.md, "A close, and the spurious error that is
/// not one"): only RDHUP/HUP mean a FIN.
fn check(stream: &TcpStream, events: libc::c_short) -> io::Result<()> {
    if events & libc::POLLERR != 0
        && let Some(e) = stream.take_error()?
        && e.raw_os_error() != Some(libc::EPIPE)
    {
        return Err(e);
    }
    Ok(())
}

/// poll(2) on one socket for `events` (errors and hang-ups are always reported); returns
/// what happened, or 0 after `timeout`.
fn poll(
    stream: &TcpStream,
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<libc::c_short> {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let timeout = timeout.map_or(-1, |t| t.as_millis().try_into().unwrap_or(libc::c_int::MAX));
    loop {
        // SAFETY: one valid pollfd that lives across the call.
        if unsafe { libc::poll(&mut fd, 1, timeout) } >= 0 {
            return Ok(fd.revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
