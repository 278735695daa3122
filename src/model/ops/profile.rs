//! An opt-in, synchronising section profiler for the GPU path (`MOPPA_PROFILE_SYNC=1`).
//!
//! With the variable set, each [`section`] synchronises the device before and after its body and
//! adds the wall time to a per-name total; `moppa bench` prints the table. This serialises the
//! GPU, so the totals show where the time goes, not the overlapped step time. Without the
//! variable a section is a plain call.

use candle_core::{Device, Result};
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type Table = Mutex<BTreeMap<&'static str, (f64, u64)>>;

fn table() -> Option<&'static Table> {
    static T: OnceLock<Option<Table>> = OnceLock::new();
    T.get_or_init(|| {
        std::env::var_os("MOPPA_PROFILE_SYNC")
            .filter(|v| v != "0")
            .map(|_| Mutex::new(BTreeMap::new()))
    })
    .as_ref()
}

/// Whether profiling is on.
#[must_use]
pub fn enabled() -> bool {
    table().is_some()
}

/// Runs `f`, timed under `name` when profiling is on.
pub fn section<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(t) = table() else {
        return f();
    };
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let dt = start.elapsed().as_secs_f64();
    if let Ok(mut map) = t.lock() {
        let e = map.entry(name).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
    Ok(out)
}

/// Clears the totals (after a warm-up).
pub fn reset() {
    if let Some(t) = table()
        && let Ok(mut map) = t.lock()
    {
        map.clear();
    }
}

/// `(name, total seconds, calls)`, largest first.
#[must_use]
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let Some(t) = table() else {
        return Vec::new();
    };
    let mut v: Vec<_> = t
        .lock()
        .map(|m| m.iter().map(|(k, (s, n))| (*k, *s, *n)).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
