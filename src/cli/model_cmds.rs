//! `moppa params` and `moppa infer`: the model from the command line.

use super::{CliError, usage};
use crate::config::{METHOD_CATALOGUE, MethodConfig, MethodKind, VitConfig, count_trainable};
use crate::model::checkpoint::load_adapter_noting;
use crate::model::tensor_file::{HostTensor, StoreAs, TensorFile, write_atomic};
use crate::model::{BackboneOptions, Vit};
use crate::train::TrainError;
use crate::train::backbone::{backbone_assumptions, backbone_config, load_backbone_with};
use crate::util::group_digits;
use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Options for reading a backbone file.
#[derive(Debug, Clone, Args)]
pub struct BackboneArgs {
    /// Number of attention heads of a timm checkpoint (timm files do not record it; default D/64).
    #[arg(long)]
    pub heads: Option<usize>,
}

/// `moppa params`: trainable parameters per method.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example: moppa params --backbone vit-b16 --classes 100\n\
BACKBONE is a safetensors file (timm names) or a preset: tiny, vit-ti16, vit-s16, vit-b16, vit-l16.")]
pub struct ParamsArgs {
    /// Backbone file or preset name.
    #[arg(long, default_value = "vit-b16")]
    pub backbone: String,
    /// Classes of the task (size of the new head).
    #[arg(long, default_value_t = 100)]
    pub classes: usize,
    /// Rank r of MoPPA and LoRA, bottleneck width of AdaptFormer.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[command(flatten)]
    pub backbone_args: BackboneArgs,
}

/// Reads a backbone file, mapping errors to one clear line.
pub fn load_backbone(path: &Path, args: &BackboneArgs, device: &Device) -> Result<Vit, CliError> {
    let opts = BackboneOptions {
        heads: args.heads,
        ..BackboneOptions::default()
    };
    Vit::from_file(path, &opts, device).map_err(|e| CliError::Failure(anyhow::anyhow!("cannot load backbone: {e}")))
}

/// Says on stderr what loading a backbone file assumed (no architecture recorded with it).
pub fn warn_assumptions(spec: &str, heads: Option<usize>) {
    if let Ok(a) = backbone_assumptions(spec, heads)
        && !a.is_empty()
    {
        eprintln!(
            "warning: {spec}: the file records no architecture (no config.json beside it); assumed {}",
            a.join(", ")
        );
    }
}

/// Runs `moppa params`.
pub fn params(args: &ParamsArgs) -> Result<(), CliError> {
    if args.rank == 0 || args.classes == 0 {
        return Err(usage("--rank and --classes must be ≥ 1"));
    }
    let cfg = if let Some(c) = VitConfig::preset(&args.backbone) {
        c
    } else {
        let hub = crate::train::hub::HubId::parse(&args.backbone).is_some();
        if !hub && !Path::new(&args.backbone).exists() {
            return Err(usage(format!(
                "--backbone '{}' is neither a file, an hf:ORG/NAME id nor a preset ({})",
                args.backbone,
                VitConfig::preset_names()
            )));
        }
        super::backbones::fetch(&args.backbone, None)?;
        warn_assumptions(&args.backbone, args.backbone_args.heads);
        let c = backbone_config(&args.backbone, args.backbone_args.heads)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot load backbone: {e}")))?;
        VitConfig { num_classes: 0, ..c }
    };
    if args.rank > cfg.embed_dim {
        return Err(usage(format!(
            "--rank {} is larger than the backbone's width D = {} (a rank of at most D makes sense)",
            args.rank, cfg.embed_dim
        )));
    }
    let full = count_trainable(&cfg, &MethodConfig::of(MethodKind::Full), args.classes);
    println!(
        "backbone: {} (D {}, depth {}, {} px, patch {}, {}×{} tokens), {} classes",
        args.backbone,
        cfg.embed_dim,
        cfg.depth,
        cfg.img_size,
        cfg.patch_size,
        cfg.grid(),
        cfg.grid(),
        args.classes
    );
    println!("| method | trainable | % of full |");
    println!("|---|---:|---:|");
    let base = MethodConfig {
        rank: args.rank,
        ..MethodConfig::default()
    };
    for m in METHOD_CATALOGUE.iter().map(|m| m.config(&base)) {
        let n = count_trainable(&cfg, &m, args.classes);
        println!(
            "| {} | {} | {:.3} |",
            m.label(),
            group_digits(n),
            100.0 * n as f64 / full as f64
        );
    }
    Ok(())
}

