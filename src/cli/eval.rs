//! `moppa eval`: a saved adapter's accuracy on a dataset split, with per-class results and the
//! confusion matrix; `--ablate` measures what each prior contributes ([`super::eval_ablate`]).

use super::{CliError, usage};
use crate::config::RunConfig;
use crate::data::Split;
use crate::stats::{wilson, wilson_acc};
use crate::train::ablation::DEFAULT_IMAGES;
use crate::train::evaluate::{OnBackbone, evaluate_adapter, run_config};
use crate::train::protocol::MAX_CONFUSION_CLASSES;
use clap::Args;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `moppa eval`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa eval --run runs/digits\n  moppa eval --adapter a.safetensors --backbone builtin --data builtin:digits --split val\n  moppa eval --run runs/digits --confusion confusion.csv\n  moppa eval --run runs/digits --ablate --images 512 --output ablation.csv"
)]
pub struct EvalArgs {
    /// The adapter and its backbone.
    #[command(flatten)]
    pub source: AdapterSource,
    /// Data spec (default: the run's, or builtin:digits).
    #[arg(long)]
    pub data: Option<String>,
    /// test (default) or val (--ablate always measures val).
    #[arg(long)]
    pub split: Option<String>,
    /// Per-class results CSV (default: RUN/eval-SPLIT.csv, or next to the adapter); with
    /// --ablate, the ablation CSV (none unless given).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Prior ablation of a MoPPA adapter: accuracy and loss with each prior removed in all
    /// MoPPA blocks and in each, on a fixed subset of the validation split.
    #[arg(long, conflicts_with = "confusion")]
    pub ablate: bool,
    /// Validation images the ablation evaluates (1 to 100000; fewer if the split has fewer).
    #[arg(long, default_value_t = DEFAULT_IMAGES, requires = "ablate")]
    pub images: usize,
    /// Also write the confusion matrix CSV here (rows true class, columns predicted; up to
    /// 1000 classes).
    #[arg(long, value_name = "FILE")]
    pub confusion: Option<PathBuf>,
}

/// Which trained adapter, on which backbone (`moppa eval`, `moppa predict`).
#[derive(Debug, Clone, Args)]
pub struct AdapterSource {
    /// A run folder (its config.toml names backbone and data; its adapter.safetensors is used).
    #[arg(long, conflicts_with = "adapter")]
    pub run: Option<PathBuf>,
    /// An adapter checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Backbone for --adapter (default: the run's, or builtin).
    #[arg(long)]
    pub backbone: Option<String>,
    /// Heads of a timm backbone file.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Load onto a backbone file other than the one trained on (same shapes).
    #[arg(long)]
    pub force: bool,
}

/// An [`AdapterSource`] with its defaults filled in.
pub struct Resolved {
    /// The adapter file.
    pub adapter: PathBuf,
    /// The backbone spec.
    pub backbone: String,
    /// Heads of a timm backbone file.
    pub heads: Option<usize>,
    /// The run's config, for `--run`.
    pub base: Option<RunConfig>,
}

impl Resolved {
    /// The backbone, at the run's precision (f32 for a bare adapter file).
    #[must_use]
    pub fn on(&self) -> OnBackbone<'_> {
        OnBackbone {
            spec: &self.backbone,
            heads: self.heads,
            precision: self.base.as_ref().map(|c| c.dtype).unwrap_or_default(),
        }
    }
}

impl AdapterSource {
    /// The adapter file, backbone and heads: from the run folder, or the flags (default builtin).
    pub fn resolve(&self) -> Result<Resolved, CliError> {
        let (adapter, base) = match (&self.run, &self.adapter) {
            (Some(dir), _) => (
                dir.join(crate::train::runfolder::ADAPTER),
                Some(run_config(dir).map_err(|e| CliError::Failure(e.into()))?),
            ),
            (None, Some(a)) => (a.clone(), None),
            (None, None) => return Err(usage("give --run DIR or --adapter FILE")),
        };
        // A run's hf: backbone is loaded at the commit it trained on.
        let from_run = base.as_ref().map(crate::train::evaluate::run_backbone_spec);
        let backbone = self.backbone.clone().or(from_run).unwrap_or_else(|| "builtin".into());
        let heads = self.heads.or_else(|| base.as_ref().and_then(|c| c.heads));
        super::backbones::fetch(&backbone, None)?;
        Ok(Resolved {
            adapter,
            backbone,
            heads,
            base,
        })
    }
}

