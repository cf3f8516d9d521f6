//! `ballast`: the operator's command line. Manages volumes, shows node status, and starts or
//! stops a local single-node setup for development.
//!
//! Owns: argument parsing, human-readable output, and the local-setup process supervision.
//! Must not depend on: any server crate. The node and the FUSE driver are separate binaries
//! (`ballast-node`, `ballast-fuse`) that `ballast local` runs from its own directory.
//! Invariants: every wait is bounded; every path handed to a child process is absolute.

mod local;
mod progress;
mod size;

use anyhow::Context;
use ballast_client::{BallastClient, ClientOptions};
use clap::{Parser, Subcommand};

use crate::size::{format_size, parse_size_bytes};

#[derive(Debug, Parser)]
#[command(
    name = "ballast",
    version,
    about = "Ballast storage platform command line"
)]
struct Arguments {
    /// gRPC address of a storage node (several nodes of one cluster: comma-separated).
    #[arg(
        long,
        global = true,
        env = "BALLAST_NODE",
        default_value = "http://127.0.0.1:7400"
    )]
    node: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show the node's device, log and replicated containers.
    Status,
    /// Show the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run a single-node setup on this machine for development.
    #[command(subcommand)]
    Local(local::LocalCommand),
    /// Verify every data block the node (the first one of --node) holds now, repair bad blocks
    /// from replicas, and print the result.
    Scrub {
        /// Pace of this pass, e.g. 64MiB (per second); default: the node's configured pace.
        #[arg(long, value_parser = parse_size_bytes)]
        rate: Option<u64>,
        /// Give up waiting for the result after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_seconds: u64,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List every node: its state, role in the metadata group, capacity and containers.
    List,
    /// Move every replica off a node before it is removed; it gets no new replicas. Waits (with
    /// progress) until the node holds nothing, unless `--no-wait`.
    Drain {
        node_id: u64,
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the drain itself goes on).
        #[arg(long, default_value_t = 3_600)]
        timeout_seconds: u64,
    },
    /// Make a draining node eligible for replicas again.
    Undrain { node_id: u64 },
    /// Wait (with progress) until every container is fully replicated on live nodes and the
    /// replicas are balanced: after a node loss, a drain, or adding nodes.
    Wait {
        #[arg(long, default_value_t = 3_600)]
        timeout_seconds: u64,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Capacity limit, e.g. 512MiB, 10GiB, 1G or plain bytes.
        #[arg(long, default_value = "10GiB", value_parser = parse_size_bytes)]
        quota: u64,
        /// Copies kept of every piece of data; 0 lets the cluster choose (3, or every node of a
        /// smaller cluster).
        #[arg(long, default_value_t = 0)]
        replication_factor: u32,
        /// Copies that must hold a write before it succeeds; 0 lets the cluster choose (a
        /// majority of the replicas).
        #[arg(long, default_value_t = 0)]
        replication_minimum: u32,
        /// Place replicas only on nodes with these labels, e.g. `--selector zone=a,gpu=true`.
        #[arg(long, value_parser = parse_selector, default_value = "")]
        selector: std::collections::BTreeMap<String, String>,
    },
    /// List volumes.
    List {
        /// Print sizes as exact byte counts (for scripts and tests).
        #[arg(long)]
        bytes: bool,
    },
    /// Delete a volume and all its data.
    Delete { name: String },
    /// Checksum of the answering node's replica of a volume (compare replicas at one index).
    Digest { name: String },
    /// Change a volume's quota (shrinking below the bytes in use is refused).
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size_bytes)]
        quota: u64,
    },
    /// Make the node (the first one of --node) lead the volume's replicated group: it takes
    /// over once the group is idle. Leader balancing may move the leadership again later.
    Lead {
        name: String,
        /// Give up when the group has not gone quiet within this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let arguments = Arguments::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(arguments))
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    match arguments.command {
        Command::Volume(VolumeCommand::Lead {
            name,
            timeout_seconds,
        }) => lead_volume(&arguments.node, &name, timeout_seconds).await,
        Command::Volume(command) => volume(&connect(&arguments.node).await?, command).await,
        Command::Status => status(&connect(&arguments.node).await?).await,
        Command::Node(command) => node(&connect(&arguments.node).await?, command).await,
        Command::Local(command) => local::run(command).await,
        Command::Scrub {
            rate,
            timeout_seconds,
        } => scrub(&arguments.node, rate.unwrap_or(0), timeout_seconds).await,
    }
}

