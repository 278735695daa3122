//! Live controls: move κ, c, ε (one block or all; set or scale), τ, γ, λ, T and the learning
//! rate while training, and lock coefficients out of the optimizer. Every slider shows the
//! selected run's value (its last snapshot, the changes it applied since); a change is sent when
//! the slider is released and shown as a target until the run applies (or refuses) it.

use super::Action;
use crate::app::history::RunValues;
use crate::app::state::{ChangeMode, ControlSettings};
use crate::config::{Coeff, Lockable, Prior, ValueRange};
use crate::train::protocol::{Command, Hyper, SetMode, Snapshot, Target};
use std::collections::BTreeMap;

/// Values sent to a run and not applied yet, by the name its `Applied` event gives them
/// (`kappa`, `lr`, …): the sliders show them as targets until then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets(BTreeMap<&'static str, f64>);

impl Targets {
    /// The value `c` sets, by name, if it sets one.
    #[must_use]
    pub fn asked(c: &Command) -> Option<(&'static str, f64)> {
        match c {
            Command::SetCoeff {
                coeff,
                mode: SetMode::Set(v),
                ..
            } => Some((coeff.name(), *v)),
            Command::SetHyper { hyper, value } => Some((hyper.name(), *value)),
            _ => None,
        }
    }

    /// Waits for `name` to become `v`.
    pub fn set(&mut self, name: &'static str, v: f64) {
        self.0.insert(name, v);
    }

    /// The run applied the change named `command`.
    pub fn applied(&mut self, command: &str) {
        self.0.retain(|k, _| *k != command);
    }

    /// The run refused something (a warning): nothing is waiting any more.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The target for `name`, if one waits.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

/// What the live panel shows of the selected run.
pub struct LiveRun<'a> {
    /// Its last snapshot (blocks, priors, locks).
    pub snapshot: Option<&'a Snapshot>,
    /// Its values now, for the block chosen (or all).
    pub values: RunValues,
    /// Changes sent and not applied yet.
    pub targets: &'a Targets,
    /// Whether it is training.
    pub running: bool,
}

/// The text beside a slider: the run's value now when a target waits.
fn waiting(ui: &mut egui::Ui, target: Option<f64>, now: f64) {
    if target.is_some() {
        ui.label(
            egui::RichText::new(format!("target · now {}", four_digits(now)))
                .color(egui::Color32::from_rgb(240, 180, 40)),
        )
        .on_hover_text("Sent to the run; it applies it at its next step");
    }
}

fn released(r: &egui::Response) -> bool {
    r.drag_stopped() || (r.changed() && !r.dragged())
}

/// `v` with 4 significant digits, in scientific notation outside [1e-3, 1e4) (a slider spanning
/// 16 decades would otherwise show 0 as `0.00000000`).
fn four_digits(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        format!("{v}")
    } else if (1e-3..1e4).contains(&v.abs()) {
        let decimals = (3 - v.abs().log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    } else {
        format!("{v:.3e}")
    }
}

/// A slider over a value's whole valid range (`config::range`), logarithmic where it spans
/// decades. Typed values are not clamped: one outside the range is sent and the run refuses it
/// with the range in its message, so nothing changes silently.
fn range_slider(value: &mut f64, range: ValueRange, text: String) -> egui::Slider<'_> {
    let lo = if range.open_min {
        range.smallest_positive()
    } else {
        range.min
    };
    let s = egui::Slider::new(value, lo..=range.max)
        .text(text)
        .clamping(egui::SliderClamping::Never)
        .custom_formatter(|v, _| four_digits(v));
    if range.is_log() {
        s.logarithmic(true).smallest_positive(range.smallest_positive())
    } else {
        s
    }
}

