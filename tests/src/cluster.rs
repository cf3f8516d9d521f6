//! A cluster of real `ballast-node` processes on one machine, for replication tests.
//!
//! Owns: starting N nodes (the first bootstraps, the others join it with the cluster secret),
//! finding a volume's leader and replica progress through the CLI, and waiting (bounded) until
//! replicas have caught up.
//! Must not depend on: any Ballast library crate; it sees the cluster from outside, through the
//! `ballast` CLI, as an operator does.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::TestNetwork;
use crate::{wait_until, LocalNode};

/// The join secret of every test cluster.
pub const TEST_JOIN_SECRET: &str = "ballast-test-secret";

pub struct TestCluster {
    pub nodes: Vec<LocalNode>,
}

/// One container row of `ballast status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProgress {
    pub container_id: u64,
    pub volume: String,
    pub leader_node_id: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    /// Quiesced on that node (idle, its own heartbeats or elections paused).
    pub quiesced: bool,
    /// The Raft term of that node's replica.
    pub term: u64,
}

impl TestCluster {
    /// Starts `node_count` nodes with `device_size_bytes` devices, node `i` labelled
    /// `zone=z<i>`, each also given `extra_arguments`; waits until all are registered.
    pub fn start(
        node_count: usize,
        device_size_bytes: u64,
        extra_arguments: &[&str],
    ) -> Result<Self> {
        Self::start_on(
            None,
            node_count,
            device_size_bytes,
            extra_arguments,
            &|_| Vec::new(),
        )
    }

    /// Like [`TestCluster::start`], node `i` also given `node_arguments(i)` (for example
    /// per-node labels such as `--label kubernetes.io/hostname=worker-<i>`).
    pub fn start_with(
        node_count: usize,
        device_size_bytes: u64,
        extra_arguments: &[&str],
        node_arguments: &dyn Fn(u64) -> Vec<String>,
    ) -> Result<Self> {
        Self::start_on(
            None,
            node_count,
            device_size_bytes,
            extra_arguments,
            node_arguments,
        )
    }

    /// Like [`TestCluster::start`], node `i` in host `i`'s namespace of `network`.
    pub fn start_in_network(
        network: &TestNetwork,
        node_count: usize,
        device_size_bytes: u64,
        extra_arguments: &[&str],
    ) -> Result<Self> {
        Self::start_on(
            Some(network),
            node_count,
            device_size_bytes,
            extra_arguments,
            &|_| Vec::new(),
        )
    }

    fn start_on(
        network: Option<&TestNetwork>,
        node_count: usize,
        device_size_bytes: u64,
        extra_arguments: &[&str],
        node_arguments: &dyn Fn(u64) -> Vec<String>,
    ) -> Result<Self> {
        let mut nodes: Vec<LocalNode> = Vec::with_capacity(node_count);
        for index in 0..node_count {
            let node_id = index as u64 + 1;
            let mut arguments: Vec<String> = vec![
                "--join-secret".into(),
                TEST_JOIN_SECRET.into(),
                "--label".into(),
                format!("zone=z{node_id}"),
            ];
            if let Some(first) = nodes.first() {
                arguments.push("--join".into());
                arguments.push(first.endpoint());
            }
            arguments.extend(extra_arguments.iter().map(|argument| argument.to_string()));
            arguments.extend(node_arguments(node_id));
            let node = match network {
                None => LocalNode::start_member(device_size_bytes, node_id, arguments),
                Some(network) => LocalNode::start_member_at(
                    device_size_bytes,
                    node_id,
                    arguments,
                    format!("{}:7400", network.address(index + 1)),
                    Some(format!("/var/run/netns/{}", network.namespace(index + 1))),
                ),
            };
            nodes.push(node.with_context(|| format!("starting node {node_id}"))?);
        }
        let cluster = Self { nodes };
        // Registered, and the metadata group has its voters (promotion follows registration).
        let voters = node_count.min(3);
        wait_until("every node registered", Duration::from_secs(60), || {
            cluster
                .cli(&["node", "list"])
                .map(|listing| {
                    let node_rows = listing.lines().skip(1).filter(|line| {
                        line.split_whitespace()
                            .next()
                            .is_some_and(|field| field.parse::<u64>().is_ok())
                    });
                    node_rows.count() == node_count && listing.matches(" voter ").count() >= voters
                })
                .unwrap_or(false)
        })?;
        Ok(cluster)
    }

