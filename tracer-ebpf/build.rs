use which::which;

/// Rebuild the eBPF object when the bpf-linker binary changes (it is an undeclared build tool:
/// cargo cannot express it as an artifact dependency yet).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker is not on PATH: run `cargo xtask bootstrap`, which installs it with the llvm-22 feature",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which also turns off the
    // generic inline expansion of memset: every zeroed struct or array (an event, a key, a
    // comm) then became a call to a byte-by-byte memset loop, a visible share of the programs'
    // time. Without the flag LLVM writes them as a few 8-byte stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
