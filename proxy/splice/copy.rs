//! The userspace copy of a direction's bytes: one buffer, read from the source and
//! written to the destination without ever waiting on either. A direction the kernel
//! cannot splice is copied this way from start to end; a spliced direction uses it only
//! for the bytes the probe parked (see `flow.rs`).

use std::{io, os::fd::BorrowedFd};

use crate::socket;

/// A userspace copy moves at most this much per read: large enough for a fast stream,
/// small enough that thousands of copied connections stay cheap.
const COPY_BUFFER: usize = 64 * 1024;

/// What a direction's first read gets: most copied connections are short exchanges, and
/// a 64 KiB buffer zeroed for each direction of each of them cost more than the bytes.
const FIRST_COPY_BUFFER: usize = 4 * 1024;

/// Bytes read and not yet written. Allocated on first use (most spliced directions never
/// need one), small, and grown to [`COPY_BUFFER`] once a read fills it.
#[derive(Default)]
pub(super) struct CopyBuffer {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last read filled the buffer: the next one gets a full-size buffer.
    filled: bool,
}

/// What one read into a [`CopyBuffer`] found.
pub(super) enum Filled {
    /// Nothing queued (EAGAIN).
    Empty,
    Eof,
    /// Fewer bytes than offered: the receive queue is now empty.
    Partly(usize),
    /// As many as offered: more may be queued.
    Full(usize),
}

/// What [`CopyBuffer::pump`] did.
pub(super) struct Pumped {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination.
    pub written: u64,
    /// The source sent its FIN and everything before it has been read.
    pub eof: bool,
}

impl CopyBuffer {
    /// Called with the buffer empty, before a read: allocates it, or grows it if the
    /// last read filled it.
    fn allocate(&mut self) {
        let size = match self.bytes.len() {
            0 => FIRST_COPY_BUFFER,
            len if self.filled && len < COPY_BUFFER => COPY_BUFFER,
            _ => return,
        };
        self.bytes = vec![0; size].into_boxed_slice();
    }

