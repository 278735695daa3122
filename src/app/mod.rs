//! The desktop app (feature `gui`): live spectral filters, router per block, curves, and
//! coefficients that can be moved while training. It drives the engine only through the
//! protocol ([`link::Link`]: `Command` out, `Event` in) and never touches a tensor.

mod actions;
mod capture;
pub mod history;
mod layout;
pub mod link;
pub mod panels;
pub mod state;
pub mod widgets;

pub use actions::metrics_csv;
pub use capture::save_png;

use history::RunHistory;
use link::{Launcher, Link, worker_launcher};
use panels::RunStatus;
use panels::playground::Playground;
use panels::status::FrameTimes;
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
}

/// A message shown to the user.
#[derive(Clone, Debug)]
struct Shown {
    error: bool,
    notice: Notice,
}

/// The app.
pub struct StudioApp {
    /// Persisted settings.
    pub settings: Settings,
    launcher: Launcher,
    link: Option<Box<dyn Link>>,
    /// Where the current run is.
    pub status: RunStatus,
    launched: Option<RunConfig>,
    /// Histories of this session's runs (the last is the current one).
    pub runs: Vec<RunHistory>,
    /// The current run's facts.
    pub info: Option<RunInfo>,
    scrub: Option<usize>,
    textures: Textures,
    playground: Playground,
    shown: Vec<Shown>,
    frames: FrameTimes,
    last_frame: Option<Instant>,
    waker: Waker,
    opts: AppOptions,
    started_at: Instant,
    plot_rects: Vec<(&'static str, egui::Rect)>,
    screenshot_requested: bool,
    run_counter: usize,
    capture_errors: capture::CaptureErrors,
}

impl StudioApp {
    /// The app with real training runs.
    #[must_use]
    pub fn new(cc: &eframe::CreationContext<'_>, opts: AppOptions) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
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
        let repaint = ctx.clone();
        let waker: Waker = Arc::new(move || repaint.request_repaint());
        let mut app = Self {
            settings,
            launcher,
            link: None,
            status: RunStatus::None,
            launched: None,
            runs: Vec::new(),
            info: None,
            scrub: None,
            textures: Textures::default(),
            playground: Playground::default(),
            shown: Vec::new(),
            frames: FrameTimes::default(),
            last_frame: None,
            waker,
            opts,
            started_at: Instant::now(),
            plot_rects: Vec::new(),
            screenshot_requested: false,
            run_counter: 0,
            capture_errors: capture::CaptureErrors::default(),
        };
        let autostart = app.opts.autostart || app.opts.screenshot.is_some() || app.opts.frame_stats.is_some();
        app.launch(autostart);
        app
    }

    /// Starts a new run (idle unless `autostart`) with the current settings.
    fn launch(&mut self, autostart: bool) {
        self.link = None;
        self.run_counter += 1;
        let cfg = self.settings.config.clone();
        self.runs
            .push(RunHistory::new(format!("#{} {}", self.run_counter, cfg.method.label())));
        self.info = None;
        self.scrub = None;
        match (self.launcher)(&cfg, self.waker.clone(), autostart) {
            Ok(link) => {
                self.link = Some(link);
                self.status = RunStatus::None;
                self.launched = Some(cfg);
            }
            Err(e) => {
                self.status = RunStatus::Failed;
                self.show_error(format!("cannot start the run: {e:#}"));
            }
        }
    }

    fn show_error(&mut self, message: String) {
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

    fn send(&mut self, c: Command) {
        let ok = self.link.as_mut().is_some_and(|l| l.send(c));
        if !ok {
            self.show_error("the engine did not accept the command (no run, or its queue is full)".into());
        }
    }

    fn current(&mut self) -> &mut RunHistory {
        if self.runs.is_empty() {
            self.runs.push(RunHistory::new("#0".into()));
        }
        let last = self.runs.len() - 1;
        &mut self.runs[last]
    }

    /// Handles one event from the engine.
    pub fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Started(info) => {
                self.status =
                    if self.opts.autostart || self.opts.screenshot.is_some() || self.opts.frame_stats.is_some() {
                        RunStatus::Running
                    } else {
                        RunStatus::Ready
                    };
                if info.start_step > 0 {
                    self.current().step = info.start_step;
                }
                self.current().info = Some((*info).clone());
                self.info = Some(*info);
                // The live sliders start from the values the run was launched with.
                let cfg = &self.settings.config;
                let c = &mut self.settings.controls;
                c.lr = cfg.lr();
                c.tau = cfg.method.tau;
                c.gamma = cfg.method.gamma;
                c.route_weight = cfg.method.route_weight;
                c.temperature = cfg.method.temperature;
            }
            Event::Progress(p) => {
                if self.status != RunStatus::Paused {
                    self.status = RunStatus::Running;
                }
                self.current().on_progress(&p);
            }
            Event::Snapshot(s) => self.current().on_snapshot(*s),
            Event::Eval(e) => self.current().on_eval(&e),
            Event::Applied(a) => self.current().applied.push(a),
            Event::Paused { .. } => self.status = RunStatus::Paused,
            Event::Resumed { .. } => self.status = RunStatus::Running,
            Event::Warning(n) => self.shown.push(Shown {
                error: false,
                notice: n,
            }),
            Event::Error(n) | Event::Diverged(n) => self.shown.push(Shown { error: true, notice: n }),
            Event::Finished(f) => {
                self.status = if f.reason == FinishReason::Failed {
                    RunStatus::Failed
                } else {
                    RunStatus::Finished
                };
                if let Some(t) = f.test_acc {
                    let r = self.current();
                    if r.test.is_empty() {
                        r.test.push([f.steps as f64, f.time_s, t, 0.0]);
                    }
                }
            }
        }
    }

    /// Drains events for at most `budget`, so a busy engine never stalls the UI.
    fn drain(&mut self, ctx: &egui::Context, budget: Duration) {
        let start = Instant::now();
        while let Some(ev) = self.link.as_mut().and_then(|l| l.try_recv()) {
            self.on_event(ev);
            if start.elapsed() > budget {
                ctx.request_repaint();
                break;
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        let now = Instant::now();
        if let Some(prev) = self.last_frame {
            // eframe's CPU time of the previous frame (our code + tessellation), else ours only.
            let cpu = frame.info().cpu_usage.map_or(0.0, |s| f64::from(s) * 1e3);
            self.frames.push(cpu, (now - prev).as_secs_f64() * 1e3);
        }
        self.last_frame = Some(now);
        self.drain(ctx, Duration::from_millis(4));
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
pub fn run(opts: AppOptions, renderer: eframe::Renderer) -> anyhow::Result<()> {
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
