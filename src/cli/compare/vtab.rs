//! `moppa compare --protocol vtab1k --data ROOT --plan DIR`: the VTAB-1K protocol as papers in
//! this field run it, as one plan in three stages. Per task, method and seed: the learning-rate
//! grid trained on `train800` and validated on `val200` (stage 1); per task, a select step
//! (`moppa compare --select DIR/TASK`, stage 2) that chooses each method's rate on the grid's
//! final validation accuracy and writes the final runs' configs; the final runs on
//! `train800val200` at that rate, tested on `test` (stage 3). The stages are job lists for
//! `xargs` run in order, and Slurm arrays chained with `--dependency=afterany` (a failed grid
//! run must not leave the finals pending forever: the select step chooses from the runs present
//! and says which are missing). `--collect DIR` prints the paper-style table: a column per task,
//! each group's mean and the mean of the group means.

use super::plan::{
    PLAN_FORMAT, Plan, PlannedRun, failure, job_line, make_root, plan_root, save_plan, shell_quote, slurm_script,
    write_run, write_text,
};
use super::table::{Acc, acc_cell, choose_lr, grid_table, lr_text};
use super::{CompareArgs, DIVERGED, check_size, result_of, run_name, sweep};
use crate::cli::{CliError, usage};
use crate::config::{DeviceChoice, RunConfig};
use crate::train::runfolder::{CONFIG_TOML, is_run_folder};
use crate::util::group_digits;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The protocol's name in `plan.json`.
pub(super) const VTAB1K: &str = "vtab1k";

