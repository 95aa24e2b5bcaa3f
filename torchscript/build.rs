//! Builds the C++ shim (shim/shim.cpp) against the libtorch that torch-sys links: its include
//! dirs come from torch-sys's `libtorch_lib` metadata (`DEP_TCH_LIBTORCH_LIB`), else from
//! `LIBTORCH` (set by .cargo/config.toml).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = if let Ok(inc) = env::var("LIBTORCH_INCLUDE") {
        PathBuf::from(inc).join("include")
    } else if let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let lib = PathBuf::from(lib);
        lib.parent().map(|p| p.join("include")).unwrap_or(lib)
    } else if let Some(root) = env::var_os("LIBTORCH") {
        PathBuf::from(root).join("include")
    } else {
        panic!("libtorch not found: set LIBTORCH (scripts/libtorch.sh fetches it)");
    };
    if !include.join("torch").is_dir() {
        panic!(
            "libtorch headers not found in {} (scripts/libtorch.sh fetches libtorch)",
            include.display()
        );
    }
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .file("shim/shim.cpp")
        .compile("autopar_ts_shim");
}
