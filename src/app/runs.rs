//! The runs the app shows: where each comes from (launched here, a run folder, a served run)
//! and how the app starts, opens, follows and connects to them.

use super::StudioApp;
use super::history::RunHistory;
use super::link::{FolderLink, Link};
use super::panels::RunStatus;
use crate::config::RunConfig;
use crate::train::protocol::RunInfo;
use crate::train::replay::Liveness;
use crate::train::serve::RemoteLink;
use std::path::{Path, PathBuf};

/// Where a run's events come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Launched by this app.
    Local,
    /// A run folder, read (and followed while it grows).
    Folder(PathBuf),
    /// A run served by `moppa train --serve` at `HOST:PORT`.
    Remote(String),
}

impl Source {
    /// Short text for the runs table.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Local => "this app".into(),
            Self::Folder(p) => p.display().to_string(),
            Self::Remote(a) => format!("served at {a}"),
        }
    }
}

/// One run the app shows: what it remembers of it, where it comes from and how to reach it.
pub struct OpenRun {
    /// Curves, evaluations, snapshots.
    pub history: RunHistory,
    /// Where its events come from.
    pub source: Source,
    /// Where it is.
    pub status: RunStatus,
    /// Whether its controls (Start, Pause, the live sliders) act on it.
    pub control: bool,
    pub(super) link: Option<Box<dyn Link>>,
    /// Launched here with autostart (it trains as soon as it is ready).
    pub(super) autostart: bool,
    /// For a run opened from its folder: its adapter, answering probe images.
    pub(super) adapter_probe: Option<crate::train::probe::AdapterProbe>,
    /// The probe answered for a run opened from its folder (shown instead of the recorded
    /// probe until the validation image is chosen again).
    pub probed: Option<Box<crate::train::protocol::Snapshot>>,
}

impl OpenRun {
    pub(super) fn new(label: String, source: Source, link: Option<Box<dyn Link>>, control: bool) -> Self {
        Self {
            history: RunHistory::new(label),
            source,
            status: RunStatus::None,
            control,
            link,
            autostart: false,
            adapter_probe: None,
            probed: None,
        }
    }

    /// The run's facts, once started.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.history.info.as_ref()
    }

    /// A followed folder's state: finished, crashed or still written.
    #[must_use]
    pub fn liveness(&self) -> Option<Liveness> {
        self.link.as_ref().and_then(|l| l.liveness())
    }

    /// Whether the app must look for this run's new events itself: a followed folder that may
    /// still grow. Local and served runs wake it when their events arrive.
    #[must_use]
    pub fn following(&self) -> bool {
        matches!(self.source, Source::Folder(_)) && !matches!(self.liveness(), Some(Liveness::Finished(_)))
    }
}

impl StudioApp {
    /// Starts a new run of this app's (idle unless `autostart`) with the current settings, and
    /// selects it.
    pub(super) fn launch(&mut self, autostart: bool) {
        // An hf: backbone not in the cache yet: download it first (with the picker's progress
        // bar and Cancel), then launch.
        let spec = self.settings.config.backbone.clone();
        if self.picker.needs_download(&spec) {
            self.picker.source = super::backbones::Source::Hub;
            self.picker.hub_id.clone_from(&spec);
            self.picker.message = None;
            self.picker.start_download(spec, self.waker.clone());
            self.pending_launch = Some(autostart);
            return;
        }
        // The previous local run stops (it stays in the list with its history).
        for r in self.runs.iter_mut().filter(|r| r.source == Source::Local) {
            r.link = None;
            discard_if_unstarted(r);
            if matches!(
                r.status,
                RunStatus::Running | RunStatus::Paused | RunStatus::Ready | RunStatus::None
            ) {
                r.status = RunStatus::Finished;
            }
            r.control = false;
        }
        self.run_counter += 1;
        let cfg = self.settings.config.clone();
        let label = format!("#{} {}", self.run_counter, cfg.method.label());
        self.scrub = None;
        // Every run of the app's own writes a run folder (unless the settings name one).
        let mut run_cfg = cfg.clone();
        if run_cfg.out.is_none()
            && let Some(root) = &self.opts.runs_dir
        {
            run_cfg.out = Some(new_run_folder(root, &cfg));
        }
        match (self.launcher)(&run_cfg, self.waker.clone(), autostart) {
            Ok(link) => {
                if let Some(dir) = &run_cfg.out {
                    self.settings.remember(dir);
                }
                let mut run = OpenRun::new(label, Source::Local, Some(link), true);
                run.autostart = autostart;
                self.runs.push(run);
                self.launched = Some(cfg);
            }
            Err(e) => {
                let mut r = OpenRun::new(label, Source::Local, None, false);
                r.status = RunStatus::Failed;
                self.runs.push(r);
                self.show_error(format!("cannot start the run: {e:#}"));
            }
        }
        self.selected = self.runs.len() - 1;
    }

