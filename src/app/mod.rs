//! The desktop app (feature `gui`): live spectral filters, router per block, curves, and
//! coefficients that can be moved while training, for the run it launches, runs opened from
//! their folders (finished, or followed while another process writes them) and runs served by
//! `moppa train --serve` elsewhere. It drives every run only through the protocol
//! ([`link::Link`]: `Command` out, `Event` in) and never touches a tensor.

mod actions;
pub mod backbones;
mod capture;
pub mod history;
mod layout;
pub mod lessons;
pub mod link;
pub mod pacer;
pub mod panels;
mod runs;
pub mod state;
pub mod widgets;

pub use actions::metrics_csv;
pub use capture::save_png;

use link::{Launcher, worker_launcher};
use panels::RunStatus;
use panels::playground::Playground;
use panels::status::FrameTimes;
pub use runs::{OpenRun, Source};
use state::{Settings, Tab};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use widgets::heatmap::Textures;

use crate::config::RunConfig;
use crate::train::protocol::{Command, Event, FinishReason, Notice, RunInfo};
use crate::train::worker::Waker;

/// How the app starts.
#[derive(Clone, Debug, Default)]
pub struct AppOptions {
    /// Press Start as soon as the model is ready.
    pub autostart: bool,
    /// Save a PNG of the window here after `after_steps` steps, then exit.
    pub screenshot: Option<PathBuf>,
    /// Steps before the screenshot.
    pub after_steps: u64,
    /// Tab to show first.
    pub tab: Option<Tab>,
    /// Print UI frame-time statistics after this many seconds, then exit.
    pub frame_stats: Option<f64>,
    /// Use this run config instead of the saved one.
    pub config: Option<RunConfig>,
    /// Hide numbers that change from frame to frame (frame time, memory): for snapshot tests.
    pub stable_display: bool,
    /// Run folders to open (`moppa view`): no run of the app's own is launched then.
    pub open: Vec<PathBuf>,
    /// Where the app's own runs write their run folders (`run` sets `runs/` in the app's data
    /// folder); `None`: they write none.
    pub runs_dir: Option<PathBuf>,
    /// A lesson to play from the start (`moppa --lesson`); no run starts by itself then.
    pub lesson: Option<lessons::Lesson>,
    /// With `lesson`: walk it by itself to this step (1-based), e.g. for `--screenshot`.
    pub lesson_step: Option<usize>,
    /// Teachers' lessons (`run` sets `lessons/` in the app's data folder).
    pub lessons_dir: Option<PathBuf>,
}

/// A message shown to the user.
#[derive(Clone, Debug)]
struct Shown {
    error: bool,
    notice: Notice,
}

/// The Connect… dialog's fields.
#[derive(Clone, Debug, Default)]
pub struct ConnectForm {
    /// Whether the dialog is open.
    pub open: bool,
    /// `HOST:PORT`.
    pub addr: String,
    /// The token (empty: watch only).
    pub token: String,
}

/// The app.
pub struct StudioApp {
    /// Persisted settings.
    pub settings: Settings,
    launcher: Launcher,
    /// Every run shown: this app's, opened folders, connected servers.
    pub runs: Vec<OpenRun>,
    /// The run the filter, router and live views show and the run controls act on.
    pub selected: usize,
    launched: Option<RunConfig>,
    scrub: Option<usize>,
    textures: Textures,
    playground: Playground,
    shown: Vec<Shown>,
    frames: FrameTimes,
    last_frame: Option<Instant>,
    waker: Waker,
    /// Paces the repaints runs' events ask for and measures their lag.
    pacer: Arc<pacer::Pacer>,
    opts: AppOptions,
    started_at: Instant,
    plot_rects: Vec<(&'static str, egui::Rect)>,
    screenshot_requested: bool,
    run_counter: usize,
    capture_errors: capture::CaptureErrors,
    /// Where the files a remote run sends ([`Command::FetchRunFiles`]) are saved.
    fetch_to: Option<PathBuf>,
    /// The Connect… dialog.
    pub connect: ConnectForm,
    /// The lessons found (built-in and the teacher's), and the files that could not be read.
    pub lessons: lessons::Catalogue,
    /// The lesson being played.
    pub lesson: Option<lessons::player::Player>,
    /// Errors shown so far (a lesson's `alert = "error"` check counts new ones).
    errors_raised: usize,
    /// Where the views are drawn (a lesson highlights them).
    view_rects: lessons::player::ViewRects,
    /// The backbone picker (cached models, a download in flight).
    pub picker: backbones::BackbonePicker,
    /// A launch waiting for its backbone's download (its autostart).
    pending_launch: Option<bool>,
}

impl StudioApp {
    /// The app with real training runs.
    #[must_use]
    pub fn new(cc: &eframe::CreationContext<'_>, opts: AppOptions) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        // Panels leave their fill to the background, cleared to their colour (`clear_color`):
        // one layer of the whole window less to draw each frame, half of a software renderer's work.
        for theme in [egui::Theme::Dark, egui::Theme::Light] {
            cc.egui_ctx
                .style_mut_of(theme, |s| s.visuals.panel_fill = egui::Color32::TRANSPARENT);
        }
        Self::with_launcher(&cc.egui_ctx, settings, worker_launcher(), opts)
    }

