//! `ballast-node`: formats a device, or runs a storage node on it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use ballast_proto::cluster_v1::cluster_server::ClusterServer;
use ballast_proto::cluster_v1::raft_transport_server::RaftTransportServer;
use ballast_proto::v1::admin_server::AdminServer;
use ballast_proto::v1::filesystem_server::FilesystemServer;
use ballast_storage_node::raft_network::RAFT_MESSAGE_SIZE_BYTES_MAX;
use ballast_storage_node::service::admin::AdminService;
use ballast_storage_node::service::cluster::{ClusterService, RaftTransportService};
use ballast_storage_node::service::filesystem::FilesystemService;
use ballast_storage_node::service::local::LocalFilesystem;
use ballast_storage_node::{node, scrub, NodeConfig, StorageNode};
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
// Parsed once at start-up: the size of the value does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// Address other nodes and clients reach this node at; defaults to http://<listen>.
        #[arg(long)]
        advertise: Option<String>,
        /// Any node of an existing cluster ("http://host:port"). Without it, the node starts a
        /// cluster of its own (or restarts the one it belongs to).
        #[arg(long)]
        join: Option<String>,
        /// Secret shared by every node of the cluster; joins must present it.
        #[arg(
            long,
            env = "BALLAST_JOIN_SECRET",
            default_value = "",
            hide_env_values = true
        )]
        join_secret: String,
        /// Node label used by placement selectors and failure domains (`zone`, `rack`), e.g.
        /// `--label zone=a --label gpu=true`.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Checkpoint and purge the log at least this often (bounds restart replay; tests use
        /// short intervals to force snapshot transfers).
        #[arg(long, default_value_t = node::CHECKPOINT_INTERVAL_MS_DEFAULT)]
        checkpoint_interval_ms: u64,
        /// How long a node may stay unreachable before its replicas are re-created on other
        /// nodes (milliseconds).
        #[arg(long, default_value_t = ballast_storage_node::mover::DOWN_GRACE_MS_DEFAULT)]
        down_grace_ms: u64,
        /// Pace of scrub passes (reading and verifying every data block), in bytes per second.
        #[arg(long, default_value_t = scrub::SCRUB_RATE_BYTES_PER_SECOND_DEFAULT,
              value_parser = clap::value_parser!(u64).range(1..))]
        scrub_rate_bytes_per_second: u64,
        /// Pause between background scrub passes (milliseconds); 0 disables background passes
        /// (`ballast scrub` and repairs of bad blocks met by reads still work).
        #[arg(long, default_value_t = scrub::SCRUB_INTERVAL_MS_DEFAULT)]
        scrub_interval_ms: u64,
        /// Idle time after which a replicated volume's group stops its own Raft heartbeats and
        /// relies on the node-level heartbeat (milliseconds); 0 keeps every group heartbeating.
        #[arg(long, env = "BALLAST_QUIESCE_IDLE_MS",
              default_value_t = ballast_storage_node::quiescence::QUIESCE_IDLE_MS_DEFAULT)]
        quiesce_idle_ms: u64,
        /// Writes at least this long (and 4 KiB-aligned) have their data written once, to data
        /// blocks named by the log, instead of into the log and again at apply; 0 turns this off.
        #[arg(long, env = "BALLAST_DETACHED_WRITE_BYTES_MIN",
              default_value_t = ballast_storage_node::detached::DETACHED_WRITE_BYTES_MIN_DEFAULT)]
        detached_write_bytes_min: u64,
        /// Move replicas off nodes short of device space, to nodes with room, before their
        /// devices fill up (when this node leads the metadata group). `false` only to test what
        /// happens when a device fills up regardless.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        space_relief: bool,
        /// Unix socket on which FUSE drivers of this host attach memory they share with the
        /// node, so reads skip gRPC's copies (default: `local.sock` in the state directory;
        /// `off` serves none).
        #[arg(long, default_value = "")]
        local_socket: String,
        /// MiB of memory for the state store's block cache: the block rows and directory
        /// entries read most recently, and those flushed since, until compacted (8-65536).
        #[arg(long, default_value_t = (ballast_storage_node::state_store::BLOCK_CACHE_BYTES_DEFAULT >> 20) as u64)]
        state_cache_mib: u64,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} must look like key=value"))?;
    if key.is_empty() || key.len() > 63 || value.len() > 63 {
        return Err(format!(
            "label {text:?}: key must be 1-63 bytes, value at most 63"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: large data-path buffers are reused instead of re-faulted.
    let allocator_tuned = ballast_common::allocator::keep_large_buffers_in_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs in files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !allocator_tuned {
        tracing::debug!("allocator thresholds not set (not glibc)");
    }
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
            advertise,
            join,
            join_secret,
            labels,
            checkpoint_interval_ms,
            down_grace_ms,
            scrub_rate_bytes_per_second,
            scrub_interval_ms,
            quiesce_idle_ms,
            detached_write_bytes_min,
            space_relief,
            local_socket,
            state_cache_mib,
        } => {
            let state_cache_range_mib = (ballast_storage_node::state_store::BLOCK_CACHE_BYTES_MIN
                >> 20) as u64
                ..=(ballast_storage_node::state_store::BLOCK_CACHE_BYTES_MAX >> 20) as u64;
            if !state_cache_range_mib.contains(&state_cache_mib) {
                anyhow::bail!(
                    "--state-cache-mib must be between {} and {}",
                    state_cache_range_mib.start(),
                    state_cache_range_mib.end()
                );
            }
            let local_socket = match local_socket.as_str() {
                "off" => None,
                "" => Some(state_dir.join("local.sock")),
                path => Some(PathBuf::from(path)),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run(
                local_socket,
                NodeConfig {
                    device_path: device,
                    state_directory: state_dir,
                    listen_address: listen,
                    advertise_address: advertise.unwrap_or_else(|| format!("http://{listen}")),
                    join_address: join,
                    join_secret,
                    labels: labels.into_iter().collect(),
                    checkpoint_interval_ms: checkpoint_interval_ms.max(100),
                    // Below a few heartbeat rounds a busy node would be mistaken for a lost one.
                    down_grace_ms: down_grace_ms.max(1_000),
                    scrub: scrub::ScrubConfig {
                        rate_bytes_per_second: scrub_rate_bytes_per_second,
                        interval_ms: scrub_interval_ms,
                    },
                    quiescence: ballast_storage_node::quiescence::QuiescenceConfig {
                        idle_ms: quiesce_idle_ms,
                    },
                    detached_write_bytes_min,
                    move_policy: ballast_storage_node::placement::MovePolicy {
                        relieve_short_of_space: space_relief,
                    },
                    state_block_cache_bytes: usize::try_from(
                        state_cache_mib.saturating_mul(1 << 20),
                    )
                    .unwrap_or(usize::MAX),
                },
            ))
        }
    }
}

