//! The raw socket calls the splice engine needs and std does not offer: the socket cookie
//! (the key of the probe's maps), the kernel's TCP byte counters, forced send buffers,
//! the receive low-water mark that makes the kernel re-run the verdict, abortive close,
//! and reads that never wait. Every `unsafe` block of the userspace crate that touches a
//! socket is here.
//!
//! A failed call returns a [`SyscallError`]: the call, with the option or request it was
//! made for (`getsockopt(TCP_INFO)`, `shutdown(SHUT_WR)`, `recv`), and the kernel's
//! error, so that a log line says which of a connection's dozens of calls failed rather
//! than a bare "Bad file descriptor". It is shaped so that callers stay as simple as
//! with `io::Error`:
//!
//! - [`SyscallError::kind`] and [`SyscallError::raw_os_error`] are the kernel error's:
//!   the hot paths' `e.kind() == io::ErrorKind::WouldBlock` reads and costs as before
//!   (the error holds the errno; nothing is allocated unless it is passed on).
//! - `?` (or `.into()`) makes it an `io::Error` of the same kind whose message is the
//!   SyscallError's, so the engine keeps its `io::Result`s and every log line that
//!   prints one of their errors names the call.
//!
//! Returning such `io::Error`s from here directly would box every `WouldBlock` of the
//! copy loop and hide the errno that callers match (accept's `ECONNABORTED`, the
//! buffers' `EPERM` fallback). The message is
//! `<call>: <the kernel's error>`, with no `source()` behind it: the log lines print
//! errors with `{}`, so the cause must be in the message, and a chain printer (anyhow's
//! `{:#}`) would otherwise say it twice.

use std::{
    fmt, io,
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

/// A socket call that failed, and how.
#[derive(Debug)]
pub struct SyscallError {
    /// The call, with the option or request it was made for: `setsockopt(SO_RCVBUF)`.
    pub call: &'static str,
    /// What the kernel (or, for a result the call cannot use, this module) said.
    pub io_error: io::Error,
}

impl SyscallError {
    /// The error of `call`, which just failed and set errno.
    fn last(call: &'static str) -> SyscallError {
        SyscallError {
            call,
            io_error: io::Error::last_os_error(),
        }
    }

    pub fn kind(&self) -> io::ErrorKind {
        self.io_error.kind()
    }

    pub fn raw_os_error(&self) -> Option<i32> {
        self.io_error.raw_os_error()
    }
}

impl fmt::Display for SyscallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.io_error)
    }
}

impl std::error::Error for SyscallError {}

impl From<SyscallError> for io::Error {
    /// Keeps the kind, so a caller up the stack that matches on it still can.
    fn from(error: SyscallError) -> io::Error {
        io::Error::new(error.kind(), error)
    }
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
pub fn cookie(fd: BorrowedFd<'_>) -> Result<u64, SyscallError> {
    getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_COOKIE,
        "getsockopt(SO_COOKIE)",
    )
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> Result<TcpInfo, SyscallError> {
    getsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        "getsockopt(TCP_INFO)",
    )
}

/// Bytes written to the socket that the remote end has not acknowledged yet (SIOCOUTQ).
pub fn unacked_bytes(fd: BorrowedFd<'_>) -> Result<u64, SyscallError> {
    queue_length(fd, libc::TIOCOUTQ, "ioctl(SIOCOUTQ)").map(|n| n as u64)
}

/// Bytes received and not yet read (SIOCINQ).
pub fn unread_bytes(fd: BorrowedFd<'_>) -> Result<usize, SyscallError> {
    queue_length(fd, libc::FIONREAD, "ioctl(SIOCINQ)")
}

