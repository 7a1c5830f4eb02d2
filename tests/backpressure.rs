//! Flow control of the spliced path: a reader that stops must stop its sender after a
//! bounded number of bytes, as with a direct connection, and when it reads again every
//! byte must arrive, once, in order. Each test writes flat out for seconds against a
//! reader that does not read, watches what the sender got in and the host's memory, then
//! lets the reader drain and checks every byte by hash.

mod support;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};
use support::*;

/// How long the reader does not read while the sender writes flat out.
const STALL: Duration = Duration::from_secs(4);

/// The bound tests run with: small, so that a test sees several parks.
const BACKLOG: u64 = 256 * 1024;

/// What the sender may get in while its reader does not read: the bound for the spliced
/// direction, plus the socket buffers on the way, each as large as this host lets it
/// grow: the sender's send buffer (`tcp_wmem`'s maximum), the proxy's receive buffer on
/// the source and the reader's (`tcp_rmem`'s maximum, which autotuning reaches on
/// loopback), and the proxy's send buffer on the destination (twice `SPLICED_SEND_BUFFER`:
/// the kernel doubles what it is asked for). Without flow control a sender got gigabytes
/// in during the same time.
fn in_flight_limit() -> u64 {
    let max_of = |path: &str| -> u64 {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        text.split_whitespace()
            .last()
            .and_then(|max| max.parse().ok())
            .unwrap_or_else(|| panic!("{path}: {text:?}"))
    };
    let (wmem, rmem) = (
        max_of("/proc/sys/net/ipv4/tcp_wmem"),
        max_of("/proc/sys/net/ipv4/tcp_rmem"),
    );
    BACKLOG + wmem + 2 * rmem + 2 * splice_proxy::splice::SPLICED_SEND_BUFFER as u64
}

fn routes(backend: SocketAddr) -> String {
    format!(
        "splice_backlog_max = {BACKLOG}\n\n[[route]]\nname = \"hello\"\nprefix = \"hello\"\nbackends = [\"{backend}\"]\n"
    )
}

/// Writes a seeded pseudo-random stream flat out until told to stop, counting what
/// `write` accepted and hashing it. Bounded by `limit` bytes so that a broken bound
/// cannot eat the machine.
struct Writer {
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: thread::JoinHandle<io::Result<(u64, [u8; 32])>>,
}

impl Writer {
    fn start(mut stream: TcpStream, seed: u64, limit: u64) -> Writer {
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&written), Arc::clone(&stop));
        let done = thread::spawn(move || {
            let chunk = payload(64 * 1024, seed);
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            while !stopping.load(Ordering::Relaxed) && total < limit {
                let n = stream.write(&chunk)?;
                hasher.update(&chunk[..n]);
                total += n as u64;
                count.store(total, Ordering::Relaxed);
            }
            stream.shutdown(Shutdown::Write)?;
            Ok((total, hasher.finalize().into()))
        });
        Writer {
            written,
            stop,
            done,
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops writing and returns (bytes, hash) of everything written.
    fn finish(self) -> (u64, [u8; 32]) {
        self.stop.store(true, Ordering::Relaxed);
        self.done
            .join()
            .expect("writer thread panicked")
            .expect("writer failed")
    }
}

/// The host's available memory, from /proc/meminfo, in bytes.
fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("MemAvailable in /proc/meminfo")
        * 1024
}

