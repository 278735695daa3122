//! The filter view: each prior's spectral gain on the token grid (and their router-weighted mix)
//! as heatmaps, radial profiles against √Λ, and spatial impulse responses, for one block and the
//! channel mean or one channel; a step slider scrubs back through the run's snapshots.

use super::Action;
use crate::app::state::FilterSettings;
use crate::app::widgets::colormap::prior_color;
use crate::app::widgets::heatmap::{Scale, Textures, colorbar, heatmap};
use crate::train::protocol::{Command, Snapshot};
use crate::train::snapfile::{GainView, gain_view};
use egui_plot::{Corner, Legend, Line, Plot, PlotPoints};

/// A run's radial profiles and impulse responses for the snapshot, block and channel shown,
/// computed once ([`gain_view`]) and drawn from here every frame after.
#[derive(Clone, Debug, Default)]
pub struct FilterCache {
    /// Step, block and channel (None: the mean) of `view`.
    key: Option<(u64, usize, Option<usize>)>,
    view: GainView,
    computed: usize,
}

impl FilterCache {
    /// The view for `key`, computed by `compute` only when it is not the one held.
    fn get(&mut self, key: (u64, usize, Option<usize>), compute: impl FnOnce() -> GainView) -> &GainView {
        if self.key != Some(key) {
            self.view = compute();
            self.key = Some(key);
            self.computed += 1;
        }
        &self.view
    }

    /// Forgets the view (the snapshot of its step was replaced).
    pub fn clear(&mut self) {
        self.key = None;
    }

    /// How many times a view was computed (tests: not once per frame).
    #[must_use]
    pub fn computed(&self) -> usize {
        self.computed
    }
}

