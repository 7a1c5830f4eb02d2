//! Through the proxy, in splice and copy mode, checking every byte with a hash: sizes
//! from 1 byte to 64 MiB in each direction and both at once, first messages split or
//! pipelined, a backend that speaks first, readers that pause, half-closes and resets from
//! either side, refused backends, connection churn, the proof that spliced bytes never
//! reach userspace, and bytes queued on either socket before the hand-off (docs/kernel.md,
//! "Bytes queued before the insert").
//!
//! Each scenario is one function taking the mode; `in_modes!` makes a #[test] per mode,
//! named `scenario::mode`, so a failure names both.

mod support;

use std::{
    io::{self, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use support::*;

/// The first message every prefix-routed test sends.
const FIRST: &[u8] = b"HELLO";
/// What a client sends after the hand-off to tell a streaming backend to start.
const GO: &[u8] = b"GO";
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Bound for waits on the proxy (hand-off, teardown) and on backend reports.
const WAIT: Duration = Duration::from_secs(10);
/// How soon a reset or a refused connection must reach the other end.
const PROMPT: Duration = Duration::from_secs(5);

/// Tests that measure process-wide quantities (open fds, the proxy threads' read bytes)
/// run alone; every other test shares this lock, so none of them starts a proxy or moves
/// bytes in the middle of such a measurement.
static MEASURING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    MEASURING.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    MEASURING.write().unwrap_or_else(|e| e.into_inner())
}

/// `in_modes!(name, |mode| scenario(mode, args..))` makes `mod name` with a #[test] for
/// each of `splice`, `copy` and `later` (copied first, spliced once it lived
/// `LATER_AFTER` or streamed: with `AfterHandOff` the bytes follow the switch, with
/// `AllAtOnce` they race it); `; modes..` at the end picks modes, and `alone` in front
/// runs the tests under the write lock of [`MEASURING`].
macro_rules! in_modes {
    (alone $name:ident, |$m:ident| $body:expr) => {
        in_modes!(alone $name, |$m| $body; splice, copy, later);
    };
    ($name:ident, |$m:ident| $body:expr) => {
        in_modes!($name, |$m| $body; splice, copy, later);
    };
    (alone $name:ident, |$m:ident| $body:expr; $($mode:ident),+) => {
        in_modes!(@mod alone, $name, |$m| $body; $($mode),+);
    };
    ($name:ident, |$m:ident| $body:expr; $($mode:ident),+) => {
        in_modes!(@mod shared, $name, |$m| $body; $($mode),+);
    };
    (@mod $lock:ident, $name:ident, |$m:ident| $body:expr; $($mode:ident),+) => {
        mod $name {
            use super::*;
            $(
                #[test]
                fn $mode() {
                    let _lock = $lock();
                    let $m = in_modes!(@$mode);
                    $body;
                }
            )+
        }
    };
    (@splice) => { SPLICE };
    (@copy) => { COPY };
    (@later) => { LATER };
}

/// When the client sends what follows its first message.
#[derive(Debug, Clone, Copy)]
enum Timing {
    /// After the proxy has handed the connection to the engine (and, when splicing, put
    /// both sockets into the maps): the bytes take the kernel's path.
    AfterHandOff,
    /// In the same write as the first message: the bytes race the hand-off.
    AllAtOnce,
}
use Timing::{AfterHandOff, AllAtOnce};

fn concat(parts: &[&[u8]]) -> Arc<Vec<u8>> {
    Arc::new(parts.concat())
}

/// The end of every test that closes cleanly: the pair is torn down, its map entries are
/// gone, and the probe never dropped a byte for want of a peer.
fn finish(proxy: &Proxy) {
    proxy.wait_idle(WAIT);
    let counters = proxy.counters();
    assert_eq!(
        (counters.redirect_failures, counters.dropped_bytes),
        (0, 0),
        "the probe dropped bytes: {counters:?}"
    );
}

/// The sink behind `reports` received the first message and `data` after it, and then
/// the client's FIN.
fn sink_received(reports: &mpsc::Receiver<(u64, [u8; 32])>, data: &[u8]) {
    let received = reports
        .recv_timeout(WAIT)
        .expect("the sink reported within 10s");
    assert_eq!(
        received,
        (
            (FIRST.len() + data.len()) as u64,
            sha256_concat(&[FIRST, data])
        ),
        "the backend received other bytes than the client sent"
    );
}

// ---------------------------------------------------------------------------------------
// 1. Sizes in each direction and both at once.

/// Client to backend: a sink hashes everything it received, first message included.
fn upload(mode: Moving, len: usize, timing: Timing) {
    let (sink, reports) = Backend::sink();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[sink.addr]), mode);
    let data = shared_payload(len, 1);
    // Built before the connect: the proxy waits for a first message only so long.
    let all_at_once = concat(&[FIRST, &data]);
    let mut client = proxy.connect();
    match timing {
        AfterHandOff => {
            client.write_all(FIRST).unwrap();
            proxy.wait_handed_off(1, WAIT);
            client.write_all(&data).unwrap();
        }
        AllAtOnce => client.write_all(&all_at_once).unwrap(),
    }
    client.shutdown(Shutdown::Write).unwrap();
    sink_received(&reports, &data);
    // The sink closed after the FIN; the client must see that close, with no bytes.
    assert_eq!(read_to_end_hashed(&mut client).unwrap().0, 0);
    drop(client);
    finish(&proxy);
}

