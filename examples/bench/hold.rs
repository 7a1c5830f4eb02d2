//! The hold workload: open N connections through a target, keep them all open, check
//! that every one still carries bytes, and read what holding them costs the proxy
//! (resident memory, descriptors, BPF map memory) and the kernel (slab), per connection.
//!
//! Each connection opens with a 64-byte first message starting with
//! [`wire::HOLD_MAGIC`] and its number, which the backend's hold echo server returns
//! (so each proxy has connected and, for splice-proxy, handed the pair to the splice
//! engine: its echo comes back through the splice). Once all N are open, every
//! connection sends 16 bytes more and must get exactly them back.
//!
//! **Shards.** A proxy holds two descriptors per connection, and a process may not be
//! allowed that many (the hard `RLIMIT_NOFILE` without `CAP_SYS_RESOURCE`). Then the
//! bench splits N over shards, all held at once: each shard is one instance of the
//! proxy (the target itself, then instances started for the workload), a hold echo
//! server process and an opening process, and the figures are the shards' sums. In
//! every case the connections are opened and held by child processes of this
//! executable (`--hold-open`), one per shard, which the bench steps through opening,
//! checking and closing with one line each way (see [`Opener`]).
//!
//! 100k connections from one machine need more than one source address: the kernel
//! picks an ephemeral port (about 28k of them) per destination address and port, so
//! each opening thread binds its own 127.0.0.x with `IP_BIND_ADDRESS_NO_PORT` (the
//! port is chosen at connect, per destination). The proxies' own connections to the
//! backend are spread over the hold server's [`HOLD_PORTS`] ports for the same reason.
//!
//! [`HOLD_PORTS`]: crate::backend::HOLD_PORTS

use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    process::{ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    process::Child,
    targets::{Kind, Target},
    wire::{Damaged, HEADER_LEN, HOLD_MAGIC},
};

/// Opening threads, each with its own source address 127.0.0.(2 + thread).
const OPENERS: usize = 8;
/// Every socket operation of the workload waits at most this long.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Opening, checking and closing N connections through one target must end by then.
const TIME_LIMIT: Duration = Duration::from_secs(300);
/// How long the proxy may take to close its side of every connection after the clients
/// closed theirs.
const CLOSE_LIMIT: Duration = Duration::from_secs(120);
/// Bytes each connection echoes once all are open.
const CHECK_LEN: usize = 16;

/// What holding N connections through one target cost.
pub struct Held {
    pub connections: usize,
    /// Seconds to open all of them (each with its first-message echo).
    pub open_seconds: f64,
    /// The proxy's processes (none for direct): before opening, and with all held.
    pub proxy_before: Footprint,
    pub proxy_held: Footprint,
    /// The machine's slab memory (all sockets: client, proxy, backend), in bytes.
    pub slab_before: u64,
    pub slab_held: u64,
    /// Seconds from the clients' close until the proxy had closed its side of every
    /// connection.
    pub close_seconds: f64,
}

/// A process tree's memory and descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    /// VmRSS, summed over the processes, in bytes.
    pub rss: u64,
    pub fds: u64,
    /// BPF maps the processes hold (counted once per map), as the kernel accounts them
    /// (`memlock` in fdinfo), in bytes.
    pub maps: u64,
}

impl Footprint {
    fn of(pids: &[u32]) -> Footprint {
        let mut footprint = Footprint::default();
        let mut maps_seen = Vec::new();
        for &pid in pids {
            footprint.rss += status_kib(pid, "VmRSS:").unwrap_or(0) * 1024;
            let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for entry in entries.flatten() {
                footprint.fds += 1;
                let is_map = fs::read_link(entry.path())
                    .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-map");
                if !is_map {
                    continue;
                }
                let info = fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    entry.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                let field = |name: &str| {
                    info.lines()
                        .find_map(|line| line.strip_prefix(name))
                        .and_then(|value| value.trim().parse::<u64>().ok())
                };
                if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
                    && !maps_seen.contains(&id)
                {
                    maps_seen.push(id);
                    footprint.maps += memlock;
                }
            }
        }
        footprint
    }
}

fn fd_count(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map(|entries| entries.count() as u64)
        .sum()
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, field)
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn slab_bytes() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    kib_field(&meminfo, "Slab:").unwrap_or(0) * 1024
}

