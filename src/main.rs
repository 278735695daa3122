//! `moppa`: the MoPPA Studio desktop app and command line.

use clap::Parser as _;
use moppa_studio::cli::{Cli, run};

fn main() {
    moppa_studio::util::keep_freed_memory();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        std::process::exit(open_app(&cli));
    };
    match run(command) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", e.message());
            std::process::exit(e.exit_code());
        }
    }
}

/// No subcommand: the desktop app on the built-in default.
#[cfg(feature = "gui")]
fn open_app(cli: &Cli) -> i32 {
    let opts = match cli.app_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {}", e.message());
            return e.exit_code();
        }
    };
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

/// Built without the app: print the help.
#[cfg(not(feature = "gui"))]
fn open_app(_cli: &Cli) -> i32 {
    use clap::CommandFactory as _;
    Cli::command().print_help().ok();
    println!("\n(this build has no desktop app: rebuild with the default `gui` feature)");
    0
}
