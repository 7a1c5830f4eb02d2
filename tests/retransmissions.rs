//! Retransmissions through a spliced pair. TCP queues a retransmitted segment that starts
//! before the bytes it has already received, and ends after them, whole; in verdict-only
//! mode the kernel hands the verdict that whole skb (docs/kernel.md, "Retransmissions in
//! verdict-only mode"), and before the probe cut the overlap it reached the peer twice.
//! Each test runs on a lossy loopback of its own (`on_a_lossy_loopback`), where such
//! segments are common, moves positional streams both ways at once, and checks every
//! byte where it lands.

mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Barrier},
    thread,
};

use support::*;

/// Bytes per stream and direction.
const STREAM: u64 = 16 << 20;

/// Connections at once.
const CONNECTIONS: usize = 4;

/// The byte at `offset` of a stream whose every 8-byte word is its own word index
/// (xored with the stream's seed): a reader that finds a wrong byte can tell where the
/// bytes it got came from.
fn positional(seed: u64, offset: u64) -> u8 {
    ((offset / 8) ^ seed).to_le_bytes()[(offset % 8) as usize]
}

fn send(mut to: TcpStream, seed: u64) {
    to.set_nodelay(true).unwrap();
    // A stream that stops moving fails the test instead of hanging it.
    to.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    // Small writes without Nagle make small segments, which a retransmission merges.
    let mut chunk = vec![0u8; 1000];
    let mut sent = 0u64;
    while sent < STREAM {
        let n = (chunk.len() as u64).min(STREAM - sent) as usize;
        for (i, byte) in chunk[..n].iter_mut().enumerate() {
            *byte = positional(seed, sent + i as u64);
        }
        to.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    to.shutdown(Shutdown::Write).unwrap();
}

/// Reads to the end, checking each byte in place: the length, or where the first wrong
/// byte was and which word it came from.
fn receive(mut from: TcpStream, seed: u64) -> Result<u64, String> {
    from.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buffer = vec![0u8; 256 << 10];
    let mut at = 0u64;
    loop {
        let n = from.read(&mut buffer).unwrap();
        if n == 0 {
            return Ok(at);
        }
        for (i, &byte) in buffer[..n].iter().enumerate() {
            if byte != positional(seed, at + i as u64) {
                let word = buffer
                    .get(i..i + 8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()) ^ seed);
                return Err(format!("byte {} carried word {word:?}", at + i as u64));
            }
        }
        at += n as u64;
    }
}

fn streams_arrive_in_place(moving: Moving) {
    on_a_lossy_loopback(move || streams_arrive_in_place_here(moving));
}

fn streams_arrive_in_place_here(moving: Moving) {
    const FIRST: &[u8] = b"hello\n";
    // The client's first message carries its seed; the backend answers with the seed's
    // complement, so each end can check what the other sent.
    let backend = Backend::start(move |mut stream| {
        let mut first = [0u8; FIRST.len() + 8];
        stream.read_exact(&mut first).unwrap();
        let seed = u64::from_le_bytes(first[FIRST.len()..].try_into().unwrap());
        let out = stream.try_clone().unwrap();
        let sender = thread::spawn(move || send(out, !seed));
        let got = receive(stream, seed);
        sender.join().unwrap();
        assert_eq!(got, Ok(STREAM), "client to backend");
    });
    let proxy = Proxy::start(
        &format!(
            "[[route]]\nname = \"hello\"\nprefix = \"hello\"\nbackends = [\"{}\"]\n",
            backend.addr
        ),
        moving,
    );
    // The clients stream only once every pair is in the kernel's maps: bytes that arrive
    // during the hand-off are copied, and the test is about the spliced path.
    let go = Arc::new(Barrier::new(CONNECTIONS + 1));
    let clients: Vec<_> = (0..CONNECTIONS as u64)
        .map(|i| {
            let mut client = proxy.connect();
            let go = go.clone();
            thread::spawn(move || {
                let seed = 0xc1c1 + i;
                let mut first = FIRST.to_vec();
                first.extend_from_slice(&seed.to_le_bytes());
                client.write_all(&first).unwrap();
                go.wait();
                let out = client.try_clone().unwrap();
                let sender = thread::spawn(move || send(out, seed));
                let got = receive(client, !seed);
                sender.join().unwrap();
                got
            })
        })
        .collect();
    proxy.wait_handed_off(CONNECTIONS, IO_TIMEOUT);
    go.wait();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let counters = proxy.probe().map(|p| p.counters().unwrap());
    eprintln!("{moving:?}: probe counters {counters:?}");
    for (i, got) in results.into_iter().enumerate() {
        assert_eq!(got, Ok(STREAM), "backend to client {i}; {counters:?}");
    }
    if let Some(counters) = counters {
        assert_eq!(counters.resent_bytes_passed, 0, "{counters:?}");
        assert_eq!(counters.unsequenced_messages, 0, "{counters:?}");
        if moving == SPLICE {
            // Else the loopback did not lose what the test needs, and proves nothing.
            assert!(counters.resent_bytes_cut > 0, "{counters:?}");
        }
    }
    proxy.wait_idle(IO_TIMEOUT);
}

#[test]
fn streams_arrive_in_place_when_spliced() {
    streams_arrive_in_place(SPLICE);
}

#[test]
fn streams_arrive_in_place_when_copied() {
    streams_arrive_in_place(COPY);
}
