//! Builds the kernel programs (`ebpf/`) with aya-build and leaves the object in `OUT_DIR/drover-ebpf`.
//!
//! `DROVER_SKIP_EBPF=1` writes an empty object instead (for `cargo check`/`clippy` on machines
//! without the eBPF toolchain); a daemon built that way refuses `--capture ebpf` with a clear error.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DROVER_SKIP_EBPF");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("drover-ebpf");
    if env::var("DROVER_SKIP_EBPF").is_ok_and(|v| v == "1") {
        fs::write(&out, [])?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../ebpf").canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let package = aya_build::Package {
        name: "drover-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