/// Backend to client: the backend streams once it has the first message and "GO".
fn download(mode: Moving, len: usize, timing: Timing) {
    let data = shared_payload(len, 2);
    let streamer = Backend::streamer(FIRST.len() + GO.len(), Arc::clone(&data));
    let proxy = Proxy::start(&prefix_routes("HELLO", &[streamer.addr]), mode);
    let mut client = proxy.connect();
    match timing {
        AfterHandOff => {
            client.write_all(FIRST).unwrap();
            proxy.wait_handed_off(1, WAIT);
            client.write_all(GO).unwrap();
        }
        AllAtOnce => client.write_all(&concat(&[FIRST, GO])).unwrap(),
    }
    let received = read_to_end_hashed(&mut client).unwrap();
    assert_eq!(
        received,
        (len as u64, sha256(&data)),
        "the client received other bytes than the backend sent"
    );
    drop(client);
    finish(&proxy);
}

/// Both ways at once through an echo: one thread writes while the other reads.
fn both_ways(mode: Moving, len: usize, timing: Timing) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[echo.addr]), mode);
    let data = shared_payload(len, 3);
    // Hashed before the connect: in an emulated guest hashing 64 MiB took longer than
    // the proxy waits for a first message (first_message_timeout, 3 s), and the proxy
    // closed the connection before the client wrote.
    let (sent, expected) = match timing {
        AfterHandOff => (Arc::clone(&data), (len as u64, sha256(&data))),
        AllAtOnce => (
            concat(&[FIRST, &data]),
            ((FIRST.len() + len) as u64, sha256_concat(&[FIRST, &data])),
        ),
    };
    let mut client = proxy.connect();
    if let AfterHandOff = timing {
        client.write_all(FIRST).unwrap();
        assert_eq!(read_exactly(&mut client, FIRST.len()).unwrap(), FIRST);
        proxy.wait_handed_off(1, WAIT);
    }
    let echoed = write_while_reading(&mut client, sent).unwrap();
    assert_eq!(echoed, expected, "the echo came back different");
    drop(client);
    finish(&proxy);
}

in_modes! { upload_1_byte_after_hand_off, |mode| upload(mode, 1, AfterHandOff) }
in_modes! { upload_1_byte_all_at_once, |mode| upload(mode, 1, AllAtOnce) }
in_modes! { upload_1_kib_after_hand_off, |mode| upload(mode, KIB, AfterHandOff) }
in_modes! { upload_1_kib_all_at_once, |mode| upload(mode, KIB, AllAtOnce) }
in_modes! { upload_64_mib_after_hand_off, |mode| upload(mode, 64 * MIB, AfterHandOff) }
in_modes! { upload_64_mib_all_at_once, |mode| upload(mode, 64 * MIB, AllAtOnce) }

in_modes! { download_1_byte_after_hand_off, |mode| download(mode, 1, AfterHandOff) }
in_modes! { download_1_byte_all_at_once, |mode| download(mode, 1, AllAtOnce) }
in_modes! { download_1_kib_after_hand_off, |mode| download(mode, KIB, AfterHandOff) }
in_modes! { download_1_kib_all_at_once, |mode| download(mode, KIB, AllAtOnce) }
in_modes! { download_64_mib_after_hand_off, |mode| download(mode, 64 * MIB, AfterHandOff) }
in_modes! { download_64_mib_all_at_once, |mode| download(mode, 64 * MIB, AllAtOnce) }

in_modes! { both_ways_1_byte_after_hand_off, |mode| both_ways(mode, 1, AfterHandOff) }
in_modes! { both_ways_1_byte_all_at_once, |mode| both_ways(mode, 1, AllAtOnce) }
in_modes! { both_ways_1_kib_after_hand_off, |mode| both_ways(mode, KIB, AfterHandOff) }
in_modes! { both_ways_1_kib_all_at_once, |mode| both_ways(mode, KIB, AllAtOnce) }
in_modes! { both_ways_64_mib_after_hand_off, |mode| both_ways(mode, 64 * MIB, AfterHandOff) }
in_modes! { both_ways_64_mib_all_at_once, |mode| both_ways(mode, 64 * MIB, AllAtOnce) }

/// How long a paused reader stops reading: long enough for every buffer on the way to
/// fill up.
const PAUSE: Duration = Duration::from_millis(300);

/// A client that stops reading mid-download: the backend's stream backs up through the
/// proxy (the redirect has no backpressure of its own, docs/kernel.md, "A redirect has no
/// backpressure") and must arrive whole once the client reads again.
fn paused_client_download(mode: Moving) {
    let data = shared_payload(32 * MIB, 17);
    let streamer = Backend::streamer(FIRST.len() + GO.len(), Arc::clone(&data));
    let proxy = Proxy::start(&prefix_routes("HELLO", &[streamer.addr]), mode);
    let mut client = proxy.connect();
    client.write_all(FIRST).unwrap();
    proxy.wait_handed_off(1, WAIT);
    client.write_all(GO).unwrap();
    let head = read_exactly(&mut client, MIB).unwrap();
    assert!(head == data[..MIB], "the first MiB came back different");
    thread::sleep(PAUSE);
    let rest = read_to_end_hashed(&mut client).unwrap();
    assert_eq!(
        rest,
        ((31 * MIB) as u64, sha256(&data[MIB..])),
        "the stream after the client's pause was cut or changed"
    );
    drop(client);
    finish(&proxy);
}

