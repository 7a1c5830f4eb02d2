//! The backends: a separate process (this same executable with `--backend`), so that
//! the CPU time of the bench's clients, of the backends and of the proxy are each read
//! from their own /proc/<pid>/stat and never mix.
//!
//! A fixed pool of threads blocks in `accept` on one listener; each serves one connection
//! to its end and goes back to `accept`. No thread is spawned per connection, so the
//! connection-rate workload measures the proxies, not thread creation. The pool is larger
//! than the most connections any workload keeps open at once.
//!
//! The hold workload keeps far more connections open than threads can serve, so the
//! same process also runs one epoll thread that echoes every byte on [`HOLD_PORTS`]
//! further listeners (`hold.rs`): several ports, so that a proxy's connections to them
//! do not run out of ephemeral ports (those are counted per destination). The hold
//! workload's extra shards each run that server alone, in a process of its own
//! (`--hold-backend`).

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

/// Listeners of the hold echo server. The proxies connect from 127.0.0.1, and the
/// kernel has about 28k ephemeral ports per destination: 8 ports hold 200k connections.
pub const HOLD_PORTS: usize = 8;

/// The backend process as the bench sees it.
pub struct Backend {
    pub addr: SocketAddr,
    /// The hold echo server's listeners.
    pub hold: Vec<SocketAddr>,
    pub process: Child,
}

impl Backend {
    /// Starts this executable with `--backend` and reads the ports it listens on.
    pub fn start() -> anyhow::Result<Backend> {
        let (process, ports) = spawn("the bench backend", "--backend", 1 + HOLD_PORTS)?;
        Ok(Backend {
            addr: ports[0],
            hold: ports[1..].to_vec(),
            process,
        })
    }
}

/// A process that runs only the hold echo server: one per extra shard of the hold
/// workload, since the descriptors of one process cannot hold every connection.
pub struct HoldBackend {
    pub hold: Vec<SocketAddr>,
    /// Killed on drop, which closes its side of every connection.
    _process: Child,
}

impl HoldBackend {
    /// Starts this executable with `--hold-backend` and reads the ports it listens on.
    pub fn start() -> anyhow::Result<HoldBackend> {
        let (process, hold) = spawn("a hold backend", "--hold-backend", HOLD_PORTS)?;
        Ok(HoldBackend {
            hold,
            _process: process,
        })
    }
}

/// Starts this executable with `flag` and reads the `count` ports it prints.
fn spawn(name: &str, flag: &str, count: usize) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    let exe = std::env::current_exe().context("finding the bench executable")?;
    let mut command = Command::new(exe);
    command
        .arg(flag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut process = Child::spawn(name, command)?;
    let stdout = process
        .take_stdout()
        .with_context(|| format!("{name}'s stdout was not piped"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .with_context(|| format!("reading {name}'s ports"))?;
    let ports = line
        .split_whitespace()
        .map(|port| port.parse::<u16>())
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|ports| ports.len() == count)
        .with_context(|| format!("{name} printed {line:?} instead of its ports"))?;
    process.check_alive()?;
    let addrs = ports
        .into_iter()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    Ok((process, addrs))
}

/// The `--backend` entry point: listens on 127.0.0.1, prints the ports (the pool's, then
/// the hold server's), serves until it is killed.
pub fn run() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the backend listener")?;
    let hold = bind_hold()?;
    let mut ports = vec![listener.local_addr()?.port()];
    for listener in &hold {
        ports.push(listener.local_addr()?.port());
    }
    print_ports(&ports)?;
    std::thread::Builder::new()
        .name("backend-hold".to_owned())
        .spawn(move || {
            if let Err(e) = hold::serve(hold) {
                eprintln!("bench backend: the hold server stopped: {e:#}");
            }
        })
        .context("starting the hold server")?;
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

/// The `--hold-backend` entry point: the hold echo server alone.
pub fn run_hold_only() -> anyhow::Result<()> {
    let hold = bind_hold()?;
    let ports = hold
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect::<io::Result<Vec<_>>>()?;
    print_ports(&ports)?;
    hold::serve(hold).context("the hold server stopped")
}

fn bind_hold() -> anyhow::Result<Vec<TcpListener>> {
    (0..HOLD_PORTS)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("binding the hold listeners")
}

fn print_ports(ports: &[u16]) -> anyhow::Result<()> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    println!("{}", ports.join(" "));
    io::stdout().flush().context("printing the ports")
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

/// The hold workload's echo server: one thread, one epoll set, every connection
/// non-blocking. It echoes whatever arrives (the header, then the check bytes) and
/// closes on the client's close. The bench sends a few dozen bytes at a time, so a
/// write never finds a full send buffer; if one ever did, the connection is closed
/// and the client sees its bytes missing.
mod hold {
    use std::{
        collections::HashMap,
        io::{self, Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::{AsRawFd, RawFd},
    };

    use anyhow::Context;

    pub fn serve(listeners: Vec<TcpListener>) -> anyhow::Result<()> {
        // SAFETY: epoll_create1 has no memory effects; the result is checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        let mut listening = HashMap::new();
        for listener in listeners {
            listener.set_nonblocking(true)?;
            add(epoll, listener.as_raw_fd())?;
            listening.insert(listener.as_raw_fd(), listener);
        }
        let mut connections: HashMap<RawFd, TcpStream> = HashMap::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `events` is a valid buffer of `events.len()` entries.
            let ready =
                unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
            let Ok(ready) = usize::try_from(ready) else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("epoll_wait");
            };
            for event in &events[..ready] {
                let fd = event.u64 as RawFd;
                if let Some(listener) = listening.get(&fd) {
                    while let Ok((stream, _)) = listener.accept() {
                        stream.set_nonblocking(true)?;
                        let _ = stream.set_nodelay(true);
                        add(epoll, stream.as_raw_fd())?;
                        connections.insert(stream.as_raw_fd(), stream);
                    }
                    continue;
                }
                let Some(stream) = connections.get_mut(&fd) else {
                    continue;
                };
                let open = loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break false,
                        Ok(n) => {
                            if stream.write(&buf[..n]).ok() != Some(n) {
                                break false;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break false,
                    }
                };
                if !open {
                    // Closing the socket takes it out of the epoll set.
                    connections.remove(&fd);
                }
            }
        }
    }

    fn add(epoll: RawFd, fd: RawFd) -> anyhow::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: both descriptors are open; `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl");
        }
        Ok(())
    }
}
