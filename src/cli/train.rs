//! `moppa train`: the engine from the command line, with the run folder's rules applied before
//! anything starts and Ctrl-C acknowledged at once.

use super::args::RunArgs;
use super::reporter::follow;
use super::{CliError, usage};
use crate::config::{RunConfig, check_resources};
use crate::train::backbone::backbone_config;
use crate::train::protocol::Event;
use crate::train::protocol::FinishReason;
use crate::train::runfolder::{OutFlags, OutPlan, RunFolderError, plan_out};
use crate::train::serve::{Limits, MIN_TOKEN_LEN, ServeOptions, Server, new_token};
use crate::train::trainer::new_run_id;
use crate::train::{WorkerHandle, WorkerOptions};
use clap::Args;
use crossbeam_channel::{Receiver, bounded};
use std::io::IsTerminal as _;

/// Exit status of an interrupted run.
pub const EXIT_INTERRUPTED: i32 = 130;

/// `moppa train`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa train                                   # MoPPA on the built-in pair (backbone + digits)\n  \
moppa train --method lora --few-shot 10 --out runs/lora10\n  \
moppa train --backbone vit_base.safetensors --data vtab/dtd --epochs 100 --out runs/dtd\n  \
moppa train --resume runs/dtd --steps 20000\n  \
moppa train --config run.toml --out runs/a --auto-resume   # for schedulers: resume, skip if done, or start\n\
Ctrl-C stops at the next step, writes a final checkpoint and exits with 130."
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

/// What the run folder rules make of `--out` (INTERFACES.md): the configuration to run, or
/// `None` when an auto-resumed run is finished already.
pub fn claim_out(args: &RunArgs, cfg: RunConfig) -> Result<Option<RunConfig>, CliError> {
    let Some(out) = cfg.out.clone() else {
        return Ok(Some(cfg));
    };
    let flags = OutFlags {
        resume: cfg.resume.is_some(),
        overwrite: cfg.overwrite,
        auto_resume: cfg.auto_resume,
    };
    match plan_out(&out, flags) {
        Ok(OutPlan::AlreadyFinished(reason)) => {
            println!("{}: this run has ended ({reason}); nothing to do", out.display());
            Ok(None)
        }
        Ok(OutPlan::Resume) if cfg.resume.is_none() => args.resolve_resume(&out).map(Some),
        Ok(_) => Ok(Some(cfg)),
        Err(RunFolderError::Usage(m)) => Err(usage(m)),
        Err(e) => Err(CliError::Failure(e.into())),
    }
}

/// Refuses, before anything is allocated, a run that cannot work on its backbone or fit this
/// machine (the backbone's architecture is read from its file's header only).
pub fn preflight(cfg: &RunConfig) -> Result<(), CliError> {
    crate::data::check_spec(&cfg.data).map_err(usage)?;
    let pinned = cfg.backbone_revision.as_deref().filter(|_| cfg.resume.is_some());
    super::backbones::fetch(&cfg.backbone, pinned)?;
    let vit = backbone_config(&cfg.backbone, cfg.heads).map_err(|e| match e {
        crate::train::TrainError::Config(m) => usage(m),
        other => CliError::Failure(other.into()),
    })?;
    check_resources(&vit, &cfg.method, cfg.batch, 0, crate::util::physical_memory_bytes()).map_err(usage)
}

/// The token `--serve` was given (`--token`, else `MOPPA_SERVE_TOKEN`), checked before anything
/// starts: at least [`MIN_TOKEN_LEN`] characters. `None`: one is generated.
fn serve_token(cfg: &RunConfig) -> Result<Option<(String, &'static str)>, CliError> {
    let given = match (&cfg.token, std::env::var("MOPPA_SERVE_TOKEN")) {
        (Some(t), _) if !t.is_empty() => Some((t.clone(), "--token")),
        (None, Ok(t)) if !t.is_empty() => Some((t, "MOPPA_SERVE_TOKEN")),
        _ => None,
    };
    if let Some((t, from)) = &given
        && t.chars().count() < MIN_TOKEN_LEN
    {
        return Err(usage(format!(
            "{from}: a token must have at least {MIN_TOKEN_LEN} characters (this one has {}); leave it out and one is generated",
            t.chars().count()
        )));
    }
    Ok(given)
}