/// A backend that stops reading mid-upload: the client's stream backs up and must arrive
/// whole.
fn paused_backend_upload(mode: Moving) {
    let data = shared_payload(32 * MIB, 18);
    let (tx, reports) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let backend = Backend::start(move |mut stream| {
        let Ok(head) = read_exactly(&mut stream, FIRST.len() + MIB) else {
            return;
        };
        thread::sleep(PAUSE);
        if let Ok(rest) = read_to_end_hashed(&mut stream) {
            let _ = tx.lock().unwrap().send((head, rest));
        }
    });
    let proxy = Proxy::start(&prefix_routes("HELLO", &[backend.addr]), mode);
    let mut client = proxy.connect();
    client.write_all(FIRST).unwrap();
    proxy.wait_handed_off(1, WAIT);
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (head, rest) = reports
        .recv_timeout(WAIT)
        .expect("the backend reported within 10s");
    assert!(
        head == [FIRST, &data[..MIB]].concat(),
        "the first MiB arrived different"
    );
    assert_eq!(
        rest,
        ((31 * MIB) as u64, sha256(&data[MIB..])),
        "the stream after the backend's pause was cut or changed"
    );
    assert_eq!(read_to_end_hashed(&mut client).unwrap().0, 0);
    drop(client);
    finish(&proxy);
}

in_modes! { paused_client_download, |mode| paused_client_download(mode) }
in_modes! { paused_backend_upload, |mode| paused_backend_upload(mode) }

// ---------------------------------------------------------------------------------------
// 2-4. How the first message arrives.

/// A first message dribbled in one byte per write must still be routed on all of it
/// (a decoy route differs only in the last byte), then every later byte delivered.
fn first_message_split(mode: Moving) {
    const PREFIX: &[u8] = b"SPLIT-PREFIX-123";
    let (echo, decoy, fallback) = (Backend::echo(), Backend::echo(), Backend::echo());
    let routes = format!(
        "[[route]]\nname = \"decoy\"\nprefix = \"SPLIT-PREFIX-124\"\n{}\n\n\
         [[route]]\nname = \"split\"\nprefix = \"SPLIT-PREFIX-123\"\n{}\n\n\
         [[route]]\nname = \"fallback\"\ndefault = true\n{}\n",
        backends_toml(&[decoy.addr]),
        backends_toml(&[echo.addr]),
        backends_toml(&[fallback.addr]),
    );
    let proxy = Proxy::start(&routes, mode);
    let mut client = proxy.connect();
    client.set_nodelay(true).unwrap();
    for byte in PREFIX {
        client.write_all(&[*byte]).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(read_exactly(&mut client, PREFIX.len()).unwrap(), PREFIX);
    let data = shared_payload(MIB, 4);
    let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (MIB as u64, sha256(&data)));
    assert_eq!(
        (echo.accepted(), decoy.accepted(), fallback.accepted()),
        (1, 0, 0),
        "the split first message went to the wrong route"
    );
    drop(client);
    finish(&proxy);
}

/// A client that pipelines 1 MiB right behind its first message, in one write: the bytes
/// beyond what the proxy read for routing are queued at the hand-off and must all arrive.
fn pipelined_upload(mode: Moving) {
    let (sink, reports) = Backend::sink();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[sink.addr]), mode);
    let data = shared_payload(MIB, 5);
    let mut client = proxy.connect();
    client.write_all(&concat(&[FIRST, &data])).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let received = reports
        .recv_timeout(WAIT)
        .expect("the sink reported within 10s");
    assert_eq!(
        received,
        ((FIRST.len() + MIB) as u64, sha256_concat(&[FIRST, &data]))
    );
    assert_eq!(read_to_end_hashed(&mut client).unwrap().0, 0);
    drop(client);
    finish(&proxy);
}

/// The same pipelined write through an echo, so the reply streams while the rest of the
/// request is still queued.
fn pipelined_echo(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[echo.addr]), mode);
    let data = shared_payload(MIB, 6);
    let mut client = proxy.connect();
    let echoed = write_while_reading(&mut client, concat(&[FIRST, &data])).unwrap();
    assert_eq!(
        echoed,
        ((FIRST.len() + MIB) as u64, sha256_concat(&[FIRST, &data]))
    );
    drop(client);
    finish(&proxy);
}