/// A writer that starts before its reader reads, for STALL; asserts the sender stopped
/// within the bound and that memory did not keep falling; then lets the reader read.
fn stalled_reader_is_bounded(moving: Moving, upload: bool) {
    let (reader_tx, reader_rx) = mpsc::channel::<TcpStream>();
    let reader_tx = Mutex::new(reader_tx);
    // The backend hands its socket to the test: the test decides when it reads, and
    // in the download case writes from it.
    let backend = Backend::start(move |stream| {
        let _ = reader_tx.lock().unwrap().send(stream);
    });
    let proxy = Proxy::start(&routes(backend.addr), moving);
    let mut client = proxy.connect();
    client.write_all(b"hello\n").unwrap();
    let mut upstream = reader_rx
        .recv_timeout(IO_TIMEOUT)
        .expect("backend connection");
    let mut first = [0; 6];
    upstream.read_exact(&mut first).unwrap();
    proxy.wait_handed_off(1, IO_TIMEOUT);

    let (sender, mut reader) = if upstream_is_reader(upload) {
        (client, upstream)
    } else {
        (upstream, client)
    };
    let bound = in_flight_limit();
    let limit = 4 * bound;
    let writer = Writer::start(sender.try_clone().unwrap(), 7, limit);
    let memory_before = mem_available();
    thread::sleep(STALL / 2);
    let halfway = writer.written();
    let memory_halfway = mem_available();
    thread::sleep(STALL / 2);
    let stalled = writer.written();
    let memory_after = mem_available();
    assert!(
        stalled <= bound,
        "the sender got {stalled} bytes in against a reader that does not read (bound {bound})"
    );
    assert_eq!(
        halfway,
        stalled,
        "the sender was still getting bytes in after {:?}",
        STALL / 2
    );
    // The host's memory, beyond noise from the rest of the machine: it may fall by the
    // buffers, not with time.
    let fell = memory_halfway.saturating_sub(memory_after);
    assert!(
        fell < 256 << 20,
        "MemAvailable fell {fell} bytes while the sender was blocked (from {memory_before})"
    );

    let reading = thread::spawn(move || read_to_end_hashed(&mut reader));
    let (written, hash) = writer.finish();
    let (read, read_hash) = reading
        .join()
        .expect("reader thread panicked")
        .expect("reader failed");
    assert_eq!(read, written, "bytes read after the reader resumed");
    assert_eq!(read_hash, hash, "hash of the bytes read");
    drop(sender);
    proxy.wait_idle(IO_TIMEOUT);
    if let Some(probe) = &proxy.probe {
        assert!(
            probe.counters().unwrap().asks > 0,
            "the direction never asked for credit, so the test did not test the bound"
        );
    }
}

fn upstream_is_reader(upload: bool) -> bool {
    upload
}

#[test]
fn upload_to_a_stalled_backend_is_bounded() {
    stalled_reader_is_bounded(SPLICE, true);
}

#[test]
fn download_to_a_stalled_client_is_bounded() {
    stalled_reader_is_bounded(SPLICE, false);
}

#[test]
fn copy_mode_is_bounded_the_same_way() {
    stalled_reader_is_bounded(COPY, true);
}

