//! What the app does for a panel's [`Action`], by concern: run control, the app's own state, file
//! dialogs, and the file work behind them (run settings, exports, images, lessons). Panels only
//! ask; this file acts.

use super::history::RunHistory;
use super::panels::{Action, RunStatus};
use super::{OpenRun, StudioApp};
use crate::config::RunConfig;
use crate::train::protocol::Command;
use crate::train::record::{CSV_HEADER, RecordReader};
use crate::train::runfolder::METRICS_JSONL;
use std::path::{Path, PathBuf};

impl StudioApp {
    /// Applies what a panel asked for, by concern: the runs, the app's own state, or a file
    /// dialog and the file work behind it.
    pub(super) fn apply(&mut self, action: Action, ctx: &egui::Context) {
        match action {
            Action::Start
            | Action::Pause
            | Action::Step
            | Action::Stop
            | Action::Reset
            | Action::NewRunFrom
            | Action::Show(..)
            | Action::Pin(_)
            | Action::Select(_)
            | Action::Send(_)
            | Action::OpenRun(_)
            | Action::Connect
            | Action::ProbeWith(_)
            | Action::DownloadBackbone(_) => self.run_control(action),
            Action::Ablate(_) | Action::CancelAblation | Action::ProbeVal(_) => self.diagnose_action(&action),
            Action::StartLesson(_)
            | Action::OpenConnect
            | Action::CloseConnect
            | Action::SetDark(_)
            | Action::Dismiss(_) => self.app_state(&action, ctx),
            _ => self.dialog(&action),
        }
    }

    /// Run control: start, pause, step, stop, reset, which run is shown, commands, opening and
    /// connecting runs, probing.
    fn run_control(&mut self, action: Action) {
        match action {
            Action::Start => {
                let control = self.runs.controls_selected();
                // Settings changed since this app's run was launched: Start launches them.
                let changed = self.runs.selected_is_local() && self.launch.changed(&self.settings.config);
                match self.status() {
                    RunStatus::Ready | RunStatus::Paused if control && !changed => {
                        self.send(Command::Start);
                        if let Some(r) = self.runs.sel_mut() {
                            r.status = RunStatus::Running;
                        }
                    }
                    RunStatus::Running if control => {}
                    // Still setting up: it starts as soon as it is ready (a lesson's Start can
                    // come before the Start button is enabled).
                    RunStatus::None if control && !changed => {
                        self.send(Command::Start);
                        if let Some(r) = self.runs.sel_mut() {
                            r.autostart = true;
                        }
                    }
                    _ => self.launch_run(true),
                }
            }
            Action::Pause => self.send(Command::Pause),
            Action::Step => self.send(Command::Step),
            Action::Stop => {
                self.send(Command::Stop);
                if let Some(r) = self.runs.sel_mut() {
                    r.history.stopping = true;
                }
            }
            // A fresh run with the settings of the run shown once it has trained (they are what
            // it ran with), else the launch settings being edited.
            Action::Reset | Action::NewRunFrom => {
                if let Some(cfg) = self
                    .sel()
                    .filter(|r| !r.editable())
                    .and_then(OpenRun::settings_for_new_run)
                {
                    self.settings.config = cfg;
                }
                self.launch_run(false);
            }
            Action::Select(i) => self.runs.select(i),
            Action::Show(which, shown) => self.runs.set_shown(&which, shown),
            Action::Pin(i) => self.runs.baseline = i,
            // A run opened from its folder: back to its recorded probe.
            Action::Send(Command::SetProbe { .. }) if !self.runs.controls_selected() => {
                if let Some(r) = self.runs.sel_mut() {
                    r.probed = None;
                }
            }
            Action::Send(c) => self.send(c),
            Action::OpenRun(d) => self.open_folder(&d),
            Action::Connect => {
                let c = &self.dialogs.connect;
                let (addr, token) = (c.addr.trim().to_owned(), c.token.clone());
                self.settings.last_server.clone_from(&addr);
                self.connect_to(&addr, &token);
            }
            Action::ProbeWith(p) => self.probe_with(&p),
            Action::DownloadBackbone(spec) => {
                let spec = if spec.starts_with("hf:") {
                    spec
                } else {
                    format!("hf:{spec}")
                };
                self.picker.message = None;
                self.picker.start_download(spec, self.launch.waker());
            }
            _ => {}
        }
    }