/// A server-speaks-first protocol: the client sends nothing, the default route takes it
/// after first_message_timeout, the greeting arrives, and then an exchange works.
fn backend_speaks_first(mode: Moving) {
    const GREETING: &[u8] = b"220 splice-proxy test ESMTP\r\n";
    let greeter = Backend::greeter(GREETING);
    let proxy = Proxy::start(&default_routes("200ms", &[greeter.addr]), mode);
    let started = Instant::now();
    let mut client = proxy.connect();
    assert_eq!(read_exactly(&mut client, GREETING.len()).unwrap(), GREETING);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
        "the greeting came after {waited:?}, not after the 200ms first_message_timeout"
    );
    let data = shared_payload(64 * KIB, 7);
    let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (64 * KIB as u64, sha256(&data)));
    drop(client);
    finish(&proxy);
}

in_modes! { first_message_split, |mode| first_message_split(mode) }
in_modes! { pipelined_upload, |mode| pipelined_upload(mode) }
in_modes! { pipelined_echo, |mode| pipelined_echo(mode) }
in_modes! { backend_speaks_first, |mode| backend_speaks_first(mode) }

// ---------------------------------------------------------------------------------------
// 5. Half-closes with data in flight (docs/kernel.md, "The redirect is asynchronous").

/// The client sends 8 MiB and half-closes at once; the backend reads it all, then replies
/// with 8 MiB over the still-open direction. Neither stream may be truncated by the FIN.
fn client_half_closes_first(mode: Moving, timing: Timing) {
    let request = shared_payload(8 * MIB, 8);
    let reply = shared_payload(8 * MIB, 9);
    let (backend, reports) = Backend::reply_after_eof(Arc::clone(&reply));
    let proxy = Proxy::start(&prefix_routes("HELLO", &[backend.addr]), mode);
    let mut client = proxy.connect();
    match timing {
        AfterHandOff => {
            client.write_all(FIRST).unwrap();
            proxy.wait_handed_off(1, WAIT);
            client.write_all(&request).unwrap();
        }
        AllAtOnce => client.write_all(&concat(&[FIRST, &request])).unwrap(),
    }
    client.shutdown(Shutdown::Write).unwrap();
    let received = read_to_end_hashed(&mut client).unwrap();
    assert_eq!(
        received,
        (8 * MIB as u64, sha256(&reply)),
        "the reply after the client's half-close was cut or changed"
    );
    let request_received = reports
        .recv_timeout(WAIT)
        .expect("the backend reported within 10s");
    assert_eq!(
        request_received,
        (
            (FIRST.len() + 8 * MIB) as u64,
            sha256_concat(&[FIRST, &request])
        ),
        "the request before the client's FIN was cut or changed"
    );
    drop(client);
    finish(&proxy);
}

/// The backend sends 8 MiB and half-closes while the client is still sending: the client
/// sends its second 4 MiB only after it has read the backend's EOF.
fn backend_half_closes_first(mode: Moving) {
    let down = shared_payload(8 * MIB, 10);
    let up = shared_payload(8 * MIB, 11);
    let (backend, reports) = Backend::send_and_sink(Arc::clone(&down));
    let proxy = Proxy::start(&prefix_routes("HELLO", &[backend.addr]), mode);
    let mut client = proxy.connect();
    client.write_all(FIRST).unwrap();
    proxy.wait_handed_off(1, WAIT);

    let (saw_eof, wait_eof) = mpsc::channel::<()>();
    let mut writer = client.try_clone().unwrap();
    let sending = Arc::clone(&up);
    let writing = thread::spawn(move || -> io::Result<bool> {
        let (first_half, second_half) = sending.split_at(4 * MIB);
        writer.write_all(first_half)?;
        let after_eof = wait_eof.recv_timeout(WAIT).is_ok();
        writer.write_all(second_half)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(after_eof)
    });
    let received = read_to_end_hashed(&mut client);
    let _ = saw_eof.send(());
    let wrote_after_eof = writing.join().expect("writer thread panicked");
    assert_eq!(
        received.unwrap(),
        (8 * MIB as u64, sha256(&down)),
        "the backend's stream before its FIN was cut or changed"
    );
    assert!(
        wrote_after_eof.unwrap(),
        "the client did not see the backend's EOF"
    );
    let up_received = reports
        .recv_timeout(WAIT)
        .expect("the backend reported within 10s");
    assert_eq!(
        up_received,
        ((FIRST.len() + 8 * MIB) as u64, sha256_concat(&[FIRST, &up])),
        "the client's stream after the backend's half-close was cut or changed"
    );
    drop(client);
    finish(&proxy);
}

in_modes! {
    client_half_closes_first_after_hand_off,
    |mode| client_half_closes_first(mode, AfterHandOff)
}
in_modes! { client_half_closes_first_all_at_once, |mode| client_half_closes_first(mode, AllAtOnce) }
// Not `later`: the backend streams and half-closes while the client does not read yet,
// so the pair ends before it could be spliced, and is copied to its end.
in_modes! { backend_half_closes_first, |mode| backend_half_closes_first(mode); splice, copy }

// ---------------------------------------------------------------------------------------
// 6. Resets.

/// A reset (or, failing that, EOF) is an acceptable end of a read after an abort; a
/// timeout or anything else is not.
fn assert_ended_by_reset_or_eof(result: &io::Result<(u64, [u8; 32])>, who: &str) {
    if let Err(e) = result {
        assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "{who}'s read ended with {e} instead of a reset or EOF"
        );
    }
}

