//! The window's layout: the top bar (tabs, run control, export), the status bar with messages,
//! the launch panel, the live controls, the central view of the chosen tab, and the error dialog.

use super::StudioApp;
use super::panels::{self, Action, RunStatus};
use super::state::Tab;
use crate::train::backbone::cuda_available;
use crate::train::protocol::Snapshot;
use std::time::Duration;

impl StudioApp {
    pub(super) fn top_bar(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        ui.horizontal(|ui| {
            ui.heading("MoPPA Studio");
            ui.separator();
            for t in Tab::ALL {
                ui.selectable_value(&mut self.settings.tab, t, t.label());
            }
            ui.separator();
            let s = self.status;
            let can_start = !matches!(s, RunStatus::Running | RunStatus::None);
            if ui
                .add_enabled(
                    can_start,
                    egui::Button::new(if s == RunStatus::Paused { "Resume" } else { "Start" }),
                )
                .on_hover_text("Space toggles pause")
                .clicked()
            {
                actions.push(Action::Start);
            }
            if ui
                .add_enabled(s == RunStatus::Running, egui::Button::new("Pause"))
                .clicked()
            {
                actions.push(Action::Pause);
            }
            if ui
                .add_enabled(
                    matches!(s, RunStatus::Ready | RunStatus::Paused),
                    egui::Button::new("Step"),
                )
                .on_hover_text("One optimizer step")
                .clicked()
            {
                actions.push(Action::Step);
            }
            if ui
                .add_enabled(
                    matches!(s, RunStatus::Running | RunStatus::Paused | RunStatus::Ready),
                    egui::Button::new("Stop"),
                )
                .on_hover_text("Final evaluation and checkpoint")
                .clicked()
            {
                actions.push(Action::Stop);
            }
            if ui
                .button("Reset")
                .on_hover_text("A fresh run with the current settings")
                .clicked()
            {
                actions.push(Action::Reset);
            }
            ui.separator();
            ui.menu_button("Export", |ui| {
                if ui.button("Metrics CSV…").clicked() {
                    actions.push(Action::ExportCsv);
                }
                if ui.button("Window screenshot…").clicked() {
                    actions.push(Action::Screenshot);
                }
                if ui
                    .add_enabled(self.link.is_some(), egui::Button::new("Adapter checkpoint…"))
                    .clicked()
                {
                    actions.push(Action::SaveAdapter);
                }
            });
            let mut dark = self.settings.dark;
            if ui.checkbox(&mut dark, "dark").changed() {
                self.settings.dark = dark;
                ui.ctx()
                    .set_theme(if dark { egui::Theme::Dark } else { egui::Theme::Light });
            }
        });
        actions
    }