impl ControlSettings {
    /// Draws the controls for the selected run: its values (or the targets sent to it), its
    /// blocks and locks.
    pub fn ui(&mut self, ui: &mut egui::Ui, run: &LiveRun<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        ui.heading("Physics, live");
        let Some(snap) = run.snapshot else {
            ui.label("Start a MoPPA run to steer its priors.");
            return actions;
        };
        let blocks: Vec<usize> = snap.blocks.iter().map(|b| b.block).collect();
        let target = self.block.map_or(Target::All, Target::Block);
        egui::ComboBox::from_label("blocks")
            .selected_text(
                self.block
                    .map_or_else(|| "all blocks".to_owned(), |b| format!("block {b}")),
            )
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.block, None, "all blocks");
                for b in &blocks {
                    ui.selectable_value(&mut self.block, Some(*b), format!("block {b}"));
                }
            });
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.mode, ChangeMode::Set, "set")
                .on_hover_text("Set every channel to the value");
            ui.selectable_value(&mut self.mode, ChangeMode::Scale, "scale")
                .on_hover_text("Multiply every channel by a factor");
        });
        let has = |p: Prior| snap.priors.contains(&p);
        let shown = snap
            .blocks
            .iter()
            .find(|b| Some(b.block) == self.block)
            .or_else(|| snap.blocks.first());
        // What each coefficient's slider says and spans, in prior order.
        let sliders = [
            ("κ heat", "exp(−κ·τ·Λ): larger κ blurs more (local smoothing)"),
            ("c wave", "exp(−γ·τ·√Λ)·cos(c·τ·√Λ): larger c rings faster (long-range)"),
            (
                "ε Poisson",
                "S·ε/(Λ + ε): smaller ε spreads further (global equilibrium)",
            ),
        ];
        let over = if self.block.is_some() {
            "this block's"
        } else {
            "every block's"
        };
        for (coeff, (label, eq)) in Coeff::ALL.into_iter().zip(sliders) {
            if !has(coeff.prior()) {
                continue;
            }
            let now = run.values.coeffs[coeff];
            let pending = run.targets.get(coeff.name());
            let mut value = pending.unwrap_or(now);
            if value.is_nan() {
                continue;
            }
            ui.horizontal(|ui| {
                let r = if self.mode == ChangeMode::Set {
                    ui.add(range_slider(&mut value, coeff.range(), label.to_owned()))
                } else {
                    ui.add(
                        egui::Slider::new(&mut self.factor, 0.1..=10.0)
                            .logarithmic(true)
                            .text(format!("× {label}")),
                    )
                };
                let r = r.on_hover_text(format!(
                    "{eq}\nnow: the mean over {over} channels, {}",
                    four_digits(now)
                ));
                if released(&r) {
                    let mode = if self.mode == ChangeMode::Set {
                        SetMode::Set(value)
                    } else {
                        SetMode::Scale(self.factor)
                    };
                    actions.push(Action::Send(Command::SetCoeff { coeff, target, mode }));
                }
                let what = Lockable::from(coeff);
                lock_toggle(
                    ui,
                    &mut actions,
                    what,
                    target,
                    shown.is_some_and(|b| b.locked.contains(&what)),
                );
            });
            waiting(ui, pending, now);
        }
        if has(Prior::Poisson) {
            ui.horizontal(|ui| {
                ui.label("source map S");
                lock_toggle(
                    ui,
                    &mut actions,
                    Lockable::Source,
                    target,
                    shown.is_some_and(|b| b.locked.contains(&Lockable::Source)),
                );
            });
        }
        ui.separator();
        let hypers = [
            (Hyper::Tau, "τ time", "heat exp(−κ·τ·Λ) and wave cos(c·τ·√Λ)"),
            (Hyper::Gamma, "γ damping", "wave exp(−γ·τ·√Λ)"),
            (
                Hyper::RouteWeight,
                "λ route",
                "L_route = λ · mean_l KL(mean α_l ‖ uniform)",
            ),
            (Hyper::Temperature, "T router", "α = softmax(logits / T)"),
            (
                Hyper::Lr,
                "lr",
                "peak learning rate (the warm-up + cosine schedule keeps its shape)",
            ),
        ];
        for (hyper, label, eq) in hypers {
            let range = hyper.range();
            let now = run.values.hyper(hyper);
            let pending = run.targets.get(hyper.name());
            let mut value = pending.unwrap_or(now);
            if value.is_nan() {
                // A run that does not say (a pretraining run, an old folder): nothing to move from.
                ui.label(format!("{label}: not known for this run"));
                continue;
            }
            let r = ui
                .add(range_slider(&mut value, range, label.to_owned()))
                .on_hover_text(format!("{eq}\nvalid: {range}"));
            if released(&r) {
                actions.push(Action::Send(Command::SetHyper { hyper, value }));
            }
            waiting(ui, pending, now);
        }
        ui.separator();
        ui.horizontal(|ui| {
            if ui.button("Evaluate now").clicked() {
                actions.push(Action::Send(Command::Evaluate));
            }
            if !run.running {
                ui.label("(applied at the next step)");
            }
        });
        actions
    }
}

fn lock_toggle(ui: &mut egui::Ui, actions: &mut Vec<Action>, what: Lockable, target: Target, locked: bool) {
    let mut l = locked;
    if ui
        .checkbox(&mut l, "lock")
        .on_hover_text(format!("hold {} out of the optimizer", what.name()))
        .changed()
    {
        actions.push(Action::Send(Command::Lock {
            what,
            target,
            locked: l,
        }));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slider_values_keep_four_significant_digits() {
        let cases = [
            (0.0, "0"),
            (0.03, "0.03"),
            (0.125, "0.125"),
            (12.5, "12.5"),
            (50.0, "50"),
            (1e-8, "1.000e-8"),
            (2.5e7, "2.500e7"),
            (0.000_5, "5.000e-4"),
        ];
        for (v, want) in cases {
            assert_eq!(super::four_digits(v), want, "{v}");
        }
    }
}
