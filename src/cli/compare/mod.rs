//! `moppa compare`: several methods on the same backbone, data and budget over several seeds,
//! as one markdown table with every accuracy's interval; with `--lr-grid`, each method's learning
//! rate chosen on validation; or the same sweep planned for a cluster (`--plan`, and the VTAB-1K
//! protocol with `--protocol vtab1k`) and its table collected from the run folders (`--collect`).

mod plan;
mod results;
mod select;
mod table;
mod vtab;
mod vtab_table;

use self::plan::{PLAN_JSON, Plan, PlannedRun, write_plan};
use self::results::{DIVERGED, Outcome, report, result_of};
use self::table::{Acc, RunResult, lr_text};
use super::args::RunArgs;
use super::train::{claim_out, headless, preflight};
use super::{CliError, usage};
use crate::config::{COMPARE_DEFAULT, METHOD_CATALOGUE, MethodConfig, RunConfig, method_names, named_method};
use crate::train::WorkerHandle;
use crate::train::protocol::{Event, FinishReason};
use crate::util::group_digits;
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn compare_help() -> String {
    let mut s = String::from(
        "Examples:\n  moppa compare --seeds 2                              (the table in docs/method.md)\n  moppa compare --seeds 3 --lr-grid 1e-3,3e-3,1e-2,3e-2   (each method's lr chosen on validation)\n  moppa compare --plan sweep --seeds 3 --gpus 4       (plan it for a cluster)\n  xargs -P 4 -d '\\n' -I{} sh -c {} < sweep/jobs.txt   (or: sbatch sweep/slurm.sh)\n  moppa compare --collect sweep                       (the same table)\n  moppa compare --protocol vtab1k --data vtab-1k --plan vtab --lr-grid 1e-3,1e-2   (docs/vtab.md)\nMethods:",
    );
    for m in METHOD_CATALOGUE {
        let _ = write!(s, "\n  {:<15} {}", m.name, m.about);
    }
    s
}

/// A comparison protocol (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// VTAB-1K: per task, the lr grid on train800 → val200, then the final run on
    /// train800val200 at the chosen rate, tested on test.
    Vtab1k,
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
    /// Learning rates to try, comma-separated (also `lr_grid = [..]` in a --config file): every
    /// method runs at every rate and seed; per method the rate with the best mean validation
    /// accuracy of the final models over seeds is reported (ties: the smaller).
    #[arg(long, value_delimiter = ',', value_parser = parse_lr, value_name = "LR,LR,…")]
    pub lr_grid: Vec<f64>,
    /// Write the markdown table here too.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Train nothing: write DIR/runs/{method}[-lr{lr}]-seed{seed}/config.toml per run,
    /// DIR/jobs.txt (one `moppa train` line per run) and DIR/slurm.sh (a job array), for a cluster
    /// or `xargs -P`.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["collect", "select"])]
    pub plan: Option<PathBuf>,
    /// With --plan: a protocol over a folder of task folders given as --data (vtab1k: grid,
    /// select and final stages, chained).
    #[arg(long, value_enum, requires = "plan")]
    pub protocol: Option<Protocol>,
    /// With --plan: assign the runs to CUDA devices 0..N-1 round-robin (`--device cuda:i`).
    #[arg(long, value_name = "N", requires = "plan")]
    pub gpus: Option<usize>,
    /// Train nothing: build the table from the run folders of a `--plan` (or `--out`) folder;
    /// missing, unfinished and failed runs are listed (and the exit status is 1).
    #[arg(long, value_name = "DIR", conflicts_with = "select")]
    pub collect: Option<PathBuf>,
    /// Train nothing: a VTAB-1K plan's select step for one task folder (DIR/TASK): choose each
    /// method's rate from its grid runs and write its final runs' configs.
    #[arg(long, value_name = "DIR/TASK")]
    pub select: Option<PathBuf>,
    /// The shared run settings (backbone, data, steps, batch, …; --method/--seed are set per run).
    #[command(flatten)]
    pub run: RunArgs,
}

/// A learning rate of `--lr-grid`: a number in the learning rate's range.
fn parse_lr(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    crate::config::range::LR
        .named("--lr-grid")
        .check(v)
        .map_err(|e| e.to_string())
}

