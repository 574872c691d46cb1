//! Rebuild the kernel programs when bpf-linker changes (it is tied to one nightly's LLVM), and
//! enable 32-bit ALU instructions: the fast path's connection-slot reservation uses the value a
//! 32-bit atomic add returns (`BPF_FETCH`, kernel 5.12+), which LLVM emits only with `alu32`.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
}
