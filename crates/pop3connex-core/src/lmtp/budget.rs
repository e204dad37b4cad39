//! The in-flight DATA byte budget shared by every LMTP connection.
//!
//! Each connection buffers the message it is receiving until the final dot
//! (it is sealed and committed as a whole, so nothing is acknowledged before
//! it is durable). Without a shared cap, N slow or large transactions hold
//! N x `max_message_size` of memory at once; with the default limits that is
//! 64 x 25 MiB. The budget bounds the sum: a connection reserves bytes before
//! it buffers them, and a transaction whose data does not fit is consumed to
//! its end without buffering and answered `452 4.3.1` per recipient.
//!
//! Reservations are RAII guards ([`Held`]): they are released on every path
//! (delivery, refusal, I/O error, disconnect, a dropped future).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of message data all LMTP connections may buffer together.
#[derive(Debug)]
pub struct DataBudget {
    limit: u64,
    used: AtomicU64,
}

impl DataBudget {
    pub fn new(limit: u64) -> Self {
        Self { limit, used: AtomicU64::new(0) }
    }

    /// Bytes not reserved by anyone right now.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used.load(Ordering::Acquire))
    }

    fn try_take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// An empty reservation to grow with [`Held::grow_to`].
    pub fn hold(&self) -> Held<'_> {
        Held { budget: self, bytes: 0 }
    }
}

/// Bytes reserved from a [`DataBudget`]; given back on drop.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a DataBudget,
    bytes: u64,
}

impl Held<'_> {
    /// Grows the reservation to `total` bytes; false (and unchanged) if the
    /// budget does not have that much left.
    pub fn grow_to(&mut self, total: u64) -> bool {
        if total <= self.bytes {
            return true;
        }
        if self.budget.try_take(total - self.bytes) {
            self.bytes = total;
            true
        } else {
            false
        }
    }

    /// Gives everything back early.
    pub fn release(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.bytes = 0;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_released_on_drop() {
        let budget = DataBudget::new(100);
        let mut a = budget.hold();
        assert!(a.grow_to(60));
        let mut b = budget.hold();
        assert!(!b.grow_to(41), "60 + 41 exceeds the budget");
        assert!(b.grow_to(40));
        assert_eq!(budget.available(), 0);
        assert!(a.grow_to(50), "shrinking requests keep what is held");
        drop(a);
        assert_eq!(budget.available(), 60);
        b.release();
        assert_eq!(budget.available(), 100);
        drop(b);
        assert_eq!(budget.available(), 100, "release then drop gives back once");
        let mut c = budget.hold();
        assert!(!c.grow_to(u64::MAX), "no overflow");
    }
}
