//! The window's layout: the top bar (File menu, tabs, the run the views show, run control,
//! export), the status bar with messages, the launch panel, the live controls, the central view
//! of the chosen tab, and the dialogs (errors, Connect…).

use super::panels::{self, Action, RunStatus};
use super::state::Tab;
use super::{OpenRun, Source, StudioApp};
use crate::train::backbone::cuda_available;
use crate::train::replay::Liveness;

/// A run's state in words, for the status bar and the runs table.
#[must_use]
pub fn run_state(r: &OpenRun) -> String {
    let resumed = if r.history.resumes > 0 {
        format!(" (resumed ×{})", r.history.resumes)
    } else {
        String::new()
    };
    let state = match (&r.source, r.liveness()) {
        (Source::Folder(_), Some(Liveness::Crashed)) => "crashed (no record for 30 s)".to_owned(),
        (Source::Folder(_), Some(Liveness::Finished(f))) => format!("finished ({})", reason(f)),
        (_, _) if r.history.testing() && r.status != RunStatus::Failed => {
            let n = r.info().map_or(0, |i| i.split_sizes[2]);
            format!("testing: the final model on {n} test images…")
        }
        (Source::Folder(_), _) if r.history.info.is_some() => "being written (followed)".to_owned(),
        (_, _) => match (r.status, r.history.finished) {
            (RunStatus::Finished | RunStatus::Failed, Some(f)) => format!("finished ({})", reason(f)),
            (s, _) => s.label().to_owned(),
        },
    };
    format!("{state}{resumed}")
}

