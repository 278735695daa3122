//! `moppa predict`: a trained adapter's classes for your own images, as CSV.

use super::eval::AdapterSource;
use super::{CliError, usage};
use crate::train::evaluate::predict_files;
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `moppa predict`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa predict --run runs/digits my-digits/            (path,class,prob to stdout)\n  moppa predict --adapter a.safetensors --backbone vit.safetensors --top 3 --output p.csv a.jpg b.png\nImages are resized and normalised as in evaluation (the backbone's input size, mean and std). Files that\ncannot be read are named on stderr and counted; the exit status is 1 only when none could be read."
)]
pub struct PredictArgs {
    /// The adapter and its backbone.
    #[command(flatten)]
    pub source: AdapterSource,
    /// The K most likely classes per image (`path,rank,class,prob`); without it `path,class,prob`.
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,
    /// Write the CSV here (atomically) instead of to stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Image files (PNG, JPEG, …) and folders (their PNG/JPEG files, recursively).
    #[arg(required = true, value_name = "IMAGES_OR_FOLDERS")]
    pub inputs: Vec<PathBuf>,
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Runs `moppa predict`.
pub fn predict(args: &PredictArgs) -> Result<(), CliError> {
    if args.top == Some(0) {
        return Err(usage("--top must be ≥ 1"));
    }
    if args.batch == 0 {
        return Err(usage("--batch must be ≥ 1"));
    }
    let resolved = args.source.resolve()?;
    let (files, mut skipped) = crate::data::image_files(&args.inputs);
    let named = files.len() + skipped.len();
    let pred = if files.is_empty() {
        None
    } else {
        Some(
            predict_files(&resolved.adapter, resolved.on(), args.source.force, &files, args.batch)
                .map_err(|e| CliError::Failure(e.into()))?,
        )
    };
    let mut csv = String::new();
    let mut predicted = 0;
    if let Some(p) = &pred {
        for w in &p.warnings {
            eprintln!("warning: {w}");
        }
        skipped.extend(p.skipped.iter().cloned());
        csv.push_str(if args.top.is_some() {
            "path,rank,class,prob\n"
        } else {
            "path,class,prob\n"
        });
        for (path, probs) in &p.rows {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let path = field(&path.display().to_string());
            let name = |c: usize| field(p.classes.get(c).map_or("?", String::as_str));
            match args.top {
                Some(k) => {
                    for (rank, &c) in order.iter().take(k).enumerate() {
                        let _ = writeln!(csv, "{path},{},{},{:.6}", rank + 1, name(c), probs[c]);
                    }
                }
                None => {
                    if let Some(&c) = order.first() {
                        let _ = writeln!(csv, "{path},{},{:.6}", name(c), probs[c]);
                    }
                }
            }
        }
        predicted = p.rows.len();
    }
    for (path, why) in &skipped {
        eprintln!("warning: cannot read {}: {why}", path.display());
    }
    if predicted == 0 {
        return Err(CliError::Failure(anyhow::anyhow!(
            "no image could be read ({named} file(s) named or found, {} unreadable)",
            skipped.len()
        )));
    }
    match &args.output {
        Some(out) => {
            crate::util::write_atomic(out, |w| std::io::Write::write_all(w, csv.as_bytes()))
                .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", out.display())))?;
        }
        None => print!("{csv}"),
    }
    eprintln!(
        "predicted {predicted} image(s){}{}",
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; {} could not be read (named above)", skipped.len())
        },
        args.output
            .as_ref()
            .map_or(String::new(), |o| format!("; wrote {}", o.display()))
    );
    Ok(())
}
