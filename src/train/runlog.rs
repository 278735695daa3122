//! The run log: `metrics.jsonl` (every event but snapshots, one JSON object per line) and
//! `metrics.csv` (progress and evaluations), written by the engine itself so curves are
//! complete whatever the display does. Resumed runs append.

use super::protocol::Event;
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::Path;

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
}

fn open(path: &Path) -> std::io::Result<(File, bool)> {
    let existed = path.exists() && std::fs::metadata(path)?.len() > 0;
    Ok((OpenOptions::new().create(true).append(true).open(path)?, existed))
}

impl RunLog {
    /// Starts `dir/metrics.jsonl` and `dir/metrics.csv` afresh (a pretraining run folder).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        for name in ["metrics.jsonl", "metrics.csv"] {
            File::create(dir.join(name))?;
        }
        Self::open(dir)
    }

    /// Opens (or appends to) `dir/metrics.jsonl` and `dir/metrics.csv`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (jsonl, _) = open(&dir.join("metrics.jsonl"))?;
        let (csv, existed) = open(&dir.join("metrics.csv"))?;
        let mut csv = BufWriter::new(csv);
        if !existed {
            writeln!(csv, "{CSV_HEADER}")?;
        }
        Ok(Self {
            jsonl: BufWriter::new(jsonl),
            csv,
        })
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
                "method": info.method, "trainable": info.trainable, "device": info.device, "threads": info.threads}),
            Event::Snapshot(_) | Event::Paused { .. } | Event::Resumed { .. } => return None,
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