/// One of the ioctls that report a queue's length as a c_int (SIOCOUTQ, SIOCINQ).
fn queue_length(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    call: &'static str,
) -> Result<usize, SyscallError> {
    let mut queued: libc::c_int = 0;
    // SAFETY: both requests write one c_int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut queued) };
    if rc < 0 {
        return Err(SyscallError::last(call));
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// A send buffer's room and use, by the kernel's own count (`SO_MEMINFO`), which
/// includes each queued buffer's overhead: a write takes somewhat fewer bytes than
/// `room` before it would block.
pub struct SendSpace {
    pub room: usize,
    /// What the queued buffers take: 0 when everything written has been acknowledged.
    pub queued: usize,
}

pub fn send_space(fd: BorrowedFd<'_>) -> Result<SendSpace, SyscallError> {
    let meminfo: [u32; 9] = getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_MEMINFO,
        "getsockopt(SO_MEMINFO)",
    )?;
    let field = |index: libc::c_int| meminfo[index as usize] as usize;
    let queued = field(libc::SK_MEMINFO_WMEM_QUEUED);
    Ok(SendSpace {
        room: field(libc::SK_MEMINFO_SNDBUF).saturating_sub(queued),
        queued,
    })
}

/// Every byte ever written into the socket's send queue: acknowledged, in flight or not
/// yet sent. Reads `bytes_acked` first so that an ACK arriving between the two calls can
/// only make the sum smaller than the truth, never larger: right for a count of progress,
/// which is then late, and wrong for a base that later counts are measured from
/// ([`settled_bytes_written`]).
pub fn bytes_written(fd: BorrowedFd<'_>) -> Result<u64, SyscallError> {
    written_and_info(fd).map(|(written, _)| written)
}

/// [`bytes_written`] with no acknowledgment between its two calls, exact while nothing
/// writes into the socket. A base must be exact: one short by what was acknowledged
/// between the calls makes every count measured from it too large. On a 6.12 guest up
/// to 446 KB were acknowledged there, the engine took bytes still queued for the
/// kernel's redirect as delivered, and passed a half-close's FIN on before them.
///
/// `bytes_acked` and `snd_una` move together, under the socket's lock, so when
/// `bytes_acked` reads the same after `SIOCOUTQ` as before, `SIOCOUTQ` read the
/// `snd_una` it belongs to. Each retry follows an acknowledgment, and with nothing
/// written there are only as many as the bytes in flight.
pub fn settled_bytes_written(fd: BorrowedFd<'_>) -> Result<u64, SyscallError> {
    let mut acked = tcp_info(fd)?.bytes_acked;
    loop {
        let unacked = unacked_bytes(fd)?;
        let acked_after = tcp_info(fd)?.bytes_acked;
        if acked_after == acked {
            return Ok(acked + unacked);
        }
        acked = acked_after;
    }
}

/// [`bytes_written`] of a socket this process connected and then wrote `sent` bytes
/// into, without asking the kernel: the peer's acknowledgment of the SYN counts as one
/// byte in `bytes_acked`. A socket that was accepted counts only what was written into
/// it (the kernel takes the handshake's last ACK without counting it).
pub fn dialed_bytes_written(sent: u64) -> u64 {
    sent + 1
}

/// [`bytes_written`] and the `TCP_INFO` it was computed from, for a caller that also
/// needs the socket's state: one getsockopt instead of two.
pub fn written_and_info(fd: BorrowedFd<'_>) -> Result<(u64, TcpInfo), SyscallError> {
    let info = tcp_info(fd)?;
    Ok((info.bytes_acked + unacked_bytes(fd)?, info))
}

/// Setting the low-water mark makes the kernel call the socket's data_ready, which runs the
/// verdict over bytes queued before the socket joined the sockmap (docs/kernel.md, "Bytes
/// queued before the insert"); 1 is also the default, so nothing else changes.
pub fn kick_receive_queue(fd: BorrowedFd<'_>) -> Result<(), SyscallError> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        1 as libc::c_int,
        "setsockopt(SO_RCVLOWAT)",
    )
}

