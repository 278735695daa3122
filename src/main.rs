//! `moppa`: the MoPPA Studio desktop app and command line. The only place that knows both faces:
//! it parses the command line, then hands a subcommand to the CLI or builds the app's options.

use clap::Parser as _;
use moppa_studio::cli::{Cli, run};

fn main() {
    moppa_studio::util::keep_freed_memory();
    let cli = Cli::parse();
    #[cfg(feature = "gui")]
    if let Some(moppa_studio::cli::Command::View(v)) = &cli.command {
        match v.run_folders() {
            Ok(dirs) => std::process::exit(open_app(&cli, dirs)),
            Err(e) => {
                if let Some(m) = e.message() {
                    eprintln!("error: {m}");
                }
                std::process::exit(e.exit_code());
            }
        }
    }
    let Some(command) = cli.command else {
        std::process::exit(open_app(&cli, Vec::new()));
    };
    match run(command) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if let Some(m) = e.message() {
                eprintln!("error: {m}");
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// The app's start options from the top-level flags.
#[cfg(feature = "gui")]
fn app_options(
    cli: &Cli,
    open: Vec<std::path::PathBuf>,
) -> Result<moppa_studio::app::AppOptions, moppa_studio::cli::CliError> {
    use moppa_studio::cli::{CliError, usage};
    let tab = match &cli.tab {
        Some(t) => Some(moppa_studio::app::state::Tab::parse(t).ok_or_else(|| {
            usage(format!(
                "--tab must be filters, router, curves, runs or playground (got {t})"
            ))
        })?),
        None => None,
    };
    let config = match &cli.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", p.display())))?;
            Some(
                moppa_studio::config::RunConfig::from_toml(&text)
                    .map_err(|e| usage(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let lesson = match &cli.lesson {
        Some(name) => Some(moppa_studio::app::lessons::resolve(name).map_err(|e| {
            if moppa_studio::app::lessons::names_a_file(name) {
                CliError::Failure(anyhow::anyhow!("{e}"))
            } else {
                usage(format!("--lesson: {e}"))
            }
        })?),
        None => None,
    };
    if cli.lesson_step == Some(0) {
        return Err(usage("--lesson-step counts from 1"));
    }
    if cli.frame_stats.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err(usage("--frame-stats must be > 0 seconds"));
    }
    if let Some(p) = &cli.screenshot {
        // Fail now, not after training for the screenshot: the file must be writable.
        let existed = p.exists();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write --screenshot {}: {e}", p.display())))?;
        if !existed {
            std::fs::remove_file(p).ok();
        }
    }
    Ok(moppa_studio::app::AppOptions {
        autostart: cli.autostart,
        screenshot: cli.screenshot.clone(),
        after_steps: cli.after_steps,
        tab,
        frame_stats: cli.frame_stats,
        config,
        stable_display: false,
        open,
        runs_dir: None,
        lesson,
        lesson_step: cli.lesson_step,
        lessons_dir: None,
        typed_paths: cli.typed_paths,
    })
}

/// No subcommand: the desktop app on the built-in default.
#[cfg(feature = "gui")]
fn open_app(cli: &Cli, open: Vec<std::path::PathBuf>) -> i32 {
    let opts = match app_options(cli, open) {
        Ok(o) => o,
        Err(e) => {
            if let Some(m) = e.message() {
                eprintln!("error: {m}");
            }
            return e.exit_code();
        }
    };
    if opts.screenshot.is_some() && !opts.open.is_empty() {
        // Before any window: a folder whose run never starts would leave nothing to capture.
        let within = match screenshot_wait() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
        if let Err(e) = moppa_studio::train::replay::wait_for_start(&opts.open, within) {
            eprintln!("error: {e} (set {SCREENSHOT_WAIT_ENV} to wait longer)");
            return 1;
        }
    }
    let renderer = match cli.renderer.as_deref() {
        None | Some("glow") => eframe::Renderer::Glow,
        Some("wgpu") => eframe::Renderer::Wgpu,
        Some(other) => {
            eprintln!("error: --renderer must be glow or wgpu (got {other})");
            return 2;
        }
    };
    match moppa_studio::app::run(opts, renderer) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// The environment variable holding how long `view --screenshot` waits for each run's first
/// record (seconds, default [`SCREENSHOT_WAIT_DEFAULT_S`]).
#[cfg(feature = "gui")]
const SCREENSHOT_WAIT_ENV: &str = "MOPPA_SCREENSHOT_WAIT_S";
/// The default of [`SCREENSHOT_WAIT_ENV`].
#[cfg(feature = "gui")]
const SCREENSHOT_WAIT_DEFAULT_S: f64 = 10.0;

/// How long `view --screenshot` waits for a run to start (a usage error for a value that is not
/// a number of seconds in (0, 86400]).
#[cfg(feature = "gui")]
fn screenshot_wait() -> Result<std::time::Duration, String> {
    let Some(text) = std::env::var_os(SCREENSHOT_WAIT_ENV) else {
        return Ok(std::time::Duration::from_secs_f64(SCREENSHOT_WAIT_DEFAULT_S));
    };
    let text = text.to_string_lossy();
    match text.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{SCREENSHOT_WAIT_ENV} must be a number of seconds in (0, 86400] (got '{text}')"
        )),
    }
}

/// Built without the app: print the help.
#[cfg(not(feature = "gui"))]
fn open_app(_cli: &Cli, _open: Vec<std::path::PathBuf>) -> i32 {
    use clap::CommandFactory as _;
    Cli::command().print_help().ok();
    println!("\n(this build has no desktop app: rebuild with the default `gui` feature)");
    0
}