/// The most seeds per method (INTERFACES.md, "Bounds").
pub const MAX_SEEDS: u64 = 1_000;
/// The most runs one sweep may hold (INTERFACES.md, "Bounds"): a whole VTAB-1K grid fits many
/// times over.
pub const MAX_RUNS: u64 = 100_000;

/// Writes the table to stdout and `--output`.
fn emit(args: &CompareArgs, table: &str) -> Result<(), CliError> {
    print!("{table}");
    if let Some(p) = &args.output {
        std::fs::write(p, table)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", p.display())))?;
    }
    Ok(())
}

/// A sweep: the shared configuration, its methods (name and config), the learning-rate grid
/// (ascending; empty: each method at its own rate) and the table's closing line.
struct Sweep {
    base: RunConfig,
    methods: Vec<(String, MethodConfig)>,
    grid: Vec<f64>,
    /// Said once above the table (images resized to the model's input).
    header: Option<String>,
    footer: String,
}

impl Sweep {
    /// Every run of the sweep in table order (methods as given, rates ascending, seeds
    /// ascending), its folder under `sub`.
    fn runs(&self, seeds: u64, sub: &Path) -> Vec<PlannedRun> {
        let mut out = Vec::new();
        for (name, method) in &self.methods {
            let rates: Vec<Option<f64>> = if self.grid.is_empty() {
                vec![None]
            } else {
                self.grid.iter().copied().map(Some).collect()
            };
            for rate in rates {
                for seed in 0..seeds {
                    let lr = rate.unwrap_or_else(|| {
                        RunConfig {
                            method: method.clone(),
                            ..self.base.clone()
                        }
                        .lr()
                    });
                    out.push(PlannedRun {
                        name: name.clone(),
                        label: method.label(),
                        seed,
                        dir: sub.join(run_name(name, rate, seed)),
                        lr: Some(lr),
                    });
                }
            }
        }
        out
    }

    /// The configuration of one planned run (its folder not set).
    fn config(&self, run: &PlannedRun) -> RunConfig {
        self.config_on(&self.base, run)
    }

    /// [`Self::config`] on another shared configuration (a VTAB-1K task's).
    fn config_on(&self, base: &RunConfig, run: &PlannedRun) -> RunConfig {
        let method = self
            .methods
            .iter()
            .find(|(n, _)| *n == run.name)
            .map_or_else(|| base.method.clone(), |(_, m)| m.clone());
        RunConfig {
            method,
            seed: run.seed,
            lr: if self.grid.is_empty() { base.lr } else { run.lr },
            ..base.clone()
        }
    }
}

/// The learning-rate grid (`--lr-grid`, else `lr_grid` in the `--config` file, whose text is
/// returned without that key for the run settings), ascending; a rate given twice is refused.
fn grid_of(args: &CompareArgs) -> Result<(Vec<f64>, Option<String>), CliError> {
    let mut grid = args.lr_grid.clone();
    let mut text = None;
    if let Some(path) = args.run.config.as_ref().filter(|_| args.run.resume.is_none()) {
        let raw =
            std::fs::read_to_string(path).map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", path.display())))?;
        let mut table: toml::Table = toml::from_str(&raw).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        if let Some(v) = table.remove("lr_grid") {
            let bad = || {
                usage(format!(
                    "{}: lr_grid must be a list of learning rates, e.g. [1e-3, 1e-2]",
                    path.display()
                ))
            };
            let items = v.as_array().ok_or_else(bad)?;
            let from_file = items
                .iter()
                .map(|i| {
                    let x = i
                        .as_float()
                        .or_else(|| i.as_integer().map(|n| n as f64))
                        .ok_or_else(bad)?;
                    crate::config::range::LR
                        .named("lr_grid")
                        .check(x)
                        .map_err(|e| usage(format!("{}: {e}", path.display())))
                })
                .collect::<Result<Vec<f64>, _>>()?;
            if grid.is_empty() {
                grid = from_file;
            }
            text = Some(toml::to_string(&table).map_err(|e| CliError::Failure(e.into()))?);
        }
    }
    grid.sort_by(f64::total_cmp);
    if let Some(w) = grid.windows(2).find(|w| w[0].total_cmp(&w[1]).is_eq()) {
        return Err(usage(format!(
            "--lr-grid names {} twice (a rate's runs would share a folder)",
            lr_text(w[0])
        )));
    }
    Ok((grid, text))
}

