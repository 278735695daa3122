//! Plain configuration data at the bottom of the crate: the method's vocabulary (priors,
//! coefficients, locks), the backbone architecture and its presets, the method settings and their
//! catalogue, the run configuration, and trainable-parameter counts. No tensors: every other
//! layer (model, data, train, the CLI and the app) reads it, so the app can describe a run
//! without depending on the model.

mod arch;
mod method;
mod params;
mod prior;
pub mod range;
mod resources;
mod run;
mod vit;

pub use arch::{Activation, ArchTraits, PretrainedCfg, TimmConfig, Unsupported, arch_base, arch_traits};
pub use method::{
    COMPARE_DEFAULT, METHOD_CATALOGUE, MethodConfig, MethodKind, NamedMethod, Placement, RouterKind, method_names,
    named_method,
};
pub use params::{backbone_params, count_trainable};
pub use prior::{Coeff, Lockable, PerCoeff, Prior, UnknownPrior};
pub use range::{OutOfRange, ValueRange};
pub use resources::{MemoryEstimate, check_resources, estimate_memory, human_bytes};
pub use run::{Augment, DEFAULT_STEPS, DeviceChoice, Precision, RunConfig};
pub use vit::{EvalCrop, IMAGENET_MEAN, IMAGENET_STD, Interpolation, Pool, VIT_PRESETS, VitConfig, VitPreset};
