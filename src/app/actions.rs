//! What the app does for a panel's [`Action`]: run control, file dialogs and the file I/O behind
//! them (run settings, exports, the adapter, images). Panels only ask; this file acts.

use super::history::RunHistory;
use super::panels::{Action, RunStatus};
use super::{StudioApp, capture};
use crate::config::RunConfig;
use crate::train::protocol::Command;
use crate::train::record::{CSV_HEADER, RecordReader};
use crate::train::runfolder::METRICS_JSONL;

impl StudioApp {
    pub(super) fn apply(&mut self, action: Action, ctx: &egui::Context) {
        match action {
            Action::Start => {
                let control = self.sel().is_some_and(|r| r.control);
                // Settings changed since this app's run was launched: Start launches them.
                let changed = self.selected_is_local() && self.launched.as_ref() != Some(&self.settings.config);
                match self.status() {
                    RunStatus::Ready | RunStatus::Paused if control && !changed => {
                        self.send(Command::Start);
                        if let Some(r) = self.sel_mut() {
                            r.status = RunStatus::Running;
                        }
                    }
                    RunStatus::Running if control => {}
                    // Still setting up: it starts as soon as it is ready (a lesson's Start can
                    // come before the Start button is enabled).
                    RunStatus::None if control && !changed => {
                        self.send(Command::Start);
                        if let Some(r) = self.sel_mut() {
                            r.autostart = true;
                        }
                    }
                    _ => self.launch(true),
                }
            }
            Action::Select(i) => {
                if i < self.runs.len() {
                    self.selected = i;
                    self.scrub = None;
                }
            }
            Action::OpenRuns => {
                if let Some(dirs) = rfd::FileDialog::new().pick_folders() {
                    self.open_folders(&dirs);
                }
            }
            Action::OpenRun(d) => self.open_folder(&d),
            Action::Connect => {
                let (addr, token) = (self.connect.addr.trim().to_owned(), self.connect.token.clone());
                self.settings.last_server.clone_from(&addr);
                self.connect_to(&addr, &token);
            }
            Action::FetchRunFiles => {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.fetch_to = Some(dir);
                    self.send(Command::FetchRunFiles);
                }
            }
            Action::OpenLesson => {
                if let Some(path) = rfd::FileDialog::new().add_filter("lesson", &["toml"]).pick_file() {
                    if let Some(i) = self.lessons.add_file(&path) {
                        let lesson = self.lessons.lessons[i].clone();
                        self.start_lesson(lesson);
                    } else if let Some(e) = self.lessons.errors.last().cloned() {
                        self.show_error(e);
                    }
                }
            }
            Action::Pause => self.send(Command::Pause),
            Action::Step => self.send(Command::Step),
            Action::Stop => self.send(Command::Stop),
            Action::Reset => self.launch(false),
            // A run opened from its folder: back to its recorded probe.
            Action::Send(Command::SetProbe { .. }) if self.sel().is_some_and(|r| !r.control) => {
                if let Some(r) = self.runs.get_mut(self.selected) {
                    r.probed = None;
                }
            }
            Action::Send(c) => self.send(c),
            Action::PickBackbone => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file()
                {
                    self.settings.config.backbone = p.display().to_string();
                }
            }
            Action::DownloadBackbone(spec) => {
                let spec = if spec.starts_with("hf:") {
                    spec
                } else {
                    format!("hf:{spec}")
                };
                self.picker.message = None;
                self.picker.start_download(spec, self.waker.clone());
            }
            Action::PickProbeImage => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("images", &["png", "jpg", "jpeg"])
                    .pick_file()
                {
                    self.probe_with(&p);
                }
            }
            Action::ProbeWith(p) => self.probe_with(&p),
            Action::PickData => {
                if let Some(p) = rfd::FileDialog::new().pick_folder() {
                    self.settings.config.data = p.display().to_string();
                }
            }
            Action::LoadConfig => {
                if let Some(p) = rfd::FileDialog::new().add_filter("TOML", &["toml"]).pick_file() {
                    match std::fs::read_to_string(&p)
                        .map_err(|e| e.to_string())
                        .and_then(|t| RunConfig::from_toml(&t))
                    {
                        Ok(c) => self.settings.config = c,
                        Err(e) => self.show_error(format!("{}: {e}", p.display())),
                    }
                }
            }
            Action::SaveConfig => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("TOML", &["toml"])
                    .set_file_name("run.toml")
                    .save_file()
                {
                    let r = self
                        .settings
                        .config
                        .to_toml()
                        .and_then(|t| std::fs::write(&p, t).map_err(|e| e.to_string()));
                    if let Err(e) = r {
                        self.show_error(format!("{}: {e}", p.display()));
                    }
                }
            }
            Action::ExportCsv => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("CSV", &["csv"])
                    .set_file_name(crate::train::runfolder::METRICS_CSV)
                    .save_file()
                {
                    let csv = self
                        .sel()
                        .map_or_else(|| Err("no run is selected".to_owned()), |r| metrics_csv(&r.history));
                    match csv {
                        Ok(csv) => {
                            if let Err(e) = std::fs::write(&p, csv) {
                                self.show_error(format!("{}: {e}", p.display()));
                            }
                        }
                        Err(e) => self.show_error(format!("Export CSV: {e}")),
                    }
                }
            }
            Action::ExportPlot(id) => {
                let rect = self.plot_rects.iter().find(|(n, _)| *n == id).map(|(_, r)| *r);
                if let (Some(rect), Some(p)) = (
                    rect,
                    rfd::FileDialog::new()
                        .add_filter("PNG", &["png"])
                        .set_file_name(format!("{id}.png"))
                        .save_file(),
                ) {
                    capture::screenshot(ctx, p, Some(rect), self.capture_errors.clone());
                }
            }
            Action::Screenshot => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("PNG", &["png"])
                    .set_file_name("moppa-studio.png")
                    .save_file()
                {
                    capture::screenshot(ctx, p, None, self.capture_errors.clone());
                }
            }
            Action::SaveAdapter => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("safetensors", &["safetensors"])
                    .set_file_name(crate::train::runfolder::ADAPTER)
                    .save_file()
                {
                    self.send(Command::SaveCheckpoint { path: p });
                }
            }
            Action::PickImage => {
                if let Some(p) = rfd::FileDialog::new()
                    .add_filter("images", &["png", "jpg", "jpeg"])
                    .pick_file()
                {
                    match image::open(&p) {
                        Ok(img) => {
                            self.playground.set_image(img);
                            self.settings.playground.image = Some(p);
                        }
                        Err(e) => self.show_error(format!("{}: {e}", p.display())),
                    }
                }
            }
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
