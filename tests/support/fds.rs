//! This process's file descriptors: counting them, what each refers to, waiting for them
//! to settle or come back after a load (the leak checks), and the RLIMIT_NOFILE that bounds
//! them.

use std::{
    thread,
    time::{Duration, Instant},
};

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// This process's open fds and what each refers to (`socket:[inode]`,
/// `anon_inode:[eventpoll]`, ...), for a leak report that says what leaked.
pub fn open_fd_targets() -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

/// Fds the process may hold beyond its count before a load: backend threads finishing.
pub const FD_SLACK: usize = 4;

/// This process's open fds once they have not changed for `quiet` (waiting at most
/// `limit`): workers and backend threads open and close theirs a little late.
pub fn settled_fds(quiet: Duration, limit: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + limit;
    let mut last = open_fd_targets();
    loop {
        thread::sleep(quiet);
        let now = open_fd_targets();
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Waits (bounded) until the process has no more open fds than `before` plus
/// [`FD_SLACK`]; the panic lists (the first 20 of) the fds that are new.
pub fn wait_fds_back(before: &[(i32, String)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = open_fd_targets();
        if now.len() <= before.len() + FD_SLACK {
            return;
        }
        if Instant::now() >= deadline {
            let new: Vec<_> = now.iter().filter(|fd| !before.contains(fd)).collect();
            let shown = &new[..new.len().min(20)];
            panic!(
                "{} fds open {within:?} after the load, {} before; new (first 20): {shown:?}",
                now.len(),
                before.len()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one, which needs no privilege; returns it.
/// For a test that holds more sockets than a login shell's soft limit of 1024 allows.
pub fn soft_nofile_to_hard() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .expect("raise the soft RLIMIT_NOFILE to the hard one");
    hard
}
