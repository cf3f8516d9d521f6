//! Compiles `proto/csi.proto` (CSI v1) with `protox`, a pure-Rust protobuf compiler, so building
//! the plugin needs no `protoc` on the machine. Well-known types (`google.protobuf.*`) come from
//! protox's built-in copies and map to `prost-types`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(file_descriptors)?;
    Ok(())
}
