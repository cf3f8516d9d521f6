//! Graceful termination of the plugin's binaries (`ballast-csi`, `ballast-csi-mounter`).
//!
//! Owns: waiting for SIGTERM or SIGINT.
//! Must not depend on: the CSI services.
//! Invariant: failing to install the handlers never stops a binary from serving; it then runs
//! until killed, which both binaries are built to survive (mounts and daemons stay).

use tokio::signal::unix::{signal, SignalKind};

/// Completes on SIGTERM or SIGINT, logging `what` is being stopped and what stays. Never
/// completes if the handlers cannot be installed.
pub async fn termination(stopping: &str) {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("termination requested; {stopping}");
        }
        _ => {
            tracing::error!("cannot listen for signals; serving until killed");
            std::future::pending::<()>().await;
        }
    }
}
