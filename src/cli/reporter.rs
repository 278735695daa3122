//! Turns the engine's events into a progress bar on a terminal, or plain lines otherwise: the
//! CLI's one display of a run (fine-tuning, supervised and masked pretraining, compare).

use super::CliError;
use crate::train::protocol::{Event, FinishReason, Finished, Notice};
use crate::train::{StopFlag, WorkerHandle};
use crate::util::group_digits;
use crossbeam_channel::RecvTimeoutError;
use std::time::{Duration, Instant};

/// The CLI's display of a run.
pub struct Reporter {
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: u64,
    first_error: Option<String>,
}

/// A notice's message with its file (and line) when the message does not already name it.
fn with_location(n: &Notice) -> String {
    let where_ = match (&n.path, n.line) {
        (Some(p), Some(l)) if !n.message.contains(&p.display().to_string()) => format!(" ({}:{l})", p.display()),
        (Some(p), None) if !n.message.contains(&p.display().to_string()) => format!(" ({})", p.display()),
        _ => String::new(),
    };
    format!("{}{where_}", n.message)
}

impl Reporter {
    /// A display with a progress bar when `tty`, plain lines otherwise.
    #[must_use]
    pub fn new(tty: bool) -> Self {
        Self {
            tty,
            bar: None,
            total: 0,
            last_line: 0,
            first_error: None,
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// The first error of the run, with its file.
    #[must_use]
    pub fn first_error(&self) -> Option<&str> {
        self.first_error.as_deref()
    }

    /// Shows one event; returns the end of the run when it is `Finished`.
    pub fn show(&mut self, ev: &Event) -> Option<Finished> {
        match ev {
            Event::Started(info) => {
                self.total = info.total_steps;
                self.say(format!(
                    "{} · {} trainable · {} ({} threads) · {} classes · {}/{}/{} train/val/test images · {} steps",
                    info.method,
                    group_digits(info.trainable),
                    info.device,
                    info.threads,
                    info.classes.len(),
                    info.split_sizes[0],
                    info.split_sizes[1],
                    info.split_sizes[2],
                    info.total_steps
                ));
                if self.tty {
                    let b = indicatif::ProgressBar::new(self.total);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:30.cyan/blue} {pos}/{len} {msg} · {elapsed_precise} ETA {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b.set_position(info.start_step);
                    self.bar = Some(b);
                }
            }
            Event::Progress(p) => {
                let acc = if p.train_acc.is_finite() {
                    format!(" acc {:.3}", p.train_acc)
                } else {
                    String::new()
                };
                let class = p.class_loss.map(|c| format!(" class loss {c:.4}")).unwrap_or_default();
                let msg = format!(
                    "loss {:.4}{acc}{class} lr {:.2e} {:.0} img/s",
                    p.loss, p.lr, p.img_per_s
                );
                if let Some(b) = &self.bar {
                    b.set_position(p.step);
                    b.set_message(msg);
                } else if p.step == self.total || p.step >= self.last_line + (self.total / 20).max(1) {
                    self.last_line = p.step;
                    eprintln!("step {}/{} · {msg} · {:.1} s", p.step, self.total, p.time_s);
                }
            }
            Event::Eval(e) => {
                let acc = if e.acc.is_finite() {
                    format!("acc {:.4} ", e.acc)
                } else {
                    String::new()
                };
                let loss = if e.loss.is_finite() {
                    format!("loss {:.4}", e.loss)
                } else {
                    String::new()
                };
                self.say(format!("eval {} at step {}: {acc}{loss}", e.split, e.step));
            }
            Event::Ablation(a) => self.say(format!(
                "ablation at step {} on {} validation images: acc {:.4}, loss {:.4} ({} rows, {:.1} s)",
                a.step,
                a.n,
                a.base.acc,
                a.base.loss,
                a.rows.len(),
                a.seconds
            )),
            Event::Applied(a) => self.say(format!(
                "applied {} ({}) at step {}: {} → {}",
                a.command, a.target, a.step, a.old, a.new
            )),
            Event::Warning(n) => self.say(format!("warning: {}", with_location(n))),
            Event::Error(n) | Event::Diverged(n) => {
                let line = with_location(n);
                self.say(format!("error: {line}"));
                self.first_error.get_or_insert(line);
            }
            Event::Finished(f) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                if f.reason != FinishReason::Failed {
                    let fmt = |v: Option<f64>| v.map_or_else(|| "-".into(), |a| format!("{a:.4}"));
                    println!(
                        "{:?}: {} steps in {:.1} s · best val acc {} · test acc {}",
                        f.reason,
                        f.steps,
                        f.time_s,
                        fmt(f.best_val_acc),
                        fmt(f.test_acc)
                    );
                    for c in &f.checkpoints {
                        println!("wrote {}", c.display());
                    }
                }
                return Some(f.clone());
            }
            Event::Snapshot(_)
            | Event::Paused { .. }
            | Event::Resumed { .. }
            | Event::RunFile { .. }
            | Event::AblationProgress { .. } => {}
        }
        None
    }
}

/// Shows a worker's events until the run ends. A failed run is an error that was shown
/// already ([`CliError::Reported`]). After an interrupt during setup (no `Started` yet) it does
/// not wait for the setup to notice: it returns an `Interrupted` end within half a second.
pub fn follow(handle: &WorkerHandle, stop: &StopFlag, tty: bool) -> Result<Finished, CliError> {
    let mut reporter = Reporter::new(tty);
    let mut started = false;
    let mut interrupted_at: Option<Instant> = None;
    loop {
        match handle.events().recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => {
                started |= matches!(ev, Event::Started(_));
                if let Some(f) = reporter.show(&ev) {
                    if f.reason == FinishReason::Failed {
                        return Err(match (reporter.first_error(), &f.message) {
                            (Some(_), _) => CliError::Reported(1),
                            (None, Some(m)) => CliError::Failure(anyhow::anyhow!("{m}")),
                            (None, None) => CliError::Failure(anyhow::anyhow!("the run failed")),
                        });
                    }
                    return Ok(f);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(CliError::Failure(anyhow::anyhow!(
                    "the training thread ended without a result"
                )));
            }
        }
        if stop.cuts_short() && !started {
            let since = interrupted_at.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                return Ok(Finished {
                    reason: FinishReason::Interrupted,
                    steps: 0,
                    best_val_acc: None,
                    test_acc: None,
                    checkpoints: Vec::new(),
                    time_s: 0.0,
                    message: None,
                    path: None,
                });
            }
        }
    }
}
