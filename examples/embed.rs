//! The library inside another program, which routes with a function of its own instead
//! of a routes file.
//!
//! The program starts its two backends on ports the system picks, so its routes only
//! exist at run time, and hands the library a closure (`route::Router` is implemented
//! for every `Fn(&FirstMessage) -> Decision`): a first message that starts with "GET "
//! goes to the "web" backend, anything else to the "other" one. The library's workers
//! run on threads of their own, so the program's threads
//! stay its own: here they are the backends, and clients that send a megabyte through
//! each route and check the echo.
//!
//! ```text
//! cargo run --release --example embed                     # as root, to splice
//! cargo run --release --example embed -- --serve --listen 127.0.0.1:10000
//! ```

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use splice_proxy::{
    probe::{Backlog, Probe},
    route::{Decision, FirstMessage, Forward},
    server::{Limits, Listeners, Server},
    splice::SpliceEngine,
};

/// Routes "GET " to one backend and the rest to another, with a closure.
#[derive(Parser)]
struct Args {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// After the demo, keep the proxy and the backends running.
    #[arg(long)]
    serve: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let web = start_named_echo("web")?;
    let other = start_named_echo("other")?;

    let router = move |first: &FirstMessage<'_>| {
        // Until 4 bytes are in, a message that could still become "GET " waits for more.
        if !first.complete && first.bytes.len() < 4 && b"GET ".starts_with(first.bytes) {
            return Decision::NeedMore;
        }
        let (route, backend) = if first.bytes.starts_with(b"GET ") {
            ("web", web)
        } else {
            ("other", other)
        };
        Decision::Forward(Forward {
            route: route.into(),
            backends: vec![backend],
            send_proxy: None,
        })
    };

    let probe = match Probe::load(1 << 12, Backlog::default()) {
        Ok(probe) => Some(Arc::new(probe)),
        Err(e) => {
            println!("embed: the probe could not be loaded, so bytes are copied: {e}");
            None
        }
    };
    let engine = Arc::new(SpliceEngine::new(probe.clone(), 1)?);
    let limits = Limits {
        first_message_timeout: Duration::from_secs(1),
        first_message_max: 4096,
        connect_timeout: Duration::from_secs(1),
        max_connections: None,
        idle_timeout: None,
        route_max_connections: Default::default(),
    };
    let listeners = Listeners::bind(args.listen, 1)?;
    let server = Server::start(listeners, Arc::new(router), limits, Arc::clone(&engine))?;
    let proxy = server.local_addr();
    let mode = if probe.is_some() { "splice" } else { "copy" };
    println!("embed: proxy listening on {proxy} ({mode} mode); web {web}, other {other}");

    let mut as_expected = true;
    for (first, route) in [
        (&b"GET /index.html\n"[..], "web"),
        (b"HELLO there\n", "other"),
    ] {
        let outcome = match exchange(proxy, first, 1 << 20) {
            Ok((backend, intact)) => {
                as_expected &= intact && backend == route;
                let echo = if intact { "intact" } else { "CORRUPTED" };
                format!("answered by backend {backend}, 1 MiB echo {echo}")
            }
            Err(e) => {
                as_expected = false;
                format!("failed: {e}")
            }
        };
        println!("\"{}\" -> {outcome}", first.escape_ascii());
    }

    // The engine closes both sockets of a connection once both sides are done.
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.live() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let moved = probe.map_or(Ok(0), |p| p.counters().map(|c| c.redirected_bytes))?;
    println!(
        "embed: {} connections still live; the kernel redirected {moved} bytes",
        engine.live()
    );
    println!(
        "embed: {}",
        if as_expected {
            "all as expected"
        } else {
            "NOT as expected"
        }
    );

    if args.serve {
        println!("embed: serving on {proxy} until stopped");
        server.join();
    }
    Ok(if as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A backend on 127.0.0.1 at a port the system picks: it answers each connection with
/// "backend NAME\n", then echoes until the client's FIN.
fn start_named_echo(name: &'static str) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || -> io::Result<()> {
                (&stream).write_all(format!("backend {name}\n").as_bytes())?;
                io::copy(&mut &stream, &mut &stream)?;
                stream.shutdown(Shutdown::Write)
            });
        }
    });
    Ok(addr)
}

/// Sends `first`, and once the backend has answered (so the connection is spliced) `more`
/// bytes, then half-closes and reads the reply to its end; returns the backend that
/// answered and whether it echoed every byte.
fn exchange(proxy: SocketAddr, first: &[u8], more: usize) -> io::Result<(String, bool)> {
    let stream = TcpStream::connect(proxy)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(first)?;
    let mut reader = BufReader::new(&stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let Some(backend) = header.strip_prefix("backend ") else {
        return Err(io::Error::other(format!("unexpected reply {header:?}")));
    };
    // Written from another thread while this one reads, so neither side's buffers fill.
    let rest: Vec<u8> = (0..more).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let (stream, rest) = (stream.try_clone()?, rest.clone());
        thread::spawn(move || {
            (&stream).write_all(&rest)?;
            stream.shutdown(Shutdown::Write)
        })
    };
    let mut echo = Vec::new();
    reader.read_to_end(&mut echo)?;
    writer.join().expect("writer thread")?;
    let intact = echo.len() == first.len() + rest.len()
        && echo[..first.len()] == *first
        && echo[first.len()..] == rest[..];
    Ok((backend.trim_end().to_owned(), intact))
}
