//! A VTAB-1K plan's select step (`moppa compare --select DIR/TASK`, stage 2 of
//! [`super::vtab`]): each method's learning rate chosen from the task's grid runs present, and the
//! final runs' configs written; `task.json` (what the plan wrote for the step) and
//! `selected.json` (what it chose, read by `--collect`).

use super::plan::{PlannedRun, failure, write_run, write_text};
use super::table::{choose_lr, grid_table, lr_text};
use super::{DIVERGED, result_of};
use crate::cli::{CliError, usage};
use crate::config::RunConfig;
use crate::train::runfolder::{CONFIG_TOML, is_run_folder};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One task's part of the plan (`DIR/TASK/task.json`), read by its select step.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct TaskPlan {
    pub(super) format: u32,
    pub(super) task: String,
    pub(super) seeds: u64,
    pub(super) lr_grid: Vec<f64>,
    /// The grid's runs (folders relative to the task folder).
    pub(super) grid: Vec<PlannedRun>,
    /// The final runs (folders relative to the task folder; their configs written by select).
    pub(super) finals: Vec<PlannedRun>,
}

pub(super) const TASK_JSON: &str = "task.json";
pub(super) const SELECTED_JSON: &str = "selected.json";

/// What the select step chose for one method (`DIR/TASK/selected.json`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Selected {
    pub(super) name: String,
    pub(super) label: String,
    pub(super) lr: Option<f64>,
    /// Grid runs it chose from, and those missing (named).
    pub(super) used: usize,
    pub(super) missing: Vec<String>,
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
