//! `moppa`: the MoPPA Studio desktop app and command line.

use clap::{CommandFactory as _, Parser as _};
use moppa_studio::cli::{Cli, run};

fn main() {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        // Until the app lands, no subcommand prints help.
        Cli::command().print_help().ok();
        println!();
        return;
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
