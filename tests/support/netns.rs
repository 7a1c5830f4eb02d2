//! Network namespaces: a test run on a loopback of its own that loses packets like a
//! congested link.

use std::{io, thread};

use super::external;

/// Runs `test` on a thread in a network namespace of its own, whose loopback behaves like
/// a congested link to a peer without SACK: a 1500-byte MTU, a token bucket that drops
/// what overflows its 64 KB queue, and `tcp_sack` off, so that TCP recovers by
/// retransmitting from the first lost byte and re-segments what it sends again (it may
/// merge segments the receiver already has into the retransmission). Everything the test
/// starts (proxy, backends, clients) runs in that namespace: threads inherit it.
///
/// The queue is smaller than a spliced source's first receive window (128 KiB, twice
/// that after the kernel's doubling), so that a sender overflows it even where it cannot
/// outrun the rate: with a 100 KB queue the emulated 6.1 and 6.12 guests lost nothing
/// once the engine owned that window, and the test, which needs losses, failed there.
/// At 30 KB the copy mode on the host stalled in retransmission backoff.
pub fn on_a_lossy_loopback<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            unshared,
            0,
            "unshare(CLONE_NEWNET) (needs root): {}",
            io::Error::last_os_error()
        );
        for (program, args) in [
            ("ip", &["link", "set", "lo", "mtu", "1500", "up"][..]),
            (
                "tc",
                &[
                    "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst", "64kb",
                    "limit", "64kb",
                ][..],
            ),
        ] {
            let status = external(program, "iproute2").args(args).status().unwrap();
            assert!(status.success(), "{program} {args:?}: {status}");
        }
        std::fs::write("/proc/sys/net/ipv4/tcp_sack", "0").unwrap();
        test()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
