//! What the kernel may hold for spliced directions: the bound on each one
//! ([`Backlog::bytes`], `splice_backlog_max`) and on all of them together
//! ([`Backlog::total`], `splice_backlog_total`), and the account that keeps the second.
//!
//! A direction's credit lets the probe redirect up to its limit before the engine hears
//! of it again, so the kernel may come to hold all of it: the credit is a promise, and
//! the [`Budget`] counts every promise outstanding. Promises are generous while half the
//! budget is free and careful beyond:
//! - A pair joins with the per-direction bound for each direction while that leaves half
//!   the budget free, and with [`FIRST_CREDIT`] each beyond. If the budget cannot give
//!   it even that, the pair is copied, as a pair the maps have no room for is.
//! - At each request for credit, and each time its credit ran out, a direction's promise
//!   grows to the bound while that leaves half the budget free, and doubles beyond, as
//!   far as the budget allows short of a quarter kept for new pairs, so that directions
//!   that grew cannot shut every later connection out of the kernel.
//! - A promise is given back when its pair ends. A direction whose reader stopped holds
//!   what it was promised, no more: under load, what it had reached by doubling.
//! - While new pairs no longer join with the bound, the engine takes back what idle
//!   directions were promised (splice/flow.rs, `KernelFlow::reclaim`), so that a
//!   connection that moved a bulk transfer once and sat idle since does not keep a
//!   bound's worth promised for good, and idle connections, however many, hold none of
//!   the budget: a direction's next message after that parks and asks, as a new
//!   direction's would past its first credit.
//!
//! docs/flow-control.md, "A bound on all directions together", has the measurements.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::config::{DEFAULT_SPLICE_BACKLOG_MAX, DEFAULT_SPLICE_BACKLOG_TOTAL};

/// The credit a direction is promised when its pair joins once half the budget is
/// promised, and the least a grant gives it (at a `splice_backlog_max` below it, that
/// bound): small, because a connection keeps it promised until it has been idle for a
/// sweep or two, so that the default budget's other half gives 32,768 pairs their first
/// credits at once (the soak holds 9,850 connections in one process, the hold benchmark
/// 7,952); a page, so that a request of most request-response protocols goes through
/// before the direction asks for more.
pub const FIRST_CREDIT: u64 = 4 * 1024;

/// How far spliced directions may run ahead of their destinations: the bytes the probe may
/// have redirected that the destination's kworker has not yet written into the
/// destination's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// For one direction: routes.toml's `splice_backlog_max`.
    pub bytes: u64,
    /// For every direction together: routes.toml's `splice_backlog_total`.
    pub total: u64,
}

impl Default for Backlog {
    /// routes.toml's defaults.
    fn default() -> Backlog {
        Backlog {
            bytes: DEFAULT_SPLICE_BACKLOG_MAX,
            total: DEFAULT_SPLICE_BACKLOG_TOTAL,
        }
    }
}

impl Backlog {
    /// The least a direction is promised.
    pub fn least_credit(self) -> u64 {
        FIRST_CREDIT.min(self.bytes)
    }
}

/// The account of promises, shared by every worker of a proxy.
#[derive(Debug)]
pub struct Budget {
    bytes: AtomicU64,
    total: AtomicU64,
    /// Bytes promised to directions that have not ended.
    promised: AtomicU64,
    /// Pairs copied because the budget could not promise them their first credit.
    refused: AtomicU64,
}