fn sweep(args: &CompareArgs) -> Result<Sweep, CliError> {
    let (grid, config_text) = grid_of(args)?;
    check_size(args, grid.len().max(1) as u64, 1)?;
    let mut base = args.run.resolve_with(config_text.as_deref())?;
    if !grid.is_empty() && base.lr.is_some() {
        return Err(usage(
            "--lr (or lr in --config) and --lr-grid: give one (the grid sets each run's rate)",
        ));
    }
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
    if args.protocol.is_none() {
        for (_, method) in &methods {
            preflight(&RunConfig {
                method: method.clone(),
                ..base.clone()
            })?;
        }
    }
    let steps = base.steps.map_or_else(|| "default".to_owned(), |s| s.to_string());
    let footer = format!(
        "{} seed{} each; {} steps of batch {} on `{}` with `{}`.",
        args.seeds,
        if args.seeds == 1 { "" } else { "s" },
        steps,
        base.batch,
        base.data,
        base.backbone
    );
    let header = if args.protocol.is_none() {
        resize_note(&base)
    } else {
        None
    };
    if let Some(h) = &header {
        eprintln!("note: {h}");
    }
    Ok(Sweep {
        base,
        methods,
        grid,
        header,
        footer,
    })
}

/// When the data's images are not the model's input size: one line saying they are resized,
/// from what (the first training image; a folder's images may differ) to what.
fn resize_note(cfg: &RunConfig) -> Option<String> {
    let size = crate::train::backbone::backbone_config(&cfg.backbone, cfg.heads)
        .ok()?
        .img_size;
    let data = crate::data::load(&cfg.data, cfg.final_split, cfg.seed).ok()?;
    let first = crate::data::transform::decode(data.train.first()?).ok()?;
    (first.width as usize != size || first.height as usize != size).then(|| {
        format!(
            "images are resized to the model's input: {}×{} (the first training image) → {size}×{size}",
            first.width, first.height
        )
    })
}

