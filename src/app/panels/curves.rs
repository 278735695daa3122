//! Curves: training loss and route loss (EMA over the faint raw curve, optional log axis),
//! train/validation accuracy, learning rate; x as step or wall time; markers where a command
//! took effect; every other run shown (this session's, opened folders, connected servers)
//! overlaid in a colour of its own, named in a side list (never a legend over the data) where
//! runs are shown, hidden and pinned as a baseline, and seeds of one setting grouped into a
//! mean ± std band.

use super::Action;
use crate::app::history::RunHistory;
use crate::app::state::CurveSettings;
use egui::Color32;
use egui_plot::{Corner, FilledArea, Legend, Line, LineStyle, Plot, PlotPoints, Points, Text, VLine};

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

/// One run as the curves view sees it.
pub struct CurveRun<'a> {
    /// Its history.
    pub history: &'a RunHistory,
    /// Whether it is drawn.
    pub shown: bool,
    /// What makes its setting (`RunHistory::setting`; equal for seeds of one setting).
    pub setting: Option<&'a str>,
}

/// What the curves view drew last (for tests and the side list).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Drawn {
    /// Named curves drawn (one per run or group and plot).
    pub lines: Vec<String>,
    /// Mean ± std bands drawn (one per group of seeds and plot).
    pub bands: Vec<String>,
}

/// Tick labels with as many decimals as the grid step needs (`0.5`, `4`, not `4.000`).
#[must_use]
pub fn tick(value: f64, step: f64) -> String {
    let decimals = if step > 0.0 && step.is_finite() {
        (-step.log10().floor()).clamp(0.0, 8.0) as usize
    } else {
        3
    };
    let s = format!("{value:.decimals$}");
    if s == "-0" { "0".into() } else { s }
}

/// A run or a group of seeds, as drawn.
struct Drawable<'a> {
    name: String,
    color: Color32,
    members: Vec<&'a RunHistory>,
    selected: bool,
    baseline: bool,
}

impl Drawable<'_> {
    /// The name and colour of its curve `what`: alone, the curve's own (`loss`, in its own
    /// colour); overlaid, the run's or group's name and colour.
    fn named(&self, what: &str, alone: bool, own: Color32) -> (String, Color32) {
        if alone {
            (what.to_owned(), own)
        } else {
            (format!("{} {what}", self.name), self.color)
        }
    }
}

