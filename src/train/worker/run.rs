//! The worker thread's body: set the run up, then at every step boundary apply the waiting
//! commands, train one step, evaluate, checkpoint and snapshot on schedule, until the run is done,
//! stopped, interrupted, diverged (headless) or failed.

use super::WorkerOptions;
use super::outbox::Outbox;
use crate::config::RunConfig;
use crate::data::Split;
use crate::train::TrainError;
use crate::train::protocol::{Command, Event, FinishReason, Finished, Notice, RunStatus};
use crate::train::record::{SnapshotHeader, SnapshotRecord};
use crate::train::runlog::{Heartbeat, RunLog};
use crate::train::snapfile::{SnapshotLog, snapshot_view};
use crate::train::stop::{StopFlag, StopRequest};
use crate::train::trainer::{StepOutcome, Trainer};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the training loop ended: the reason, and for a failure the notice naming what failed.
struct End {
    reason: FinishReason,
    failure: Option<Notice>,
}

impl End {
    fn with(reason: FinishReason) -> Self {
        Self { reason, failure: None }
    }

    fn failed(notice: Notice) -> Self {
        Self {
            reason: FinishReason::Failed,
            failure: Some(notice),
        }
    }
}

/// The worker holds at `Ready` (before Start), `Running` or `Paused`.
type State = RunStatus;

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
    stop: &StopFlag,
) {
    let (threads, lowered) = crate::util::clamp_threads(cfg.threads.or(opts.default_threads));
    let nice = opts.compute_nice;
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moppa-compute-{i}"))
        .start_handler(move |_| {
            if nice != 0 {
                // Best effort: refused, training runs at normal priority and the display shares.
                let _ = crate::util::lower_thread_priority(nice);
            }
        })
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            let n = notice(None, format!("cannot start {threads} compute threads: {e}"));
            out.push(Event::Error(n.clone()));
            out.push(Event::Finished(failed(0, 0.0, Some(n))));
            return;
        }
    };
    pool.install(|| {
        let mut trainer = match Trainer::new(cfg, threads, stop.clone()) {
            Ok(t) => t,
            Err(TrainError::Cancelled) => {
                out.push(Event::Finished(Finished {
                    reason: FinishReason::Interrupted,
                    ..failed(0, 0.0, None)
                }));
                return;
            }
            Err(e) => {
                let n = e.notice(0, 0.0);
                out.push(Event::Error(n.clone()));
                out.push(Event::Finished(failed(0, 0.0, Some(n))));
                return;
            }
        };
        if let Some(msg) = lowered {
            trainer.notices.insert(0, notice(None, msg));
        }
        if let Some(id) = &opts.run_id {
            trainer.set_run_id(id.clone());
        }
        let steps = Arc::new(AtomicU64::new(trainer.step));
        let mut _heartbeat = None;
        if let Some(dir) = trainer.cfg.out.clone() {
            match RunLog::open(&dir) {
                Ok(log) => {
                    let log = Arc::new(Mutex::new(log));
                    _heartbeat = Heartbeat::start(log.clone(), steps.clone(), trainer.clock()).ok();
                    out.log = Some(log);
                }
                Err(e) => out.push(Event::Warning(notice(
                    Some(&trainer),
                    format!("{}: cannot write the run log: {e}", dir.display()),
                ))),
            }
            let info = trainer.info();
            if !info.priors.is_empty() {
                let header = SnapshotHeader::new(info.blocks, info.rank, info.grid, &info.priors);
                match SnapshotLog::open(&dir, &header) {
                    Ok(log) => out.snapshots = Some(log),
                    Err(e) => out.push(Event::Warning(notice(
                        Some(&trainer),
                        format!("{}: cannot write the snapshot log: {e}", dir.display()),
                    ))),
                }
            }
        }
        out.push(Event::Started(Box::new(trainer.info().clone())));
        let end = train_loop(&mut trainer, opts, commands, out, stop, &steps);
        finish(&mut trainer, end, out, stop);
    });
}

/// Ends a run whose thread panicked: an error naming the panic, then `Finished(failed)` with
/// the same message, at the last step the displays saw. No checkpoint is written (the last
/// good pair stays as it was).
pub(super) fn panicked(out: &mut Outbox, message: &str) {
    let (step, time_s) = out.last_step();
    let n = Notice {
        step,
        time_s,
        message: format!("the trainer panicked: {message}"),
        path: None,
        line: None,
    };
    out.push(Event::Error(n.clone()));
    out.push(Event::Finished(failed(step, time_s, Some(n))));
}

/// A `failed` end record (or, with another `reason` spread over it, an early end).
fn failed(steps: u64, time_s: f64, why: Option<Notice>) -> Finished {
    let (message, path) = why.map_or((None, None), |n| (Some(n.message), n.path));
    Finished {
        reason: FinishReason::Failed,
        steps,
        best_val_acc: None,
        test_acc: None,
        checkpoints: Vec::new(),
        time_s,
        message,
        path,
    }
}

