//! The worker thread's body: set the run up, then at every step boundary apply the waiting
//! commands, train one step, evaluate, checkpoint and snapshot on schedule, until the run is done,
//! stopped, interrupted, diverged (headless) or failed.

use super::outbox::Outbox;
use super::{STOP_ABANDON, STOP_GRACEFUL, STOP_INTERRUPT, WorkerOptions};
use crate::config::RunConfig;
use crate::data::Split;
use crate::train::protocol::{Command, Event, FinishReason, Finished, Notice};
use crate::train::runlog::RunLog;
use crate::train::trainer::{StepOutcome, Trainer};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Running,
    Paused,
}

fn notice(trainer: Option<&Trainer>, message: impl Into<String>) -> Notice {
    Notice {
        step: trainer.map_or(0, |t| t.step),
        time_s: trainer.map_or(0.0, Trainer::time_s),
        message: message.into(),
        path: None,
        line: None,
    }
}

/// The thread body.
pub(super) fn run(
    cfg: &RunConfig,
    opts: &WorkerOptions,
    commands: &Receiver<Command>,
    out: &mut Outbox,
    stop: &AtomicU8,
) {
    let threads = cfg
        .threads
        .or(opts.default_threads)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moppa-compute-{i}"))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            out.push(Event::Error(notice(
                None,
                format!("cannot start {threads} compute threads: {e}"),
            )));
            out.push(Event::Finished(failed(0.0)));
            return;
        }
    };
    pool.install(|| {
        let mut trainer = match Trainer::new(cfg, threads) {
            Ok(t) => t,
            Err(e) => {
                out.push(Event::Error(e.notice(0, 0.0)));
                out.push(Event::Finished(failed(0.0)));
                return;
            }
        };
        if let Some(dir) = &trainer.cfg.out {
            match RunLog::open(dir) {
                Ok(log) => out.log = Some(log),
                Err(e) => out.push(Event::Warning(notice(
                    Some(&trainer),
                    format!("{}: cannot write the run log: {e}", dir.display()),
                ))),
            }
        }
        out.push(Event::Started(Box::new(trainer.info().clone())));
        let reason = train_loop(&mut trainer, opts, commands, out, stop);
        finish(&mut trainer, reason, out, stop);
    });
}

fn failed(time_s: f64) -> Finished {
    Finished {
        reason: FinishReason::Failed,
        steps: 0,
        best_val_acc: None,
        test_acc: None,
        checkpoints: Vec::new(),
        time_s,
    }
}

fn drain_notices(trainer: &mut Trainer, out: &mut Outbox) {
    for n in std::mem::take(&mut trainer.notices) {
        out.push(Event::Warning(n));
    }
}

fn send_snapshot(trainer: &Trainer, out: &mut Outbox) {
    if trainer.info().priors.is_empty() {
        return;
    }
    match trainer.snapshot() {
        Ok(s) => out.push(Event::Snapshot(Box::new(s))),
        Err(e) => out.push(Event::Warning(notice(Some(trainer), format!("snapshot failed: {e}")))),
    }
}

fn evaluate(trainer: &mut Trainer, split: Split, out: &mut Outbox) -> Option<f64> {
    match trainer.evaluate(split) {
        Ok(Some(r)) => {
            let acc = r.acc;
            out.push(Event::Eval(r));
            Some(acc)
        }
        Ok(None) => None,
        Err(e) => {
            out.push(Event::Error(e.notice(trainer.step, trainer.time_s())));
            None
        }
    }
}

fn checkpoint(trainer: &mut Trainer, out: &mut Outbox) {
    if let Err(e) = trainer.checkpoint() {
        out.push(Event::Error(e.notice(trainer.step, trainer.time_s())));
    }
}

/// Applies one command; returns the new state.
fn apply(
    trainer: &mut Trainer,
    cmd: Command,
    state: State,
    out: &mut Outbox,
    single: &mut bool,
    snapshot_due: &mut bool,
) -> State {
    let result = match cmd {
        Command::Start | Command::Resume => {
            if state != State::Running {
                out.push(Event::Resumed { step: trainer.step });
            }
            return State::Running;
        }
        Command::Pause => {
            if state == State::Running {
                out.push(Event::Paused { step: trainer.step });
            }
            return State::Paused;
        }
        Command::Step => {
            *single = true;
            return if state == State::Running { State::Paused } else { state };
        }
        Command::Stop => return state,
        Command::SetCoeff { coeff, target, mode } => trainer.set_coeff(coeff, target, mode).map(Some),
        Command::SetHyper { hyper, value } => trainer.set_hyper(hyper, value).map(Some),
        Command::Lock { what, target, locked } => trainer.set_lock(what, target, locked).map(Some),
        Command::Evaluate => {
            evaluate(trainer, Split::Val, out);
            Ok(None)
        }
        Command::SaveCheckpoint { path } => match trainer.save_adapter(&path) {
            Ok(()) => {
                out.push(Event::Warning(Notice {
                    step: trainer.step,
                    time_s: trainer.time_s(),
                    message: format!("adapter saved to {}", path.display()),
                    path: Some(path),
                    line: None,
                }));
                Ok(None)
            }
            Err(e) => {
                out.push(Event::Error(e.notice(trainer.step, trainer.time_s())));
                Ok(None)
            }
        },
        Command::SetProbe { index } => trainer.set_probe(index).map(|()| None),
        Command::SetChannel { channel } => trainer.set_channel(channel).map(|()| None),
    };
    match result {
        Ok(Some(applied)) => {
            out.push(Event::Applied(applied));
            *snapshot_due = true;
        }
        Ok(None) => *snapshot_due = true,
        Err(msg) => out.push(Event::Warning(notice(Some(trainer), msg))),
    }
    state
}

