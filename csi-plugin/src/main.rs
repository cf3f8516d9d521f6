//! `ballast-csi`: the CSI driver `csi.ballast.io` as one binary, run as the controller (with the
//! provisioner and resizer sidecars), as the node plugin (with node-driver-registrar), or both.
//!
//! Owns: command-line arguments (a fixed interface the Helm chart is written against), logging
//! and signal handling. Everything else is in the library (`ballast_csi_plugin`).
//! Must not depend on: server crates.
//! Invariant: SIGTERM/SIGINT stop the gRPC server only; FUSE daemons and mounts stay up for the
//! pods that use them (see the crate documentation).

use std::path::PathBuf;

use ballast_csi_plugin::server::{self, Mode, PluginConfig};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ballast-csi",
    version,
    about = "CSI driver csi.ballast.io for Ballast volumes"
)]
struct Arguments {
    /// CSI endpoint: unix:///path/to/csi.sock (or a bare absolute path).
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// This node's name (usually the Kubernetes node name); required in node and all modes.
    #[arg(long)]
    node_id: Option<String>,
    /// gRPC address of the storage node.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    ballast_endpoint: String,
    /// Where the node plugin keeps its record of staged and published volumes and the FUSE
    /// daemons' logs; must survive plugin restarts (a hostPath in Kubernetes).
    #[arg(long, default_value = "/var/lib/ballast-csi")]
    state_dir: PathBuf,
    /// The FUSE driver: a path, or a name looked up on PATH.
    #[arg(long, default_value = "ballast-fuse")]
    fuse_binary: PathBuf,
    /// The socket of `ballast-csi-mounter`, which then owns the FUSE daemons (so they survive
    /// restarts of this plugin's container). Without it the plugin starts them itself, and they
    /// survive only restarts of the plugin process.
    #[arg(long)]
    mounter_socket: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let arguments = Arguments::parse();
    let config = PluginConfig {
        endpoint: arguments.endpoint,
        mode: arguments.mode,
        node_id: arguments.node_id,
        ballast_endpoint: arguments.ballast_endpoint,
        state_directory: arguments.state_dir,
        fuse_binary: arguments.fuse_binary,
        mounter_socket: arguments.mounter_socket,
    };
    match server::serve(
        config,
        ballast_csi_plugin::signals::termination("stopping the CSI server (mounts stay)"),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ballast-csi failed");
            eprintln!("ballast-csi: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
