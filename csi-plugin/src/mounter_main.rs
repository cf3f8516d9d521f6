//! `ballast-csi-mounter`: the long-lived owner of a node's `ballast-fuse` daemons (see
//! `ballast_csi_plugin::mounter`). `serve` runs it; `list` and `status` ask a running one what it
//! owns (for operators: `kubectl exec ... -- ballast-csi-mounter list`).
//!
//! Owns: command-line arguments (a fixed interface the Helm chart is written against), logging
//! and signal handling.
//! Must not depend on: server crates.
//! Invariant: SIGTERM/SIGINT stop serving only; daemons and mounts are left alone.

use std::path::PathBuf;

use ballast_csi_plugin::mounter::service::{self, MounterConfig};
use ballast_csi_plugin::mounter::MounterClient;
use clap::{Parser, Subcommand};

const DEFAULT_SOCKET: &str = "/var/lib/ballast-csi-mounter/mounter.sock";

#[derive(Debug, Parser)]
#[command(
    name = "ballast-csi-mounter",
    version,
    about = "Owns the ballast-fuse daemons of a node for the CSI node plugin"
)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the node plugin's mount requests on a unix socket.
    Serve {
        /// The socket the node plugin connects to (`ballast-csi --mounter-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where the record of the daemons and their logs live; must survive restarts (a
        /// hostPath in Kubernetes).
        #[arg(long, default_value = "/var/lib/ballast-csi-mounter")]
        state_dir: PathBuf,
        /// Every mountpoint must lie below this directory (the kubelet directory).
        #[arg(long, default_value = "/var/lib/kubelet")]
        mount_root: PathBuf,
        /// gRPC address of the storage node the daemons connect to.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        ballast_endpoint: String,
        /// The FUSE driver: a path, or a name looked up on PATH.
        #[arg(long, default_value = "ballast-fuse")]
        fuse_binary: PathBuf,
    },
    /// Print every daemon a running mounter owns, as JSON.
    List {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print one volume's daemon with the tail of its log, as JSON.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        volume: String,
    },
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
    let result = match Arguments::parse().command {
        Command::Serve {
            socket,
            state_dir,
            mount_root,
            ballast_endpoint,
            fuse_binary,
        } => {
            let config = MounterConfig {
                socket,
                state_directory: state_dir,
                mount_root,
                fuse_binary,
                ballast_endpoint,
            };
            service::serve(
                config,
                ballast_csi_plugin::signals::termination("stopping the mounter (daemons stay)"),
            )
            .await
        }
        Command::List { socket } => MounterClient::new(socket)
            .list()
            .await
            .map(|daemons| print_json(&daemons)),
        Command::Status { socket, volume } => MounterClient::new(socket)
            .status(&volume)
            .await
            .map(|daemon| print_json(&daemon)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ballast-csi-mounter failed");
            eprintln!("ballast-csi-mounter: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("ballast-csi-mounter: encoding the answer: {error}"),
    }
}
