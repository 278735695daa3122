//! `moppa filters` and `moppa apply`: the physics of the priors from the command line.

use super::{CliError, usage};
use crate::physics::{FilterSet, PhysicsError, Prior, PriorCoeffs, apply_prior};
use anyhow::Context as _;
use clap::{Args, ValueEnum};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Scalar coefficients shared by `filters` and `apply`.
#[derive(Debug, Clone, Args)]
pub struct CoeffArgs {
    /// Heat diffusivity κ > 0: the heat filter is exp(−κ·τ·Λ).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub kappa: f64,
    /// Wave speed c > 0: the wave filter is exp(−γ·τ·√Λ)·cos(c·τ·√Λ).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub c: f64,
    /// Poisson screening ε > 0: the Poisson filter is ε/(Λ + ε).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub eps: f64,
    /// Time τ > 0 at which heat and wave are evaluated.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub tau: f64,
    /// Wave damping γ ≥ 0.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub gamma: f64,
}

impl CoeffArgs {
    /// Validated coefficients; a bad value is a usage error naming it.
    fn coeffs(&self) -> Result<PriorCoeffs, CliError> {
        let c = PriorCoeffs {
            kappa: self.kappa,
            c: self.c,
            eps: self.eps,
            tau: self.tau,
            gamma: self.gamma,
        };
        c.validate().map_err(|e| usage(format!("--{e}")))?;
        Ok(c)
    }
}

/// Output format of `moppa filters`.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Format {
    /// One JSON object (rows = n, columns = m).
    #[default]
    Json,
    /// `field,n,m,value`, one row per cell.
    Csv,
}

/// `moppa filters`: the spectral filters on an H×W token grid.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example: moppa filters --grid 14 --kappa 0.3 --format json\n\
Λ_nm = 4·sin²(πn/2H) + 4·sin²(πm/2W) are the grid Laplacian's eigenvalues; each filter is the exact \
solution of its PDE on the grid. Impulse responses are for a unit impulse at cell (⌊H/2⌋, ⌊W/2⌋).")]
pub struct FiltersArgs {
    /// Grid height H (number of token rows, e.g. 14 for ViT-B/16 at 224 px).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub grid: u32,
    /// Grid width W (defaults to H).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub grid_w: Option<u32>,
    #[command(flatten)]
    pub coeffs: CoeffArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// `moppa apply`: filter an image with one prior.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example: moppa apply --prior heat --kappa 20 photo.jpg blurred.png\n\
At image scale Λ is in pixel units: visible effects need larger coefficients than on a token grid \
(κ·τ of 1–50 blurs a 512-pixel photo clearly; c·τ of 5–50 makes ringing; ε of 1e-4–1e-2 gives a \
global smoothing).")]
pub struct ApplyArgs {
    /// Which prior to apply.
    #[arg(long, value_enum)]
    pub prior: PriorArg,
    #[command(flatten)]
    pub coeffs: CoeffArgs,
    /// Input image (PNG or JPEG).
    pub input: PathBuf,
    /// Output image; the format follows the extension (.png or .jpg).
    pub output: PathBuf,
}

/// A prior on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PriorArg {
    /// Heat diffusion: local blur.
    Heat,
    /// Wave propagation: ringing.
    Wave,
    /// Screened Poisson: global smoothing.
    Poisson,
}

impl From<PriorArg> for Prior {
    fn from(p: PriorArg) -> Self {
        match p {
            PriorArg::Heat => Self::Heat,
            PriorArg::Wave => Self::Wave,
            PriorArg::Poisson => Self::Poisson,
        }
    }
}

/// Rows of an `h×w` row-major buffer.
fn rows(v: &[f64], w: usize) -> Vec<&[f64]> {
    v.chunks(w).collect()
}

