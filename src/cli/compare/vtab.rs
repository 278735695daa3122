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
    PLAN_FORMAT, Plan, PlannedRun, failure, job_line, make_root, plan_root, save_plan, shell_quote, slurm_name,
    slurm_script, write_run, write_text,
};
use super::select::{TASK_JSON, TaskPlan};
use super::table::lr_text;
use super::{CompareArgs, check_size, run_name, sweep};
use crate::cli::{CliError, usage};
use crate::config::{DeviceChoice, RunConfig};
use crate::train::runfolder::CONFIG_TOML;
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
        write_text(&root.join(slurm_name(file)), &script)?;
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