    /// Every node's endpoint, comma-separated (what clients are given).
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(LocalNode::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs the CLI against the running nodes (a client fails over between them).
    pub fn cli(&self, arguments: &[&str]) -> Result<String> {
        let endpoints: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(LocalNode::endpoint)
            .collect();
        crate::run_cli(&endpoints.join(","), arguments)
    }

    /// Starts one more node, joining the cluster, with the same arguments the others got plus
    /// `extra_arguments`; waits until it is registered. Returns its node id.
    pub fn add_node(&mut self, device_size_bytes: u64, extra_arguments: &[&str]) -> Result<u64> {
        let node_id = self.nodes.len() as u64 + 1;
        // `--join` takes one address: any running node's.
        let join = self
            .nodes
            .iter()
            .find(|node| node.is_running())
            .map(LocalNode::endpoint)
            .context("no running node to join")?;
        let mut arguments: Vec<String> = vec![
            "--join-secret".into(),
            TEST_JOIN_SECRET.into(),
            "--label".into(),
            format!("zone=z{node_id}"),
            "--join".into(),
            join,
        ];
        arguments.extend(extra_arguments.iter().map(|argument| argument.to_string()));
        let node = LocalNode::start_member(device_size_bytes, node_id, arguments)
            .with_context(|| format!("starting node {node_id}"))?;
        self.nodes.push(node);
        wait_until("the new node registered", Duration::from_secs(60), || {
            self.cli(&["node", "list"])
                .map(|listing| {
                    listing
                        .lines()
                        .any(|line| line.split_whitespace().next() == Some(&node_id.to_string()))
                })
                .unwrap_or(false)
        })?;
        Ok(node_id)
    }

    /// `(replicas, moving away)` of `volume` as the cluster map records them.
    pub fn placement(&self, volume: &str) -> Result<(Vec<u64>, Vec<u64>)> {
        let listing = self.cli(&["volume", "list", "--bytes"])?;
        let parse = |field: &str| -> Result<Vec<u64>> {
            if field == "-" {
                return Ok(Vec::new());
            }
            field
                .split(',')
                .map(|id| id.parse::<u64>().context("node id"))
                .collect()
        };
        for line in listing.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.first() == Some(&volume) {
                if fields.len() < 9 {
                    bail!("unexpected volume row {line:?}");
                }
                return Ok((parse(fields[6])?, parse(fields[8])?));
            }
        }
        bail!("volume {volume} not listed:\n{listing}")
    }

    /// Number of replicas each node holds, from `ballast node list` (node id, containers).
    pub fn replica_counts(&self) -> Result<Vec<(u64, usize)>> {
        let listing = self.cli(&["node", "list"])?;
        let header = listing.lines().next().unwrap_or_default();
        // Sizes contain spaces ("1.7 GiB"): find the column by its offset in the aligned table.
        let offset = header.find("CONTAINERS").context("no CONTAINERS column")?;
        let mut counts = Vec::new();
        for line in listing.lines().skip(1) {
            let Ok(node_id) = line.split_whitespace().next().unwrap_or("").parse::<u64>() else {
                continue; // The summary line.
            };
            let count = line
                .get(offset..)
                .and_then(|rest| rest.split_whitespace().next())
                .with_context(|| format!("no container count in {line:?}"))?;
            counts.push((node_id, count.parse()?));
        }
        Ok(counts)
    }

    pub fn node_mut(&mut self, node_id: u64) -> &mut LocalNode {
        &mut self.nodes[node_id as usize - 1]
    }

    /// Creates a volume with `quota` and replication factor `replication_factor`.
    pub fn create_replicated_volume(
        &self,
        volume: &str,
        quota: &str,
        replication_factor: u32,
    ) -> Result<()> {
        self.cli(&[
            "volume",
            "create",
            volume,
            "--quota",
            quota,
            "--replication-factor",
            &replication_factor.to_string(),
        ])
        .map(|_| ())
    }

    /// The log tail of every node, for a failure message.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("node {} log tail:\n{}", node.node_id, node.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The container rows of one node's `ballast status`.
    pub fn progress(&self, node_id: u64) -> Result<Vec<ContainerProgress>> {
        let node = &self.nodes[node_id as usize - 1];
        let status = node.cli(&["status"])?;
        let mut rows = Vec::new();
        let mut in_table = false;
        for line in status.lines() {
            if line.starts_with("CONTAINER") {
                in_table = true;
                continue;
            }
            if !in_table || line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 {
                bail!("unexpected status row {line:?}");
            }
            rows.push(ContainerProgress {
                container_id: fields[0].parse()?,
                volume: fields[1].to_owned(),
                leader_node_id: fields[2].parse()?,
                applied_index: fields[3].parse()?,
                last_log_index: fields[4].parse()?,
                quiesced: fields.get(6) == Some(&"yes"),
                term: fields
                    .get(7)
                    .and_then(|term| term.parse().ok())
                    .unwrap_or(0),
            });
        }
        Ok(rows)
    }

