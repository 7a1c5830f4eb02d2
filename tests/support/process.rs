//! The real `splice-proxy` binary as a child process: starting it (with a routes file and
//! a mode, or under a command the test builds), its stderr log, signals, and its exit.

use std::{
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// The `splice-proxy` binary, started with `args`; stderr is collected line by line.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_splice-proxy")
}

impl ProxyProcess {
    /// Starts the binary and, unless it exits first, waits for its "listening on ADDR"
    /// line (bounded) to learn the address.
    pub fn start(args: &[&str]) -> ProxyProcess {
        ProxyProcess::spawn(Command::new(binary()).args(args))
    }

    /// Starts the binary on 127.0.0.1:0 with `routes`, `--mode mode` and the layout the
    /// tests use on this 2-core machine (2 workers), then `extra`; fails the test unless
    /// it listens. A test connection is spliced right after its first message
    /// (`--splice-after 0s`) unless `extra` sets `--splice-after`.
    pub fn serve(routes: &Path, mode: &str, extra: &[&str]) -> ProxyProcess {
        let proxy = ProxyProcess::launch(routes, mode, extra);
        proxy.addr();
        proxy
    }

    /// As [`ProxyProcess::serve`], for a test that expects the binary may refuse to
    /// start: it does not wait for it to listen.
    pub fn launch(routes: &Path, mode: &str, extra: &[&str]) -> ProxyProcess {
        let routes = routes.to_str().expect("routes path is UTF-8");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--routes",
            routes,
            "--mode",
            mode,
            "--workers",
            "2",
        ];
        if !extra.contains(&"--splice-after") {
            args.extend_from_slice(&["--splice-after", "0s"]);
        }
        args.extend_from_slice(extra);
        ProxyProcess::start(&args)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| {
            panic!(
                "splice-proxy did not start listening; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// Where it serves its metrics (started with `--metrics`), from the line it logs
    /// before it listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_for_log("metrics at http://", super::IO_TIMEOUT);
        line.split("metrics at http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until stderr has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// As [`ProxyProcess::start`], for a command the caller built around the binary (its
    /// stdout and stderr are taken over): e.g. the binary run by `setpriv` as nobody.
    /// Logs at info unless the command sets RUST_LOG.
    pub fn spawn(command: &mut Command) -> ProxyProcess {
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(addr) = rest.split_whitespace().next().and_then(|a| a.parse().ok())
                {
                    let _ = tx.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        // Returns early, without an address, if the process exits (the pipe closes).
        let addr = rx.recv_timeout(Duration::from_secs(10)).ok();
        ProxyProcess {
            child,
            addr,
            stderr,
        }
    }

    /// Waits (bounded) for the process to exit and for the rest of its stderr; panics
    /// with what it logged if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader thread ends at EOF; give it a moment to store the last lines.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of stderr containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) with a child's pid that we have not reaped (Drop reaps it).
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            sent,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
