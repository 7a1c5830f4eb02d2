//! The bench protocol between its clients and its backends, and the verified byte stream
//! that bulk transfers carry.
//!
//! Every connection opens with a 64-byte header (the first message the proxies route
//! on); the backend echoes it back before anything else. The client sends nothing more
//! until that echo arrives, so by then the proxy has handed the connection over (a
//! splice-proxy client that is still streaming at the hand-off is copied, not spliced).
//!
//! A bulk stream is a run of 64 KiB blocks: an 8-byte sequence number, 8 zero bytes and
//! a pseudo-random fill that is the same in every block. The last block has the sequence
//! number `END` and carries the count of blocks before it, and the sender closes right
//! after it. So the receiver checks every byte with a `memcmp` against one reference
//! block (much cheaper than any hash), and notices lost, duplicated, reordered or
//! corrupted bytes, a truncated stream and trailing garbage.

use std::{
    fmt,
    io::{self, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

pub const HEADER_LEN: usize = 64;
/// The first bytes of every connection: what splice-proxy's route matches.
pub const MAGIC: &[u8; 8] = b"SPLBENCH";
/// The first bytes of a hold connection (`hold.rs`), which splice-proxy routes to the
/// hold echo server.
pub const HOLD_MAGIC: &[u8; 8] = b"SPLHOLD!";

/// What the backend does after echoing the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Echo every byte until the client closes.
    Echo = 1,
    /// Receive and verify a bulk stream, then answer with one result line and close.
    Upload = 2,
    /// Wait for one go byte, then send a bulk stream for `duration` and close.
    Download = 3,
}

/// The go byte of a download: the client sends it once every stream is connected, so
/// that all streams start together.
pub const GO: u8 = b'G';

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub op: Op,
    /// How long a download sends.
    pub duration: Duration,
    /// The most bytes a download sends.
    pub byte_limit: u64,
    /// Makes each connection's header distinct, so an echo from another connection fails.
    pub id: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&(self.op as u32).to_le_bytes());
        let millis = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX);
        bytes[16..24].copy_from_slice(&millis.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.byte_limit.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.id.to_le_bytes());
        for (i, byte) in bytes[40..].iter_mut().enumerate() {
            *byte = b'a' + (i % 26) as u8;
        }
        bytes
    }

    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if &bytes[..8] != MAGIC {
            return Err(format!("bad magic {:?}", &bytes[..8]));
        }
        let word = |range: std::ops::Range<usize>| {
            let mut le = [0u8; 8];
            le[..range.len()].copy_from_slice(&bytes[range]);
            u64::from_le_bytes(le)
        };
        let op = match word(8..12) {
            1 => Op::Echo,
            2 => Op::Upload,
            3 => Op::Download,
            other => return Err(format!("unknown op {other}")),
        };
        Ok(Header {
            op,
            duration: Duration::from_millis(word(16..24)),
            byte_limit: word(24..32),
            id: word(32..40),
        })
    }
}

/// Bytes that arrived other than they were sent: the failure the bench exists to catch,
/// told apart from i/o errors (in an error's chain) so that it can be reported as such.
#[derive(Debug)]
pub struct Damaged(pub String);

impl fmt::Display for Damaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Damaged {}

/// Sends `header` and waits for the backend's echo of it.
pub fn handshake(stream: &mut TcpStream, header: &Header) -> anyhow::Result<()> {
    let sent = header.encode();
    stream.write_all(&sent)?;
    let mut echo = [0u8; HEADER_LEN];
    stream.read_exact(&mut echo)?;
    if echo != sent {
        return Err(Damaged("the echoed header differs from the one sent".to_owned()).into());
    }
    Ok(())
}

/// Bytes per block of a bulk stream.
pub const BLOCK: usize = 64 * 1024;
/// Blocks per write and per read buffer: 256 KiB calls keep syscalls off the profile.
const BATCH: usize = 4;
/// The sequence number of the closing block.
const END: u64 = u64::MAX;
/// Sequence number and count (or zero) before the fill.
const BLOCK_HEAD: usize = 16;