/// Runs `moppa filters`.
pub fn filters(args: &FiltersArgs) -> Result<(), CliError> {
    let coeffs = args.coeffs.coeffs()?;
    let h = args.grid as usize;
    let w = args.grid_w.unwrap_or(args.grid) as usize;
    let set = FilterSet::new(h, w, coeffs).map_err(|e| match e {
        PhysicsError::BadCoefficient(_) => usage(e),
        other => CliError::Failure(other.into()),
    })?;
    let text = match args.format {
        Format::Json => filters_json(&set).to_string(),
        Format::Csv => filters_csv(&set),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .context("cannot write to standard output")
        .map_err(CliError::Failure)
}

/// The stable JSON shape documented in README.
fn filters_json(set: &FilterSet) -> serde_json::Value {
    let w = set.w;
    serde_json::json!({
        "grid": [set.h, set.w],
        "coeffs": {
            "kappa": set.coeffs.kappa,
            "c": set.coeffs.c,
            "eps": set.coeffs.eps,
            "tau": set.coeffs.tau,
            "gamma": set.coeffs.gamma,
        },
        "lambda": rows(&set.lambda, w),
        "heat": rows(&set.heat, w),
        "wave": rows(&set.wave, w),
        "poisson": rows(&set.poisson, w),
        "impulse": {
            "heat": rows(set.impulse(Prior::Heat), w),
            "wave": rows(set.impulse(Prior::Wave), w),
            "poisson": rows(set.impulse(Prior::Poisson), w),
        },
    })
}

/// `field,n,m,value` rows.
fn filters_csv(set: &FilterSet) -> String {
    use std::fmt::Write as _;
    let fields: [(&str, &[f64]); 7] = [
        ("lambda", &set.lambda),
        ("heat", &set.heat),
        ("wave", &set.wave),
        ("poisson", &set.poisson),
        ("impulse_heat", set.impulse(Prior::Heat)),
        ("impulse_wave", set.impulse(Prior::Wave)),
        ("impulse_poisson", set.impulse(Prior::Poisson)),
    ];
    let mut s = String::from("field,n,m,value");
    for (name, values) in fields {
        for (i, v) in values.iter().enumerate() {
            // Writing to a String cannot fail.
            let _ = write!(s, "\n{name},{},{},{v}", i / set.w, i % set.w);
        }
    }
    s
}

/// Runs `moppa apply`.
pub fn apply(args: &ApplyArgs) -> Result<(), CliError> {
    let coeffs = args.coeffs.coeffs()?;
    let ext = args
        .output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("png") => image::ImageFormat::Png,
        Some("jpg" | "jpeg") => image::ImageFormat::Jpeg,
        _ => {
            return Err(usage(format!(
                "cannot write output '{}': use a .png, .jpg or .jpeg name",
                args.output.display()
            )));
        }
    };
    let input = read_image(&args.input)?;
    let out = apply_prior(&input, args.prior.into(), &coeffs).map_err(|e| CliError::Failure(e.into()))?;
    write_image_atomic(&out, &args.output, format).map_err(CliError::Failure)
}

/// Opens and decodes an image; the error names the path and what went wrong.
pub(crate) fn read_image(path: &Path) -> Result<image::DynamicImage, CliError> {
    let reader = image::ImageReader::open(path).with_context(|| format!("cannot read image '{}'", path.display()))?;
    let reader = reader
        .with_guessed_format()
        .with_context(|| format!("cannot read image '{}'", path.display()))?;
    Ok(reader
        .decode()
        .with_context(|| format!("cannot decode image '{}'", path.display()))?)
}

/// Encodes to a temporary file next to `path`, then renames it, so a failure never leaves a
/// half-written output.
fn write_image_atomic(img: &image::DynamicImage, path: &Path, format: image::ImageFormat) -> anyhow::Result<()> {
    let img = if format == image::ImageFormat::Jpeg && img.color().has_alpha() {
        image::DynamicImage::ImageRgb8(img.to_rgb8())
    } else {
        img.clone()
    };
    crate::util::write_atomic(path, |w| img.write_to(w, format).map_err(std::io::Error::other))
        .with_context(|| format!("cannot write image '{}'", path.display()))
}