/// A client that aborts mid-stream: the backend's read must end promptly and the proxy
/// must free the pair and its map entries.
fn client_resets(mode: Moving) {
    let (backend, outcomes) = Backend::sink_outcome();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[backend.addr]), mode);
    let mut client = proxy.connect();
    client.write_all(FIRST).unwrap();
    proxy.wait_handed_off(1, WAIT);
    client.write_all(&shared_payload(MIB, 12)).unwrap();
    close_with_reset(client);
    let reset_at = Instant::now();
    let (result, ended_at) = outcomes
        .recv_timeout(PROMPT)
        .expect("the backend's read did not end within 5s of the client's reset");
    assert_ended_by_reset_or_eof(&result, "the backend");
    assert!(ended_at.saturating_duration_since(reset_at) < PROMPT);
    proxy.wait_idle(WAIT);
}

/// A backend that aborts mid-stream: the client's read must end promptly.
fn backend_resets(mode: Moving) {
    let backend = Backend::start(|mut stream| {
        if read_exactly(&mut stream, FIRST.len()).is_ok() {
            let _ = stream.write_all(&shared_payload(MIB, 13));
            close_with_reset(stream);
        }
    });
    let proxy = Proxy::start(&prefix_routes("HELLO", &[backend.addr]), mode);
    let mut client = proxy.connect();
    client.set_read_timeout(Some(PROMPT)).unwrap();
    client.write_all(FIRST).unwrap();
    let started = Instant::now();
    let result = read_to_end_hashed(&mut client);
    assert_ended_by_reset_or_eof(&result, "the client");
    assert!(started.elapsed() < PROMPT);
    if let Ok((len, _)) = result {
        assert!(
            len <= MIB as u64,
            "the client read {len} bytes of a 1 MiB stream"
        );
    }
    drop(client);
    proxy.wait_idle(WAIT);
}

in_modes! { client_resets, |mode| client_resets(mode) }
in_modes! { backend_resets, |mode| backend_resets(mode) }

// ---------------------------------------------------------------------------------------
// 7. Refused backends.

/// A backend that refuses is skipped for the route's next one, whichever the round-robin
/// starts at, and the connection works end to end.
fn refused_backend_then_next(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[refused_addr(), echo.addr]), mode);
    for seed in 0..2 {
        let mut client = proxy.connect();
        client.write_all(FIRST).unwrap();
        assert_eq!(read_exactly(&mut client, FIRST.len()).unwrap(), FIRST);
        let data = shared_payload(64 * KIB, 14 + seed);
        let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
        assert_eq!(echoed, (64 * KIB as u64, sha256(&data)));
    }
    assert_eq!(echo.accepted(), 2);
    finish(&proxy);
}

/// A route whose only backend refuses: the client is closed cleanly, not left hanging.
fn refused_backend_only(mode: Moving) {
    let proxy = Proxy::start(&prefix_routes("HELLO", &[refused_addr()]), mode);
    let mut client = proxy.connect();
    client.set_read_timeout(Some(PROMPT)).unwrap();
    client.write_all(FIRST).unwrap();
    let started = Instant::now();
    let result = read_to_end_hashed(&mut client);
    assert_eq!(
        result.map(|(len, _)| len).map_err(|e| e.kind()),
        Ok(0),
        "the client of a route without a working backend was not closed cleanly"
    );
    assert!(started.elapsed() < PROMPT);
    finish(&proxy);
}

in_modes! { refused_backend_then_next, |mode| refused_backend_then_next(mode) }
in_modes! { refused_backend_only, |mode| refused_backend_only(mode) }

// ---------------------------------------------------------------------------------------
// 8. Many connections: nothing may leak.

/// One small echo exchange: the first message and 1 KiB, half-close, read it all back.
fn echo_request(seed: u64) -> Vec<u8> {
    [FIRST, &payload(KIB, seed)].concat()
}

/// The open fds once the proxy is up: its workers take their listeners on their own
/// threads after `Proxy::start` returns, so the count is taken after an exchange and
/// once it has not changed for 100ms (bounded).
fn fds_when_settled(proxy: &Proxy) -> Vec<(i32, String)> {
    let request = echo_request(u64::MAX);
    let mut client = proxy.connect();
    client.write_all(&request).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let echoed = read_to_end_hashed(&mut client).unwrap();
    assert_eq!(echoed, (request.len() as u64, sha256(&request)), "warm-up");
    drop(client);
    finish(proxy);
    settled_fds(Duration::from_millis(100), PROMPT)
}

/// 1,000 connections one after another, each hash-checked; afterwards no connection, map
/// entry or fd is left.
fn sequential_connections(mode: Moving) {
    const COUNT: u64 = 1_000;
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[echo.addr]), mode);
    let fds_before = fds_when_settled(&proxy);
    let deadline = Instant::now() + Duration::from_secs(60);
    for seed in 0..COUNT {
        assert!(Instant::now() < deadline, "only {seed} connections in 60s");
        let request = echo_request(seed);
        let mut client = proxy.connect();
        client.write_all(&request).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let echoed = read_to_end_hashed(&mut client).unwrap();
        assert_eq!(
            echoed,
            (request.len() as u64, sha256(&request)),
            "connection {seed}"
        );
    }
    finish(&proxy);
    wait_fds_back(&fds_before, WAIT);
}