    /// The app with a custom launcher (tests use a fake engine).
    #[must_use]
    pub fn with_launcher(ctx: &egui::Context, mut settings: Settings, launcher: Launcher, opts: AppOptions) -> Self {
        if let Some(c) = &opts.config {
            settings.config = c.clone();
        }
        if let Some(t) = opts.tab {
            settings.tab = t;
        }
        ctx.set_theme(if settings.dark {
            egui::Theme::Dark
        } else {
            egui::Theme::Light
        });
        let pacer = Arc::new(pacer::Pacer::default());
        let waker: Waker = pacer.waker(ctx.clone());
        let mut app = Self {
            settings,
            launcher,
            runs: Vec::new(),
            selected: 0,
            launched: None,
            scrub: None,
            textures: Textures::default(),
            playground: Playground::default(),
            shown: Vec::new(),
            frames: FrameTimes::default(),
            last_frame: None,
            waker,
            pacer,
            opts,
            started_at: Instant::now(),
            plot_rects: Vec::new(),
            screenshot_requested: false,
            run_counter: 0,
            capture_errors: capture::CaptureErrors::default(),
            fetch_to: None,
            connect: ConnectForm::default(),
            lessons: lessons::Catalogue::default(),
            lesson: None,
            errors_raised: 0,
            view_rects: lessons::player::ViewRects::default(),
            picker: backbones::BackbonePicker::default(),
            pending_launch: None,
        };
        app.lessons = lessons::Catalogue::load(app.opts.lessons_dir.as_deref());
        let open = std::mem::take(&mut app.opts.open);
        if let Some(lesson) = app.opts.lesson.take() {
            // The lesson says when to train.
            app.launch(false);
            let last = lesson.steps.len();
            app.start_lesson(lesson);
            if let (Some(p), Some(n)) = (&mut app.lesson, app.opts.lesson_step) {
                p.autoplay = Some(n.clamp(1, last) - 1);
            }
        } else if open.is_empty() {
            let autostart = app.opts.autostart || app.opts.screenshot.is_some() || app.opts.frame_stats.is_some();
            app.launch(autostart);
        } else {
            app.open_folders(&open);
        }
        app
    }

    /// The selected run, if any.
    #[must_use]
    pub fn sel(&self) -> Option<&OpenRun> {
        self.runs.get(self.selected)
    }

    fn sel_mut(&mut self) -> Option<&mut OpenRun> {
        self.runs.get_mut(self.selected)
    }

    /// The selected run's status (`None` without one).
    #[must_use]
    pub fn status(&self) -> RunStatus {
        self.sel().map_or(RunStatus::None, |r| r.status)
    }

    /// The selected run's facts.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.sel().and_then(OpenRun::info)
    }

    fn selected_is_local(&self) -> bool {
        self.sel().is_some_and(|r| r.source == Source::Local)
    }

    fn show_error(&mut self, message: String) {
        self.errors_raised += 1;
        self.shown.push(Shown {
            error: true,
            notice: Notice {
                step: 0,
                time_s: 0.0,
                message,
                path: None,
                line: None,
            },
        });
    }

