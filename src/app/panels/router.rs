//! The router view: blocks × priors mean weights, each prior's share over steps, routing entropy,
//! the per-token map over a probe image, and the alerts ([`super::alerts`]) for dead priors and
//! collapse.

use super::Action;
use super::alerts::alerts;
use crate::app::history::RunHistory;
use crate::app::state::RouterSettings;
use crate::app::widgets::colormap::{prior_color, prior_rgb};
use crate::app::widgets::heatmap::{Scale, Textures, colorbar, heatmap};
use crate::train::protocol::{BlockSnapshot, Command, ProbeOrigin, Snapshot};
use egui_plot::{Line, Plot, PlotPoints};

/// What the probe controls may offer for the run shown.
#[derive(Clone)]
pub struct Probing<'a> {
    /// Validation images to choose from (0: none, e.g. a run watched from its folder).
    pub probes: usize,
    /// Whether the user's own image can be probed (a steerable run, or a folder with an adapter).
    pub can_probe: bool,
    /// Class names, index = label.
    pub classes: &'a [String],
    /// Other MoPPA runs shown, overlaid (dashed) on the share and entropy plots: name, colour,
    /// history.
    pub others: Vec<(&'a str, egui::Color32, &'a RunHistory)>,
}

impl RouterSettings {
    /// The alert thresholds and span, editable.
    fn threshold_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.label("collapse: a token share above");
            ui.add(
                egui::DragValue::new(&mut self.collapse_above)
                    .range(0.0..=1.0)
                    .speed(0.01),
            );
            ui.label("or per-token entropy below");
            ui.add(
                egui::DragValue::new(&mut self.collapse_entropy)
                    .range(0.0..=1.0)
                    .speed(0.01),
            );
        });
        ui.horizontal_wrapped(|ui| {
            ui.label("dead: a token share below");
            ui.add(egui::DragValue::new(&mut self.dead_share).range(0.0..=1.0).speed(0.005));
            ui.label("and mean α below");
            ui.add(egui::DragValue::new(&mut self.dead_below).range(0.0..=1.0).speed(0.005));
        });
        ui.horizontal(|ui| {
            ui.label("over every snapshot of the last");
            ui.add(
                egui::DragValue::new(&mut self.span)
                    .range(1..=1_000_000)
                    .suffix(" steps"),
            );
            ui.label("(at least 2 snapshots)");
        })
        .response
        .on_hover_text("INTERFACES.md defaults: share 0.9, entropy 0.2, dead share 0.02 and α 0.05, 100 steps");
    }

    /// Draws the view.
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        history: &RunHistory,
        snap: Option<&Snapshot>,
        probing: &Probing<'_>,
        textures: &mut Textures,
    ) -> Vec<Action> {
        let Probing {
            probes,
            can_probe,
            classes,
            ..
        } = probing;
        let (probes, can_probe, classes) = (*probes, *can_probe, *classes);
        let mut actions = Vec::new();
        let Some(snap) = snap else {
            ui.label("Router statistics appear here during a MoPPA run with two or more priors.");
            return actions;
        };
        let k = snap.priors.len();
        let routed: Vec<_> = snap.blocks.iter().filter(|b| b.router.is_some()).collect();
        if routed.is_empty() {
            ui.label(if k == 1 {
                "A single prior: there is no router (α ≡ 1)."
            } else {
                "Waiting for the first training step…"
            });
            return actions;
        }
        for a in alerts(&history.snapshots, self) {
            ui.colored_label(
                egui::Color32::from_rgb(230, 160, 40),
                format!("Warning: {}", a.message()),
            );
        }
        egui::CollapsingHeader::new("Alert thresholds")
            .id_salt("router-alert-thresholds")
            .show(ui, |ui| self.threshold_ui(ui));
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.label(egui::RichText::new("Mean routing weight α (blocks × priors)").strong());
                let values: Vec<f32> = routed
                    .iter()
                    .flat_map(|b| b.router.as_ref().map(|r| r.mean_alpha.clone()).unwrap_or_default())
                    .collect();
                ui.horizontal(|ui| {
                    for p in &snap.priors {
                        ui.label(
                            egui::RichText::new(format!("{:>8}", p.name()))
                                .color(prior_color(*p))
                                .monospace(),
                        );
                    }
                });
                let side = (60.0 * k as f32).min(240.0);
                if let Some((row, col)) = heatmap(
                    ui,
                    textures,
                    "router-mean",
                    &values,
                    (routed.len(), k),
                    Scale::Unit,
                    side,
                ) {
                    self.block = routed[row].block;
                    let _ = col;
                }
                egui::Grid::new("router-table").striped(true).show(ui, |ui| {
                    ui.label("block");
                    for p in &snap.priors {
                        ui.label(egui::RichText::new(p.name()).color(prior_color(*p)));
                    }
                    ui.label("entropy");
                    ui.end_row();
                    for b in &routed {
                        let Some(r) = &b.router else { continue };
                        ui.label(format!("{}", b.block));
                        for (a, s) in r.mean_alpha.iter().zip(&r.argmax_share) {
                            ui.label(format!("{a:.3} ({:.0}%)", 100.0 * s))
                                .on_hover_text("mean weight (share of tokens whose argmax is this prior)");
                        }
                        ui.label(format!("{:.3} ({:.2})", r.entropy, r.entropy_norm))
                            .on_hover_text("mean −Σ α ln α (divided by ln k)");
                        ui.end_row();
                    }
                });
            });
            colorbar(ui, Scale::Unit, 120.0);
            ui.vertical(|ui| {
                ui.label(egui::RichText::new(format!("Probe image: per-token argmax (block {})", self.block)).strong());
                ui.horizontal(|ui| {
                    let mut p = self.probe;
                    if ui
                        .add(
                            egui::DragValue::new(&mut p)
                                .range(0..=probes.saturating_sub(1))
                                .prefix("probe #"),
                        )
                        .changed()
                    {
                        self.probe = p;
                        actions.push(Action::Send(Command::SetProbe { index: p }));
                    }
                    if can_probe
                        && ui
                            .button("Your image…")
                            .on_hover_text("Probe with your own image (or drop one on the window)")
                            .clicked()
                    {
                        actions.push(Action::PickProbeImage);
                    }
                });
                let predicted = snap.probe_prediction.map_or_else(
                    || "-".to_owned(),
                    |p| {
                        classes
                            .get(p as usize)
                            .map_or_else(|| p.to_string(), |c| format!("{c} ({p})"))
                    },
                );
                match snap.probe.as_ref().map(|p| &p.origin) {
                    Some(ProbeOrigin::Val { index, label }) => {
                        let label = classes
                            .get(*label as usize)
                            .cloned()
                            .unwrap_or_else(|| label.to_string());
                        ui.label(format!("val #{index}, label {label}, predicted {predicted}"));
                    }
                    Some(ProbeOrigin::File { name }) => {
                        ui.horizontal(|ui| {
                            ui.label(format!("{name}: predicted {predicted}"));
                            if ui.small_button(format!("back to val #{}", self.probe)).clicked() {
                                actions.push(Action::Send(Command::SetProbe { index: self.probe }));
                            }
                        });
                    }
                    None => {}
                }
                ui.horizontal(|ui| {
                    if let Some(p) = &snap.probe {
                        let rgb = &p.image;
                        let rgba: Vec<u8> = rgb
                            .pixels
                            .chunks_exact(3)
                            .flat_map(|c| [c[0], c[1], c[2], 255])
                            .collect();
                        let id = textures.get(ui.ctx(), "probe", rgba, (rgb.size, rgb.size));
                        ui.image((id, egui::vec2(160.0, 160.0)));
                    }
                    if let Some(b) = snap.blocks.iter().find(|b| b.block == self.block) {
                        if let Some(id) = argmax_map(ui.ctx(), textures, snap, b, "probe-map") {
                            ui.vertical(|ui| {
                                ui.image((id, egui::vec2(160.0, 160.0)))
                                    .on_hover_text("colour = argmax prior, paler = less certain");
                                // The maps' colour key.
                                ui.horizontal(|ui| {
                                    for p in &snap.priors {
                                        let (rect, _) =
                                            ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
                                        ui.painter().rect_filled(rect, 2.0, prior_color(*p));
                                        ui.label(egui::RichText::new(p.name()).small());
                                    }
                                });
                                ui.label(egui::RichText::new("paler: less certain").small());
                            });
                        } else if !b.probe_alpha.is_empty() {
                            ui.label(format!("router weights for the image: {:?}", b.probe_alpha));
                        }
                    }
                });
                // Every block's map of the probe, side by side.
                let maps: Vec<_> = snap
                    .blocks
                    .iter()
                    .filter_map(|b| {
                        argmax_map(ui.ctx(), textures, snap, b, &format!("probe-map-{}", b.block))
                            .map(|id| (b.block, id))
                    })
                    .collect();
                if maps.len() > 1 {
                    ui.label(egui::RichText::new("every block").small());
                    ui.horizontal_wrapped(|ui| {
                        for (block, id) in maps {
                            ui.vertical(|ui| {
                                ui.label(egui::RichText::new(format!("block {block}")).small());
                                ui.image((id, egui::vec2(64.0, 64.0)));
                            });
                        }
                    });
                }
            });
        });
        ui.columns(2, |cols| {
            let by_block = history.shares.get(self.block);
            cols[0]
                .label(egui::RichText::new(format!("Share of each prior over steps (block {})", self.block)).strong());
            Plot::new("router-shares")
                .height(200.0)
                .include_y(0.0)
                .include_y(1.0)
                .x_axis_label("step")
                .show(&mut cols[0], |pu| {
                    if let Some(series) = by_block {
                        for (p, s) in snap.priors.iter().zip(series) {
                            pu.line(
                                Line::new(p.name(), PlotPoints::from(s.xy(false)))
                                    .color(prior_color(*p))
                                    .width(2.0),
                            );
                        }
                    }
                    // Other runs: the same block, each prior in its colour, dashed, named.
                    for (name, _, h) in &probing.others {
                        let Some(series) = h.shares.get(self.block) else {
                            continue;
                        };
                        let priors = h.info.as_ref().map_or(&[][..], |i| i.priors.as_slice());
                        for (p, s) in priors.iter().zip(series) {
                            pu.line(
                                Line::new(format!("{name} {}", p.name()), PlotPoints::from(s.xy(false)))
                                    .color(prior_color(*p))
                                    .style(egui_plot::LineStyle::dashed_dense())
                                    .width(1.3),
                            );
                        }
                    }
                });
            cols[1].label(egui::RichText::new("Routing entropy / ln k per block").strong());
            // Keys under the plots: a legend would cover the lines.
            cols[0].horizontal_wrapped(|ui| {
                for p in &snap.priors {
                    key(ui, prior_color(*p), p.name());
                }
            });
            cols[1].horizontal_wrapped(|ui| {
                for b in 0..history.entropy.len() {
                    key(ui, block_color(b), &format!("block {b}"));
                }
            });
            if !probing.others.is_empty() {
                cols[0].label(
                    egui::RichText::new(format!(
                        "dashed: {} (the other runs shown; hide them in the Curves or Runs view)",
                        probing.others.iter().map(|o| o.0).collect::<Vec<_>>().join(", ")
                    ))
                    .small(),
                );
            }
            Plot::new("router-entropy")
                .height(200.0)
                .include_y(0.0)
                .include_y(1.0)
                .x_axis_label("step")
                .show(&mut cols[1], |pu| {
                    for (b, s) in history.entropy.iter().enumerate() {
                        if !s.points.is_empty() {
                            pu.line(
                                Line::new(format!("block {b}"), PlotPoints::from(s.xy(false)))
                                    .color(block_color(b))
                                    .width(1.5),
                            );
                        }
                    }
                    // Other runs: the chosen block's entropy, in the run's colour, dashed.
                    for (name, color, h) in &probing.others {
                        if let Some(s) = h.entropy.get(self.block).filter(|s| !s.points.is_empty()) {
                            pu.line(
                                Line::new(format!("{name} block {}", self.block), PlotPoints::from(s.xy(false)))
                                    .color(*color)
                                    .style(egui_plot::LineStyle::dashed_dense())
                                    .width(1.8),
                            );
                        }
                    }
                });
        });
        actions
    }
}

