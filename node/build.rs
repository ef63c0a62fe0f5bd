//! The binaries find the prebuilt libduckdb.so (docs/decisions.md D46)
//! where `DUCKDB_LIB_DIR` (set in .cargo/config.toml) says, at run time
//! as at link time.
fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
