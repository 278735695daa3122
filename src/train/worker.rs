//! The training worker: a named thread that owns the [`Trainer`], reads [`Command`]s from a
//! bounded channel at every step boundary and sends [`Event`]s through another. It never
//! blocks on a display: progress and snapshots are coalesced (latest wins) when the receiver is
//! behind, while evaluations, applied commands, warnings, errors and the end of the run wait in
//! a small backlog until there is room. A waker closure (the app passes `request_repaint`) is
//! called after each batch of events.

use super::config::RunConfig;
use super::protocol::{Command, Event, FinishReason, Finished, Notice};
use super::runlog::RunLog;
use super::trainer::{StepOutcome, Trainer};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Called after events were sent (e.g. `egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Called after each batch of events.
    pub waker: Option<Waker>,
    /// Start training immediately (else wait for [`Command::Start`]).
    pub autostart: bool,
    /// Threads of the training pool when the config does not say (`None`: every core).
    pub default_threads: Option<usize>,
    /// Capacity of the event channel.
    pub event_capacity: usize,
    /// At most this many snapshots per second.
    pub max_snapshots_per_s: f64,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            waker: None,
            autostart: true,
            default_threads: None,
            event_capacity: 256,
            max_snapshots_per_s: 10.0,
        }
    }
}

impl WorkerOptions {
    /// Defaults for a display that shares the machine: all cores but one for training.
    #[must_use]
    pub fn with_ui(waker: Waker) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self {
            waker: Some(waker),
            autostart: false,
            default_threads: Some((cores - 1).max(1)),
            ..Self::default()
        }
    }
}

const STOP_NONE: u8 = 0;
const STOP_GRACEFUL: u8 = 1;
const STOP_INTERRUPT: u8 = 2;
const STOP_ABANDON: u8 = 3;

/// A running worker.
pub struct WorkerHandle {
    commands: Sender<Command>,
    events: Receiver<Event>,
    stop: Arc<AtomicU8>,
    join: Option<std::thread::JoinHandle<()>>,
    finished: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Starts a run on a new thread. Setup errors arrive as `Error` + `Finished(failed)` events.
    pub fn spawn(cfg: RunConfig, opts: WorkerOptions) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = bounded(64);
        let (ev_tx, ev_rx) = bounded(opts.event_capacity.max(4));
        let stop = Arc::new(AtomicU8::new(STOP_NONE));
        let finished = Arc::new(AtomicBool::new(false));
        let (stop2, finished2) = (stop.clone(), finished.clone());
        let join = std::thread::Builder::new()
            .name("moppa-trainer".into())
            .spawn(move || {
                let mut out = Outbox::new(ev_tx, opts.waker.clone());
                run(&cfg, &opts, &cmd_rx, &mut out, &stop2);
                finished2.store(true, Ordering::Release);
                // Deliver what is left without ever blocking for long.
                let deadline = Instant::now() + Duration::from_secs(2);
                while !out.is_empty() && Instant::now() < deadline && stop2.load(Ordering::Relaxed) != STOP_ABANDON {
                    out.flush();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })?;
        Ok(Self {
            commands: cmd_tx,
            events: ev_rx,
            stop,
            join: Some(join),
            finished,
        })
    }

    /// Sends a command (never blocks; fails only when 64 commands are already waiting).
    pub fn send(&self, c: Command) -> Result<(), Command> {
        self.commands.try_send(c).map_err(|e| match e {
            TrySendError::Full(c) | TrySendError::Disconnected(c) => c,
        })
    }

    /// The event stream.
    #[must_use]
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Asks for a graceful stop at the next step boundary (final evaluation and checkpoint).
    pub fn stop(&self) {
        self.stop
            .compare_exchange(STOP_NONE, STOP_GRACEFUL, Ordering::AcqRel, Ordering::Relaxed)
            .ok();
    }

    /// Like [`Self::stop`], reported as `interrupted` (Ctrl-C).
    pub fn interrupt(&self) {
        self.stop.store(STOP_INTERRUPT, Ordering::Release);
    }

    /// A stop flag a signal handler can set: the same as [`Self::interrupt`].
    #[must_use]
    pub fn interrupt_flag(&self) -> Arc<AtomicU8> {
        self.stop.clone()
    }

    /// Whether the worker thread has ended its run.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Waits for the thread to end.
    pub fn join(mut self) {
        if let Some(j) = self.join.take() {
            j.join().ok();
        }
    }
}

/// Sets an interrupt flag obtained from [`WorkerHandle::interrupt_flag`].
pub fn raise_interrupt(flag: &AtomicU8) {
    flag.store(STOP_INTERRUPT, Ordering::Release);
}

impl Drop for WorkerHandle {
    /// Abandons the run (no final evaluation) and waits for the current step to end.
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            if !self.finished.load(Ordering::Acquire) {
                self.stop.store(STOP_ABANDON, Ordering::Release);
            }
            j.join().ok();
        }
    }
}

/// The sending side: never blocks.
struct Outbox {
    tx: Sender<Event>,
    backlog: VecDeque<Event>,
    progress: Option<Event>,
    snapshot: Option<Event>,
    waker: Option<Waker>,
    log: Option<RunLog>,
    log_error: bool,
}

impl Outbox {
    fn new(tx: Sender<Event>, waker: Option<Waker>) -> Self {
        Self {
            tx,
            backlog: VecDeque::new(),
            progress: None,
            snapshot: None,
            waker,
            log: None,
            log_error: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.backlog.is_empty() && self.progress.is_none() && self.snapshot.is_none()
    }

    /// Logs the event to the run folder, then queues it.
    fn push(&mut self, ev: Event) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.write(&ev)
            && !self.log_error
        {
            self.log_error = true;
            self.backlog.push_back(Event::Warning(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("cannot write the run log: {e}"),
                path: None,
                line: None,
            }));
        }
        match ev {
            Event::Progress(_) => self.progress = Some(ev),
            Event::Snapshot(_) => self.snapshot = Some(ev),
            other => self.backlog.push_back(other),
        }
        self.flush();
    }

    /// Sends what fits; returns without waiting.
    fn flush(&mut self) {
        let mut sent = false;
        while let Some(ev) = self.backlog.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => sent = true,
                Err(TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.backlog.clear();
                    break;
                }
            }
        }
        if self.backlog.is_empty() {
            for slot in [&mut self.progress, &mut self.snapshot] {
                if let Some(ev) = slot.take() {
                    match self.tx.try_send(ev) {
                        Ok(()) => sent = true,
                        Err(TrySendError::Full(ev)) => *slot = Some(ev),
                        Err(TrySendError::Disconnected(_)) => {}
                    }
                }
            }
        }
        if sent && let Some(w) = &self.waker {
            w();
        }
    }
}

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
fn run(cfg: &RunConfig, opts: &WorkerOptions, commands: &Receiver<Command>, out: &mut Outbox, stop: &AtomicU8) {
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

fn evaluate(trainer: &mut Trainer, test: bool, out: &mut Outbox) -> Option<f64> {
    match trainer.evaluate(test) {
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
            evaluate(trainer, false, out);
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
                out.push(Event::Error(notice(
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
            evaluate(trainer, false, out);
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
        evaluate(trainer, false, out);
        test_acc = evaluate(trainer, true, out);
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
