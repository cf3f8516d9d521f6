//! Progress of long cluster operations (drain, re-replication, rebalance), polled from the
//! metadata leader and shown with indicatif.
//!
//! Owns: the polling loops and their progress bars.
//! Must not depend on: any server crate; it only reads `ListNodes`.
//! Invariants: every wait is bounded by its timeout; a failed poll is retried a bounded number
//! of times in a row, then reported.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_client::BallastClient;
use indicatif::{ProgressBar, ProgressStyle};

/// How often the cluster is polled.
const POLL_INTERVAL_MS: u64 = 500;
/// Consecutive failed polls tolerated (a leader change makes a few fail).
const POLL_FAILURE_COUNT_MAX: u32 = 20;

fn bar(length: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static progress template"),
    );
    bar.set_message(message.to_owned());
    bar
}

/// Polls `ListNodes` until `done` says so, updating the bar with `(position, length, message)`.
async fn poll(
    client: &BallastClient,
    timeout_seconds: u64,
    bar: &ProgressBar,
    mut step: impl FnMut(&ballast_client::proto::ListNodesResponse) -> (u64, u64, String, bool),
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_seconds);
    let mut failures = 0;
    loop {
        match client.cluster_nodes().await {
            Ok(cluster) => {
                failures = 0;
                let (position, length, message, done) = step(&cluster);
                bar.set_length(length);
                bar.set_position(position);
                bar.set_message(message);
                if done {
                    return Ok(());
                }
            }
            Err(error) => {
                failures += 1;
                if failures > POLL_FAILURE_COUNT_MAX {
                    return Err(error).context("polling the cluster");
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("not finished after {timeout_seconds} s (the cluster keeps working on it)");
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// Waits until `node_id` holds no replica.
pub async fn wait_for_drain(
    client: &BallastClient,
    node_id: u64,
    timeout_seconds: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let progress = bar(0, "moving replicas");
    let mut initial: Option<u64> = None;
    poll(client, timeout_seconds, &progress, |cluster| {
        let held = cluster
            .nodes
            .iter()
            .find(|node| node.node_id == node_id)
            .map_or(0, |node| node.container_ids.len() as u64);
        let total = *initial.get_or_insert(held);
        let total = total.max(held);
        (
            total - held,
            total,
            format!("replicas moved off node {node_id}"),
            held == 0,
        )
    })
    .await?;
    progress.finish_and_clear();
    println!(
        "node {node_id} holds no replicas ({:.1} s); it can be removed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until the metadata leader reports the cluster settled.
pub async fn wait_until_settled(
    client: &BallastClient,
    timeout_seconds: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let progress = bar(0, "containers fully replicated");
    poll(client, timeout_seconds, &progress, |cluster| {
        let total = u64::from(cluster.container_count);
        let healthy = total.saturating_sub(u64::from(cluster.container_degraded_count));
        let message = if healthy < total {
            "containers fully replicated on live nodes".to_owned()
        } else if !cluster.settled {
            "rebalancing".to_owned()
        } else {
            "settled".to_owned()
        };
        (healthy, total, message, cluster.settled)
    })
    .await?;
    progress.finish_and_clear();
    println!(
        "cluster settled: every container fully replicated and balanced ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