fn train_loop(
    trainer: &mut Trainer,
    opts: &WorkerOptions,
    commands: &Receiver<Command>,
    out: &mut Outbox,
    stop: &AtomicU8,
) -> FinishReason {
    let mut state = if opts.autostart { State::Running } else { State::Idle };
    let mut single = false;
    let mut diverged = false;
    let mut snapshot_due = true;
    let min_gap = Duration::from_secs_f64(1.0 / opts.max_snapshots_per_s.max(0.1));
    let mut last_snapshot: Option<Instant> = None;
    let every = trainer.cfg.snapshot_every.max(1);
    loop {
        // Commands take effect here, at the step boundary.
        let waiting = state != State::Running && !single;
        let first = if waiting {
            match commands.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return FinishReason::Stopped,
            }
        } else {
            commands.try_recv().ok()
        };
        let mut stop_cmd = false;
        for cmd in first.into_iter().chain(std::iter::from_fn(|| commands.try_recv().ok())) {
            if cmd == Command::Stop {
                stop_cmd = true;
            }
            state = apply(trainer, cmd, state, out, &mut single, &mut snapshot_due);
        }
        match stop.load(Ordering::Acquire) {
            STOP_GRACEFUL => {
                return if diverged {
                    FinishReason::Diverged
                } else {
                    FinishReason::Stopped
                };
            }
            STOP_INTERRUPT => return FinishReason::Interrupted,
            STOP_ABANDON => return FinishReason::Stopped,
            _ => {}
        }
        if stop_cmd {
            return if diverged {
                FinishReason::Diverged
            } else {
                FinishReason::Stopped
            };
        }
        if snapshot_due && (state != State::Running || single) {
            send_snapshot(trainer, out);
            last_snapshot = Some(Instant::now());
            snapshot_due = false;
        }
        out.flush();
        if state != State::Running && !single {
            continue;
        }
        if trainer.done() {
            return FinishReason::Done;
        }
        match trainer.step() {
            Ok(StepOutcome::Done(progress)) => {
                diverged = false;
                drain_notices(trainer, out);
                out.push(Event::Progress(progress));
            }
            Ok(StepOutcome::Diverged(msg)) => {
                drain_notices(trainer, out);
                diverged = true;
                if opts.stop_on_divergence {
                    out.push(Event::Diverged(notice(
                        Some(trainer),
                        format!("training diverged: {msg}; stopped with the last good weights"),
                    )));
                    return FinishReason::Diverged;
                }
                out.push(Event::Diverged(notice(
                    Some(trainer),
                    format!("training diverged: {msg}; paused with the last good weights"),
                )));
                out.push(Event::Paused { step: trainer.step });
                state = State::Paused;
                single = false;
                continue;
            }
            Err(e) => {
                drain_notices(trainer, out);
                out.push(Event::Error(e.notice(trainer.step, trainer.time_s())));
                return FinishReason::Failed;
            }
        }
        let step = trainer.step;
        let eval_every = trainer.cfg.eval_every;
        if eval_every > 0 && step.is_multiple_of(eval_every) && !trainer.done() {
            evaluate(trainer, Split::Val, out);
            checkpoint(trainer, out);
        }
        let rate_ok = last_snapshot.is_none_or(|t| t.elapsed() >= min_gap);
        if (snapshot_due || step.is_multiple_of(every) || single) && rate_ok {
            send_snapshot(trainer, out);
            last_snapshot = Some(Instant::now());
            snapshot_due = false;
        }
        if single {
            single = false;
            state = State::Paused;
            out.push(Event::Paused { step });
        }
    }
}

fn finish(trainer: &mut Trainer, reason: FinishReason, out: &mut Outbox, stop: &AtomicU8) {
    let abandon = stop.load(Ordering::Acquire) == STOP_ABANDON;
    let mut test_acc = None;
    if !abandon && reason != FinishReason::Failed {
        evaluate(trainer, Split::Val, out);
        test_acc = evaluate(trainer, Split::Test, out);
        if reason != FinishReason::Diverged || trainer.step > 0 {
            checkpoint(trainer, out);
        }
        send_snapshot(trainer, out);
    }
    drain_notices(trainer, out);
    out.push(Event::Finished(Finished {
        reason,
        steps: trainer.step,
        best_val_acc: trainer.best_val,
        test_acc,
        checkpoints: trainer.checkpoints.clone(),
        time_s: trainer.time_s(),
    }));
}
