//! A run folder read back as the engine's [`Event`]s: `metrics.jsonl` (progress, evaluations,
//! applied commands, notices, the end) and `snapshots.jsonl` (the internals, filters recomputed),
//! for a finished run opened later, a run another process is still writing (followed: each poll
//! returns what was appended; a half-written last line waits for its end), and the history a
//! late network viewer receives. The same seam as a live run, another transport.

use super::protocol::{
    Applied, EvalResult, Event, FinishReason, Finished, Notice, Probe, ProbeOrigin, Progress, Rgb, RunInfo,
};
use super::runfolder::{CONFIG_TOML, METRICS_JSONL, is_run_folder};
use super::snapfile::{Header, SNAPSHOTS_JSONL, parse_header, record_to_snapshot};
use crate::config::RunConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a run may write nothing (not even a heartbeat) before it is called crashed.
pub const CRASHED_AFTER: Duration = Duration::from_secs(30);

/// The new complete lines of a file that grows.
#[derive(Debug)]
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Complete lines appended since the last call (a line without its newline yet waits).
    fn lines(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Replaced by a shorter file (an --overwrite): read it from the start.
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.take(len - self.offset).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend(buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&done)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Where a followed run stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Liveness {
    /// Lines are still arriving (or the last one is recent).
    Running,
    /// It ended, for this reason.
    Finished(FinishReason),
    /// No end record and nothing written for [`CRASHED_AFTER`].
    Crashed,
}

/// A run folder being read (and followed).
pub struct RunFolderReader {
    dir: PathBuf,
    metrics: Tail,
    snapshots: Tail,
    header: Option<Header>,
    config: Option<RunConfig>,
    info: Option<RunInfo>,
    finished: Option<FinishReason>,
    starts: usize,
    probes: HashMap<usize, Option<Rgb>>,
    /// The validation split, read once for probe pixels.
    val: ValSplit,
    noted_no_snapshots: bool,
}

/// A run's validation split as far as this machine can read it (for probe pixels).
enum ValSplit {
    /// Not tried yet.
    Unread,
    /// The data is not here (another machine's run, a moved folder).
    Missing,
    Read(Vec<crate::data::Sample>),
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn notice(v: &Value) -> Notice {
    Notice {
        step: u(v, "step"),
        time_s: f(v, "time_s"),
        message: v["message"].as_str().unwrap_or_default().to_owned(),
        path: v["path"].as_str().map(PathBuf::from),
        line: v["line"].as_u64().map(|l| l as usize),
    }
}

impl RunFolderReader {
    /// Opens `dir`, which must be a run folder (it holds `metrics.jsonl`).
    pub fn open(dir: &Path) -> Result<Self, String> {
        if !is_run_folder(dir) {
            return Err(format!("{}: not a run folder (no {METRICS_JSONL})", dir.display()));
        }
        let config = std::fs::read_to_string(dir.join(CONFIG_TOML))
            .ok()
            .and_then(|t| RunConfig::from_toml(&t).ok());
        Ok(Self {
            dir: dir.to_owned(),
            metrics: Tail::new(dir.join(METRICS_JSONL)),
            snapshots: Tail::new(dir.join(SNAPSHOTS_JSONL)),
            header: None,
            config,
            info: None,
            finished: None,
            starts: 0,
            probes: HashMap::new(),
            val: ValSplit::Unread,
            noted_no_snapshots: false,
        })
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's facts, once its `started` record was read.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.info.as_ref()
    }

    /// How many times the run was started (more than once: it was resumed).
    #[must_use]
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// Where the run stands now.
    #[must_use]
    pub fn liveness(&self) -> Liveness {
        if let Some(r) = self.finished {
            return Liveness::Finished(r);
        }
        let quiet = std::fs::metadata(self.dir.join(METRICS_JSONL))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if quiet.is_some_and(|q| q > CRASHED_AFTER) {
            Liveness::Crashed
        } else {
            Liveness::Running
        }
    }

    /// Everything appended since the last poll, as events.
    pub fn poll(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        for line in self.metrics.lines() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(ev) = self.metrics_event(&v) {
                out.push(ev);
            }
        }
        let lines = self.snapshots.lines();
        if self.header.is_none() && lines.is_empty() && !self.noted_no_snapshots && self.info.is_some() {
            self.noted_no_snapshots = true;
            if !self.dir.join(SNAPSHOTS_JSONL).exists() && self.info.as_ref().is_some_and(|i| !i.priors.is_empty()) {
                out.push(Event::Warning(Notice {
                    step: 0,
                    time_s: 0.0,
                    message: "this run folder has no snapshots.jsonl (an older version wrote it): curves only".into(),
                    path: Some(self.dir.join(SNAPSHOTS_JSONL)),
                    line: None,
                }));
            }
        }
        for line in lines {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["kind"] == "header" {
                self.header = parse_header(&v);
                continue;
            }
            let Some(h) = &self.header else { continue };
            if let Some(mut s) = record_to_snapshot(&v, h) {
                if let Some(index) = v["probe"]["index"].as_u64() {
                    let label = u(&v["probe"], "label") as u32;
                    if let Some(rgb) = self.probe_image(index as usize) {
                        s.probe = Some(Probe {
                            image: rgb,
                            origin: ProbeOrigin::Val {
                                index: index as usize,
                                label,
                            },
                        });
                    }
                }
                out.push(Event::Snapshot(Box::new(s)));
            }
        }
        out
    }

    /// The run's facts from its `started` record (or, for folders written before the record
    /// carried them, from `config.toml`).
    fn info_from(&self, v: &Value) -> RunInfo {
        if let Ok(mut info) = serde_json::from_value::<RunInfo>(v["info"].clone()) {
            info.out = Some(self.dir.clone());
            return info;
        }
        let cfg = self.config.clone().unwrap_or_default();
        let h = self.header.clone();
        RunInfo {
            method: v["method"].as_str().map_or_else(|| cfg.method.label(), str::to_owned),
            trainable: u(v, "trainable") as usize,
            device: v["device"].as_str().unwrap_or("?").to_owned(),
            threads: u(v, "threads") as usize,
            classes: Vec::new(),
            blocks: h.as_ref().map_or(0, |h| h.blocks),
            grid: h.as_ref().map_or((0, 0), |h| h.grid),
            priors: h.as_ref().map(|h| h.priors.clone()).unwrap_or_default(),
            rank: cfg.method.rank,
            total_steps: cfg.steps.unwrap_or(0),
            split_sizes: [0; 3],
            config: serde_json::to_value(&cfg).unwrap_or_default(),
            out: Some(self.dir.clone()),
            start_step: u(v, "step"),
            backbone: crate::config::VitConfig::tiny(),
            probes: 0,
            run_id: String::new(),
        }
    }

    fn metrics_event(&mut self, v: &Value) -> Option<Event> {
        let step = u(v, "step");
        let time_s = f(v, "time_s");
        Some(match v["kind"].as_str()? {
            "started" => {
                let info = self.info_from(v);
                self.starts += 1;
                self.finished = None;
                self.info = Some(info.clone());
                Event::Started(Box::new(info))
            }
            "progress" => Event::Progress(Progress {
                step,
                epoch: f(v, "epoch"),
                loss: f(v, "loss"),
                route_loss: v["route_loss"].as_f64().unwrap_or(0.0),
                train_acc: f(v, "train_acc"),
                lr: f(v, "lr"),
                img_per_s: f(v, "img_per_s"),
                time_s,
                class_loss: v["class_loss"].as_f64(),
            }),
            "eval" => Event::Eval(EvalResult {
                step,
                split: v["split"].as_str().unwrap_or("val").to_owned(),
                loss: f(v, "loss"),
                acc: f(v, "acc"),
                per_class_acc: serde_json::from_value(v["per_class_acc"].clone()).unwrap_or_default(),
                time_s,
            }),
            "applied" => Event::Applied(Applied {
                step,
                command: v["command"].as_str().unwrap_or_default().to_owned(),
                target: v["target"].as_str().unwrap_or_default().to_owned(),
                old: f(v, "old"),
                new: f(v, "new"),
                time_s,
            }),
            "warning" => Event::Warning(notice(v)),
            "error" if v["diverged"] == true => Event::Diverged(notice(v)),
            "error" => Event::Error(notice(v)),
            "finished" => {
                let reason: FinishReason = serde_json::from_value(v["reason"].clone()).ok()?;
                self.finished = Some(reason);
                Event::Finished(Finished {
                    reason,
                    steps: step,
                    best_val_acc: v["best_val_acc"].as_f64(),
                    test_acc: v["test_acc"].as_f64(),
                    checkpoints: serde_json::from_value(v["checkpoints"].clone()).unwrap_or_default(),
                    time_s,
                    message: v["message"].as_str().map(str::to_owned),
                    path: v["path"].as_str().map(PathBuf::from),
                })
            }
            _ => return None,
        })
    }

    /// The pixels of validation image `index` (the probe), from the run's own data, decoded
    /// once; `None` when the data cannot be read here.
    fn probe_image(&mut self, index: usize) -> Option<Rgb> {
        if let Some(p) = self.probes.get(&index) {
            return p.clone();
        }
        if matches!(self.val, ValSplit::Unread) {
            let cfg = self.config.as_ref();
            self.val = cfg
                .and_then(|c| crate::data::load(&c.data, c.final_split, c.seed).ok())
                .map_or(ValSplit::Missing, |d| ValSplit::Read(d.val));
        }
        let size = self.info.as_ref().map_or(32, |i| i.backbone.img_size);
        let found = (|| {
            let ValSplit::Read(val) = &self.val else { return None };
            let sample = val.get(index)?;
            let img = crate::data::transform::decode(sample).ok()?;
            Some(Rgb {
                size,
                pixels: crate::data::transform::to_rgb_square(&img, size as u32),
            })
        })();
        self.probes.insert(index, found.clone());
        found
    }
}

/// The run folders under `dir`: itself if it is one, else every run folder below it (three
/// levels deep at most), sorted.
#[must_use]
pub fn run_folders_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if is_run_folder(d) {
            out.push(d.to_owned());
            return;
        }
        if depth == 0 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(d) else { return };
        let mut subs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        for s in subs {
            walk(&s, depth - 1, out);
        }
    }
    let mut out = Vec::new();
    walk(dir, 3, &mut out);
    out
}