/// VTAB-1K's tasks by group, in the order papers print them (INTERFACES.md "Comparisons").
pub(super) const GROUPS: [(&str, &[&str]); 3] = [
    (
        "Natural",
        &[
            "cifar",
            "caltech101",
            "dtd",
            "oxford_flowers102",
            "oxford_iiit_pet",
            "svhn",
            "sun397",
        ],
    ),
    (
        "Specialized",
        &["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    ),
    (
        "Structured",
        &[
            "clevr_count",
            "clevr_dist",
            "dmlab",
            "kitti",
            "dsprites_loc",
            "dsprites_ori",
            "smallnorb_azi",
            "smallnorb_ele",
        ],
    ),
];

/// The grid when none is given.
const DEFAULT_GRID: [f64; 4] = [1e-3, 3e-3, 1e-2, 3e-2];

/// The most entries of the data folder looked at for task folders.
const MAX_ENTRIES: usize = 10_000;

/// One task's part of the plan (`DIR/TASK/task.json`), read by its select step.
#[derive(Debug, Serialize, Deserialize)]
struct TaskPlan {
    format: u32,
    task: String,
    seeds: u64,
    lr_grid: Vec<f64>,
    /// The grid's runs (folders relative to the task folder).
    grid: Vec<PlannedRun>,
    /// The final runs (folders relative to the task folder; their configs written by select).
    finals: Vec<PlannedRun>,
}

const TASK_JSON: &str = "task.json";
const SELECTED_JSON: &str = "selected.json";

/// What the select step chose for one method (`DIR/TASK/selected.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Selected {
    name: String,
    label: String,
    lr: Option<f64>,
    /// Grid runs it chose from, and those missing (named).
    used: usize,
    missing: Vec<String>,
}

/// The task folders under `root` in table order; folders with VTAB split files whose name is no
/// VTAB-1K task are named in a warning.
fn tasks_under(root: &Path) -> Result<Vec<String>, CliError> {
    let entries = std::fs::read_dir(root).map_err(|e| usage(format!("--data {}: {e}", root.display())))?;
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for entry in entries.take(MAX_ENTRIES).flatten() {
        let path = entry.path();
        if !path.join("train800.txt").is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if GROUPS.iter().any(|(_, tasks)| tasks.contains(&name.as_str())) {
            found.push(name);
        } else {
            unknown.push(name);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        eprintln!(
            "warning: {}: not VTAB-1K task names, left out: {}",
            root.display(),
            unknown.join(", ")
        );
    }
    let ordered: Vec<String> = GROUPS
        .iter()
        .flat_map(|(_, tasks)| tasks.iter())
        .filter(|t| found.iter().any(|f| f == *t))
        .map(|t| (*t).to_owned())
        .collect();
    if ordered.is_empty() {
        return Err(usage(format!(
            "--data {}: no VTAB-1K task folder in it (a folder named as a task, e.g. dtd/, holding train800.txt, val200.txt, train800val200.txt and test.txt)",
            root.display()
        )));
    }
    Ok(ordered)
}

/// `moppa compare --protocol vtab1k --plan DIR`.
pub(super) fn plan(args: &CompareArgs, dir: &Path) -> Result<i32, CliError> {
    plan_root(args, dir)?;
    let mut sweep = sweep(args)?;
    sweep.base = sweep.base.with_absolute_paths();
    let data_root = PathBuf::from(&sweep.base.data);
    if sweep.base.data.contains(':') || !data_root.is_dir() {
        return Err(usage(format!(
            "--protocol vtab1k: --data must be a folder of VTAB-1K task folders (got {})",
            sweep.base.data
        )));
    }
    let tasks = tasks_under(&data_root)?;
    if sweep.grid.is_empty() {
        sweep.grid = sweep
            .base
            .lr
            .take()
            .map_or_else(|| DEFAULT_GRID.to_vec(), |lr| vec![lr]);
        eprintln!(
            "note: the learning-rate grid is {} (--lr-grid sets it)",
            sweep.grid.iter().map(|l| lr_text(*l)).collect::<Vec<_>>().join(", ")
        );
    }
    check_size(args, sweep.grid.len() as u64, tasks.len() as u64 * 2)?;
    let given = sweep.base.data_given.clone().unwrap_or_else(|| sweep.base.data.clone());
    for task in &tasks {
        let data = data_root.join(task).to_string_lossy().into_owned();
        crate::data::check_spec(&data).map_err(usage)?;
    }
    if let Some(first) = tasks.first() {
        for (_, method) in &sweep.methods {
            super::preflight(&RunConfig {
                method: method.clone(),
                data: data_root.join(first).to_string_lossy().into_owned(),
                ..sweep.base.clone()
            })?;
        }
    }
    let root = make_root(dir)?;
    let (mut grid_jobs, mut select_jobs, mut final_jobs) = (String::new(), String::new(), String::new());
    let mut finals_all = Vec::new();
    let mut n = 0usize;
    for task in &tasks {
        let task_dir = root.join(task);
        let mut task_sweep_base = sweep.base.clone();
        task_sweep_base.data = data_root.join(task).to_string_lossy().into_owned();
        task_sweep_base.data_given = Some(format!("{}/{task}", given.trim_end_matches('/')));
        task_sweep_base.final_split = false;
        let grid_runs = sweep.runs(args.seeds, Path::new("grid"));
        for run in &grid_runs {
            let run_dir = task_dir.join(&run.dir);
            let cfg = RunConfig {
                out: Some(run_dir.clone()),
                device: args.gpus.map_or(task_sweep_base.device, |g| DeviceChoice::Cuda(n % g)),
                ..sweep.config_on(&task_sweep_base, run)
            };
            grid_jobs.push_str(&write_run(&cfg, &run_dir)?);
            grid_jobs.push('\n');
            n += 1;
        }
        let finals: Vec<PlannedRun> = sweep
            .methods
            .iter()
            .flat_map(|(name, method)| {
                (0..args.seeds).map(move |seed| PlannedRun {
                    name: name.clone(),
                    label: method.label(),
                    seed,
                    dir: PathBuf::from("final").join(run_name(name, None, seed)),
                    lr: None,
                })
            })
            .collect();
        for run in &finals {
            let run_dir = task_dir.join(&run.dir);
            final_jobs.push_str(&job_line(&run_dir.join(CONFIG_TOML), &run_dir));
            final_jobs.push('\n');
            finals_all.push(PlannedRun {
                dir: PathBuf::from(task).join(&run.dir),
                ..run.clone()
            });
        }
        let _ = writeln!(
            select_jobs,
            "moppa compare --select {}",
            shell_quote(&task_dir.to_string_lossy())
        );
        let task_plan = TaskPlan {
            format: 1,
            task: task.clone(),
            seeds: args.seeds,
            lr_grid: sweep.grid.clone(),
            grid: grid_runs,
            finals,
        };
        let text = serde_json::to_string_pretty(&task_plan).map_err(|e| failure(&task_dir, &e))?;
        write_text(&task_dir.join(TASK_JSON), &text)?;
    }
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| failure(&logs, &e))?;
    let gpus = args.gpus.is_some();
    for (file, jobs, name, count, on_gpu) in [
        ("grid.txt", &grid_jobs, "moppa-grid", n, gpus),
        ("select.txt", &select_jobs, "moppa-select", tasks.len(), false),
        ("final.txt", &final_jobs, "moppa-final", finals_all.len(), gpus),
    ] {
        write_text(&root.join(file), jobs)?;
        let script = slurm_script(&root, file, name, count, on_gpu);
        write_text(
            &root.join(format!("slurm-{}.sh", file.trim_end_matches(".txt"))),
            &script,
        )?;
    }
    write_text(&root.join("submit.sh"), &submit_script(&root))?;
    write_text(&root.join("run-local.sh"), &local_script(&root))?;
    let header = tasks.first().and_then(|t| {
        super::resize_note(&RunConfig {
            data: data_root.join(t).to_string_lossy().into_owned(),
            ..sweep.base.clone()
        })
    });
    if let Some(h) = &header {
        eprintln!("note: {h} ({})", tasks.first().map_or("", String::as_str));
    }
    let footer = format!(
        "VTAB-1K: the lr grid on train800 → val200 per task and method, then train800val200 at the chosen rate, tested on test. {}",
        sweep.footer
    );
    save_plan(
        &root,
        &Plan {
            format: PLAN_FORMAT,
            seeds: args.seeds,
            runs: finals_all.clone(),
            lr_grid: sweep.grid.clone(),
            protocol: Some(VTAB1K.to_owned()),
            tasks: tasks.clone(),
            header,
            footer,
        },
    )?;
    let shown = shell_quote(&dir.to_string_lossy());
    println!(
        "planned VTAB-1K in {}: {} task(s) ({}), {n} grid runs, {} select steps, {} final runs",
        root.display(),
        tasks.len(),
        tasks.join(", "),
        tasks.len(),
        finals_all.len()
    );
    println!("  on a Slurm cluster: bash {shown}/submit.sh      (three job arrays chained with afterany)");
    println!("  here:               bash {shown}/run-local.sh 2  (the three stages in order, 2 jobs at a time)");
    println!("  watch them:         moppa view {shown}");
    println!("  the table:          moppa compare --collect {shown}");
    Ok(0)
}

/// Submits the three arrays, each stage after the previous one has ended however it ended.
fn submit_script(root: &Path) -> String {
    let q = |f: &str| shell_quote(&root.join(f).to_string_lossy());
    format!(
        "#!/usr/bin/env bash
# Submits the plan's three stages as Slurm job arrays: the grid, then (after every grid task has
# ended, however it ended: afterany) one select step per task, then the final runs.
set -euo pipefail
grid=$(sbatch --parsable {grid})
select=$(sbatch --parsable --dependency=afterany:${{grid%%;*}} {select})
final=$(sbatch --parsable --dependency=afterany:${{select%%;*}} {final})
echo \"grid ${{grid%%;*}}, select ${{select%%;*}}, final ${{final%%;*}}\"
",
        grid = q("slurm-grid.sh"),
        select = q("slurm-select.sh"),
        final = q("slurm-final.sh"),
    )
}

/// Runs the three stages here, in order, `${1:-2}` jobs at a time; a failed job does not stop
/// the next stage (as afterany), `--collect` names it.
fn local_script(root: &Path) -> String {
    let q = |f: &str| shell_quote(&root.join(f).to_string_lossy());
    format!(
        "#!/usr/bin/env bash
# The plan's three stages here, in order, P jobs at a time: bash run-local.sh [P]
P=${{1:-2}}
status=0
for stage in {grid} {select} {final}; do
    xargs -P \"$P\" -d '\\n' -I{{}} sh -c {{}} < \"$stage\" || status=1
done
exit $status
",
        grid = q("grid.txt"),
        select = q("select.txt"),
        final = q("final.txt"),
    )
}

/// `moppa compare --select DIR/TASK`: each method's rate chosen from the task's grid runs
/// present, the final runs' configs written; exit 1 when a method had no run to choose from or
/// a final run already trained at another rate.
pub(super) fn select(task_dir: &Path) -> Result<i32, CliError> {
    let path = task_dir.join(TASK_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        usage(format!(
            "{}: {e} (made by `moppa compare --protocol vtab1k --plan DIR`; --select takes DIR/TASK)",
            path.display()
        ))
    })?;
    let task: TaskPlan = serde_json::from_str(&text)
        .map_err(|e| CliError::Failure(anyhow::anyhow!("{}: not a task plan: {e}", path.display())))?;
    if task.format != 1 {
        return Err(CliError::Failure(anyhow::anyhow!(
            "{}: task plan format {} (this moppa reads format 1)",
            path.display(),
            task.format
        )));
    }
    // The select step writes into the final runs' folders: each must stay inside the task folder.
    if let Some(bad) = task.grid.iter().chain(&task.finals).find(|r| {
        r.dir.as_os_str().is_empty() || !r.dir.components().all(|c| matches!(c, std::path::Component::Normal(_)))
    }) {
        return Err(CliError::Failure(anyhow::anyhow!(
            "{}: run folder {:?} is not a plain path inside the task folder",
            path.display(),
            bad.dir.to_string_lossy()
        )));
    }
    let mut names: Vec<(&str, &str)> = Vec::new();
    for r in &task.grid {
        if !names.iter().any(|(n, _)| *n == r.name) {
            names.push((&r.name, &r.label));
        }
    }
    let mut selected = Vec::new();
    let mut trouble = false;
    let mut grid_rows = Vec::new();
    let mut picks = Vec::new();
    for (name, label) in names {
        let mut by_lr = Vec::new();
        let mut missing = Vec::new();
        let mut used = 0;
        for lr in &task.lr_grid {
            let mut vals = Vec::new();
            let mut gone = 0;
            for run in task.grid.iter().filter(|r| r.name == name && r.lr == Some(*lr)) {
                match result_of(&task_dir.join(&run.dir)) {
                    Ok(r) => {
                        if let Some(v) = r.val {
                            vals.push(v.acc);
                            used += 1;
                        }
                    }
                    Err(why) if why.starts_with(DIVERGED) => {
                        vals.push(0.0);
                        used += 1;
                    }
                    Err(why) => {
                        gone += 1;
                        missing.push(format!("{} ({why})", run.dir.display()));
                    }
                }
            }
            by_lr.push((*lr, vals, gone));
        }
        let pick = choose_lr(&by_lr.iter().map(|(l, v, _)| (*l, v.clone())).collect::<Vec<_>>());
        grid_rows.push((label.to_owned(), by_lr));
        picks.push(pick);
        if let Some(lr) = pick {
            let note = if missing.is_empty() {
                String::new()
            } else {
                format!(" — chosen from {used} run(s); {} missing", missing.len())
            };
            println!("{}: {label} → lr {}{note}", task.task, lr_text(lr));
            for run in task.finals.iter().filter(|r| r.name == name) {
                trouble |= !write_final(task_dir, &task, run, lr)?;
            }
        } else {
            trouble = true;
            println!(
                "{}: {label}: no grid run has finished — no final run configured",
                task.task
            );
        }
        for m in &missing {
            eprintln!("missing: {}: {m}", task.task);
        }
        selected.push(Selected {
            name: name.to_owned(),
            label: label.to_owned(),
            lr: pick,
            used,
            missing,
        });
    }
    print!("{}", grid_table(&task.lr_grid, &grid_rows, &picks));
    let text = serde_json::to_string_pretty(&selected).map_err(|e| failure(task_dir, &e))?;
    write_text(&task_dir.join(SELECTED_JSON), &text)?;
    Ok(i32::from(trouble))
}

