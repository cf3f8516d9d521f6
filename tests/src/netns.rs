//! Hosts in network namespaces on one machine, for tests of what crosses a network.
//!
//! Owns: one Linux bridge in the root namespace (the test's own "switch", with an address so
//! processes of the root namespace reach every host), one network namespace per host joined to
//! it by a veth pair, and real packet-level partitions: taking a host's bridge port down cuts it
//! off from every other host and from the root namespace.
//! Must not depend on: any Ballast crate.
//! Invariants: every name carries this process's id, so concurrent tests never share a bridge or
//! namespace; everything is deleted on drop, even after a failure.
//! Processes enter a namespace with `nsenter --net`, which changes the network namespace only:
//! FUSE mounts made inside stay visible to the test (`ip netns exec` would give them a private
//! mount namespace).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static NETWORK_COUNT: AtomicU32 = AtomicU32::new(0);

pub struct TestNetwork {
    prefix: String,
    bridge: String,
    subnet: String,
    host_count: usize,
}

fn run(arguments: &[&str]) -> Result<()> {
    let output = Command::new(arguments[0])
        .args(&arguments[1..])
        .output()
        .with_context(|| format!("running {arguments:?}"))?;
    if !output.status.success() {
        bail!(
            "{arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl TestNetwork {
    /// Creates a bridge and `host_count` namespaces attached to it.
    pub fn create(host_count: usize) -> Result<Self> {
        let sequence = NETWORK_COUNT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 0xFFFF) * 4 + sequence % 4;
        // Interface names are limited to 15 bytes: "bl" + 5 hex digits + role + index.
        let prefix = format!("bl{id:05x}");
        let subnet = format!("10.{}.{}", 100 + (id / 250) % 100, id % 250);
        let network = Self {
            bridge: format!("{prefix}br"),
            prefix,
            subnet,
            host_count,
        };
        network.build().inspect_err(|_| network.destroy())?;
        Ok(network)
    }

    fn build(&self) -> Result<()> {
        let bridge = self.bridge.as_str();
        run(&["ip", "link", "add", bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", self.subnet),
            "dev",
            bridge,
        ])?;
        run(&["ip", "link", "set", bridge, "up"])?;
        for host in 1..=self.host_count {
            let namespace = self.namespace(host);
            let (outside, inside) = (self.port(host), format!("{}p{host}", self.prefix));
            run(&["ip", "netns", "add", &namespace])?;
            run(&[
                "ip", "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            run(&["ip", "link", "set", &inside, "netns", &namespace])?;
            let in_namespace = |arguments: &[&str]| {
                let mut full = vec!["ip", "netns", "exec", namespace.as_str()];
                full.extend_from_slice(arguments);
                run(&full)
            };
            in_namespace(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", self.address(host)),
                "dev",
                &inside,
            ])?;
            in_namespace(&["ip", "link", "set", &inside, "up"])?;
            in_namespace(&["ip", "link", "set", "lo", "up"])?;
            run(&["ip", "link", "set", &outside, "master", bridge])?;
            run(&["ip", "link", "set", &outside, "up"])?;
        }
        Ok(())
    }

    /// The namespace of host `host` (1-based).
    pub fn namespace(&self, host: usize) -> String {
        format!("{}n{host}", self.prefix)
    }

    /// The bridge port (root-namespace end of the veth) of host `host`.
    fn port(&self, host: usize) -> String {
        format!("{}v{host}", self.prefix)
    }

    /// The IPv4 address of host `host`.
    pub fn address(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, 10 + host)
    }

    /// A command that runs `program` inside host `host`'s network namespace.
    pub fn command(&self, host: usize, program: &std::path::Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.namespace(host)))
            .arg("--")
            .arg(program);
        command
    }

    /// Cuts host `host` off from every other host and from the root namespace.
    pub fn isolate(&self, host: usize) -> Result<()> {
        run(&["ip", "link", "set", &self.port(host), "down"])
    }

    /// Reconnects host `host`.
    pub fn heal(&self, host: usize) -> Result<()> {
        run(&["ip", "link", "set", &self.port(host), "up"])
    }

    fn destroy(&self) {
        for host in 1..=self.host_count {
            let _ = run(&["ip", "netns", "delete", &self.namespace(host)]);
            let _ = run(&["ip", "link", "delete", &self.port(host)]);
        }
        let _ = run(&["ip", "link", "delete", &self.bridge]);
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        self.destroy();
    }
}