/// `--serve`: the server, started beside the worker (`None` without the flag).
fn serve(cfg: &RunConfig, opts: &mut WorkerOptions) -> Result<Option<(ServeOptions, Receiver<Event>)>, CliError> {
    let Some(addr) = cfg.serve.clone() else { return Ok(None) };
    let Some(run_dir) = cfg.out.clone() else {
        return Err(usage(
            "--serve needs --out: a viewer who connects mid-run receives the history from the run folder",
        ));
    };
    let given = serve_token(cfg)?;
    let limits = Limits::from_env().map_err(usage)?;
    let (token, generated) = match given {
        Some((t, _)) => (t, false),
        None => (new_token(), true),
    };
    if generated {
        eprintln!("token: {token}  (give it to Connect… to steer this run; --token or MOPPA_SERVE_TOKEN sets it)");
    }
    let run_id = new_run_id();
    opts.run_id = Some(run_id.clone());
    let (tx, rx) = bounded(4096);
    opts.observers.push(tx);
    Ok(Some((
        ServeOptions {
            addr,
            token,
            public: cfg.serve_public,
            run_dir,
            run_id,
            limits,
        },
        rx,
    )))
}

/// Runs `moppa train`.
pub fn train(args: &TrainArgs) -> Result<i32, CliError> {
    let cfg = args.run.resolve()?;
    if cfg.serve.is_some() {
        serve_token(&cfg)?;
        Limits::from_env().map_err(usage)?;
    }
    let Some(cfg) = claim_out(&args.run, cfg)? else {
        return Ok(0);
    };
    preflight(&cfg)?;
    let mut opts = headless();
    let served = match serve(&cfg, &mut opts)? {
        Some((sopts, events)) => {
            let listener =
                Server::bind(&sopts).map_err(|e| CliError::Failure(anyhow::anyhow!("--serve {}: {e}", sopts.addr)))?;
            Some((listener, sopts, events))
        }
        None => None,
    };
    let handle = WorkerHandle::spawn(cfg, opts).map_err(|e| CliError::Failure(e.into()))?;
    let _server = match served {
        Some((listener, sopts, events)) => {
            let addr = sopts.addr.clone();
            let sopts_public = sopts.public;
            let server = Server::start(listener, sopts, handle.commands(), events)
                .map_err(|e| CliError::Failure(anyhow::anyhow!("--serve {addr}: {e}")))?;
            eprintln!("serving on {}", server.addr());
            if !server.addr().ip().is_loopback() {
                eprintln!(
                    "warning: --serve {addr} listens beyond this machine: anyone who can reach {} may try tokens{}; loopback and an SSH tunnel (README) keep a run private",
                    server.addr(),
                    if sopts_public {
                        " and, with --serve-public, watch without one"
                    } else {
                        ""
                    }
                );
            }
            Some(server)
        }
        None => None,
    };
    let flag = handle.stop_flag();
    let acknowledged = flag.clone();
    ctrlc::set_handler(move || {
        if !acknowledged.cuts_short() {
            eprintln!("interrupted: stopping at the next step with a final checkpoint (no evaluation)");
        }
        acknowledged.interrupt();
    })
    .ok();
    let tty = std::io::stderr().is_terminal() && !args.plain;
    let finished = follow(&handle, &flag, tty)?;
    if finished.reason == FinishReason::Interrupted && !handle.is_finished() {
        // Interrupted during setup: nothing to save; the process exits without waiting for the
        // setup to notice (dropping the handle would join its thread).
        std::mem::forget(handle);
        return Ok(EXIT_INTERRUPTED);
    }
    handle.join();
    Ok(exit_code(finished.reason))
}