/// Writes one final run's config: the grid run's of the same method and seed at `lr`, trained on
/// train800val200. A final run that already trained at another rate is left alone (false).
fn write_final(task_dir: &Path, task: &TaskPlan, run: &PlannedRun, lr: f64) -> Result<bool, CliError> {
    let source = task
        .grid
        .iter()
        .find(|g| g.name == run.name && g.seed == run.seed && g.lr == Some(lr))
        .map(|g| task_dir.join(&g.dir).join(CONFIG_TOML))
        .ok_or_else(|| {
            CliError::Failure(anyhow::anyhow!(
                "{}: no grid run for {}",
                task_dir.display(),
                run.dir.display()
            ))
        })?;
    let text = std::fs::read_to_string(&source).map_err(|e| failure(&source, &e))?;
    let mut cfg = RunConfig::from_toml(&text).map_err(|e| failure(&source, &e))?;
    let run_dir = task_dir.join(&run.dir);
    cfg.lr = Some(lr);
    cfg.final_split = true;
    cfg.out = Some(run_dir.clone());
    if is_run_folder(&run_dir) {
        let had = std::fs::read_to_string(run_dir.join(CONFIG_TOML))
            .ok()
            .and_then(|t| RunConfig::from_toml(&t).ok())
            .and_then(|c| c.lr);
        if had != Some(lr) {
            eprintln!(
                "warning: {} trained already at lr {}; the grid now chooses {}: remove the folder to train it again",
                run_dir.display(),
                had.map_or_else(|| "?".to_owned(), lr_text),
                lr_text(lr)
            );
            return Ok(false);
        }
        return Ok(true);
    }
    write_run(&cfg, &run_dir)?;
    Ok(true)
}