/// The reference block, computed once: zeros where the sequence number and count go,
/// then a xorshift fill.
pub struct Pattern {
    block: Box<[u8]>,
}

impl Pattern {
    pub fn new() -> Pattern {
        let mut block = vec![0u8; BLOCK].into_boxed_slice();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for chunk in block[BLOCK_HEAD..].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        Pattern { block }
    }
}

/// Sends blocks until `deadline` or `byte_limit`, then the closing block. Returns the
/// data bytes sent (the closing block not counted). The caller closes the write side.
pub fn send_stream(
    dst: &mut impl Write,
    pattern: &Pattern,
    deadline: Instant,
    byte_limit: u64,
) -> io::Result<u64> {
    let mut batch = pattern.block.repeat(BATCH);
    let block_limit = byte_limit / BLOCK as u64;
    let mut blocks = 0u64;
    while blocks + BATCH as u64 <= block_limit && Instant::now() < deadline {
        for (i, block) in batch.chunks_mut(BLOCK).enumerate() {
            block[..8].copy_from_slice(&(blocks + i as u64).to_le_bytes());
        }
        dst.write_all(&batch)?;
        blocks += BATCH as u64;
    }
    let mut end = pattern.block.to_vec();
    end[..8].copy_from_slice(&END.to_le_bytes());
    end[8..16].copy_from_slice(&blocks.to_le_bytes());
    dst.write_all(&end)?;
    Ok(blocks * BLOCK as u64)
}

/// Why a received stream is not the one that was sent. Offsets count from the stream's
/// first byte (after the header).
#[derive(Debug)]
pub enum StreamError {
    Io(io::Error),
    /// The sender closed before the closing block.
    Truncated {
        at: u64,
    },
    /// A block's sequence number is not the next one: bytes were lost or duplicated.
    OutOfOrder {
        at: u64,
        expected: u64,
        found: u64,
    },
    /// The closing block counts another number of blocks than arrived.
    WrongCount {
        received: u64,
        announced: u64,
    },
    /// A fill byte differs from the reference.
    Corrupt {
        at: u64,
    },
    /// Bytes arrived after the closing block.
    Trailing {
        at: u64,
    },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "i/o error: {e}"),
            StreamError::Truncated { at } => {
                write!(f, "stream ended at byte {at} before its closing block")
            }
            StreamError::OutOfOrder {
                at,
                expected,
                found,
            } => write!(
                f,
                "block at byte {at} has sequence number {found}, expected {expected} (bytes lost or duplicated)"
            ),
            StreamError::WrongCount {
                received,
                announced,
            } => write!(
                f,
                "{received} blocks arrived but the sender announced {announced}"
            ),
            StreamError::Corrupt { at } => write!(f, "byte {at} differs from what was sent"),
            StreamError::Trailing { at } => {
                write!(f, "bytes after the closing block, from byte {at}")
            }
        }
    }
}

impl StreamError {
    /// An i/o error stays one; anything else is [`Damaged`].
    pub fn into_error(self) -> anyhow::Error {
        match self {
            StreamError::Io(e) => e.into(),
            damaged => Damaged(damaged.to_string()).into(),
        }
    }

    pub fn is_damage(&self) -> bool {
        !matches!(self, StreamError::Io(_))
    }
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> StreamError {
        StreamError::Io(e)
    }
}

