//! Pictures of the app: the `--screenshot` and `--frame-stats` harness (train, capture or measure,
//! quit), window and plot captures, PNG writing.

use super::StudioApp;
use super::panels::RunStatus;
use crate::train::protocol::Command;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl StudioApp {
    pub(super) fn screenshot_mode(&mut self, ctx: &egui::Context) {
        if let Some(path) = self.opts.screenshot.clone() {
            let step = self.sel().map_or(0, |r| r.history.step);
            let done = matches!(self.status(), RunStatus::Finished | RunStatus::Failed);
            // A lesson's picture: once autoplay has reached its step and that step's check holds.
            let ready = match &self.lesson {
                Some(p) if p.autoplay.is_some() => p.arrived(self.lesson_step_done()) && !self.playground.busy(),
                _ => step >= self.opts.after_steps || done,
            };
            if !self.screenshot_requested && ready {
                self.screenshot_requested = true;
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
            && !self.screenshot_requested
        {
            let elapsed = self.started_at.elapsed().as_secs_f64();
            if elapsed >= secs {
                self.screenshot_requested = true;
                if let (Some((med, p99)), Some((gap, gap99))) = (self.frames.stats(), self.frames.intervals()) {
                    let step = self.sel().map_or(0, |r| r.history.step);
                    let thr = self.sel().map_or(0.0, |r| r.history.throughput);
                    let (lag, lag99) = self.frames.lags().unwrap_or((0.0, 0.0));
                    println!(
                        "UI while training (step {step}, {thr:.0} img/s): {} frames in {elapsed:.1} s ({:.1} a second); over the last {}: frame CPU time median {med:.2} ms, p99 {p99:.2} ms; frame interval median {gap:.1} ms, p99 {gap99:.1} ms; new data in a frame after median {lag:.1} ms, p99 {lag99:.1} ms",
                        self.frames.count(),
                        self.frames.count() as f64 / elapsed.max(1e-3),
                        self.frames.len(),
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
pub(super) fn screenshot(ctx: &egui::Context, path: PathBuf, crop: Option<egui::Rect>, errors: CaptureErrors) {
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
