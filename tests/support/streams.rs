//! A client's side of a connection: connecting with bounded IO, reading exactly or to
//! the end (hashing as it goes), writing while reading, closing with a reset, the
//! window its peer advertised, and what `ss` says of its sockets.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

use super::IO_TIMEOUT;

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Reads exactly `len` bytes and returns them.
pub fn read_exactly(stream: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Reads until EOF, hashing as it goes; returns (bytes, hash).
pub fn read_to_end_hashed(stream: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, hasher.finalize().into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `data` from a second thread (then half-closes) while this thread reads until
/// EOF; returns (bytes, hash) of what came back. For an echo both sides stream at once,
/// so neither can fill the other's buffers and stall.
pub fn write_while_reading(
    stream: &mut TcpStream,
    data: Arc<Vec<u8>>,
) -> io::Result<(u64, [u8; 32])> {
    let mut writer = stream.try_clone()?;
    let writing = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let read = read_to_end_hashed(stream);
    let written = writing.join().expect("writer thread panicked");
    written?;
    read
}

/// Closes `stream` with an RST instead of a FIN (SO_LINGER 0), as a crashed or
/// aborting peer does.
pub fn close_with_reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// The receive window `stream`'s peer last advertised (`tcpi_snd_wnd`, the 58th 32-bit
/// word of `struct tcp_info`, there since Linux 5.4).
pub fn send_window(stream: &TcpStream) -> u32 {
    let mut info = [0u32; 58];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` has room for `len` bytes, and the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(TCP_INFO): {}",
        io::Error::last_os_error()
    );
    assert_eq!(
        len as usize,
        std::mem::size_of_val(&info),
        "this kernel's tcp_info has no tcpi_snd_wnd"
    );
    info[57]
}

/// TCP's own counters on this host that are not 0 (`/proc/net/netstat`'s `TcpExt`: drops,
/// zero windows, memory pressure, timeouts), for a failure message.
pub fn tcp_counters() -> String {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return String::from("(no TcpExt in /proc/net/netstat)");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(_, value)| *value != "0")
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `ss` says of every TCP socket with a local or remote port in `ports`, a line
/// each: queues, memory (`skmem`) and TCP's own state.
pub fn sockets_on(ports: &[u16]) -> String {
    let filter = ports
        .iter()
        .map(|port| format!("sport = :{port} or dport = :{port}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let output = super::output_within(
        super::external("ss", "iproute2").args(["-tnmieHO", &format!("( {filter} )")]),
        Duration::from_secs(10),
    );
    assert!(output.status.success(), "ss: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