async fn scrub(node: &str, rate_bytes_per_second: u64, timeout_seconds: u64) -> anyhow::Result<()> {
    // A pass is answered by the node it is sent to: only the first address is used, so the
    // client cannot fail over to another node and scrub that one instead.
    let endpoint = node.split(',').next().unwrap_or(node).trim();
    let options = ClientOptions {
        request_timeout_ms: timeout_seconds.saturating_mul(1000).max(1000),
        ..ClientOptions::default()
    };
    let client = BallastClient::connect_with_options(endpoint, options)
        .await
        .with_context(|| format!("connecting to the storage node at {endpoint}"))?;
    let pass = client
        .scrub(rate_bytes_per_second)
        .await
        .context("running a scrub pass")?;
    print!("{}", render_scrub_pass(&pass));
    if pass.unrepairable_block_count > 0 {
        anyhow::bail!(
            "{} bad block(s) could not be repaired; reads of them fail with EIO",
            pass.unrepairable_block_count
        );
    }
    Ok(())
}

async fn lead_volume(node: &str, name: &str, timeout_seconds: u64) -> anyhow::Result<()> {
    // Only the first address: the node asked is the node that must lead.
    let endpoint = node.split(',').next().unwrap_or(node).trim();
    let timeout_ms = timeout_seconds.saturating_mul(1000).max(1000);
    let options = ClientOptions {
        // The node's own wait ends first, so its refusal (not a client timeout) is reported.
        request_timeout_ms: timeout_ms.saturating_add(10_000),
        ..ClientOptions::default()
    };
    let client = BallastClient::connect_with_options(endpoint, options)
        .await
        .with_context(|| format!("connecting to the storage node at {endpoint}"))?;
    let handover = client
        .lead_volume(name, timeout_ms)
        .await
        .with_context(|| format!("making {endpoint} lead volume {name:?}"))?;
    println!(
        "{endpoint} leads volume {name} (waited {} ms, {} election(s))",
        handover.waited_ms, handover.election_count
    );
    Ok(())
}

/// The result of a scrub pass, one `key value` line each (stable for scripts and tests).
fn render_scrub_pass(pass: &ballast_client::proto::ScrubPass) -> String {
    let duration_ms = (pass.finished_ns.saturating_sub(pass.started_ns)).max(0) / 1_000_000;
    format!(
        "containers     {}\nverified       {} blocks ({})\nerrors found   {}\nrepaired       {}\nunrepairable   {}\nskipped        {}\nduration       {} ms\n",
        pass.container_count,
        pass.verified_block_count,
        format_size(pass.verified_bytes),
        pass.error_count,
        pass.repaired_block_count,
        pass.unrepairable_block_count,
        pass.skipped_block_count,
        duration_ms
    )
}

async fn connect(node: &str) -> anyhow::Result<BallastClient> {
    BallastClient::connect_with_options(node, ClientOptions::default())
        .await
        .with_context(|| format!("connecting to the storage node at {node} (is it running?)"))
}

async fn volume(client: &BallastClient, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            quota,
            replication_factor,
            replication_minimum,
            selector,
        } => {
            let volume = client
                .create_volume_placed(
                    &name,
                    quota,
                    replication_factor,
                    replication_minimum,
                    selector,
                )
                .await
                .with_context(|| format!("creating volume {name:?}"))?;
            println!(
                "created volume {} (id {}, quota {}, replication {}/{})",
                volume.name,
                volume.volume_id,
                format_size(volume.quota_bytes),
                volume.replication_minimum,
                volume.replication_factor
            );
        }
        VolumeCommand::List { bytes } => {
            let size = |value: u64| {
                if bytes {
                    value.to_string()
                } else {
                    format_size(value)
                }
            };
            let mut volumes = client.list_volumes().await.context("listing volumes")?;
            volumes.sort_by(|left, right| left.name.cmp(&right.name));
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|volume| {
                    vec![
                        volume.name.clone(),
                        volume.volume_id.to_string(),
                        size(volume.quota_bytes),
                        size(volume.used_bytes),
                        volume.replication_factor.to_string(),
                        volume.inode_count.to_string(),
                        volume
                            .replica_node_ids
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        // 0: the answering node holds no replica and does not know.
                        match volume.leader_node_id {
                            0 => "?".to_owned(),
                            leader => leader.to_string(),
                        },
                        // Replicas being moved away (re-replication, drain, rebalance).
                        if volume.retiring_node_ids.is_empty() {
                            "-".to_owned()
                        } else {
                            volume
                                .retiring_node_ids
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME", "ID", "QUOTA", "USED", "RF", "INODES", "REPLICAS", "LEADER", "MOVING",
                ],
                &rows,
            );
        }
        VolumeCommand::Delete { name } => {
            client
                .delete_volume(&name)
                .await
                .with_context(|| format!("deleting volume {name:?}"))?;
            println!("deleted volume {name}");
        }
        VolumeCommand::Digest { name } => {
            let digest = client
                .volume_digest(&name)
                .await
                .with_context(|| format!("digest of volume {name:?}"))?;
            println!(
                "container {} applied {} digest {:08x} bytes {}",
                digest.container_id, digest.applied_index, digest.digest, digest.content_bytes
            );
        }
        VolumeCommand::Resize { name, quota } => {
            let volume = client
                .resize_volume(&name, quota)
                .await
                .with_context(|| format!("resizing volume {name:?}"))?;
            println!(
                "volume {} now has a quota of {}",
                volume.name,
                format_size(volume.quota_bytes)
            );
        }
        VolumeCommand::Lead { .. } => unreachable!("handled in run: it needs one endpoint"),
    }
    Ok(())
}

