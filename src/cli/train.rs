//! `moppa train`: the engine from the command line.

use super::CliError;
use super::args::RunArgs;
use super::reporter::follow;
use crate::train::protocol::FinishReason;
use crate::train::worker::raise_interrupt;
use crate::train::{WorkerHandle, WorkerOptions};
use clap::Args;
use std::io::IsTerminal as _;

/// Exit status of an interrupted run.
pub const EXIT_INTERRUPTED: i32 = 130;

/// `moppa train`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa train                                   # MoPPA on the built-in pair (backbone + digits)\n  \
moppa train --method lora --few-shot 10 --out runs/lora10\n  \
moppa train --backbone vit_base.safetensors --data vtab/dtd --epochs 100 --out runs/dtd\n  \
moppa train --resume runs/dtd --steps 20000\nCtrl-C stops at the next step, writes a final checkpoint and exits with 130."
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
}

/// How a headless run's worker runs: nobody can steer a diverged run back, so it stops.
#[must_use]
pub fn headless() -> WorkerOptions {
    WorkerOptions {
        stop_on_divergence: true,
        ..WorkerOptions::default()
    }
}

/// The exit status for how a run ended.
#[must_use]
pub fn exit_code(reason: FinishReason) -> i32 {
    match reason {
        FinishReason::Done | FinishReason::Stopped => 0,
        FinishReason::Interrupted => EXIT_INTERRUPTED,
        FinishReason::Diverged | FinishReason::Failed => 1,
    }
}

/// Runs `moppa train`.
pub fn train(args: &TrainArgs) -> Result<i32, CliError> {
    let cfg = args.run.resolve()?;
    let handle = WorkerHandle::spawn(cfg, headless()).map_err(|e| CliError::Failure(e.into()))?;
    let flag = handle.interrupt_flag();
    ctrlc::set_handler(move || raise_interrupt(&flag)).ok();
    let tty = std::io::stderr().is_terminal() && !args.plain;
    let finished = follow(&handle, tty)?;
    handle.join();
    Ok(exit_code(finished.reason))
}
