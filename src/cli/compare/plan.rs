//! `moppa compare --plan DIR`: a sweep written out for a cluster — each run's config, `jobs.txt`
//! (one `moppa train` line per run, for `xargs -P`), `slurm.sh` (a job array) and `plan.json` —
//! with every path quoted for the shell or sbatch line that reads it.

use super::{CompareArgs, sweep};
use crate::cli::{CliError, usage};
use crate::config::{DeviceChoice, RunConfig};
use crate::train::runfolder::CONFIG_TOML;
use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// What a compare folder records about its sweep (`plan.json`), so that `--collect` can build
/// the table and name every run that is missing.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Plan {
    /// Format version: 1, or 2 with learning rates (a grid, a protocol) that format-1 readers
    /// would mix up.
    pub(super) format: u32,
    /// Seeds per method.
    pub(super) seeds: u64,
    /// The runs, in table order (methods as given, rates and seeds ascending).
    pub(super) runs: Vec<PlannedRun>,
    /// The learning-rate grid (empty: each method at its own rate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) lr_grid: Vec<f64>,
    /// The protocol (`vtab1k`), absent for a plain sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) protocol: Option<String>,
    /// With a protocol: its tasks, in table order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) tasks: Vec<String>,
    /// Said once above the table (images resized to the model's input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) header: Option<String>,
    /// The table's closing line (settings shared by every run).
    pub(super) footer: String,
}

/// The plan format this version writes (and the newest it reads).
pub(super) const PLAN_FORMAT: u32 = 2;

/// One run of a [`Plan`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct PlannedRun {
    /// The method's name in `--methods`.
    pub(super) name: String,
    /// Its table label (e.g. "moppa r8").
    pub(super) label: String,
    pub(super) seed: u64,
    /// The run folder, relative to the plan's folder.
    pub(super) dir: PathBuf,
    /// Its learning rate (absent in format-1 plans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) lr: Option<f64>,
}

/// The plan file's name in a compare folder.
pub(super) const PLAN_JSON: &str = "plan.json";

/// Refuses a `--plan` folder whose path the scripts cannot name as one line of text: not UTF-8,
/// or holding a newline or other control character (the message shows it escaped).
fn check_plan_path(path: &Path) -> Result<(), CliError> {
    // Shown escaped ({:?} of the text), so the message itself stays one line.
    let shown = path.to_string_lossy();
    match path.to_str() {
        None => Err(usage(format!(
            "--plan {shown:?}: the path is not UTF-8 text (jobs.txt and slurm.sh name it as text)"
        ))),
        Some(text) if text.chars().any(char::is_control) => Err(usage(format!(
            "--plan {shown:?}: the path holds a control character (jobs.txt and slurm.sh name it on one line)"
        ))),
        Some(_) => Ok(()),
    }
}

/// Writes `plan.json` into `dir` for `runs` (their folders relative to `dir`).
pub(super) fn write_plan(
    dir: &Path,
    seeds: u64,
    runs: &[PlannedRun],
    grid: &[f64],
    header: Option<String>,
    footer: &str,
) -> Result<(), CliError> {
    let plan = Plan {
        format: PLAN_FORMAT,
        seeds,
        runs: runs.to_vec(),
        lr_grid: grid.to_vec(),
        protocol: None,
        tasks: Vec::new(),
        header,
        footer: footer.to_owned(),
    };
    save_plan(dir, &plan)
}

/// Writes `plan` as `dir/plan.json`.
pub(super) fn save_plan(dir: &Path, plan: &Plan) -> Result<(), CliError> {
    let failure = |e: &dyn std::fmt::Display| CliError::Failure(anyhow::anyhow!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| failure(&e))?;
    let text = serde_json::to_string_pretty(plan).map_err(|e| failure(&e))?;
    write_atomic(&dir.join(PLAN_JSON), |w| w.write_all(text.as_bytes())).map_err(|e| failure(&e))
}

/// Quotes `s` for a POSIX shell when it needs it.
pub(super) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Checks a `--plan` folder (its path as text, no plan in it yet), makes it and returns its
/// absolute path: the jobs may run from any folder (a scheduler's, a node's).
pub(super) fn plan_root(args: &CompareArgs, dir: &Path) -> Result<PathBuf, CliError> {
    if args.run.out.is_some() || args.run.resume.is_some() {
        return Err(usage(
            "--plan places each run in DIR/runs/{method}-seed{seed}: leave out --out and --resume",
        ));
    }
    if args.gpus == Some(0) {
        return Err(usage("--gpus must be ≥ 1"));
    }
    check_plan_path(dir)?;
    // The jobs name the folder by its absolute path: the working folder's name counts too.
    if let Ok(abs) = std::path::absolute(dir) {
        check_plan_path(&abs)?;
    }
    if dir.join(PLAN_JSON).exists() {
        return Err(usage(format!(
            "{} holds a plan already ({PLAN_JSON}): run its jobs, collect it, or plan into another folder",
            dir.display()
        )));
    }
    Ok(dir.to_owned())
}

/// Makes `dir` and returns its canonical path (checked again: a link may lead elsewhere).
pub(super) fn make_root(dir: &Path) -> Result<PathBuf, CliError> {
    std::fs::create_dir_all(dir).map_err(|e| failure(dir, &e))?;
    let root = std::fs::canonicalize(dir).map_err(|e| failure(dir, &e))?;
    check_plan_path(&root)?;
    Ok(root)
}

/// A file error naming the file.
pub(super) fn failure(p: &Path, e: &dyn std::fmt::Display) -> CliError {
    CliError::Failure(anyhow::anyhow!("{}: {e}", p.display()))
}

