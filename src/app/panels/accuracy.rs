//! Accuracy where it fails: per-class accuracy, the confusion matrix of the last validation or
//! test evaluation, and the misclassified validation images (clicking one makes it the router's
//! probe).

use super::Action;
use super::diagnose::{DiagRun, DiagView, DiagnoseSettings};
use crate::app::widgets::cells::{Row, bar, rgb, table};
use crate::app::widgets::colormap::sequential;
use crate::app::widgets::heatmap::{Scale, Textures, heatmap};
use crate::train::protocol::{EvalResult, Misclassified, ProbeOrigin};
use egui::{RichText, Sense, vec2};

/// Above this many classes the confusion matrix is a picture (hover for the counts), not numbers.
const MAX_NUMBERED: usize = 30;
/// The gallery's thumbnail side on screen.
const THUMB: f32 = 84.0;

/// The name of class `c`.
fn class_name(classes: &[String], c: usize) -> String {
    classes.get(c).cloned().unwrap_or_else(|| c.to_string())
}

/// What a validation image is called when it is a folder run's probe.
#[must_use]
pub fn val_probe_name(index: usize) -> String {
    format!("val #{index}")
}

impl DiagnoseSettings {
    /// The view.
    pub fn accuracy_ui(&mut self, ui: &mut egui::Ui, run: &DiagRun<'_>, textures: &mut Textures) -> Vec<Action> {
        let mut actions = Vec::new();
        ui.heading(DiagView::Accuracy.question());
        ui.horizontal(|ui| {
            ui.label("split:");
            ui.selectable_value(&mut self.test_split, false, "validation");
            ui.selectable_value(&mut self.test_split, true, "test");
        });
        let h = run.history;
        let (eval, split) = if self.test_split {
            (h.last_test.as_ref(), "test")
        } else {
            (h.last_val.as_ref(), "validation")
        };
        match eval {
            Some(e) => {
                ui.label(
                    RichText::new(format!(
                        "Last {split} evaluation: step {}, accuracy {:.1}% on n = {} images",
                        e.step,
                        100.0 * e.acc,
                        e.n
                    ))
                    .strong(),
                );
                ui.columns(2, |cols| {
                    per_class(&mut cols[0], e, run.classes);
                    confusion(&mut cols[1], e, run.classes, textures);
                });
            }
            None => {
                ui.label(format!("No {split} evaluation yet."));
            }
        }
        ui.add_space(8.0);
        if let Some(v) = &h.last_val {
            actions.extend(gallery(ui, v, run, textures));
        }
        actions
    }
}

/// Per-class accuracy bars.
fn per_class(ui: &mut egui::Ui, e: &EvalResult, classes: &[String]) {
    ui.label(RichText::new("Accuracy per class").strong());
    if e.per_class_acc.is_empty() {
        ui.label("not recorded");
        return;
    }
    egui::ScrollArea::vertical()
        .id_salt("per-class-acc")
        .max_height(420.0)
        .show(ui, |ui| {
            egui::Grid::new("per-class-acc-grid")
                .spacing(vec2(8.0, 2.0))
                .show(ui, |ui| {
                    for (c, acc) in e.per_class_acc.iter().enumerate() {
                        let n: Option<u64> = e.confusion.get(c).map(|r| r.iter().sum());
                        let name = class_name(classes, c);
                        ui.label(RichText::new(&name).small());
                        let color = rgb(sequential(*acc as f32));
                        bar(ui, *acc, 1.0, false, 160.0, color);
                        let text = if acc.is_finite() {
                            format!("{:.1}%", 100.0 * acc)
                        } else {
                            "-".to_owned()
                        };
                        let label = ui.label(RichText::new(text).monospace().small());
                        if let Some(n) = n {
                            label.on_hover_text(format!("{name}: {n} images"));
                        }
                        ui.end_row();
                    }
                });
        });
}

/// The confusion matrix (rows = true class), counts in cells coloured by their share of the row.
fn confusion(ui: &mut egui::Ui, e: &EvalResult, classes: &[String], textures: &mut Textures) {
    ui.label(RichText::new("Confusion matrix: rows = true class, columns = predicted").strong());
    let m = &e.confusion;
    if m.is_empty() {
        ui.label("not recorded for this evaluation");
        return;
    }
    let k = m.len();
    let share = |row: &[u64], j: usize| {
        let total: u64 = row.iter().sum();
        if total == 0 {
            0.0
        } else {
            row.get(j).copied().unwrap_or(0) as f64 / total as f64
        }
    };
    if k <= MAX_NUMBERED {
        let cols: Vec<String> = (0..k).map(|j| class_name(classes, j)).collect();
        let rows: Vec<Row> = m
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let cells = (0..k)
                    .map(|j| {
                        let s = share(row, j);
                        let count = row.get(j).copied().unwrap_or(0);
                        (
                            count.to_string(),
                            rgb(sequential(s as f32)),
                            format!(
                                "true {}, predicted {}: {count} ({:.1}% of the row)",
                                class_name(classes, i),
                                class_name(classes, j),
                                100.0 * s
                            ),
                        )
                    })
                    .collect();
                (class_name(classes, i), cells)
            })
            .collect();
        egui::ScrollArea::both()
            .id_salt("confusion")
            .max_height(420.0)
            .show(ui, |ui| {
                table(ui, "confusion-grid", "true \\ predicted", &cols, &rows, 28.0);
            });
    } else {
        let values: Vec<f32> = m.iter().flat_map(|row| (0..k).map(|j| share(row, j) as f32)).collect();
        heatmap(ui, textures, "confusion", &values, (k, k), Scale::Unit, 360.0);
        ui.label(RichText::new(format!("{k} classes: hover for a cell's row share")).small());
    }
    ui.label(RichText::new("colour: the cell's share of its row (true class)").small());
}