    /// Nothing read is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// One read into the (empty) buffer. The source must be non-blocking.
    pub fn read_once(&mut self, src: BorrowedFd<'_>) -> io::Result<Filled> {
        self.allocate();
        loop {
            return match socket::read(src, &mut self.bytes) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    (self.start, self.end) = (0, n);
                    self.filled = n == self.bytes.len();
                    Ok(if n < self.bytes.len() {
                        Filled::Partly(n)
                    } else {
                        Filled::Full(n)
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::Empty),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Writes the buffered bytes; false if `dst` would block before all were written
    /// (what is left stays buffered). Returns how many it wrote through `written`.
    pub fn write_all_now(&mut self, dst: BorrowedFd<'_>, written: &mut u64) -> io::Result<bool> {
        let n = write_now(dst, &self.bytes[self.start..self.end])?;
        self.start += n;
        *written += n as u64;
        if self.start < self.end {
            return Ok(false);
        }
        (self.start, self.end) = (0, 0);
        Ok(true)
    }

    /// Reads from `src` and writes to `dst` until one of them would block, the source
    /// ended and everything read was written, or `budget` bytes have been read and
    /// written (one buffer more at most): a worker has other connections to serve.
    pub fn pump(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        budget: u64,
    ) -> io::Result<Pumped> {
        let mut pumped = Pumped {
            read: 0,
            written: 0,
            eof: false,
        };
        while self.write_all_now(dst, &mut pumped.written)? && pumped.read < budget {
            match self.read_once(src)? {
                Filled::Empty => break,
                Filled::Eof => {
                    pumped.eof = true;
                    break;
                }
                Filled::Partly(n) | Filled::Full(n) => pumped.read += n as u64,
            }
        }
        Ok(pumped)
    }
}

/// Writes as much of `bytes` as `dst` takes now; how much that was. An error after
/// some bytes went out is left for the next call to report, so that the caller counts
/// what was written.
pub(super) fn write_now(dst: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match socket::write(dst, &bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if written > 0 => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
        os::fd::AsFd,
        thread,
        time::{Duration, Instant},
    };

    use super::{COPY_BUFFER, CopyBuffer, FIRST_COPY_BUFFER, Filled, Pumped};
    use crate::socket::{self, connected};

    /// A copy's four sockets: `sender` writes into `src`, `dst` is read by `reader`.
    /// `src` and `dst` are non-blocking, as the engine's are.
    struct Copy {
        sender: TcpStream,
        src: TcpStream,
        dst: TcpStream,
        reader: TcpStream,
    }

    fn copy() -> Copy {
        let (src, sender) = connected();
        let (reader, dst) = connected();
        copy_between(src, sender, dst, reader)
    }

    /// A copy whose destination fills after a few dozen KiB: its send buffer and its
    /// reader's receive buffer are small and fixed (the reader's set before it connects,
    /// so that no larger window was ever offered).
    fn copy_into_small_buffers() -> Copy {
        let (src, sender) = connected();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let reader =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        reader.set_recv_buffer_size(8 * 1024).unwrap();
        reader
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (dst, _) = listener.accept().unwrap();
        socket2::SockRef::from(&dst)
            .set_send_buffer_size(8 * 1024)
            .unwrap();
        copy_between(src, sender, dst, reader.into())
    }

    fn copy_between(src: TcpStream, sender: TcpStream, dst: TcpStream, reader: TcpStream) -> Copy {
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        Copy {
            sender,
            src,
            dst,
            reader,
        }
    }

    /// Distinct bytes in a pattern that does not repeat at any power-of-two period, so
    /// that a dropped, repeated or reordered buffer shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Waits until `src` has at least `len` bytes queued.
    fn wait_queued(src: &TcpStream, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut peeked = vec![0; len];
        while socket::peek_queued(src.as_fd(), &mut peeked).unwrap_or(0) < len {
            assert!(Instant::now() < deadline, "{len} bytes never arrived");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps until the source's end has been read and every byte written.
    fn pump_to_end(buffer: &mut CopyBuffer, copy: &Copy) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut read, mut written) = (0, 0);
        loop {
            let pumped = buffer
                .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX)
                .unwrap();
            read += pumped.read;
            written += pumped.written;
            if pumped.eof && buffer.is_empty() {
                return (read, written);
            }
            assert!(Instant::now() < deadline, "the copy never finished");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pump_moves_every_byte_in_order_and_reports_the_end() {
        let copy = copy();
        let sent = pattern(3 << 20);
        let mut sender = copy.sender.try_clone().unwrap();
        let to_send = sent.clone();
        let writer = thread::spawn(move || {
            sender.write_all(&to_send).unwrap();
            sender.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = copy.reader.try_clone().unwrap();
        let received = thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).unwrap();
            received
        });
        let mut buffer = CopyBuffer::default();
        let (read, written) = pump_to_end(&mut buffer, &copy);
        writer.join().unwrap();
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let received = received.join().unwrap();
        assert_eq!((read, written), (sent.len() as u64, sent.len() as u64));
        assert_eq!(received.len(), sent.len());
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }

    #[test]
    fn a_full_destination_stops_the_reads_and_keeps_the_rest_until_it_drains() {
        let copy = copy_into_small_buffers();
        let sent = pattern(1 << 20);
        let mut sender = copy.sender.try_clone().unwrap();
        let to_send = sent.clone();
        let writer = thread::spawn(move || {
            sender.write_all(&to_send).unwrap();
            sender.shutdown(Shutdown::Write).unwrap();
        });

        let mut buffer = CopyBuffer::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut read, mut written) = (0, 0);
        while buffer.is_empty() {
            let pumped = buffer
                .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX)
                .unwrap();
            assert!(!pumped.eof, "the end came before the destination filled");
            (read, written) = (read + pumped.read, written + pumped.written);
            assert!(Instant::now() < deadline, "the destination never filled");
            thread::sleep(Duration::from_millis(1));
        }
        // Stuck: what was read and not written stays buffered, and nothing more is read.
        assert!(read > written && read < sent.len() as u64);
        let Pumped {
            read: more,
            written: out,
            eof,
        } = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX)
            .unwrap();
        assert_eq!((more, out, eof), (0, 0, false));
        assert!(!buffer.is_empty());

        let mut reader = copy.reader.try_clone().unwrap();
        let received = thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).unwrap();
            received
        });
        let (rest_read, rest_written) = pump_to_end(&mut buffer, &copy);
        writer.join().unwrap();
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let received = received.join().unwrap();
        assert_eq!(read + rest_read, sent.len() as u64);
        assert_eq!(written + rest_written, sent.len() as u64);
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }

    #[test]
    fn pump_of_an_empty_source_moves_nothing_and_is_not_the_end() {
        let copy = copy();
        let mut buffer = CopyBuffer::default();
        let pumped = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX)
            .unwrap();
        assert_eq!((pumped.read, pumped.written, pumped.eof), (0, 0, false));
    }

    #[test]
    fn pump_reports_the_end_after_the_bytes_before_it() {
        let mut copy = copy();
        copy.sender.write_all(b"last words").unwrap();
        copy.sender.shutdown(Shutdown::Write).unwrap();
        let mut buffer = CopyBuffer::default();
        assert_eq!(pump_to_end(&mut buffer, &copy), (10, 10));
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        copy.reader.read_to_end(&mut received).unwrap();
        assert_eq!(received, b"last words");
        // The end stays the end.
        let again = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX)
            .unwrap();
        assert_eq!((again.read, again.written, again.eof), (0, 0, true));
    }

    #[test]
    fn pump_of_a_source_closed_without_bytes_is_the_end_at_once() {
        let copy = copy();
        copy.sender.shutdown(Shutdown::Write).unwrap();
        let mut buffer = CopyBuffer::default();
        assert_eq!(pump_to_end(&mut buffer, &copy), (0, 0));
    }

    #[test]
    fn the_first_read_gets_4_kib_and_one_that_fills_it_grows_the_buffer_to_64_kib() {
        let mut copy = copy();
        copy.sender.write_all(&pattern(100 * 1024)).unwrap();
        wait_queued(&copy.src, FIRST_COPY_BUFFER);
        let mut buffer = CopyBuffer::default();
        assert!(matches!(
            buffer.read_once(copy.src.as_fd()).unwrap(),
            Filled::Full(FIRST_COPY_BUFFER)
        ));
        assert_eq!(buffer.bytes.len(), FIRST_COPY_BUFFER);
        assert!(buffer.write_all_now(copy.dst.as_fd(), &mut 0).unwrap());
        wait_queued(&copy.src, FIRST_COPY_BUFFER + 1);
        let n = match buffer.read_once(copy.src.as_fd()).unwrap() {
            Filled::Full(n) | Filled::Partly(n) => n,
            Filled::Empty | Filled::Eof => panic!("the rest was queued"),
        };
        assert!(n > FIRST_COPY_BUFFER, "read {n} bytes");
        assert_eq!(buffer.bytes.len(), COPY_BUFFER);
        // The bytes read are the ones that came next.
        assert!(buffer.bytes[..n] == pattern(FIRST_COPY_BUFFER + n)[FIRST_COPY_BUFFER..]);
    }

    #[test]
    fn reads_that_do_not_fill_the_first_buffer_keep_it_small() {
        let mut copy = copy();
        let mut buffer = CopyBuffer::default();
        for _ in 0..3 {
            copy.sender.write_all(&[7; 100]).unwrap();
            wait_queued(&copy.src, 100);
            assert!(matches!(
                buffer.read_once(copy.src.as_fd()).unwrap(),
                Filled::Partly(100)
            ));
            assert_eq!(buffer.bytes.len(), FIRST_COPY_BUFFER);
            assert!(buffer.write_all_now(copy.dst.as_fd(), &mut 0).unwrap());
        }
    }

    #[test]
    fn pump_stops_after_the_read_that_reaches_its_budget_with_everything_written() {
        let mut copy = copy();
        // Room for everything: only the budget stops a pump here.
        socket2::SockRef::from(&copy.src)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        socket2::SockRef::from(&copy.dst)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let sent = pattern(200 * 1024);
        copy.sender.write_all(&sent).unwrap();
        wait_queued(&copy.src, sent.len());
        let mut buffer = CopyBuffer::default();
        // A budget of one byte still moves one buffer, and only one.
        let pumped = buffer.pump(copy.src.as_fd(), copy.dst.as_fd(), 1).unwrap();
        assert_eq!((pumped.read, pumped.written), (4096, 4096));
        assert!(buffer.is_empty());
        // Whole buffers until the budget is reached: 64 KiB, then a second past it.
        let pumped = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), 70_000)
            .unwrap();
        assert_eq!(
            (pumped.read, pumped.written, pumped.eof),
            (131_072, 131_072, false)
        );
        assert!(buffer.is_empty());
        wait_queued(&copy.src, sent.len() - 4096 - 131_072);
        copy.sender.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            pump_to_end(&mut buffer, &copy),
            (sent.len() as u64 - 135_168, sent.len() as u64 - 135_168)
        );
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        copy.reader.read_to_end(&mut received).unwrap();
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }
}
