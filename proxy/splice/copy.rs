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
        while self.start < self.end {
            match socket::write(dst, &self.bytes[self.start..self.end]) {
                Ok(n) => {
                    self.start += n;
                    *written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
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