/// Send buffer beyond `net.core.wmem_max` with CAP_NET_ADMIN, up to it without. A
/// redirected stream can only move as fast as the peer's send buffer drains
/// (docs/kernel.md, "Send buffers decide a splice's speed").
pub fn grow_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> Result<(), SyscallError> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        bytes,
        "setsockopt(SO_SNDBUFFORCE)",
    ) {
        // Without CAP_NET_ADMIN (after --user), the same size capped at
        // net.core.wmem_max, which the operator can raise.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            bytes,
            "setsockopt(SO_SNDBUF)",
        ),
        result => result,
    }
}

/// Makes the kernel give each new connection to listener `cpu % listeners` of the
/// SO_REUSEPORT group `fd` listens in, `cpu` being the CPU its SYN is processed on,
/// instead of one picked by a hash of its addresses. The group numbers its sockets in
/// the order they began to listen; an index past its end falls back to the hash.
pub fn steer_reuseport_by_cpu(fd: BorrowedFd<'_>, listeners: usize) -> Result<(), SyscallError> {
    let statement = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Classic BPF, run by the kernel at each SYN: A = the CPU; A %= listeners; return A.
    let mut program = [
        statement(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        ),
        statement(
            libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K,
            u32::try_from(listeners.max(1)).unwrap_or(u32::MAX),
        ),
        statement(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let program = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the statements during the call; the array outlives it.
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        program,
        "setsockopt(SO_ATTACH_REUSEPORT_CBPF)",
    )
}

/// The receive buffer as the kernel reports it: twice what was set, for its overhead.
pub fn receive_buffer(fd: BorrowedFd<'_>) -> Result<usize, SyscallError> {
    let bytes: libc::c_int = getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        "getsockopt(SO_RCVBUF)",
    )?;
    Ok(usize::try_from(bytes).unwrap_or(0))
}

/// Sets the receive buffer to `bytes` (the kernel doubles it for its overhead), beyond
/// `net.core.rmem_max` with CAP_NET_ADMIN, up to it without. It also ends the kernel's
/// autotuning of the buffer for the socket's lifetime.
pub fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> Result<(), SyscallError> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        bytes,
        "setsockopt(SO_RCVBUFFORCE)",
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            bytes,
            "setsockopt(SO_RCVBUF)",
        ),
        result => result,
    }
}

/// Lets the receive window grow to `bytes` (`TCP_WINDOW_CLAMP`). A buffer set with
/// [`set_receive_buffer`] does not move the clamp, which the kernel fixed at the handshake
/// and raised only while it autotuned the buffer: past it the window stays where it was
/// however large the buffer grows (docs/flow-control.md, "A buffer is not a window").
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: usize) -> Result<(), SyscallError> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        bytes,
        "setsockopt(TCP_WINDOW_CLAMP)",
    )
}

/// The pending socket error, cleared by reading it. It is the connection's, not a failed
/// call's, so it comes as the kernel gave it.
pub fn take_error(fd: BorrowedFd<'_>) -> Result<Option<io::Error>, SyscallError> {
    let code: libc::c_int =
        getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, "getsockopt(SO_ERROR)")?;
    Ok((code != 0).then(|| io::Error::from_raw_os_error(code)))
}

pub fn shutdown_write(fd: BorrowedFd<'_>) -> Result<(), SyscallError> {
    // SAFETY: shutdown takes no pointers; the fd is borrowed, so it is open.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
        return Err(SyscallError::last("shutdown(SHUT_WR)"));
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
pub fn accept(listener: BorrowedFd<'_>) -> Result<(OwnedFd, SocketAddr), SyscallError> {
    // SAFETY: accept4 writes at most `len` bytes of address into `storage`, and sets
    // `len` to what it wrote; a non-negative result is a new fd that nothing else owns.
    let accepted = unsafe {
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
        })
    };
    let named = |io_error| SyscallError {
        call: "accept4",
        io_error,
    };
    let (fd, addr) = accepted.map_err(named)?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| named(io::Error::other("the peer's address is not IP")))?;
    Ok((fd, addr))
}

