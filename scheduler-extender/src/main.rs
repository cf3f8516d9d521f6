//! `ballast-scheduler-extender`: command line, logging, and serving until SIGTERM or Ctrl-C.
//!
//! Owns: the flags and their defaults.
//! Must not depend on: anything but this crate's library, clap, tokio and tracing.
//! Invariants: a bad flag or an unusable address ends the process with a message and exit
//! status 1 (2 for clap's own usage errors); nothing is served before the listener is bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_scheduler_extender::server::{self, ExtenderState, FilterPolicy};
use ballast_scheduler_extender::source::PlacementSource;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ballast-scheduler-extender",
    version,
    about = "kube-scheduler extender: filter and prioritize nodes by where a pod's Ballast \
             volumes have replicas and leaders"
)]
struct Arguments {
    /// Address to serve HTTP on (`/filter`, `/prioritize`, `/healthz`).
    #[arg(long, default_value = "0.0.0.0:8099")]
    listen: SocketAddr,
    /// Ballast gRPC endpoint(s), comma-separated, e.g. `http://ballast-node:7400`.
    #[arg(long, env = "BALLAST_ENDPOINT")]
    ballast_endpoint: String,
    /// `prefer`: filter passes every node and locality only shapes the scores. `require`: only
    /// nodes holding a replica of every Ballast volume of the pod pass.
    #[arg(long, value_enum, default_value_t = FilterPolicy::Prefer)]
    filter_policy: FilterPolicy,
    /// Storage-node label whose value is the Kubernetes node name (the chart passes
    /// `--label kubernetes.io/hostname=$(NODE_NAME)` to every storage node).
    #[arg(long, default_value = "kubernetes.io/hostname")]
    node_name_label: String,
    /// How long one listing of Ballast volumes and nodes is reused.
    #[arg(long, default_value_t = 2_000)]
    cache_ttl_ms: u64,
    /// Deadline of one listing (retries included); keep it under kube-scheduler's httpTimeout.
    #[arg(long, default_value_t = 2_000)]
    ballast_timeout_ms: u64,
    /// Largest request body accepted (larger: HTTP 413). Whole NodeLists (nodeCacheCapable:
    /// false) of big clusters need more than node names.
    #[arg(long, default_value_t = 32 << 20)]
    request_body_limit_bytes: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let arguments = Arguments::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(message) = runtime.block_on(run(arguments)) {
        eprintln!("ballast-scheduler-extender: {message}");
        std::process::exit(1);
    }
}

async fn run(arguments: Arguments) -> Result<(), String> {
    let source = PlacementSource::new(
        &arguments.ballast_endpoint,
        &arguments.node_name_label,
        Duration::from_millis(arguments.cache_ttl_ms),
        Duration::from_millis(arguments.ballast_timeout_ms),
    )
    .map_err(|error| error.to_string())?;
    let state = Arc::new(ExtenderState {
        source,
        filter_policy: arguments.filter_policy,
    });
    let listener = tokio::net::TcpListener::bind(arguments.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", arguments.listen))?;
    tracing::info!(listen = %arguments.listen, ballast = %arguments.ballast_endpoint,
        filter_policy = ?arguments.filter_policy, node_name_label = %arguments.node_name_label,
        "serving");
    axum::serve(
        listener,
        server::router(state, arguments.request_body_limit_bytes),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .map_err(|error| format!("serving: {error}"))
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
}
