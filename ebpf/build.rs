//! Rebuild the kernel programs when bpf-linker changes (it is tied to one nightly's LLVM).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
