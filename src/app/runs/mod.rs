//! The runs the app shows ([`RunsState`]: the runs, the one selected, the scrubbed snapshot,
//! and their events), where each comes from (launched here, a run folder, a served run), how the
//! app launches its own ([`Launch`]) and opens, follows and connects to the others.

mod events;

use super::StudioApp;
use super::history::RunHistory;
use super::link::{FolderLink, Launcher, Link};
use super::panels::RunStatus;
use crate::config::RunConfig;
use crate::train::protocol::{Command, RunInfo};
use crate::train::replay::Liveness;
use crate::train::serve::RemoteLink;
use crate::train::worker::Waker;
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
    /// Values sent to it that it has not applied yet (the live panel shows them as targets).
    pub targets: super::panels::live::Targets,
    /// Whether the plots draw it.
    pub shown: bool,
    /// The app's own work for it (an ablation of its saved adapter, validation images).
    pub jobs: super::jobs::RunJobs,
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
            targets: super::panels::live::Targets::default(),
            shown: true,
            jobs: super::jobs::RunJobs::default(),
        }
    }

    /// The run's facts, once started.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.history.info.as_ref()
    }

    /// Whether its settings can still change: a run of this app's that has not trained a step
    /// (every other run's settings are what it ran with).
    #[must_use]
    pub fn editable(&self) -> bool {
        self.source == Source::Local && self.history.step == 0 && self.history.finished.is_none()
    }

    /// Its settings for a new run of this app's: the folder, resumption and the file's hash are
    /// the old run's own.
    #[must_use]
    pub fn settings_for_new_run(&self) -> Option<RunConfig> {
        let mut c = self.history.config.clone()?;
        c.out = None;
        c.resume = None;
        c.auto_resume = false;
        c.backbone_sha256 = None;
        Some(c)
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

/// The runs the app shows and which one its views and controls are on.
#[derive(Default)]
pub struct RunsState {
    runs: Vec<OpenRun>,
    selected: usize,
    /// The snapshot the filter and router views show (`None`: the newest).
    pub scrub: Option<usize>,
    /// Where the files a served run sends ([`Command::FetchRunFiles`]) are saved.
    fetch_to: Option<PathBuf>,
    /// The run pinned as the baseline (always drawn, dashed).
    pub baseline: Option<usize>,
}

impl RunsState {
    /// Every run, in the order opened.
    #[must_use]
    pub fn all(&self) -> &[OpenRun] {
        &self.runs
    }

    /// Every run, to change.
    pub(super) fn all_mut(&mut self) -> &mut [OpenRun] {
        &mut self.runs
    }

    /// How many runs are open.
    #[must_use]
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether no run is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The index of the run shown.
    #[must_use]
    pub fn selected(&self) -> usize {
        self.selected
    }

    /// The run shown, if any.
    #[must_use]
    pub fn sel(&self) -> Option<&OpenRun> {
        self.runs.get(self.selected)
    }

    /// The run shown, to change.
    pub fn sel_mut(&mut self) -> Option<&mut OpenRun> {
        self.runs.get_mut(self.selected)
    }

    /// The status of the run shown (`None` without one).
    #[must_use]
    pub fn status(&self) -> RunStatus {
        self.sel().map_or(RunStatus::None, |r| r.status)
    }

    /// The facts of the run shown.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.sel().and_then(OpenRun::info)
    }

    /// Whether the run shown was launched by this app.
    #[must_use]
    pub fn selected_is_local(&self) -> bool {
        self.sel().is_some_and(|r| r.source == Source::Local)
    }

    /// Whether the run shown takes commands from here.
    #[must_use]
    pub fn controls_selected(&self) -> bool {
        self.sel().is_some_and(|r| r.control)
    }

    /// The run shown (to change) and the snapshot scrubbed to, borrowed together for the views.
    pub fn shown_mut(&mut self) -> (Option<&mut OpenRun>, &mut Option<usize>) {
        (self.runs.get_mut(self.selected), &mut self.scrub)
    }

    /// Shows run `i` (from its newest snapshot).
    pub fn select(&mut self, i: usize) {
        if i < self.runs.len() {
            self.selected = i;
            self.scrub = None;
            self.runs[i].shown = true;
        }
    }

    /// Shows or hides runs `which` in the plots (the selected run is always drawn).
    pub fn set_shown(&mut self, which: &[usize], shown: bool) {
        for &i in which {
            if let Some(r) = self.runs.get_mut(i) {
                r.shown = shown || i == self.selected;
            }
        }
    }

    /// Adds a run and shows it.
    pub(super) fn push(&mut self, run: OpenRun) -> usize {
        self.runs.push(run);
        self.select(self.runs.len() - 1);
        self.selected
    }

    /// The open run read from folder `dir`, if any.
    pub(super) fn folder(&self, dir: &Path) -> Option<usize> {
        self.runs
            .iter()
            .position(|r| r.source == Source::Folder(dir.to_owned()))
    }

    /// Stops this app's earlier runs (they stay in the list with their history; one never
    /// started leaves no folder behind).
    pub(super) fn retire_local(&mut self) {
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
    }

    /// The status of this app's newest run (the launch panel edits the next one's settings
    /// while none is set up).
    #[must_use]
    pub fn local_status(&self) -> RunStatus {
        self.runs
            .iter()
            .rev()
            .find(|r| r.source == Source::Local)
            .map_or(RunStatus::None, |r| r.status)
    }

    /// Whether a run written elsewhere may still grow (the app looks for its records).
    #[must_use]
    pub fn any_following(&self) -> bool {
        self.runs.iter().any(OpenRun::following)
    }

    /// Sends a command to the run shown (a value it sets is its target until applied); false
    /// when it cannot take it.
    pub(super) fn send(&mut self, c: Command) -> bool {
        let Some(r) = self.sel_mut() else { return false };
        let target = super::panels::live::Targets::asked(&c);
        let sent = r.control && r.link.as_mut().is_some_and(|l| l.send(c));
        if sent && let Some((name, v)) = target {
            r.targets.set(name, v);
        }
        sent
    }

    /// Where the next fetched run files go.
    pub(super) fn fetch_into(&mut self, dir: PathBuf) {
        self.fetch_to = Some(dir);
    }

    /// Stops this app's runs as the window closes (each waits for its worker, which releases its
    /// folder's lock; one never started leaves nothing behind).
    fn close(&mut self) {
        for r in &mut self.runs {
            if r.source == Source::Local {
                r.link = None;
                discard_if_unstarted(r);
            }
        }
    }
}