    /// The app's own state: lessons, the Connect… dialog, the theme, messages.
    fn app_state(&mut self, action: &Action, ctx: &egui::Context) {
        match *action {
            Action::StartLesson(i) => {
                if let Some(lesson) = self.lessons.lessons.get(i).cloned() {
                    self.start_lesson(lesson);
                }
            }
            Action::OpenConnect => {
                let c = &mut self.dialogs.connect;
                c.open = true;
                if c.addr.is_empty() {
                    c.addr.clone_from(&self.settings.last_server);
                }
            }
            Action::CloseConnect => self.dialogs.connect.open = false,
            Action::SetDark(dark) => {
                self.settings.dark = dark;
                ctx.set_theme(if dark { egui::Theme::Dark } else { egui::Theme::Light });
            }
            Action::Dismiss(i) => self.messages.dismiss(i),
            _ => {}
        }
    }

    /// Opens the file dialog an action asks for, on a thread of its own; its answer comes back
    /// to [`Self::file_answers`].
    fn dialog(&mut self, action: &Action) {
        use super::dialogs::{FileRequest, Pick};
        let images: &'static [&'static str] = &["png", "jpg", "jpeg"];
        let request = match action {
            Action::OpenRuns => FileRequest::new(Pick::Folders),
            Action::FetchRunFiles | Action::PickData => FileRequest::new(Pick::Folder),
            Action::OpenLesson => FileRequest::new(Pick::File).filter("lesson", &["toml"]),
            Action::PickBackbone => FileRequest::new(Pick::File).filter("safetensors", &["safetensors"]),
            Action::PickProbeImage | Action::PickImage => FileRequest::new(Pick::File).filter("images", images),
            Action::LoadConfig => FileRequest::new(Pick::File).filter("TOML", &["toml"]),
            Action::SaveConfig => FileRequest::new(Pick::Save).filter("TOML", &["toml"]).named("run.toml"),
            Action::ExportCsv => FileRequest::new(Pick::Save)
                .filter("CSV", &["csv"])
                .named(crate::train::runfolder::METRICS_CSV),
            Action::ExportPlot(id) => FileRequest::new(Pick::Save)
                .filter("PNG", &["png"])
                .named(format!("{id}.png")),
            Action::Screenshot => FileRequest::new(Pick::Save)
                .filter("PNG", &["png"])
                .named("moppa-studio.png"),
            Action::SaveAdapter => FileRequest::new(Pick::Save)
                .filter("safetensors", &["safetensors"])
                .named(crate::train::runfolder::ADAPTER),
            _ => return,
        };
        if !self.dialogs.native && !self.dialogs.told {
            self.dialogs.told = true;
            self.messages.note(crate::train::protocol::Notice {
                step: 0,
                time_s: 0.0,
                message:
                    "no file dialog can open on this desktop (neither xdg-desktop-portal nor zenity): type the path"
                        .into(),
                path: None,
                line: None,
            });
        }
        if !self.dialogs.ask(action.clone(), request, self.launch.waker()) {
            self.messages
                .error("a file dialog is open already (or none could be started)".into());
        }
    }

    /// What the file dialog in flight answered: the work it was opened for, or why nothing
    /// happens.
    pub(super) fn file_answers(&mut self, ctx: &egui::Context) {
        use super::dialogs::Answer;
        match self.dialogs.answer() {
            Some(Answer::Chosen(action, paths)) => self.file_work(&action, &paths, ctx),
            // No native dialog opens here after all: the typed path from now on.
            Some(Answer::NeverOpened(action)) => {
                self.dialogs.native = false;
                self.dialog(&action);
            }
            Some(Answer::Cancelled) | None => {}
        }
    }

    /// The work a file dialog was opened for, with the paths chosen (at least one).
    fn file_work(&mut self, action: &Action, paths: &[PathBuf], ctx: &egui::Context) {
        let Some(p) = paths.first().cloned() else { return };
        match *action {
            Action::OpenRuns => self.open_folders(paths),
            Action::FetchRunFiles => {
                self.runs.fetch_into(p);
                self.send(Command::FetchRunFiles);
            }
            Action::OpenLesson => self.open_lesson(&p),
            Action::PickBackbone => self.settings.config.backbone = p.display().to_string(),
            Action::PickProbeImage => self.probe_with(&p),
            Action::PickData => self.settings.config.data = p.display().to_string(),
            Action::LoadConfig => self.load_config(&p),
            Action::SaveConfig => self.save_config(&p),
            Action::ExportCsv => self.export_csv(&p),
            Action::ExportPlot(id) => self.frame.capture(ctx, p, Some(id)),
            Action::Screenshot => self.frame.capture(ctx, p, None),
            Action::SaveAdapter => self.send(Command::SaveCheckpoint { path: p }),
            Action::PickImage => self.open_playground_image(&p),
            _ => {}
        }
    }

    // The file work behind the dialogs: each names the file in its error.

    /// Plays a teacher's lesson file (or says why it cannot be read).
    fn open_lesson(&mut self, path: &Path) {
        if let Some(i) = self.lessons.add_file(path) {
            let lesson = self.lessons.lessons[i].clone();
            self.start_lesson(lesson);
        } else if let Some(e) = self.lessons.errors.last().cloned() {
            self.messages.error(e);
        }
    }

    /// Loads run settings from a TOML file.
    fn load_config(&mut self, path: &Path) {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| RunConfig::from_toml(&t))
        {
            Ok(c) => self.settings.config = c,
            Err(e) => self.messages.error(format!("{}: {e}", path.display())),
        }
    }

    /// Saves the run settings as TOML.
    fn save_config(&mut self, path: &Path) {
        let written = self
            .settings
            .config
            .to_toml()
            .and_then(|t| std::fs::write(path, t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            self.messages.error(format!("{}: {e}", path.display()));
        }
    }

    /// Writes the selected run's metrics as CSV ([`metrics_csv`]).
    fn export_csv(&mut self, path: &Path) {
        let csv = self
            .sel()
            .map_or_else(|| Err("no run is selected".to_owned()), |r| metrics_csv(&r.history));
        match csv {
            Ok(csv) => {
                if let Err(e) = std::fs::write(path, csv) {
                    self.messages.error(format!("{}: {e}", path.display()));
                }
            }
            Err(e) => self.messages.error(format!("Export CSV: {e}")),
        }
    }

    /// Opens an image in the playground.
    fn open_playground_image(&mut self, path: &Path) {
        match image::open(path) {
            Ok(img) => {
                self.playground.set_image(img);
                self.settings.playground.image = Some(path.to_owned());
            }
            Err(e) => self.messages.error(format!("{}: {e}", path.display())),
        }
    }
}

/// A run's metrics in the run folder's CSV layout, from its records: every step of the run
/// folder's `metrics.jsonl` when it is on this machine (the same rows as `metrics.csv`, coalesced
/// display updates included), else every progress and evaluation this app received (a served
/// run), else why there is nothing.
pub fn metrics_csv(r: &RunHistory) -> Result<String, String> {
    use std::fmt::Write as _;
    let mut s = format!("{CSV_HEADER}\n");
    let folder = r.info.as_ref().and_then(|i| i.out.clone());
    let log = folder.as_ref().map(|d| d.join(METRICS_JSONL)).filter(|p| p.is_file());
    if let Some(path) = log {
        let reader = RecordReader::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for row in reader.filter_map(|rec| rec.csv_row()) {
            let _ = writeln!(s, "{row}");
        }
    } else if r.csv_rows.is_empty() {
        return Err(match folder {
            Some(d) => format!(
                "{}: not on this machine, and no step was received yet: nothing to export",
                d.display()
            ),
            None => "this run has recorded no step yet: nothing to export".into(),
        });
    } else {
        for row in &r.csv_rows {
            let _ = writeln!(s, "{row}");
        }
    }
    Ok(s)
}
