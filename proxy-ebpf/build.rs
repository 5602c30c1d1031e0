//! Build script of the XDP program.
//!
//! - Re-run when bpf-linker changes: the object depends on the linker that produced it.
//! - For the BPF target, ask bpf-linker not to pass `--bpf-expand-memcpy-in-order` to LLVM.
//!   With that flag LLVM's BPF backend never expands `memset` inline, so every zeroed key field
//!   (e.g. the 12 unused bytes of an IPv4 `Addr`) becomes a BPF-to-BPF call to `memset`, and the
//!   caller-saved registers spilled around those calls push the program past the 512-byte stack.
use std::env;

fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "bpf") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
