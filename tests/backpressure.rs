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
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use support::*;

/// How long the reader does not read while the sender writes flat out.
const STALL: Duration = Duration::from_secs(4);

/// How long a reader waits for its next byte once the readers of many stalled
/// connections resume. Those stalls drive the host's TCP memory to its limit
/// (`tcp_mem`), where TCP drops segments, and a sender retransmits a dropped segment on
/// its retransmission timer, doubling the timer at every drop; a window that reopens
/// meanwhile does not make it send sooner (the lost segment counts as in flight until
/// the timer fires). In 6.12 guests 2 to 4 clients of a thousand had backed off to a
/// 26 s timer (13 drops each, one 53-byte segment) while their window stood open, and
/// went on at its next expiry, after their readers had given up at [`IO_TIMEOUT`]
/// (docs/flow-control.md, "On the kernel matrix"). The timer never passes 120 s
/// (`TCP_RTO_MAX`), so a direction that has not resumed after that is stuck.
const RESUME_TIMEOUT: Duration = Duration::from_secs(130);

/// The bound tests run with: small, so that a test sees several parks.
const BACKLOG: u64 = 256 * 1024;

/// A test that stalls many connections at once drives the host's TCP memory to its limit
/// (`tcp_mem`), where the kernel drops segments and resets orphaned sockets that still
/// hold bytes: it runs alone, and every other test shares this lock, so that none of them
/// moves bytes under that pressure or in the middle of its memory measurement.
static HOST_TCP_MEMORY: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    HOST_TCP_MEMORY.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    HOST_TCP_MEMORY.write().unwrap_or_else(|e| e.into_inner())
}

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
    /// The local and remote ports of the sender's socket, for a failure message.
    ports: [u16; 2],
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: thread::JoinHandle<io::Result<(u64, [u8; 32])>>,
}

