//! A count of connections that another thread can wait on until it reaches zero: what a
//! graceful shutdown waits for, woken by the close of the last connection instead of
//! looking again and again.

use std::{
    sync::{
        Condvar, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

/// Connections held by one part of the proxy (the server's in flight, the engine's
/// live). Adding and removing cost an atomic each; only the removal that reaches zero
/// while a thread waits takes the lock, to wake it. Without a waiter a notify would
/// still cost a `futex` call, on every connection of a proxy that serves one at a time.
#[derive(Default)]
pub(crate) struct ConnectionCount {
    count: AtomicUsize,
    /// Threads in [`ConnectionCount::wait_zero`].
    waiters: AtomicUsize,
    lock: Mutex<()>,
    zero: Condvar,
}

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub fn remove(&self) {
        // A waiter counts itself before it looks at the count, and this looks at the
        // waiters after it changed the count (both sequentially consistent): either this
        // sees the waiter, or the waiter sees zero and does not wait.
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.waiters.load(Ordering::SeqCst) > 0
        {
            // Under the lock, so that a waiter between its check and its wait is not
            // missed.
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.zero.notify_all();
        }
    }

    /// Waits until the count is zero or `deadline` passes; true if it is zero.
    pub fn wait_zero(&self, deadline: Instant) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut zero = true;
        while self.get() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                zero = false;
                break;
            }
            guard = self
                .zero
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        zero
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectionCount;
    use std::{
        sync::Arc,
        thread,
        time::{Duration, Instant},
    };

    #[test]
    fn a_waiter_wakes_when_the_last_connection_is_removed() {
        let count = Arc::new(ConnectionCount::default());
        count.add();
        count.add();
        let remover = Arc::clone(&count);
        let removing = thread::spawn(move || {
            remover.remove();
            thread::sleep(Duration::from_millis(50));
            remover.remove();
        });
        let started = Instant::now();
        assert!(count.wait_zero(started + Duration::from_secs(10)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        removing.join().unwrap();
    }

    #[test]
    fn a_wait_ends_at_its_deadline() {
        let count = ConnectionCount::default();
        count.add();
        assert!(!count.wait_zero(Instant::now() + Duration::from_millis(20)));
        count.remove();
        assert!(
            count.wait_zero(Instant::now()),
            "zero needs no time to wait"
        );
    }
}