/// Writes `text` to `path` whole (a temporary file renamed).
pub(super) fn write_text(path: &Path, text: &str) -> Result<(), CliError> {
    write_atomic(path, |w| w.write_all(text.as_bytes())).map_err(|e| failure(path, &e))
}

/// Writes `cfg` (its `out` set to `run_dir`) as `run_dir/config.toml`; returns the job line
/// that trains it (resuming after a requeue, returning at once when done).
pub(super) fn write_run(cfg: &RunConfig, run_dir: &Path) -> Result<String, CliError> {
    std::fs::create_dir_all(run_dir).map_err(|e| failure(run_dir, &e))?;
    let config = run_dir.join(CONFIG_TOML);
    let toml = cfg.to_toml().map_err(|e| failure(&config, &e))?;
    write_text(&config, &toml)?;
    Ok(job_line(&config, run_dir))
}

/// The `moppa train` line of one planned run.
pub(super) fn job_line(config: &Path, run_dir: &Path) -> String {
    format!(
        "moppa train --config {} --out {} --auto-resume",
        shell_quote(&config.to_string_lossy()),
        shell_quote(&run_dir.to_string_lossy())
    )
}

/// `moppa compare --plan DIR`: configs, `jobs.txt` and `slurm.sh`; trains nothing.
pub(super) fn plan(args: &CompareArgs, dir: &Path) -> Result<i32, CliError> {
    plan_root(args, dir)?;
    let sweep = sweep(args)?;
    let root = make_root(dir)?;
    let runs = sweep.runs(args.seeds, Path::new("runs"));
    let mut jobs = String::new();
    for (n, run) in runs.iter().enumerate() {
        let run_dir = root.join(&run.dir);
        let cfg = RunConfig {
            out: Some(run_dir.clone()),
            device: args.gpus.map_or(sweep.base.device, |g| DeviceChoice::Cuda(n % g)),
            ..sweep.config(run)
        };
        jobs.push_str(&write_run(&cfg, &run_dir)?);
        jobs.push('\n');
    }
    write_text(&root.join("jobs.txt"), &jobs)?;
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| failure(&logs, &e))?;
    let slurm = slurm_script(&root, "jobs.txt", "moppa-sweep", runs.len(), args.gpus.is_some());
    write_text(&root.join("slurm.sh"), &slurm)?;
    write_plan(
        &root,
        args.seeds,
        &runs,
        &sweep.grid,
        sweep.header.clone(),
        &sweep.footer,
    )?;
    let shown = shell_quote(&dir.to_string_lossy());
    println!("planned {} runs in {}", runs.len(), root.display());
    println!(
        "  run them:      xargs -P 2 -d '\\n' -I{{}} sh -c {{}} < {shown}/jobs.txt   (or: sbatch {shown}/slurm.sh)"
    );
    println!("  watch them:    moppa view {shown}");
    println!("  the table:     moppa compare --collect {shown}");
    Ok(0)
}

/// Quotes `s` for sbatch's reading of an `#SBATCH` line (in double quotes, a backslash before each
/// backslash and double quote), with `%` doubled so that Slurm's file-name patterns leave it alone.
fn sbatch_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Slurm script that runs a job list: `slurm.sh` for `jobs.txt`, `slurm-grid.sh` for `grid.txt`.
pub(super) fn slurm_name(jobs_file: &str) -> String {
    if jobs_file == "jobs.txt" {
        "slurm.sh".to_owned()
    } else {
        format!("slurm-{}.sh", jobs_file.trim_end_matches(".txt"))
    }
}

/// The Slurm job-array script: array index i runs line i+1 of `jobs.txt`. Every path is quoted
/// for whoever reads it (bash, or sbatch for `#SBATCH` lines) and bash only ever expands it from a
/// variable, so no character of the plan's path can run as a command.
pub(super) fn slurm_script(root: &Path, jobs_file: &str, job_name: &str, n: usize, gpus: bool) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let gres = if gpus { "#SBATCH --gres=gpu:1\n" } else { "" };
    let script = slurm_name(jobs_file);
    format!(
        "#!/usr/bin/env bash
# A Slurm job array: `sbatch {slurm}`. Index i runs line i+1 of {jobs_file}.
# Each line resumes its run after a requeue and exits at once when the run is done, so
# resubmitting the whole array is safe. Add --partition, --time, --cpus-per-task as your
# cluster needs; `moppa` must be on PATH on the nodes.
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --output={logs}
#SBATCH --requeue
{gres}set -euo pipefail
jobs_txt={jobs}
line=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" \"$jobs_txt\")
if [ -z \"$line\" ]; then
    echo \"no job $SLURM_ARRAY_TASK_ID in $jobs_txt\" >&2
    exit 1
fi
{device}echo \"$line\"
exec bash -c \"$line\"
",
        slurm = q(&root.join(script)),
        last = n.saturating_sub(1),
        logs = sbatch_quote(&format!("{}/", root.join("logs").to_string_lossy())) + "%A_%a.out",
        jobs = q(&root.join(jobs_file)),
        device = if gpus {
            "# Slurm shows each task only its own GPU, as device 0.\nline=\"$line --device cuda:0\"\n"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_quotes_only_what_needs_it() {
        assert_eq!(shell_quote("/a/b-c_1.toml"), "/a/b-c_1.toml");
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn sbatch_quote_escapes_what_sbatch_reads() {
        assert_eq!(sbatch_quote("/a b/logs/"), r#""/a b/logs/""#);
        assert_eq!(sbatch_quote(r#"/q"\%'/"#), r#""/q\"\\%%'/""#);
    }
}