fn reason(f: crate::train::protocol::FinishReason) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl StudioApp {
    pub(super) fn top_bar(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        ui.horizontal(|ui| {
            ui.heading("MoPPA Studio");
            ui.menu_button("File", |ui| {
                if ui
                    .button("Open run…")
                    .on_hover_text("One or more run folders")
                    .clicked()
                {
                    actions.push(Action::OpenRuns);
                }
                ui.menu_button("Recent runs", |ui| {
                    // Folders since deleted (or runs never started) are not offered.
                    let recent: Vec<_> = self
                        .settings
                        .recent_runs
                        .iter()
                        .filter(|d| crate::train::runfolder::is_run_folder(d))
                        .cloned()
                        .collect();
                    if recent.is_empty() {
                        ui.label("none yet");
                    }
                    for d in recent {
                        if ui.button(d.display().to_string()).clicked() {
                            actions.push(Action::OpenRun(d));
                        }
                    }
                });
                if ui
                    .button("Connect…")
                    .on_hover_text("A run served by moppa train --serve")
                    .clicked()
                {
                    actions.push(Action::OpenConnect);
                }
                let remote = self
                    .sel()
                    .is_some_and(|r| matches!(r.source, Source::Remote(_)) && r.control);
                if ui
                    .add_enabled(remote, egui::Button::new("Fetch the run's adapter and config…"))
                    .clicked()
                {
                    actions.push(Action::FetchRunFiles);
                }
            });
            ui.menu_button("Lessons", |ui| actions.extend(self.lessons_menu(ui)));
            ui.separator();
            self.frame.view_rects.tabs.clear();
            for t in Tab::ALL {
                let r = ui.selectable_value(&mut self.settings.tab, t, t.label());
                self.frame.view_rects.tabs.push((t, r.rect));
            }
            ui.separator();
            if self.runs.len() > 1 {
                let current = self.sel().map_or_else(String::new, |r| r.history.label.clone());
                egui::ComboBox::from_id_salt("run-shown")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for (i, r) in self.runs.all().iter().enumerate() {
                            if ui
                                .selectable_label(i == self.runs.selected(), &r.history.label)
                                .clicked()
                            {
                                actions.push(Action::Select(i));
                            }
                        }
                    })
                    .response
                    .on_hover_text("The run the filter, router and live views show");
                ui.separator();
            }
            let s = self.status();
            let control = self.sel().is_some_and(|r| r.control);
            let local = self.runs.selected_is_local();
            // A run that cannot be steered from here (a folder, a watch-only connection): Start
            // launches a new run of this app's.
            let can_start = !(control && matches!(s, RunStatus::Running | RunStatus::None));
            if ui
                .add_enabled(
                    can_start,
                    egui::Button::new(if s == RunStatus::Paused && control {
                        "Resume"
                    } else {
                        "Start"
                    }),
                )
                .on_hover_text("Space toggles pause")
                .clicked()
            {
                actions.push(Action::Start);
            }
            if ui
                .add_enabled(control && s == RunStatus::Running, egui::Button::new("Pause"))
                .clicked()
            {
                actions.push(Action::Pause);
            }
            if ui
                .add_enabled(
                    control && matches!(s, RunStatus::Ready | RunStatus::Paused),
                    egui::Button::new("Step"),
                )
                .on_hover_text("One optimizer step")
                .clicked()
            {
                actions.push(Action::Step);
            }
            if ui
                .add_enabled(
                    control && matches!(s, RunStatus::Running | RunStatus::Paused | RunStatus::Ready),
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
                    .add_enabled(control && local, egui::Button::new("Adapter checkpoint…"))
                    .clicked()
                {
                    actions.push(Action::SaveAdapter);
                }
            });
            let mut dark = self.settings.dark;
            if ui.checkbox(&mut dark, "dark").changed() {
                actions.push(Action::SetDark(dark));
            }
        });
        actions
    }

    /// Buttons selecting the MoPPA runs among those open (when the selected run is not one).
    fn moppa_run_buttons(&self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        let moppa: Vec<(usize, &str)> = self
            .runs
            .all()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.info().is_some_and(|i| !i.priors.is_empty()))
            .map(|(i, r)| (i, r.history.label.as_str()))
            .collect();
        if !moppa.is_empty() {
            ui.horizontal_wrapped(|ui| {
                ui.label("Show a MoPPA run:");
                for (i, label) in moppa {
                    if ui.button(label).clicked() {
                        actions.push(Action::Select(i));
                    }
                }
            });
        }
        actions
    }

    fn connect_dialog(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.dialogs.connect.open {
            return actions;
        }
        let r = egui::Modal::new(egui::Id::unique("connect-modal")).show(ui.ctx(), |ui| {
            ui.heading("Connect to a served run");
            ui.label("moppa train --serve prints the address and the token. Through an SSH tunnel: localhost:PORT.");
            egui::Grid::new("connect-grid").num_columns(2).show(ui, |ui| {
                ui.label("host:port");
                ui.text_edit_singleline(&mut self.dialogs.connect.addr);
                ui.end_row();
                ui.label("token");
                ui.add(egui::TextEdit::singleline(&mut self.dialogs.connect.token).password(true))
                    .on_hover_text("Empty: watch only (the server must allow it)");
                ui.end_row();
            });
            ui.horizontal(|ui| {
                if ui.button("Connect").clicked() {
                    actions.push(Action::Connect);
                }
                ui.button("Cancel").clicked()
            })
            .inner
        });
        if r.inner || r.should_close() {
            actions.push(Action::CloseConnect);
        }
        actions
    }

    /// The typed-path form (where no native file dialog opens): a path field, the folder's
    /// entries that complete it, the recent runs for a run folder; Enter or OK answers.
    fn typed_path_dialog(&mut self, ui: &mut egui::Ui) {
        if self.dialogs.typed.is_none() {
            return;
        }
        let recent: Vec<String> = self
            .settings
            .recent_runs
            .iter()
            .filter(|d| crate::train::runfolder::is_run_folder(d))
            .map(|d| d.display().to_string())
            .collect();
        let Some(form) = &mut self.dialogs.typed else { return };
        let mut answer = None;
        let r = egui::Modal::new(egui::Id::unique("typed-path-modal")).show(ui.ctx(), |ui| {
            ui.set_min_width(520.0);
            ui.heading(&form.title);
            let edit = ui.add(
                egui::TextEdit::singleline(&mut form.text)
                    .hint_text("a path (~ for your home folder)")
                    .desired_width(f32::INFINITY),
            );
            edit.request_focus();
            if edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                answer = Some(true);
            }
            let completions = form.completions(12).to_vec();
            if !completions.is_empty() {
                ui.label(egui::RichText::new("in this folder").small());
                egui::ScrollArea::vertical()
                    .max_height(180.0)
                    .id_salt("completions")
                    .show(ui, |ui| {
                        for c in completions {
                            if ui
                                .selectable_label(false, egui::RichText::new(&c).monospace())
                                .clicked()
                            {
                                form.text = c;
                            }
                        }
                    });
            }
            if matches!(form.pick, super::dialogs::Pick::Folders | super::dialogs::Pick::Folder) && !recent.is_empty() {
                ui.label(egui::RichText::new("recent runs").small());
                for d in &recent {
                    if ui.selectable_label(false, egui::RichText::new(d).monospace()).clicked() {
                        form.text.clone_from(d);
                    }
                }
            }
            ui.horizontal(|ui| {
                if ui.button("OK").clicked() {
                    answer = Some(true);
                }
                if ui.button("Cancel").clicked() {
                    answer = Some(false);
                }
            });
        });
        if r.should_close() && answer.is_none() {
            answer = Some(false);
        }
        if let Some(ok) = answer {
            self.dialogs.answer_typed(ok);
            ui.ctx().request_repaint();
        }
    }

    /// Draws every panel; returns what they asked for.
    pub(super) fn layout(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        if self.runs.any_following() {
            // Runs written elsewhere: look for their new records.
            ui.ctx().request_repaint_after(super::link::FOLLOW_EVERY);
        }
        let mut actions = Vec::new();
        let control = self.sel().is_some_and(|r| r.control);
        if control
            && !ui.ctx().egui_wants_keyboard_input()
            && ui.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Space))
        {
            match self.status() {
                RunStatus::Running => actions.push(Action::Pause),
                RunStatus::Paused | RunStatus::Ready => actions.push(Action::Start),
                _ => {}
            }
        }
        egui::Panel::top("top").show(ui, |ui| actions.extend(self.top_bar(ui)));
        egui::Panel::bottom("status").show(ui, |ui| {
            actions.extend(self.messages.bar(ui));
            let (step, thr) = self.sel().map_or((0, 0.0), |r| (r.history.step, r.history.throughput));
            let (device, total) = self.info().map_or(("-".to_owned(), 0), |i| {
                let plural = if i.threads == 1 { "" } else { "s" };
                (format!("{} · {} thread{plural}", i.device, i.threads), i.total_steps)
            });
            let state = self.sel().map_or_else(
                || "no run".to_owned(),
                |r| format!("{} · {}", r.history.label, run_state(r)),
            );
            let frames = (!self.opts.stable_display).then_some(&self.frame.times);
            panels::status::ui(ui, &state, &device, step, total, thr, frames);
        });
        if self.lesson.is_some() {
            egui::Panel::bottom("lesson")
                .frame(egui::Frame::side_top_panel(ui.style()).inner_margin(10.0))
                .show(ui, |ui| actions.extend(self.lesson_panel(ui)));
        }
        egui::Panel::left("launch")
            .resizable(true)
            .default_size(270.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    // The selected run's settings: editable until it trains, then read-only.
                    if let Some(r) = self.runs.sel().filter(|r| !r.editable()) {
                        let config = r.info().map_or(&serde_json::Value::Null, |i| &i.config);
                        actions.extend(panels::launch::summary(
                            ui,
                            &r.history.label,
                            config,
                            r.history.config.is_some(),
                        ));
                        return;
                    }
                    let backbone = self.info().map(|i| i.backbone.clone());
                    let classes = self.info().map_or(10, |i| i.classes.len());
                    let local_status = self.runs.local_status();
                    actions.extend(panels::launch::ui(
                        ui,
                        &mut self.settings.config,
                        local_status,
                        backbone.as_ref(),
                        &mut self.picker,
                        classes,
                        cuda_available(),
                    ));
                });
            });
        let moppa = self.info().is_some_and(|i| !i.priors.is_empty());
        self.frame.view_rects.live = None;
        if moppa && control && !matches!(self.settings.tab, Tab::Playground | Tab::Runs) {
            let r = egui::Panel::right("live")
                .resizable(true)
                .default_size(290.0)
                .show(ui, |ui| {
                    let running = self.status() == RunStatus::Running;
                    let block = self.settings.controls.block;
                    if let Some(r) = self.runs.sel() {
                        let live = panels::live::LiveRun {
                            snapshot: r.history.snapshots.last(),
                            values: r.history.values(block),
                            targets: &r.targets,
                            running,
                        };
                        actions.extend(self.settings.controls.ui(ui, &live));
                    }
                });
            self.frame.view_rects.live = Some(r.response.rect);
        }
        let central = egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| match self.settings.tab {
                    Tab::Filters => {
                        let rank = self.info().map_or(0, |i| i.rank);
                        if !moppa && let Some(i) = self.info() {
                            ui.label(format!(
                                "This run is {}: the spectral views are for MoPPA runs.",
                                i.method
                            ));
                            actions.extend(self.moppa_run_buttons(ui));
                        }
                        let mut no_cache = panels::filters::FilterCache::default();
                        let (run, scrub) = self.runs.shown_mut();
                        let shown = match run {
                            Some(r) => (r.history.snapshots.as_slice(), &mut r.history.filter_cache),
                            None => (&[][..], &mut no_cache),
                        };
                        actions.extend(self.settings.filters.ui(
                            ui,
                            shown,
                            scrub,
                            rank,
                            &mut self.textures,
                        ));
                    }
                    Tab::Router => {
                        // A row choosing the view: routing, or one of the diagnostics.
                        if !self.settings.diagnose.selector(ui) {
                            actions.extend(self.diagnose_view(ui));
                            return;
                        }
                        let probes = self.info().map_or(0, |i| i.probes);
                        if !moppa && self.info().is_some() {
                            actions.extend(self.moppa_run_buttons(ui));
                        }
                        if let Some(r) = self.runs.sel() {
                            let scrub = self.runs.scrub;
                            let idx = scrub.unwrap_or(usize::MAX);
                            let snap = match (&r.probed, scrub) {
                                (Some(p), None) => Some(p.as_ref()),
                                _ => r.history.snapshots.get(idx).or_else(|| r.history.snapshots.last()),
                            };
                            let can_probe = r.control
                                || matches!(&r.source, Source::Folder(d) if d.join(crate::train::runfolder::ADAPTER).is_file());
                            actions.extend(self.settings.router.ui(
                                ui,
                                &r.history,
                                snap,
                                &panels::router::Probing {
                                    probes: if r.control { probes } else { 0 },
                                    can_probe,
                                    classes: r.history.info.as_ref().map_or(&[][..], |i| i.classes.as_slice()),
                                    others: self
                                        .runs
                                        .all()
                                        .iter()
                                        .enumerate()
                                        .filter(|(i, o)| {
                                            *i != self.runs.selected()
                                                && o.shown
                                                && o.info().is_some_and(|i| !i.priors.is_empty())
                                        })
                                        .map(|(i, o)| (o.history.label.as_str(), panels::curves::run_color(i), &o.history))
                                        .collect(),
                                },
                                &mut self.textures,
                            ));
                        }
                    }
                    Tab::Curves => {
                        let runs: Vec<panels::curves::CurveRun<'_>> = self
                            .runs
                            .all()
                            .iter()
                            .map(|r| panels::curves::CurveRun {
                                history: &r.history,
                                shown: r.shown,
                                setting: r.history.setting.as_deref(),
                            })
                            .collect();
                        let (a, rects, drawn) =
                            self.settings
                                .curves
                                .ui(ui, &runs, self.runs.selected(), self.runs.baseline);
                        actions.extend(a);
                        self.frame.plot_rects = rects;
                        self.frame.curves_drawn = drawn;
                    }
                    Tab::Runs => {
                        actions.extend(panels::runs::ui(
                            ui,
                            self.runs.all(),
                            self.runs.selected(),
                            &mut self.settings.runs_table,
                        ));
                    }
                    Tab::Playground => {
                        actions.extend(self.playground.ui(
                            ui,
                            &mut self.settings.playground,
                            &mut self.textures,
                        ));
                    }
                });
        });
        self.frame.view_rects.central = Some(central.response.rect);
        self.lesson_highlight(ui.ctx());
        actions.extend(self.connect_dialog(ui));
        self.typed_path_dialog(ui);
        actions.extend(self.messages.modal(ui));
        actions
    }

    /// The Lessons menu: every lesson found (with its summary), the files that could not be read,
    /// and a teacher's file.
    fn lessons_menu(&self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        for (i, l) in self.lessons.lessons.iter().enumerate() {
            if ui.button(&l.title).on_hover_text(&l.summary).clicked() {
                actions.push(Action::StartLesson(i));
            }
        }
        for e in &self.lessons.errors {
            ui.colored_label(egui::Color32::from_rgb(230, 90, 90), e);
        }
        ui.separator();
        if ui
            .button("Open a lesson file…")
            .on_hover_text("A lesson written as TOML (README: Lessons)")
            .clicked()
        {
            actions.push(Action::OpenLesson);
        }
        actions
    }
}
