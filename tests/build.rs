//! Generates the gRPC test service from `proto/echo.proto` (needs `protoc`, which
//! `cargo xtask setup` installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    tonic_prost_build::compile_protos("proto/echo.proto")?;
    Ok(())
}
