//! Curves: training loss and route loss (EMA over the faint raw curve, optional log axis),
//! train/validation accuracy, learning rate; x as step or wall time; markers where a command
//! took effect; every other run shown (this session's, opened folders, connected servers)
//! overlaid in a colour of its own, named in the legend.

use super::Action;
use crate::app::history::RunHistory;
use crate::app::state::CurveSettings;
use egui::Color32;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points, Text, VLine};

/// Plot ids, for PNG export.
pub const PLOTS: [&str; 3] = ["loss", "accuracy", "learning-rate"];

fn faint(c: Color32) -> Color32 {
    c.gamma_multiply(0.35)
}

fn tr(points: Vec<[f64; 2]>, log: bool) -> Vec<[f64; 2]> {
    if log {
        points
            .into_iter()
            .filter(|p| p[1] > 0.0)
            .map(|p| [p[0], p[1].log10()])
            .collect()
    } else {
        points
    }
}

/// One colour per run when several are overlaid (a run alone keeps the loss / accuracy colours).
const RUN_COLORS: [Color32; 8] = [
    Color32::from_rgb(240, 160, 60),
    Color32::from_rgb(80, 200, 190),
    Color32::from_rgb(230, 110, 170),
    Color32::from_rgb(220, 210, 90),
    Color32::from_rgb(160, 130, 240),
    Color32::from_rgb(140, 200, 90),
    Color32::from_rgb(230, 90, 90),
    Color32::from_rgb(150, 150, 150),
];

/// The overlay colour of run `i`.
#[must_use]
pub fn run_color(i: usize) -> Color32 {
    RUN_COLORS[i % RUN_COLORS.len()]
}

