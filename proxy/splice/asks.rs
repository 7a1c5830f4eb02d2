//! The reader of the probe's ring of credit requests. The probe names a spliced
//! direction by its source socket's cookie, which says nothing of the worker that owns
//! the pair, so this thread hands every request to every worker's inbox; a worker acts on
//! the cookies it knows and drops the rest. A request comes per quarter of a backlog of bytes
//! redirected or per park, a few thousand a second in a fast bulk transfer, so the
//! fan-out costs less than a shared map from cookie to worker would on every connection.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    thread,
};

use super::poll::Wakeup;
use crate::probe::Asks;

/// Cookies the asks thread has handed to one worker and the worker has not yet taken.
#[derive(Default)]
pub(super) struct Inbox {
    cookies: Mutex<Vec<u64>>,
}

impl Inbox {
    /// Takes every cookie handed over so far, oldest first.
    pub fn take(&self, into: &mut Vec<u64>) {
        let mut cookies = self.cookies.lock().unwrap_or_else(PoisonError::into_inner);
        into.append(&mut cookies);
    }
}

/// Starts the thread that reads `asks` for as long as the process runs.
pub(super) fn spawn(mut asks: Asks, workers: Vec<(Arc<Inbox>, Arc<Wakeup>)>) -> io::Result<()> {
    thread::Builder::new()
        .name("splice-asks".into())
        .spawn(move || {
            let mut batch = Vec::new();
            loop {
                if let Err(e) = wait_readable(&asks) {
                    tracing::error!("waiting on the probe's ring of credit requests failed: {e}");
                    return;
                }
                asks.drain(|cookie| batch.push(cookie));
                if batch.is_empty() {
                    continue;
                }
                for (inbox, wakeup) in &workers {
                    inbox
                        .cookies
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&batch);
                    wakeup.wake();
                }
                batch.clear();
            }
        })?;
    Ok(())
}

fn wait_readable(asks: &Asks) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: asks.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut fd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