/// An echo exchange bigger than the bound, both ways at once, with the client's FIN
/// arriving while the upload is parked: every byte must come back before the close.
fn echo_through_a_small_bound(moving: Moving) {
    let backend = Backend::echo();
    let proxy = Proxy::start(&routes(backend.addr), moving);
    for round in 0..5 {
        let mut client = proxy.connect();
        client.write_all(b"hello\n").unwrap();
        let data = shared_payload(8 << 20, round);
        let (echoed, hash) = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
        assert_eq!(
            (echoed, hash),
            (6 + data.len() as u64, sha256_concat(&[b"hello\n", &data])),
            "round {round}: echo of {} bytes; probe {:?}",
            data.len(),
            proxy.probe.as_ref().map(|p| p.counters().unwrap())
        );
    }
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn echo_without_fin_through_a_small_bound() {
    let backend = Backend::echo();
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    for round in 0..5 {
        let mut client = proxy.connect();
        client.write_all(b"hello\n").unwrap();
        let data = shared_payload(8 << 20, round);
        let mut writer = client.try_clone().unwrap();
        let sent = Arc::clone(&data);
        let writing = thread::spawn(move || writer.write_all(&sent));
        let back = read_exactly(&mut client, 6 + data.len()).unwrap();
        writing.join().unwrap().unwrap();
        assert_eq!(
            sha256(&back),
            sha256_concat(&[b"hello\n", &data]),
            "round {round}"
        );
    }
}

#[test]
fn echo_through_a_small_bound_keeps_every_byte() {
    echo_through_a_small_bound(SPLICE);
}

/// A client that writes in bursts (512 KiB every 30 ms, twice the bound) through an echo
/// and reads all the while: each burst fills the bound, so directions throttle and flow
/// again dozens of times, and every byte must come back in order.
#[test]
fn bursts_through_a_small_bound_keep_every_byte() {
    let backend = Backend::echo();
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    let mut client = proxy.connect();
    client.write_all(b"hello\n").unwrap();
    assert_eq!(read_exactly(&mut client, 6).unwrap(), b"hello\n");
    let data = shared_payload(8 << 20, 9);
    let mut writer = client.try_clone().unwrap();
    let sent = Arc::clone(&data);
    let writing = thread::spawn(move || -> io::Result<()> {
        for burst in sent.chunks(512 << 10) {
            writer.write_all(burst)?;
            thread::sleep(Duration::from_millis(30));
        }
        writer.shutdown(Shutdown::Write)
    });
    let echoed = read_to_end_hashed(&mut client).unwrap();
    writing.join().unwrap().unwrap();
    assert_eq!(
        echoed,
        (data.len() as u64, sha256(&data)),
        "probe {:?}",
        proxy.probe.as_ref().map(|p| p.counters().unwrap())
    );
    proxy.wait_idle(IO_TIMEOUT);
}

/// A reader that alternates between reading flat out and stopping (2 MiB, then 20 ms of
/// nothing), against a sender that never stops: the direction throttles and flows again
/// at every turn, and every byte must arrive once, in order. Both directions, one after
/// the other.
#[test]
fn a_reader_that_alternates_gets_every_byte() {
    for upload in [true, false] {
        let (reader_tx, reader_rx) = mpsc::channel::<TcpStream>();
        let reader_tx = Mutex::new(reader_tx);
        let backend = Backend::start(move |stream| {
            let _ = reader_tx.lock().unwrap().send(stream);
        });
        let proxy = Proxy::start(&routes(backend.addr), SPLICE);
        let mut client = proxy.connect();
        client.write_all(b"hello\n").unwrap();
        let mut upstream = reader_rx
            .recv_timeout(IO_TIMEOUT)
            .expect("backend connection");
        assert_eq!(read_exactly(&mut upstream, 6).unwrap(), b"hello\n");
        let (sender, mut reader) = if upload {
            (client, upstream)
        } else {
            (upstream, client)
        };
        const TOTAL: u64 = 96 << 20;
        let writer = Writer::start(sender.try_clone().unwrap(), 11, TOTAL);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; 256 << 10];
        let mut read = 0u64;
        let mut turns = 0;
        while read < TOTAL {
            let mut this_turn = 0;
            while this_turn < 2 << 20 && read < TOTAL {
                let n = reader.read(&mut buffer).expect("read");
                assert!(n > 0, "EOF after {read} bytes");
                hasher.update(&buffer[..n]);
                read += n as u64;
                this_turn += n;
            }
            turns += 1;
            thread::sleep(Duration::from_millis(20));
        }
        let (written, hash) = writer.finish();
        assert_eq!(read, written);
        assert_eq!(
            <[u8; 32]>::from(hasher.finalize()),
            hash,
            "upload {upload}, {turns} turns"
        );
        drop((sender, reader));
        proxy.wait_idle(IO_TIMEOUT);
    }
}

