//! Compiles `proto/ballast.proto` and `proto/cluster.proto` with `protox` (a pure-Rust protobuf compiler), so building
//! Ballast needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(["ballast.proto", "cluster.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".ballast.v1.WriteRequest.data")
        .bytes(".ballast.v1.ReadResponse.data")
        .bytes(".ballast.cluster.v1.RaftMessage.payload")
        .bytes(".ballast.cluster.v1.ProposeRequest.command")
        .bytes(".ballast.cluster.v1.ProposeResponse.response")
        .bytes(".ballast.cluster.v1.JoinRequest.device_uuid")
        .compile_fds(file_descriptors)?;
    Ok(())
}
