//! Routing on a tag at a byte offset. The clients of this (made-up) multiplexed protocol
//! open with a message of 290 to 294 bytes that carries a three-digit tag at byte offset
//! 20, and the tag picks the backend: examples/mplex-routes.toml says so in three routes,
//! "600", "601" and "602". Anything else is closed without a reply.
//!
//! The demo runs everything in one process:
//! 1. a tagged echo backend on each backend address of the routes file: it answers every
//!    connection with "backend ADDR\n", then echoes every byte;
//! 2. the proxy, built from the library as the `splice-proxy` command builds it;
//! 3. one client per case below, all at once; each prints who answered it.
//!
//! ```text
//! cargo run --release --example mplex                    # as root, to splice
//! cargo run --release --example mplex -- --serve         # then keep serving:
//! printf '%020d600%269d' 0 0 | nc 127.0.0.1 10000         # 292 bytes, tag 600
//! ```
//!
//! A message shorter than 290 bytes is only closed once `first_message_timeout` has
//! passed: until then more bytes could still make it valid.

use std::{
    collections::BTreeSet,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use splice_proxy::{Proxy, config::Config};

/// Routes on a tag at byte offset 20 (see examples/mplex-routes.toml).
#[derive(Parser)]
struct Args {
    /// The routes file; a tagged echo backend is started on each of its backends.
    #[arg(long, value_name = "FILE", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mplex-routes.toml"))]
    routes: PathBuf,
    /// Where the proxy accepts clients.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10000")]
    listen: SocketAddr,
    /// After the demo, keep the proxy and the backends running.
    #[arg(long)]
    serve: bool,
}

/// What the demo sends: a label, the message length and the tag at offset 20.
const CASES: [(&str, usize, &[u8; 3]); 6] = [
    ("shortest", 290, b"600"),
    ("middle", 292, b"601"),
    ("longest", 294, b"602"),
    ("too short", 289, b"600"),
    ("too long", 295, b"601"),
    ("unknown tag", 292, b"603"),
];

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(splice_proxy::logging::colors_wanted(&io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let config = Config::load(&args.routes)?;
    let backends: BTreeSet<SocketAddr> = config
        .routes
        .iter()
        .flat_map(|route| route.backends.iter().map(|backend| backend.addr))
        .collect();
    for &backend in &backends {
        start_tagged_echo(backend)?;
    }

    // Read before the proxy takes the file's routes.
    let read_limit = config.first_message_timeout + Duration::from_secs(5);
    // Splices if the probe loads (as root), else copies, and logs why.
    let running = Proxy::from_config(config)
        .listen(args.listen)
        .workers(2)
        .map_capacity(1 << 12)
        .start()?;
    let proxy = running.local_addr();
    let mode = if running.is_splicing() {
        "splice"
    } else {
        "copy"
    };
    println!("mplex: proxy listening on {proxy} ({mode} mode), backends {backends:?}");

    // Every case at once: the short message waits for first_message_timeout.
    let clients: Vec<_> = CASES
        .iter()
        .map(|&(label, len, tag)| {
            thread::spawn(move || {
                (
                    label,
                    len,
                    tag,
                    exchange(proxy, &message(len, tag), read_limit),
                )
            })
        })
        .collect();
    let mut as_expected = true;
    for client in clients {
        let (label, len, tag, outcome) = client.join().expect("client thread");
        let valid = (290..=294).contains(&len) && [b"600", b"601", b"602"].contains(&tag);
        let outcome = match outcome {
            Ok(Reply::Answered { backend, intact }) => {
                as_expected &= valid && intact;
                let echo = if intact { "intact" } else { "CORRUPTED" };
                format!("answered by backend {backend}, echo {echo}")
            }
            Ok(Reply::Closed { after }) => {
                as_expected &= !valid;
                format!("closed without a reply after {:.1}s", after.as_secs_f64())
            }
            Err(e) => {
                as_expected = false;
                format!("failed: {e}")
            }
        };
        println!(
            "{label:<11} ({len} bytes, tag {}): {outcome}",
            tag.escape_ascii()
        );
    }
    println!(
        "mplex: {}",
        if as_expected {
            "all as expected"
        } else {
            "NOT as expected"
        }
    );

    if args.serve {
        println!("mplex: serving on {proxy} until stopped");
        // The proxy serves on threads of its own: this one has nothing left to do.
        loop {
            thread::park();
        }
    }
    // Every client has its answer; this returns once the engine has closed the last.
    running.shutdown(Duration::from_secs(5));
    Ok(if as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A first message of `len` bytes with `tag` at offset 20 (when it fits).
fn message(len: usize, tag: &[u8; 3]) -> Vec<u8> {
    let mut message: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    if let Some(window) = message.get_mut(20..23) {
        window.copy_from_slice(tag);
    }
    message
}

/// Answers each connection with "backend ADDR\n", then echoes until the client's FIN.
fn start_tagged_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("backend {addr}"))?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || -> io::Result<()> {
                (&stream).write_all(format!("backend {addr}\n").as_bytes())?;
                io::copy(&mut &stream, &mut &stream)?;
                stream.shutdown(Shutdown::Write)
            });
        }
    });
    Ok(())
}

enum Reply {
    Answered { backend: String, intact: bool },
    Closed { after: Duration },
}

/// Sends `message` through the proxy and reads the answer, if one comes.
fn exchange(proxy: SocketAddr, message: &[u8], limit: Duration) -> io::Result<Reply> {
    let start = Instant::now();
    let stream = TcpStream::connect(proxy)?;
    stream.set_read_timeout(Some(limit))?;
    (&stream).write_all(message)?;
    let mut reader = BufReader::new(&stream);
    let mut header = String::new();
    match reader.read_line(&mut header) {
        Ok(0) => {
            return Ok(Reply::Closed {
                after: start.elapsed(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Ok(Reply::Closed {
                after: start.elapsed(),
            });
        }
        result => result?,
    };
    let mut echo = vec![0; message.len()];
    reader.read_exact(&mut echo)?;
    Ok(Reply::Answered {
        backend: header.trim_end().trim_start_matches("backend ").to_owned(),
        intact: echo == message,
    })
}
