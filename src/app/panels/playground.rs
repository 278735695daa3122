//! The playground: the three priors applied to a whole photo at full resolution (the physics
//! module's rustdct path, on a background thread), before and after side by side, with presets
//! that teach what each prior does.

use super::Action;
use crate::app::state::PlaygroundSettings;
use crate::app::widgets::heatmap::Textures;
use crate::physics::{Prior, PriorCoeffs, apply_prior};
use crossbeam_channel::{Receiver, bounded};
use std::sync::Arc;

/// The bundled sample photo (OpenCV's fruits.jpg).
pub static SAMPLE_JPG: &[u8] = include_bytes!("../../../assets/sample-fruits.jpg");

/// Presets: name, what it shows, prior and coefficients (pixel units).
pub const PRESETS: [(&str, &str, Prior, PriorCoeffs); 3] = [
    (
        "local smoothing",
        "heat diffusion: a Gaussian-like blur, only neighbours mix",
        Prior::Heat,
        PriorCoeffs {
            kappa: 8.0,
            c: 10.0,
            eps: 0.005,
            tau: 1.0,
            gamma: 0.0,
        },
    ),
    (
        "long-range ringing",
        "wave propagation: every edge echoes at a distance c·τ",
        Prior::Wave,
        PriorCoeffs {
            kappa: 8.0,
            c: 12.0,
            eps: 0.005,
            tau: 1.0,
            gamma: 0.02,
        },
    ),
    (
        "global equilibrium",
        "screened Poisson: a heavy-tailed smoothing over the whole image",
        Prior::Poisson,
        PriorCoeffs {
            kappa: 8.0,
            c: 10.0,
            eps: 0.002,
            tau: 1.0,
            gamma: 0.0,
        },
    ),
];

/// Runtime state (never persisted).
#[derive(Default)]
pub struct Playground {
    /// The image shown on the left.
    pub original: Option<Arc<image::DynamicImage>>,
    /// The last result.
    pub result: Option<image::DynamicImage>,
    job: Option<Receiver<Result<image::DynamicImage, String>>>,
    done_for: Option<(Prior, PriorCoeffs)>,
    /// The last error.
    pub error: Option<String>,
}

impl Playground {
    /// Loads the bundled sample.
    pub fn load_sample(&mut self) {
        match image::load_from_memory(SAMPLE_JPG) {
            Ok(img) => self.set_image(img),
            Err(e) => self.error = Some(format!("bundled sample: {e}")),
        }
    }

    /// Shows a new image (the result is recomputed).
    pub fn set_image(&mut self, img: image::DynamicImage) {
        self.original = Some(Arc::new(img));
        self.result = None;
        self.done_for = None;
    }

    /// Starts a job when the settings changed and none is running; collects a finished one.
    pub fn update(&mut self, s: &PlaygroundSettings, ctx: &egui::Context) {
        if let Some(rx) = &self.job {
            if let Ok(r) = rx.try_recv() {
                self.job = None;
                match r {
                    Ok(img) => self.result = Some(img),
                    Err(e) => self.error = Some(e),
                }
            } else {
                return;
            }
        }
        let want = (s.prior, s.coeffs);
        if self.done_for == Some(want) {
            return;
        }
        let Some(img) = self.original.clone() else { return };
        let (tx, rx) = bounded(1);
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("moppa-playground".into())
            .spawn(move || {
                let r = apply_prior(&img, want.0, &want.1).map_err(|e| e.to_string());
                tx.send(r).ok();
                ctx.request_repaint();
            });
        match spawned {
            Ok(_) => {
                self.job = Some(rx);
                self.done_for = Some(want);
            }
            Err(e) => self.error = Some(format!("cannot start the playground thread: {e}")),
        }
    }

    /// Whether a job is running.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }
}

fn rgba_of(img: &image::DynamicImage) -> (Vec<u8>, (usize, usize)) {
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    (rgba.into_raw(), (w as usize, h as usize))
}

impl Playground {
    /// Draws the playground.
    pub fn ui(&mut self, ui: &mut egui::Ui, s: &mut PlaygroundSettings, textures: &mut Textures) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.original.is_none() && self.error.is_none() {
            self.load_sample();
        }
        ui.horizontal(|ui| {
            if ui.button("Open image…").clicked() {
                actions.push(Action::PickImage);
            }
            if ui.button("Bundled sample").clicked() {
                self.load_sample();
                s.image = None;
            }
            ui.separator();
            for (name, what, prior, coeffs) in PRESETS {
                if ui.button(name).on_hover_text(what).clicked() {
                    s.prior = prior;
                    s.coeffs = coeffs;
                }
            }
        });
        ui.horizontal(|ui| {
            for p in Prior::ALL {
                ui.selectable_value(&mut s.prior, p, p.name())
                    .on_hover_text(p.equation());
            }
            ui.separator();
            let c = &mut s.coeffs;
            match s.prior {
                Prior::Heat => {
                    ui.add(
                        egui::Slider::new(&mut c.kappa, 0.01..=500.0)
                            .logarithmic(true)
                            .text("κ"),
                    )
                    .on_hover_text("exp(−κ·τ·Λ)");
                }
                Prior::Wave => {
                    ui.add(egui::Slider::new(&mut c.c, 0.1..=200.0).logarithmic(true).text("c"))
                        .on_hover_text("cos(c·τ·√Λ)");
                    ui.add(egui::Slider::new(&mut c.gamma, 0.0..=1.0).text("γ"))
                        .on_hover_text("exp(−γ·τ·√Λ)");
                }
                Prior::Poisson => {
                    ui.add(egui::Slider::new(&mut c.eps, 1e-6..=1.0).logarithmic(true).text("ε"))
                        .on_hover_text("ε/(Λ + ε)");
                }
            }
            if s.prior != Prior::Poisson {
                ui.add(egui::Slider::new(&mut c.tau, 0.05..=10.0).logarithmic(true).text("τ"));
            }
            if self.busy() {
                ui.spinner();
            }
        });
        ui.label(
            egui::RichText::new("At image scale Λ is in pixel units: the same filters as on the token grid, but visible effects need larger κ and c and smaller ε.")
                .small(),
        );
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::from_rgb(230, 80, 80), e);
        }
        self.update(s, ui.ctx());
        let half = (ui.available_width() / 2.0 - 8.0).max(64.0);
        ui.horizontal(|ui| {
            for (name, img) in [("before", self.original.as_deref()), ("after", self.result.as_ref())] {
                ui.vertical(|ui| {
                    ui.label(name);
                    if let Some(img) = img {
                        let (rgba, (w, h)) = rgba_of(img);
                        let id = textures.get(ui.ctx(), &format!("playground-{name}"), rgba, (w, h));
                        let scale = (half / w as f32).min(520.0 / h as f32);
                        ui.image((id, egui::vec2(w as f32 * scale, h as f32 * scale)));
                    } else {
                        ui.spinner();
                    }
                });
            }
        });
        actions
    }
}