    /// The node leading `volume`'s container, as the running nodes agree (bounded wait).
    pub fn leader_of(&self, volume: &str) -> Result<u64> {
        let mut leader = 0;
        wait_until(
            &format!("a leader of {volume}"),
            Duration::from_secs(30),
            || {
                let views: Vec<u64> = self
                    .nodes
                    .iter()
                    .filter(|node| node.is_running())
                    .filter_map(|node| self.progress(node.node_id).ok())
                    .filter_map(|rows| rows.into_iter().find(|row| row.volume == volume))
                    .map(|row| row.leader_node_id)
                    .collect();
                match views.first() {
                    Some(&first) if first != 0 && views.iter().all(|&view| view == first) => {
                        leader = first;
                        self.nodes[first as usize - 1].is_running()
                    }
                    _ => false,
                }
            },
        )?;
        Ok(leader)
    }

    /// Waits until every running replica of `volume` has applied the same index as its leader.
    pub fn wait_caught_up(&self, volume: &str, timeout: Duration) -> Result<u64> {
        let mut applied = 0;
        wait_until(&format!("replicas of {volume} caught up"), timeout, || {
            let rows: Vec<ContainerProgress> = self
                .nodes
                .iter()
                .filter(|node| node.is_running())
                .filter_map(|node| self.progress(node.node_id).ok())
                .filter_map(|rows| rows.into_iter().find(|row| row.volume == volume))
                .collect();
            let running = self.nodes.iter().filter(|node| node.is_running()).count();
            match rows.first() {
                Some(first)
                    if rows.len() == running
                        && rows
                            .iter()
                            .all(|row| row.applied_index == first.applied_index) =>
                {
                    applied = first.applied_index;
                    true
                }
                _ => false,
            }
        })?;
        Ok(applied)
    }

    /// `(node, applied index, digest)` of every running node's replica of `volume`.
    pub fn digests(&self, volume: &str) -> Result<Vec<(u64, u64, String)>> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.node_id)
            .collect();
        self.digests_on(volume, &running)
    }

    /// `(node, applied index, digest)` of the replicas of `volume` on `holders`.
    pub fn digests_on(&self, volume: &str, holders: &[u64]) -> Result<Vec<(u64, u64, String)>> {
        let mut digests = Vec::new();
        for node in self
            .nodes
            .iter()
            .filter(|node| holders.contains(&node.node_id))
        {
            let line = node.cli(&["volume", "digest", volume])?;
            // "container C applied A digest D bytes B"
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                bail!("unexpected digest line {line:?}");
            }
            digests.push((node.node_id, fields[3].parse()?, fields[5].to_owned()));
        }
        Ok(digests)
    }

    /// Waits until every running replica of `volume` is at the same index with the same digest:
    /// no replica diverges. Returns the common digest.
    pub fn wait_converged(&self, volume: &str, timeout: Duration) -> Result<String> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.node_id)
            .collect();
        self.wait_converged_on(volume, &running, timeout)
    }

    /// Like [`TestCluster::wait_converged`], for the replicas on `holders` only.
    pub fn wait_converged_on(
        &self,
        volume: &str,
        holders: &[u64],
        timeout: Duration,
    ) -> Result<String> {
        let mut last = Vec::new();
        let result = wait_until(
            &format!("replicas of {volume} on nodes {holders:?} converged"),
            timeout,
            || match self.digests_on(volume, holders) {
                Ok(digests) => {
                    let converged = digests.len() == holders.len()
                        && digests
                            .windows(2)
                            .all(|pair| pair[0].1 == pair[1].1 && pair[0].2 == pair[1].2);
                    last = digests;
                    converged
                }
                Err(_) => false,
            },
        );
        match result {
            Ok(()) => Ok(last[0].2.clone()),
            Err(error) => {
                let progress: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| match self.progress(node.node_id) {
                        Ok(rows) => format!("node {}: {rows:?}", node.node_id),
                        Err(error) => format!("node {}: {error}", node.node_id),
                    })
                    .collect();
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|node| format!("node {} log tail:\n{}", node.node_id, node.log_tail()))
                    .collect();
                bail!(
                    "{error}; last digests (node, applied, digest): {last:?}\n{}\n{}",
                    progress.join("\n"),
                    logs.join("\n")
                )
            }
        }
    }
}
