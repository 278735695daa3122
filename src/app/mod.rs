//! The desktop app (feature `gui`): live spectral filters, router per block, curves, and
//! coefficients that can be moved while training. It drives the engine only through the
//! protocol ([`link::Link`]: `Command` out, `Event` in) and never touches a tensor.

pub mod history;
pub mod link;
pub mod panels;
pub mod state;
pub mod widgets;

use history::RunHistory;
use link::{Launcher, Link, worker_launcher};
use panels::playground::Playground;
use panels::status::FrameTimes;
use panels::{Action, RunStatus};
use state::{Settings, Tab};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use widgets::heatmap::Textures;

use crate::model::MethodKind;
use crate::train::RunConfig;
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
}

fn cuda_available() -> bool {
    cfg!(feature = "cuda") && candle_core::utils::cuda_is_available()
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
            Event::Error(n) => self.shown.push(Shown { error: true, notice: n }),
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

    fn apply(&mut self, action: Action, ctx: &egui::Context) {
        match action {
            Action::Start => {
                let changed = self.launched.as_ref() != Some(&self.settings.config);
                match self.status {
                    RunStatus::Ready | RunStatus::Paused if !changed => self.send(Command::Start),
                    RunStatus::Running => {}
                    _ => self.launch(true),
                }
                if self.status == RunStatus::Ready || self.status == RunStatus::Paused {
                    self.status = RunStatus::Running;
                }
            }
            Action::Pause => self.send(Command::Pause),
            Action::Step => self.send(Command::Step),
            Action::Stop => self.send(Command::Stop),
            Action::Reset => self.launch(false),
            Action::Send(c) => self.send(c),
            Action::PickBackbone => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file()
                {
                    self.settings.config.backbone = p.display().to_string();
                }
            }
            Action::PickData => {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    self.settings.config.data = p.display().to_string();
                }
            }
            Action::LoadConfig => {
                if let Some(p) = rfd::FileDialog::new().add_filter("TOML", &["toml"]).pick_file() {
                    match std::fs::read_to_string(&p)
                        .map_err(|e| e.to_string())
                        .and_then(|t| RunConfig::from_toml(&t))
                    {
                        Ok(c) => self.settings.config = c,
                        Err(e) => self.show_error(format!("{}: {e}", p.display())),
                    }
                }
            }
            Action::SaveConfig => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("TOML", &["toml"])
                    .set_file_name("run.toml")
                    .save_file()
                {
                    let r = self
                        .settings
                        .config
                        .to_toml()
                        .and_then(|t| std::fs::write(&p, t).map_err(|e| e.to_string()));
                    if let Err(e) = r {
                        self.show_error(format!("{}: {e}", p.display()));
                    }
                }
            }
            Action::ExportCsv => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("CSV", &["csv"])
                    .set_file_name("metrics.csv")
                    .save_file()
                {
                    let csv = self.runs.last().map(metrics_csv).unwrap_or_default();
                    if let Err(e) = std::fs::write(&p, csv) {
                        self.show_error(format!("{}: {e}", p.display()));
                    }
                }
            }
            Action::ExportPlot(id) => {
                let rect = self.plot_rects.iter().find(|(n, _)| *n == id).map(|(_, r)| *r);
                if let (Some(rect), Some(p)) = (
                    rect,
                    rfd::FileDialog::new()
                        .add_filter("PNG", &["png"])
                        .set_file_name(format!("{id}.png"))
                        .save_file(),
                ) {
                    screenshot(ctx, p, Some(rect));
                }
            }
            Action::Screenshot => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("PNG", &["png"])
                    .set_file_name("moppa-studio.png")
                    .save_file()
                {
                    screenshot(ctx, p, None);
                }
            }
            Action::SaveAdapter => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("safetensors", &["safetensors"])
                    .set_file_name("adapter.safetensors")
                    .save_file()
                {
                    self.send(Command::SaveCheckpoint { path: p });
                }
            }
            Action::PickImage => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("images", &["png", "jpg", "jpeg"])
                    .pick_file()
                {
                    match image::open(&p) {
                        Ok(img) => {
                            self.playground.set_image(img);
                            self.settings.playground.image = Some(p);
                        }
                        Err(e) => self.show_error(format!("{}: {e}", p.display())),
                    }
                }
            }
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        ui.horizontal(|ui| {
            ui.heading("MoPPA Studio");
            ui.separator();
            for t in Tab::ALL {
                ui.selectable_value(&mut self.settings.tab, t, t.label());
            }
            ui.separator();
            let s = self.status;
            let can_start = !matches!(s, RunStatus::Running | RunStatus::None);
            if ui
                .add_enabled(
                    can_start,
                    egui::Button::new(if s == RunStatus::Paused { "Resume" } else { "Start" }),
                )
                .on_hover_text("Space toggles pause")
                .clicked()
            {
                actions.push(Action::Start);
            }
            if ui
                .add_enabled(s == RunStatus::Running, egui::Button::new("Pause"))
                .clicked()
            {
                actions.push(Action::Pause);
            }
            if ui
                .add_enabled(
                    matches!(s, RunStatus::Ready | RunStatus::Paused),
                    egui::Button::new("Step"),
                )
                .on_hover_text("One optimizer step")
                .clicked()
            {
                actions.push(Action::Step);
            }
            if ui
                .add_enabled(
                    matches!(s, RunStatus::Running | RunStatus::Paused | RunStatus::Ready),
                    egui::Button::new("Stop"),
                )
                .on_hover_text("Final evaluation and checkpoint")
                .clicked()
            {
                actions.push(Action::Stop);
            }
            if ui
                .button("Reset")
                .on_hover_text("A fresh run with the current settings")
                .clicked()
            {
                actions.push(Action::Reset);
            }
            ui.separator();
            ui.menu_button("Export", |ui| {
                if ui.button("Metrics CSV…").clicked() {
                    actions.push(Action::ExportCsv);
                }
                if ui.button("Window screenshot…").clicked() {
                    actions.push(Action::Screenshot);
                }
                if ui
                    .add_enabled(self.link.is_some(), egui::Button::new("Adapter checkpoint…"))
                    .clicked()
                {
                    actions.push(Action::SaveAdapter);
                }
            });
            let mut dark = self.settings.dark;
            if ui.checkbox(&mut dark, "dark").changed() {
                self.settings.dark = dark;
                ui.ctx()
                    .set_theme(if dark { egui::Theme::Dark } else { egui::Theme::Light });
            }
        });
        actions
    }

    fn messages(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, m) in self.shown.iter().enumerate().rev().take(3) {
            ui.horizontal(|ui| {
                let color = if m.error {
                    egui::Color32::from_rgb(230, 80, 80)
                } else {
                    egui::Color32::from_rgb(220, 170, 60)
                };
                let mut text = m.notice.message.clone();
                if let Some(p) = &m.notice.path
                    && !text.contains(&p.display().to_string())
                {
                    text = format!("{text} ({})", p.display());
                }
                ui.colored_label(color, format!("{} {text}", if m.error { "error:" } else { "note:" }));
                if ui.small_button("dismiss").clicked() {
                    dismiss = Some(i);
                }
            });
        }
        if let Some(i) = dismiss {
            self.shown.remove(i);
        }
    }

    fn error_modal(&mut self, ui: &mut egui::Ui) {
        let Some(idx) = self.shown.iter().position(|m| m.error) else {
            return;
        };
        let m = self.shown[idx].clone();
        let r = egui::Modal::new(egui::Id::unique("error-modal")).show(ui.ctx(), |ui| {
            ui.heading("Something went wrong");
            ui.label(&m.notice.message);
            if let Some(p) = &m.notice.path {
                ui.label(format!(
                    "file: {}{}",
                    p.display(),
                    m.notice.line.map(|l| format!(", line {l}")).unwrap_or_default()
                ));
            }
            ui.label(format!("at step {}", m.notice.step));
            ui.button("Dismiss").clicked()
        });
        if r.inner || r.should_close() {
            self.shown.remove(idx);
        }
    }

    fn snapshot_for_controls(&self) -> Option<&crate::train::protocol::Snapshot> {
        self.runs.last().and_then(|r| r.snapshots.last())
    }

    fn screenshot_mode(&mut self, ctx: &egui::Context) {
        if let Some(path) = self.opts.screenshot.clone() {
            let step = self.runs.last().map_or(0, |r| r.step);
            let done = matches!(self.status, RunStatus::Finished | RunStatus::Failed);
            if !self.screenshot_requested && (step >= self.opts.after_steps || done) {
                self.screenshot_requested = true;
                if self.status == RunStatus::Running {
                    self.send(Command::Pause);
                }
                // Let one more frame draw the latest snapshot, then capture and quit.
                let ctx2 = ctx.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(800));
                    let ctx3 = ctx2.clone();
                    ctx2.request_screenshot(move |img| {
                        match save_png(&img, &path) {
                            Ok(()) => println!("wrote {}", path.display()),
                            Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
                        }
                        ctx3.send_viewport_cmd(egui::ViewportCommand::Close);
                    });
                    ctx2.request_repaint();
                });
            }
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if let Some(secs) = self.opts.frame_stats
            && !self.screenshot_requested
        {
            if self.started_at.elapsed().as_secs_f64() >= secs {
                self.screenshot_requested = true;
                if let (Some((med, p99)), Some((gap, gap99))) = (self.frames.stats(), self.frames.intervals()) {
                    let step = self.runs.last().map_or(0, |r| r.step);
                    let thr = self.runs.last().map_or(0.0, |r| r.throughput);
                    println!(
                        "UI over the last {} frames while training (step {step}, {thr:.0} img/s): frame CPU time median {med:.2} ms, p99 {p99:.2} ms; frame interval median {gap:.1} ms ({:.0} fps), p99 {gap99:.1} ms",
                        self.frames.len(),
                        1000.0 / gap.max(1e-3)
                    );
                }
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            ctx.request_repaint_after(Duration::from_millis(15));
        }
    }
}

