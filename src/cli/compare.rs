//! `moppa compare`: several methods on the same backbone, data and budget over several seeds,
//! as one markdown table.

use super::args::RunArgs;
use super::train::{claim_out, headless, preflight};
use super::{CliError, usage};
use crate::config::{COMPARE_DEFAULT, METHOD_CATALOGUE, MethodConfig, RunConfig, method_names, named_method};
use crate::train::WorkerHandle;
use crate::train::protocol::{Event, FinishReason};
use crate::train::runfolder::last_record;
use crate::util::group_digits;
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;

fn compare_help() -> String {
    let mut s = String::from("Example (the README's table):\n  moppa compare --seeds 3 --steps 600\nMethods:");
    for m in METHOD_CATALOGUE {
        let _ = write!(s, "\n  {:<15} {}", m.name, m.about);
    }
    s
}

/// `moppa compare`.
#[derive(Debug, Clone, Args)]
#[command(after_help = compare_help())]
pub struct CompareArgs {
    /// Comma-separated methods.
    #[arg(long, value_delimiter = ',', default_value = COMPARE_DEFAULT)]
    pub methods: Vec<String>,
    /// Seeds per method (0, 1, …).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Write the markdown table here too.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The shared run settings (backbone, data, steps, batch, …; --method/--seed are set per run).
    #[command(flatten)]
    pub run: RunArgs,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Runs `moppa compare`.
pub fn compare(args: &CompareArgs) -> Result<i32, CliError> {
    let base = args.run.resolve()?;
    if args.seeds == 0 {
        return Err(usage("--seeds must be ≥ 1"));
    }
    let methods: Vec<(String, MethodConfig)> = args
        .methods
        .iter()
        .map(|m| {
            named_method(m, &base.method)
                .map(|c| (m.clone(), c))
                .ok_or_else(|| usage(format!("unknown method '{m}' in --methods ({})", method_names())))
        })
        .collect::<Result<_, _>>()?;
    for (_, method) in &methods {
        preflight(&RunConfig {
            method: method.clone(),
            ..base.clone()
        })?;
    }
    let mut rows = Vec::new();
    for (name, method) in &methods {
        let (mut val, mut test, mut rate, mut trainable) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for seed in 0..args.seeds {
            let cfg = RunConfig {
                method: method.clone(),
                seed,
                out: base.out.as_ref().map(|o| o.join(format!("{name}-seed{seed}"))),
                ..base.clone()
            };
            eprintln!("== {name} (seed {seed})");
            let Some(cfg) = claim_out(&args.run, cfg)? else {
                // --auto-resume of a run that is done: its own record.
                let dir = base.out.as_ref().map(|o| o.join(format!("{name}-seed{seed}")));
                let rec = dir.as_deref().and_then(|d| last_record(d, "finished"));
                let started = dir.as_deref().and_then(|d| last_record(d, "started"));
                let (Some(rec), Some(started)) = (rec, started) else {
                    return Err(CliError::Failure(anyhow::anyhow!(
                        "{name} (seed {seed}): its run folder has no result"
                    )));
                };
                trainable = started["trainable"].as_u64().unwrap_or(0) as usize;
                val.push(rec["best_val_acc"].as_f64().unwrap_or(f64::NAN));
                test.push(rec["test_acc"].as_f64().unwrap_or(f64::NAN));
                rate.push(rec["step"].as_f64().unwrap_or(0.0) / rec["time_s"].as_f64().unwrap_or(1.0).max(1e-9));
                continue;
            };
            let handle = WorkerHandle::spawn(cfg, headless()).map_err(|e| CliError::Failure(e.into()))?;
            let mut finished = None;
            for ev in handle.events() {
                match ev {
                    Event::Started(info) => trainable = info.trainable,
                    Event::Error(n) | Event::Diverged(n) => eprintln!("error: {}", n.message),
                    Event::Finished(f) => {
                        finished = Some(f);
                        break;
                    }
                    _ => {}
                }
            }
            handle.join();
            let f =
                finished.ok_or_else(|| CliError::Failure(anyhow::anyhow!("{name}: the run ended without a result")))?;
            if f.reason != FinishReason::Done {
                return Err(CliError::Failure(anyhow::anyhow!(
                    "{name} (seed {seed}) ended: {:?}",
                    f.reason
                )));
            }
            eprintln!(
                "   val {:.4} test {:.4} in {:.1} s",
                f.best_val_acc.unwrap_or(f64::NAN),
                f.test_acc.unwrap_or(f64::NAN),
                f.time_s
            );
            val.push(f.best_val_acc.unwrap_or(f64::NAN));
            test.push(f.test_acc.unwrap_or(f64::NAN));
            rate.push(f.steps as f64 / f.time_s.max(1e-9));
        }
        rows.push((
            name.clone(),
            method.label(),
            trainable,
            mean_std(&val),
            mean_std(&test),
            mean_std(&rate).0,
        ));
    }
    let mut table = String::from("| method | trainable | val acc | test acc | steps/s |\n|---|---:|---:|---:|---:|\n");
    for (_, label, n, (vm, vs), (tm, ts), r) in &rows {
        let _ = writeln!(
            table,
            "| {label} | {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {r:.1} |",
            group_digits(*n),
            100.0 * vm,
            100.0 * vs,
            100.0 * tm,
            100.0 * ts
        );
    }
    let steps = base.steps.map_or_else(|| "default".to_owned(), |s| s.to_string());
    let _ = writeln!(
        table,
        "\n{} seeds each; {} steps of batch {} on `{}` with `{}`; val = best validation accuracy, test = final test accuracy (%), mean ± std.",
        args.seeds, steps, base.batch, base.data, base.backbone
    );
    print!("{table}");
    if let Some(p) = &args.output {
        std::fs::write(p, &table)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", p.display())))?;
    }
    Ok(0)
}