fn drain_notices(trainer: &mut Trainer, out: &mut Outbox) {
    for n in std::mem::take(&mut trainer.notices) {
        out.push(Event::Warning(n));
    }
}

/// Takes a snapshot of a MoPPA run's internals: to the displays when `display`, to
/// `snapshots.jsonl` when `record` (its own cadence, evaluations, the end).
fn snapshot_to(trainer: &Trainer, out: &mut Outbox, display: bool, record: bool) {
    if trainer.info().priors.is_empty() || !(display || record) {
        return;
    }
    match trainer.snapshot() {
        Ok(raw) => {
            // The displays see the view of the record as written (snapfile::snapshot_view), the
            // same a reopened run shows.
            let rec = SnapshotRecord::from_snapshot(&raw, trainer.time_s());
            if record {
                out.record(&rec);
            }
            if display {
                let info = trainer.info();
                let header = SnapshotHeader::new(info.blocks, info.rank, info.grid, &info.priors);
                if let Some(mut view) = snapshot_view(&rec, &header, raw.channel) {
                    view.probe = raw.probe;
                    out.push(Event::Snapshot(Box::new(view)));
                }
            }
        }
        Err(e) => out.push(Event::Warning(notice(Some(trainer), format!("snapshot failed: {e}")))),
    }
}

fn send_snapshot(trainer: &Trainer, out: &mut Outbox) {
    snapshot_to(trainer, out, true, false);
}

/// Evaluates a split and reports it; a validation result that beats the best so far keeps its
/// adapter as `adapter-best.safetensors` (a failure to write it is returned: it ends the run).
fn evaluate(trainer: &mut Trainer, split: Split, out: &mut Outbox) -> Result<Option<f64>, Notice> {
    match trainer.evaluate(split) {
        Ok(Some(r)) => {
            let acc = r.acc;
            out.push(Event::Eval(r));
            if trainer.take_improved() {
                trainer
                    .save_best()
                    .map_err(|e| e.notice(trainer.step, trainer.time_s()))?;
            }
            Ok(Some(acc))
        }
        Ok(None) | Err(TrainError::Cancelled) => Ok(None),
        Err(e) => {
            out.push(Event::Error(e.notice(trainer.step, trainer.time_s())));
            Ok(None)
        }
    }
}

/// Runs a prior ablation between steps and reports it (the `ablation` record of the run folder).
/// Commands that arrive while it runs are kept in `deferred`, except a cancel (which ends it) and
/// a stop (which ends it and is kept).
fn ablate(
    trainer: &Trainer,
    images: usize,
    commands: &Receiver<Command>,
    deferred: &mut Vec<Command>,
    out: &mut Outbox,
    stop: &StopFlag,
) {
    let waiting = std::cell::RefCell::new(std::mem::take(deferred));
    let cancelled = std::cell::Cell::new(false);
    let cancel = || {
        while let Ok(c) = commands.try_recv() {
            match c {
                Command::CancelAblation => cancelled.set(true),
                Command::Stop => {
                    cancelled.set(true);
                    waiting.borrow_mut().push(c);
                }
                c => waiting.borrow_mut().push(c),
            }
        }
        cancelled.get() || stop.request() != StopRequest::None
    };
    out.push(Event::AblationProgress { done: 0, total: 0 });
    out.flush();
    let result = {
        let mut progress = |done: usize, total: usize| {
            out.push(Event::AblationProgress { done, total });
            out.flush();
        };
        trainer.ablate(images, &cancel, &mut progress)
    };
    *deferred = waiting.into_inner();
    match result {
        Ok(a) => out.push(Event::Ablation(Box::new(a))),
        Err(TrainError::Cancelled) => out.push(Event::Warning(notice(Some(trainer), "ablation cancelled"))),
        Err(e) => out.push(Event::Warning(notice(Some(trainer), format!("ablation: {e}")))),
    }
    out.flush();
}