/// Opens `connections` through the shards of one target (`fleet[0]` is the target
/// itself, the rest its extra instances), checks each, reads the footprints, closes.
pub fn run(fleet: &mut [&mut Target], connections: usize) -> anyhow::Result<Held> {
    let deadline = Instant::now() + TIME_LIMIT;
    let pids: Vec<u32> = fleet.iter().flat_map(|t| t.pids().to_vec()).collect();
    let proxy_before = Footprint::of(&pids);
    let slab_before = slab_bytes();

    let started = Instant::now();
    let mut openers = shares(fleet, connections)
        .iter()
        .enumerate()
        .map(|(shard, share)| Opener::spawn(shard, share))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for opener in &mut openers {
        opener.expect(OPENED)?;
    }
    let open_seconds = started.elapsed().as_secs_f64();
    for target in fleet.iter_mut() {
        target.check_alive()?;
    }

    let proxy_held = Footprint::of(&pids);
    let slab_held = slab_bytes();

    for opener in &mut openers {
        opener.tell(CHECK)?;
    }
    for opener in &mut openers {
        opener.expect(CHECKED)?;
    }
    if Instant::now() > deadline {
        bail!("holding {connections} connections took longer than {TIME_LIMIT:?}");
    }

    let closed_at = Instant::now();
    // Killing the openers closes their sockets as an exit would.
    drop(openers);
    let close_deadline = closed_at + CLOSE_LIMIT;
    let close_seconds = loop {
        let fds = fd_count(&pids);
        // The proxies' fds return to what they had before; a few may come and go.
        if fds <= proxy_before.fds + 16 * fleet.len() as u64 {
            break closed_at.elapsed().as_secs_f64();
        }
        if Instant::now() > close_deadline {
            bail!(
                "the proxy still held {fds} descriptors (it had {} before) {CLOSE_LIMIT:?} after the clients closed",
                proxy_before.fds
            );
        }
        thread::sleep(Duration::from_millis(100));
    };
    for target in fleet.iter_mut() {
        target.check_alive()?;
    }
    Ok(Held {
        connections,
        open_seconds,
        proxy_before,
        proxy_held,
        slab_before,
        slab_held,
        close_seconds,
    })
}

/// What an opening process says once all its connections are open, and once all of
/// them passed the check; what the bench says to start the check.
const OPENED: &str = "opened";
const CHECK: &str = "check";
const CHECKED: &str = "checked";

/// One shard's connections: numbers `first_id..first_id + connections`, spread over
/// `destinations`.
#[derive(Debug, PartialEq)]
pub struct Share {
    first_id: u64,
    connections: usize,
    destinations: Vec<SocketAddr>,
}

impl Share {
    /// The `--hold-open` argument: `FIRST:COUNT:ADDR,ADDR,...`.
    fn to_arg(&self) -> String {
        let destinations: Vec<String> = self.destinations.iter().map(|a| a.to_string()).collect();
        format!(
            "{}:{}:{}",
            self.first_id,
            self.connections,
            destinations.join(",")
        )
    }

    pub fn parse(arg: &str) -> anyhow::Result<Share> {
        let mut fields = arg.splitn(3, ':');
        let mut next = |what: &str| {
            fields
                .next()
                .with_context(|| format!("--hold-open {arg:?}: no {what}"))
        };
        let first_id = next("first number")?.parse().context("the first number")?;
        let connections = next("count")?.parse().context("the count")?;
        let destinations = next("destinations")?
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<SocketAddr>, _>>()
            .context("the destinations")?;
        Ok(Share {
            first_id,
            connections,
            destinations,
        })
    }
}

/// Splits `connections` as evenly as can be over the fleet's shards, each going to its
/// own instance's hold address(es).
fn shares(fleet: &[&mut Target], connections: usize) -> Vec<Share> {
    let shards = fleet.len();
    let mut first_id = 0;
    fleet
        .iter()
        .enumerate()
        .map(|(shard, target)| {
            let count = connections / shards + usize::from(shard < connections % shards);
            let share = Share {
                first_id,
                connections: count,
                destinations: target.hold.clone(),
            };
            first_id += count as u64;
            share
        })
        .collect()
}

