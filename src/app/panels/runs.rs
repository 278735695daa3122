//! The runs table: every run shown (this app's, opened folders, connected servers) side by side:
//! where it comes from and where it stands, method, rank, trainable parameters, best validation
//! and test accuracy, speed, wall time, and the settings in which it differs from the others
//! (highlighted). A row's button shows that run in the filter, router and live views.

use super::Action;
use super::curves::run_color;
use crate::app::OpenRun;
use crate::app::layout::run_state;
use serde_json::Value;
use std::collections::BTreeSet;

/// Settings that describe the machine or the folder rather than the run.
const NOT_COMPARED: [&str; 6] = ["out", "resume", "threads", "device", "snapshot_every", "eval_every"];

/// The configuration keys whose values are not the same in every run.
fn differing_keys(configs: &[Option<&Value>]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let objects: Vec<&serde_json::Map<String, Value>> =
        configs.iter().flatten().filter_map(|v| v.as_object()).collect();
    if objects.len() < 2 {
        return keys;
    }
    for o in &objects {
        for k in o.keys() {
            if NOT_COMPARED.contains(&k.as_str()) {
                continue;
            }
            let first = objects[0].get(k);
            if objects.iter().any(|p| p.get(k) != first) {
                keys.insert(k.clone());
            }
        }
    }
    keys
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Draws the table; returns the run to select, if a row's button was clicked.
pub fn ui(ui: &mut egui::Ui, runs: &[OpenRun], selected: usize) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.horizontal(|ui| {
        ui.heading("Runs");
        if ui.button("Open run…").clicked() {
            actions.push(Action::OpenRuns);
        }
    });
    if runs.is_empty() {
        ui.label("No run yet: press Start, open a run folder (File → Open run…, or drop it here) or connect to a served run.");
        return actions;
    }
    let configs: Vec<Option<&Value>> = runs.iter().map(|r| r.info().map(|i| &i.config)).collect();
    let differ = differing_keys(&configs);
    let highlight = egui::Color32::from_rgb(240, 190, 70);
    egui::Grid::new("runs-table")
        .striped(true)
        .spacing([14.0, 4.0])
        .show(ui, |ui| {
            for h in [
                "",
                "run",
                "source",
                "state",
                "method",
                "trainable",
                "steps",
                "best val",
                "test",
                "steps/s",
                "wall",
                "differs",
            ] {
                ui.label(egui::RichText::new(h).strong());
            }
            ui.end_row();
            for (i, r) in runs.iter().enumerate() {
                let h = &r.history;
                // The run's colour in overlaid curves.
                let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                ui.painter().rect_filled(rect.shrink(1.0), 2.0, run_color(i));
                if ui
                    .selectable_label(i == selected, &h.label)
                    .on_hover_text("Show this run in the filter, router and live views")
                    .clicked()
                {
                    actions.push(Action::Select(i));
                }
                ui.label(egui::RichText::new(r.source.describe()).small());
                ui.label(run_state(r));
                let info = r.info();
                ui.label(info.map_or_else(|| "-".into(), |i| i.method.clone()));
                ui.label(info.map_or_else(|| "-".into(), |i| crate::util::group_digits(i.trainable)));
                ui.label(h.step.to_string());
                ui.label(h.best_val().map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)));
                ui.label(h.test.last().map_or("-".into(), |t| format!("{:.2}%", 100.0 * t[2])));
                ui.label(if h.time_s > 0.0 {
                    format!("{:.1}", h.step as f64 / h.time_s)
                } else {
                    "-".into()
                });
                ui.label(if h.time_s > 0.0 {
                    format!("{:.0} s", h.time_s)
                } else {
                    "-".into()
                });
                let diffs: Vec<String> = differ
                    .iter()
                    .filter_map(|k| info.map(|i| format!("{k}={}", short(&i.config[k.as_str()]))))
                    .collect();
                ui.label(egui::RichText::new(diffs.join("  ")).color(highlight).monospace());
                ui.end_row();
            }
        });
    if !differ.is_empty() {
        ui.label(
            egui::RichText::new(format!(
                "highlighted: the settings that differ between the runs ({})",
                differ.len()
            ))
            .small(),
        );
    }
    actions
}
