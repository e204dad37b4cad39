//! Memory of one LMTP transaction, measured with a counting allocator.
//!
//! A test binary of its own: the allocator counts every allocation of the
//! process, so no other test may run beside this one.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::Fixture;
use pop3connex_core::config::LmtpConfig;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as old and new both live: a moving realloc holds both.
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const RECIPIENTS: usize = 20;
const BODY_SIZE: usize = 2 * 1024 * 1024;

/// Finding: one message to many local recipients held a plaintext and a
/// sealed copy per recipient until the commit (RSS grew by recipients x
/// size x 2). Now the body is held once and the store seals one copy at a
/// time, so the peak is a small multiple of the message size whatever the
/// recipient count.
#[tokio::test]
async fn lmtp_memory_does_not_grow_with_recipients() {
    let f = Fixture::new("lmtp-memory").await;
    for i in 0..RECIPIENTS {
        f.add_user(&format!("r{i}")).await;
    }
    let line = format!("{}\r\n", "x".repeat(78));
    let mut data = String::from("Subject: big\r\n\r\n");
    while data.len() < BODY_SIZE {
        data.push_str(&line);
    }
    data.push_str(".\r\n");

    let mut c = f.connect_lmtp(LmtpConfig::default());
    assert!(c.line().await.starts_with("220"));
    c.send("LHLO client\r\n").await;
    while c.line().await.starts_with("250-") {}
    assert!(c.cmd("MAIL FROM:<sender@example.org>").await.starts_with("250"));
    for i in 0..RECIPIENTS {
        assert!(c.cmd(&format!("RCPT TO:<r{i}@example.org>")).await.starts_with("250"));
    }
    assert!(c.cmd("DATA").await.starts_with("354"));

    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    c.send(&data).await;
    for i in 0..RECIPIENTS {
        assert!(c.line().await.starts_with("250 2.0.0"), "recipient {i}");
    }
    let growth = PEAK.load(Ordering::SeqCst).saturating_sub(before);
    // The body buffer (capacity up to twice its length while it grows) plus
    // one sealed copy: four message sizes leave room for the read buffers.
    // Holding a copy per recipient needs RECIPIENTS x size (here 10x more).
    let bound = 4 * BODY_SIZE;
    println!("peak allocation growth: {growth} bytes ({:.2}x the message)", growth as f64 / BODY_SIZE as f64);
    assert!(
        growth <= bound,
        "peak allocation grew by {growth} bytes for a {BODY_SIZE}-byte message to {RECIPIENTS} recipients \
         (bound {bound})"
    );
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    for i in 0..RECIPIENTS {
        assert_eq!(f.count(&format!("r{i}")).await, 1, "r{i} has the message");
    }
}