/// 200 connections open at the same time (all handed off, and when splicing all in the
/// maps), then each exchange checked; afterwards nothing is left.
fn concurrent_connections(mode: Moving) {
    const COUNT: u64 = 200;
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[echo.addr]), mode);
    let fds_before = fds_when_settled(&proxy);
    let clients: Vec<(TcpStream, Vec<u8>)> = (0..COUNT)
        .map(|seed| {
            let request = echo_request(seed);
            let mut client = proxy.connect();
            client.write_all(&request).unwrap();
            (client, request)
        })
        .collect();
    proxy.wait_handed_off(COUNT as usize, WAIT);
    for (client, _) in &clients {
        client.shutdown(Shutdown::Write).unwrap();
    }
    for (seed, (mut client, request)) in clients.into_iter().enumerate() {
        let echoed = read_to_end_hashed(&mut client).unwrap();
        assert_eq!(
            echoed,
            (request.len() as u64, sha256(&request)),
            "connection {seed}"
        );
    }
    finish(&proxy);
    wait_fds_back(&fds_before, WAIT);
}

in_modes! { alone sequential_connections, |mode| sequential_connections(mode); splice }
in_modes! { alone concurrent_connections, |mode| concurrent_connections(mode); splice, copy }

// ---------------------------------------------------------------------------------------
// 9. The spliced path carried the bytes.

/// After the hand-off, 16 MiB each way through an echo: when splicing the probe redirected
/// them all and the proxy's threads read (almost) nothing; when copying they read them
/// all, which shows that the measurement sees reads.
fn bytes_bypass_userspace(mode: Moving) {
    let echo = Backend::echo();
    let proxy = Proxy::start(&prefix_routes("HELLO", &[echo.addr]), mode);
    let mut client = proxy.connect();
    client.write_all(FIRST).unwrap();
    assert_eq!(read_exactly(&mut client, FIRST.len()).unwrap(), FIRST);
    proxy.wait_handed_off(1, WAIT);

    let redirected_before = proxy.redirected_bytes();
    let read_before = proxy_threads_read_bytes();
    let data = shared_payload(16 * MIB, 16);
    let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (16 * MIB as u64, sha256(&data)));
    let redirected = proxy.redirected_bytes() - redirected_before;
    let read = proxy_threads_read_bytes() - read_before;

    if proxy.is_splicing() {
        assert!(
            redirected >= 2 * 16 * MIB as u64,
            "the probe redirected {redirected} bytes, expected at least 32 MiB"
        );
        assert!(
            read < 64 * KIB as u64,
            "the proxy threads read {read} bytes while splicing 32 MiB"
        );
    } else {
        assert!(
            read >= 16 * MIB as u64,
            "copying 32 MiB, the proxy threads read only {read} bytes: the measurement is blind"
        );
    }
    drop(client);
    finish(&proxy);
}

in_modes! { alone bytes_bypass_userspace, |mode| bytes_bypass_userspace(mode) }

// ---------------------------------------------------------------------------------------
// 10. Bytes queued before the insert (docs/kernel.md).

/// The first message and a 100-byte request in one write, and a backend that answers
/// only a whole request: whatever of the request is queued at the hand-off must still be
/// delivered, or the client waits forever. With first_message_max = 16 the proxy routes
/// on 16 bytes and 89 are certainly left queued.
fn request_queued_at_hand_off(mode: Moving, first_message_max: Option<usize>) {
    const REQUEST: usize = 100;
    const REPLY: &[u8] = b"REPLY";
    let backend = Backend::request_reply(FIRST.len() + REQUEST, REPLY);
    let mut routes = prefix_routes("HELLO", &[backend.addr]);
    if let Some(max) = first_message_max {
        routes = format!("first_message_max = {max}\n\n{routes}");
    }
    let proxy = Proxy::start(&routes, mode);
    for seed in 0..10 {
        let mut client = proxy.connect();
        client.set_read_timeout(Some(PROMPT)).unwrap();
        client
            .write_all(&[FIRST, &payload(REQUEST, seed)].concat())
            .unwrap();
        let reply = read_exactly(&mut client, REPLY.len());
        assert_eq!(
            reply.map_err(|e| e.kind()),
            Ok(REPLY.to_vec()),
            "connection {seed}: no reply within 5s, the queued request was not delivered"
        );
    }
    finish(&proxy);
}

