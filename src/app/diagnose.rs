//! The app's side of the router diagnostics: which way an ablation runs for the run shown (its
//! worker, through the run's command path, or here on its saved adapter on a thread of its own),
//! validation images made the probe, and the jobs polled every frame.

use super::jobs::{AblationJob, DataOf, ValImages, adapter_folder};
use super::panels::diagnose::{DiagRun, DiagView};
use super::panels::{Action, RunStatus};
use super::{OpenRun, Source, StudioApp};
use crate::train::protocol::Command;
use std::path::PathBuf;

/// How the run shown can be ablated or probed.
enum Way {
    /// Its worker takes commands.
    Worker,
    /// Its saved adapter is in this folder, on this machine.
    Adapter(PathBuf),
    /// Neither: why.
    No(String),
}

/// Whether `r`'s worker is there to take commands.
fn worker_alive(r: &OpenRun) -> bool {
    r.control && r.link.is_some() && !matches!(r.status, RunStatus::Finished | RunStatus::Failed)
}

/// The way to ablate or probe `r`.
fn way(r: &OpenRun) -> Way {
    if worker_alive(r) {
        return Way::Worker;
    }
    let dir = match &r.source {
        Source::Folder(d) => Some(d.clone()),
        _ => r.info().and_then(|i| i.out.clone()),
    };
    if let Some(d) = dir.as_deref().and_then(adapter_folder) {
        return Way::Adapter(d);
    }
    Way::No(match (&r.source, dir) {
        (Source::Remote(_), _) if !r.control => {
            "a run watched without its token takes no commands; open its folder to ablate its saved adapter".into()
        }
        (_, Some(d)) => format!("{} holds no adapter.safetensors (yet)", d.display()),
        (_, None) => "the run's worker is gone and its adapter is not on this machine".into(),
    })
}

impl StudioApp {
    /// The Router tab's views other than routing, for the run shown.
    pub(super) fn diagnose_view(&mut self, ui: &mut egui::Ui) -> Vec<Action> {
        let waker = self.launch.waker();
        let view = self.settings.diagnose.view;
        let scrub = self.runs.scrub;
        let Some(r) = self.runs.sel_mut() else {
            ui.label("No run is shown.");
            return Vec::new();
        };
        // The misclassified images' pixels, read once for the run.
        if view == DiagView::Accuracy
            && let (Some(v), Some(info)) = (&r.history.last_val, &r.history.info)
            && !v.misclassified.is_empty()
        {
            let of = || DataOf {
                dir: match &r.source {
                    Source::Folder(d) => Some(d.clone()),
                    _ => info.out.clone(),
                },
                config: r.history.config.clone(),
                backbone: info.backbone.clone(),
            };
            let images = r.jobs.images.get_or_insert_with(|| ValImages::spawn(of(), waker));
            images.want(v.misclassified.iter().map(|m| m.index as usize));
        }
        let r = &*r;
        let snap = match (&r.probed, scrub) {
            (Some(p), None) => Some(p.as_ref()),
            _ => scrub
                .and_then(|i| r.history.snapshots.get(i))
                .or_else(|| r.history.snapshots.last()),
        };
        let way = way(r);
        let run = DiagRun {
            history: &r.history,
            snap,
            classes: r.info().map_or(&[][..], |i| i.classes.as_slice()),
            ablate: match &way {
                Way::Worker => Ok("by the run's worker, between two steps"),
                Way::Adapter(_) => Ok("on the run's saved adapter, here, in the background (nothing is written)"),
                Way::No(why) => Err(why.clone()),
            },
            images: r.jobs.images.as_ref(),
            can_probe: !matches!(way, Way::No(_)),
        };
        let s = &mut self.settings.diagnose;
        match view {
            DiagView::Routing => Vec::new(),
            DiagView::Priors => s.ablation_ui(ui, &run),
            DiagView::Tokens => {
                s.tokens_ui(ui, &run, &mut self.textures, &mut self.hf_cache);
                Vec::new()
            }
            DiagView::Classes => {
                s.classes_ui(ui, &run);
                Vec::new()
            }
            DiagView::Accuracy => s.accuracy_ui(ui, &run, &mut self.textures),
        }
    }

