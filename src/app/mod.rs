//! The desktop app (feature `gui`): live spectral filters, router per block, curves, and
//! coefficients that can be moved while training, for the run it launches, runs opened from
//! their folders (finished, or followed while another process writes them) and runs served by
//! `moppa train --serve` elsewhere. It drives every run only through the protocol
//! ([`link::Link`]: `Command` out, `Event` in) and never touches a tensor.

mod actions;
pub mod backbones;
mod capture;
mod diagnose;
pub mod dialogs;
pub mod groups;
pub mod history;
pub mod jobs;
mod layout;
pub mod lessons;
pub mod link;
pub mod messages;
pub mod pacer;
pub mod panels;
mod runs;
pub mod state;
pub mod widgets;

pub use actions::metrics_csv;
pub use capture::save_png;

use capture::FrameState;
use link::{Launcher, worker_launcher};
use messages::Messages;
use panels::RunStatus;
use panels::playground::Playground;
pub use runs::{Launch, OpenRun, RunsState, Source};
use state::{Settings, Tab};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use widgets::heatmap::Textures;

use crate::config::RunConfig;
use crate::train::protocol::{Command, RunInfo};

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
    /// Type paths in the window instead of native file dialogs (also `MOPPA_TYPED_PATHS=1`, and
    /// where no native dialog can open).
    pub typed_paths: bool,
}

/// The app: its settings, the runs it shows, how it launches its own, what it tells the user,
/// its frames, and the state of its tools (playground, dialogs, lessons, backbone picker).
pub struct StudioApp {
    /// Persisted settings.
    pub settings: Settings,
    /// Every run shown (this app's, opened folders, connected servers) and the one selected.
    pub runs: RunsState,
    /// How this app launches its own runs.
    launch: Launch,
    /// Errors and notes shown.
    pub messages: Messages,
    /// Frame timing, captures, where the views were drawn.
    pub frame: FrameState,
    textures: Textures,
    playground: Playground,
    opts: AppOptions,
    /// The Connect… form and the file dialog in flight.
    pub dialogs: dialogs::Dialogs,
    /// The lessons found (built-in and the teacher's), and the files that could not be read.
    pub lessons: lessons::Catalogue,
    /// The lesson being played.
    pub lesson: Option<lessons::player::Player>,
    /// The backbone picker (cached models, a download in flight).
    pub picker: backbones::BackbonePicker,
    /// The token view's `hf` of the probe image.
    hf_cache: panels::usage::HfCache,
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
        let native_dialogs = !opts.typed_paths && dialogs::native_dialogs_available();
        let pacer = Arc::new(pacer::Pacer::default());
        let waker = pacer.waker(ctx.clone());
        let mut app = Self {
            settings,
            runs: RunsState::default(),
            launch: Launch::new(launcher, waker),
            messages: Messages::default(),
            frame: FrameState::new(pacer),
            textures: Textures::default(),
            playground: Playground::default(),
            opts,
            dialogs: dialogs::Dialogs::new(native_dialogs),
            lessons: lessons::Catalogue::default(),
            lesson: None,
            picker: backbones::BackbonePicker::default(),
            hf_cache: panels::usage::HfCache::default(),
        };
        app.lessons = lessons::Catalogue::load(app.opts.lessons_dir.as_deref());
        let open = std::mem::take(&mut app.opts.open);
        if let Some(lesson) = app.opts.lesson.take() {
            // The lesson says when to train.
            app.launch_run(false);
            let last = lesson.steps.len();
            app.start_lesson(lesson);
            if let (Some(p), Some(n)) = (&mut app.lesson, app.opts.lesson_step) {
                p.autoplay = Some(n.clamp(1, last) - 1);
            }
        } else if open.is_empty() {
            let autostart = app.opts.autostart || app.opts.screenshot.is_some() || app.opts.frame_stats.is_some();
            app.launch_run(autostart);
        } else {
            app.open_folders(&open);
        }
        app
    }

    /// The settings written between launches (eframe saves them every 30 s and at exit): the
    /// user's own, never a lesson's temporary run settings (an app killed during a lesson comes
    /// back with the user's).
    #[must_use]
    pub fn persisted_settings(&self) -> Settings {
        let mut s = self.settings.clone();
        if let Some(cfg) = self.lesson.as_ref().and_then(lessons::player::Player::saved_config) {
            s.config = cfg.clone();
        }
        s
    }

    /// The selected run, if any.
    #[must_use]
    pub fn sel(&self) -> Option<&OpenRun> {
        self.runs.sel()
    }

    /// The selected run's status (`None` without one).
    #[must_use]
    pub fn status(&self) -> RunStatus {
        self.runs.status()
    }

    /// The selected run's facts.
    #[must_use]
    pub fn info(&self) -> Option<&RunInfo> {
        self.runs.info()
    }

    /// Sends the image file `path` as the router's probe of the selected run (resized to its
    /// backbone's input as evaluation would); an unreadable file or a run without a backbone
    /// is a visible message.
    /// A run opened from its folder is probed through its saved adapter on a background thread.
    pub fn probe_with(&mut self, path: &std::path::Path) {
        let Some(backbone) = self.info().map(|i| i.backbone.clone()) else {
            self.messages
                .error("probe images need a run that has started (its backbone sets the image size)".into());
            return;
        };
        let image = match crate::train::probe::probe_rgb_file(path, &backbone) {
            Ok(image) => image,
            Err(e) => return self.messages.error(e),
        };
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let waker = self.launch.waker();
        let Some(run) = self.runs.sel_mut() else {
            return;
        };
        if run.control {
            return self.send(Command::SetProbeImage { name, image });
        }
        let runs::Source::Folder(dir) = &run.source else {
            return self
                .messages
                .error("this run cannot be probed from here (it is watched over the network)".into());
        };
        let probe = run
            .adapter_probe
            .get_or_insert_with(|| crate::train::probe::AdapterProbe::spawn(dir, waker));
        if !probe.request(name, image) {
            self.messages
                .error("the run's adapter is still busy with earlier images".into());
        }
    }

    /// Sends a command to the selected run; a refusal is a visible message.
    fn send(&mut self, c: Command) {
        if !self.runs.send(c) {
            self.messages.error(
                "the run did not accept the command (it is not steerable from here, or its queue is full)".into(),
            );
        }
    }

    /// Drains the runs' events for at most `budget` (the rest next frame).
    fn drain(&mut self, ctx: &egui::Context, budget: Duration) {
        let more = self.runs.drain(budget, &mut self.messages);
        if more {
            ctx.request_repaint();
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
        self.frame.begin(frame);
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
        self.runs.drain_probes(&mut self.messages);
        self.poll_jobs();
        for a in self.lesson_frame() {
            self.apply(a, ctx);
        }
        self.file_answers(ctx);
        self.frame.report_failed_captures(&mut self.messages);
        self.screenshot_mode(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if let Some(spec) = self.picker.take_finished() {
            self.settings.config.backbone = spec;
            self.picker.source = backbones::Source::Cache;
            if let Some(autostart) = self.launch.take_pending() {
                self.launch_run(autostart);
            }
        } else if self.launch.pending() && !self.picker.downloading() {
            // The download failed or was cancelled: its message is in the picker; no launch.
            self.launch.take_pending();
        }
        let actions = self.layout(ui);
        let ctx = ui.ctx().clone();
        for a in actions {
            self.apply(a, &ctx);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.persisted_settings());
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