/// The upstream side of "Bytes queued before the insert" (docs/kernel.md): a backend that
/// greets as soon as it accepts, then reads a 1 MiB first message and sends nothing more
/// until asked. The proxy's write of that message only finishes once the backend reads it
/// (the backend's small MSS keeps the proxy's send buffer far below 1 MiB, as on a real
/// network, where loopback's 64 KiB segments would let one send take it all), so the
/// greeting is certainly queued on the upstream socket before the hand-off, and no later
/// byte from the backend would make the kernel look at it: the client must still get it.
fn greeting_queued_at_hand_off(mode: Moving) {
    const GREETING: &[u8] = b"220 ready\r\n";
    let (tx, reports) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a backend socket");
    // The MSS the backend's SYN-ACK announces, and so the proxy's segments.
    listener.set_tcp_mss(1000).expect("TCP_MAXSEG");
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind backend");
    listener.listen(16).expect("listen");
    let backend = Backend::start_on(listener.into(), move |mut stream| {
        if stream.write_all(GREETING).is_err() {
            return;
        }
        let Ok(first) = read_exactly(&mut stream, MIB) else {
            return;
        };
        let _ = tx.lock().unwrap().send(sha256(&first));
        let mut reader = stream.try_clone().unwrap();
        let _ = io::copy(&mut reader, &mut stream);
    });
    let routes = format!(
        "first_message_max = {MIB}\n\n[[route]]\nname = \"big\"\nmin_length = {MIB}\n{}\n",
        backends_toml(&[backend.addr])
    );
    let proxy = Proxy::start(&routes, mode);
    let first = shared_payload(MIB, 19);
    let mut client = proxy.connect();
    client.set_read_timeout(Some(PROMPT)).unwrap();
    client.write_all(&first).unwrap();
    let greeting = read_exactly(&mut client, GREETING.len());
    assert_eq!(
        greeting.map_err(|e| e.kind()),
        Ok(GREETING.to_vec()),
        "no greeting within 5s: the bytes queued before the insert were not delivered"
    );
    let first_received = reports
        .recv_timeout(WAIT)
        .expect("the backend reported within 10s");
    assert!(
        first_received == sha256(&first),
        "the 1 MiB first message arrived different"
    );
    let data = shared_payload(64 * KIB, 20);
    let echoed = write_while_reading(&mut client, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (64 * KIB as u64, sha256(&data)));
    drop(client);
    finish(&proxy);
}

in_modes! { request_queued_at_hand_off, |mode| request_queued_at_hand_off(mode, None) }
in_modes! {
    request_queued_at_hand_off_small_first_message,
    |mode| request_queued_at_hand_off(mode, Some(16))
}
in_modes! { greeting_queued_at_hand_off, |mode| greeting_queued_at_hand_off(mode) }

// ---------------------------------------------------------------------------------------
// 11. Copied first, spliced once long (`--splice-after`).

/// A connection that ends before its time is up is copied to its end and never enters
/// the maps; one still open after it is spliced, and from then on its bytes take the
/// kernel's path. The time is a second, not `LATER_AFTER`: an emulated guest under load
/// can take longer than 20 ms to echo five bytes, and the short exchange must be short.
#[test]
fn a_short_exchange_is_copied_and_a_long_one_spliced() {
    const SPLICE_AFTER: Duration = Duration::from_secs(1);
    let _lock = shared();
    let echo = Backend::echo();
    let proxy = Proxy::start_splicing_after(&prefix_routes("HELLO", &[echo.addr]), SPLICE_AFTER);

    let mut short = proxy.connect();
    short.write_all(FIRST).unwrap();
    assert_eq!(read_exactly(&mut short, FIRST.len()).unwrap(), FIRST);
    drop(short);
    proxy.wait_idle(WAIT);
    assert_eq!(
        (proxy.spliced_later(), proxy.redirected_bytes()),
        (0, 0),
        "a connection that closed within {SPLICE_AFTER:?} was spliced"
    );

    let mut long = proxy.connect();
    long.write_all(FIRST).unwrap();
    assert_eq!(read_exactly(&mut long, FIRST.len()).unwrap(), FIRST);
    proxy.wait_handed_off(1, WAIT);
    proxy.wait_spliced_later(1, WAIT);
    let data = shared_payload(MIB, 21);
    let echoed = write_while_reading(&mut long, Arc::clone(&data)).unwrap();
    assert_eq!(echoed, (MIB as u64, sha256(&data)));
    assert!(
        proxy.redirected_bytes() >= 2 * MIB as u64,
        "after the switch the probe redirected only {} bytes of 2 MiB",
        proxy.redirected_bytes()
    );
    drop(long);
    finish(&proxy);
}

