//! Pictures of the app: the `--screenshot` and `--frame-stats` harness (train, capture or measure,
//! quit), window and plot captures, PNG writing.

use super::StudioApp;
use super::lessons::player::ViewRects;
use super::messages::Messages;
use super::pacer::Pacer;
use super::panels::RunStatus;
use super::panels::status::FrameTimes;
use crate::train::protocol::Command;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window's frames: their timing (the status bar, `--frame-stats`), the pacing of the
/// repaints runs ask for, captures in flight, and where the views were drawn (plot exports, a
/// lesson's highlight).
pub struct FrameState {
    /// Frame CPU times, intervals and data-to-frame lags.
    pub times: FrameTimes,
    last: Option<Instant>,
    pacer: Arc<Pacer>,
    started: Instant,
    capture_requested: bool,
    capture_errors: CaptureErrors,
    /// Where each plot was drawn (by id), for exports.
    pub plot_rects: Vec<(&'static str, egui::Rect)>,
    /// Where the views and tab buttons were drawn.
    pub view_rects: ViewRects,
    /// What the curves view drew last.
    pub curves_drawn: crate::app::panels::curves::Drawn,
}

impl FrameState {
    /// Frames paced by `pacer`.
    pub(super) fn new(pacer: Arc<Pacer>) -> Self {
        Self {
            times: FrameTimes::default(),
            last: None,
            pacer,
            started: Instant::now(),
            capture_requested: false,
            capture_errors: CaptureErrors::default(),
            plot_rects: Vec::new(),
            curves_drawn: crate::app::panels::curves::Drawn::default(),
            view_rects: ViewRects::default(),
        }
    }

    /// Notes a frame's start: the previous frame's CPU time and interval, and the lag from new
    /// data to this frame.
    pub(super) fn begin(&mut self, frame: &eframe::Frame) {
        let now = Instant::now();
        if let Some(prev) = self.last {
            // eframe's CPU time of the previous frame (our code + tessellation), else ours only.
            let cpu = frame.info().cpu_usage.map_or(0.0, |s| f64::from(s) * 1e3);
            self.times.push(cpu, (now - prev).as_secs_f64() * 1e3);
        }
        self.last = Some(now);
        if let Some(lag) = self.pacer.frame_started() {
            self.times.push_lag(lag);
        }
    }

    /// Shows the captures that failed since the last frame.
    pub(super) fn report_failed_captures(&self, messages: &mut Messages) {
        let failed: Vec<String> = self
            .capture_errors
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        for m in failed {
            messages.error(m);
        }
    }

    /// Captures the window (or the plot `id`, when given and drawn) into `path`.
    pub(super) fn capture(&self, ctx: &egui::Context, path: PathBuf, plot: Option<&str>) {
        let crop = plot.and_then(|id| self.plot_rects.iter().find(|(n, _)| *n == id).map(|(_, r)| *r));
        if plot.is_some() && crop.is_none() {
            return;
        }
        screenshot(ctx, path, crop, self.capture_errors.clone());
    }
}

impl StudioApp {
    pub(super) fn screenshot_mode(&mut self, ctx: &egui::Context) {
        if let Some(path) = self.opts.screenshot.clone() {
            let step = self.sel().map_or(0, |r| r.history.step);
            // A folder whose writer stopped without a `finished` record will not reach more steps.
            let crashed = self.sel().is_some_and(|r| {
                matches!(
                    r.link.as_ref().and_then(|l| l.liveness()),
                    Some(crate::train::replay::Liveness::Crashed)
                )
            });
            let done = crashed || matches!(self.status(), RunStatus::Finished | RunStatus::Failed);
            // A lesson's picture: once autoplay has reached its step and that step's check holds.
            let ready = match &self.lesson {
                Some(p) if p.autoplay.is_some() => p.arrived(self.lesson_step_done()) && !self.playground.busy(),
                _ => step >= self.opts.after_steps || done,
            };
            if !self.frame.capture_requested && ready {
                self.frame.capture_requested = true;
                if self.status() == RunStatus::Running {
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
                            Err(e) => {
                                eprintln!("error: cannot write {}: {e}", path.display());
                                SCREENSHOT_FAILED.store(true, Ordering::Release);
                            }
                        }
                        ctx3.send_viewport_cmd(egui::ViewportCommand::Close);
                    });
                    ctx2.request_repaint();
                });
            }
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if let Some(secs) = self.opts.frame_stats
            && !self.frame.capture_requested
        {
            let elapsed = self.frame.started.elapsed().as_secs_f64();
            if elapsed >= secs {
                self.frame.capture_requested = true;
                let frames = &self.frame.times;
                if let (Some((med, p99)), Some((gap, gap99))) = (frames.stats(), frames.intervals()) {
                    let step = self.sel().map_or(0, |r| r.history.step);
                    let thr = self.sel().map_or(0.0, |r| r.history.throughput);
                    let (lag, lag99) = frames.lags().unwrap_or((0.0, 0.0));
                    println!(
                        "UI while training (step {step}, {thr:.0} img/s): {} frames in {elapsed:.1} s ({:.1} a second); over the last {}: frame CPU time median {med:.2} ms, p99 {p99:.2} ms; frame interval median {gap:.1} ms, p99 {gap99:.1} ms; new data in a frame after median {lag:.1} ms, p99 {lag99:.1} ms",
                        frames.count(),
                        frames.count() as f64 / elapsed.max(1e-3),
                        frames.len(),
                    );
                }
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            // No frames of its own beyond the one that ends the measurement: the figures are what
            // a user gets.
            ctx.request_repaint_after(Duration::from_secs_f64((secs - elapsed).max(0.0)));
        }
    }
}

/// Set when `--screenshot` could not write its file: the app then exits with status 1.
pub(super) static SCREENSHOT_FAILED: AtomicBool = AtomicBool::new(false);

/// Messages of captures that failed, for the app to show (the capture callback runs later).
pub type CaptureErrors = Arc<Mutex<Vec<String>>>;

/// Saves a window capture (optionally cropped) as PNG from the screenshot callback; a failure
/// is queued in `errors` for the app to show.
fn screenshot(ctx: &egui::Context, path: PathBuf, crop: Option<egui::Rect>, errors: CaptureErrors) {
    let ppp = ctx.pixels_per_point();
    ctx.request_screenshot(move |img| {
        let img = match crop {
            Some(r) => Arc::new(img.region(&r, Some(ppp))),
            None => img,
        };
        if let Err(e) = save_png(&img, &path)
            && let Ok(mut q) = errors.lock()
        {
            q.push(format!("cannot write {}: {e}", path.display()));
        }
    });
    ctx.request_repaint();
}

/// Writes an egui image as PNG, atomically.
pub fn save_png(img: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let rgba: Vec<u8> = img
        .pixels
        .iter()
        .flat_map(egui::Color32::to_srgba_unmultiplied)
        .collect();
    let buf = image::RgbaImage::from_raw(img.width() as u32, img.height() as u32, rgba).ok_or("bad image size")?;
    crate::util::write_atomic(path, |w| {
        buf.write_to(w, image::ImageFormat::Png).map_err(std::io::Error::other)
    })
    .map_err(|e| e.to_string())
}
