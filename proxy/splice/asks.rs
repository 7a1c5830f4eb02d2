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
    thread::{self, JoinHandle},
};

use super::poll::Wakeup;
use crate::probe::{Asks, Cookie};

/// Cookies the asks thread has handed to one worker and the worker has not yet taken.
#[derive(Default)]
pub(super) struct Inbox {
    cookies: Mutex<Vec<Cookie>>,
}

impl Inbox {
    /// Takes every cookie handed over so far, oldest first.
    pub fn take(&self, into: &mut Vec<Cookie>) {
        let mut cookies = self.cookies.lock().unwrap_or_else(PoisonError::into_inner);
        into.append(&mut cookies);
    }
}

/// The thread that reads the ring, and how to stop it: dropping the reader wakes the
/// thread and joins it.
pub(super) struct Reader {
    stop: Arc<Wakeup>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts the thread that reads `asks` and hands each request to every worker, until
    /// the reader is dropped.
    pub fn start(mut asks: Asks, workers: Vec<(Arc<Inbox>, Arc<Wakeup>)>) -> io::Result<Reader> {
        let stop = Arc::new(Wakeup::new()?);
        let stopped = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("splice-asks".into())
            .spawn(move || {
                let mut batch = Vec::new();
                loop {
                    match wait_readable(&asks, &stopped) {
                        Ok(Readable::Asks) => {}
                        Ok(Readable::Stop) => return,
                        Err(e) => {
                            tracing::error!(
                                "waiting on the probe's ring of credit requests failed: {e}"
                            );
                            return;
                        }
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
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the reader of the probe's credit requests had panicked");
        }
    }
}

/// What woke the reader.
enum Readable {
    Asks,
    Stop,
}

fn wait_readable(asks: &Asks, stop: &Wakeup) -> io::Result<Readable> {
    let mut fds = [asks.fd(), stop.fd()].map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is valid for the call and its length is what we pass.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(if fds[1].revents != 0 {
                Readable::Stop
            } else {
                Readable::Asks
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