/// Runs `moppa eval`.
pub fn eval(args: &EvalArgs) -> Result<(), CliError> {
    let split = match args.split.as_deref() {
        None | Some("test") => Split::Test,
        Some("val") => Split::Val,
        Some(other) => return Err(usage(format!("--split must be val or test (got {other})"))),
    };
    if args.ablate {
        super::eval_ablate::check_images(args.images)?;
        if split != Split::Val && args.split.is_some() {
            return Err(usage(
                "--ablate always measures the validation split: drop --split test",
            ));
        }
    }
    let resolved = args.source.resolve()?;
    let data = args
        .data
        .clone()
        .or_else(|| resolved.base.as_ref().map(|c| c.data.clone()))
        .unwrap_or_else(|| "builtin:digits".into());
    if args.ablate {
        return super::eval_ablate::ablate(
            &resolved,
            &data,
            args.source.force,
            args.batch,
            args.images,
            args.output.as_deref(),
        );
    }
    let eval = evaluate_adapter(
        &resolved.adapter,
        resolved.on(),
        &data,
        split,
        args.source.force,
        args.batch,
    )
    .map_err(|e| CliError::Failure(e.into()))?;
    for w in &eval.warnings {
        eprintln!("warning: {w}");
    }
    let (result, classes) = (eval.result, eval.classes);
    println!(
        "{} accuracy {:.4} (loss {:.4}) on {data} {}",
        split.name(),
        result.acc,
        result.loss,
        n_and_interval(result.acc, result.n)
    );
    if let Some(w) = small_set_warning(result.n, split.name()) {
        eprintln!("warning: {w}");
    }
    let csv = per_class_csv(&classes, &result.per_class_acc, &eval.per_class_counts);
    let out = args.output.clone().unwrap_or_else(|| match &args.source.run {
        Some(dir) => dir.join(format!("eval-{}.csv", split.name())),
        None => resolved.adapter.with_extension(format!("eval-{}.csv", split.name())),
    });
    std::fs::write(&out, csv)
        .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", out.display())))?;
    println!("per-class results: {}", out.display());
    if let Some(path) = &args.confusion {
        if result.confusion.is_empty() {
            return Err(CliError::Failure(anyhow::anyhow!(
                "no confusion matrix for {} classes (it is kept for up to {MAX_CONFUSION_CLASSES}); '{}' not written",
                classes.len(),
                path.display()
            )));
        }
        std::fs::write(path, confusion_csv(&classes, &result.confusion))
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", path.display())))?;
        println!("confusion matrix: {}", path.display());
    }
    Ok(())
}

/// One CSV field: quoted (inner quotes doubled) when it holds a comma, quote or line break.
#[must_use]
pub fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

/// The confusion matrix: header `true\predicted,CLASS…`, then one row per true class, its name
/// and the counts of each predicted class.
#[must_use]
pub fn confusion_csv(classes: &[String], confusion: &[Vec<u64>]) -> String {
    let mut csv = String::from("true\\predicted");
    for c in classes {
        let _ = write!(csv, ",{}", csv_field(c));
    }
    csv.push('\n');
    for (i, row) in confusion.iter().enumerate() {
        let name = classes.get(i).map_or(Cow::Owned(i.to_string()), |c| csv_field(c));
        csv.push_str(&name);
        for n in row {
            let _ = write!(csv, ",{n}");
        }
        csv.push('\n');
    }
    csv
}