fn parse_selector(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut selector = std::collections::BTreeMap::new();
    for pair in text
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("selector term {pair:?} must look like key=value"))?;
        if key.is_empty() {
            return Err(format!("selector term {pair:?} has an empty key"));
        }
        selector.insert(key.to_owned(), value.to_owned());
    }
    Ok(selector)
}

async fn node(client: &BallastClient, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List => node_list(client).await,
        NodeCommand::Drain {
            node_id,
            no_wait,
            timeout_seconds,
        } => {
            client
                .drain_node(node_id, true)
                .await
                .with_context(|| format!("marking node {node_id} draining"))?;
            println!("node {node_id} is draining");
            if no_wait {
                return Ok(());
            }
            progress::wait_for_drain(client, node_id, timeout_seconds).await
        }
        NodeCommand::Undrain { node_id } => {
            client
                .drain_node(node_id, false)
                .await
                .with_context(|| format!("marking node {node_id} active"))?;
            println!("node {node_id} is active");
            Ok(())
        }
        NodeCommand::Wait { timeout_seconds } => {
            progress::wait_until_settled(client, timeout_seconds).await
        }
    }
}

async fn node_list(client: &BallastClient) -> anyhow::Result<()> {
    let cluster = client.cluster_nodes().await.context("listing nodes")?;
    let mut nodes = cluster.nodes;
    nodes.sort_by_key(|node| node.node_id);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            let mut labels: Vec<String> = node
                .labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            labels.sort();
            vec![
                node.node_id.to_string(),
                node.address.clone(),
                if node.draining {
                    format!("{},draining", node.state)
                } else {
                    node.state.clone()
                },
                node.metadata_role.clone(),
                format_size(node.capacity_bytes),
                format_size(node.free_bytes),
                node.container_ids.len().to_string(),
                node.leader_count.to_string(),
                labels.join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "ADDRESS",
            "STATE",
            "METADATA",
            "CAPACITY",
            "FREE",
            "CONTAINERS",
            "LEADS",
            "LABELS",
        ],
        &rows,
    );
    println!(
        "containers: {}, degraded: {}, settled: {}",
        cluster.container_count,
        cluster.container_degraded_count,
        if cluster.settled { "yes" } else { "no" }
    );
    Ok(())
}