/// The byte at `offset` of a stream whose every 8-byte word is its own word index: a
/// reader that finds a wrong byte can tell where the bytes it got came from.
fn positional(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// As [`a_reader_that_alternates_gets_every_byte`], with a positional stream, so that a
/// failure says what arrived where.
#[test]
fn a_reader_that_alternates_gets_every_byte_in_place() {
    for upload in [true, false] {
        let (reader_tx, reader_rx) = mpsc::channel::<TcpStream>();
        let reader_tx = Mutex::new(reader_tx);
        let backend = Backend::start(move |stream| {
            let _ = reader_tx.lock().unwrap().send(stream);
        });
        let proxy = Proxy::start(&routes(backend.addr), SPLICE);
        let mut client = proxy.connect();
        client.write_all(b"hello\n").unwrap();
        let mut upstream = reader_rx
            .recv_timeout(IO_TIMEOUT)
            .expect("backend connection");
        assert_eq!(read_exactly(&mut upstream, 6).unwrap(), b"hello\n");
        let (sender, mut reader) = if upload {
            (client, upstream)
        } else {
            (upstream, client)
        };
        const TOTAL: u64 = 96 << 20;
        let mut out = sender.try_clone().unwrap();
        let writing = thread::spawn(move || -> io::Result<()> {
            let mut pos = 0u64;
            let mut chunk = vec![0u8; 64 << 10];
            while pos < TOTAL {
                for (i, byte) in chunk.iter_mut().enumerate() {
                    *byte = positional(pos + i as u64);
                }
                let n = out.write(&chunk)?;
                pos += n as u64;
            }
            out.shutdown(Shutdown::Write)
        });
        let mut buffer = vec![0; 256 << 10];
        let mut read = 0u64;
        while read < TOTAL {
            let mut this_turn = 0;
            while this_turn < 2 << 20 && read < TOTAL {
                let n = reader.read(&mut buffer).expect("read");
                assert!(n > 0, "EOF after {read} bytes");
                for (i, &byte) in buffer[..n].iter().enumerate() {
                    let at = read + i as u64;
                    if byte != positional(at) {
                        // Which stream offset the bytes here came from: the shift k
                        // at which 8 bytes read as a word index close to `at`.
                        let word = (0..8usize).find_map(|k| {
                            let start = i.checked_sub(k)?;
                            let w = buffer.get(start..start + 8)?;
                            let index = u64::from_le_bytes(w.try_into().unwrap());
                            (index < TOTAL / 8).then_some(index * 8 + k as u64)
                        });
                        let got = &buffer[i..(i + 32).min(n)];
                        eprintln!("at {at}: got {got:02x?}");
                        panic!(
                            "upload {upload}: byte {at} is wrong; the word there came from offset {word:?}; probe {:?}",
                            proxy.probe.as_ref().map(|p| p.counters().unwrap())
                        );
                    }
                }
                read += n as u64;
                this_turn += n;
            }
            thread::sleep(Duration::from_millis(20));
        }
        writing.join().unwrap().unwrap();
        drop((sender, reader));
        proxy.wait_idle(IO_TIMEOUT);
    }
}

/// Every message parks (a bound of one byte): the engine moves the whole stream through
/// the parked path, and every byte must still arrive in place.
#[test]
fn everything_parked_arrives_in_place() {
    let (reader_tx, reader_rx) = mpsc::channel::<TcpStream>();
    let reader_tx = Mutex::new(reader_tx);
    let backend = Backend::start(move |stream| {
        let _ = reader_tx.lock().unwrap().send(stream);
    });
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    proxy
        .probe
        .as_ref()
        .unwrap()
        .set_backlog(splice_proxy::probe::Backlog { bytes: 1 })
        .unwrap();
    let mut client = proxy.connect();
    client.write_all(b"hello\n").unwrap();
    let mut upstream = reader_rx
        .recv_timeout(IO_TIMEOUT)
        .expect("backend connection");
    assert_eq!(read_exactly(&mut upstream, 6).unwrap(), b"hello\n");
    const TOTAL: u64 = 96 << 20;
    let mut out = upstream.try_clone().unwrap();
    let writing = thread::spawn(move || -> io::Result<()> {
        let mut pos = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        while pos < TOTAL {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = positional(pos + i as u64);
            }
            pos += out.write(&chunk)? as u64;
        }
        out.shutdown(Shutdown::Write)
    });
    let mut buffer = vec![0; 256 << 10];
    let mut read = 0u64;
    while read < TOTAL {
        let n = client.read(&mut buffer).expect("read");
        assert!(n > 0, "EOF after {read} bytes");
        for (i, &byte) in buffer[..n].iter().enumerate() {
            let at = read + i as u64;
            if byte != positional(at) {
                let word = (0..8usize).find_map(|k| {
                    let start = i.checked_sub(k)?;
                    let w = buffer.get(start..start + 8)?;
                    let index = u64::from_le_bytes(w.try_into().unwrap());
                    (index < TOTAL / 8).then_some(index * 8 + k as u64)
                });
                panic!(
                    "byte {at} (read {n} at {read}) came from {word:?}: {:02x?}",
                    &buffer[i..(i + 24).min(n)]
                );
            }
        }
        read += n as u64;
    }
    writing.join().unwrap().unwrap();
}

