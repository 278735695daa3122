//! A run folder read back as the engine's [`Event`]s: `metrics.jsonl` (progress, evaluations,
//! applied commands, notices, the end) and `snapshots.jsonl` (the internals, filters recomputed),
//! for a finished run opened later, a run another process is still writing (followed: each poll
//! returns what was appended; a half-written last line waits for its end), and the history a
//! late network viewer receives. The same seam as a live run, another transport.

use super::protocol::{Event, FinishReason, Notice, Probe, ProbeOrigin, Rgb, RunInfo};
use super::record::{Record, RecordTail, SnapshotHeader, StartedRecord};
use super::runfolder::{CONFIG_TOML, METRICS_JSONL, SNAPSHOTS_JSONL, is_run_folder};
use super::snapfile::snapshot_view;
use crate::config::RunConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a run may write nothing (not even a heartbeat) before it is called crashed.
pub const CRASHED_AFTER: Duration = Duration::from_secs(30);

/// Where a followed run stands, as its files tell: whether its writer still writes (a question
/// of the folder, not of the run's lifecycle, which is [`super::protocol::RunStatus`]).
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
    metrics: RecordTail,
    snapshots: RecordTail,
    header: Option<SnapshotHeader>,
    config: Option<RunConfig>,
    info: Option<RunInfo>,
    finished: Option<FinishReason>,
    starts: usize,
    probes: HashMap<usize, Option<Rgb>>,
    /// Warnings about the folder not yet returned by [`Self::poll`].
    pending: Vec<Event>,
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

impl RunFolderReader {
    /// Opens `dir`, which must be a run folder (it holds `metrics.jsonl`).
    pub fn open(dir: &Path) -> Result<Self, String> {
        if !is_run_folder(dir) {
            return Err(format!("{}: not a run folder (no {METRICS_JSONL})", dir.display()));
        }
        let (config, path_notes) = match crate::train::evaluate::run_config_noted(dir) {
            Ok((c, notes)) => (Some(c), notes),
            Err(_) => (None, Vec::new()),
        };
        Ok(Self {
            dir: dir.to_owned(),
            metrics: RecordTail::new(dir.join(METRICS_JSONL)),
            snapshots: RecordTail::new(dir.join(SNAPSHOTS_JSONL)),
            header: None,
            config,
            info: None,
            finished: None,
            starts: 0,
            probes: HashMap::new(),
            val: ValSplit::Unread,
            noted_no_snapshots: false,
            pending: path_notes.into_iter().map(|m| note(m, None)).collect(),
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

    /// Lines skipped so far in the two files (unreadable, oversized, unknown kinds), and the
    /// unknown fields read: one line per file, for a notice.
    #[must_use]
    pub fn skipped(&self) -> Vec<String> {
        [&self.metrics, &self.snapshots]
            .into_iter()
            .filter_map(|t| t.stats().summary(t.path()))
            .collect()
    }

    /// Everything appended since the last poll, as events.
    pub fn poll(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        for record in self.metrics.poll() {
            if let Some(ev) = self.metrics_event(record) {
                out.push(ev);
            }
        }
        let records = self.snapshots.poll();
        if self.header.is_none() && records.is_empty() && !self.noted_no_snapshots && self.info.is_some() {
            self.noted_no_snapshots = true;
            if !self.dir.join(SNAPSHOTS_JSONL).exists() && self.info.as_ref().is_some_and(|i| !i.priors.is_empty()) {
                out.push(note(
                    "this run folder has no snapshots.jsonl (an older version wrote it): curves only".into(),
                    Some(self.dir.join(SNAPSHOTS_JSONL)),
                ));
            }
        }
        for record in records {
            let rec = match record {
                Record::Header(h) => {
                    match h.check() {
                        Ok(()) => self.header = Some(h),
                        Err(e) => out.push(note(
                            format!("snapshots not shown: {e}"),
                            Some(self.dir.join(SNAPSHOTS_JSONL)),
                        )),
                    }
                    continue;
                }
                Record::Snapshot(rec) => rec,
                _ => continue,
            };
            let Some(h) = &self.header else { continue };
            if let Some(mut s) = snapshot_view(&rec, h, None) {
                if let Some(index) = rec.probe.as_ref().and_then(|p| p.index) {
                    let label = rec.probe.as_ref().and_then(|p| p.label).unwrap_or(0);
                    if let Some(rgb) = self.probe_image(index) {
                        s.probe = Some(Probe {
                            image: rgb,
                            origin: ProbeOrigin::Val { index, label },
                        });
                    }
                }
                out.push(Event::Snapshot(Box::new(s)));
            }
        }
        // Notes about the folder come after its `started` record (a viewer shows them for it).
        let at = out
            .iter()
            .position(|e| matches!(e, Event::Started(_)))
            .map_or(0, |i| i + 1);
        out.splice(at..at, std::mem::take(&mut self.pending));
        out
    }

    /// The run's facts from its `started` record (or, for folders written before the record
    /// carried them, from `config.toml` and the snapshot header).
    fn info_from(&self, s: StartedRecord) -> RunInfo {
        if let Some(mut info) = s.info {
            info.out = Some(self.dir.clone());
            return *info;
        }
        let cfg = self.config.clone().unwrap_or_default();
        let h = self.header.clone();
        RunInfo {
            method: if s.method.is_empty() {
                cfg.method.label()
            } else {
                s.method
            },
            trainable: s.trainable,
            device: s.device,
            threads: s.threads,
            classes: Vec::new(),
            blocks: h.as_ref().map_or(0, |h| h.blocks),
            grid: h.as_ref().map_or((0, 0), |h| h.grid),
            priors: h.as_ref().map(|h| h.priors.clone()).unwrap_or_default(),
            rank: cfg.method.rank,
            total_steps: cfg.steps.unwrap_or(0),
            split_sizes: [0; 3],
            config: serde_json::to_value(&cfg).unwrap_or_default(),
            out: Some(self.dir.clone()),
            start_step: s.step,
            backbone: crate::config::VitConfig::tiny(),
            probes: 0,
            run_id: String::new(),
        }
    }

    fn metrics_event(&mut self, record: Record) -> Option<Event> {
        match record {
            Record::Started(s) => {
                let info = self.info_from(*s);
                self.starts += 1;
                self.finished = None;
                self.info = Some(info.clone());
                Some(Event::Started(Box::new(info)))
            }
            Record::Finished(f) => {
                self.finished = Some(f.reason);
                Record::Finished(f).to_event()
            }
            other => other.to_event(),
        }
    }

    /// The pixels of validation image `index` (the probe), from the run's own data, decoded
    /// once; `None` when the data cannot be read here.
    fn probe_image(&mut self, index: usize) -> Option<Rgb> {
        if let Some(p) = self.probes.get(&index) {
            return p.clone();
        }
        if matches!(self.val, ValSplit::Unread) {
            let cfg = self.config.as_ref();
            self.val = match cfg.map(|c| crate::data::load(&c.data, c.final_split, c.seed)) {
                Some(Ok(d)) => ValSplit::Read(d.val),
                Some(Err(e)) => {
                    let data = cfg.map_or_else(String::new, |c| c.data.clone());
                    self.pending.push(note(
                        format!("data {data} cannot be read here ({e}): probe images unavailable"),
                        Some(self.dir.join(CONFIG_TOML)),
                    ));
                    ValSplit::Missing
                }
                None => ValSplit::Missing,
            };
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

/// A warning about a run folder.
fn note(message: String, path: Option<PathBuf>) -> Event {
    Event::Warning(Notice {
        step: 0,
        time_s: 0.0,
        message,
        path,
        line: None,
    })
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