impl CurveSettings {
    /// Draws the view: the side list of runs (colour, show/hide, pin as baseline; seeds of one
    /// setting as one group) and the plots of the runs shown. Returns actions, the screen
    /// rectangles of the plots (for export) and what was drawn.
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        runs: &[CurveRun<'_>],
        selected: usize,
        baseline: Option<usize>,
    ) -> (Vec<Action>, Vec<(&'static str, egui::Rect)>, Drawn) {
        let mut actions = Vec::new();
        let mut rects = Vec::new();
        let mut drawn = Drawn::default();
        ui.horizontal_wrapped(|ui| {
            ui.add(egui::Slider::new(&mut self.ema, 0.0..=0.99).text("EMA smoothing"));
            ui.checkbox(&mut self.log_y, "log loss");
            ui.selectable_value(&mut self.by_time, false, "x: step");
            ui.selectable_value(&mut self.by_time, true, "x: time (s)");
            ui.checkbox(&mut self.overlay, "other runs");
            ui.checkbox(&mut self.group_seeds, "group seeds")
                .on_hover_text("Runs that differ only in their seed: one mean line with a ± std band");
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
        if runs.get(selected).is_none() {
            ui.label("No run yet.");
            return (actions, rects, drawn);
        }
        let groups: Vec<Vec<usize>> = if self.group_seeds {
            let settings: Vec<Option<&str>> = runs.iter().map(|r| r.setting).collect();
            crate::app::groups::groups(&settings)
        } else {
            (0..runs.len()).map(|i| vec![i]).collect()
        };
        let several = runs.len() > 1;
        if several {
            ui.horizontal_top(|ui| {
                ui.vertical(|ui| {
                    ui.set_width(220.0);
                    actions.extend(side_list(ui, runs, &groups, selected, baseline));
                });
                ui.separator();
                ui.vertical(|ui| {
                    let items = self.drawables(runs, &groups, selected, baseline);
                    self.plots(ui, &items, runs[selected].history, &mut rects, &mut drawn);
                });
            });
        } else {
            let items = self.drawables(runs, &groups, selected, baseline);
            self.plots(ui, &items, runs[selected].history, &mut rects, &mut drawn);
        }
        (actions, rects, drawn)
    }

    /// The runs and groups to draw: every shown one (only the selected run and the baseline
    /// without "other runs").
    fn drawables<'a>(
        &self,
        runs: &[CurveRun<'a>],
        groups: &[Vec<usize>],
        selected: usize,
        baseline: Option<usize>,
    ) -> Vec<Drawable<'a>> {
        let mut out = Vec::new();
        for g in groups {
            let members: Vec<usize> = g
                .iter()
                .copied()
                .filter(|&i| runs[i].shown && (self.overlay || i == selected || Some(i) == baseline))
                .collect();
            let Some(&first) = members.first() else { continue };
            let name = if members.len() > 1 {
                format!("{} ×{} seeds", runs[first].history.label, members.len())
            } else {
                runs[first].history.label.clone()
            };
            out.push(Drawable {
                name,
                color: run_color(first),
                members: members.iter().map(|&i| runs[i].history).collect(),
                selected: members.contains(&selected),
                baseline: baseline.is_some_and(|b| members.contains(&b)),
            });
        }
        out
    }

    fn plots(
        &self,
        ui: &mut egui::Ui,
        items: &[Drawable<'_>],
        current: &RunHistory,
        rects: &mut Vec<(&'static str, egui::Rect)>,
        drawn: &mut Drawn,
    ) {
        let x = self.by_time;
        let xlabel = if x { "time (s)" } else { "step" };
        let (log, ema) = (self.log_y, self.ema);
        let h = ((ui.available_height() - 120.0) / 2.0).clamp(140.0, 320.0);
        // Alone, a run's curves keep their own colours and a legend in the corner its curves
        // leave free; overlaid, each run (or group) has one colour, named in the side list.
        let alone = items.len() == 1 && items[0].members.len() == 1;
        let legend = |corner| alone.then(|| Legend::default().position(corner));
        let style = |d: &Drawable<'_>| {
            if d.baseline && !d.selected {
                LineStyle::dashed_loose()
            } else {
                LineStyle::Solid
            }
        };
        let width = |d: &Drawable<'_>| if d.selected { 2.2 } else { 1.4 };
        let xmax = items
            .iter()
            .flat_map(|d| d.members.iter())
            .map(|r| if x { r.time_s } else { r.step as f64 })
            .fold(10.0, f64::max);
        let route_color = Color32::from_rgb(200, 120, 255);
        let plot = |id: &'static str, ylabel: &'static str| {
            let mut p = Plot::new(id)
                .height(h)
                .x_axis_label(xlabel)
                .y_axis_label(ylabel)
                .include_x(0.0)
                .include_x(xmax)
                .x_axis_formatter(|m, _| tick(m.value, m.step_size))
                .link_axis(egui::Id::unique("curves-x"), [true, false]);
            if let Some(l) = legend(if id == "loss" {
                Corner::RightTop
            } else {
                Corner::RightBottom
            }) {
                p = p.legend(l);
            }
            p
        };
        let resp = plot("loss", if log { "loss (log10)" } else { "loss" })
            .y_axis_formatter(move |m, _| {
                if log {
                    format!("{:.1e}", 10f64.powf(m.value))
                } else {
                    tick(m.value, m.step_size)
                }
            })
            .show(ui, |pu| {
                for d in items {
                    let series: Vec<Vec<[f64; 2]>> = d.members.iter().map(|r| r.loss.ema(x, ema)).collect();
                    let (name, color) = d.named("loss", alone, Color32::from_rgb(80, 160, 255));
                    if d.members.len() > 1 {
                        draw_band(pu, &name, &series, color, log, drawn);
                        continue;
                    }
                    if d.selected {
                        pu.line(
                            Line::new(
                                format!("{name} (raw)"),
                                PlotPoints::from(tr(d.members[0].loss.xy(x), log)),
                            )
                            .color(faint(color)),
                        );
                    }
                    let pts = tr(series.into_iter().next().unwrap_or_default(), log);
                    pu.line(
                        Line::new(name.clone(), PlotPoints::from(pts))
                            .color(color)
                            .width(width(d))
                            .style(style(d)),
                    );
                    drawn.lines.push(name);
                }
                if current.route_loss.points.iter().any(|p| p[2] > 0.0) {
                    pu.line(
                        Line::new("route loss", PlotPoints::from(tr(current.route_loss.ema(x, ema), log)))
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
            let resp = plot("accuracy", "accuracy")
                .include_y(0.0)
                .include_y(1.0)
                .y_axis_formatter(|m, _| tick(m.value, m.step_size))
                .show(&mut cols[0], |pu| {
                    for d in items {
                        let val: Vec<Vec<[f64; 2]>> = d.members.iter().map(|r| eval_points(&r.val, x)).collect();
                        let (name, color) = d.named("val acc", alone, Color32::from_rgb(255, 140, 60));
                        if d.members.len() > 1 {
                            draw_band(pu, &name, &val, color, false, drawn);
                            continue;
                        }
                        if d.selected {
                            let r = d.members[0];
                            let (train, tc) = d.named("train acc", alone, Color32::from_rgb(120, 200, 120));
                            let tc = if alone { tc } else { faint(tc) };
                            pu.line(
                                Line::new(format!("{train} (raw)"), PlotPoints::from(r.train_acc.xy(x)))
                                    .color(faint(tc)),
                            );
                            pu.line(
                                Line::new(train, PlotPoints::from(r.train_acc.ema(x, ema)))
                                    .color(tc)
                                    .width(1.5),
                            );
                            pu.points(
                                Points::new(d.named("test acc", alone, color).0, eval_points(&r.test, x))
                                    .radius(4.0)
                                    .color(Color32::from_rgb(255, 80, 80)),
                            );
                        }
                        let v = val.into_iter().next().unwrap_or_default();
                        pu.line(
                            Line::new(name.clone(), PlotPoints::from(v.clone()))
                                .color(color)
                                .width(width(d))
                                .style(style(d)),
                        );
                        pu.points(Points::new(name.clone(), v).radius(2.5).color(color));
                        drawn.lines.push(name);
                    }
                });
            rects.push(("accuracy", resp.response.rect));
            // The learning rate on a log axis: readable from 1e-5 to a diverged 50.
            let lr: Vec<[f64; 2]> = current
                .lr
                .xy(x)
                .into_iter()
                .filter(|p| p[1] > 0.0)
                .map(|p| [p[0], p[1].log10()])
                .collect();
            let mut p = plot("learning-rate", "learning rate (log)")
                .y_axis_formatter(|m, _| format!("{:.0e}", 10f64.powf(m.value)));
            // At least one decade around the values (a constant lr would otherwise span 1e±100).
            let (lo, hi) = lr.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p[1]), hi.max(p[1]))
            });
            if lr.is_empty() {
                p = p.include_y(-4.0).include_y(-1.0);
            } else {
                p = p.include_y(lo.floor() - 0.25).include_y(hi.ceil() + 0.25);
            }
            let resp = p.show(&mut cols[1], |pu| {
                pu.line(
                    Line::new("lr", PlotPoints::from(lr))
                        .color(Color32::from_rgb(180, 180, 180))
                        .width(2.0),
                );
            });
            rects.push(("learning-rate", resp.response.rect));
        });
    }
}

/// A group's mean line and its ± one standard deviation band.
fn draw_band(
    pu: &mut egui_plot::PlotUi<'_>,
    name: &str,
    series: &[Vec<[f64; 2]>],
    color: Color32,
    log: bool,
    drawn: &mut Drawn,
) {
    let b = crate::app::groups::band(series, 256);
    if b.is_empty() {
        return;
    }
    let xs: Vec<f64> = b.iter().map(|p| p[0]).collect();
    let f = |v: f64| if log { v.max(1e-12).log10() } else { v };
    let lo: Vec<f64> = b.iter().map(|p| f(p[1] - p[2])).collect();
    let hi: Vec<f64> = b.iter().map(|p| f(p[1] + p[2])).collect();
    pu.add(FilledArea::new(format!("{name} ± std"), &xs, &lo, &hi).fill_color(color.gamma_multiply(0.25)));
    let mean: Vec<[f64; 2]> = b.iter().map(|p| [p[0], f(p[1])]).collect();
    pu.line(
        Line::new(format!("{name} mean"), PlotPoints::from(mean))
            .color(color)
            .width(2.0),
    );
    drawn.bands.push(name.to_owned());
    drawn.lines.push(format!("{name} mean"));
}

/// The side list: each run (or group of seeds) with its colour, show/hide, and pin as baseline;
/// a click on a name shows that run in the other views.
fn side_list(
    ui: &mut egui::Ui,
    runs: &[CurveRun<'_>],
    groups: &[Vec<usize>],
    selected: usize,
    baseline: Option<usize>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.label(egui::RichText::new("Runs").strong());
    ui.horizontal(|ui| {
        if ui.small_button("all").clicked() {
            actions.push(Action::Show((0..runs.len()).collect(), true));
        }
        if ui.small_button("none").clicked() {
            actions.push(Action::Show(
                (0..runs.len()).filter(|&i| i != selected).collect(),
                false,
            ));
        }
    });
    egui::ScrollArea::vertical()
        .id_salt("curve-runs")
        .max_height(560.0)
        .show(ui, |ui| {
            for g in groups {
                let all_shown = g.iter().all(|&i| runs[i].shown);
                if g.len() > 1 {
                    ui.horizontal(|ui| {
                        swatch(ui, run_color(g[0]));
                        let mut on = all_shown;
                        if ui
                            .checkbox(&mut on, "")
                            .on_hover_text("Show or hide the group")
                            .changed()
                        {
                            actions.push(Action::Show(g.clone(), on));
                        }
                        ui.label(egui::RichText::new(format!("{} seeds", g.len())).strong());
                    });
                }
                for &i in g {
                    ui.horizontal(|ui| {
                        if g.len() > 1 {
                            ui.add_space(14.0);
                        }
                        run_toggle(ui, i, runs[i].shown, &mut actions);
                        if ui
                            .selectable_label(i == selected, &runs[i].history.label)
                            .on_hover_text("Show this run in the filter, router and live views")
                            .clicked()
                        {
                            actions.push(Action::Select(i));
                        }
                        let pinned = baseline == Some(i);
                        if ui
                            .selectable_label(pinned, "pin")
                            .on_hover_text(if pinned {
                                "The baseline (dashed): click to unpin"
                            } else {
                                "Pin as the baseline (always drawn, dashed)"
                            })
                            .clicked()
                        {
                            actions.push(Action::Pin((!pinned).then_some(i)));
                        }
                    });
                }
            }
        });
    actions
}

/// Run `i`'s colour and a box to show or hide it in the plots.
pub fn run_toggle(ui: &mut egui::Ui, i: usize, shown: bool, actions: &mut Vec<Action>) {
    swatch(ui, run_color(i));
    let mut on = shown;
    if ui
        .checkbox(&mut on, "")
        .on_hover_text("Show or hide this run in the plots")
        .changed()
    {
        actions.push(Action::Show(vec![i], on));
    }
}

/// A run's colour as a small square.
fn swatch(ui: &mut egui::Ui, color: Color32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().rect_filled(rect.shrink(1.0), 2.0, color);
}

/// Evaluation rows `[step, time_s, acc, …]` as plot points against step, or seconds when `x`.
fn eval_points(evals: &[[f64; 5]], x: bool) -> Vec<[f64; 2]> {
    evals.iter().map(|e| [if x { e[1] } else { e[0] }, e[2]]).collect()
}