/// A socket whose verdict parks every message, read directly (no engine): the kernel's
/// side of parking alone. 256 MiB, every byte checked in place.
#[test]
fn a_socket_that_parks_everything_reads_in_place() {
    use std::os::fd::AsFd;
    let probe =
        splice_proxy::probe::Probe::load(1 << 10, splice_proxy::probe::Backlog { bytes: 1 })
            .unwrap();
    let mut maps = probe.maps().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut sender = TcpStream::connect(addr).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    let socket = splice_proxy::probe::MapSocket::new(receiver.as_fd()).unwrap();
    maps.loop_back(socket).unwrap();
    receiver.set_nonblocking(true).unwrap();
    const TOTAL: u64 = 256 << 20;
    let writing = thread::spawn(move || -> io::Result<()> {
        let mut pos = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        while pos < TOTAL {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = positional(pos + i as u64);
            }
            pos += sender.write(&chunk)? as u64;
        }
        sender.shutdown(Shutdown::Write)
    });
    let mut buffer = vec![0; 64 << 10];
    let mut read = 0u64;
    while read < TOTAL {
        let n = match receiver.read(&mut buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(50));
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(n > 0, "EOF after {read}");
        for (i, &byte) in buffer[..n].iter().enumerate() {
            let at = read + i as u64;
            if byte != positional(at) {
                let word = (0..8usize).find_map(|k| {
                    let start = i.checked_sub(k)?;
                    let w = buffer.get(start..start + 8)?;
                    let index = u64::from_le_bytes(w.try_into().unwrap());
                    (index < TOTAL / 8).then_some(index * 8 + k as u64)
                });
                panic!("byte {at} (read {n} at {read}) came from {word:?}");
            }
        }
        read += n as u64;
    }
    writing.join().unwrap().unwrap();
}

/// As [`a_socket_that_parks_everything_reads_in_place`], with credit granted as the
/// engine grants it: after each read, `unparked` = what was read, so the verdict flips to
/// flowing and parks again on the next message.
#[test]
fn a_socket_whose_credit_flips_reads_in_place() {
    use std::os::fd::AsFd;
    let probe =
        splice_proxy::probe::Probe::load(1 << 10, splice_proxy::probe::Backlog { bytes: 1 })
            .unwrap();
    let mut maps = probe.maps().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut sender = TcpStream::connect(addr).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    let socket = splice_proxy::probe::MapSocket::new(receiver.as_fd()).unwrap();
    let cookie = socket.cookie;
    maps.loop_back(socket).unwrap();
    const TOTAL: u64 = 256 << 20;
    let writing = thread::spawn(move || -> io::Result<()> {
        let mut pos = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        while pos < TOTAL {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = positional(pos + i as u64);
            }
            pos += sender.write(&chunk)? as u64;
        }
        sender.shutdown(Shutdown::Write)
    });
    let mut buffer = vec![0; 64 << 10];
    let mut read = 0u64;
    while read < TOTAL {
        let n = receiver.read(&mut buffer).expect("read");
        assert!(n > 0, "EOF after {read}");
        for (i, &byte) in buffer[..n].iter().enumerate() {
            let at = read + i as u64;
            assert_eq!(byte, positional(at), "byte {at}");
        }
        read += n as u64;
        let credit = splice_proxy::probe::Credit {
            limit: 1,
            ask_at: 1,
            unparked: read,
        };
        maps.grant(cookie, credit).unwrap();
    }
    writing.join().unwrap().unwrap();
}
