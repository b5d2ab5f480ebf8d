//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or an empty placeholder so that a
//! plain `cargo build` works; the agent then says how to build the object when it starts.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("dataplane-ebpf.o");
    let src = match env::var("FERRY_EBPF_OBJECT") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
            root.join("target/bpfel-unknown-none/release/dataplane-ebpf")
        }
    };
    println!("cargo:rerun-if-env-changed=FERRY_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!("cargo:warning=eBPF object {} not found: run `cargo xtask build-ebpf` first", src.display());
            fs::write(&out, []).unwrap();
        }
    }
}