    fn messages(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, m) in self.shown.iter().enumerate().rev().take(3) {
            ui.horizontal(|ui| {
                let color = if m.error {
                    egui::Color32::from_rgb(230, 80, 80)
                } else {
                    egui::Color32::from_rgb(220, 170, 60)
                };
                let mut text = m.notice.message.clone();
                if let Some(p) = &m.notice.path
                    && !text.contains(&p.display().to_string())
                {
                    text = format!("{text} ({})", p.display());
                }
                ui.colored_label(color, format!("{} {text}", if m.error { "error:" } else { "note:" }));
                if ui.small_button("dismiss").clicked() {
                    dismiss = Some(i);
                }
            });
        }
        if let Some(i) = dismiss {
            self.shown.remove(i);
        }
    }

    fn error_modal(&mut self, ui: &mut egui::Ui) {
        let Some(idx) = self.shown.iter().position(|m| m.error) else {
            return;
        };
        let m = self.shown[idx].clone();
        let r = egui::Modal::new(egui::Id::unique("error-modal")).show(ui.ctx(), |ui| {
            ui.heading("Something went wrong");
            ui.label(&m.notice.message);
            if let Some(p) = &m.notice.path {
                ui.label(format!(
                    "file: {}{}",
                    p.display(),
                    m.notice.line.map(|l| format!(", line {l}")).unwrap_or_default()
                ));
            }
            ui.label(format!("at step {}", m.notice.step));
            ui.button("Dismiss").clicked()
        });
        if r.inner || r.should_close() {
            self.shown.remove(idx);
        }
    }

    fn snapshot_for_controls(&self) -> Option<&Snapshot> {
        self.runs.last().and_then(|r| r.snapshots.last())
    }

    /// Draws every panel; returns what they asked for.
    pub(super) fn layout(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        if self.status == RunStatus::Running {
            // ~60 fps while training: curves and filters move smoothly.
            ui.ctx().request_repaint_after(Duration::from_millis(15));
        }
        let mut actions = Vec::new();
        if !ui.ctx().egui_wants_keyboard_input()
            && ui.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Space))
        {
            match self.status {
                RunStatus::Running => actions.push(Action::Pause),
                RunStatus::Paused | RunStatus::Ready => actions.push(Action::Start),
                _ => {}
            }
        }
        egui::Panel::top("top").show(ui, |ui| actions.extend(self.top_bar(ui)));
        egui::Panel::bottom("status").show(ui, |ui| {
            self.messages(ui);
            let (step, thr) = self.runs.last().map_or((0, 0.0), |r| (r.step, r.throughput));
            let (device, total) = self.info.as_ref().map_or(("-".to_owned(), 0), |i| {
                let plural = if i.threads == 1 { "" } else { "s" };
                (format!("{} · {} thread{plural}", i.device, i.threads), i.total_steps)
            });
            let frames = (!self.opts.stable_display).then_some(&self.frames);
            panels::status::ui(ui, self.status, &device, step, total, thr, frames);
        });
        egui::Panel::left("launch")
            .resizable(true)
            .default_size(270.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    let backbone = self.info.as_ref().map(|i| i.backbone.clone());
                    let classes = self.info.as_ref().map_or(10, |i| i.classes.len());
                    actions.extend(panels::launch::ui(
                        ui,
                        &mut self.settings.config,
                        self.status,
                        backbone.as_ref(),
                        classes,
                        cuda_available(),
                    ));
                });
            });
        let moppa = self.info.as_ref().is_some_and(|i| !i.priors.is_empty());
        if moppa && self.settings.tab != Tab::Playground {
            egui::Panel::right("live")
                .resizable(true)
                .default_size(290.0)
                .show(ui, |ui| {
                    let snap = self.snapshot_for_controls().cloned();
                    let running = self.status == RunStatus::Running;
                    actions.extend(panels::live::ui(
                        ui,
                        &mut self.settings.controls,
                        snap.as_ref(),
                        running,
                    ));
                });
        }
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| match self.settings.tab {
                    Tab::Filters => {
                        let rank = self.info.as_ref().map_or(0, |i| i.rank);
                        let snaps: &[Snapshot] = self.runs.last().map_or(&[], |r| r.snapshots.as_slice());
                        if !moppa && self.info.is_some() {
                            ui.label(format!(
                                "This run is {}: the spectral views are for MoPPA runs.",
                                self.info.as_ref().map_or("", |i| i.method.as_str())
                            ));
                        }
                        actions.extend(panels::filters::ui(
                            ui,
                            &mut self.settings.filters,
                            snaps,
                            &mut self.scrub,
                            rank,
                            &mut self.textures,
                        ));
                    }
                    Tab::Router => {
                        let probes = self.info.as_ref().map_or(0, |i| i.probes);
                        if let Some(r) = self.runs.last() {
                            let idx = self.scrub.unwrap_or(usize::MAX);
                            let snap = r.snapshots.get(idx).or_else(|| r.snapshots.last());
                            actions.extend(panels::router::ui(
                                ui,
                                &mut self.settings.router,
                                r,
                                snap,
                                probes,
                                &mut self.textures,
                            ));
                        }
                    }
                    Tab::Curves => {
                        let (a, rects) = panels::curves::ui(ui, &mut self.settings.curves, &self.runs);
                        actions.extend(a);
                        self.plot_rects = rects;
                    }
                    Tab::Playground => {
                        actions.extend(panels::playground::ui(
                            ui,
                            &mut self.settings.playground,
                            &mut self.playground,
                            &mut self.textures,
                        ));
                    }
                });
        });
        self.error_modal(ui);
        actions
    }
}
