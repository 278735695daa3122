//! A run folder read back as the engine's [`Event`]s: `metrics.jsonl` (progress, evaluations,
//! applied commands, notices, the end) and `snapshots.jsonl` (the internals, filters recomputed),
//! for a finished run opened later, a run another process is still writing (followed: each poll
//! returns what was appended; a half-written last line waits for its end), and the history a
//! late network viewer receives. The same seam as a live run, another transport.

use super::protocol::{Event, FinishReason, Notice, Probe, ProbeOrigin, Rgb, RunInfo};
use super::record::{Record, RecordTail, SnapshotHeader, StartedRecord, check_info};
use super::runfolder::{CONFIG_TOML, METRICS_JSONL, SNAPSHOTS_JSONL, is_run_folder};
use super::snapfile::snapshot_view;
use crate::config::RunConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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
    /// Whether the lines skipped in `metrics.jsonl` and `snapshots.jsonl` were noted (once per
    /// file as read: a reread notes again).
    noted_skips: [bool; 2],
    /// Records refused for being beyond INTERFACES.md's bounds (per file, as read): the first of
    /// each file is noted, the rest counted.
    refused: [u64; 2],
    /// Times `metrics.jsonl` was found replaced, truncated or rewritten and read again.
    rereads: u64,
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
            noted_skips: [false; 2],
            refused: [0; 2],
            rereads: 0,
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

    /// How many times `metrics.jsonl` was found replaced by other content, truncated or
    /// rewritten, and read again from its start (its events then came again, after a warning): a
    /// viewer that sees this grow starts the run's history over.
    #[must_use]
    pub fn rereads(&self) -> u64 {
        self.rereads
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
        let mut out: Vec<String> = [&self.metrics, &self.snapshots]
            .into_iter()
            .filter_map(|t| t.stats().summary(t.path()))
            .collect();
        for (tail, n) in [&self.metrics, &self.snapshots].into_iter().zip(self.refused) {
            if n > 0 {
                out.push(format!(
                    "{}: {n} record(s) beyond the bounds on run files not shown",
                    tail.path().display()
                ));
            }
        }
        out
    }

    /// Notes a record of file `file` (0: metrics, 1: snapshots) refused for `why`: the first one
    /// of the file as read is a warning, the rest are counted ([`Self::skipped`]).
    fn refuse(&mut self, file: usize, why: &str) {
        self.refused[file] += 1;
        if self.refused[file] == 1 {
            let path = [&self.metrics, &self.snapshots][file].path().to_owned();
            self.pending.push(note(
                format!(
                    "{}: {why}; skipped (INTERFACES.md bounds on run files; further ones are counted)",
                    path.display()
                ),
                Some(path),
            ));
        }
    }

    /// A notice for file `file` found replaced, truncated or rewritten (its tail rereads it), with
    /// what this reader knew of the old content forgotten.
    fn restarted(&mut self, file: usize, how: super::record::Restart, out: &mut Vec<Event>) {
        self.noted_skips[file] = false;
        self.refused[file] = 0;
        if file == 0 {
            // The events come again from the new content's start: a viewer starts the run over.
            self.rereads += 1;
            self.info = None;
            self.starts = 0;
            self.finished = None;
        } else {
            self.header = None;
        }
        let path = [&self.metrics, &self.snapshots][file].path().to_owned();
        out.push(note(
            format!(
                "{} was {} while it was followed: read again from its start",
                path.display(),
                how.describe()
            ),
            Some(path),
        ));
    }

    /// Everything appended since the last poll, as events.
    pub fn poll(&mut self) -> Vec<Event> {
        self.poll_within(u64::MAX)
    }

    /// The next events, reading at most about `max_bytes` of each file per step (a history
    /// streamed to a late viewer, never read whole): empty only once both files are read to
    /// their end (a step that completes no line reads on).
    pub fn poll_some(&mut self, max_bytes: usize) -> Vec<Event> {
        let max = u64::try_from(max_bytes).unwrap_or(u64::MAX).max(1);
        loop {
            let before = (self.metrics.offset(), self.snapshots.offset());
            let out = self.poll_within(max);
            if !out.is_empty() || (self.metrics.offset(), self.snapshots.offset()) == before {
                return out;
            }
        }
    }

    /// What reading at most `max_bytes` of each file gives, as events.
    fn poll_within(&mut self, max_bytes: u64) -> Vec<Event> {
        let mut out = Vec::new();
        let records = self.metrics.poll_within(max_bytes);
        if let Some(how) = self.metrics.take_restart() {
            self.restarted(0, how, &mut out);
        }
        for record in records {
            if let Some(ev) = self.metrics_event(record) {
                out.push(ev);
            }
        }
        let records = self.snapshots.poll_within(max_bytes);
        if let Some(how) = self.snapshots.take_restart() {
            self.restarted(1, how, &mut out);
        }
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
                        Err(e) => {
                            // The records after it are shaped by it: none is shown.
                            self.header = None;
                            let path = self.dir.join(SNAPSHOTS_JSONL);
                            out.push(note(
                                format!("{}: snapshots not shown: header {e}", path.display()),
                                Some(path),
                            ));
                        }
                    }
                    continue;
                }
                Record::Snapshot(rec) => rec,
                _ => continue,
            };
            let Some(h) = &self.header else { continue };
            let view = rec.check(h).map(|()| snapshot_view(&rec, h, None));
            let view = match view {
                Ok(v) => v,
                Err(e) => {
                    self.refuse(
                        1,
                        &format!("the snapshot at step {} does not fit its header: {e}", rec.step),
                    );
                    continue;
                }
            };
            if let Some(mut s) = view {
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
        for (file, tail) in [&self.metrics, &self.snapshots].into_iter().enumerate() {
            if !self.noted_skips[file]
                && let Some(summary) = tail.stats().summary(tail.path())
            {
                self.noted_skips[file] = true;
                self.pending.push(note(summary, Some(tail.path().to_owned())));
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
        use super::record::snapshot::MAX_RANK;
        if let Some(mut info) = s.info {
            info.out = Some(self.dir.clone());
            return *info;
        }
        let cfg = self.config.clone().unwrap_or_default();
        // `metrics.jsonl` is read first: the header may not have been read yet.
        let h = self.header.clone().or_else(|| first_header(&self.dir));
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
            rank: cfg.method.rank.min(MAX_RANK),
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
            Record::Started(mut s) => {
                if let Some(Err(e)) = s.info.as_deref().map(check_info) {
                    // The run's facts as an older folder gives them (config.toml, the header).
                    self.refuse(0, &format!("the started record's info is not used: {e}"));
                    s.info = None;
                }
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
            Record::Eval(e) => match e.check() {
                Ok(()) => Record::Eval(e).to_event(),
                Err(why) => {
                    self.refuse(0, &format!("the evaluation at step {}: {why}", e.step));
                    None
                }
            },
            Record::Ablation(a) => match crate::train::record::check_ablation(&a) {
                Ok(()) => Some(Event::Ablation(a)),
                Err(why) => {
                    self.refuse(0, &format!("the ablation at step {}: {why}", a.step));
                    None
                }
            },
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
        // The picture is shown small: a recorded input size past this is drawn at this size.
        let size = self
            .info
            .as_ref()
            .map_or(32, |i| i.backbone.img_size)
            .clamp(1, MAX_PROBE_SIDE);
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

/// The header at the start of `dir`'s `snapshots.jsonl`, if it has one within the bounds.
fn first_header(dir: &Path) -> Option<SnapshotHeader> {
    match super::record::RecordReader::open(&dir.join(SNAPSHOTS_JSONL))
        .ok()?
        .next()?
    {
        Record::Header(h) if h.check().is_ok() => Some(h),
        _ => None,
    }
}

/// The largest side of a probe picture decoded for a reopened run (pixels).
const MAX_PROBE_SIDE: usize = 1024;

/// Waits up to `within` until every folder of `dirs` holds its run's first record (`started`
/// in `metrics.jsonl`), reading only that file. The error names the first folder without one and
/// what its `metrics.jsonl` holds instead (missing, empty, unreadable lines, other records).
pub fn wait_for_start(dirs: &[PathBuf], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    for dir in dirs {
        let path = dir.join(METRICS_JSONL);
        let mut tail = RecordTail::new(path.clone());
        let mut records = 0u64;
        loop {
            // A step at a time, so the deadline holds for a huge file too.
            let got = tail.poll_within(16 << 20);
            if tail.take_restart().is_some() {
                records = 0;
            }
            if got.iter().any(|r| matches!(r, Record::Started(_))) {
                break;
            }
            records += got.len() as u64;
            let more = tail.offset() < std::fs::metadata(&path).map_or(0, |m| m.len());
            if Instant::now() >= deadline {
                return Err(why_no_start(dir, &path, &tail, records, within));
            }
            if !more {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// Why `dir` has no `started` record after `within`.
fn why_no_start(dir: &Path, path: &Path, tail: &RecordTail, records: u64, within: Duration) -> String {
    let link = std::fs::read_link(path)
        .map(|t| format!(" (a link to {})", t.display()))
        .unwrap_or_default();
    let holds = match std::fs::metadata(path) {
        Err(e) => format!("{METRICS_JSONL}{link} cannot be read ({e})"),
        Ok(m) if m.len() == 0 => format!("{METRICS_JSONL}{link} is empty"),
        Ok(_) => {
            let skipped = tail.stats().skipped();
            let mut parts = Vec::new();
            if records > 0 {
                parts.push(format!("{records} record(s) of other kinds"));
            }
            if skipped > 0 {
                parts.push(format!("{skipped} line(s) that are not run records"));
            }
            if parts.is_empty() {
                parts.push("no complete line".to_owned());
            }
            format!("{METRICS_JSONL}{link} holds {}", parts.join(" and "))
        }
    };
    format!(
        "{}: no run started within {} s: {holds}, no `started` record",
        dir.display(),
        within.as_secs_f64()
    )
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