/// `moppa infer`: logits (and MoPPA router weights) for normalised images in a safetensors file.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "The input holds a tensor `images` (N×3×H×W, f32, already normalised). The output gets \
`logits` (N×classes) and, for MoPPA adapters, `router`: (blocks, N, H·W, k) for the token router, (blocks, N, 1, k) \
for the image router, (blocks, 1, 1, k) for the layer router (patch tokens only)."
)]
pub struct InferArgs {
    /// Backbone: builtin, random:PRESET, or a safetensors file (timm names, or ours with its
    /// config in the metadata).
    #[arg(long)]
    pub backbone: String,
    /// Adapter checkpoint; without it the backbone's own head is used.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Input safetensors with `images`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors.
    #[arg(long)]
    pub output: PathBuf,
    /// Load an adapter onto a backbone file other than the one it was trained on (shapes must match).
    #[arg(long)]
    pub force: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[command(flatten)]
    pub backbone_args: BackboneArgs,
}

/// Runs `moppa infer`.
pub fn infer(args: &InferArgs) -> Result<(), CliError> {
    if args.batch == 0 {
        return Err(usage("--batch must be ≥ 1"));
    }
    super::backbones::fetch(&args.backbone, None)?;
    warn_assumptions(&args.backbone, args.backbone_args.heads);
    infer_inner(args).map_err(CliError::Failure)
}

fn infer_inner(args: &InferArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let input = TensorFile::read(&args.input)?;
    let images = input
        .get("images")
        .map_err(|_| anyhow::anyhow!("{}: no tensor named 'images'", args.input.display()))?;
    if images.shape.len() != 4 || images.shape[2] != images.shape[3] {
        anyhow::bail!(
            "{}: 'images' has shape {:?}, expected N×3×S×S",
            args.input.display(),
            images.shape
        );
    }
    if images.shape[0] == 0 {
        anyhow::bail!("{}: 'images' holds no image (N = 0)", args.input.display());
    }
    // Run at the input's resolution (position embeddings are resampled as timm does).
    let opts = BackboneOptions {
        heads: args.backbone_args.heads,
        img_size: Some(images.shape[2]),
        ..BackboneOptions::default()
    };
    let vit = load_backbone_with(&args.backbone, &opts, 0, &device).map_err(|e| match e {
        TrainError::Config(m) => anyhow::anyhow!("{}: {m}", args.input.display()),
        other => anyhow::anyhow!("cannot load backbone: {other}"),
    })?;
    let images = images.to_tensor(&device)?;
    let n = images.dim(0)?;
    let batches = (0..n)
        .step_by(args.batch)
        .map(|start| images.narrow(0, start, args.batch.min(n - start)));
    let mut logits = Vec::new();
    let mut routers: Vec<Vec<Tensor>> = Vec::new();
    if let Some(path) = &args.adapter {
        let (model, forced) = load_adapter_noting(path, vit, args.force)?;
        if let Some(w) = forced {
            eprintln!("warning: {w}");
        }
        for batch in batches {
            let fwd = model.forward(&batch?, true)?;
            logits.push(fwd.logits);
            routers.push(fwd.routing.into_iter().map(|r| r.alpha).collect());
        }
    } else {
        if !vit.has_head() {
            anyhow::bail!("{}: the backbone has no classifier head; pass --adapter", args.backbone);
        }
        for batch in batches {
            logits.push(vit.forward(&batch?)?);
        }
    }
    let to_host = |t: &Tensor| -> anyhow::Result<HostTensor> {
        Ok(HostTensor::new(
            t.dims().to_vec(),
            t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        ))
    };
    let mut out = BTreeMap::new();
    out.insert("logits".to_owned(), to_host(&Tensor::cat(&logits, 0)?)?);
    if routers.first().is_some_and(|r| !r.is_empty()) {
        // Per block, join the batches along N; a layer router's (1, 1, k) is the same for all.
        let mut per_block = Vec::new();
        for b in 0..routers[0].len() {
            let parts: Vec<Tensor> = routers.iter().map(|r| r[b].clone()).collect();
            per_block.push(if parts[0].dim(0)? == 1 && n > 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 0)?
            });
        }
        out.insert("router".to_owned(), to_host(&Tensor::stack(&per_block, 0)?)?);
    }
    write_atomic(&args.output, &out, &std::collections::HashMap::new(), StoreAs::F32)
        .with_context(|| format!("cannot write '{}'", args.output.display()))
}
