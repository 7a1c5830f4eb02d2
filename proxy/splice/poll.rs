//! The epoll instance a splice worker sleeps on, and the eventfd that wakes it when the
//! server hands over a connection.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

pub use libc::epoll_event as Event;

pub const READABLE: u32 = libc::EPOLLIN as u32;
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
pub const READ_CLOSED: u32 = libc::EPOLLRDHUP as u32;
pub const HANG_UP: u32 = libc::EPOLLHUP as u32;
pub const ERROR: u32 = libc::EPOLLERR as u32;
const EDGE: u32 = libc::EPOLLET as u32;

pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Edge-triggered: a worker handles everything an event announces before it waits
    /// again, and a level-triggered RDHUP would wake it forever after a half-close.
    pub fn add(&self, fd: BorrowedFd<'_>, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Changes what `fd`, already added, is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, interest: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Stops watching `fd`. Closing an fd does that too, unless it has duplicates.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events; `None` waits without a limit.
    pub fn wait(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let timeout_ms = timeout.map_or(-1, |t| {
            // Round up, so that a sub-millisecond timeout does not become a busy loop.
            i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        events.clear();
        let capacity = i32::try_from(events.capacity()).unwrap_or(i32::MAX);
        // SAFETY: the kernel writes at most `capacity` events into the vector's spare
        // capacity; `set_len` then covers exactly the events it wrote.
        unsafe {
            let n = libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                capacity,
                timeout_ms,
            );
            match cvt(n) {
                Ok(n) => events.set_len(n as usize),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn ctl(
        &self,
        op: libc::c_int,
        fd: BorrowedFd<'_>,
        interest: u32,
        token: u64,
    ) -> io::Result<()> {
        let mut event = Event {
            events: interest | EDGE,
            u64: token,
        };
        // SAFETY: `event` is valid for the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &mut event) })?;
        Ok(())
    }
}

/// A counter another thread bumps to wake the worker. Connections handed over while
/// the worker has not yet taken the last wake-up share it: no write per connection.
pub struct Wakeup {
    fd: OwnedFd,
    /// A wake-up is written and the worker has not cleared it yet.
    pending: AtomicBool,
}

impl Wakeup {
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        Ok(Wakeup {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Call after queueing what the worker should see: the worker clears before it
    /// looks at the queue, so it either sees the item or gets a new wake-up.
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`. It can only fail when the counter is about
        // to overflow, and then the worker is due to wake anyway.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the counter so the next `wake` makes a new edge.
    pub fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into `count`; EAGAIN (nothing to clear) is fine.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut count).cast(), 8) };
        // After the read, and before the worker drains its queue: a wake that comes
        // before this store writes nothing, and the drain then sees its item; one
        // after it writes a new edge. Storing before the read could swallow a write
        // and leave `pending` set with no edge to come.
        self.pending.store(false, Ordering::SeqCst);
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
