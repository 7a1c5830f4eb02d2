//! A client's side of a connection: connecting with bounded IO, reading exactly or to
//! the end (hashing as it goes), writing while reading, and closing with a reset.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
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