/// A run launched: its link, and the folder it writes (if any).
pub(super) type Started = (Box<dyn Link>, Option<PathBuf>);

/// How the app launches runs of its own: the engine it starts them on, the settings its newest
/// one was launched with, a launch waiting for a download, and the waker runs repaint with.
pub struct Launch {
    launcher: Launcher,
    launched: Option<RunConfig>,
    pending: Option<bool>,
    counter: usize,
    waker: Waker,
}

impl Launch {
    /// Launches on `launcher`; runs wake the window with `waker`.
    pub(super) fn new(launcher: Launcher, waker: Waker) -> Self {
        Self {
            launcher,
            launched: None,
            pending: None,
            counter: 0,
            waker,
        }
    }

    /// The waker runs, downloads and probes repaint the window with.
    #[must_use]
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Whether `cfg` differs from the settings the newest run was launched with.
    #[must_use]
    pub fn changed(&self, cfg: &RunConfig) -> bool {
        self.launched.as_ref() != Some(cfg)
    }

    /// Holds a launch until the backbone's download ends.
    pub(super) fn defer(&mut self, autostart: bool) {
        self.pending = Some(autostart);
    }

    /// A launch held for a download (taken).
    pub(super) fn take_pending(&mut self) -> Option<bool> {
        self.pending.take()
    }