/// Receives and verifies a stream up to its closing block and the sender's close.
/// Returns the data bytes received.
pub fn receive_stream(src: &mut impl Read, pattern: &Pattern) -> Result<u64, StreamError> {
    let mut buf = vec![0u8; BATCH * BLOCK];
    let mut filled = 0;
    let mut blocks = 0u64;
    loop {
        let n = read_some(src, &mut buf[filled..])?;
        if n == 0 {
            return Err(StreamError::Truncated {
                at: blocks * BLOCK as u64 + filled as u64,
            });
        }
        filled += n;
        let whole = filled / BLOCK;
        for (i, block) in buf[..whole * BLOCK].chunks(BLOCK).enumerate() {
            let at = blocks * BLOCK as u64;
            if check_block(block, blocks, at, pattern)? {
                let rest = filled - (i + 1) * BLOCK;
                return expect_close(src, at + BLOCK as u64, rest).map(|()| at);
            }
            blocks += 1;
        }
        buf.copy_within(whole * BLOCK..filled, 0);
        filled -= whole * BLOCK;
    }
}

/// Checks one block; true if it is the closing block (with the right count).
fn check_block(block: &[u8], seq: u64, at: u64, pattern: &Pattern) -> Result<bool, StreamError> {
    let word = |range: std::ops::Range<usize>| {
        u64::from_le_bytes(block[range].try_into().expect("an 8-byte range"))
    };
    let (found, count) = (word(0..8), word(8..16));
    let closing = found == END;
    if closing && count != seq {
        return Err(StreamError::WrongCount {
            received: seq,
            announced: count,
        });
    }
    if !closing && found != seq {
        return Err(StreamError::OutOfOrder {
            at,
            expected: seq,
            found,
        });
    }
    if (!closing && count != 0) || block[BLOCK_HEAD..] != pattern.block[BLOCK_HEAD..] {
        let first_bad = if !closing && count != 0 {
            8
        } else {
            (BLOCK_HEAD..BLOCK)
                .find(|&i| block[i] != pattern.block[i])
                .expect("the fills differ somewhere")
        };
        return Err(StreamError::Corrupt {
            at: at + first_bad as u64,
        });
    }
    Ok(closing)
}

/// After the closing block only the sender's close may come.
fn expect_close(src: &mut impl Read, at: u64, already: usize) -> Result<(), StreamError> {
    if already > 0 {
        return Err(StreamError::Trailing { at });
    }
    let mut probe = [0u8; 1];
    match read_some(src, &mut probe)? {
        0 => Ok(()),
        _ => Err(StreamError::Trailing { at }),
    }
}

fn read_some(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seconds: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        send_stream(&mut out, &Pattern::new(), deadline, 40 * BLOCK as u64).expect("vec write");
        out
    }

    #[test]
    fn round_trip() {
        let bytes = stream(5);
        let got = receive_stream(&mut &bytes[..], &Pattern::new()).expect("valid stream");
        assert_eq!(got, 40 * BLOCK as u64);
    }

    #[test]
    fn detects_every_kind_of_damage() {
        let pattern = Pattern::new();
        let good = stream(5);
        let check = |bytes: Vec<u8>| receive_stream(&mut &bytes[..], &pattern);

        let mut flipped = good.clone();
        flipped[3 * BLOCK + 1000] ^= 1;
        assert!(
            matches!(check(flipped), Err(StreamError::Corrupt { at }) if at == 3 * BLOCK as u64 + 1000)
        );

        let mut lost = good.clone();
        lost.drain(BLOCK..2 * BLOCK);
        assert!(matches!(check(lost), Err(StreamError::OutOfOrder { .. })));

        let mut shifted = good.clone();
        shifted.drain(BLOCK..BLOCK + 100);
        assert!(check(shifted).is_err());

        let truncated = good[..good.len() - 1].to_vec();
        assert!(matches!(
            check(truncated),
            Err(StreamError::Truncated { .. })
        ));

        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(check(trailing), Err(StreamError::Trailing { .. })));
    }

    #[test]
    fn header_round_trip() {
        let header = Header {
            op: Op::Download,
            duration: Duration::from_millis(1500),
            byte_limit: 123,
            id: 7,
        };
        let decoded = Header::decode(&header.encode()).expect("valid header");
        assert_eq!(decoded.op, Op::Download);
        assert_eq!(decoded.duration, header.duration);
        assert_eq!((decoded.byte_limit, decoded.id), (123, 7));
    }
}