/// Makes the socket's close send an RST instead of a FIN (SO_LINGER with a zero time).
pub fn reset_on_close(fd: BorrowedFd<'_>) -> Result<(), SyscallError> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        linger,
        "setsockopt(SO_LINGER)",
    )
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), SyscallError> {
    // FIONBIO sets the flag in one call, where F_GETFL + F_SETFL take two.
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int from a valid pointer.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &on) < 0 {
            return Err(SyscallError::last("ioctl(FIONBIO)"));
        }
    }
    Ok(())
}

/// `read(2)` into `buf`, returning 0 at end of stream. It waits on a blocking socket.
/// The copy uses it rather than a `recv` that never waits because a thread's `rchar` in
/// /proc counts it: the tests prove by that count that spliced bytes are never read.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, SyscallError> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| SyscallError::last("read"))
}

/// What the socket has queued, into `buf`, without waiting even if the socket blocks:
/// `WouldBlock` when nothing is queued, 0 at end of stream.
pub fn read_queued(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, SyscallError> {
    recv(fd, buf, libc::MSG_DONTWAIT, "recv")
}

/// Like [`read_queued`], but leaves the bytes queued.
pub fn peek_queued(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, SyscallError> {
    recv(
        fd,
        buf,
        libc::MSG_DONTWAIT | libc::MSG_PEEK,
        "recv(MSG_PEEK)",
    )
}

/// `call` names the flags that matter to a reader of the error.
fn recv(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
    call: &'static str,
) -> Result<usize, SyscallError> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    usize::try_from(n).map_err(|_| SyscallError::last(call))
}

/// `send(2)` that never waits (`WouldBlock` when the send buffer is full) and raises no
/// SIGPIPE: a peer that went away is an error, not a signal.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, SyscallError> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| SyscallError::last("send"))
}

/// `call` names the option for the error: `getsockopt(TCP_INFO)`.
fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    call: &'static str,
) -> Result<T, SyscallError> {
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
        return Err(SyscallError::last(call));
    }
    // SAFETY: zero-initialised, then possibly (partly) overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

/// `call` names the option for the error: `setsockopt(SO_RCVBUF)`.
fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
    call: &'static str,
) -> Result<(), SyscallError> {
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
        return Err(SyscallError::last(call));
    }
    Ok(())
}

/// Both ends of a loopback connection, for the unit tests of the modules that take
/// sockets: (the accepted one, the connecting one).
#[cfg(test)]
pub(crate) fn connected() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
    let connecting = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (accepted, connecting)
}