/// Saves a window capture (optionally cropped) as PNG from the screenshot callback.
fn screenshot(ctx: &egui::Context, path: PathBuf, crop: Option<egui::Rect>) {
    let ppp = ctx.pixels_per_point();
    ctx.request_screenshot(move |img| {
        let img = match crop {
            Some(r) => Arc::new(img.region(&r, Some(ppp))),
            None => img,
        };
        if let Err(e) = save_png(&img, &path) {
            eprintln!("error: cannot write {}: {e}", path.display());
        }
    });
    ctx.request_repaint();
}

/// Writes an egui image as PNG.
pub fn save_png(img: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let rgba: Vec<u8> = img
        .pixels
        .iter()
        .flat_map(egui::Color32::to_srgba_unmultiplied)
        .collect();
    let buf = image::RgbaImage::from_raw(img.width() as u32, img.height() as u32, rgba).ok_or("bad image size")?;
    buf.save(path).map_err(|e| e.to_string())
}

/// The current run's metrics in the run folder's CSV layout.
#[must_use]
pub fn metrics_csv(r: &RunHistory) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{}\n", crate::train::runlog::CSV_HEADER);
    for (((l, rl), a), lr) in r
        .loss
        .points
        .iter()
        .zip(&r.route_loss.points)
        .zip(&r.train_acc.points)
        .zip(&r.lr.points)
    {
        let _ = writeln!(
            s,
            "progress,{},{:.4},,{},{},{},{},",
            l[0], l[1], l[2], rl[2], a[2], lr[2]
        );
    }
    for (split, rows) in [("val", &r.val), ("test", &r.test)] {
        for e in rows {
            let _ = writeln!(s, "eval,{},{:.4},{split},{},,{},,", e[0], e[1], e[3], e[2]);
        }
    }
    s
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
        self.screenshot_mode(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if self.status == RunStatus::Running {
            // ~60 fps while training: curves and filters move smoothly.
            ui.ctx().request_repaint_after(Duration::from_millis(15));
        }
        let mut actions = Vec::new();
        if !ui.ctx().egui_wants_keyboard_input()
            && ui.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Space))
        {
            match self.status {
                RunStatus::Running => actions.push(Action::Pause),
                RunStatus::Paused | RunStatus::Ready => actions.push(Action::Start),
                _ => {}
            }
        }
        egui::Panel::top("top").show(ui, |ui| actions.extend(self.top_bar(ui)));
        egui::Panel::bottom("status").show(ui, |ui| {
            self.messages(ui);
            let (step, thr) = self.runs.last().map_or((0, 0.0), |r| (r.step, r.throughput));
            let (device, total) = self.info.as_ref().map_or(("-".to_owned(), 0), |i| {
                let plural = if i.threads == 1 { "" } else { "s" };
                (format!("{} · {} thread{plural}", i.device, i.threads), i.total_steps)
            });
            let frames = (!self.opts.stable_display).then_some(&self.frames);
            panels::status::ui(ui, self.status, &device, step, total, thr, frames);
        });
        egui::Panel::left("launch")
            .resizable(true)
            .default_size(270.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    let backbone = self.info.as_ref().map(|i| i.backbone.clone());
                    let classes = self.info.as_ref().map_or(10, |i| i.classes.len());
                    actions.extend(panels::launch::ui(
                        ui,
                        &mut self.settings.config,
                        self.status,
                        backbone.as_ref(),
                        classes,
                        cuda_available(),
                    ));
                });
            });
        let moppa = self.info.as_ref().is_some_and(|i| !i.priors.is_empty());
        if moppa && self.settings.tab != Tab::Playground {
            egui::Panel::right("live")
                .resizable(true)
                .default_size(290.0)
                .show(ui, |ui| {
                    let snap = self.snapshot_for_controls().cloned();
                    let running = self.status == RunStatus::Running;
                    actions.extend(panels::live::ui(
                        ui,
                        &mut self.settings.controls,
                        snap.as_ref(),
                        running,
                    ));
                });
        }
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| match self.settings.tab {
                    Tab::Filters => {
                        let rank = self.info.as_ref().map_or(0, |i| i.rank);
                        let snaps: &[crate::train::protocol::Snapshot] =
                            self.runs.last().map_or(&[], |r| r.snapshots.as_slice());
                        if !moppa && self.info.is_some() {
                            ui.label(format!(
                                "This run is {}: the spectral views are for MoPPA runs.",
                                self.info.as_ref().map_or("", |i| i.method.as_str())
                            ));
                        }
                        actions.extend(panels::filters::ui(
                            ui,
                            &mut self.settings.filters,
                            snaps,
                            &mut self.scrub,
                            rank,
                            &mut self.textures,
                        ));
                    }
                    Tab::Router => {
                        let probes = self.info.as_ref().map_or(0, |i| i.probes);
                        if let Some(r) = self.runs.last() {
                            let idx = self.scrub.unwrap_or(usize::MAX);
                            let snap = r.snapshots.get(idx).or_else(|| r.snapshots.last());
                            actions.extend(panels::router::ui(
                                ui,
                                &mut self.settings.router,
                                r,
                                snap,
                                probes,
                                &mut self.textures,
                            ));
                        }
                    }
                    Tab::Curves => {
                        let (a, rects) = panels::curves::ui(ui, &mut self.settings.curves, &self.runs);
                        actions.extend(a);
                        self.plot_rects = rects;
                    }
                    Tab::Playground => {
                        actions.extend(panels::playground::ui(
                            ui,
                            &mut self.settings.playground,
                            &mut self.playground,
                            &mut self.textures,
                        ));
                    }
                });
        });
        self.error_modal(ui);
        let ctx = ui.ctx().clone();
        for a in actions {
            self.apply(a, &ctx);
        }
        if self.info.as_ref().is_some_and(|i| {
            i.method != MethodKind::Moppa.name() && self.settings.tab == Tab::Router && i.priors.is_empty()
        }) {
            // Nothing to route for other methods; the router tab says so itself.
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
    eframe::run_native(
        "moppa-studio",
        native,
        Box::new(move |cc| Ok(Box::new(StudioApp::new(cc, opts)))),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
