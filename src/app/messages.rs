//! What the app tells its user: errors and notes from runs, dialogs and files. The last three
//! show in the status bar; an error also opens a modal until dismissed. Counting the errors
//! raised lets a lesson wait for one.

use super::panels::Action;
use crate::train::protocol::Notice;

/// A message shown to the user.
#[derive(Clone, Debug)]
pub struct Shown {
    /// An error (red, and a modal) rather than a note.
    pub error: bool,
    /// What, where and when.
    pub notice: Notice,
}

/// The messages shown, and how many errors were raised.
#[derive(Debug, Default)]
pub struct Messages {
    shown: Vec<Shown>,
    raised: usize,
}

impl Messages {
    /// Shows an error of the app's own (a file, a dialog, a refused command).
    pub fn error(&mut self, message: String) {
        self.push(own(message), true);
    }

    /// Shows a note of the app's own (not an error).
    pub fn info(&mut self, message: String) {
        self.push(own(message), false);
    }

    /// Shows a run's notice; an error counts as raised.
    pub fn push(&mut self, notice: Notice, error: bool) {
        self.raised += usize::from(error);
        self.shown.push(Shown { error, notice });
    }

    /// Shows a recorded error of a run opened from its folder: history, not news (no modal, not
    /// counted).
    pub fn note(&mut self, notice: Notice) {
        self.shown.push(Shown { error: false, notice });
    }

    /// Errors raised since the app started.
    #[must_use]
    pub fn raised(&self) -> usize {
        self.raised
    }

    /// Removes message `i` (as listed by [`Self::bar`]).
    pub fn dismiss(&mut self, i: usize) {
        if i < self.shown.len() {
            self.shown.remove(i);
        }
    }

    /// Removes every error (a lesson that breaks a run on purpose).
    pub fn dismiss_errors(&mut self) {
        self.shown.retain(|m| !m.error);
    }

    /// The status bar's lines: the last three messages, each with a dismiss button.
    pub fn bar(&self, ui: &mut egui::Ui) -> Vec<Action> {
        let mut actions = Vec::new();
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
                    actions.push(Action::Dismiss(i));
                }
            });
        }
        actions
    }

    /// The first error in a modal, until dismissed.
    pub fn modal(&self, ui: &mut egui::Ui) -> Vec<Action> {
        let Some(idx) = self.shown.iter().position(|m| m.error) else {
            return Vec::new();
        };
        let m = &self.shown[idx];
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
            vec![Action::Dismiss(idx)]
        } else {
            Vec::new()
        }
    }
}

/// A notice of the app's own (no step, no file).
fn own(message: String) -> Notice {
    Notice {
        step: 0,
        time_s: 0.0,
        message,
        path: None,
        line: None,
    }
}
