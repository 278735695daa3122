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
use std::fmt::Write as _;

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
    (
        "best val",
        "best validation accuracy; hover a cell for its n and 95% CI",
    ),
    (
        "test",
        "test accuracy of the final model; hover a cell for its n and 95% CI",
    ),
    ("steps/s", "optimizer steps per second of training (pauses left out)"),
    ("wall", "seconds since it started"),
    (
        "differs",
        "its settings that differ from the other runs' (keys that do not apply to its method are left out)",
    ),
];

/// What the accuracy columns' hover adds to their header's.
const ACC_HOVER: &str = "n: the images evaluated. 95% CI: the Wilson score interval of one run's accuracy on n \
images, the accuracies those n images cannot tell apart from the one measured (seed-to-seed spread not \
included). A cell that shows its n in the warning colour: fewer than 100 images, one image is over 1 point";

/// The columns of the validation and test accuracy.
const ACC_COLUMNS: [usize; 2] = [6, 7];

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
    /// The hover of the validation and test accuracy cells ([`ACC_COLUMNS`]), and whether the
    /// cell is marked (under 100 images).
    acc_hover: [(Option<String>, bool); 2],
}

/// An accuracy cell and its hover, for an evaluation `(acc, n)` on `n` images of the `images`
/// set (`validation`, `test`; n = 0: unknown, a record written before n was): the accuracy in
/// percent, with its n under 100 images (drawn marked: the returned flag); the hover says n and
/// the 95% Wilson interval.
fn acc_cell(eval: Option<(f64, u64)>, images: &str) -> (String, Option<String>, bool) {
    let Some((acc, n)) = eval.filter(|(a, _)| a.is_finite()) else {
        return ("-".into(), None, false);
    };
    let pct = 100.0 * acc;
    let Some((low, high)) = crate::stats::wilson_acc(acc, n) else {
        return (
            format!("{pct:.2}%"),
            Some(format!(
                "{pct:.1}%; n unknown (recorded before moppa recorded the number of {images} images)"
            )),
            false,
        );
    };
    let mut hover = format!(
        "{pct:.1}% of {n} {images} images; 95% CI {:.1}–{:.1}%",
        100.0 * low,
        100.0 * high
    );
    let mut text = format!("{pct:.2}%");
    let few = n < 100;
    if few {
        let _ = write!(text, " (n = {n})");
        let _ = write!(
            hover,
            "; only {n} {images} images: one image is {:.1} points",
            100.0 / n as f64
        );
    }
    (text, Some(hover), few)
}

fn row(r: &OpenRun, differ: &BTreeSet<String>) -> Row {
    let h = &r.history;
    let info = r.info();
    let diffs: Vec<String> = differ
        .iter()
        .filter_map(|k| {
            let v = info.and_then(|i| i.config.get(k.as_str()))?;
            (!v.is_null()).then(|| format!("{k}={}", short(v)))
        })
        .collect();
    let test = h.test.last().map(|t| t[2]);
    // n is stored as a float beside the accuracy (exact up to 2^53).
    let (val_cell, val_hover, val_few) = acc_cell(h.best_val_eval().map(|v| (v[2], v[4] as u64)), "validation");
    let (test_cell, test_hover, test_few) = acc_cell(h.test.last().map(|t| (t[2], t[4] as u64)), "test");
    let sps = h.steps_per_s();
    Row {
        cells: vec![
            h.label.clone(),
            r.source.describe(),
            run_state(r),
            info.map_or_else(|| "-".into(), |i| i.method.clone()),
            info.map_or_else(|| "-".into(), |i| crate::util::group_digits(i.trainable)),
            h.step.to_string(),
            val_cell,
            test_cell,
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
        acc_hover: [(val_hover, val_few), (test_hover, test_few)],
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
                            .on_hover_text(if ACC_COLUMNS.contains(&c) {
                                format!("{hover}; click to sort.\n{ACC_HOVER}")
                            } else {
                                format!("{hover}; click to sort")
                            })
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
                        for (c, text) in cells.iter().enumerate().take(10).skip(2) {
                            match ACC_COLUMNS.iter().position(|&k| k == c).map(|a| &rows[i].acc_hover[a]) {
                                Some((hover, few)) => {
                                    let warn = ui.visuals().warn_fg_color;
                                    let text = egui::RichText::new(text);
                                    let cell = ui.label(if *few { text.color(warn) } else { text });
                                    if let Some(hover) = hover {
                                        cell.on_hover_text(hover);
                                    }
                                }
                                None => {
                                    ui.label(text);
                                }
                            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The intervals against SciPy: `stats.binomtest(83, 100).proportion_ci(0.95,
    /// method='wilson')` is (0.744519952323988, 0.891064338859400); `binomtest(450, 500)`
    /// (0.870578090368060, 0.923322437262698); 9 of 12 by the Wilson formula (z = 1.959964):
    /// (0.467695, 0.911058).
    #[test]
    fn an_accuracy_cell_says_its_n_and_wilson_interval() {
        let (text, hover, few) = acc_cell(Some((0.83, 100)), "test");
        assert_eq!((text.as_str(), few), ("83.00%", false));
        assert_eq!(hover.as_deref(), Some("83.0% of 100 test images; 95% CI 74.5–89.1%"));
        let (text, hover, few) = acc_cell(Some((0.9, 500)), "validation");
        assert_eq!((text.as_str(), few), ("90.00%", false));
        assert_eq!(
            hover.as_deref(),
            Some("90.0% of 500 validation images; 95% CI 87.1–92.3%")
        );
    }

    #[test]
    fn a_set_under_100_images_is_marked_and_an_unknown_n_said() {
        let (text, hover, few) = acc_cell(Some((0.75, 12)), "test");
        assert_eq!((text.as_str(), few), ("75.00% (n = 12)", true));
        assert_eq!(
            hover.as_deref(),
            Some("75.0% of 12 test images; 95% CI 46.8–91.1%; only 12 test images: one image is 8.3 points")
        );
        let (text, hover, few) = acc_cell(Some((0.8312, 0)), "test");
        assert_eq!((text.as_str(), few), ("83.12%", false));
        let hover = hover.unwrap();
        assert!(hover.starts_with("83.1%; n unknown"), "{hover}");
        assert!(!hover.contains("CI"), "{hover}");
        assert_eq!(acc_cell(None, "test"), ("-".into(), None, false));
        assert_eq!(acc_cell(Some((f64::NAN, 100)), "test"), ("-".into(), None, false));
    }
}
