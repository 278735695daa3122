//! Live controls: move κ, c, ε (one block or all; set or scale), τ, γ, λ, T and the learning
//! rate while training, and lock coefficients out of the optimizer. A change is sent when the
//! slider is released; the filter views update with the next snapshot.

use super::Action;
use crate::app::state::{ChangeMode, ControlSettings};
use crate::config::{Coeff, Lockable, Prior};
use crate::train::protocol::{Command, Hyper, SetMode, Snapshot, Target};

fn released(r: &egui::Response) -> bool {
    r.drag_stopped() || (r.changed() && !r.dragged())
}

/// Draws the controls. `snapshot` gives the current values and locks; `blocks` the MoPPA blocks.
pub fn ui(ui: &mut egui::Ui, c: &mut ControlSettings, snapshot: Option<&Snapshot>, running: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.heading("Physics, live");
    let Some(snap) = snapshot else {
        ui.label("Start a MoPPA run to steer its priors.");
        return actions;
    };
    let blocks: Vec<usize> = snap.blocks.iter().map(|b| b.block).collect();
    let target = c.block.map_or(Target::All, Target::Block);
    egui::ComboBox::from_label("blocks")
        .selected_text(
            c.block
                .map_or_else(|| "all blocks".to_owned(), |b| format!("block {b}")),
        )
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut c.block, None, "all blocks");
            for b in &blocks {
                ui.selectable_value(&mut c.block, Some(*b), format!("block {b}"));
            }
        });
    ui.horizontal(|ui| {
        ui.selectable_value(&mut c.mode, ChangeMode::Set, "set")
            .on_hover_text("Set every channel to the value");
        ui.selectable_value(&mut c.mode, ChangeMode::Scale, "scale")
            .on_hover_text("Multiply every channel by a factor");
    });
    let has = |p: Prior| snap.priors.contains(&p);
    let shown = snap
        .blocks
        .iter()
        .find(|b| Some(b.block) == c.block)
        .or_else(|| snap.blocks.first());
    let mean = |v: &[f32]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
        }
    };
    // What each coefficient's slider says and spans, in prior order.
    let sliders = [
        (
            "κ heat",
            "exp(−κ·τ·Λ): larger κ blurs more (local smoothing)",
            1e-3..=10.0,
        ),
        (
            "c wave",
            "exp(−γ·τ·√Λ)·cos(c·τ·√Λ): larger c rings faster (long-range)",
            1e-2..=5.0,
        ),
        (
            "ε Poisson",
            "S·ε/(Λ + ε): smaller ε spreads further (global equilibrium)",
            1e-3..=100.0,
        ),
    ];
    for (coeff, (label, eq, range)) in Coeff::ALL.into_iter().zip(sliders) {
        if !has(coeff.prior()) {
            continue;
        }
        let current = shown.map(|b| mean(&b.coeffs[coeff]));
        let value = &mut c.coeffs[coeff];
        ui.horizontal(|ui| {
            let r = if c.mode == ChangeMode::Set {
                ui.add(egui::Slider::new(value, range).logarithmic(true).text(label))
            } else {
                ui.add(
                    egui::Slider::new(&mut c.factor, 0.1..=10.0)
                        .logarithmic(true)
                        .text(format!("× {label}")),
                )
            };
            let r = r.on_hover_text(format!("{eq}\nnow: channel mean {:.4}", current.unwrap_or(f64::NAN)));
            if released(&r) {
                let mode = if c.mode == ChangeMode::Set {
                    SetMode::Set(*value)
                } else {
                    SetMode::Scale(c.factor)
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
        (
            Hyper::Tau,
            "τ time",
            "heat exp(−κ·τ·Λ) and wave cos(c·τ·√Λ)",
            0.05..=10.0,
            &mut c.tau,
            true,
        ),
        (
            Hyper::Gamma,
            "γ damping",
            "wave exp(−γ·τ·√Λ)",
            0.0..=5.0,
            &mut c.gamma,
            false,
        ),
        (
            Hyper::RouteWeight,
            "λ route",
            "L_route = λ · mean_l KL(mean α_l ‖ uniform)",
            0.0..=1.0,
            &mut c.route_weight,
            false,
        ),
        (
            Hyper::Temperature,
            "T router",
            "α = softmax(logits / T)",
            0.05..=10.0,
            &mut c.temperature,
            true,
        ),
        (
            Hyper::Lr,
            "lr",
            "peak learning rate (the warm-up + cosine schedule keeps its shape)",
            1e-5..=1e-1,
            &mut c.lr,
            true,
        ),
    ];
    for (hyper, label, eq, range, value, log) in hypers {
        let mut s = egui::Slider::new(value, range).text(label);
        if log {
            s = s.logarithmic(true);
        }
        let r = ui.add(s).on_hover_text(eq);
        if released(&r) {
            actions.push(Action::Send(Command::SetHyper { hyper, value: *value }));
        }
    }
    ui.separator();
    ui.horizontal(|ui| {
        if ui.button("Evaluate now").clicked() {
            actions.push(Action::Send(Command::Evaluate));
        }
        if !running {
            ui.label("(applied at the next step)");
        }
    });
    actions
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
