//! `moppa compare`: several methods on the same backbone, data and budget over several seeds,
//! as one markdown table; or the same sweep planned for a cluster (`--plan`) and its table
//! collected from the finished run folders (`--collect`).

mod plan;

use self::plan::{PLAN_JSON, Plan, write_plan};
use super::args::RunArgs;
use super::train::{claim_out, headless, preflight};
use super::{CliError, usage};
use crate::config::{COMPARE_DEFAULT, METHOD_CATALOGUE, MethodConfig, RunConfig, method_names, named_method};
use crate::train::WorkerHandle;
use crate::train::protocol::{Event, FinishReason};
use crate::train::runfolder::{METRICS_JSONL, is_run_folder, read_outcome};
use crate::util::group_digits;
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn compare_help() -> String {
    let mut s = String::from(
        "Examples:\n  moppa compare --seeds 3 --steps 600                 (the README's table)\n  moppa compare --plan sweep --seeds 3 --gpus 4       (plan it for a cluster)\n  xargs -P 4 -d '\\n' -I{} sh -c {} < sweep/jobs.txt   (or: sbatch sweep/slurm.sh)\n  moppa compare --collect sweep                       (the same table)\nMethods:",
    );
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
    /// Seeds per method (0, 1, …; at most 1,000, and at most 100,000 runs in all).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Write the markdown table here too.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Train nothing: write DIR/runs/{method}-seed{seed}/config.toml per run, DIR/jobs.txt (one
    /// `moppa train` line per run) and DIR/slurm.sh (a job array), for a cluster or `xargs -P`.
    #[arg(long, value_name = "DIR", conflicts_with = "collect")]
    pub plan: Option<PathBuf>,
    /// With --plan: assign the runs to CUDA devices 0..N-1 round-robin (`--device cuda:i`).
    #[arg(long, value_name = "N", requires = "plan")]
    pub gpus: Option<usize>,
    /// Train nothing: build the table from the run folders of a `--plan` (or `--out`) folder;
    /// missing, unfinished and failed runs are listed (and the exit status is 1).
    #[arg(long, value_name = "DIR")]
    pub collect: Option<PathBuf>,
    /// The shared run settings (backbone, data, steps, batch, …; --method/--seed are set per run).
    #[command(flatten)]
    pub run: RunArgs,
}

/// The most seeds per method (INTERFACES.md, "Bounds").
pub const MAX_SEEDS: u64 = 1_000;
/// The most runs one sweep may hold (INTERFACES.md, "Bounds"): a whole VTAB-1K grid fits many
/// times over.
pub const MAX_RUNS: u64 = 100_000;

/// A finished run's figures for the table.
struct RunResult {
    trainable: usize,
    val: f64,
    test: f64,
    steps_per_s: f64,
}

