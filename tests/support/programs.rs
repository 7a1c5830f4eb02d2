//! The programs the tests run as real peers and tools (redis, HAProxy, nginx, openssl,
//! curl, ip, tc, ...), and running a command with a bound. scripts/test installs the
//! programs; a test that finds one missing fails, never skips.

use std::{
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A command for `program`, which Debian's `package` installs. The program is looked up
/// first, so that a missing one fails the test with what to install, where the spawn would
/// fail with only "No such file or directory". The sbin directories are searched too: a
/// root shell from `su` without `-` does not have them on PATH, and nginx and HAProxy
/// live there.
#[track_caller]
pub fn external(program: &str, package: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file());
    match found {
        Some(found) => Command::new(found),
        None => not_installed(program, package),
    }
}

/// Fails the test, at its caller's line: `what` is missing, and Debian's `package`
/// installs it.
#[track_caller]
pub fn not_installed(what: &str, package: &str) -> ! {
    panic!(
        "{what} is not installed: the tests need Debian's {package} package \
         (apt-get install {package}; scripts/test installs everything the tests use)"
    )
}

/// Runs `command` to its end with stdout and stderr collected; kills it and panics if it
/// runs longer than `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    wait_output(child, limit).unwrap_or_else(|| panic!("{command:?} still running after {limit:?}"))
}

/// Waits for `child` (spawned with piped stdout and stderr) to end, reading its output
/// meanwhile so that it never blocks on a full pipe. `None` if it ran longer than
/// `limit`: then it has been killed.
pub fn wait_output(mut child: Child, limit: Duration) -> Option<std::process::Output> {
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    Some(std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}