impl FilterSettings {
    /// Draws the view. `snapshots` are the run's (oldest first); `scrub` the chosen index (None: live).
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        (snapshots, cache): (&[Snapshot], &mut FilterCache),
        scrub: &mut Option<usize>,
        rank: usize,
        textures: &mut Textures,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if snapshots.is_empty() {
            ui.label(
                "The spectral filters appear here once a MoPPA run is ready (press Start, or wait for the model to load).",
            );
            return actions;
        }
        let last = snapshots.len() - 1;
        let idx = scrub.unwrap_or(last).min(last);
        let snap = &snapshots[idx];
        ui.horizontal(|ui| {
            let mut live = scrub.is_none();
            if ui
                .checkbox(&mut live, "live")
                .on_hover_text("Follow the newest snapshot")
                .changed()
            {
                *scrub = if live { None } else { Some(idx) };
            }
            let mut i = idx;
            let r = ui.add_enabled(
                last > 0,
                egui::Slider::new(&mut i, 0..=last).show_value(false).text("snapshot"),
            );
            if r.changed() {
                *scrub = if i == last { None } else { Some(i) };
            }
            ui.label(format!("step {}", snap.step));
            ui.separator();
            let blocks: Vec<usize> = snap.blocks.iter().map(|b| b.block).collect();
            egui::ComboBox::from_label("block")
                .selected_text(format!("block {}", self.block))
                .show_ui(ui, |ui| {
                    for b in &blocks {
                        ui.selectable_value(&mut self.block, *b, format!("block {b}"));
                    }
                });
            let before = self.channel;
            egui::ComboBox::from_label("channel")
                .selected_text(
                    self.channel
                        .map_or_else(|| "mean of channels".to_owned(), |c| format!("channel {c}")),
                )
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.channel, None, "mean of channels");
                    for c in 0..rank {
                        ui.selectable_value(&mut self.channel, Some(c), format!("channel {c}"));
                    }
                });
            if self.channel != before {
                actions.push(Action::Send(Command::SetChannel { channel: self.channel }));
            }
            ui.label(format!("τ {:.3} · γ {:.3}", snap.tau, snap.gamma));
        });
        let Some(block) = snap
            .blocks
            .iter()
            .find(|b| b.block == self.block)
            .or_else(|| snap.blocks.first())
        else {
            ui.label("No MoPPA block in this snapshot.");
            return actions;
        };
        let (h, w) = snap.grid;
        let use_channel = self.channel.is_some() && block.filters_channel.len() == snap.priors.len();
        let gains: &[Vec<f32>] = if use_channel {
            &block.filters_channel
        } else {
            &block.filters_mean
        };
        let limit = gains
            .iter()
            .flatten()
            .chain(block.mix.iter())
            .fold(1.0f32, |m, v| m.max(v.abs()));
        let scale = Scale::Diverging(limit);
        let side = ((ui.available_width() - 80.0) / (snap.priors.len() + 1) as f32).clamp(80.0, 220.0);
        ui.label(egui::RichText::new("Frequency response G(n, m): low frequencies top-left").strong());
        ui.horizontal(|ui| {
            for (p, g) in snap.priors.iter().zip(gains) {
                ui.vertical(|ui| {
                    ui.label(egui::RichText::new(p.name()).color(prior_color(*p)))
                        .on_hover_text(p.equation());
                    heatmap(ui, textures, &format!("gain-{p}"), g, (h, w), scale, side);
                });
            }
            ui.vertical(|ui| {
                ui.label("router-weighted mix")
                    .on_hover_text("Σ_p α_p · G_p with this block's mean router weights α_p");
                heatmap(ui, textures, "gain-mix", &block.mix, (h, w), scale, side);
            });
            colorbar(ui, scale, side);
        });
        let key = (snap.step, block.block, self.channel.filter(|_| use_channel));
        let view = cache.get(key, || gain_view((h, w), gains, &block.mix));
        ui.columns(2, |cols| {
            cols[0].label(egui::RichText::new("Radial profile: gain against √Λ").strong());
            Plot::new("radial")
                .height(210.0)
                // Lower left: the profiles start at 1 and fall, so that corner stays free.
                .legend(Legend::default().position(Corner::LeftBottom))
                .x_axis_label("√Λ")
                .y_axis_label("G")
                .show(&mut cols[0], |pu| {
                    for (p, pts) in snap.priors.iter().zip(&view.radial) {
                        pu.line(
                            Line::new(p.name(), PlotPoints::from(pts.clone()))
                                .color(prior_color(*p))
                                .width(2.0),
                        );
                    }
                    if let Some(pts) = view.radial.get(snap.priors.len()) {
                        pu.line(
                            Line::new("mix", PlotPoints::from(pts.clone()))
                                .color(egui::Color32::GRAY)
                                .style(egui_plot::LineStyle::dashed_dense()),
                        );
                    }
                });
            let ui = &mut cols[1];
            ui.label(egui::RichText::new("Impulse response on the token grid").strong())
                .on_hover_text("IDCT2(G ⊙ DCT2(δ)) for a unit impulse at the centre cell");
            let lim = view.impulse_limit;
            let side = ((ui.available_width() - 60.0) / snap.priors.len().max(1) as f32).clamp(60.0, 160.0);
            ui.horizontal(|ui| {
                for (p, imp) in snap.priors.iter().zip(&view.impulses) {
                    ui.vertical(|ui| {
                        ui.label(egui::RichText::new(p.name()).color(prior_color(*p)));
                        heatmap(
                            ui,
                            textures,
                            &format!("impulse-{p}"),
                            imp,
                            (h, w),
                            Scale::Diverging(lim),
                            side,
                        );
                    });
                }
                colorbar(ui, Scale::Diverging(lim), side);
            });
        });
        ui.separator();
        let summary = |name: &str, v: &[f32]| {
            if v.is_empty() {
                return String::new();
            }
            let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            format!("{name}: mean {mean:.4} [{lo:.4} … {hi:.4}]   ")
        };
        let line: String = block.coeffs.iter().map(|(c, v)| summary(c.symbol(), v)).collect();
        ui.label(line);
        actions
    }
}
