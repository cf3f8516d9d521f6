//! The plugin process: which services run (by `--mode`), the unix socket they are served on, and
//! the clients to the storage node.
//!
//! Owns: the CSI endpoint (`unix:///csi/csi.sock`, `unix:/path` or a bare path), the socket file's
//! lifetime, and the client timeouts.
//! Must not depend on: the services' internals; it only wires them.
//! Invariants:
//! - The plugin starts even when the storage node is down (lazy connection): kubelet must be able
//!   to register the node plugin, and Probe reports `ready: false` until the node answers.
//! - A stale socket file from a killed instance is replaced; any other file at the socket path is
//!   left alone and reported.
//! - Shutting down (SIGTERM/SIGINT) stops serving and removes the socket within a bounded grace
//!   time, even while clients keep connections open; it never touches FUSE daemons or mounts,
//!   which belong to the pods using them.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_client::{BallastClient, ClientOptions, RetryPolicy};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::csi::v1::controller_server::ControllerServer;
use crate::csi::v1::identity_server::IdentityServer;
use crate::csi::v1::node_server::NodeServer;
use crate::daemons::FuseDaemons;
use crate::fuse::FuseLauncher;
use crate::identity::IdentityService;
use crate::mounter::MounterClient;
use crate::node::NodeService;
use crate::parameters::validate_label_value;
use crate::state::StateFile;
use crate::CsiError;

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller (the Deployment with external-provisioner and -resizer).
    Controller,
    /// Identity + Node (the DaemonSet with node-driver-registrar).
    Node,
    /// All three (single-process setups and tests).
    All,
}

impl Mode {
    fn serves_controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    fn serves_node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Everything the plugin is started with.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub endpoint: String,
    pub mode: Mode,
    pub node_id: Option<String>,
    pub ballast_endpoint: String,
    pub state_directory: PathBuf,
    pub fuse_binary: PathBuf,
    /// `ballast-csi-mounter`'s socket: when set, the mounter owns the FUSE daemons; otherwise
    /// the plugin starts them itself.
    pub mounter_socket: Option<PathBuf>,
}

/// Options of the client that performs volume operations: each attempt bounded, retried only
/// when safe (see `ballast_client::retry`), all within the sidecars' usual deadlines.
const CONTROL_CLIENT_OPTIONS: ClientOptions = ClientOptions {
    connect_timeout_ms: 5_000,
    request_timeout_ms: 20_000,
    retry: RetryPolicy {
        attempt_count_max: 3,
        backoff_initial_ms: 100,
        backoff_max_ms: 1_000,
        // Rides out a leader election of the storage cluster.
        failover_window_ms: 15_000,
    },
};

/// Options of the Probe client: one quick attempt, so Probe answers well within the
/// livenessprobe sidecar's deadline.
const PROBE_CLIENT_OPTIONS: ClientOptions = ClientOptions {
    connect_timeout_ms: 2_000,
    request_timeout_ms: 3_000,
    retry: RetryPolicy {
        attempt_count_max: 1,
        backoff_initial_ms: 0,
        backoff_max_ms: 0,
        failover_window_ms: 0,
    },
};

/// Time in-flight calls get to finish after SIGTERM before the process exits regardless.
const SHUTDOWN_GRACE_MS: u64 = 5_000;

/// The socket path of a CSI endpoint: `unix:///p`, `unix:/p` or a bare absolute path `/p`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.is_empty() || !Path::new(path).is_absolute() || path.contains("://") {
        return Err(CsiError::InvalidArgument(format!(
            "--endpoint {endpoint:?} must be unix:///absolute/path or an absolute socket path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// The node id, required in node and all modes; it is also a topology label value.
fn node_id_for(config: &PluginConfig) -> Result<Option<String>, CsiError> {
    if !config.mode.serves_node() {
        return Ok(config.node_id.clone());
    }
    let node_id = config.node_id.clone().unwrap_or_default();
    if node_id.is_empty() {
        return Err(CsiError::InvalidArgument(
            "--node-id is required in node and all modes".to_owned(),
        ));
    }
    validate_label_value(&node_id).map_err(|reason| {
        CsiError::InvalidArgument(format!(
            "--node-id is reported as the topology label {}: {reason}",
            crate::TOPOLOGY_NODE_KEY
        ))
    })?;
    Ok(Some(node_id))
}

/// Binds the socket, replacing a stale one.
pub(crate) fn bind(socket: &Path) -> Result<UnixListener, CsiError> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| CsiError::io("creating socket directory", parent, error))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(socket)
            .map_err(|error| CsiError::io("removing stale socket", socket, error))?,
        Ok(_) => {
            return Err(CsiError::InvalidArgument(format!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            )))
        }
        Err(_) => {}
    }
    UnixListener::bind(socket).map_err(|error| CsiError::io("binding", socket, error))
}