/// A connection that streams is spliced long before its time is up: an upload through
/// a proxy that would otherwise copy for 10 s takes the kernel's path while it streams,
/// the bytes after the switch go through the probe, and every byte arrives once, in
/// order. The client writes 16 MiB pieces until the proxy counts the switch, then one
/// more, at least half of which the verdict must see: a fixed length would race the
/// switch (at full speed on loopback, 64 MiB was sometimes all copied before an attempt
/// could drain the sockets, and the attempt ended with the upload).
fn stream_is_spliced_early(timing: Timing) {
    /// Bounds the upload: 1 GiB.
    const PIECES_MAX: usize = 64;
    let (sink, reports) = Backend::sink();
    let proxy = Proxy::start_splicing_after(
        &prefix_routes("HELLO", &[sink.addr]),
        Duration::from_secs(10),
    );
    let piece = shared_payload(16 * MIB, 22);
    let mut client = proxy.connect();
    let started = Instant::now();
    match timing {
        AfterHandOff => {
            client.write_all(FIRST).unwrap();
            client.write_all(&piece).unwrap();
        }
        AllAtOnce => client.write_all(&concat(&[FIRST, &piece])).unwrap(),
    }
    let mut pieces = 1;
    while proxy.spliced_later() == 0 {
        assert!(
            pieces < PIECES_MAX && started.elapsed() < WAIT,
            "not spliced after {pieces} pieces of 16 MiB in {:?}",
            started.elapsed()
        );
        client.write_all(&piece).unwrap();
        pieces += 1;
    }
    // Bytes the verdict saw: redirected, or parked for want of credit (which the engine
    // then copies: under load the sink may fall behind for a moment).
    let through_probe = || {
        let counters = proxy.counters();
        counters.redirected_bytes + counters.parked_bytes
    };
    let at_switch = through_probe();
    let redirected_at_switch = proxy.redirected_bytes();
    client.write_all(&piece).unwrap();
    pieces += 1;
    client.shutdown(Shutdown::Write).unwrap();
    let mut sent: Vec<&[u8]> = vec![FIRST];
    sent.extend(std::iter::repeat_n(&piece[..], pieces));
    let received = reports
        .recv_timeout(WAIT)
        .expect("the sink reported within 10s");
    assert_eq!(
        received,
        (
            sent.iter().map(|part| part.len() as u64).sum(),
            sha256_concat(&sent)
        ),
        "the backend received other bytes than the client sent"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let after_switch = through_probe() - at_switch;
    assert!(
        after_switch >= 8 * MIB as u64,
        "the probe saw only {after_switch} of the 16 MiB written after the switch"
    );
    // And the kernel carried part of it to the backend itself (7.4 MiB in the run whose
    // sink fell behind).
    let redirected = proxy.redirected_bytes() - redirected_at_switch;
    assert!(
        redirected >= MIB as u64,
        "the probe redirected only {redirected} bytes after the switch"
    );
    drop(client);
    finish(&proxy);
}

#[test]
fn a_stream_is_spliced_early() {
    let _lock = shared();
    stream_is_spliced_early(AfterHandOff);
}

#[test]
fn a_stream_in_the_first_write_is_spliced_early() {
    let _lock = shared();
    stream_is_spliced_early(AllAtOnce);
}

/// A download whose client is not reading when the pair's time comes cannot drain into
/// the client's socket, so no attempt to splice it can join: each is given up after
/// 20 ms in which nothing moved and tried again after a doubling delay, and the pair is
/// copied on meanwhile.
/// Once the client reads, a later attempt splices it, and every byte arrives once, in
/// order. Until then the backend trickles its reply, 8 KiB every 2 ms: no read of the
/// copy may fill its 64 KiB buffer while the client's socket and the proxy's send
/// buffer (at most `tcp_wmem`'s 4 MiB) still have room, since such a read starts an
/// attempt at once, which then joins; at 16 KiB a millisecond a worker 4 ms late (which
/// an emulated 6.1 guest once was) did that. The trickle fills them in about 0.9 s
/// (3.5 MB queued in the proxy's 4 MiB send buffer, seen with `ss`), before the pair's
/// time at 1.5 s. Once the client reads, the backend goes on at 8 KiB every 0.5 ms: the
/// pauses let an attempt find the backend's socket drained (written flat out, an
/// emulated guest's attempts never joined, and the download was copied whole). Here
/// one attempt was given up, and the next, once the client read, joined.
#[test]
fn a_switch_waits_for_a_client_that_stopped_reading() {
    const PIECE: usize = 8 << 10;
    const STOPPED: Duration = Duration::from_millis(2000);
    let _lock = shared();
    let data = shared_payload(16 * MIB, 23);
    let reply = Arc::clone(&data);
    let reading = Arc::new(AtomicBool::new(false));
    let client_reads = Arc::clone(&reading);
    let backend = Backend::start(move |mut stream| {
        if read_exactly(&mut stream, FIRST.len()).is_err() {
            return;
        }
        for piece in reply.chunks(PIECE) {
            if stream.write_all(piece).is_err() {
                return;
            }
            let pause = if client_reads.load(Ordering::SeqCst) {
                Duration::from_micros(500)
            } else {
                Duration::from_millis(2)
            };
            thread::sleep(pause);
        }
    });
    let proxy = Proxy::start_splicing_after(
        &prefix_routes("HELLO", &[backend.addr]),
        Duration::from_millis(1500),
    );
    // A small receive buffer keeps the client's socket, and the proxy's send buffer
    // that its window holds back, from absorbing the trickle before the time comes.
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    client.set_recv_buffer_size(8 << 10).unwrap();
    client.connect(&proxy.addr.into()).unwrap();
    let mut client = TcpStream::from(client);
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(FIRST).unwrap();
    thread::sleep(STOPPED);
    reading.store(true, Ordering::SeqCst);
    let received = read_exactly(&mut client, data.len()).unwrap();
    assert!(received == *data, "the download arrived changed");
    proxy.wait_spliced_later(1, WAIT);
    assert!(
        proxy.redirected_bytes() > 0,
        "spliced, yet the probe redirected none of the download"
    );
    assert!(
        proxy.switches_given_up() > 0,
        "no attempt was given up while the client did not read"
    );
    drop(client);
    finish(&proxy);
}