impl CurveSettings {
    /// Draws the view for the `selected` run with the others overlaid. Returns actions and the
    /// screen rectangles of the plots (for export).
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        runs: &[&RunHistory],
        selected: usize,
    ) -> (Vec<Action>, Vec<(&'static str, egui::Rect)>) {
        let mut actions = Vec::new();
        let mut rects = Vec::new();
        ui.horizontal(|ui| {
            ui.add(egui::Slider::new(&mut self.ema, 0.0..=0.99).text("EMA smoothing"));
            ui.checkbox(&mut self.log_y, "log loss");
            ui.selectable_value(&mut self.by_time, false, "x: step");
            ui.selectable_value(&mut self.by_time, true, "x: time (s)");
            ui.checkbox(&mut self.overlay, "other runs");
            ui.separator();
            if ui.button("Export CSV…").clicked() {
                actions.push(Action::ExportCsv);
            }
            egui::ComboBox::from_label("plot PNG")
                .selected_text("save…")
                .show_ui(ui, |ui| {
                    for id in PLOTS {
                        if ui.selectable_label(false, id).clicked() {
                            actions.push(Action::ExportPlot(id));
                        }
                    }
                });
        });
        let Some(current) = runs.get(selected).copied() else {
            ui.label("No run yet.");
            return (actions, rects);
        };
        let others: Vec<(usize, &RunHistory)> = if self.overlay {
            runs.iter()
                .copied()
                .enumerate()
                .filter(|(i, _)| *i != selected)
                .collect()
        } else {
            Vec::new()
        };
        let x = self.by_time;
        let xlabel = if x { "time (s)" } else { "step" };
        let (log, ema) = (self.log_y, self.ema);
        let h = ((ui.available_height() - 120.0) / 2.0).clamp(140.0, 320.0);
        // Alone, a run's curves keep their own colours; overlaid, each run has one colour and its
        // name in the legend.
        let overlaid = !others.is_empty();
        let named = |what: &str| {
            if overlaid {
                format!("{} {what}", current.label)
            } else {
                what.to_owned()
            }
        };
        let loss_color = if overlaid {
            run_color(selected)
        } else {
            Color32::from_rgb(80, 160, 255)
        };
        let val_color = if overlaid {
            run_color(selected)
        } else {
            Color32::from_rgb(255, 140, 60)
        };
        let route_color = Color32::from_rgb(200, 120, 255);
        let resp = Plot::new("loss")
            .height(h)
            .legend(Legend::default())
            .x_axis_label(xlabel)
            .y_axis_label(if log { "loss (log10)" } else { "loss" })
            .y_axis_formatter(move |m, _| {
                if log {
                    format!("{:.2e}", 10f64.powf(m.value))
                } else {
                    format!("{:.3}", m.value)
                }
            })
            .link_axis(egui::Id::unique("curves-x"), [true, false])
            .show(ui, |pu| {
                for (i, r) in &others {
                    pu.line(
                        Line::new(
                            format!("{} loss", r.label),
                            PlotPoints::from(tr(r.loss.ema(x, ema), log)),
                        )
                        .color(run_color(*i))
                        .width(1.2),
                    );
                }
                pu.line(
                    Line::new(named("loss (raw)"), PlotPoints::from(tr(current.loss.xy(x), log)))
                        .color(faint(loss_color)),
                );
                pu.line(
                    Line::new(named("loss"), PlotPoints::from(tr(current.loss.ema(x, ema), log)))
                        .color(loss_color)
                        .width(2.0),
                );
                if current.route_loss.points.iter().any(|p| p[2] > 0.0) {
                    pu.line(
                        Line::new(
                            named("route loss"),
                            PlotPoints::from(tr(current.route_loss.ema(x, ema), log)),
                        )
                        .color(route_color)
                        .width(1.5),
                    );
                }
                let top = current.loss.points.iter().map(|p| p[2]).fold(0.0f64, f64::max);
                for a in &current.applied {
                    let ax = if x { a.time_s } else { a.step as f64 };
                    pu.vline(VLine::new("applied", ax).color(Color32::from_rgb(240, 180, 40)));
                    let y = if log { top.max(1e-9).log10() } else { top };
                    pu.text(
                        Text::new(
                            "applied",
                            egui_plot::PlotPoint::new(ax, y),
                            format!("{} {} {:.3} -> {:.3}", a.command, a.target, a.old, a.new),
                        )
                        .color(Color32::from_rgb(240, 180, 40)),
                    );
                }
            });
        rects.push(("loss", resp.response.rect));
        ui.columns(2, |cols| {
            let resp = Plot::new("accuracy")
                .height(h)
                .legend(Legend::default())
                .include_y(0.0)
                .include_y(1.0)
                .x_axis_label(xlabel)
                .link_axis(egui::Id::unique("curves-x"), [true, false])
                .show(&mut cols[0], |pu| {
                    for (i, r) in &others {
                        let v: Vec<[f64; 2]> = r.val.iter().map(|e| [if x { e[1] } else { e[0] }, e[2]]).collect();
                        pu.line(Line::new(format!("{} val", r.label), PlotPoints::from(v)).color(run_color(*i)));
                    }
                    pu.line(
                        Line::new(named("train acc (raw)"), PlotPoints::from(current.train_acc.xy(x)))
                            .color(faint(Color32::from_rgb(120, 200, 120))),
                    );
                    pu.line(
                        Line::new(named("train acc"), PlotPoints::from(current.train_acc.ema(x, ema)))
                            .color(Color32::from_rgb(120, 200, 120))
                            .width(2.0),
                    );
                    let v = eval_points(&current.val, x);
                    pu.line(
                        Line::new(named("val acc"), PlotPoints::from(v.clone()))
                            .color(val_color)
                            .width(2.0),
                    );
                    pu.points(Points::new(named("val acc"), v).radius(3.0).color(val_color));
                    let t = eval_points(&current.test, x);
                    pu.points(
                        Points::new(named("test acc"), t)
                            .radius(4.0)
                            .color(Color32::from_rgb(255, 80, 80)),
                    );
                });
            rects.push(("accuracy", resp.response.rect));
            let resp = Plot::new("learning-rate")
                .height(h)
                .legend(Legend::default())
                .include_y(0.0)
                .x_axis_label(xlabel)
                .y_axis_formatter(|m, _| format!("{:.1e}", m.value))
                .link_axis(egui::Id::unique("curves-x"), [true, false])
                .show(&mut cols[1], |pu| {
                    pu.line(
                        Line::new("lr", PlotPoints::from(current.lr.xy(x)))
                            .color(Color32::from_rgb(180, 180, 180))
                            .width(2.0),
                    );
                });
            rects.push(("learning-rate", resp.response.rect));
        });
        (actions, rects)
    }
}

/// Evaluation rows `[step, time_s, acc, …]` as plot points against step, or seconds when `x`.
fn eval_points(evals: &[[f64; 4]], x: bool) -> Vec<[f64; 2]> {
    evals.iter().map(|e| [if x { e[1] } else { e[0] }, e[2]]).collect()
}
