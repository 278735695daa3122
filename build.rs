//! With the `cuda` feature, compiles the lean ops' CUDA kernels (src/model/ops/cuda/*.cu) to PTX
//! with nvcc (the same toolchain candle's own kernels need; see ../shared/cuda/README.md).
//! Without it, does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/model/ops/cuda/rowwise.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    let out_dir = std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?;
    let out = PathBuf::from(out_dir).join("rowwise.ptx");
    // bf16 arithmetic needs compute capability 8.0; PTX for 8.0 is JIT-compiled for newer GPUs.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("CUDA_HOME").map_or_else(|_| PathBuf::from("nvcc"), |h| PathBuf::from(h).join("bin/nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--use_fast_math", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/model/ops/cuda/rowwise.cu")
        .status()
        .map_err(|e| format!("cannot run {} (set CUDA_HOME or put nvcc on PATH): {e}", nvcc.display()))?;
    if !status.success() {
        return Err(format!(
            "{} failed on src/model/ops/cuda/rowwise.cu ({status})",
            nvcc.display()
        ));
    }
    Ok(())
}
