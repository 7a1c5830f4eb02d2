//! The raw socket calls the splice engine needs and std does not offer: the socket cookie
//! (the key of the probe's maps), the kernel's TCP byte counters, forced send buffers,
//! the receive low-water mark that makes the kernel re-run the verdict, abortive close,
//! and reads that never wait. Every `unsafe` block of the userspace crate that touches a
//! socket is here.

use std::{
    io,
    mem::{self, MaybeUninit},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// The part of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) that we read.
/// libc's glibc binding stops before the byte counters, so the layout is spelled out here;
/// the kernel copies at most the length we pass, so a prefix of the struct is valid.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    app_limited: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    /// Milliseconds since data was last sent.
    pub last_data_sent_ms: u32,
    last_ack_sent: u32,
    /// Milliseconds since data was last received.
    pub last_data_recv_ms: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    /// Bytes the remote end has acknowledged (the SYN of an active open counts as one).
    pub bytes_acked: u64,
    /// Bytes received in sequence, counting a received FIN as one.
    pub bytes_received: u64,
}

/// `TCP_CLOSE` of include/net/tcp_states.h, which libc does not export for Linux.
const TCP_CLOSE: u8 = 7;

impl TcpInfo {
    /// The connection is over: reset, timed out, or closed both ways. A socket whose
    /// write side the proxy has not shut can only get here by a reset or an error, and
    /// then it can never send again.
    pub fn is_closed(&self) -> bool {
        self.state == TCP_CLOSE
    }
}

/// The kernel's identity for this socket: stable for its life, never reused.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes written to the socket that the remote end has not acknowledged yet (SIOCOUTQ).
pub fn unacked_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one c_int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Every byte ever written into the socket's send queue: acknowledged, in flight or not
/// yet sent. Reads `bytes_acked` first so that an ACK arriving between the two calls can
/// only make the sum smaller than the truth, never larger.
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    written_and_info(fd).map(|(written, _)| written)
}

/// [`bytes_written`] and the `TCP_INFO` it was computed from, for a caller that also
/// needs the socket's state: one getsockopt instead of two.
pub fn written_and_info(fd: BorrowedFd<'_>) -> io::Result<(u64, TcpInfo)> {
    let info = tcp_info(fd)?;
    Ok((info.bytes_acked + unacked_bytes(fd)?, info))
}

/// Setting the low-water mark makes the kernel call the socket's data_ready, which runs the
/// verdict over bytes queued before the socket joined the sockmap (docs/kernel.md, "Bytes
/// queued before the insert"); 1 is also the default, so nothing else changes.
pub fn kick_receive_queue(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1 as libc::c_int)
}

/// Send buffer beyond `net.core.wmem_max` with CAP_NET_ADMIN, up to it without. A
/// redirected stream can only move as fast as the peer's send buffer drains
/// (docs/kernel.md, "Send buffers decide a splice's speed").
pub fn grow_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes) {
        // Without CAP_NET_ADMIN (after --user), the same size capped at
        // net.core.wmem_max, which the operator can raise.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes)
        }
        result => result,
    }
}

/// Sets the receive buffer to `bytes` (the kernel doubles it for its overhead), beyond
/// `net.core.rmem_max` with CAP_NET_ADMIN, up to it without. It also ends the kernel's
/// autotuning of the buffer for the socket's lifetime.
pub fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)
        }
        result => result,
    }
}

/// The pending socket error, cleared by reading it.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let code: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((code != 0).then(|| io::Error::from_raw_os_error(code)))
}

pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown takes no pointers; the fd is borrowed, so it is open.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes with an RST instead of a FIN, the way a proxy passes on a reset it received.
pub fn close_with_reset(fd: OwnedFd) {
    // A failure leaves an orderly close, which still ends the connection.
    let _ = reset_on_close(fd.as_fd());
    drop(fd);
}

/// Accepts a connection from `listener`, non-blocking (the arrival reads and the copy
/// never wait) and close-on-exec, with its peer's address: one `accept4`, where a
/// blocking accept would need an `fcntl` and a `getpeername` more.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes of address into `storage`, and sets
    // `len` to what it wrote; a non-negative result is a new fd that nothing else owns.
    let (fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })?
    };
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accept4: the peer's address is not IP"))?;
    Ok((fd, addr))
}

/// Makes the socket's close send an RST instead of a FIN (SO_LINGER with a zero time).
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, linger)
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // FIONBIO sets the flag in one call, where F_GETFL + F_SETFL take two.
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int from a valid pointer.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &on) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `read(2)` into `buf`, returning 0 at end of stream. It waits on a blocking socket.
/// The copy uses it rather than a `recv` that never waits because a thread's `rchar` in
/// /proc counts it: the tests prove by that count that spliced bytes are never read.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// What the socket has queued, into `buf`, without waiting even if the socket blocks:
/// `WouldBlock` when nothing is queued, 0 at end of stream.
pub fn read_queued(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_DONTWAIT)
}

/// Like [`read_queued`], but leaves the bytes queued.
pub fn peek_queued(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv(fd, buf, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `send(2)` that never waits (`WouldBlock` when the send buffer is full) and raises no
/// SIGPIPE: a peer that went away is an error, not a signal.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes and every option read here is plain data
    // (integers or a C struct of integers), for which all-zero and any bytes are valid.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then possibly (partly) overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: the pointer and length describe `value`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