impl Budget {
    /// An account with nothing promised yet.
    pub fn new(backlog: Backlog) -> Budget {
        Budget {
            bytes: AtomicU64::new(backlog.bytes),
            total: AtomicU64::new(backlog.total),
            promised: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The bounds from now on. Promises already made stay until their directions next
    /// ask; a total below what is promised only stops new promises until enough end.
    pub fn set(&self, backlog: Backlog) {
        self.bytes.store(backlog.bytes, Ordering::Relaxed);
        self.total.store(backlog.total, Ordering::Relaxed);
    }

    /// The bounds now.
    pub fn backlog(&self) -> Backlog {
        Backlog {
            bytes: self.bytes.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }

    /// Whether a pair joining now would not get the bound for its directions: then the
    /// engine takes back what idle directions were promised.
    pub fn is_tight(&self) -> bool {
        let backlog = self.backlog();
        self.promised() + 2 * backlog.bytes > backlog.total / 2
    }

    /// Bytes promised to spliced directions now: the most the kernel can hold for them.
    pub fn promised(&self) -> u64 {
        self.promised.load(Ordering::Relaxed)
    }

    /// Pairs copied so far because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The first credits of a pair's two directions, or `None` (counted) if the budget
    /// cannot promise both.
    pub fn promise_pair(self: &Arc<Budget>) -> Option<[Promise; 2]> {
        let backlog = self.backlog();
        let first = if self.is_tight() {
            backlog.least_credit()
        } else {
            backlog.bytes
        };
        if self.take(2 * first, 0, true) == 0 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some([0, 1].map(|_| Promise {
            budget: Arc::clone(self),
            bytes: first,
        }))
    }

    /// Takes up to `want` bytes (exactly `want` or nothing if `whole`), leaving `keep`
    /// unpromised; what it took.
    fn take(&self, want: u64, keep: u64, whole: bool) -> u64 {
        let total = self.total.load(Ordering::Relaxed);
        let mut promised = self.promised.load(Ordering::Relaxed);
        loop {
            let free = total.saturating_sub(keep).saturating_sub(promised);
            let took = if whole && free < want {
                0
            } else {
                want.min(free)
            };
            if took == 0 {
                return 0;
            }
            match self.promised.compare_exchange_weak(
                promised,
                promised + took,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return took,
                Err(now) => promised = now,
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.promised.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// What one direction is promised: the span of its credit past what its destination had
/// taken when it was granted. Given back when dropped, which is when the pair ends.
#[derive(Debug)]
pub struct Promise {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Promise {
    /// The span promised.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what is promised beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    /// The credit span for the next grant: the per-direction bound while that leaves
    /// half the budget unpromised, twice the last span beyond, as far as the budget
    /// allows beyond the quarter kept for new pairs; never less than `committed`, the
    /// part of the last credit the probe may still use. A per-direction bound lowered by
    /// a reload shrinks it to that bound (or to `committed`).
    pub fn renew(&mut self, committed: u64) -> u64 {
        let backlog = self.budget.backlog();
        let plenty =
            self.budget.promised() + backlog.bytes.saturating_sub(self.bytes) <= backlog.total / 2;
        let want = if plenty {
            backlog.bytes
        } else {
            (2 * self.bytes).clamp(backlog.least_credit(), backlog.bytes)
        }
        .max(committed);
        if want <= self.bytes {
            self.budget.give_back(self.bytes - want);
            self.bytes = want;
        } else {
            self.bytes += self
                .budget
                .take(want - self.bytes, backlog.total / 4, false);
        }
        self.bytes
    }
}

#[cfg(test)]
impl Promise {
    /// A first credit from a budget of its own, for tests that never reach the maps.
    pub(crate) fn for_tests() -> Promise {
        let [promise, _] = Arc::new(Budget::new(Backlog::default()))
            .promise_pair()
            .expect("an empty budget has room for a pair");
        promise
    }
}

impl Drop for Promise {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64, total: u64) -> Arc<Budget> {
        Arc::new(Budget::new(Backlog { bytes, total }))
    }

    #[test]
    fn a_pair_joins_only_with_both_first_credits() {
        let budget = budget(16 << 20, 5 * FIRST_CREDIT);
        let first = budget.promise_pair().expect("room for one pair");
        let second = budget.promise_pair().expect("room for two pairs");
        assert!(budget.promise_pair().is_none(), "one credit left, not two");
        assert_eq!(budget.promised(), 4 * FIRST_CREDIT);
        assert_eq!(budget.refused(), 1);
        drop(first);
        assert_eq!(budget.promised(), 2 * FIRST_CREDIT);
        assert!(budget.promise_pair().is_some());
        drop(second);
    }

    #[test]
    fn while_half_the_budget_is_free_a_pair_joins_with_the_bound() {
        let budget = budget(1 << 20, 8 << 20);
        let generous: Vec<_> = (0..2).map_while(|_| budget.promise_pair()).collect();
        assert_eq!(budget.promised(), 4 << 20);
        let [a, b] = budget.promise_pair().unwrap();
        assert_eq!((a.bytes(), b.bytes()), (FIRST_CREDIT, FIRST_CREDIT));
        drop((generous, a, b));
        assert_eq!(budget.promised(), 0);
    }

    #[test]
    fn past_half_the_budget_a_promise_doubles_up_to_the_bound() {
        let budget = budget(1 << 20, 8 << 20);
        let _generous: Vec<_> = (0..2).map_while(|_| budget.promise_pair()).collect();
        let [mut a, _b] = budget.promise_pair().unwrap();
        let spans: Vec<u64> = (0..6).map(|_| a.renew(0)).collect();
        assert_eq!(
            spans,
            [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10]
        );
    }

    #[test]
    fn while_half_the_budget_is_free_a_promise_grows_to_the_bound_at_once() {
        // Pairs that joined under a bound of one first credit, raised by a reload.
        let budget = budget(FIRST_CREDIT, 8 << 20);
        let mut pairs: Vec<_> = (0..8).map_while(|_| budget.promise_pair()).collect();
        budget.set(Backlog {
            bytes: 1 << 20,
            total: 8 << 20,
        });
        let [a, _] = &mut pairs[0];
        assert_eq!(a.bytes(), FIRST_CREDIT);
        assert_eq!(a.renew(0), 1 << 20);
    }

    #[test]
    fn a_shrunk_promise_gives_back_the_rest() {
        let budget = budget(1 << 20, 4 << 20);
        let [mut a, b] = budget.promise_pair().unwrap();
        assert!(
            budget.is_tight(),
            "2 MiB promised of 4: the next pair gets less"
        );
        a.shrink_to(FIRST_CREDIT);
        a.shrink_to(1 << 20);
        assert_eq!(a.bytes(), FIRST_CREDIT, "shrinking never grows");
        assert_eq!(budget.promised(), (1 << 20) + FIRST_CREDIT);
        drop((a, b));
        assert!(!budget.is_tight());
    }

    #[test]
    fn growth_leaves_a_quarter_for_new_pairs() {
        let total = 64 * FIRST_CREDIT;
        let budget = budget(1 << 30, total);
        let [mut a, _b] = budget.promise_pair().unwrap();
        for _ in 0..20 {
            a.renew(0);
        }
        assert_eq!(budget.promised(), total - total / 4);
        let pairs: Vec<_> = (0..8).map_while(|_| budget.promise_pair()).collect();
        assert_eq!(
            pairs.len(),
            8,
            "a quarter of the total is 8 pairs' first credits"
        );
        assert!(budget.promise_pair().is_none());
    }

    #[test]
    fn a_promise_keeps_what_the_probe_may_still_use() {
        let budget = budget(1 << 20, 2 * FIRST_CREDIT);
        let [mut a, _b] = budget.promise_pair().unwrap();
        // Nothing left to grow by: the span stays, and a committed part larger than
        // the bound (a reload lowered it) is kept until the direction uses it up.
        assert_eq!(a.renew(0), FIRST_CREDIT);
        budget.set(Backlog {
            bytes: 1024,
            total: 2 * FIRST_CREDIT,
        });
        assert_eq!(a.renew(FIRST_CREDIT / 2), FIRST_CREDIT / 2);
        assert_eq!(a.renew(0), 1024);
        assert_eq!(budget.promised(), FIRST_CREDIT + 1024);
    }
}
