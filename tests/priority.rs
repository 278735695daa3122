//! Training under a display: every core, at a lower priority than the display thread.
//!
//! Its own test binary (process): the test reads the nice value of the threads named
//! `moppa-compute-*` in this process, which no other test's worker may own at the same time.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use moppa_studio::config::RunConfig;
use moppa_studio::train::protocol::{Command, Event};
use moppa_studio::train::worker::UI_COMPUTE_NICE;
use moppa_studio::train::{WorkerHandle, WorkerOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::micro_backbone;

/// The nice value in a /proc task's `stat`: field 19, the 17th after the parenthesised name.
fn nice_of(stat: &str) -> i64 {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split_whitespace().nth(16).unwrap().parse().unwrap()
}

/// (name, nice) of this process's threads, from /proc/self/task/TID/{comm,stat}.
fn threads() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = entry.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        out.push((comm.trim().to_owned(), nice_of(&stat)));
    }
    out
}

#[test]
fn training_under_a_display_uses_every_core_at_a_lower_priority_than_the_display() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RunConfig {
        backbone: micro_backbone(dir.path()).display().to_string(),
        steps: Some(1000),
        batch: 8,
        eval_every: 0,
        ..RunConfig::default()
    };
    assert_eq!(cfg.threads, None, "the app leaves the thread count to the worker");
    let base = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    let cores = std::thread::available_parallelism().unwrap().get();
    let h = WorkerHandle::spawn(
        cfg,
        WorkerOptions {
            autostart: true,
            ..WorkerOptions::with_ui(Arc::new(|| {}))
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        assert!(Instant::now() < deadline, "no Started event");
        if let Ok(Event::Started(info)) = h.events().recv_timeout(Duration::from_millis(200)) {
            break info;
        }
    };
    assert_eq!(info.threads, cores, "training gets every core, as headless");
    // Wait until it trains: every pool thread exists and has run its start handler.
    while !matches!(
        h.events().recv_timeout(Duration::from_millis(200)),
        Ok(Event::Progress(_))
    ) {
        assert!(Instant::now() < deadline, "no Progress event");
    }
    let all = threads();
    let compute: Vec<&(String, i64)> = all.iter().filter(|(n, _)| n.starts_with("moppa-compute")).collect();
    assert_eq!(compute.len(), cores, "one compute thread per core: {all:?}");
    // Relative to the display's thread (this one stands for it), whatever nice the tests were
    // started under (`nice cargo test`).
    let want = (base + i64::from(UI_COMPUTE_NICE)).min(19);
    for (name, nice) in &compute {
        assert_eq!(
            *nice, want,
            "{name} runs at nice {nice} (the display's thread at {base})"
        );
    }
    let me = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    assert_eq!(me, base, "the test's own thread is not lowered: {all:?}");
    h.send(Command::Stop).unwrap();
}