/// Refuses, before anything is resolved or written, a sweep larger than the bounds allow
/// (methods × rates × seeds × `per_seed` runs), and one naming a method twice (two runs would
/// share a folder).
fn check_size(args: &CompareArgs, rates: u64, per_seed: u64) -> Result<(), CliError> {
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
    let runs = methods
        .saturating_mul(rates)
        .saturating_mul(args.seeds)
        .saturating_mul(per_seed);
    if runs > MAX_RUNS {
        let rates = if rates > 1 {
            format!(" × {rates} rates")
        } else {
            String::new()
        };
        let tasks = if per_seed > 1 {
            format!(" × {per_seed} (tasks and stages)")
        } else {
            String::new()
        };
        return Err(usage(format!(
            "a sweep of {} runs ({methods} methods{rates} × {} seeds{tasks}): at most {} runs",
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

/// The folder name of one run of a sweep: `{method}-seed{seed}`, or with a grid
/// `{method}-lr{lr}-seed{seed}` (the rate spelled as [`lr_text`] spells it).
fn run_name(method: &str, lr: Option<f64>, seed: u64) -> String {
    match lr {
        Some(lr) => format!("{method}-lr{}-seed{seed}", lr_text(lr)),
        None => format!("{method}-seed{seed}"),
    }
}

/// Runs `moppa compare`.
pub fn compare(args: &CompareArgs) -> Result<i32, CliError> {
    if let Some(dir) = &args.collect {
        return collect(args, dir);
    }
    if let Some(dir) = &args.select {
        return select::select(dir);
    }
    if let Some(dir) = &args.plan {
        if args.protocol == Some(Protocol::Vtab1k) {
            return vtab::plan(args, dir);
        }
        return plan::plan(args, dir);
    }
    let sweep = sweep(args)?;
    let runs = sweep.runs(args.seeds, Path::new(""));
    if let Some(out) = &sweep.base.out {
        write_plan(out, args.seeds, &runs, &sweep.grid, sweep.header.clone(), &sweep.footer)?;
    }
    let mut outcomes = Vec::new();
    for run in &runs {
        let dir = sweep.base.out.as_ref().map(|o| o.join(&run.dir));
        let cfg = RunConfig {
            out: dir.clone(),
            ..sweep.config(run)
        };
        let shown = run_name(&run.name, run.lr.filter(|_| !sweep.grid.is_empty()), run.seed);
        eprintln!("== {shown}");
        let result = match claim_out(&args.run, cfg)? {
            // --auto-resume of a run that is done: its own record.
            None => dir
                .as_deref()
                .map_or_else(|| Err("no run folder".to_owned()), result_of),
            Some(cfg) => train_one(&shown, cfg)?,
        };
        outcomes.push(Outcome { run, result });
    }
    let (text, absent) = report(&outcomes, &sweep.grid, sweep.header.as_deref(), &sweep.footer);
    emit(args, &text)?;
    Ok(i32::from(absent > 0))
}

/// Trains one run of the sweep here. A run that diverges is an outcome (`Err`, named in the
/// table's list; a grid counts it as validation accuracy 0), any other end an error.
fn train_one(name: &str, cfg: RunConfig) -> Result<Result<RunResult, String>, CliError> {
    let handle = WorkerHandle::spawn(cfg, headless()).map_err(|e| CliError::Failure(e.into()))?;
    let (mut finished, mut trainable, mut val, mut test) = (None, 0, None, None);
    for ev in handle.events() {
        match ev {
            Event::Started(info) => trainable = info.trainable,
            Event::Error(n) | Event::Diverged(n) => eprintln!("error: {}", n.message),
            Event::Eval(e) if e.acc.is_finite() => {
                let acc = Some(Acc { acc: e.acc, n: e.n });
                if e.split == "test" {
                    test = acc;
                } else {
                    val = acc;
                }
            }
            Event::Finished(f) => {
                finished = Some(f);
                break;
            }
            _ => {}
        }
    }
    handle.join();
    let f = finished.ok_or_else(|| CliError::Failure(anyhow::anyhow!("{name}: the run ended without a result")))?;
    match f.reason {
        FinishReason::Done => {}
        FinishReason::Diverged => return Ok(Err(DIVERGED.to_owned())),
        other => {
            return Err(CliError::Failure(anyhow::anyhow!("{name} ended: {}", other.name())));
        }
    }
    let shown = |a: Option<Acc>| a.map_or_else(|| "–".to_owned(), |a| format!("{:.4}", a.acc));
    eprintln!("   val {} test {} in {:.1} s", shown(val), shown(test), f.time_s);
    Ok(Ok(RunResult {
        trainable,
        val,
        test,
        steps_per_s: f.steps as f64 / f.time_s.max(1e-9),
    }))
}

/// Reads a compare folder's `plan.json`.
fn read_plan(dir: &Path) -> Result<Plan, CliError> {
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
    if !(1..=plan::PLAN_FORMAT).contains(&plan.format) {
        return Err(CliError::Failure(anyhow::anyhow!(
            "{}: plan format {} (this moppa reads formats 1 to {})",
            path.display(),
            plan.format,
            plan::PLAN_FORMAT
        )));
    }
    Ok(plan)
}

/// `moppa compare --collect DIR`: the table from the run folders a plan names.
fn collect(args: &CompareArgs, dir: &Path) -> Result<i32, CliError> {
    let plan = read_plan(dir)?;
    if plan.protocol.as_deref() == Some(vtab::VTAB1K) {
        let (text, absent) = vtab_table::collect(dir, &plan);
        emit(args, &text)?;
        return Ok(i32::from(absent > 0));
    }
    let outcomes: Vec<Outcome<'_>> = plan
        .runs
        .iter()
        .map(|run| Outcome {
            run,
            result: result_of(&dir.join(&run.dir)),
        })
        .collect();
    let (text, absent) = report(&outcomes, &plan.lr_grid, plan.header.as_deref(), &plan.footer);
    emit(args, &text)?;
    Ok(i32::from(absent > 0))
}
