//! `ballast-node`: formats a device, or runs a storage node on it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use ballast_proto::v1::admin_server::AdminServer;
use ballast_proto::v1::filesystem_server::FilesystemServer;
use ballast_storage_node::service::admin::AdminService;
use ballast_storage_node::service::filesystem::FilesystemService;
use ballast_storage_node::{node, NodeConfig, StorageNode};
use clap::{Parser, Subcommand};

/// Largest gRPC message (a 1 MiB write plus framing fits easily; readdir pages too).
const MESSAGE_SIZE_BYTES_MAX: usize = 64 << 20;

#[derive(Parser, Debug)]
#[command(name = "ballast-node", version, about = "Ballast storage node")]
struct Arguments {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Writes a fresh superblock and empty log to a device or file (its size is kept).
    Format {
        #[arg(long)]
        device: PathBuf,
        #[arg(long, default_value_t = 1)]
        node_id: u64,
    },
    /// Serves the device's containers over gRPC.
    Run {
        #[arg(long)]
        device: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let arguments = Arguments::parse();
    match arguments.command {
        NodeCommand::Format { device, node_id } => {
            let superblock = node::format_device(&device, node_id)
                .with_context(|| format!("formatting {}", device.display()))?;
            println!(
                "formatted {}: node {}, format version {}, {} bytes, log region {} bytes, {} data blocks",
                device.display(),
                superblock.node_id,
                superblock.format_version,
                superblock.device_size_bytes,
                superblock.log_region_size_bytes,
                superblock.data_block_count
            );
            Ok(())
        }
        NodeCommand::Run {
            device,
            state_dir,
            listen,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run(NodeConfig {
                device_path: device,
                state_directory: state_dir,
                listen_address: listen,
            }))
        }
    }
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let listen = config.listen_address;
    let node = StorageNode::open(config)
        .await
        .context("opening the storage node")?;
    let admin = AdminServer::new(AdminService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX);
    let filesystem = FilesystemServer::new(FilesystemService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "serving");
    println!("ballast-node {} serving on {listen}", node.node_id());
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(admin)
        .add_service(filesystem)
        .serve_with_incoming_shutdown(
            // Accepted connections must disable Nagle themselves: with a custom incoming, the
            // builder's tcp_nodelay is not applied, and small replies then wait ~40 ms for the
            // peer's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("serving gRPC")?;
    node.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