    /// Opens a run folder (followed while another process writes it); also remembered in the
    /// recent list. A folder holding several runs opens each.
    pub fn open_folder(&mut self, dir: &Path) {
        self.open_folders(std::slice::from_ref(&dir.to_path_buf()));
    }

    /// Opens several folders at once (each a run folder or a folder holding some) and selects
    /// the first MoPPA run among them.
    pub fn open_folders(&mut self, dirs: &[PathBuf]) {
        let mut found = Vec::new();
        for dir in dirs {
            let under = crate::train::replay::run_folders_under(dir);
            if under.is_empty() {
                self.show_error(format!(
                    "{}: no run folder here (none holds metrics.jsonl)",
                    dir.display()
                ));
            }
            found.extend(under);
        }
        let mut opened = Vec::new();
        for d in found {
            if let Some(i) = self.runs.iter().position(|r| r.source == Source::Folder(d.clone())) {
                opened.push(i);
                continue;
            }
            match FolderLink::open(&d) {
                Ok(link) => {
                    let name = d
                        .file_name()
                        .map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned());
                    self.runs.push(OpenRun::new(
                        name,
                        Source::Folder(d.clone()),
                        Some(Box::new(link)),
                        false,
                    ));
                    let i = self.runs.len() - 1;
                    // Read what the folder holds now (later records arrive while following).
                    while let Some(ev) = self.runs[i].link.as_mut().and_then(|l| l.try_recv()) {
                        self.on_event(i, ev);
                    }
                    opened.push(i);
                    self.settings.remember(&d);
                }
                Err(e) => self.show_error(e),
            }
        }
        // Show the first MoPPA run among them (the filter and router views are for MoPPA runs).
        if let Some(&i) = opened
            .iter()
            .find(|&&i| self.runs[i].info().is_some_and(|info| !info.priors.is_empty()))
            .or_else(|| opened.first())
        {
            self.selected = i;
        }
        self.scrub = None;
    }

    /// Connects to a served run (`HOST:PORT`, token empty to watch only).
    pub fn connect_to(&mut self, addr: &str, token: &str) {
        match RemoteLink::connect_waking(addr, (!token.is_empty()).then_some(token), Some(self.waker.clone())) {
            Ok(link) => {
                let control = link.can_control();
                let label = format!("{addr}{}", if control { "" } else { " (watching)" });
                let link = super::link::RemoteRun::new(link);
                self.runs.push(OpenRun::new(
                    label,
                    Source::Remote(addr.to_owned()),
                    Some(Box::new(link)),
                    control,
                ));
                self.selected = self.runs.len() - 1;
                self.scrub = None;
                self.connect.open = false;
            }
            Err(e) => self.show_error(format!("cannot connect: {e}")),
        }
    }
}

/// A fresh folder for a run of the app's under `root`: `{UTC date_time}-{method}`, numbered
/// when taken.
fn new_run_folder(root: &Path, cfg: &RunConfig) -> PathBuf {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let method: String = cfg
        .method
        .label()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '+' { c } else { '-' })
        .collect();
    let base = format!("{}-{method}", crate::util::utc_stamp(since));
    let mut dir = root.join(&base);
    let mut n = 2;
    while dir.exists() {
        dir = root.join(format!("{base}-{n}"));
        n += 1;
    }
    dir
}

/// Removes the run folder of an app run that never trained (the app prepares a run when it
/// opens; one never started leaves nothing behind). Only the files a run writes at setup are
/// removed, and the folder only if that empties it.
pub(super) fn discard_if_unstarted(r: &OpenRun) {
    if r.source != Source::Local || r.link.is_some() || r.history.step > 0 {
        return;
    }
    let Some(dir) = r.info().and_then(|i| i.out.clone()) else {
        return;
    };
    if crate::train::runfolder::has_progress(&dir) {
        return;
    }
    for f in [
        crate::train::runfolder::METRICS_JSONL,
        crate::train::runfolder::METRICS_CSV,
        crate::train::runfolder::CONFIG_TOML,
        crate::train::runfolder::SNAPSHOTS_JSONL,
    ] {
        std::fs::remove_file(dir.join(f)).ok();
    }
    std::fs::remove_dir(&dir).ok();
}

impl Drop for StudioApp {
    fn drop(&mut self) {
        for r in &mut self.runs {
            if r.source == Source::Local {
                r.link = None; // stops the worker and waits for it (its lock is released)
                discard_if_unstarted(r);
            }
        }
    }
}