/// The misclassified validation images, the most confident first; clicking one probes with it.
fn gallery(ui: &mut egui::Ui, v: &EvalResult, run: &DiagRun<'_>, textures: &mut Textures) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.label(
        RichText::new(format!(
            "Misclassified validation images at step {} (the most confident first)",
            v.step
        ))
        .strong(),
    );
    if v.misclassified.is_empty() {
        ui.label("None recorded.");
        return actions;
    }
    ui.label(if run.can_probe {
        "Click an image to make it the router's probe (its maps: Routing and Tokens views)."
    } else {
        "These images cannot probe this run from here (no adapter on this machine, or watched only)."
    });
    if let Some(e) = run.images.and_then(|i| i.error.as_ref()) {
        ui.label(RichText::new(format!("No thumbnails: {e}")).small());
    }
    let probe = probed_index(run);
    ui.horizontal_wrapped(|ui| {
        for m in &v.misclassified {
            if thumb(ui, m, run, probe, textures) {
                actions.push(Action::ProbeVal(m.index as usize));
            }
        }
    });
    actions
}

/// The validation image the router's probe shows now, if one.
fn probed_index(run: &DiagRun<'_>) -> Option<usize> {
    match run.snap.and_then(|s| s.probe.as_ref()).map(|p| &p.origin) {
        Some(ProbeOrigin::Val { index, .. }) => Some(*index),
        Some(ProbeOrigin::File { name }) => name.strip_prefix("val #").and_then(|n| n.parse().ok()),
        None => None,
    }
}

/// One misclassified image with its classes; true when clicked.
fn thumb(
    ui: &mut egui::Ui,
    m: &Misclassified,
    run: &DiagRun<'_>,
    probe: Option<usize>,
    textures: &mut Textures,
) -> bool {
    let index = m.index as usize;
    let img = run.images.and_then(|i| i.get(index));
    let label = img
        .map(|i| i.label)
        .or_else(|| match run.snap.and_then(|s| s.probe.as_ref()).map(|p| &p.origin) {
            Some(ProbeOrigin::Val { index: i, label }) if *i == index => Some(*label),
            _ => None,
        });
    let truth = label.map_or_else(|| "?".to_owned(), |l| class_name(run.classes, l as usize));
    let predicted = class_name(run.classes, m.predicted as usize);
    let mut clicked = false;
    ui.vertical(|ui| {
        ui.set_width(THUMB + 8.0);
        let sense = if run.can_probe { Sense::click() } else { Sense::hover() };
        let (rect, resp) = ui.allocate_exact_size(vec2(THUMB, THUMB), sense);
        let painter = ui.painter_at(rect);
        if let Some(i) = img {
            let id = textures.get(
                ui.ctx(),
                &format!("misclassified-{index}"),
                i.thumb.clone(),
                (i.side, i.side),
            );
            painter.image(
                id,
                rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            );
        } else {
            painter.rect_filled(rect, 3.0, ui.visuals().faint_bg_color);
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                format!("#{index}"),
                egui::FontId::proportional(12.0),
                ui.visuals().weak_text_color(),
            );
        }
        let stroke = if probe == Some(index) {
            egui::Stroke::new(3.0, ui.visuals().selection.stroke.color)
        } else if resp.hovered() && run.can_probe {
            egui::Stroke::new(2.0, ui.visuals().text_color())
        } else {
            egui::Stroke::NONE
        };
        painter.rect_stroke(rect, 3.0, stroke, egui::StrokeKind::Inside);
        let name = val_probe_name(index);
        resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, run.can_probe, &name));
        let resp = resp.on_hover_text(format!(
            "{name}: true {truth}, predicted {predicted} with probability {:.2}",
            m.prob
        ));
        clicked = resp.clicked();
        ui.label(RichText::new(format!("#{index} true: {truth}")).small());
        ui.label(RichText::new(format!("predicted: {predicted} ({:.0}%)", 100.0 * m.prob)).small());
    });
    clicked
}