/// Per task and method, the final runs' test accuracies (and the chosen rate).
struct Cellset {
    accs: Vec<Acc>,
    lr: Option<f64>,
}

/// `moppa compare --collect DIR` of a VTAB-1K plan: the paper-style table.
pub(super) fn collect(dir: &Path, plan: &Plan) -> (String, usize) {
    let mut methods: Vec<(&str, &str)> = Vec::new();
    for r in &plan.runs {
        if !methods.iter().any(|(n, _)| *n == r.name) {
            methods.push((&r.name, &r.label));
        }
    }
    let mut absent = Vec::new();
    let mut cells: Vec<Vec<Cellset>> = Vec::new();
    for (name, _) in &methods {
        let mut row = Vec::new();
        for task in &plan.tasks {
            let chosen: Vec<Selected> = std::fs::read_to_string(dir.join(task).join(SELECTED_JSON))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            let lr = chosen.iter().find(|s| s.name == *name).and_then(|s| s.lr);
            let mut accs = Vec::new();
            for run in plan.runs.iter().filter(|r| r.name == *name && r.dir.starts_with(task)) {
                match result_of(&dir.join(&run.dir)) {
                    Ok(r) => accs.extend(r.test),
                    Err(why) => absent.push(format!("{} ({}): {why}", run.dir.display(), run.label)),
                }
            }
            row.push(Cellset { accs, lr });
        }
        cells.push(row);
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut out = plan
        .header
        .as_ref()
        .map_or_else(String::new, |h| format!("Note: {h}.\n\n"));
    out.push_str("| method |");
    for task in &plan.tasks {
        let _ = write!(out, " {task} |");
    }
    out.push_str(" Natural | Specialized | Structured | mean |\n|---|");
    out.push_str(&"---:|".repeat(plan.tasks.len() + 4));
    out.push('\n');
    let mut marked = false;
    for ((_, label), row) in methods.iter().zip(&cells) {
        let _ = write!(out, "| {label} |");
        let task_means: Vec<Option<f64>> = row
            .iter()
            .map(|c| mean(&c.accs.iter().map(|a| a.acc).collect::<Vec<_>>()))
            .collect();
        for c in row {
            let accs: Vec<f64> = c.accs.iter().map(|a| a.acc).collect();
            let text = match (mean(&accs), accs.len()) {
                (None, _) => "–".to_owned(),
                (Some(m), 1) => format!("{:.1}", 100.0 * m),
                (Some(m), k) => {
                    let sd = (accs.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (k as f64 - 1.0)).sqrt();
                    format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * sd)
                }
            };
            let _ = write!(out, " {text} |");
        }
        let mut group_means = Vec::new();
        let mut partial = false;
        for (_, group) in GROUPS {
            let present: Vec<f64> = plan
                .tasks
                .iter()
                .zip(&task_means)
                .filter(|(t, _)| group.contains(&t.as_str()))
                .filter_map(|(_, m)| *m)
                .collect();
            if let Some(m) = mean(&present) {
                let short = present.len() < group.len();
                partial |= short;
                let _ = write!(out, " {:.1}{} |", 100.0 * m, if short { "*" } else { "" });
                group_means.push(m);
            } else {
                partial = true;
                out.push_str(" – |");
            }
        }
        marked |= partial;
        match mean(&group_means) {
            Some(m) => {
                let _ = writeln!(out, " {:.1}{} |", 100.0 * m, if partial { "*" } else { "" });
            }
            None => out.push_str(" – |\n"),
        }
    }
    out.push('\n');
    if marked {
        let counts: Vec<String> = GROUPS
            .iter()
            .map(|(g, tasks)| {
                let k = plan.tasks.iter().filter(|t| tasks.contains(&t.as_str())).count();
                format!("{g} {k} of {}", tasks.len())
            })
            .collect();
        let _ = writeln!(
            out,
            "* over the tasks present only (tasks in this plan: {}); the mean is over the groups present.",
            counts.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "Test accuracy (%) of the final runs (train800val200 at the chosen rate), mean ± std over seeds; a group's mean is over its tasks, the last column the mean of the group means.\n"
    );
    // Every accuracy with its images and interval, and the rate chosen.
    let _ = writeln!(
        out,
        "| task | method | lr | test acc [95% interval] | n |\n|---|---|---:|---:|---:|"
    );
    for (t, task) in plan.tasks.iter().enumerate() {
        for ((_, label), row) in methods.iter().zip(&cells) {
            let c = &row[t];
            let n = c.accs.iter().map(|a| a.n).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {task} | {label} | {} | {} | {} |",
                c.lr.map_or_else(|| "–".to_owned(), lr_text),
                acc_cell(&c.accs),
                if n > 0 {
                    group_digits(n as usize)
                } else {
                    "?".to_owned()
                }
            );
        }
    }
    let small: Vec<String> = plan
        .tasks
        .iter()
        .enumerate()
        .filter_map(|(t, task)| {
            let n = cells.iter().flat_map(|row| row[t].accs.iter().map(|a| a.n)).max()?;
            (n > 0 && n < super::table::SMALL_TEST_SET).then(|| format!("{task} ({n})"))
        })
        .collect();
    if !small.is_empty() {
        let _ = writeln!(
            out,
            "\nWarning: test sets under {} images: {} — one image moves such a task's accuracy by a point or more.",
            super::table::SMALL_TEST_SET,
            small.join(", ")
        );
    }
    let _ = writeln!(out, "\n{}", plan.footer);
    if !absent.is_empty() {
        let _ = writeln!(
            out,
            "\nNot in the table ({} of {} final runs):",
            absent.len(),
            plan.runs.len()
        );
        for a in &absent {
            let _ = writeln!(out, "- {a}");
            eprintln!("not collected: {a}");
        }
    }
    (out, absent.len())
}