/// The colour of block `b`'s entropy line.
fn block_color(b: usize) -> egui::Color32 {
    crate::app::panels::curves::run_color(b)
}

/// A colour key: a swatch and its name.
fn key(ui: &mut egui::Ui, color: egui::Color32, name: &str) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
    ui.painter().rect_filled(rect, 2.0, color);
    ui.label(egui::RichText::new(name).small());
}

/// The per-token argmax prior map of the probe in block `b` (colour = prior, paler = less
/// certain) as a texture; `None` without per-token weights.
fn argmax_map(
    ctx: &egui::Context,
    textures: &mut Textures,
    snap: &Snapshot,
    b: &BlockSnapshot,
    key: &str,
) -> Option<egui::TextureId> {
    let k = snap.priors.len();
    let (h, w) = snap.grid;
    if k < 2 || b.probe_alpha.len() != h * w * k {
        return None;
    }
    let rgba: Vec<u8> = b
        .probe_alpha
        .chunks_exact(k)
        .flat_map(|a| {
            let (best, &top) = a
                .iter()
                .enumerate()
                .fold((0, &0.0f32), |m, (i, v)| if v > m.1 { (i, v) } else { m });
            let [r, g, bl] = prior_rgb(snap.priors[best]);
            let t = ((top - 1.0 / k as f32) / (1.0 - 1.0 / k as f32)).clamp(0.15, 1.0);
            let mix = |c: u8| (f32::from(c) * t + 255.0 * (1.0 - t)) as u8;
            [mix(r), mix(g), mix(bl), 255]
        })
        .collect();
    Some(textures.get(ctx, key, rgba, (w, h)))
}