async fn run(local_socket: Option<PathBuf>, config: NodeConfig) -> anyhow::Result<()> {
    let listen = config.listen_address;
    let node = StorageNode::open(config)
        .await
        .context("opening the storage node")?;
    if let Some(path) = &local_socket {
        // Without it drivers read over gRPC as before: worth a warning, not a failure.
        node.shared_regions().serve_local_requests(
            std::sync::Arc::new(LocalFilesystem::new(FilesystemService::new(node.clone()))),
            tokio::runtime::Handle::current(),
        );
        if let Err(error) = node.shared_regions().serve(path, node.node_id()) {
            tracing::warn!(path = %path.display(), %error, "cannot serve the local socket");
        }
    }
    let admin = AdminServer::new(AdminService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX);
    let filesystem = FilesystemServer::new(FilesystemService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX);
    let raft_transport = RaftTransportServer::new(RaftTransportService::new(node.clone()))
        .max_decoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX);
    let cluster = ClusterServer::new(ClusterService::new(node.clone()))
        .max_decoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX);
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
        // HTTP/2's default 64 KiB flow-control window makes a sender wait for a window update
        // every 64 KiB: on a busy machine that capped 1 MiB writes and snapshot chunks near
        // 100 MB/s. A window a few messages deep lets them stream.
        .initial_stream_window_size(ballast_proto::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(ballast_proto::HTTP2_CONNECTION_WINDOW_BYTES)
        .max_frame_size(ballast_proto::HTTP2_FRAME_BYTES_MAX)
        .add_service(admin)
        .add_service(filesystem)
        .add_service(raft_transport)
        .add_service(cluster)
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