/// How many images an accuracy was measured on, and its 95% Wilson interval:
/// `(n = 500, 95% CI 0.7960-0.8631)` (`(n = 0)` when nothing was evaluated).
#[must_use]
pub fn n_and_interval(acc: f64, n: u64) -> String {
    match wilson_acc(acc, n) {
        Some((low, high)) => format!("(n = {n}, 95% CI {low:.4}-{high:.4})"),
        None => format!("(n = {n})"),
    }
}

/// Said when a split has fewer than 100 images: how many accuracy points one image is worth.
#[must_use]
pub fn small_set_warning(n: u64, split: &str) -> Option<String> {
    (n > 0 && n < 100).then(|| {
        format!(
            "only {n} {split} images: one image is {:.1} points of accuracy",
            100.0 / n as f64
        )
    })
}

/// The per-class results: `class,name,acc,n,ci_low,ci_high` (the class's images and the 95%
/// Wilson interval of its accuracy; the interval empty for a class without images).
#[must_use]
pub fn per_class_csv(classes: &[String], acc: &[f64], counts: &[(u64, u64)]) -> String {
    let mut csv = String::from("class,name,acc,n,ci_low,ci_high\n");
    for (i, (name, acc)) in classes.iter().zip(acc).enumerate() {
        let (correct, n) = counts.get(i).copied().unwrap_or_default();
        let _ = write!(csv, "{i},{name},{acc:.6},{n},");
        let _ = match wilson(correct, n) {
            Some((low, high)) => writeln!(csv, "{low:.6},{high:.6}"),
            None => writeln!(csv, ","),
        };
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against SciPy: `stats.binomtest(83, 100).proportion_ci(0.95, method='wilson')` is
    /// (0.744519952323988, 0.891064338859400); `binomtest(0, 12)` (0, 0.242494006655241);
    /// `binomtest(450, 500)` (0.870578090368060, 0.923322437262698).
    #[test]
    fn the_accuracy_carries_n_and_its_wilson_interval() {
        assert_eq!(n_and_interval(0.83, 100), "(n = 100, 95% CI 0.7445-0.8911)");
        assert_eq!(n_and_interval(0.9, 500), "(n = 500, 95% CI 0.8706-0.9233)");
        assert_eq!(n_and_interval(0.0, 12), "(n = 12, 95% CI 0.0000-0.2425)");
        assert_eq!(n_and_interval(0.5, 0), "(n = 0)");
    }

    #[test]
    fn fewer_than_100_images_are_warned_of() {
        assert_eq!(
            small_set_warning(12, "test").as_deref(),
            Some("only 12 test images: one image is 8.3 points of accuracy")
        );
        assert_eq!(
            small_set_warning(99, "val").as_deref(),
            Some("only 99 val images: one image is 1.0 points of accuracy")
        );
        assert_eq!(small_set_warning(100, "test"), None);
        assert_eq!(small_set_warning(0, "test"), None);
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("cat"), "cat");
        assert_eq!(csv_field("a b"), "a b");
        assert_eq!(csv_field("x,y"), "\"x,y\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert!(matches!(csv_field("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_confusion_csv_has_a_row_per_true_class() {
        let classes = ["cat".to_owned(), "dog, big".to_owned(), "eel".to_owned()];
        let m = vec![vec![5, 1, 0], vec![2, 7, 1], vec![0, 0, 3]];
        assert_eq!(
            confusion_csv(&classes, &m),
            "true\\predicted,cat,\"dog, big\",eel\ncat,5,1,0\n\"dog, big\",2,7,1\neel,0,0,3\n"
        );
    }

    #[test]
    fn the_per_class_csv_has_each_classs_n_and_interval() {
        let classes = ["cat".to_owned(), "dog".to_owned(), "eel".to_owned()];
        let csv = per_class_csv(&classes, &[0.83, 0.9, 0.0], &[(83, 100), (450, 500), (0, 0)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "class,name,acc,n,ci_low,ci_high",
                "0,cat,0.830000,100,0.744520,0.891064",
                "1,dog,0.900000,500,0.870578,0.923322",
                "2,eel,0.000000,0,,",
            ]
        );
    }
}