/// Writes the checkpoint pair; a failure is the notice that ends the run.
fn checkpoint(trainer: &mut Trainer) -> Result<(), Notice> {
    trainer
        .checkpoint()
        .map(|_| ())
        .map_err(|e| e.notice(trainer.step, trainer.time_s()))
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
        Command::Evaluate => match evaluate(trainer, Split::Val, out) {
            Ok(_) => Ok(None),
            Err(n) => {
                out.push(Event::Error(n));
                Ok(None)
            }
        },
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
        Command::SetProbeImage { name, image } => trainer.set_probe_image(&name, image).map(|()| None),
        Command::SetChannel { channel } => trainer.set_channel(channel).map(|()| None),
        Command::FetchRunFiles => Err("fetching the run's files is for network clients (moppa train --serve)".into()),
        // Handled by the loop (they need the command channel).
        Command::Ablate { .. } | Command::CancelAblation => Ok(None),
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
    stop: &StopFlag,
    steps: &AtomicU64,
) -> End {
    let mut state = if opts.autostart { State::Running } else { State::Ready };
    let mut single = false;
    let mut diverged = false;
    let mut snapshot_due = true;
    let min_gap = Duration::from_secs_f64(1.0 / opts.max_snapshots_per_s.max(0.1));
    let mut last_snapshot: Option<Instant> = None;
    let every = trainer.cfg.snapshot_every.max(1);
    let mut deferred: Vec<Command> = Vec::new();
    loop {
        // Commands take effect here, at the step boundary.
        let waiting = state != State::Running && !single;
        let first = if waiting {
            match commands.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return End::with(FinishReason::Stopped),
            }
        } else {
            commands.try_recv().ok()
        };
        let mut stop_cmd = false;
        let mut queue: std::collections::VecDeque<Command> = std::mem::take(&mut deferred).into();
        queue.extend(first);
        queue.extend(std::iter::from_fn(|| commands.try_recv().ok()));
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                Command::Stop => {
                    stop_cmd = true;
                    state = apply(trainer, cmd, state, out, &mut single, &mut snapshot_due);
                }
                Command::Ablate { images } => {
                    // Commands that arrive meanwhile wait for the next boundary; a cancel ends it.
                    ablate(trainer, images, commands, &mut deferred, out, stop);
                }
                Command::CancelAblation => {}
                cmd => state = apply(trainer, cmd, state, out, &mut single, &mut snapshot_due),
            }
        }
        let stopped = if diverged {
            FinishReason::Diverged
        } else {
            FinishReason::Stopped
        };
        match stop.request() {
            StopRequest::Graceful => return End::with(stopped),
            StopRequest::Interrupt => return End::with(FinishReason::Interrupted),
            StopRequest::Abandon => return End::with(FinishReason::Stopped),
            StopRequest::None => {}
        }
        if stop_cmd {
            return End::with(stopped);
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
            return End::with(FinishReason::Done);
        }
        assert!(
            !crate::panics::fault("worker-panic", trainer.step),
            "fault injection: the trainer panics before step {}",
            trainer.step + 1
        );
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
                    return End::with(FinishReason::Diverged);
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
            Err(TrainError::Cancelled) => {
                drain_notices(trainer, out);
                return End::with(FinishReason::Interrupted);
            }
            Err(e) => {
                drain_notices(trainer, out);
                let n = e.notice(trainer.step, trainer.time_s());
                out.push(Event::Error(n.clone()));
                return End::failed(n);
            }
        }
        let step = trainer.step;
        let eval_every = trainer.cfg.eval_every;
        steps.store(step, std::sync::atomic::Ordering::Relaxed);
        let mut record = out.record_due(step);
        if eval_every > 0 && step.is_multiple_of(eval_every) && !trainer.done() {
            let saved = evaluate(trainer, Split::Val, out).and_then(|_| checkpoint(trainer));
            if let Err(n) = saved {
                out.push(Event::Error(n.clone()));
                return End::failed(n);
            }
            record = true;
        }
        let rate_ok = last_snapshot.is_none_or(|t| t.elapsed() >= min_gap);
        let display = (snapshot_due || step.is_multiple_of(every) || single) && rate_ok;
        snapshot_to(trainer, out, display, record);
        if display {
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

/// Ends the run: the final evaluation (not after an interrupt or a failure) and checkpoint,
/// then `Finished`. A checkpoint that cannot be written turns any end into a failure naming it.
fn finish(trainer: &mut Trainer, end: End, out: &mut Outbox, stop: &StopFlag) {
    let abandon = stop.request() == StopRequest::Abandon;
    let End {
        mut reason,
        mut failure,
    } = end;
    let mut test_acc = None;
    if !abandon && reason != FinishReason::Failed {
        let interrupted = reason == FinishReason::Interrupted;
        let mut saved = Ok(());
        if !interrupted {
            saved = evaluate(trainer, Split::Val, out).map(|_| ());
            if saved.is_ok() {
                test_acc = evaluate(trainer, Split::Test, out).ok().flatten();
            }
        }
        if saved.is_ok() && (reason != FinishReason::Diverged || trainer.step > 0) {
            saved = checkpoint(trainer);
        }
        match saved {
            Ok(()) if !interrupted => snapshot_to(trainer, out, true, true),
            Ok(()) => {}
            Err(n) => {
                out.push(Event::Error(n.clone()));
                reason = FinishReason::Failed;
                failure = Some(n);
            }
        }
    }
    drain_notices(trainer, out);
    let (message, path) = failure.map_or((None, None), |n| (Some(n.message), n.path));
    out.push(Event::Finished(Finished {
        reason,
        steps: trainer.step,
        best_val_acc: trainer.best_val,
        test_acc,
        checkpoints: trainer.checkpoints.clone(),
        time_s: trainer.time_s(),
        message,
        path,
    }));
}
