//! A `moppa train --serve` process for tests: spawned, its address read from its `serving on`
//! line, its stderr kept, killed when dropped; and the helpers of the tests that use it.

use serde_json::Value;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `moppa train --serve` process: its address (from the `serving on` line) and its stderr.
pub struct Served {
    /// The process.
    pub child: Child,
    /// `HOST:PORT` it serves on.
    pub addr: String,
    stderr: Arc<Mutex<String>>,
    /// The thread reading stderr; it ends at the pipe's end, after the process's last line.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    /// Starts `moppa ARGS` and waits for its `serving on` line.
    pub fn spawn(args: &[String]) -> Self {
        Self::spawn_with(args, &[])
    }

    /// Starts `moppa ARGS` (with `envs` set) and waits for its `serving on` line.
    pub fn spawn_with(args: &[String], envs: &[(&str, &str)]) -> Self {
        // MOPPA_HOSTILE_BIN: another binary (an older one, to see a test fail on it).
        let bin = std::env::var("MOPPA_HOSTILE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moppa").to_owned());
        let mut child = Process::new(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (pipe, log) = (child.stderr.take().unwrap(), stderr.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("serving on ") {
                    tx.send(addr.trim().to_owned()).ok();
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no `serving on` line: {}", stderr.lock().unwrap()));
        Self {
            child,
            addr,
            stderr,
            reader: Some(reader),
        }
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to exit; its status code.
    pub fn wait(mut self) -> (i32, String) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Every line the process wrote is in the log once its reader has seen the end.
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return (st.code().unwrap_or(-1), self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the run did not end: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A fresh folder under the target dir for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path as an argument.
pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// `moppa train` on the micro backbone and the built-in digits into `out`: `steps` steps,
/// evaluations every 250, batch 16, one thread, seed 3; `extra` appended.
pub fn train_args(micro: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--backbone", &s(micro), "--steps", &steps.to_string()]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for a in [
        "--eval-every",
        "250",
        "--batch",
        "16",
        "--threads",
        "1",
        "--seed",
        "3",
        "--out",
        &s(out),
    ] {
        v.push(a.to_owned());
    }
    v.extend(extra.iter().map(|a| (*a).to_owned()));
    v
}

/// The progress records written so far.
pub fn progress_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.matches(r#""kind":"progress""#).count())
}

/// Waits (two minutes at most) until `ok`.
pub fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What must not differ between two runs of one seed: every record but its timings and paths.
pub fn comparable(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| matches!(r["kind"].as_str(), Some("progress" | "eval" | "finished")))
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            for k in ["time_s", "img_per_s", "checkpoints"] {
                o.remove(k);
            }
            r
        })
        .collect()
}
