//! Re-run when bpf-linker changes: the object depends on the linker that produced it.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
