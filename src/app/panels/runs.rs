//! The runs table: every run shown (this app's, opened folders, connected servers) side by side:
//! where it comes from and where it stands, method, rank, trainable parameters, best validation
//! and test accuracy, speed, wall time, and the settings in which it differs from the others
//! (highlighted). A row's button shows that run in the filter, router and live views.

use super::Action;
use super::curves::run_toggle;
use crate::app::OpenRun;
use crate::app::layout::run_state;
use serde_json::Value;
use std::collections::BTreeSet;

/// The configuration keys whose values are not the same in every run (the seed included;
/// where and how a run ran left out).
fn differing_keys(configs: &[Option<&Value>]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let objects: Vec<&serde_json::Map<String, Value>> =
        configs.iter().flatten().filter_map(|v| v.as_object()).collect();
    if objects.len() < 2 {
        return keys;
    }
    for o in &objects {
        for k in o.keys() {
            if k != "seed" && crate::app::groups::NOT_A_SETTING.contains(&k.as_str()) {
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
        other => other.to_string(),
    }
}

/// The table's columns: header, hover, and how a row sorts.
const COLUMNS: [(&str, &str); 11] = [
    ("run", "its name"),
    ("source", "where it comes from"),
    ("state", "where it stands"),
    ("method", "method and rank"),
    ("trainable", "trainable parameters"),
    ("steps", "steps done"),
    ("best val", "best validation accuracy"),
    ("test", "test accuracy of the final model"),
    ("steps/s", "optimizer steps per second of training (pauses left out)"),
    ("wall", "seconds since it started"),
    (
        "differs",
        "its settings that differ from the other runs' (keys that do not apply to its method are left out)",
    ),
];

/// How the runs table is sorted and filtered.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunsTable {
    /// The column sorted by (`None`: the order opened).
    pub sort: Option<usize>,
    /// Descending.
    pub descending: bool,
    /// Rows shown contain this text (any column, case ignored).
    pub filter: String,
}

/// One row's cells as text, and its sort keys (numbers where the column is numeric).
struct Row {
    cells: Vec<String>,
    numbers: Vec<Option<f64>>,
}

fn row(r: &OpenRun, differ: &BTreeSet<String>) -> Row {
    let h = &r.history;
    let info = r.info();
    let pct = |a: Option<f64>| a.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a));
    let diffs: Vec<String> = differ
        .iter()
        .filter_map(|k| {
            let v = info.and_then(|i| i.config.get(k.as_str()))?;
            (!v.is_null()).then(|| format!("{k}={}", short(v)))
        })
        .collect();
    let test = h.test.last().map(|t| t[2]);
    let sps = h.steps_per_s();
    Row {
        cells: vec![
            h.label.clone(),
            r.source.describe(),
            run_state(r),
            info.map_or_else(|| "-".into(), |i| i.method.clone()),
            info.map_or_else(|| "-".into(), |i| crate::util::group_digits(i.trainable)),
            h.step.to_string(),
            pct(h.best_val()),
            pct(test),
            sps.map_or("-".into(), |v| format!("{v:.1}")),
            if h.time_s > 0.0 {
                format!("{:.0} s", h.time_s)
            } else {
                "-".into()
            },
            diffs.join("  "),
        ],
        numbers: vec![
            None,
            None,
            None,
            None,
            info.map(|i| i.trainable as f64),
            Some(h.step as f64),
            h.best_val(),
            test,
            sps,
            Some(h.time_s),
            None,
        ],
    }
}

/// Draws the table (sortable by any column, filtered by text); returns the run to select, if a
/// row's name was clicked, and runs shown or hidden.
pub fn ui(ui: &mut egui::Ui, runs: &[OpenRun], selected: usize, table: &mut RunsTable) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.horizontal(|ui| {
        ui.heading("Runs");
        if ui.button("Open run…").clicked() {
            actions.push(Action::OpenRuns);
        }
        ui.separator();
        ui.label("filter");
        ui.add(
            egui::TextEdit::singleline(&mut table.filter)
                .hint_text("any text in a row")
                .desired_width(200.0),
        );
        if !table.filter.is_empty() && ui.small_button("clear").clicked() {
            table.filter.clear();
        }
    });
    if runs.is_empty() {
        ui.label("No run yet: press Start, open a run folder (File → Open run…, or drop it here) or connect to a served run.");
        return actions;
    }
    let configs: Vec<Option<&Value>> = runs.iter().map(|r| r.info().map(|i| &i.config)).collect();
    let differ = differing_keys(&configs);
    let rows: Vec<Row> = runs.iter().map(|r| row(r, &differ)).collect();
    let needle = table.filter.to_lowercase();
    let mut order: Vec<usize> = (0..runs.len())
        .filter(|&i| needle.is_empty() || rows[i].cells.iter().any(|c| c.to_lowercase().contains(&needle)))
        .collect();
    if let Some(c) = table.sort {
        order.sort_by(|&a, &b| {
            let o = match (rows[a].numbers[c], rows[b].numbers[c]) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Greater,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (None, None) => rows[a].cells[c].cmp(&rows[b].cells[c]),
            };
            if table.descending { o.reverse() } else { o }
        });
    }
    let highlight = egui::Color32::from_rgb(240, 190, 70);
    egui::ScrollArea::horizontal()
        .id_salt("runs-table-scroll")
        .show(ui, |ui| {
            egui::Grid::new("runs-table")
                .striped(true)
                .spacing([14.0, 4.0])
                .show(ui, |ui| {
                    ui.label("");
                    for (c, (h, hover)) in COLUMNS.iter().enumerate() {
                        let arrow = match (table.sort == Some(c), table.descending) {
                            (true, false) => " (asc)",
                            (true, true) => " (desc)",
                            _ => "",
                        };
                        if ui
                            .add(egui::Button::new(egui::RichText::new(format!("{h}{arrow}")).strong()).frame(false))
                            .on_hover_text(format!("{hover}; click to sort"))
                            .clicked()
                        {
                            if table.sort == Some(c) {
                                table.descending = !table.descending;
                            } else {
                                table.sort = Some(c);
                                table.descending = rows.first().is_some_and(|r| r.numbers[c].is_some());
                            }
                        }
                    }
                    ui.end_row();
                    for &i in &order {
                        let r = &runs[i];
                        let cells = &rows[i].cells;
                        // The run's colour in overlaid curves, and whether they draw it.
                        ui.horizontal(|ui| run_toggle(ui, i, r.shown, &mut actions));
                        if ui
                            .selectable_label(i == selected, &cells[0])
                            .on_hover_text("Show this run in the filter, router and live views")
                            .clicked()
                        {
                            actions.push(Action::Select(i));
                        }
                        ui.label(egui::RichText::new(&cells[1]).small());
                        for c in &cells[2..10] {
                            ui.label(c);
                        }
                        // The differing settings wrap within the column instead of running off.
                        ui.scope(|ui| {
                            ui.set_max_width(420.0);
                            ui.add(
                                egui::Label::new(egui::RichText::new(&cells[10]).color(highlight).monospace()).wrap(),
                            );
                        });
                        ui.end_row();
                    }
                });
        });
    if order.len() < runs.len() {
        ui.label(egui::RichText::new(format!("{} of {} runs match the filter", order.len(), runs.len())).small());
    }
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
