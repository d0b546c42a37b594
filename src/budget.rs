//! One budget per run for what is in flight, shared by every unit and part:
//! bytes held in parts between the pipeline and the object store, requests
//! open to the object store, CPU-bound producers at once, and optionally an
//! upload rate.
//!
//! Why: a unit waits on the network far more than on the CPU when the
//! store is 10 ms away, and on the CPU when it is on loopback. Sizing
//! concurrency by the CPU count leaves a distant link idle, and sizing it by
//! units lets memory grow with `units × parts`. With a budget, the CPU
//! stages (tar, zstd, age) run on two threads per CPU (they also wait on
//! the disk), as many
//! units as the request budget allows wait on the network, and memory is
//! bounded by the byte budget whatever the number of units.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Bytes in flight by default: 64 MiB (8 parts of 8 MiB).
pub const DEFAULT_BYTES: usize = 64 << 20;

/// Requests in flight by default. Object stores serve many connections at
/// once; 32 keeps a 20 ms link busy with small objects.
pub const DEFAULT_REQUESTS: usize = 32;

/// How much a run may have in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of parts produced and not yet stored on every target.
    pub bytes: usize,
    /// Requests open to the object store.
    pub requests: usize,
    /// Producers (tar → zstd → age) at once: two per CPU, as a producer
    /// also waits on the disk (it reads the files it archives).
    pub cpus: usize,
    /// Upload rate in bytes per second, summed over targets (`None`: no cap).
    pub upload_rate: Option<u64>,
    /// Units whose stored object is at most this many bytes are written
    /// together, as byte ranges of shared objects of up to this size
    /// ([`crate::pack`]); 0: one object per unit.
    pub pack_size: usize,
}

/// Packs of small units: up to 8 MiB, one part, so one PUT per target.
pub const DEFAULT_PACK_SIZE: usize = 8 << 20;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            bytes: DEFAULT_BYTES,
            requests: DEFAULT_REQUESTS,
            cpus: 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            upload_rate: None,
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// The budget of one run; clone the `Arc` to share it.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    bytes: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    cpus: Arc<Semaphore>,
    rate: Option<Mutex<Instant>>,
}

/// Bytes held from the budget; given back when dropped.
#[derive(Debug)]
pub struct Held(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Held {
    /// Holds nothing (tests, and objects made whole in memory).
    pub fn nothing() -> Held {
        Held(None)
    }
}

/// A request slot; given back when dropped.
#[derive(Debug)]
pub struct Request(#[allow(dead_code)] OwnedSemaphorePermit);

/// A producer slot (one CPU); given back when dropped.
#[derive(Debug)]
pub struct Cpu(#[allow(dead_code)] OwnedSemaphorePermit);

impl Budget {
    pub fn new(limits: Limits) -> Arc<Budget> {
        let limits = Limits {
            bytes: limits.bytes.max(1),
            requests: limits.requests.max(1),
            cpus: limits.cpus.max(1),
            upload_rate: limits.upload_rate.filter(|r| *r > 0),
            ..limits
        };
        Arc::new(Budget {
            limits,
            bytes: Arc::new(Semaphore::new(limits.bytes.min(Semaphore::MAX_PERMITS))),
            requests: Arc::new(Semaphore::new(limits.requests)),
            cpus: Arc::new(Semaphore::new(limits.cpus)),
            rate: limits.upload_rate.map(|_| Mutex::new(Instant::now())),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Holds `n` bytes (at most the whole budget, so one part larger than
    /// the budget still goes, alone), waiting until they are free.
    pub async fn hold(&self, n: usize) -> Held {
        let n = n.clamp(1, self.limits.bytes) as u32;
        let permit = Arc::clone(&self.bytes)
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphore is never closed");
        Held(Some(permit))
    }

    /// [`Budget::hold`] that blocks the calling thread: call it from a
    /// blocking thread (the producer), never from async code.
    pub fn hold_blocking(&self, n: usize) -> Held {
        // tokio's semaphore needs no runtime: any thread may wait on it
        futures::executor::block_on(self.hold(n))
    }

    /// A request slot.
    pub async fn request(&self) -> Request {
        let permit = Arc::clone(&self.requests)
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed");
        Request(permit)
    }

    /// A producer slot. Blocks: from a blocking thread only.
    pub fn cpu_blocking(&self) -> Cpu {
        let permit = futures::executor::block_on(Arc::clone(&self.cpus).acquire_owned())
            .expect("the budget's semaphore is never closed");
        Cpu(permit)
    }

    /// Waits until `n` more bytes may be sent under the upload rate.
    pub async fn pace(&self, n: usize) {
        let (Some(rate), Some(next)) = (self.limits.upload_rate, &self.rate) else {
            return;
        };
        let due = {
            let mut next = next.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(n as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_bytes_never_exceed_the_budget_and_come_back() {
        let budget = Budget::new(Limits {
            bytes: 100,
            ..Limits::default()
        });
        let b = Arc::clone(&budget);
        let (first, second) = tokio::task::spawn_blocking(move || {
            let first = b.hold_blocking(60);
            // more than the whole budget is clamped to it, so it waits for all
            (first, std::thread::spawn(move || b.hold_blocking(1000)))
        })
        .await
        .unwrap();
        // (the waiter is handed the 40 free bytes meanwhile: tokio's
        // semaphore is fair, so a whole part is never starved by small ones)
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "waits while 60 bytes are held");
        drop(first);
        let whole = tokio::task::spawn_blocking(move || second.join().unwrap())
            .await
            .unwrap();
        assert_eq!(budget.bytes.available_permits(), 0);
        drop(whole);
        assert_eq!(budget.bytes.available_permits(), 100);
    }

    #[tokio::test]
    async fn the_upload_rate_spaces_sends() {
        let budget = Budget::new(Limits {
            upload_rate: Some(1_000_000),
            ..Limits::default()
        });
        let start = Instant::now();
        for _ in 0..5 {
            budget.pace(50_000).await;
        }
        // 4 × 50 kB waited for at 1 MB/s (the first goes at once)
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
    }
}
