//! How a run's events change what the app shows of it: its status, history and messages.

use super::{RunsState, Source};
use crate::app::messages::Messages;
use crate::app::panels::RunStatus;
use crate::train::protocol::{Event, FinishReason, Notice};
use std::path::PathBuf;
use std::time::{Duration, Instant};

impl RunsState {
    /// Handles one event of run `i`.
    pub fn on_event(&mut self, i: usize, ev: Event, messages: &mut Messages) {
        let fetch_to = self.fetch_to.clone();
        let Some(run) = self.runs.get_mut(i) else { return };
        if matches!(run.source, Source::Remote(_)) {
            run.history.keep_row(&ev);
        }
        match ev {
            Event::Started(info) => {
                let resumed = run.history.info.is_some();
                run.status = match (&run.source, resumed) {
                    (Source::Local, _) if run.autostart => RunStatus::Running,
                    (Source::Local, _) => RunStatus::Ready,
                    _ => RunStatus::Running,
                };
                if info.start_step > 0 {
                    run.history.step = info.start_step;
                }
                if resumed {
                    run.history.resumes += 1;
                }
                run.history.config = serde_json::from_value(info.config.clone()).ok();
                run.history.setting = crate::app::groups::setting_key(&info.config);
                // A served run is named by its folder (its address is its source).
                if matches!(run.source, Source::Remote(_))
                    && let Some(name) = info.out.as_ref().and_then(|d| d.file_name())
                {
                    let watching = if run.control { "" } else { " (watching)" };
                    run.history.label = format!("{}{watching}", name.to_string_lossy());
                }
                run.history.info = Some(*info);
            }
            Event::Progress(p) => {
                if !matches!(run.status, RunStatus::Paused | RunStatus::Finished | RunStatus::Failed) {
                    run.status = RunStatus::Running;
                }
                run.history.on_progress(&p);
            }
            Event::Snapshot(s) => run.history.on_snapshot(*s),
            Event::Eval(e) => run.history.on_eval(&e),
            Event::Ablation(a) => {
                run.history.ablation_progress = None;
                run.history.ablation = Some(a);
            }
            Event::AblationProgress { done, total } => run.history.ablation_progress = Some((done, total)),
            Event::Applied(a) => {
                run.targets.applied(&a.command);
                run.history.applied.push(a);
            }
            Event::Paused { .. } => {
                run.status = RunStatus::Paused;
                run.history.paused_gap = true;
            }
            Event::Resumed { .. } => run.status = RunStatus::Running,
            Event::Warning(n) => {
                // A refused command is a warning: its target no longer waits.
                run.targets.clear();
                // So is a cancelled or failed ablation: its progress bar goes.
                if n.message.starts_with("ablation") {
                    run.history.ablation_progress = None;
                }
                messages.push(n, false);
            }
            Event::Error(n) | Event::Diverged(n) => {
                // A recorded run's old errors are part of its history, not news for a dialog.
                if matches!(run.source, Source::Folder(_)) {
                    messages.note(n);
                } else {
                    messages.push(n, true);
                }
            }
            Event::Finished(f) => {
                run.status = if f.reason == FinishReason::Failed {
                    RunStatus::Failed
                } else {
                    RunStatus::Finished
                };
                run.history.finished = Some(f.reason);
                run.history.time_s = run.history.time_s.max(f.time_s);
                // A test accuracy without its evaluation record: its loss and n unknown (0).
                if let Some(t) = f.test_acc
                    && run.history.test.is_empty()
                {
                    run.history.test.push([f.steps as f64, f.time_s, t, 0.0, 0.0]);
                }
            }
            Event::RunFile { name, base64 } => {
                let dir = fetch_to.unwrap_or_else(|| PathBuf::from("."));
                match crate::train::serve::server::save_fetched(&dir, &name, &base64) {
                    Ok(p) => messages.push(
                        Notice {
                            step: 0,
                            time_s: 0.0,
                            message: format!("fetched {}", p.display()),
                            path: Some(p),
                            line: None,
                        },
                        false,
                    ),
                    Err(e) => messages.error(format!("cannot save {name}: {e}")),
                }
            }
        }
    }

    /// The next event of run `i`; a run whose folder was replaced under its reader first drops
    /// what it showed (the events start over).
    pub(crate) fn next_event(&mut self, i: usize) -> Option<Event> {
        let run = self.runs.get_mut(i)?;
        let link = run.link.as_mut()?;
        if link.take_reset() {
            run.history = crate::app::history::RunHistory::new(run.history.label.clone());
            run.targets = crate::app::panels::live::Targets::default();
        }
        link.try_recv()
    }

    /// Drains every run's events for at most `budget` in all, so busy runs never stall the UI;
    /// whether events are left.
    pub(crate) fn drain(&mut self, budget: Duration, messages: &mut Messages) -> bool {
        let start = Instant::now();
        for i in 0..self.runs.len() {
            while let Some(ev) = self.next_event(i) {
                self.on_event(i, ev, messages);
                if start.elapsed() > budget {
                    return true;
                }
            }
        }
        false
    }

    /// Takes the answers of the adapter probes of runs opened from their folders.
    pub(crate) fn drain_probes(&mut self, messages: &mut Messages) {
        for run in &mut self.runs {
            let Some(probe) = &run.adapter_probe else { continue };
            while let Some(answer) = probe.try_answer() {
                match answer {
                    Ok(p) => {
                        // The recorded snapshot with the probe's fields replaced.
                        let mut snap = run.history.snapshots.last().cloned().unwrap_or_else(|| p.clone());
                        snap.probe = p.probe;
                        snap.probe_prediction = p.probe_prediction;
                        for b in &mut snap.blocks {
                            b.probe_alpha = p
                                .blocks
                                .iter()
                                .find(|q| q.block == b.block)
                                .map(|q| q.probe_alpha.clone())
                                .unwrap_or_default();
                        }
                        run.probed = Some(Box::new(snap));
                    }
                    Err(e) => messages.error(e),
                }
            }
        }
    }
}
