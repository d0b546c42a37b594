//! Values worth keeping between units: zstd contexts and copy buffers.
//!
//! Why: a zstd context holds its window and tables (up to a few MiB at level
//! 3) and a copy buffer is 256 KiB; made anew per unit, that memory is
//! faulted in and zeroed by the kernel again for every unit, which showed as
//! ~5 % of the CPU of a restore of 2,000 users. A pool keeps at most
//! [`KEEP`] idle values: the stages that use them are bounded by the CPU
//! budget, so few are busy at once, and more would only be memory held while
//! idle.

use std::sync::Mutex;

const KEEP: usize = 8;

/// Idle values of one kind, and how to make another.
pub struct Pool<T> {
    free: Mutex<Vec<T>>,
    make: fn() -> T,
}

impl<T> Pool<T> {
    pub const fn new(make: fn() -> T) -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            make,
        }
    }

    /// Drops the idle values: memory the rest of a run has no use for.
    pub fn clear(&self) {
        self.free.lock().expect("pool lock").clear();
    }

    /// An idle value, or a new one; it comes back when the guard is dropped.
    pub fn take(&'static self) -> Pooled<T> {
        let item = self.free.lock().expect("pool lock").pop();
        Pooled {
            pool: self,
            item: Some(item.unwrap_or_else(self.make)),
        }
    }
}

/// A value taken from a [`Pool`].
pub struct Pooled<T: 'static> {
    pool: &'static Pool<T>,
    item: Option<T>,
}

impl<T> std::ops::Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item.as_ref().expect("taken until dropped")
    }
}

impl<T> std::ops::DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.item.as_mut().expect("taken until dropped")
    }
}

impl<T> Drop for Pooled<T> {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().expect("pool lock");
        if free.len() < KEEP
            && let Some(item) = self.item.take()
        {
            free.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NUMBERS: Pool<Vec<u32>> = Pool::new(Vec::new);

    #[test]
    fn a_value_comes_back_and_at_most_keep_wait() {
        {
            let mut a = NUMBERS.take();
            a.push(7);
        }
        assert_eq!(
            *NUMBERS.take(),
            vec![7],
            "the idle value is handed out again"
        );
        let many: Vec<_> = (0..KEEP + 3).map(|_| NUMBERS.take()).collect();
        drop(many);
        assert_eq!(NUMBERS.free.lock().unwrap().len(), KEEP);
        NUMBERS.clear();
        assert!(
            NUMBERS.take().is_empty(),
            "a cleared pool makes a new value"
        );
    }
}
