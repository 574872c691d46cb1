//! Generates the gRPC test service from `proto/echo.proto` and the server side of Istio's CA API
//! (for the test CA) from the daemon's definition (needs `protoc`, which `cargo xtask setup`
//! installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    tonic_prost_build::compile_protos("proto/echo.proto")?;
    // The test CA serves the daemon's own definition of Istio's CA API.
    println!("cargo:rerun-if-changed=../daemon/proto/istio_ca.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["../daemon/proto/istio_ca.proto"], &["../daemon/proto"])?;
    Ok(())
}