async fn status(client: &BallastClient) -> anyhow::Result<()> {
    let status = client
        .status()
        .await
        .context("asking the node for its status")?;
    println!("node             {}", status.node_id);
    println!(
        "device           {} ({})",
        status.device_path,
        format_size(status.device_size_bytes)
    );
    println!("format version   {}", status.format_version);
    println!(
        "data blocks      {} free of {}",
        status.data_block_free_count, status.data_block_count
    );
    println!(
        "log              {} used of {}",
        format_size(status.log_used_bytes),
        format_size(status.log_region_size_bytes)
    );
    println!("volumes          {}", status.volume_count);
    println!("uptime           {} s", status.uptime_ms / 1000);
    println!("checksum errors  {}", status.checksum_error_count);
    println!(
        "durability       {} fsync requests, {} durable writes, {} device syncs",
        status.fsync_request_count, status.durable_write_count, status.device_sync_count
    );
    println!(
        "detached writes  {} records in the log pin {} blocks",
        status.detached_record_count, status.detached_pinned_block_count
    );
    println!(
        "shared reads     {} into {} attached regions",
        status.shared_read_count, status.shared_region_count
    );
    println!("shared writes    {}", status.shared_write_count);
    println!(
        "local frames     {} requests answered on the local socket{}",
        status.local_request_count,
        if status.local_frames {
            ""
        } else {
            " (not served)"
        }
    );
    if let Some(scrub) = &status.scrub {
        println!(
            "scrub            {} passes, {} blocks verified, {} errors, {} repaired, {} unrepairable{}",
            scrub.pass_count,
            scrub.verified_block_count,
            scrub.error_count,
            scrub.repaired_block_count,
            scrub.unrepairable_block_count,
            if scrub.running { ", running" } else { "" }
        );
        let last_pass = match scrub.last_pass_finished_ns {
            0 => "never".to_owned(),
            finished_ns => format!(
                "{} s ago",
                (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|now| now.as_nanos() as i64)
                    .unwrap_or(0)
                    - finished_ns)
                    .max(0)
                    / 1_000_000_000
            ),
        };
        let schedule = match scrub.interval_ms {
            0 => "background passes off".to_owned(),
            interval_ms => format!("every {} s", interval_ms / 1000),
        };
        println!(
            "scrub last pass  {last_pass} ({schedule}, {}/s)",
            format_size(scrub.rate_bytes_per_second)
        );
    }
    println!();
    let rows: Vec<Vec<String>> = status
        .containers
        .iter()
        .map(|container| {
            vec![
                container.container_id.to_string(),
                container.volume_name.clone(),
                container.leader_node_id.to_string(),
                container.last_applied_index.to_string(),
                container.last_log_index.to_string(),
                container.member_count.to_string(),
                if container.quiesced { "yes" } else { "no" }.to_owned(),
                container.term.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "CONTAINER",
            "VOLUME",
            "LEADER",
            "APPLIED",
            "LAST LOG",
            "MEMBERS",
            "QUIESCED",
            "TERM",
        ],
        &rows,
    );
    Ok(())
}

/// Prints left-aligned columns separated by two spaces.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render_row = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut output = render_row(headers.to_vec());
    for row in rows {
        output.push_str(&render_row(row.iter().map(String::as_str).collect()));
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let rows = vec![
            vec!["demo".to_owned(), "1".to_owned()],
            vec!["x".to_owned(), "22".to_owned()],
        ];
        assert_eq!(
            render_table(&["NAME", "ID"], &rows),
            "NAME  ID\ndemo  1\nx     22\n"
        );
    }

    #[test]
    fn scrub_arguments_and_result() {
        let arguments = Arguments::try_parse_from(["ballast", "scrub", "--rate", "64MiB"]).unwrap();
        match arguments.command {
            Command::Scrub {
                rate,
                timeout_seconds,
            } => {
                assert_eq!(rate, Some(64 << 20));
                assert_eq!(timeout_seconds, 3600);
            }
            other => panic!("unexpected {other:?}"),
        }
        let rendered = render_scrub_pass(&ballast_client::proto::ScrubPass {
            container_count: 2,
            verified_block_count: 10,
            verified_bytes: 40960,
            error_count: 1,
            repaired_block_count: 1,
            unrepairable_block_count: 0,
            skipped_block_count: 0,
            started_ns: 1_000_000_000,
            finished_ns: 1_250_000_000,
        });
        assert!(rendered.contains("errors found   1\n"), "{rendered}");
        assert!(rendered.contains("repaired       1\n"), "{rendered}");
        assert!(rendered.contains("unrepairable   0\n"), "{rendered}");
        assert!(rendered.contains("duration       250 ms\n"), "{rendered}");
    }

    #[test]
    fn arguments_parse() {
        let arguments = Arguments::try_parse_from([
            "ballast",
            "volume",
            "create",
            "demo",
            "--quota",
            "512MiB",
            "--replication-factor",
            "3",
        ])
        .unwrap();
        match arguments.command {
            Command::Volume(VolumeCommand::Create {
                quota,
                replication_factor,
                ..
            }) => {
                assert_eq!(quota, 512 << 20);
                assert_eq!(replication_factor, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Arguments::try_parse_from(["ballast", "volume", "create", "x", "--quota", "1XB"])
                .is_err()
        );
    }
}
