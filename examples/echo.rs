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
//! only waits for the close. When the client half-closes, the kernel may not have echoed
//! everything that came before the FIN yet (the redirect is asynchronous: KERNEL-NOTES
//! pitfall 2), so the thread waits until it has, sends its own FIN, takes the socket out
//! of the maps, and prints one line.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use splice_proxy::probe::{MapSocket, Probe, SpliceMaps};

/// Echoes every byte back inside the kernel (needs root, or CAP_BPF and CAP_NET_ADMIN).
#[derive(Parser)]
struct Args {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
}

/// A half-closed connection whose echo makes no progress for this long is given up on.
const STALL_LIMIT: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let probe = Arc::new(Probe::load(1 << 16)?);
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
    if let Err(refused) = maps.loop_back(socket) {
        // Only ESTABLISHED sockets can join (KERNEL-NOTES pitfall 5): a client that sent
        // its FIN before we got here, such as `printf hi | nc -N`, is echoed by copying.
        let echoed = io::copy(&mut &stream, &mut &stream)?;
        stream.shutdown(Shutdown::Write)?;
        return Ok(format!("echoed {echoed} bytes in userspace ({refused})"));
    }
    let echoed = socket
        .kick_receive_queue()
        .and_then(|()| wait_for_close(&stream, socket, base));
    maps.leave(socket.cookie, socket.cookie);
    Ok(format!("echoed {} bytes in the kernel", echoed?))
}

/// Sleeps until the client half-closes, waits for the kernel to echo everything before
/// its FIN, then passes the close on.
fn wait_for_close(stream: &TcpStream, socket: MapSocket<'_>, base: u64) -> io::Result<u64> {
    loop {
        let events = poll(stream, libc::POLLRDHUP, None)?;
        check(stream, events)?;
        if events & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
            break;
        }
    }
    let mut progress = (0, Instant::now());
    loop {
        let counts = socket.byte_counts()?;
        // The received count includes the FIN.
        let (owed, echoed) = (counts.received.saturating_sub(1), counts.written - base);
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

/// An error on the socket (a reset) ends the connection, except the EPIPE that
/// verdict-only mode can raise around a close (KERNEL-NOTES pitfall 3): only RDHUP/HUP
/// mean a FIN.
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