    /// Sends a command to the selected run.
    /// Sends the image file `path` as the router's probe of the selected run (resized to its
    /// backbone's input as evaluation would); an unreadable file or a run without a backbone
    /// is a visible message.
    /// A run opened from its folder is probed through its saved adapter on a background thread.
    pub fn probe_with(&mut self, path: &std::path::Path) {
        let Some(backbone) = self.info().map(|i| i.backbone.clone()) else {
            self.show_error("probe images need a run that has started (its backbone sets the image size)".into());
            return;
        };
        let image = match crate::train::probe::probe_rgb_file(path, &backbone) {
            Ok(image) => image,
            Err(e) => return self.show_error(e),
        };
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let waker = self.waker.clone();
        let Some(run) = self.runs.get_mut(self.selected) else {
            return;
        };
        if run.control {
            return self.send(Command::SetProbeImage { name, image });
        }
        let runs::Source::Folder(dir) = &run.source else {
            return self.show_error("this run cannot be probed from here (it is watched over the network)".into());
        };
        let probe = run
            .adapter_probe
            .get_or_insert_with(|| crate::train::probe::AdapterProbe::spawn(dir, waker));
        if !probe.request(name, image) {
            self.show_error("the run's adapter is still busy with earlier images".into());
        }
    }

    /// Answers of the adapter probes of runs opened from their folders.
    fn drain_probes(&mut self) {
        let mut errors = Vec::new();
        for run in &mut self.runs {
            let Some(probe) = &run.adapter_probe else { continue };
            while let Some(answer) = probe.try_answer() {
                match answer {
                    Ok(p) => {
                        // The recorded snapshot with the probe's fields replaced.
                        let mut snap = run.history.snapshots.last().cloned().unwrap_or_else(|| p.clone());
                        snap.probe = p.probe;
                        snap.probe_prediction = p.probe_prediction;
                        for b in &mut snap.blocks {
                            b.probe_alpha = p
                                .blocks
                                .iter()
                                .find(|q| q.block == b.block)
                                .map(|q| q.probe_alpha.clone())
                                .unwrap_or_default();
                        }
                        run.probed = Some(Box::new(snap));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        for e in errors {
            self.show_error(e);
        }
    }

    fn send(&mut self, c: Command) {
        let ok = self
            .sel_mut()
            .is_some_and(|r| r.control && r.link.as_mut().is_some_and(|l| l.send(c)));
        if !ok {
            self.show_error(
                "the run did not accept the command (it is not steerable from here, or its queue is full)".into(),
            );
        }
    }

    /// Handles one event of run `i`.
    pub fn on_event(&mut self, i: usize, ev: Event) {
        let selected = i == self.selected;
        let Some(run) = self.runs.get_mut(i) else { return };
        match ev {
            Event::Started(info) => {
                let resumed = run.history.info.is_some();
                run.status = match (&run.source, resumed) {
                    (Source::Local, _) if run.autostart => RunStatus::Running,
                    (Source::Local, _) => RunStatus::Ready,
                    _ => RunStatus::Running,
                };
                if info.start_step > 0 {
                    run.history.step = info.start_step;
                }
                if resumed {
                    run.history.resumes += 1;
                }
                run.history.info = Some(*info);
                if run.source == Source::Local && selected {
                    // The live sliders start from the values the run was launched with.
                    let cfg = &self.settings.config;
                    let c = &mut self.settings.controls;
                    c.lr = cfg.lr();
                    c.tau = cfg.method.tau;
                    c.gamma = cfg.method.gamma;
                    c.route_weight = cfg.method.route_weight;
                    c.temperature = cfg.method.temperature;
                }
            }
            Event::Progress(p) => {
                if !matches!(run.status, RunStatus::Paused | RunStatus::Finished | RunStatus::Failed) {
                    run.status = RunStatus::Running;
                }
                run.history.on_progress(&p);
            }
            Event::Snapshot(s) => run.history.on_snapshot(*s),
            Event::Eval(e) => run.history.on_eval(&e),
            Event::Applied(a) => run.history.applied.push(a),
            Event::Paused { .. } => run.status = RunStatus::Paused,
            Event::Resumed { .. } => run.status = RunStatus::Running,
            Event::Warning(n) => self.shown.push(Shown {
                error: false,
                notice: n,
            }),
            Event::Error(n) | Event::Diverged(n) => {
                // A recorded run's old errors are part of its history, not news for a dialog.
                let news = !matches!(run.source, Source::Folder(_));
                self.errors_raised += usize::from(news);
                self.shown.push(Shown { error: news, notice: n });
            }
            Event::Finished(f) => {
                run.status = if f.reason == FinishReason::Failed {
                    RunStatus::Failed
                } else {
                    RunStatus::Finished
                };
                run.history.finished = Some(f.reason);
                run.history.time_s = run.history.time_s.max(f.time_s);
                if let Some(t) = f.test_acc
                    && run.history.test.is_empty()
                {
                    run.history.test.push([f.steps as f64, f.time_s, t, 0.0]);
                }
            }
            Event::RunFile { name, base64 } => {
                let dir = self.fetch_to.clone().unwrap_or_else(|| PathBuf::from("."));
                match crate::train::serve::server::save_fetched(&dir, &name, &base64) {
                    Ok(p) => self.shown.push(Shown {
                        error: false,
                        notice: Notice {
                            step: 0,
                            time_s: 0.0,
                            message: format!("fetched {}", p.display()),
                            path: Some(p),
                            line: None,
                        },
                    }),
                    Err(e) => self.show_error(format!("cannot save {name}: {e}")),
                }
            }
        }
    }

    /// Drains every run's events for at most `budget` in all, so busy runs never stall the UI.
    fn drain(&mut self, ctx: &egui::Context, budget: Duration) {
        let start = Instant::now();
        for i in 0..self.runs.len() {
            while let Some(ev) = self.runs[i].link.as_mut().and_then(|l| l.try_recv()) {
                self.on_event(i, ev);
                if start.elapsed() > budget {
                    ctx.request_repaint();
                    return;
                }
            }
        }
    }
}

impl eframe::App for StudioApp {
    /// The panels' colour: they do not fill themselves (`StudioApp::new`).
    fn clear_color(&self, visuals: &egui::Visuals) -> [f32; 4] {
        let theme = if visuals.dark_mode {
            egui::Visuals::dark()
        } else {
            egui::Visuals::light()
        };
        theme.panel_fill.to_normalized_gamma_f32()
    }

    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        let now = Instant::now();
        if let Some(prev) = self.last_frame {
            // eframe's CPU time of the previous frame (our code + tessellation), else ours only.
            let cpu = frame.info().cpu_usage.map_or(0.0, |s| f64::from(s) * 1e3);
            self.frames.push(cpu, (now - prev).as_secs_f64() * 1e3);
        }
        self.last_frame = Some(now);
        if let Some(lag) = self.pacer.frame_started() {
            self.frames.push_lag(lag);
        }
        // A run folder dropped on the window opens like File → Open run….
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        // An image dropped while the Router view is shown becomes its probe.
        let (folders, files): (Vec<PathBuf>, Vec<PathBuf>) = dropped.into_iter().partition(|p| p.is_dir());
        if !folders.is_empty() {
            self.open_folders(&folders);
        }
        if let Some(f) = files.first()
            && self.settings.tab == Tab::Router
        {
            self.apply(panels::Action::ProbeWith(f.clone()), ctx);
        }
        self.drain(ctx, Duration::from_millis(4));
        self.drain_probes();
        for a in self.lesson_frame() {
            self.apply(a, ctx);
        }
        let failed: Vec<String> = self
            .capture_errors
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        for m in failed {
            self.show_error(m);
        }
        self.screenshot_mode(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if let Some(spec) = self.picker.take_finished() {
            self.settings.config.backbone = spec;
            self.picker.source = backbones::Source::Cache;
            if let Some(autostart) = self.pending_launch.take() {
                self.launch(autostart);
            }
        } else if self.pending_launch.is_some() && !self.picker.downloading() {
            // The download failed or was cancelled: its message is in the picker; no launch.
            self.pending_launch = None;
        }
        let actions = self.layout(ui);
        let ctx = ui.ctx().clone();
        for a in actions {
            self.apply(a, &ctx);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }
}

/// Opens the app window.
pub fn run(mut opts: AppOptions, renderer: eframe::Renderer) -> anyhow::Result<()> {
    let data = eframe::storage_dir("moppa-studio");
    if opts.runs_dir.is_none() {
        opts.runs_dir = data.as_ref().map(|d| d.join("runs"));
    }
    if opts.lessons_dir.is_none() {
        opts.lessons_dir = data.map(|d| d.join("lessons"));
    }
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("MoPPA Studio")
            .with_inner_size([1440.0, 900.0])
            .with_min_inner_size([960.0, 600.0]),
        renderer,
        ..Default::default()
    };
    let screenshot = opts.screenshot.clone();
    eframe::run_native(
        "moppa-studio",
        native,
        Box::new(move |cc| Ok(Box::new(StudioApp::new(cc, opts)))),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))?;
    if let Some(p) = screenshot
        && capture::SCREENSHOT_FAILED.load(std::sync::atomic::Ordering::Acquire)
    {
        anyhow::bail!("the screenshot was not written to {}", p.display());
    }
    Ok(())
}