    /// Whether a launch waits for a download.
    #[must_use]
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts run `cfg` (writing a fresh folder under `runs_dir` unless it names one): its label
    /// and link, or its label and why not.
    pub(super) fn start(
        &mut self,
        cfg: &RunConfig,
        runs_dir: Option<&Path>,
        autostart: bool,
    ) -> (String, anyhow::Result<Started>) {
        self.counter += 1;
        let label = format!("#{} {}", self.counter, cfg.method.label());
        let mut run_cfg = cfg.clone();
        if run_cfg.out.is_none()
            && let Some(root) = runs_dir
        {
            run_cfg.out = Some(new_run_folder(root, cfg));
        }
        let started = (self.launcher)(&run_cfg, self.waker.clone(), autostart);
        if started.is_ok() {
            self.launched = Some(cfg.clone());
        }
        (label, started.map(|link| (link, run_cfg.out)))
    }
}

impl StudioApp {
    /// Starts a new run of this app's (idle unless `autostart`) with the current settings, and
    /// selects it.
    pub(super) fn launch_run(&mut self, autostart: bool) {
        // An hf: backbone not in the cache yet: download it first (with the picker's progress
        // bar and Cancel), then launch.
        let spec = self.settings.config.backbone.clone();
        if self.picker.needs_download(&spec) {
            self.picker.source = super::backbones::Source::Hub;
            self.picker.hub_id.clone_from(&spec);
            self.picker.message = None;
            self.picker.start_download(spec, self.launch.waker());
            self.launch.defer(autostart);
            return;
        }
        self.runs.retire_local();
        let cfg = self.settings.config.clone();
        match self.launch.start(&cfg, self.opts.runs_dir.as_deref(), autostart) {
            (label, Ok((link, out))) => {
                if let Some(dir) = &out {
                    self.settings.remember(dir);
                }
                let mut run = OpenRun::new(label, Source::Local, Some(link), true);
                run.autostart = autostart;
                self.runs.push(run);
            }
            (label, Err(e)) => {
                let mut r = OpenRun::new(label, Source::Local, None, false);
                r.status = RunStatus::Failed;
                self.runs.push(r);
                self.messages.error(format!("cannot start the run: {e:#}"));
            }
        }
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
                self.messages.error(format!(
                    "{}: no run folder here (none holds metrics.jsonl)",
                    dir.display()
                ));
            }
            found.extend(under);
        }
        let mut opened = Vec::new();
        for d in found {
            if let Some(i) = self.runs.folder(&d) {
                opened.push(i);
                continue;
            }
            match FolderLink::open(&d) {
                Ok(link) => {
                    let name = d
                        .file_name()
                        .map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned());
                    let i = self.runs.push(OpenRun::new(
                        name,
                        Source::Folder(d.clone()),
                        Some(Box::new(link)),
                        false,
                    ));
                    // Read what the folder holds now (later records arrive while following).
                    while let Some(ev) = self.runs.next_event(i) {
                        self.runs.on_event(i, ev, &mut self.messages);
                    }
                    opened.push(i);
                    self.settings.remember(&d);
                }
                Err(e) => self.messages.error(e),
            }
        }
        // Show the first MoPPA run among them (the filter and router views are for MoPPA runs).
        let all = self.runs.all();
        if let Some(&i) = opened
            .iter()
            .find(|&&i| all[i].info().is_some_and(|info| !info.priors.is_empty()))
            .or_else(|| opened.first())
        {
            self.runs.select(i);
        }
    }

    /// Connects to a served run (`HOST:PORT`, token empty to watch only).
    pub fn connect_to(&mut self, addr: &str, token: &str) {
        match RemoteLink::connect_waking(addr, (!token.is_empty()).then_some(token), Some(self.launch.waker())) {
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
                self.dialogs.connect.open = false;
            }
            Err(e) => self.messages.error(format!("cannot connect: {e}")),
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
        self.runs.close();
    }
}
