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
    thread,
    time::Duration,
};

use clap::Parser;
use splice_proxy::{
    Limits, Proxy,
    route::{Decision, FirstMessage, Forward},
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
    // The library logs through tracing: its warnings (why it copies, say) go to stderr.
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();
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
            backends: vec![backend.into()],
            send_proxy: None,
        })
    };

    // Splices if the probe loads (as root), else copies and warns why.
    let proxy = Proxy::builder(router)
        .listen(args.listen)
        .workers(1)
        .map_capacity(1 << 12)
        .limits(Limits {
            first_message_timeout: Duration::from_secs(1),
            ..Limits::default()
        })
        .start()?;
    let mode = if proxy.is_splicing() {
        "splice"
    } else {
        "copy"
    };
    let addr = proxy.local_addr();
    println!("embed: proxy listening on {addr} ({mode} mode); web {web}, other {other}");

    let mut as_expected = true;
    for (first, route) in [
        (&b"GET /index.html\n"[..], "web"),
        (b"HELLO there\n", "other"),
    ] {
        let outcome = match exchange(addr, first, 1 << 20) {
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

    let moved = proxy
        .engine()
        .probe()
        .map_or(Ok(0), |p| p.counters().map(|c| c.redirected_bytes))?;
    println!("embed: the kernel redirected {moved} bytes");
    println!(
        "embed: {}",
        if as_expected {
            "all as expected"
        } else {
            "NOT as expected"
        }
    );

    if args.serve {
        println!("embed: serving on {addr} until stopped");
        // The proxy serves on threads of its own: this one has nothing left to do.
        loop {
            thread::park();
        }
    }
    // The exchanges are over, and the engine closes a connection once both sides are
    // done: this returns when it has closed the last.
    proxy.shutdown(Duration::from_secs(5));
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