/// The bench's end of one shard's opening process.
struct Opener {
    shard: usize,
    /// Killed on drop, which closes every connection it holds.
    _process: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Opener {
    /// Starts this executable with `--hold-open`; its errors go to the bench's stderr.
    fn spawn(shard: usize, share: &Share) -> anyhow::Result<Opener> {
        let exe = std::env::current_exe().context("finding the bench executable")?;
        let mut command = Command::new(exe);
        command
            .arg("--hold-open")
            .arg(share.to_arg())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = Child::spawn(&format!("hold shard {shard}'s opener"), command)?;
        let to = process
            .take_stdin()
            .context("the opener's stdin was not piped")?;
        let from = process
            .take_stdout()
            .context("the opener's stdout was not piped")?;
        Ok(Opener {
            shard,
            _process: process,
            to,
            from: BufReader::new(from),
        })
    }

    /// Waits for `word`: the opener's own deadlines bound the wait, and it exits (which
    /// ends the read) on any error.
    fn expect(&mut self, word: &str) -> anyhow::Result<()> {
        let mut line = String::new();
        self.from
            .read_line(&mut line)
            .with_context(|| format!("reading from hold shard {}'s opener", self.shard))?;
        if line.trim_end() != word {
            bail!(
                "hold shard {}'s opener stopped before it {word} (its error is above)",
                self.shard
            );
        }
        Ok(())
    }

    fn tell(&mut self, word: &str) -> anyhow::Result<()> {
        writeln!(self.to, "{word}")
            .and_then(|()| self.to.flush())
            .with_context(|| format!("writing to hold shard {}'s opener", self.shard))
    }
}

/// The `--hold-open` entry point: opens the share's connections, says so, checks them
/// all when told to, says so, and holds them until its stdin closes or it is killed.
pub fn open_and_hold(share: &Share) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIME_LIMIT;
    let opened = thread::scope(|scope| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|opener| scope.spawn(move || open_part(opener, share, deadline)))
            .collect();
        openers
            .into_iter()
            .map(|opener| {
                opener
                    .join()
                    .map_err(|_| anyhow!("an opening thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    say(OPENED)?;
    wait_for(CHECK)?;
    thread::scope(|scope| {
        let checks: Vec<_> = opened
            .iter()
            .map(|part| scope.spawn(move || check_part(part)))
            .collect();
        for check in checks {
            check
                .join()
                .map_err(|_| anyhow!("a checking thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    say(CHECKED)?;
    // Any line or the end of stdin: the bench is done with the connections.
    wait_for("")
}

fn say(word: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{word}")
        .and_then(|()| stdout.flush())
        .context("writing to the bench")
}

/// Reads one line from the bench, which must be `word` (an empty `word` takes any).
fn wait_for(word: &str) -> anyhow::Result<()> {
    let mut line = String::new();
    io::stdin()
        .read_line(&mut line)
        .context("reading from the bench")?;
    if !word.is_empty() && line.trim_end() != word {
        bail!("the bench said {line:?}, not {word:?}");
    }
    Ok(())
}

/// One opening thread's connections, with their numbers.
type Part = Vec<(u64, TcpStream)>;

/// Opens the share's connections `opener`, `opener + OPENERS`, ... from
/// 127.0.0.(2 + opener).
fn open_part(opener: usize, share: &Share, deadline: Instant) -> anyhow::Result<Part> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + opener as u8);
    let mut part = Vec::with_capacity(share.connections / OPENERS + 1);
    for index in (opener..share.connections).step_by(OPENERS) {
        if Instant::now() > deadline {
            bail!(
                "opened {} connections from {source} in {TIME_LIMIT:?}, not {}",
                part.len(),
                share.connections.div_ceil(OPENERS)
            );
        }
        let id = share.first_id + index as u64;
        let destination = share.destinations[index % share.destinations.len()];
        let stream = open_one(source, destination, id)
            .with_context(|| format!("connection {id} from {source} to {destination}"))?;
        part.push((id, stream));
    }
    Ok(part)
}

/// The 64-byte first message of hold connection `id`.
fn first_message(id: u64) -> [u8; HEADER_LEN] {
    let mut bytes = [0u8; HEADER_LEN];
    bytes[..8].copy_from_slice(HOLD_MAGIC);
    bytes[8..16].copy_from_slice(&id.to_le_bytes());
    for (i, byte) in bytes[16..].iter_mut().enumerate() {
        *byte = b'A' + ((i as u64 + id) % 26) as u8;
    }
    bytes
}

fn open_one(source: Ipv4Addr, destination: SocketAddr, id: u64) -> anyhow::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid int and its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    socket
        .bind(&SockAddr::from(SocketAddrV4::new(source, 0)))
        .context("binding the source address")?;
    socket
        .connect_timeout(&destination.into(), IO_TIMEOUT)
        .context("connecting")?;
    let mut stream = TcpStream::from(socket);
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let sent = first_message(id);
    stream
        .write_all(&sent)
        .context("sending the first message")?;
    let mut echo = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut echo)
        .context("reading the first message's echo")?;
    if echo != sent {
        return Err(Damaged(format!("connection {id}: the echoed first message differs")).into());
    }
    Ok(stream)
}

/// Sends 16 bytes on every connection of the part, then reads every echo back.
fn check_part(part: &Part) -> anyhow::Result<()> {
    let check = |id: u64| {
        let mut bytes = [0u8; CHECK_LEN];
        bytes[..8].copy_from_slice(&id.to_le_bytes());
        bytes[8..].copy_from_slice(b"held-ok!");
        bytes
    };
    for (id, stream) in part {
        (&*stream)
            .write_all(&check(*id))
            .with_context(|| format!("connection {id}: sending the check bytes"))?;
    }
    for (id, stream) in part {
        let mut echo = [0u8; CHECK_LEN];
        (&*stream)
            .read_exact(&mut echo)
            .with_context(|| format!("connection {id}: reading the check bytes' echo"))?;
        if echo != check(*id) {
            return Err(Damaged(format!(
                "connection {id}: the check bytes came back changed"
            ))
            .into());
        }
    }
    Ok(())
}

/// The hold table: one row per target.
pub fn table(connections: usize, rows: &[(Kind, Result<Held, String>)]) -> String {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let per = |before: u64, held: u64| held.saturating_sub(before) as f64 / connections as f64;
    let direct_slab = rows.iter().find_map(|(kind, held)| match (kind, held) {
        (Kind::Direct, Ok(held)) => Some(per(held.slab_before, held.slab_held)),
        _ => None,
    });
    let mut out = format!(
        "  {:<15} {:>7} {:>7} {:>17} {:>9} {:>8} {:>13} {:>10} {:>6} {:>7}\n",
        "target",
        "open s",
        "conn/s",
        "RSS MiB (held)",
        "RSS B/c",
        "fds/c",
        "maps MiB",
        "slab B/c",
        "x",
        "close s"
    );
    for (kind, held) in rows {
        let name = kind.name();
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                out.push_str(&format!("  {name:<15} FAILED: {e}\n"));
                continue;
            }
        };
        let slab = per(held.slab_before, held.slab_held);
        let slab_x = direct_slab
            .filter(|&direct| direct > 0.0)
            .map_or("-".to_owned(), |direct| format!("{:.2}", slab / direct));
        let (rss, rss_per, fds, maps) = if *kind == Kind::Direct {
            (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            )
        } else {
            let (before, after) = (held.proxy_before, held.proxy_held);
            (
                format!("{:.1} -> {:.1}", mib(before.rss), mib(after.rss)),
                format!("{:.0}", per(before.rss, after.rss)),
                format!(
                    "{:.2}",
                    after.fds.saturating_sub(before.fds) as f64 / connections as f64
                ),
                if after.maps == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1} -> {:.1}", mib(before.maps), mib(after.maps))
                },
            )
        };
        out.push_str(&format!(
            "  {name:<15} {:>7.1} {:>7.0} {rss:>17} {rss_per:>9} {fds:>8} {maps:>13} {slab:>10.0} {slab_x:>6} {:>7.1}\n",
            held.open_seconds,
            held.connections as f64 / held.open_seconds,
            held.close_seconds,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_messages_differ_and_carry_the_magic() {
        let (a, b) = (first_message(1), first_message(2));
        assert_ne!(a, b);
        assert_eq!(&a[..8], HOLD_MAGIC);
    }

    #[test]
    fn a_share_survives_its_argument() {
        let share = Share {
            first_id: 7693,
            connections: 7692,
            destinations: vec![
                "127.0.0.1:40001".parse().unwrap(),
                "127.0.0.1:40002".parse().unwrap(),
            ],
        };
        assert_eq!(Share::parse(&share.to_arg()).unwrap(), share);
        assert!(Share::parse("1:2").is_err());
        assert!(Share::parse("1:x:127.0.0.1:1").is_err());
    }

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t2\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(1234));
        assert_eq!(kib_field(status, "VmHWM:"), None);
    }
}
