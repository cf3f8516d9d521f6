//! Compiles `proto/ballast.proto` with `protox` (a pure-Rust protobuf compiler), so building
//! Ballast needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(["ballast.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".ballast.v1.WriteRequest.data")
        .bytes(".ballast.v1.ReadResponse.data")
        .compile_fds(file_descriptors)?;
    Ok(())
}
