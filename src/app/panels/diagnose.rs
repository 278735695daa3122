//! The router's diagnostics, beside its routing view: what each prior does (the prior ablation:
//! each removed in all blocks and in each, the change in accuracy and loss), which tokens
//! ([`super::usage`]) and classes each takes, and where the accuracy fails
//! ([`super::accuracy`]). All read the run's records; none computes anything of the model's.

use super::Action;
use crate::app::history::RunHistory;
use crate::app::jobs::ValImages;
use crate::app::widgets::cells::{Row, bar, rgb, table};
use crate::app::widgets::colormap::{diverging, prior_color};
use crate::train::ablation::{DEFAULT_IMAGES, MAX_IMAGES};
use crate::train::protocol::{Ablation, AblationBlock, Snapshot};
use egui::RichText;
use serde::{Deserialize, Serialize};

/// The Router tab's views.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DiagView {
    /// Router weights per block, the probe's maps, the alerts.
    #[default]
    Routing,
    /// The prior ablation.
    Priors,
    /// Each prior's weight against the tokens' frequency content.
    Tokens,
    /// Each prior's weight per class.
    Classes,
    /// Per-class accuracy, the confusion matrix, the misclassified images.
    Accuracy,
}

impl DiagView {
    /// All, in order.
    pub const ALL: [Self; 5] = [Self::Routing, Self::Priors, Self::Tokens, Self::Classes, Self::Accuracy];

    /// The selector's label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Routing => "Routing",
            Self::Priors => "Priors removed",
            Self::Tokens => "Tokens",
            Self::Classes => "Classes",
            Self::Accuracy => "Accuracy",
        }
    }

    /// What it answers.
    #[must_use]
    pub fn question(self) -> &'static str {
        match self {
            Self::Routing => "How does the router weigh the priors?",
            Self::Priors => "What does each prior do?",
            Self::Tokens => "Which tokens each prior takes",
            Self::Classes => "Which classes use each prior",
            Self::Accuracy => "Accuracy where it fails",
        }
    }
}

/// The diagnostics' settings (kept between launches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiagnoseSettings {
    /// The view shown in the Router tab.
    pub view: DiagView,
    /// Validation images an ablation uses.
    pub images: usize,
    /// The block the token and class views show (`None`: the mean over blocks).
    pub block: Option<usize>,
    /// The confusion matrix and per-class accuracy of the test split instead of validation.
    pub test_split: bool,
}

impl Default for DiagnoseSettings {
    fn default() -> Self {
        Self {
            view: DiagView::Routing,
            images: DEFAULT_IMAGES,
            block: None,
            test_split: false,
        }
    }
}

/// What the diagnostics show for the run shown.
pub struct DiagRun<'a> {
    /// Its records.
    pub history: &'a RunHistory,
    /// The snapshot the router view shows (its probe).
    pub snap: Option<&'a Snapshot>,
    /// Class names, index = label.
    pub classes: &'a [String],
    /// How an ablation would run here (`Ok`: in words), or why none can.
    pub ablate: Result<&'static str, String>,
    /// Validation images read for this run (thumbnails of the misclassified).
    pub images: Option<&'a ValImages>,
    /// Whether clicking a validation image can make it the probe.
    pub can_probe: bool,
}

impl DiagnoseSettings {
    /// The row choosing the view; true when the routing view is chosen.
    pub fn selector(&mut self, ui: &mut egui::Ui) -> bool {
        ui.horizontal(|ui| {
            for v in DiagView::ALL {
                ui.selectable_value(&mut self.view, v, v.label())
                    .on_hover_text(v.question());
            }
        });
        self.view == DiagView::Routing
    }

    /// The prior ablation view.
    pub fn ablation_ui(&mut self, ui: &mut egui::Ui, run: &DiagRun<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        let h = run.history;
        ui.heading(DiagView::Priors.question());
        ui.label(
            "Each prior is removed (its weight α set to 0 on every patch token, the others renormalised) in all \
             MoPPA blocks at once and in each block alone; the model is scored on the same validation images. \
             Δacc below zero: the prior mattered.",
        );
        let priors = h.info.as_ref().map_or(0, |i| i.priors.len());
        if priors < 2 {
            ui.label("An ablation needs a MoPPA run with two or more priors.");
            return actions;
        }
        ui.horizontal(|ui| {
            ui.label("images:");
            ui.add(egui::DragValue::new(&mut self.images).range(1..=MAX_IMAGES).speed(4.0))
                .on_hover_text("A fixed, seeded subset of the validation split (the same for every ablation of it)");
            let running = h.ablation_progress.is_some();
            let enabled = run.ablate.is_ok() && !running;
            let tip = match &run.ablate {
                Ok(how) => (*how).to_owned(),
                Err(why) => why.clone(),
            };
            if ui
                .add_enabled(enabled, egui::Button::new("Run ablation"))
                .on_hover_text(&tip)
                .on_disabled_hover_text(&tip)
                .clicked()
            {
                actions.push(Action::Ablate(self.images));
            }
            if let Some((done, total)) = h.ablation_progress {
                let (frac, text) = if total == 0 {
                    (0.0, "starting…".to_owned())
                } else {
                    (done as f32 / total as f32, format!("{done} / {total} passes"))
                };
                ui.add(egui::ProgressBar::new(frac).text(text).desired_width(220.0));
                if ui.button("Cancel").clicked() {
                    actions.push(Action::CancelAblation);
                }
            }
        });
        if let Err(why) = &run.ablate {
            ui.label(RichText::new(why).small());
        }
        let Some(a) = &h.ablation else {
            ui.label("No ablation yet: Run measures one on the current weights.");
            return actions;
        };
        ablation_table(ui, a, h.step);
        per_class_delta(ui, a, run.classes);
        actions
    }
}

