//! The run log: `metrics.jsonl` (every event but snapshots, one JSON object per line, plus a
//! heartbeat at least every 10 s) and `metrics.csv` (progress and evaluations), written by the
//! engine itself so curves are complete whatever the display does. Resumed runs append; a line
//! cut by a crash is ended before the next one.

use super::protocol::Event;
use super::runfolder::{METRICS_CSV, METRICS_JSONL};
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A heartbeat is written when nothing else was for this long (INTERFACES.md: at least every
/// 10 s; a reader calls a run crashed after 30 s without a line).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// CSV header.
pub const CSV_HEADER: &str = "kind,step,time_s,split,loss,route_loss,acc,lr,img_per_s";

/// One `progress` row of `metrics.csv` (the app's CSV export writes the same rows).
#[must_use]
pub fn csv_progress_row(
    step: f64,
    time_s: f64,
    loss: f64,
    route_loss: f64,
    train_acc: f64,
    lr: f64,
    img_per_s: f64,
) -> String {
    format!("progress,{step},{time_s:.4},,{loss},{route_loss},{train_acc},{lr},{img_per_s:.2}")
}

/// One `eval` row of `metrics.csv`.
#[must_use]
pub fn csv_eval_row(step: f64, time_s: f64, split: &str, loss: f64, acc: f64) -> String {
    format!("eval,{step},{time_s:.4},{split},{loss},,{acc},,")
}

/// Appends events to the two files.
pub struct RunLog {
    jsonl: BufWriter<File>,
    csv: BufWriter<File>,
    last_write: Instant,
}

/// Opens a file for appending; whether it had content, and whether that content ends mid-line.
fn open(path: &Path) -> std::io::Result<(File, bool, bool)> {
    let existed = path.exists() && std::fs::metadata(path)?.len() > 0;
    let cut = existed && std::fs::read(path).is_ok_and(|b| b.last() != Some(&b'\n'));
    Ok((OpenOptions::new().create(true).append(true).open(path)?, existed, cut))
}

impl RunLog {
    /// Starts `dir/metrics.jsonl` and `dir/metrics.csv` afresh (a pretraining run folder).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        for name in [METRICS_JSONL, METRICS_CSV] {
            File::create(dir.join(name))?;
        }
        Self::open(dir)
    }

    /// Opens (or appends to) `dir/metrics.jsonl` and `dir/metrics.csv`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (jsonl, _, jsonl_cut) = open(&dir.join(METRICS_JSONL))?;
        let (csv, existed, csv_cut) = open(&dir.join(METRICS_CSV))?;
        let (mut jsonl, mut csv) = (BufWriter::new(jsonl), BufWriter::new(csv));
        // A line cut by a crash (kill -9 mid-write): end it, so the next record stands alone.
        if jsonl_cut {
            writeln!(jsonl)?;
        }
        if csv_cut {
            writeln!(csv)?;
        }
        if !existed {
            writeln!(csv, "{CSV_HEADER}")?;
        }
        Ok(Self {
            jsonl,
            csv,
            last_write: Instant::now(),
        })
    }

    /// Writes a heartbeat line if nothing was written for [`HEARTBEAT_EVERY`].
    pub fn heartbeat(&mut self, step: u64, time_s: f64) -> std::io::Result<()> {
        if self.last_write.elapsed() < HEARTBEAT_EVERY {
            return Ok(());
        }
        writeln!(
            self.jsonl,
            "{}",
            json!({"kind": "heartbeat", "step": step, "time_s": time_s})
        )?;
        self.last_write = Instant::now();
        self.jsonl.flush()
    }

    /// The JSON line of an event (`None` for events that are not logged: snapshots, pauses).
    #[must_use]
    pub fn json(event: &Event) -> Option<serde_json::Value> {
        Some(match event {
            Event::Progress(p) => {
                let mut v = json!({"kind": "progress", "step": p.step, "time_s": p.time_s, "epoch": p.epoch,
                    "loss": p.loss, "route_loss": p.route_loss, "train_acc": p.train_acc, "lr": p.lr, "img_per_s": p.img_per_s});
                if let Some(c) = p.class_loss {
                    v["class_loss"] = json!(c);
                }
                v
            }
            Event::Eval(e) => json!({"kind": "eval", "step": e.step, "time_s": e.time_s, "split": e.split,
                "loss": e.loss, "acc": e.acc, "per_class_acc": e.per_class_acc}),
            Event::Applied(a) => json!({"kind": "applied", "step": a.step, "time_s": a.time_s,
                "command": a.command, "target": a.target, "old": a.old, "new": a.new}),
            Event::Warning(n) | Event::Error(n) | Event::Diverged(n) => {
                let kind = if matches!(event, Event::Warning(_)) {
                    "warning"
                } else {
                    "error"
                };
                let mut v = json!({"kind": kind, "step": n.step, "time_s": n.time_s, "message": n.message});
                if matches!(event, Event::Diverged(_)) {
                    v["diverged"] = json!(true);
                }
                if let Some(p) = &n.path {
                    v["path"] = json!(p.display().to_string());
                }
                if let Some(l) = n.line {
                    v["line"] = json!(l);
                }
                v
            }
            Event::Finished(f) => {
                let mut v = json!({"kind": "finished", "step": f.steps, "time_s": f.time_s,
                    "reason": f.reason, "best_val_acc": f.best_val_acc, "test_acc": f.test_acc,
                    "checkpoints": f.checkpoints.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()});
                if let Some(m) = &f.message {
                    v["message"] = json!(m);
                }
                if let Some(p) = &f.path {
                    v["path"] = json!(p.display().to_string());
                }
                v
            }
            Event::Started(info) => json!({"kind": "started", "step": info.start_step, "time_s": 0.0,
                "method": info.method, "trainable": info.trainable, "device": info.device, "threads": info.threads,
                "info": serde_json::to_value(info).unwrap_or_default()}),
            Event::Snapshot(_) | Event::Paused { .. } | Event::Resumed { .. } | Event::RunFile { .. } => return None,
        })
    }

    /// Appends one event (snapshots are not logged).
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let Some(v) = Self::json(event) else { return Ok(()) };
        writeln!(self.jsonl, "{v}")?;
        match event {
            Event::Progress(p) => writeln!(
                self.csv,
                "{}",
                csv_progress_row(
                    p.step as f64,
                    p.time_s,
                    p.loss,
                    p.route_loss,
                    p.train_acc,
                    p.lr,
                    p.img_per_s
                )
            )?,
            Event::Eval(e) => writeln!(
                self.csv,
                "{}",
                csv_eval_row(e.step as f64, e.time_s, &e.split, e.loss, e.acc)
            )?,
            _ => {}
        }
        // One flush per event: a crash never leaves a half-written line.
        self.last_write = Instant::now();
        self.flush()
    }

    /// Flushes both files.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.jsonl.flush()?;
        self.csv.flush()
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        self.flush().ok();
    }
}

/// The thread that keeps a run log's heartbeat going while the worker is busy (a long step) or
/// idle (paused): every second it writes one if nothing else was written for a while. Stops when
/// dropped.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating into `log`, reading the step from `step` and the run's clock from `clock`
    /// (its start and the seconds before it: resumed runs continue the clock).
    pub fn start(log: Arc<Mutex<RunLog>>, step: Arc<AtomicU64>, clock: (Instant, f64)) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("moppa-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok(mut log) = log.lock() {
                        let t = clock.1 + clock.0.elapsed().as_secs_f64();
                        // A failed heartbeat is a full disk the next real write reports.
                        log.heartbeat(step.load(Ordering::Relaxed), t).ok();
                    }
                }
            })?;
        Ok(Self { stop, join: Some(join) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(j) = self.join.take() {
            j.join().ok();
        }
    }
}
