//! The backends: a separate process (this same executable with `--backend`), so that
//! the CPU time of the bench's clients, of the backends and of the proxy are each read
//! from their own /proc/<pid>/stat and never mix.
//!
//! A fixed pool of threads blocks in `accept` on one listener; each serves one connection
//! to its end and goes back to `accept`. No thread is spawned per connection, so the
//! connection-rate workload measures the proxies, not thread creation. The pool is larger
//! than the most connections any workload keeps open at once.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    process::Child,
    wire::{self, GO, HEADER_LEN, Header, Op, Pattern},
};

/// Serving threads: more than the 32 ping-pong connections plus the connection-rate
/// clients, with room for connections a proxy is still closing.
const THREADS: usize = 128;
/// A backend gives up on a silent client after this long, so that a proxy that lost a
/// close cannot hold a thread forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend process as the bench sees it.
pub struct Backend {
    pub addr: SocketAddr,
    pub process: Child,
}

impl Backend {
    /// Starts this executable with `--backend` and reads the port it listens on.
    pub fn start() -> anyhow::Result<Backend> {
        let exe = std::env::current_exe().context("finding the bench executable")?;
        let mut command = Command::new(exe);
        command
            .arg("--backend")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut process = Child::spawn("the bench backend", command)?;
        let stdout = process
            .take_stdout()
            .context("the backend's stdout was not piped")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the backend's port")?;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("the backend printed {line:?} instead of its port"))?;
        process.check_alive()?;
        Ok(Backend {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            process,
        })
    }
}

/// The `--backend` entry point: listens on 127.0.0.1, prints the port, serves until it
/// is killed.
pub fn run() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the backend listener")?;
    let port = listener.local_addr()?.port();
    println!("{port}");
    io::stdout().flush()?;
    let listener = Arc::new(listener);
    let pattern = Arc::new(Pattern::new());
    let mut threads = Vec::with_capacity(THREADS);
    for index in 0..THREADS {
        let (listener, pattern) = (Arc::clone(&listener), Arc::clone(&pattern));
        threads.push(
            std::thread::Builder::new()
                .name(format!("backend-{index}"))
                .spawn(move || accept_loop(&listener, &pattern))
                .context("starting a backend thread")?,
        );
    }
    for thread in threads {
        let _ = thread.join();
    }
    bail!("every backend thread stopped")
}

fn accept_loop(listener: &TcpListener, pattern: &Pattern) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = serve(stream, pattern) {
                    eprintln!("bench backend: connection from {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("bench backend: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(mut stream: TcpStream, pattern: &Pattern) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut bytes = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut bytes)
        .context("reading the header")?;
    let header = Header::decode(&bytes).map_err(anyhow::Error::msg)?;
    stream.write_all(&bytes).context("echoing the header")?;
    match header.op {
        Op::Echo => echo(&mut stream),
        Op::Upload => receive(&mut stream, pattern),
        Op::Download => send(&mut stream, pattern, &header),
    }
}

fn echo(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => stream.write_all(&buf[..n]).context("echoing")?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading what to echo"),
        }
    }
}

/// Verifies an upload and answers with one line: `OK <bytes>`, `DAMAGED <why>` or
/// `ERR <why>` (an i/o error).
fn receive(stream: &mut TcpStream, pattern: &Pattern) -> anyhow::Result<()> {
    let verdict = wire::receive_stream(stream, pattern);
    let line = match &verdict {
        Ok(bytes) => format!("OK {bytes}\n"),
        Err(e) if e.is_damage() => format!("DAMAGED {e}\n"),
        Err(e) => format!("ERR {e}\n"),
    };
    stream
        .write_all(line.as_bytes())
        .context("sending the result")?;
    match verdict {
        Ok(_) => Ok(()),
        Err(e) => bail!("upload failed verification: {e}"),
    }
}

fn send(stream: &mut TcpStream, pattern: &Pattern, header: &Header) -> anyhow::Result<()> {
    let mut go = [0u8; 1];
    stream
        .read_exact(&mut go)
        .context("waiting for the go byte")?;
    if go[0] != GO {
        bail!("expected the go byte, got {:#04x}", go[0]);
    }
    let deadline = Instant::now() + header.duration;
    wire::send_stream(stream, pattern, deadline, header.byte_limit).context("sending")?;
    stream.shutdown(Shutdown::Write).context("closing")?;
    Ok(())
}