impl Writer {
    fn start(mut stream: TcpStream, seed: u64, limit: u64) -> Writer {
        let ports = ports_of(&stream);
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&written), Arc::clone(&stop));
        let done = thread::spawn(move || {
            let chunk = payload(64 * 1024, seed);
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            while !stopping.load(Ordering::Relaxed) && total < limit {
                // A write blocked past the stream's timeout is what a stalled reader does
                // to it: on a slow machine (the emulated kernels) the stall outlasts it.
                let n = match stream.write(&chunk) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue;
                    }
                    written => written?,
                };
                hasher.update(&chunk[..n]);
                total += n as u64;
                count.store(total, Ordering::Relaxed);
            }
            stream.shutdown(Shutdown::Write)?;
            Ok((total, hasher.finalize().into()))
        });
        Writer {
            ports,
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

/// A backend that hands each connection's socket to the test, so that the test decides
/// when it reads, and what it writes.
fn holding_backend() -> (Backend, mpsc::Receiver<TcpStream>) {
    let (held_tx, held) = mpsc::channel::<TcpStream>();
    let held_tx = Mutex::new(held_tx);
    let backend = Backend::start(move |stream| {
        let _ = held_tx.lock().unwrap().send(stream);
    });
    (backend, held)
}

/// A connection through `proxy` to a [`holding_backend`]: the client's first message
/// sent, and read by the backend. Returns (client, upstream).
fn connect_held(proxy: &Proxy, held: &mpsc::Receiver<TcpStream>) -> (TcpStream, TcpStream) {
    let mut client = proxy.connect();
    client.write_all(b"hello\n").unwrap();
    let mut upstream = held.recv_timeout(IO_TIMEOUT).expect("backend connection");
    assert_eq!(read_exactly(&mut upstream, 6).unwrap(), b"hello\n");
    (client, upstream)
}

/// One connection spliced through a proxy at the default bound (routes without
/// `splice_backlog_max`) to a [`holding_backend`], handed off: (proxy, backend, client,
/// upstream).
fn spliced_at_the_default_bound() -> (Proxy, Backend, TcpStream, TcpStream) {
    let (backend, held) = holding_backend();
    let routes = format!(
        "[[route]]\nname = \"hello\"\nprefix = \"hello\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let proxy = Proxy::start(&routes, SPLICE);
    let (client, upstream) = connect_held(&proxy, &held);
    proxy.wait_handed_off(1, IO_TIMEOUT);
    (proxy, backend, client, upstream)
}

/// A writer that starts before its reader reads, for STALL; asserts the sender stopped
/// within the bound and that memory did not keep falling; then lets the reader read.
fn stalled_reader_is_bounded(moving: Moving, upload: bool) {
    let _shared = shared();
    let (backend, held) = holding_backend();
    let proxy = Proxy::start(&routes(backend.addr), moving);
    let (client, upstream) = connect_held(&proxy, &held);
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
    // As in many_stalled_readers_are_bounded: on a slow machine the sender may still be
    // filling the buffers on its way, so the second half runs from when it slowed.
    let halfway = slowed_down(|| writer.written(), 64 * 1024, STALL * 2);
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
    if let Some(probe) = proxy.probe() {
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
    let _shared = shared();
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
            proxy.probe().map(|p| p.counters().unwrap())
        );
    }
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn echo_without_fin_through_a_small_bound() {
    let _shared = shared();
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
    let _shared = shared();
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
        proxy.probe().map(|p| p.counters().unwrap())
    );
    proxy.wait_idle(IO_TIMEOUT);
}

/// A reader that alternates between reading flat out and stopping (2 MiB, then 20 ms of
/// nothing), against a sender that never stops: the direction throttles and flows again
/// at every turn, and every byte must arrive once, in order. Both directions, one after
/// the other.
#[test]
fn a_reader_that_alternates_gets_every_byte() {
    let _shared = shared();
    for upload in [true, false] {
        let (backend, held) = holding_backend();
        let proxy = Proxy::start(&routes(backend.addr), SPLICE);
        let (client, upstream) = connect_held(&proxy, &held);
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

/// A fast backend's download to a client that reads at a steady pace below the
/// backend's (a slow client's link): the credit runs out again and again, and each
/// throttle must park about one window, not the rest of the transfer. A hand-back that
/// read the parked bytes before its grant reopened the backend's window each time, and
/// the backend refilled it before the grant, so most of such a download crossed
/// userspace (docs/flow-control.md, "On a link slower than the sender": 82-83% at
/// 500 Mbit/s, 2% since the peeked hand-back). The default bound, every byte by hash.
#[test]
fn a_paced_download_stays_in_the_kernel() {
    let _shared = shared();
    let (proxy, _backend, mut client, upstream) = spliced_at_the_default_bound();
    let before = proxy.counters();
    const TOTAL: u64 = 96 << 20;
    let writer = Writer::start(upstream.try_clone().unwrap(), 13, TOTAL);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 64 << 10];
    let mut read = 0u64;
    // 256 KiB every 2 ms at most: about 1 Gbit/s, well below what a loopback backend
    // sends; bounded in time by the reads' own timeout.
    while read < TOTAL {
        let mut this_turn = 0;
        while this_turn < 256 << 10 && read < TOTAL {
            let n = client.read(&mut buffer).expect("read");
            assert!(n > 0, "EOF after {read} bytes");
            hasher.update(&buffer[..n]);
            read += n as u64;
            this_turn += n;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let (written, hash) = writer.finish();
    assert_eq!(read, written);
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), hash);
    let after = proxy.counters();
    let parked = after.parked_bytes - before.parked_bytes;
    let redirected = after.redirected_bytes - before.redirected_bytes;
    assert!(
        redirected > 0 && parked * 4 < TOTAL,
        "of a {TOTAL}-byte paced download {parked} bytes parked and were copied \
         ({redirected} redirected): the hand-back let the sender refill its window"
    );
    drop((client, upstream));
    proxy.wait_idle(IO_TIMEOUT);
}

/// A sender slower than the path, as a client uploading over a real network is, must get
/// the window a fast transfer needs. A source joins the maps with a small receive buffer
/// that the engine grows; with the window stuck at the join's, a 64 MiB upload over a
/// 10 ms round trip ran at 22 MB/s, against 140 MB/s direct (docs/flow-control.md, "A
/// buffer is not a window"). Loopback has no round trip for the window to limit, so this
/// reads the window the client was given.
#[test]
fn a_paced_upload_gets_a_growing_window() {
    let _shared = shared();
    let (proxy, _backend, mut client, mut upstream) = spliced_at_the_default_bound();
    let before = proxy.counters();
    let first_window = send_window(&client);
    let reader = thread::spawn(move || read_to_end_hashed(&mut upstream));
    const ENOUGH: u32 = 1 << 20;
    const CHUNK: usize = 256 << 10;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut widest = 0;
    // 256 KiB every 5 ms at most, about 400 Mbit/s: slower than the path even in an
    // emulated guest, so the destination keeps up. The window must have grown within
    // 8 MiB: one round trip's worth of a fast sender on a real network. The engine
    // once grew it only when the probe asked for credit, every 4 MiB.
    for seed in 0..32 {
        let chunk = payload(CHUNK, seed);
        client.write_all(&chunk).expect("write");
        hasher.update(&chunk);
        written += CHUNK as u64;
        widest = widest.max(send_window(&client));
        if widest >= ENOUGH {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    client.shutdown(Shutdown::Write).unwrap();
    let (read, hash) = reader.join().unwrap().expect("backend read");
    assert_eq!(read, written);
    assert_eq!(hash, <[u8; 32]>::from(hasher.finalize()));
    // Every byte went through the verdict: a copied connection's socket is autotuned by
    // the kernel, and its window would grow with no help from the engine.
    let after = proxy.counters();
    let verdicts = (after.redirected_bytes - before.redirected_bytes)
        + (after.parked_bytes - before.parked_bytes);
    assert_eq!(
        verdicts, written,
        "bytes through the verdict of {written} written"
    );
    assert!(
        widest >= ENOUGH,
        "the proxy's window stayed at {widest} bytes or less over {written} bytes \
         (it was {first_window} at the hand-off)"
    );
    drop(client);
    proxy.wait_idle(IO_TIMEOUT);
}

/// The byte at `offset` of a stream whose every 8-byte word is its own word index: a
/// reader that finds a wrong byte can tell where the bytes it got came from.
fn positional(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Writes the first `total` bytes of the [`positional`] stream into `out`, then its FIN.
fn write_positional(mut out: TcpStream, total: u64) -> thread::JoinHandle<io::Result<()>> {
    thread::spawn(move || {
        let mut pos = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        while pos < total {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = positional(pos + i as u64);
            }
            pos += out.write(&chunk)? as u64;
        }
        out.shutdown(Shutdown::Write)
    })
}

/// The first byte of `bytes` (read at stream offset `at` of a [`positional`] stream of
/// `total` bytes) that is not the stream's: its offset, and the offset the 8-byte word
/// there came from, found as the shift at which 8 bytes read as a word index.
fn misplaced(bytes: &[u8], at: u64, total: u64) -> Option<(u64, Option<u64>)> {
    let i = (0..bytes.len()).find(|&i| bytes[i] != positional(at + i as u64))?;
    let word = (0..8usize).find_map(|k| {
        let start = i.checked_sub(k)?;
        let w = bytes.get(start..start + 8)?;
        let index = u64::from_le_bytes(w.try_into().unwrap());
        (index < total / 8).then_some(index * 8 + k as u64)
    });
    Some((at + i as u64, word))
}

/// A connected pair on 127.0.0.1 whose receiving end is its own peer in `maps`
/// ([`loop_back`](splice_proxy::probe::SpliceMaps::loop_back)), for the probe's side of
/// parking without the engine, with a credit of one byte: every message parks. Returns
/// (sender, receiver, the receiver's cookie).
fn looped_back(
    maps: &mut splice_proxy::probe::SpliceMaps,
) -> (TcpStream, TcpStream, splice_proxy::probe::Cookie) {
    use std::os::fd::AsFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (receiver, _) = listener.accept().unwrap();
    let socket = splice_proxy::probe::MapSocket::new(receiver.as_fd()).unwrap();
    let cookie = socket.cookie;
    maps.loop_back(socket, 1).unwrap();
    (sender, receiver, cookie)
}

/// As [`a_reader_that_alternates_gets_every_byte`], with a positional stream, so that a
/// failure says what arrived where.
#[test]
fn a_reader_that_alternates_gets_every_byte_in_place() {
    let _shared = shared();
    for upload in [true, false] {
        let (backend, held) = holding_backend();
        let proxy = Proxy::start(&routes(backend.addr), SPLICE);
        let (client, upstream) = connect_held(&proxy, &held);
        let (sender, mut reader) = if upload {
            (client, upstream)
        } else {
            (upstream, client)
        };
        const TOTAL: u64 = 96 << 20;
        let writing = write_positional(sender.try_clone().unwrap(), TOTAL);
        let mut buffer = vec![0; 256 << 10];
        let mut read = 0u64;
        while read < TOTAL {
            let mut this_turn = 0;
            while this_turn < 2 << 20 && read < TOTAL {
                let n = reader.read(&mut buffer).expect("read");
                assert!(n > 0, "EOF after {read} bytes");
                if let Some((at, word)) = misplaced(&buffer[..n], read, TOTAL) {
                    let i = (at - read) as usize;
                    eprintln!("at {at}: got {:02x?}", &buffer[i..(i + 32).min(n)]);
                    panic!(
                        "upload {upload}: byte {at} is wrong; the word there came from offset {word:?}; probe {:?}",
                        proxy.probe().map(|p| p.counters().unwrap())
                    );
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
    let _shared = shared();
    let (backend, held) = holding_backend();
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    proxy
        .probe()
        .unwrap()
        .set_backlog(splice_proxy::budget::Backlog {
            bytes: 1,
            ..Default::default()
        });
    let (mut client, upstream) = connect_held(&proxy, &held);
    const TOTAL: u64 = 96 << 20;
    let writing = write_positional(upstream.try_clone().unwrap(), TOTAL);
    let mut buffer = vec![0; 256 << 10];
    let mut read = 0u64;
    while read < TOTAL {
        let n = client.read(&mut buffer).expect("read");
        assert!(n > 0, "EOF after {read} bytes");
        if let Some((at, word)) = misplaced(&buffer[..n], read, TOTAL) {
            let i = (at - read) as usize;
            panic!(
                "byte {at} (read {n} at {read}) came from {word:?}: {:02x?}",
                &buffer[i..(i + 24).min(n)]
            );
        }
        read += n as u64;
    }
    writing.join().unwrap().unwrap();
}

/// A socket whose verdict parks every message, read directly (no engine): the kernel's
/// side of parking alone. 256 MiB, every byte checked in place.
#[test]
fn a_socket_that_parks_everything_reads_in_place() {
    let _shared = shared();
    let probe = splice_proxy::probe::Probe::load(1 << 10, Default::default()).unwrap();
    let mut maps = probe.maps().unwrap();
    let (sender, mut receiver, _) = looped_back(&mut maps);
    receiver.set_nonblocking(true).unwrap();
    const TOTAL: u64 = 256 << 20;
    let writing = write_positional(sender, TOTAL);
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
        if let Some((at, word)) = misplaced(&buffer[..n], read, TOTAL) {
            panic!("byte {at} (read {n} at {read}) came from {word:?}");
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
    let _shared = shared();
    let probe = splice_proxy::probe::Probe::load(1 << 10, Default::default()).unwrap();
    let mut maps = probe.maps().unwrap();
    let (sender, mut receiver, cookie) = looped_back(&mut maps);
    const TOTAL: u64 = 256 << 20;
    let writing = write_positional(sender, TOTAL);
    let mut buffer = vec![0; 64 << 10];
    let mut read = 0u64;
    while read < TOTAL {
        let n = receiver.read(&mut buffer).expect("read");
        assert!(n > 0, "EOF after {read}");
        if let Some((at, word)) = misplaced(&buffer[..n], read, TOTAL) {
            panic!("byte {at} (read {n} at {read}) came from {word:?}");
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

/// Connections stalled at once by [`many_stalled_readers_are_bounded`].
const MANY: usize = 1_000;

/// Descriptors this process holds per connection of [`many_stalled_readers_are_bounded`]:
/// the client, the backend's end, the writer's clone of the sender, and the proxy's two.
const FDS_PER_STALLED: usize = 5;

/// Descriptors kept for everything else: the proxies of the tests that ran before in this
/// process keep theirs (about 20 each) until it exits.
const FD_RESERVE: usize = 1000;

/// What a socket may hold beyond TCP's memory limit: the kernel charges the first skb of
/// an empty receive or write queue even past the limit, so that no socket stalls for good,
/// and a loopback skb carries at most 64 KiB.
const FORCED_PER_SOCKET: u64 = 64 * 1024;

/// Bytes the engine may have read from a throttled direction's source that its destination
/// has not taken: its copy buffer (`COPY_BUFFER` in proxy/splice/copy.rs).
const ENGINE_BUFFER: u64 = 64 * 1024;

/// What [`MANY`] stalled senders may get in, in all, when the host's TCP memory limit is
/// what binds, as it is with this many connections: [`in_flight_limit`] counts each socket
/// buffer at its maximum (and the proxy's send buffer alone is 32 MiB), but the kernel
/// charges every socket buffer to one limit, `tcp_mem`'s maximum, and refuses more beyond
/// it. What it does not charge is the bytes redirected and not yet taken by the
/// destination, [`BACKLOG`] per direction, and the engine's copy buffer; and each of the
/// four sockets of a connection may be forced past the limit by an skb.
fn host_in_flight_limit() -> u64 {
    tcp_memory().limit + MANY as u64 * (BACKLOG + ENGINE_BUFFER + 4 * FORCED_PER_SOCKET)
}

/// `total()` once it grew by at most `slack` in half a second, or after `limit`.
fn slowed_down(total: impl Fn() -> u64, slack: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = total();
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = total();
        if now - last <= slack || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// TCP's memory, in bytes, all sockets together.
struct TcpMemory {
    /// What they hold now (`/proc/net/sockstat`).
    held: u64,
    /// `tcp_mem`'s maximum.
    limit: u64,
}

fn tcp_memory() -> TcpMemory {
    // The last number of the first line of `path` that starts with `prefix`.
    let pages = |path: &str, prefix: &str| -> u64 {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().last()?.parse().ok())
            .unwrap_or_else(|| panic!("{path}: {text:?}"))
    };
    // SAFETY: sysconf takes no pointers.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    TcpMemory {
        held: pages("/proc/net/sockstat", "TCP:") * page,
        limit: pages("/proc/sys/net/ipv4/tcp_mem", "") * page,
    }
}

/// [`MANY`] connections at once, each with a writer flat out against a reader that does
/// not read for [`STALL`]: what the senders got in must stay within the bound, stop
/// growing while the readers do not read, and not keep eating the host's memory; then
/// every reader reads, and every connection's bytes must arrive by hash.
fn many_stalled_readers_are_bounded(upload: bool) {
    let _alone = alone();
    let nofile = soft_nofile_to_hard();
    let needed = MANY * FDS_PER_STALLED + FD_RESERVE;
    assert!(
        nofile >= needed as u64,
        "RLIMIT_NOFILE is {nofile} and cannot rise; {MANY} stalled connections need about {needed} descriptors"
    );
    // Each client's first message names it, so that its backend end can be matched.
    let first = |index: usize| format!("hello {index:04}\n");
    let (upstream_tx, upstream_rx) = mpsc::channel::<(usize, TcpStream)>();
    let upstream_tx = Mutex::new(upstream_tx);
    let first_len = first(0).len();
    // The proxy connects to the backend as fast as the clients come: a listener's default
    // backlog (128) overflows, and a connection whose handshake is dropped a few times
    // takes longer than the test waits.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(2 * MANY as i32).unwrap();
    let backend = Backend::start_on(listener.into(), move |mut stream| {
        let Ok(bytes) = read_exactly(&mut stream, first_len) else {
            return;
        };
        let index = std::str::from_utf8(&bytes[6..first_len - 1])
            .ok()
            .and_then(|index| index.parse().ok())
            .unwrap_or_else(|| panic!("first message {bytes:?}"));
        let _ = upstream_tx.lock().unwrap().send((index, stream));
    });
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    let clients: Vec<TcpStream> = (0..MANY)
        .map(|index| {
            let mut client = proxy.connect();
            client.write_all(first(index).as_bytes()).unwrap();
            client
        })
        .collect();
    let mut upstreams: Vec<Option<TcpStream>> = (0..MANY).map(|_| None).collect();
    for arrived in 0..MANY {
        let (index, stream) = upstream_rx.recv_timeout(IO_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{arrived} of {MANY} connections reached the backend ({e}); the proxy holds {}",
                proxy.admission().held()
            )
        });
        upstreams[index] = Some(stream);
    }
    proxy.wait_handed_off(MANY, IO_TIMEOUT);

    let bound = host_in_flight_limit().min(MANY as u64 * in_flight_limit());
    // A broken bound lets every writer run to its limit: four times its share of the
    // bound, so that the total would show it, or less where that could exhaust the host
    // (a guest of 4 GiB), as long as the total would still show it.
    let share = bound / MANY as u64;
    let limit = (4 * share).min(mem_available() / 2 / MANY as u64);
    assert!(
        limit > share,
        "this host has too little memory to tell a broken bound ({bound} bytes) from a kept one"
    );
    // Each sender stays open until its reader is done: the kernel resets an orphaned
    // socket that still holds bytes while TCP's memory is at its limit.
    let mut senders = Vec::with_capacity(MANY);
    let mut readers = Vec::with_capacity(MANY);
    let mut writers = Vec::with_capacity(MANY);
    for (index, (client, upstream)) in clients.into_iter().zip(upstreams).enumerate() {
        let upstream = upstream.unwrap();
        let (sender, reader) = if upload {
            (client, upstream)
        } else {
            (upstream, client)
        };
        writers.push(Writer::start(
            sender.try_clone().unwrap(),
            index as u64,
            limit,
        ));
        senders.push(sender);
        readers.push(reader);
    }
    let written = |writers: &[Writer]| writers.iter().map(Writer::written).sum::<u64>();
    let memory_before = mem_available();
    thread::sleep(STALL / 2);
    // The senders fill the buffers on their way as fast as the machine lets them: under
    // CI's load (a thousand writer threads and the proxy on 2 cores) they still took
    // 664 MB in the 2 s after the first 2 s, at 1.66 GB of the 2.4 GB TCP may hold.
    // That they stop is what counts, so the second half runs from when they slowed.
    let halfway = slowed_down(|| written(&writers), MANY as u64 * 64 * 1024 / 4, STALL * 2);
    let memory_halfway = mem_available();
    thread::sleep(STALL / 2);
    let stalled = written(&writers);
    let memory_after = mem_available();
    let counters = proxy.counters();
    let tcp = tcp_memory();
    let at_limit = writers.iter().filter(|w| w.written() >= limit).count();
    assert!(
        stalled <= bound,
        "{MANY} senders got {stalled} bytes in against readers that do not read (bound {bound}, \
         {at_limit} writers at their limit of {limit}); TCP holds {} bytes, tcp_mem's maximum \
         is {}; probe {counters:?}",
        tcp.held,
        tcp.limit
    );
    // Under TCP's memory limit receivers drop segments, and a retransmission gets in now
    // and then: a few megabytes in all over the stall (measured here), where directions
    // without a bound take gigabytes a second.
    assert!(
        stalled - halfway <= MANY as u64 * 64 * 1024,
        "the senders got {} more bytes in after {:?} ({halfway} by then)",
        stalled - halfway,
        STALL / 2
    );
    // As in stalled_reader_is_bounded: the memory may fall by the buffers, not with time.
    let fell = memory_halfway.saturating_sub(memory_after);
    assert!(
        fell < 256 << 20,
        "MemAvailable fell {fell} bytes while the senders were blocked (from {memory_before})"
    );
    assert!(
        counters.parked_bytes > 0,
        "no direction parked, so the test did not test the bound: {counters:?}"
    );
    assert_eq!(
        counters.untracked_messages, 0,
        "FLOW had no room for some sockets, whose bytes went without a bound"
    );
    assert_eq!(
        counters.asks_refused, 0,
        "the ring of credit requests was full (it holds two per socket of the maps)"
    );

    // Every writer stops at its next write before any reader reads: the ones joined last
    // would otherwise write on to their limit.
    for writer in &writers {
        writer.stop.store(true, Ordering::Relaxed);
    }
    every_byte_arrives(&proxy, readers, writers);
    drop(senders);
    proxy.wait_idle(IO_TIMEOUT);
}

/// The loader sizes the ring of credit requests to the maps: two 16-byte requests for
/// each socket, 512 KiB for the 16,384 sockets of a test proxy, where the object itself
/// asks for 256 KiB. A loader that kept the object's size would leave no ring of that
/// size loaded (every test proxy's maps have the same capacity), and the
/// thousand-connection tests, whose asks fit in 256 KiB, would not notice.
#[test]
fn the_ring_of_credit_asks_is_sized_to_the_maps() {
    let _shared = shared();
    let (backend, _held) = holding_backend();
    let proxy = Proxy::start(&routes(backend.addr), SPLICE);
    assert!(proxy.probe().is_some(), "the probe is loaded");
    let rings: Vec<u32> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|map| map.name_as_str() == Some(proxy_probe::ASKS_MAP))
        .map(|map| map.max_entries())
        .collect();
    assert!(
        rings.contains(&(512 << 10)),
        "no ring of credit requests of 512 KiB is loaded: {rings:?}"
    );
}

/// Connections of [`stalled_downloads_are_bounded_together`].
const STALLED_TOGETHER: usize = 16;

/// The `splice_backlog_max` and `splice_backlog_total` they run under: without a bound
/// on the sum, their directions could hold 16 × 16 MiB.
const EACH: u64 = 16 << 20;
const TOTAL: u64 = 64 << 20;

/// Routes to `backend` under [`EACH`] and [`TOTAL`].
fn bounded_together(backend: SocketAddr) -> String {
    format!(
        "splice_backlog_max = {EACH}\nsplice_backlog_total = {TOTAL}\n\n[[route]]\nname = \"hello\"\nprefix = \"hello\"\nbackends = [\"{backend}\"]\n"
    )
}

/// A backend writing flat out to each of many clients that do not read: the kernel holds
/// no more than `splice_backlog_total` for all of them together, as the engine measures it
/// (`splice_proxy_splice_held_bytes`), and no more than it promised; then every byte
/// arrives. Before the bound on the sum, 100 such downloads had 1.86 GB redirected into
/// the kernel within 8 s.
#[test]
fn stalled_downloads_are_bounded_together() {
    let _alone = alone();
    let (backend, held) = holding_backend();
    let proxy = Proxy::start(&bounded_together(backend.addr), SPLICE);
    let pairs: Vec<(TcpStream, TcpStream)> = (0..STALLED_TOGETHER)
        .map(|_| connect_held(&proxy, &held))
        .collect();
    proxy.wait_handed_off(STALLED_TOGETHER, IO_TIMEOUT);
    // Each writer stops at 64 MiB: past the sockets' buffers on the way (the proxy's
    // send buffer of 16 MiB, the kernel's autotuned receive and send buffers: 27 MiB
    // here) by more than the per-direction bound, so that the sum of broken bounds would
    // show; little enough for a guest of 4 GiB.
    let limit = (64 << 20).min(mem_available() / 4 / STALLED_TOGETHER as u64);
    let (clients, writers): (Vec<TcpStream>, Vec<Writer>) = pairs
        .into_iter()
        .enumerate()
        .map(|(index, (client, upstream))| (client, Writer::start(upstream, index as u64, limit)))
        .unzip();
    // The senders stop once every buffer on the way is full, which through the parked
    // path takes one to several seconds here: wait for a second without a byte more.
    let deadline = Instant::now() + 30 * STALL;
    let mut last = u64::MAX;
    let stalled = loop {
        thread::sleep(STALL / 4);
        let written = writers.iter().map(Writer::written).sum::<u64>();
        if written == last {
            break written;
        }
        assert!(
            Instant::now() < deadline,
            "the senders still got bytes in after {:?}: {written} in all",
            30 * STALL
        );
        last = written;
    };
    let kernel_held = proxy.metric("splice_proxy_splice_held_bytes");
    let promised = proxy.metric("splice_proxy_splice_budget_promised_bytes");
    let counters = proxy.counters();
    assert!(
        promised <= TOTAL,
        "{promised} bytes promised, over splice_backlog_total {TOTAL}"
    );
    assert!(
        kernel_held <= promised,
        "the kernel holds {kernel_held} bytes for the stalled directions, {promised} were promised; probe {counters:?}"
    );
    assert!(
        counters.parked_bytes > 0 && kernel_held > 0,
        "nothing parked or held, so the test did not test the bound: held {kernel_held}, probe {counters:?}"
    );
    let at_limit = writers.iter().filter(|w| w.written() >= limit).count();
    assert_eq!(
        at_limit, 0,
        "{at_limit} senders ran to their limit of {limit} bytes ({stalled} in all)"
    );
    every_byte_arrives(&proxy, clients, writers);
    proxy.wait_idle(IO_TIMEOUT);
    assert_eq!(proxy.metric("splice_proxy_splice_budget_promised_bytes"), 0);
}

/// A connection that moved a bulk upload and then sat idle gives back what its directions
/// were promised once the budget is tight, so that it does not keep a bound's worth
/// promised for good; and its next upload arrives whole and in order, through the park
/// that the lowered credit makes and the grant that follows it.
#[test]
fn an_idle_connection_gives_back_its_promise() {
    const UPLOAD: usize = 32 << 20;
    let _shared = shared();
    let (backend, held) = holding_backend();
    let proxy = Proxy::start(&bounded_together(backend.addr), SPLICE);
    let (client, mut upstream) = connect_held(&proxy, &held);
    let promised = || proxy.metric("splice_proxy_splice_budget_promised_bytes");
    // Half the budget free: the pair joined with the bound for each direction, which
    // leaves the budget tight.
    assert_eq!(promised(), 2 * EACH);
    for round in 0..2 {
        let data = payload(UPLOAD, round);
        let mut writer = client.try_clone().unwrap();
        let sent = data.clone();
        let writing = thread::spawn(move || writer.write_all(&sent));
        let mut got = vec![0; UPLOAD];
        upstream.read_exact(&mut got).expect("read the upload");
        writing.join().unwrap().unwrap();
        assert!(got == data, "round {round}: the upload arrived changed");
        // Idle now: within three sweeps of a second, nothing is promised to it.
        let deadline = Instant::now() + 5 * Duration::from_secs(1);
        while promised() > 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: still {} bytes promised to an idle connection",
                promised()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    drop((client, upstream));
    proxy.wait_idle(IO_TIMEOUT);
    assert_eq!(promised(), 0);
}

/// Lets every reader read to the end, each on its own thread, and checks that it got
/// what its writer wrote, byte count and hash. io::copy reads through an 8 KiB buffer on
/// the stack, where read_to_end_hashed's 256 KiB each would take a quarter of a gigabyte
/// for a thousand readers.
fn every_byte_arrives(proxy: &Proxy, readers: Vec<TcpStream>, writers: Vec<Writer>) {
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            reader
                .set_read_timeout(Some(RESUME_TIMEOUT))
                .expect("SO_RCVTIMEO");
            let ports = ports_of(&reader);
            let reading = thread::spawn(move || {
                let mut hasher = Sha256::new();
                let read = io::copy(&mut reader, &mut hasher)?;
                Ok::<_, io::Error>((read, <[u8; 32]>::from(hasher.finalize())))
            });
            (ports, reading)
        })
        .collect();
    for (index, (writer, (ports, reading))) in writers.into_iter().zip(reading).enumerate() {
        let sender = writer.ports;
        let written = writer.finish();
        let read = reading
            .join()
            .expect("reader thread panicked")
            .unwrap_or_else(|e| {
                // The four sockets of the connection, by the two ports that are not a
                // listener's, with what the engine says the kernel holds for all
                // directions and TCP's counters.
                panic!(
                    "connection {index}: read: {e}; {} bytes written; the engine says the \
                     kernel holds {} bytes; probe {:?}; its sockets:\n{}TCP: {}",
                    written.0,
                    proxy.metric("splice_proxy_splice_held_bytes"),
                    proxy.counters(),
                    sockets_on(&[sender, ports].map(|ports| {
                        // The client's own port, or the proxy's on the backend's side.
                        if ports[1] == proxy.addr.port() {
                            ports[0]
                        } else {
                            ports[1]
                        }
                    })),
                    tcp_counters(),
                )
            });
        assert_eq!(
            read, written,
            "connection {index}: (bytes, hash) read and written"
        );
    }
}

/// The local and remote ports of `stream`.
fn ports_of(stream: &TcpStream) -> [u16; 2] {
    let port = |addr: io::Result<SocketAddr>| addr.map_or(0, |addr| addr.port());
    [port(stream.local_addr()), port(stream.peer_addr())]
}

#[test]
fn many_uploads_to_stalled_backends_are_bounded() {
    many_stalled_readers_are_bounded(true);
}

#[test]
fn many_downloads_to_stalled_clients_are_bounded() {
    many_stalled_readers_are_bounded(false);
}