/// The receive window's clamp, for the unit tests of what sets it.
#[cfg(test)]
pub(crate) fn window_clamp(fd: BorrowedFd<'_>) -> Result<libc::c_int, SyscallError> {
    getsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        "getsockopt(TCP_WINDOW_CLAMP)",
    )
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io,
        io::{Read, Write},
        net::{Ipv4Addr, TcpListener, UdpSocket},
        os::fd::AsFd,
        thread,
        time::{Duration, Instant},
    };

    use super::{SyscallError, accept, peek_queued, read, read_queued, set_receive_buffer};
    use super::{connected, shutdown_write, tcp_info, write};
    use super::{dialed_bytes_written, settled_bytes_written, unacked_bytes};

    /// The message `call` failing with `errno` must have.
    fn message(call: &str, errno: i32) -> String {
        format!("{call}: {}", io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn a_tcp_option_on_a_udp_socket_names_the_getsockopt() {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = tcp_info(udp.as_fd()).unwrap_err();
        assert_eq!(e.call, "getsockopt(TCP_INFO)");
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert_eq!(
            e.to_string(),
            message("getsockopt(TCP_INFO)", libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn as_an_io_error_it_keeps_the_kind_and_the_call() {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = io::Error::from(tcp_info(udp.as_fd()).unwrap_err());
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert_eq!(
            e.to_string(),
            message("getsockopt(TCP_INFO)", libc::EOPNOTSUPP)
        );
        // The kernel's error is in the message, not repeated as a cause.
        assert!(std::error::Error::source(&e).is_none());
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<SyscallError>());
        assert_eq!(inner.map(|e| e.call), Some("getsockopt(TCP_INFO)"));
    }

    #[test]
    fn a_setsockopt_on_a_file_names_the_option_it_tried_first() {
        let file = File::open("/dev/null").unwrap();
        let e = set_receive_buffer(file.as_fd(), 4096).unwrap_err();
        // ENOTSOCK, not EPERM: no fallback to SO_RCVBUF.
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
        assert_eq!(
            e.to_string(),
            message("setsockopt(SO_RCVBUFFORCE)", libc::ENOTSOCK)
        );
    }

    #[test]
    fn a_shutdown_of_an_unconnected_socket_is_named_with_its_kind() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let e = shutdown_write(socket.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        assert_eq!(e.to_string(), message("shutdown(SHUT_WR)", libc::ENOTCONN));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotConnected);
    }

    #[test]
    fn a_send_after_our_own_shutdown_is_a_named_broken_pipe() {
        let (_server, client) = connected();
        shutdown_write(client.as_fd()).unwrap();
        let e = write(client.as_fd(), b"late").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(e.to_string(), message("send", libc::EPIPE));
    }

    /// The hot paths' test for "nothing now": it must stay a plain kind comparison.
    #[test]
    fn reads_and_accepts_with_nothing_queued_would_block() {
        let (server, _client) = connected();
        server.set_nonblocking(true).unwrap();
        let mut buf = [0; 16];
        for (e, call) in [
            (read(server.as_fd(), &mut buf).unwrap_err(), "read"),
            (read_queued(server.as_fd(), &mut buf).unwrap_err(), "recv"),
            (
                peek_queued(server.as_fd(), &mut buf).unwrap_err(),
                "recv(MSG_PEEK)",
            ),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            assert_eq!(e.call, call);
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let e = accept(listener.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(e.call, "accept4");
    }

    /// The engine's bases for an arrival's sockets are computed, not asked for.
    #[test]
    fn a_dialed_socket_counts_its_syn_and_an_accepted_one_does_not() {
        let (mut accepted, mut dialed) = connected();
        dialed.write_all(b"hello").unwrap();
        accepted.write_all(b"hi").unwrap();
        let mut buf = [0; 5];
        accepted.read_exact(&mut buf).unwrap();
        dialed.read_exact(&mut buf[..2]).unwrap();
        assert_eq!(
            settled_bytes_written(dialed.as_fd()).unwrap(),
            dialed_bytes_written(5)
        );
        assert_eq!(settled_bytes_written(accepted.as_fd()).unwrap(), 2);
    }

    /// While a reader acknowledges 8 MiB in 4 KiB reads, every settled count is the
    /// total; the plain sum was short in about one read of 500 on this 2-core host.
    #[test]
    fn a_settled_count_of_bytes_written_is_never_short_while_acks_arrive() {
        const TOTAL: usize = 8 << 20;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut reads = 0;
        for _ in 0..20 {
            let (mut accepted, mut dialed) = connected();
            let reader = thread::spawn(move || {
                let mut buf = vec![0; 4096];
                while accepted.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
            dialed.write_all(&vec![7; TOTAL]).unwrap();
            while unacked_bytes(dialed.as_fd()).unwrap() > 0 && Instant::now() < deadline {
                let written = settled_bytes_written(dialed.as_fd()).unwrap();
                assert_eq!(written, dialed_bytes_written(TOTAL as u64));
                reads += 1;
            }
            drop(dialed);
            reader.join().unwrap();
        }
        assert!(reads > 1000, "only {reads} reads raced the acknowledgments");
    }
}