/// One table row: a method over its seeds.
struct Row {
    label: String,
    results: Vec<RunResult>,
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

/// The markdown table (the same for a live compare and a collected one).
fn table(rows: &[Row], footer: &str) -> String {
    let mut table = String::from("| method | trainable | val acc | test acc | steps/s |\n|---|---:|---:|---:|---:|\n");
    for row in rows {
        let col = |f: fn(&RunResult) -> f64| mean_std(&row.results.iter().map(f).collect::<Vec<_>>());
        let ((vm, vs), (tm, ts), (r, _)) = (col(|r| r.val), col(|r| r.test), col(|r| r.steps_per_s));
        let trainable = row.results.last().map_or(0, |r| r.trainable);
        let _ = writeln!(
            table,
            "| {} | {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {r:.1} |",
            row.label,
            group_digits(trainable),
            100.0 * vm,
            100.0 * vs,
            100.0 * tm,
            100.0 * ts
        );
    }
    let _ = writeln!(table, "\n{footer}");
    table
}

/// A finished run's figures from its folder, or why there are none. Lines of its log that are
/// not records (not UTF-8, not JSON) are skipped with a warning.
fn result_of(dir: &Path) -> Result<RunResult, String> {
    if !is_run_folder(dir) {
        return Err("missing (no run folder yet)".into());
    }
    let outcome = read_outcome(dir).map_err(|e| format!("unreadable {METRICS_JSONL}: {e}"))?;
    if let Some(skipped) = outcome.stats.summary(&dir.join(METRICS_JSONL)) {
        eprintln!("warning: {skipped}");
    }
    let Some(rec) = outcome.finished else {
        return Err("unfinished (still running, or crashed: `moppa view` tells which)".into());
    };
    if rec.reason != FinishReason::Done {
        let why = rec.message.as_ref().map_or(String::new(), |m| format!(": {m}"));
        return Err(format!("ended {}{why}", rec.reason.name()));
    }
    let trainable = outcome.started.map_or(0, |s| s.trainable);
    Ok(RunResult {
        trainable,
        val: rec.best_val_acc.unwrap_or(f64::NAN),
        test: rec.test_acc.unwrap_or(f64::NAN),
        steps_per_s: rec.step as f64 / rec.time_s.max(1e-9),
    })
}

/// Writes the table to stdout and `--output`.
fn emit(args: &CompareArgs, table: &str) -> Result<(), CliError> {
    print!("{table}");
    if let Some(p) = &args.output {
        std::fs::write(p, table)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", p.display())))?;
    }
    Ok(())
}

/// The sweep's runs (method name and config, seed) and the table footer, from the flags.
/// A sweep's shared configuration, its methods (name and config) and the table's footer.
type Sweep = (RunConfig, Vec<(String, MethodConfig)>, String);

fn sweep(args: &CompareArgs) -> Result<Sweep, CliError> {
    let mut base = args.run.resolve()?;
    // An hf: backbone is resolved once, up front: every run of the sweep (here or from a plan,
    // later, elsewhere) uses the same commit.
    if crate::train::hub::HubId::parse(&base.backbone).is_some() {
        super::backbones::fetch(&base.backbone, None)?;
        let found = crate::train::backbone::resolve_backbone(&base.backbone, None, &mut ())
            .map_err(|e| CliError::Failure(e.into()))?;
        if let Some(hub) = found.hub {
            base.backbone = hub.pinned();
        }
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
    let steps = base.steps.map_or_else(|| "default".to_owned(), |s| s.to_string());
    let footer = format!(
        "{} seed{} each; {} steps of batch {} on `{}` with `{}`; val = best validation accuracy, test = final test accuracy (%), mean ± std.",
        args.seeds,
        if args.seeds == 1 { "" } else { "s" },
        steps,
        base.batch,
        base.data,
        base.backbone
    );
    Ok((base, methods, footer))
}

/// Refuses, before anything is resolved or written, a sweep larger than the bounds allow, and
/// one naming a method twice (two runs would share a folder).
fn check_size(args: &CompareArgs) -> Result<(), CliError> {
    if args.seeds == 0 {
        return Err(usage("--seeds must be ≥ 1"));
    }
    if args.seeds > MAX_SEEDS {
        return Err(usage(format!(
            "--seeds {}: at most {} seeds per method",
            args.seeds,
            group_digits(MAX_SEEDS as usize)
        )));
    }
    let methods = args.methods.len() as u64;
    let runs = methods.saturating_mul(args.seeds);
    if runs > MAX_RUNS {
        return Err(usage(format!(
            "a sweep of {} runs ({methods} methods × {} seeds): at most {} runs",
            group_digits(runs as usize),
            args.seeds,
            group_digits(MAX_RUNS as usize)
        )));
    }
    for (i, m) in args.methods.iter().enumerate() {
        if args.methods[..i].contains(m) {
            return Err(usage(format!(
                "--methods names {m:?} twice (its runs would share a folder)"
            )));
        }
    }
    Ok(())
}

/// The folder name of one run of a sweep.
fn run_name(method: &str, seed: u64) -> String {
    format!("{method}-seed{seed}")
}

/// Runs `moppa compare`.
pub fn compare(args: &CompareArgs) -> Result<i32, CliError> {
    if let Some(dir) = &args.collect {
        return collect(args, dir);
    }
    check_size(args)?;
    if let Some(dir) = &args.plan {
        return plan::plan(args, dir);
    }
    let (base, methods, footer) = sweep(args)?;
    if let Some(out) = &base.out {
        write_plan(out, args.seeds, &methods, &footer, Path::new(""))?;
    }
    let mut rows = Vec::new();
    for (name, method) in &methods {
        let mut row = Row {
            label: method.label(),
            results: Vec::new(),
        };
        for seed in 0..args.seeds {
            let dir = base.out.as_ref().map(|o| o.join(run_name(name, seed)));
            let cfg = RunConfig {
                method: method.clone(),
                seed,
                out: dir.clone(),
                ..base.clone()
            };
            eprintln!("== {name} (seed {seed})");
            let Some(cfg) = claim_out(&args.run, cfg)? else {
                // --auto-resume of a run that is done: its own record.
                let result = dir
                    .as_deref()
                    .map_or_else(|| Err("no run folder".to_owned()), result_of);
                row.results
                    .push(result.map_err(|why| CliError::Failure(anyhow::anyhow!("{name} (seed {seed}): {why}")))?);
                continue;
            };
            row.results.push(train_one(name, seed, cfg)?);
        }
        rows.push(row);
    }
    emit(args, &table(&rows, &footer))?;
    Ok(0)
}

/// Trains one run of the sweep here.
fn train_one(name: &str, seed: u64, cfg: RunConfig) -> Result<RunResult, CliError> {
    let handle = WorkerHandle::spawn(cfg, headless()).map_err(|e| CliError::Failure(e.into()))?;
    let (mut finished, mut trainable) = (None, 0);
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
    let f = finished.ok_or_else(|| CliError::Failure(anyhow::anyhow!("{name}: the run ended without a result")))?;
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
    Ok(RunResult {
        trainable,
        val: f.best_val_acc.unwrap_or(f64::NAN),
        test: f.test_acc.unwrap_or(f64::NAN),
        steps_per_s: f.steps as f64 / f.time_s.max(1e-9),
    })
}

/// `moppa compare --collect DIR`: the table from the run folders a plan names.
fn collect(args: &CompareArgs, dir: &Path) -> Result<i32, CliError> {
    let path = dir.join(PLAN_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            usage(format!(
                "{}: no {PLAN_JSON} (made by `moppa compare --plan DIR`, or `moppa compare --out DIR`)",
                dir.display()
            ))
        } else {
            CliError::Failure(anyhow::anyhow!("{}: {e}", path.display()))
        }
    })?;
    let plan: Plan = serde_json::from_str(&text)
        .map_err(|e| CliError::Failure(anyhow::anyhow!("{}: not a compare plan: {e}", path.display())))?;
    if plan.format != 1 {
        return Err(CliError::Failure(anyhow::anyhow!(
            "{}: plan format {} (this moppa reads format 1)",
            path.display(),
            plan.format
        )));
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut absent = Vec::new();
    for run in &plan.runs {
        let result = result_of(&dir.join(&run.dir));
        if !rows.iter().any(|r| r.label == run.label) {
            rows.push(Row {
                label: run.label.clone(),
                results: Vec::new(),
            });
        }
        let Some(row) = rows.iter_mut().find(|r| r.label == run.label) else {
            continue;
        };
        match result {
            Ok(r) => row.results.push(r),
            Err(why) => absent.push(format!("{} ({}): {why}", run.dir.display(), run.label)),
        }
    }
    let rows: Vec<Row> = rows.into_iter().filter(|r| !r.results.is_empty()).collect();
    let mut out = table(&rows, &plan.footer);
    if !absent.is_empty() {
        let _ = writeln!(
            out,
            "\nNot in the table ({} of {} runs):",
            absent.len(),
            plan.runs.len()
        );
        for a in &absent {
            let _ = writeln!(out, "- {a}");
            eprintln!("not collected: {a}");
        }
    }
    emit(args, &out)?;
    Ok(i32::from(!absent.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_mean_and_sample_std() {
        let r = |val, test| RunResult {
            trainable: 1234,
            val,
            test,
            steps_per_s: 10.0,
        };
        let rows = [Row {
            label: "moppa r8".into(),
            results: vec![r(0.9, 0.8), r(0.8, 0.6)],
        }];
        let t = table(&rows, "footer");
        // mean 85 %, sample std of (90, 80) = 7.07 %; test 70 ± 14.14.
        assert!(
            t.contains("| moppa r8 | 1,234 | 85.00 ± 7.07 | 70.00 ± 14.14 | 10.0 |"),
            "{t}"
        );
        assert!(t.ends_with("\nfooter\n"));
    }
}
