//! A pool of `f32` buffers for the fused ops' scratch space and saved activations.
//!
//! A training step allocates the same large buffers again and again; fresh allocations cost
//! zero-filling and page faults that can take longer than the arithmetic. Buffers taken from the
//! pool hold stale (but initialised) values: every user overwrites them completely.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bytes the pool may keep.
const CAP_BYTES: usize = 1 << 30;

struct Pool {
    free: BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: BTreeMap::new(),
    bytes: 0,
});

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A buffer of exactly `n` values with unspecified contents (overwrite all of it).
#[must_use]
pub fn take(n: usize) -> Vec<f32> {
    {
        let mut p = lock();
        if let Some(v) = p.free.get_mut(&n).and_then(Vec::pop) {
            p.bytes -= n * 4;
            return v;
        }
    }
    vec![0.0; n]
}

/// Returns a buffer for reuse (dropped when the pool is full).
pub fn give(v: Vec<f32>) {
    let n = v.len();
    if n == 0 {
        return;
    }
    let mut p = lock();
    if p.bytes + n * 4 <= CAP_BYTES {
        p.bytes += n * 4;
        p.free.entry(n).or_default().push(v);
    }
}

/// Returns several buffers.
pub fn give_all(vs: impl IntoIterator<Item = Vec<f32>>) {
    for v in vs {
        give(v);
    }
}
