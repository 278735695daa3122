//! A panic in a thread of the engine is a failed run, not a silent one: [`catch`] runs a thread's
//! body and turns a panic into its message and location, and [`fault`] is the test-only hook
//! that provokes one (feature `fault-injection`, which only the tests enable).

use std::any::Any;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::{Mutex, Once, PoisonError};

/// The locations of recent panics by message: the hook runs on the thread that panicked, which
/// may be a pool thread (rayon's `install` resumes the panic on the caller, message only).
static RECENT: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn message_of(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

fn note(info: &PanicHookInfo<'_>) {
    let Some(l) = info.location() else { return };
    let mut recent = RECENT.lock().unwrap_or_else(PoisonError::into_inner);
    if recent.len() >= 16 {
        recent.remove(0);
    }
    recent.push((message_of(info.payload()), format!("{}:{}", l.file(), l.line())));
}

/// Runs `body`; a panic in it (or in a pool thread it waits for) becomes `Err(message and
/// location)`. The process's panic hook still runs (it prints the panic to stderr), after this
/// module noted the location.
pub fn catch<T>(body: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            note(info);
            previous(info);
        }));
    });
    std::panic::catch_unwind(AssertUnwindSafe(body)).map_err(|payload| {
        let message = message_of(payload.as_ref());
        let mut recent = RECENT.lock().unwrap_or_else(PoisonError::into_inner);
        match recent.iter().rposition(|(m, _)| *m == message) {
            Some(i) => format!("{message} (at {})", recent.remove(i).1),
            None => message,
        }
    })
}

/// Whether the fault `name` is armed for `step` by `MOPPA_FAULT` (`NAME` or `NAME@STEP`):
/// `worker-panic@N` (the trainer panics before step N), `loader-panic` (the data loader panics
/// at its first batch), `nonfinite-state@N` (the checkpoint state of step N holds a NaN). Always
/// false without the `fault-injection` feature.
#[must_use]
pub fn fault(name: &str, step: u64) -> bool {
    #[cfg(feature = "fault-injection")]
    {
        let Ok(spec) = std::env::var("MOPPA_FAULT") else {
            return false;
        };
        match spec.split_once('@') {
            Some((n, at)) => n == name && at.parse() == Ok(step),
            None => spec == name,
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = (name, step);
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message_and_location() {
        let r: Result<(), String> = super::catch(|| panic!("boom {}", 7));
        let e = r.expect_err("it panicked");
        assert!(e.starts_with("boom 7 (at src/panics.rs:"), "{e}");
        assert_eq!(super::catch(|| 3), Ok(3));
    }
}
