//! Child processes that cannot outlive the bench, and the temporary directory for their
//! configs and logs.
//!
//! Three layers make sure nothing is left running: every child is killed and reaped
//! when its [`Child`] guard drops (normal end, error, panic, or Ctrl-C, which `main` turns
//! into a normal return); a child's own children (nginx workers) are found through /proc
//! and killed with it; and each child gets `PR_SET_PDEATHSIG` so that the kernel kills it
//! should the bench itself be killed outright.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{self, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A running child process, killed with its descendants on drop.
pub struct Child {
    name: String,
    child: process::Child,
}

impl Child {
    /// Spawns `command`; `name` is how errors and warnings refer to it.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Child> {
        // SAFETY: the closure runs between fork and exec and only makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(Child {
            name: name.to_owned(),
            child,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin, if it was piped and not taken yet.
    pub fn take_stdin(&mut self) -> Option<process::ChildStdin> {
        self.child.stdin.take()
    }

    /// The child's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Fails if the child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited: {status}", self.name),
            Err(e) => bail!("{}: waiting for it failed: {e}", self.name),
        }
    }

    /// The child and its descendants, as they are now.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.id()];
        let parents = parent_table();
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            pids.extend(
                parents
                    .iter()
                    .filter(|&&(_, ppid)| ppid == parent)
                    .map(|&(pid, _)| pid),
            );
            i += 1;
        }
        pids
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // The parent first, or it replaces the workers we kill (nginx's master does);
        // the descendants were listed before, so they are not lost when reparented.
        let pids = self.pids();
        let _ = self.child.kill();
        for &pid in pids.iter().skip(1) {
            kill(pid);
        }
        if self.child.wait().is_err() {
            eprintln!("warning: could not reap {} (pid {})", self.name, self.id());
        }
        // The descendants are not our children to wait for: wait (bounded) until they
        // are gone.
        let deadline = Instant::now() + Duration::from_secs(2);
        for &pid in pids.iter().skip(1) {
            while is_running(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Alive and not a zombie (a zombie is dead, just not yet reaped by its new parent).
fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat_fields(&stat)
            .first()
            .is_some_and(|&state| state != "Z")
    })
}

fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: sending a signal has no memory effects in this process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// (pid, parent pid) of every process, from /proc/<pid>/stat.
fn parent_table() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat_fields(&stat).get(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The fields of a /proc/<pid>/stat line after the command name (which may contain
/// spaces and parentheses): index 0 is the state, 1 the parent pid, 11 utime, 12 stime.
pub fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A directory removed on drop, unless [`TempDir::keep`] was called.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("splice-bench-{}", process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leave the directory (configs and logs) for a post-mortem.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
