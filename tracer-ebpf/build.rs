use which::which;

/// Rebuild the eBPF object when the bpf-linker binary changes (it is an undeclared build tool:
/// cargo cannot express it as an artifact dependency yet).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker is not on PATH: run `cargo xtask bootstrap`, which installs it with the llvm-22 feature",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