/// Serves until `shutdown` completes.
pub async fn serve(
    config: PluginConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CsiError> {
    let socket = socket_path(&config.endpoint)?;
    let node_id = node_id_for(&config)?;
    let control_client =
        BallastClient::connect_lazy(&config.ballast_endpoint, CONTROL_CLIENT_OPTIONS)?;
    let probe_client = BallastClient::connect_lazy(&config.ballast_endpoint, PROBE_CLIENT_OPTIONS)?;

    let controller = config
        .mode
        .serves_controller()
        .then(|| ControllerServer::new(ControllerService::new(control_client.clone())));
    let node = match node_id {
        Some(node_id) if config.mode.serves_node() => {
            let daemons = match &config.mounter_socket {
                Some(socket) => FuseDaemons::Mounter(MounterClient::new(socket.clone())),
                None => FuseDaemons::InProcess(FuseLauncher::new(
                    config.fuse_binary.clone(),
                    config.ballast_endpoint.clone(),
                    &config.state_directory,
                )?),
            };
            let state_file = StateFile::open(&config.state_directory)?;
            Some(NodeServer::new(NodeService::new(
                node_id,
                control_client,
                daemons,
                state_file,
            )?))
        }
        _ => None,
    };

    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), mode = ?config.mode,
        ballast_endpoint = %config.ballast_endpoint, "serving CSI");
    println!("ballast-csi serving on {}", socket.display());
    // Graceful shutdown waits for open connections, and kubelet keeps one open for good: after
    // the signal, in-flight calls get SHUTDOWN_GRACE_MS to finish, then the process exits anyway.
    let shutdown_started = Arc::new(Notify::new());
    let shutdown_notifier = Arc::clone(&shutdown_started);
    let server = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(probe_client)))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown.await;
            shutdown_notifier.notify_one();
        });
    let grace_expired = async {
        shutdown_started.notified().await;
        tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
    };
    let result = tokio::select! {
        result = server => result,
        () = grace_expired => {
            tracing::info!(grace_ms = SHUTDOWN_GRACE_MS, "connections still open; exiting");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    result.map_err(|error| CsiError::Internal(format!("gRPC server failed: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            Path::new("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            Path::new("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/csi/csi.sock").unwrap(),
            Path::new("/csi/csi.sock")
        );
        for bad in [
            "",
            "unix://",
            "csi.sock",
            "tcp://127.0.0.1:10000",
            "unix://relative",
        ] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_ids_are_required_for_the_node_service_and_must_be_label_values() {
        let config = |mode, node_id: Option<&str>| PluginConfig {
            endpoint: "/tmp/x.sock".into(),
            mode,
            node_id: node_id.map(str::to_owned),
            ballast_endpoint: "http://127.0.0.1:7400".into(),
            state_directory: "/tmp".into(),
            fuse_binary: "ballast-fuse".into(),
            mounter_socket: None,
        };
        assert!(node_id_for(&config(Mode::Controller, None)).is_ok());
        assert!(node_id_for(&config(Mode::Node, None)).is_err());
        assert!(node_id_for(&config(Mode::All, Some(""))).is_err());
        assert!(node_id_for(&config(Mode::Node, Some("node_1/x"))).is_err());
        assert_eq!(
            node_id_for(&config(Mode::Node, Some("worker-1"))).unwrap(),
            Some("worker-1".to_owned())
        );
    }
}