/// Points of accuracy.
fn points(acc: f64) -> f64 {
    100.0 * acc
}

/// The ablation's rows as a table with Δacc bars.
fn ablation_table(ui: &mut egui::Ui, a: &Ablation, step: u64) {
    ui.add_space(6.0);
    let when = if a.step == step {
        format!("step {}", a.step)
    } else {
        format!("step {} (the run is at {step} now)", a.step)
    };
    ui.label(
        RichText::new(format!(
            "Whole model: accuracy {:.1}%, loss {:.4} on n = {} {} images, {when}; took {:.1} s",
            points(a.base.acc),
            a.base.loss,
            a.n,
            a.split,
            a.seconds
        ))
        .strong(),
    );
    let limit = a
        .rows
        .iter()
        .map(|r| (points(r.score.acc) - points(a.base.acc)).abs())
        .fold(0.0, f64::max)
        .max(1.0);
    egui::Grid::new("ablation-table")
        .striped(true)
        .spacing(egui::vec2(14.0, 3.0))
        .show(ui, |ui| {
            for head in ["prior removed", "from", "accuracy", "Δacc (points)", "loss", "Δloss"] {
                ui.label(RichText::new(head).strong());
            }
            ui.label(RichText::new(format!("Δacc, ±{limit:.1} points")).strong());
            ui.end_row();
            for r in &a.rows {
                let d_acc = points(r.score.acc) - points(a.base.acc);
                let d_loss = r.score.loss - a.base.loss;
                ui.label(RichText::new(r.prior.name()).color(prior_color(r.prior)));
                ui.label(match r.block {
                    AblationBlock::One(b) => format!("block {b}"),
                    AblationBlock::All(_) => "all blocks".to_owned(),
                });
                ui.label(format!("{:.1}%", points(r.score.acc)));
                ui.label(RichText::new(format!("{d_acc:+.1}")).monospace());
                ui.label(format!("{:.4}", r.score.loss));
                ui.label(RichText::new(format!("{d_loss:+.4}")).monospace());
                bar(ui, d_acc, limit, true, 200.0, prior_color(r.prior)).on_hover_text(format!(
                    "without {} in {}: {d_acc:+.2} points of accuracy, {d_loss:+.4} loss",
                    r.prior.name(),
                    r.block
                ));
                ui.end_row();
            }
        });
}

/// Per class: the accuracy change when each prior is removed in all blocks.
fn per_class_delta(ui: &mut egui::Ui, a: &Ablation, classes: &[String]) {
    let base = &a.base.per_class_acc;
    let all: Vec<_> = a
        .rows
        .iter()
        .filter(|r| r.block == AblationBlock::ALL && r.score.per_class_acc.len() == base.len())
        .collect();
    if base.is_empty() || all.is_empty() {
        return;
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Per class: Δacc (points) with each prior removed in all blocks").strong());
    let deltas: Vec<Vec<f64>> = (0..base.len())
        .map(|c| {
            all.iter()
                .map(|r| points(r.score.per_class_acc[c]) - points(base[c]))
                .collect()
        })
        .collect();
    let limit = deltas.iter().flatten().map(|d| d.abs()).fold(0.0, f64::max).max(1.0);
    let cols: Vec<String> = all.iter().map(|r| format!("-{}", r.prior.name())).collect();
    let rows: Vec<Row> = deltas
        .iter()
        .enumerate()
        .filter(|(c, _)| a.class_n.get(*c).is_none_or(|&n| n > 0))
        .map(|(c, d)| {
            let name = classes.get(c).cloned().unwrap_or_else(|| c.to_string());
            let n = a.class_n.get(c).map_or_else(String::new, |n| format!(", n = {n}"));
            let cells = d
                .iter()
                .zip(&all)
                .map(|(v, r)| {
                    (
                        format!("{v:+.1}"),
                        rgb(diverging(*v as f32, limit as f32)),
                        format!(
                            "{name}{n}: {:.1}% whole, {:.1}% without {}",
                            points(base[c]),
                            points(r.score.per_class_acc[c]),
                            r.prior.name()
                        ),
                    )
                })
                .collect();
            (format!("{name} ({:.0}%)", points(base[c])), cells)
        })
        .collect();
    let skipped = deltas.len() - rows.len();
    egui::ScrollArea::vertical()
        .id_salt("ablation-per-class")
        .max_height(360.0)
        .show(ui, |ui| {
            table(ui, "ablation-per-class-grid", "class (whole)", &cols, &rows, 64.0);
        });
    if skipped > 0 {
        ui.label(RichText::new(format!("{skipped} class(es) without an image in the subset left out")).small());
    }
}