    /// Ablates the run shown on `images` validation images: by its worker, else on its saved
    /// adapter here (the result is shown, never written into its folder).
    pub(super) fn ablate(&mut self, images: usize) {
        let waker = self.launch.waker();
        let Some(r) = self.runs.sel_mut() else { return };
        match way(r) {
            Way::Worker => {
                if self.runs.send(Command::Ablate { images }) {
                    if let Some(r) = self.runs.sel_mut() {
                        r.history.ablation_progress = Some((0, 0));
                    }
                } else {
                    self.messages.error(
                        "the run did not accept the ablation (its queue is full, or it is not steerable)".into(),
                    );
                }
            }
            Way::Adapter(dir) => match AblationJob::spawn(dir, images, waker) {
                Ok(job) => {
                    r.history.ablation_progress = Some((0, 0));
                    r.jobs.ablation = Some(job);
                }
                Err(e) => self.messages.error(e),
            },
            Way::No(why) => self.messages.error(format!("cannot ablate this run: {why}")),
        }
    }

    /// Stops the ablation in progress of the run shown.
    pub(super) fn cancel_ablation(&mut self) {
        let Some(r) = self.runs.sel_mut() else { return };
        r.history.ablation_progress = None;
        if let Some(job) = r.jobs.ablation.take() {
            job.cancel();
        } else if worker_alive(r) {
            self.send(Command::CancelAblation);
        }
    }

    /// Makes validation image `index` the router's probe: by the run's worker, else through its
    /// saved adapter (the image read from the run's data here).
    pub(super) fn probe_val(&mut self, index: usize) {
        let waker = self.launch.waker();
        let Some(r) = self.runs.sel_mut() else { return };
        let dir = match way(r) {
            Way::Worker => {
                self.settings.router.probe = index;
                r.probed = None;
                return self.send(Command::SetProbe { index });
            }
            Way::Adapter(dir) => dir,
            Way::No(why) => return self.messages.error(format!("cannot probe this run: {why}")),
        };
        let Some(image) = r.jobs.images.as_ref().and_then(|i| i.get(index)).map(|i| i.rgb.clone()) else {
            let why = r
                .jobs
                .images
                .as_ref()
                .and_then(|i| i.error.clone())
                .unwrap_or_else(|| "it is still being read".into());
            return self
                .messages
                .error(format!("validation image {index} cannot probe the run: {why}"));
        };
        let probe = r
            .adapter_probe
            .get_or_insert_with(|| crate::train::probe::AdapterProbe::spawn(&dir, waker));
        if !probe.request(super::panels::accuracy::val_probe_name(index), image) {
            self.messages
                .error("the run's adapter is still busy with earlier images".into());
        }
    }

    /// Takes what the runs' jobs did since the last frame: ablation progress and results, images.
    pub(super) fn poll_jobs(&mut self) {
        for r in self.runs.all_mut() {
            if let Some(images) = &mut r.jobs.images {
                images.poll();
            }
            let Some(job) = &r.jobs.ablation else { continue };
            let Some(result) = job.try_result() else {
                r.history.ablation_progress = Some(job.progress());
                continue;
            };
            r.jobs.ablation = None;
            r.history.ablation_progress = None;
            match result {
                Ok(a) => {
                    for w in a.warnings {
                        self.messages.info(w);
                    }
                    r.history.ablation = Some(Box::new(a.ablation));
                }
                Err(e) if e.ends_with("cancelled") => self.messages.info(e),
                Err(e) => self.messages.error(e),
            }
        }
    }

    /// Applies a diagnostics action.
    pub(super) fn diagnose_action(&mut self, action: &Action) {
        match *action {
            Action::Ablate(images) => self.ablate(images),
            Action::CancelAblation => self.cancel_ablation(),
            Action::ProbeVal(index) => self.probe_val(index),
            _ => {}
        }
    }
}
