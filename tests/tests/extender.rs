//! End-to-end tests of `ballast-scheduler-extender`: a real 3-node Ballast cluster whose storage
//! nodes carry `kubernetes.io/hostname=worker-<i>`, volumes created through the real CSI plugin
//! with the PVC metadata external-provisioner adds, and the real extender binary answering
//! kube-scheduler-shaped ExtenderArgs (both spellings, node names and whole NodeLists). The
//! answers are checked against the placement the cluster reports (ListVolumes): leader, replica
//! or no data. Also: malformed and oversized bodies, and an unreachable Ballast.

mod csi_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ballast_client::{proto, volume_labels, BallastClient};
use ballast_csi_plugin::csi::v1::volume_capability::access_mode::Mode;
use ballast_tests::cluster::TestCluster;
use ballast_tests::{binary, end_to_end_available, free_port, wait_until};
use csi_support::{plugin_available, CsiPlugin};
use serde_json::{json, Value};

const EXTENDER_BINARY: &str = "ballast-scheduler-extender";
const DEVICE_SIZE_BYTES: u64 = 2 << 30;
const NAMESPACE: &str = "shop";
/// Kubernetes nodes the scheduler offers; `worker-4` runs no storage node.
const WORKERS: [&str; 4] = ["worker-1", "worker-2", "worker-3", "worker-4"];
/// Body limit given to the extenders under test (the default is 32 MiB).
const BODY_LIMIT_BYTES: usize = 64 << 10;

fn extender_available() -> bool {
    if binary(EXTENDER_BINARY).exists() {
        return true;
    }
    let message = format!(
        "binary {} (run `cargo build --workspace --bins` first)",
        binary(EXTENDER_BINARY).display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("end-to-end preconditions missing in CI: {message}");
    }
    eprintln!("SKIPPED: end-to-end preconditions missing: {message}");
    false
}

/// A running extender process on a free local port.
struct Extender {
    child: Child,
    address: String,
    log_path: std::path::PathBuf,
}

impl Extender {
    fn start(ballast_endpoint: &str, arguments: &[&str], log_directory: &Path) -> Result<Self> {
        let address = format!("127.0.0.1:{}", free_port());
        let log_path = log_directory.join(format!("extender-{}.log", address.replace(':', "-")));
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(binary(EXTENDER_BINARY))
            .args(["--listen", &address, "--ballast-endpoint", ballast_endpoint])
            .args(["--request-body-limit-bytes", &BODY_LIMIT_BYTES.to_string()])
            .args(arguments)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the extender")?;
        let extender = Self {
            child,
            address,
            log_path,
        };
        let ready = wait_until("the extender's /healthz", Duration::from_secs(20), || {
            matches!(extender.request("GET", "/healthz", b""), Ok((200, _)))
        });
        if ready.is_err() {
            bail!("the extender did not start; log:\n{}", extender.log());
        }
        Ok(extender)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One HTTP/1.1 exchange (`Connection: close`): the status code and the body.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(&self.address)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.address,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        // The server may answer (413) before reading a body it refuses; a reset then is fine.
        let _ = stream.write_all(body);
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8(answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {answer:?}"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .context("no status code")?
            .parse()?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok((
            status,
            if chunked {
                unchunk(body)?
            } else {
                body.to_owned()
            },
        ))
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let (status, text) = self.request("POST", path, body.to_string().as_bytes())?;
        if status != 200 {
            bail!("POST {path}: HTTP {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Extender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unchunk(body: &str) -> Result<String> {
    let mut rest = body;
    let mut output = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(output);
        }
        output.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// A pod as kube-scheduler serialises it in ExtenderArgs: no apiVersion/kind (informer
/// objects carry none), a null creationTimestamp, and volumes of several kinds.
fn pod(name: &str, claims: &[&str]) -> Value {
    let mut volumes: Vec<Value> = claims
        .iter()
        .enumerate()
        .map(|(index, claim)| {
            json!({"name": format!("data-{index}"),
                   "persistentVolumeClaim": {"claimName": claim}})
        })
        .collect();
    volumes.push(json!({"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}));
    json!({
        "metadata": {
            "name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
            "resourceVersion": "4711", "creationTimestamp": null,
            "labels": {"app": "shop"}
        },
        "spec": {
            "containers": [{
                "name": "app", "image": "mariadb:11", "resources": {},
                "volumeMounts": [{"name": "data-0", "mountPath": "/var/lib/mysql"}]
            }],
            "volumes": volumes,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler"
        },
        "status": {"phase": "Pending", "qosClass": "BestEffort"}
    })
}

/// A Node as kube-scheduler sends it when `nodeCacheCapable` is false.
fn node_object(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "creationTimestamp": null,
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": null,
                            "lastTransitionTime": null}],
            "addresses": [{"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.1",
                         "osImage": "Debian", "containerRuntimeVersion": "containerd://1.7",
                         "kubeletVersion": "v1.33.0", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"}
        }
    })
}

/// The ExtenderArgs forms schedulers have sent.
fn argument_forms(pod: &Value) -> Vec<(&'static str, Value)> {
    let items: Vec<Value> = WORKERS.iter().map(|name| node_object(name)).collect();
    vec![
        (
            "today, nodeCacheCapable",
            json!({"Pod": pod, "Nodes": null, "NodeNames": WORKERS}),
        ),
        (
            "today, whole nodes",
            json!({"Pod": pod, "Nodes": {"metadata": {}, "items": items}, "NodeNames": null}),
        ),
        (
            "old tags, nodenames",
            json!({"pod": pod, "nodenames": WORKERS}),
        ),
        (
            "old tags, whole nodes",
            json!({"pod": pod, "nodes": {"metadata": {}, "items": items}}),
        ),
    ]
}

/// The node names a filter answer lets through, in whichever form it answered.
fn passed_nodes(answer: &Value) -> BTreeSet<String> {
    let mut passed = BTreeSet::new();
    if let Some(names) = answer["NodeNames"].as_array() {
        passed.extend(names.iter().map(|name| name.as_str().unwrap().to_owned()));
    }
    if let Some(items) = answer["Nodes"]["items"].as_array() {
        passed.extend(
            items
                .iter()
                .map(|node| node["metadata"]["name"].as_str().unwrap().to_owned()),
        );
    }
    passed
}

fn failed_nodes(answer: &Value) -> BTreeMap<String, String> {
    let mut failed = BTreeMap::new();
    for key in ["FailedNodes", "FailedAndUnresolvableNodes"] {
        if let Some(map) = answer[key].as_object() {
            for (node, reason) in map {
                failed.insert(node.clone(), reason.as_str().unwrap().to_owned());
            }
        }
    }
    failed
}

fn scores(answer: &Value) -> BTreeMap<String, i64> {
    answer
        .as_array()
        .expect("a HostPriorityList")
        .iter()
        .map(|entry| {
            (
                entry["Host"].as_str().unwrap().to_owned(),
                entry["Score"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The cluster's placement as ListVolumes/ListNodes report it.
#[derive(Debug, Clone, PartialEq)]
struct Listing {
    volumes: Vec<proto::Volume>,
    worker_of_node: BTreeMap<u64, String>,
}

impl Listing {
    fn volume_of_claim(&self, claim: &str) -> Option<&proto::Volume> {
        self.volumes.iter().find(|volume| {
            volume
                .labels
                .get(volume_labels::PVC_NAMESPACE)
                .map(String::as_str)
                == Some(NAMESPACE)
                && volume
                    .labels
                    .get(volume_labels::PVC_NAME)
                    .map(String::as_str)
                    == Some(claim)
        })
    }

    fn leader(volume: &proto::Volume) -> Option<u64> {
        match (volume.leader_node_id, volume.replica_node_ids.as_slice()) {
            (0, [only]) => Some(*only),
            (0, _) => None,
            (leader, _) => Some(leader),
        }
    }

    /// 2 for the worker holding the leader, 1 for one holding a replica, 0 otherwise.
    fn points(&self, volume: &proto::Volume, worker: &str) -> u64 {
        let on_worker =
            |node_id: &u64| self.worker_of_node.get(node_id).map(String::as_str) == Some(worker);
        if Self::leader(volume).as_ref().is_some_and(on_worker) {
            2
        } else if volume.replica_node_ids.iter().any(on_worker) {
            1
        } else {
            0
        }
    }

    /// The documented score: the used-bytes-weighted (at least 1 MiB per volume) share of
    /// leader points, scaled to 0..=10, at least 1 for any data.
    fn expected_score(&self, claims: &[&str], worker: &str) -> i64 {
        let volumes: Vec<&proto::Volume> = claims
            .iter()
            .filter_map(|claim| self.volume_of_claim(claim))
            .collect();
        let weight = |volume: &proto::Volume| u128::from(volume.used_bytes.max(1 << 20));
        let best: u128 = volumes.iter().map(|volume| weight(volume) * 2).sum();
        let held: u128 = volumes
            .iter()
            .map(|volume| weight(volume) * u128::from(self.points(volume, worker)))
            .sum();
        if held == 0 {
            0
        } else {
            ((held * 10 / best) as i64).clamp(1, 10)
        }
    }

    /// Workers holding a replica of every Ballast volume behind `claims`.
    fn holding_all(&self, claims: &[&str]) -> BTreeSet<String> {
        WORKERS
            .iter()
            .filter(|worker| {
                claims
                    .iter()
                    .filter_map(|claim| self.volume_of_claim(claim))
                    .all(|volume| self.points(volume, worker) > 0)
            })
            .map(|worker| worker.to_string())
            .collect()
    }
}

fn list(runtime: &tokio::runtime::Runtime, client: &BallastClient) -> Result<Listing> {
    let (volumes, nodes) =
        runtime.block_on(async { tokio::try_join!(client.list_volumes(), client.list_nodes()) })?;
    let worker_of_node = nodes
        .iter()
        .filter_map(|node| {
            node.labels
                .get("kubernetes.io/hostname")
                .map(|worker| (node.node_id, worker.clone()))
        })
        .collect();
    Ok(Listing {
        volumes,
        worker_of_node,
    })
}

/// Leaders and replicas only: what the scores depend on (used bytes move with writes, and the
/// weights use at least 1 MiB, which these empty volumes never reach).
fn placement_key(listing: &Listing) -> Vec<(String, Vec<u64>, Option<u64>)> {
    listing
        .volumes
        .iter()
        .map(|volume| {
            (
                volume.name.clone(),
                volume.replica_node_ids.clone(),
                Listing::leader(volume),
            )
        })
        .collect()
}

#[test]
fn filter_and_prioritize_follow_the_reported_placement() {
    if !end_to_end_available() || !plugin_available() || !extender_available() {
        return;
    }
    let cluster = TestCluster::start_with(3, DEVICE_SIZE_BYTES, &[], &|node_id| {
        vec![
            "--label".to_owned(),
            format!("kubernetes.io/hostname=worker-{node_id}"),
        ]
    })
    .expect("cluster");
    let plugin = CsiPlugin::start(&cluster.nodes[0]).expect("CSI plugin");
    let csi = plugin.client().expect("CSI client");

    // What external-provisioner --extra-create-metadata sends, per claim.
    let metadata = |claim: &'static str, pv: &'static str| {
        [
            (volume_labels::PVC_NAMESPACE, NAMESPACE),
            (volume_labels::PVC_NAME, claim),
            (volume_labels::PV_NAME, pv),
        ]
    };
    // data-a: rf=3, a replica on every storage node, led by one of them.
    let mut parameters = vec![("replication", "3"), ("replicationMinimum", "2")];
    parameters.extend(metadata("data-a", "pvc-extender-a"));
    csi.create_volume(
        "pvc-extender-a",
        32 << 20,
        Mode::SingleNodeWriter,
        &parameters,
    )
    .expect("CreateVolume data-a (PVC metadata must not be refused)");
    // data-b: rf=1, pinned to node 2 (zone=z2) by the StorageClass selector.
    let mut parameters = vec![("replication", "1"), ("nodeSelector", "zone=z2")];
    parameters.extend(metadata("data-b", "pvc-extender-b"));
    csi.create_volume(
        "pvc-extender-b",
        32 << 20,
        Mode::SingleNodeWriter,
        &parameters,
    )
    .expect("CreateVolume data-b");
    // A volume named like a claim but without PVC labels: the extender must not use it.
    cluster
        .cli(&[
            "volume",
            "create",
            "plain",
            "--quota",
            "64MiB",
            "--replication-factor",
            "1",
        ])
        .expect("create an unlabelled volume");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime
        .block_on(BallastClient::connect(&cluster.endpoints()))
        .expect("Ballast client");
    let mut listing = list(&runtime, &client).expect("listing");
    wait_until("data-a has a known leader", Duration::from_secs(30), || {
        listing = list(&runtime, &client).expect("listing");
        listing
            .volume_of_claim("data-a")
            .is_some_and(|volume| volume.leader_node_id != 0)
    })
    .expect("leader of data-a");

    // The CSI plugin recorded the claim as volume labels.
    let volume_a = listing
        .volume_of_claim("data-a")
        .expect("data-a labelled")
        .clone();
    assert_eq!(volume_a.name, "pvc-extender-a");
    assert_eq!(volume_a.labels[volume_labels::PV_NAME], "pvc-extender-a");
    assert_eq!(volume_a.replica_node_ids.len(), 3, "{volume_a:?}");
    let volume_b = listing
        .volume_of_claim("data-b")
        .expect("data-b labelled")
        .clone();
    assert_eq!(volume_b.replica_node_ids, [2], "{volume_b:?}");
    assert_eq!(
        listing.worker_of_node.values().cloned().collect::<Vec<_>>(),
        ["worker-1", "worker-2", "worker-3"],
        "storage nodes report their hostname labels"
    );

    let log_directory = cluster.nodes[0].directory.path();
    let endpoints = cluster.endpoints();
    // TTL 0: every call lists afresh, so answers can be compared with our own listing.
    let prefer = Extender::start(&endpoints, &["--cache-ttl-ms", "0"], log_directory)
        .expect("extender (prefer)");
    let require = Extender::start(
        &endpoints,
        &["--cache-ttl-ms", "0", "--filter-policy", "require"],
        log_directory,
    )
    .expect("extender (require)");

    let cases: [(&str, &[&str]); 5] = [
        ("pod-a", &["data-a"]),
        ("pod-b", &["data-b"]),
        ("pod-ab", &["data-a", "data-b"]),
        ("pod-plain", &["plain", "not-provisioned-yet"]),
        ("pod-none", &[]),
    ];
    let mut checked = 0;
    for (name, claims) in cases {
        for (form, args) in argument_forms(&pod(name, claims)) {
            let context = format!("{name} ({form})");
            // The cluster may change leaders between our listing and the extender's; compare
            // only when the placement was the same before and after the calls.
            let mut attempts = 0;
            loop {
                attempts += 1;
                let before = list(&runtime, &client).expect("listing");
                let priorities = prefer.post_json("/prioritize", &args).expect(&context);
                let preferred = prefer.post_json("/filter", &args).expect(&context);
                let required = require.post_json("/filter", &args).expect(&context);
                let after = list(&runtime, &client).expect("listing");
                if placement_key(&before) != placement_key(&after) && attempts < 5 {
                    continue;
                }
                // Prioritize: one entry per candidate, in order, scored from the placement.
                let order: Vec<&str> = priorities
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|entry| entry["Host"].as_str().unwrap())
                    .collect();
                assert_eq!(order, WORKERS, "{context}");
                let expected: BTreeMap<String, i64> = WORKERS
                    .iter()
                    .map(|worker| (worker.to_string(), after.expected_score(claims, worker)))
                    .collect();
                assert_eq!(scores(&priorities), expected, "{context}: {after:?}");

                // Filter, prefer: everything passes, in the form asked.
                let all: BTreeSet<String> = WORKERS.iter().map(|w| w.to_string()).collect();
                assert_eq!(passed_nodes(&preferred), all, "{context}");
                assert!(failed_nodes(&preferred).is_empty(), "{context}");
                assert_eq!(preferred["Error"], "", "{context}");
                let asked_names = args.get("NodeNames").or(args.get("nodenames"));
                let answered_names = preferred.get("NodeNames").is_some();
                assert_eq!(
                    asked_names.is_some_and(|names| !names.is_null()),
                    answered_names,
                    "{context}: answer form {preferred}"
                );

                // Filter, require: exactly the holders of every volume; the rest with a reason.
                let holders = after.holding_all(claims);
                assert_eq!(passed_nodes(&required), holders, "{context}: {required}");
                let failed = failed_nodes(&required);
                assert_eq!(
                    failed.keys().cloned().collect::<BTreeSet<_>>(),
                    all.difference(&holders).cloned().collect(),
                    "{context}"
                );
                assert!(
                    failed
                        .values()
                        .all(|reason| reason.contains("pvc-extender-")),
                    "{failed:?}"
                );
                checked += 1;
                break;
            }
        }
    }
    assert_eq!(checked, 20);

    // The expectations above are not vacuous: spell out leader vs replica vs nothing.
    let listing = list(&runtime, &client).expect("listing");
    let volume_a = listing.volume_of_claim("data-a").unwrap();
    let leader_worker = &listing.worker_of_node[&volume_a.leader_node_id];
    let answer = prefer
        .post_json(
            "/prioritize",
            &argument_forms(&pod("pod-a", &["data-a"]))[0].1,
        )
        .unwrap();
    let scored = scores(&answer);
    for worker in WORKERS {
        let expected = match worker {
            "worker-4" => 0,
            _ if worker == leader_worker => 10,
            _ => 5,
        };
        assert_eq!(
            scored[worker], expected,
            "data-a led on {leader_worker}: {scored:?}"
        );
    }
    let answer = prefer
        .post_json(
            "/prioritize",
            &argument_forms(&pod("pod-b", &["data-b"]))[2].1,
        )
        .unwrap();
    assert_eq!(
        scores(&answer),
        [
            ("worker-1", 0),
            ("worker-2", 10),
            ("worker-3", 0),
            ("worker-4", 0)
        ]
        .into_iter()
        .map(|(worker, score)| (worker.to_owned(), score))
        .collect()
    );
    let answer = require
        .post_json(
            "/filter",
            &argument_forms(&pod("pod-ab", &["data-a", "data-b"]))[1].1,
        )
        .unwrap();
    assert_eq!(
        passed_nodes(&answer),
        BTreeSet::from(["worker-2".to_owned()])
    );
    drop(plugin);
}

#[test]
fn bad_bodies_and_an_unreachable_cluster() {
    if !extender_available() {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    // Nothing listens there: Ballast is unreachable.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let extender = Extender::start(
        &nowhere,
        &["--filter-policy", "require", "--ballast-timeout-ms", "1000"],
        directory.path(),
    )
    .expect("extender");

    // Malformed bodies: 400 with a message that says what is wrong.
    for (body, expected) in [
        (&b"{\"Pod\": "[..], "not JSON"),
        (b"{\"NodeNames\": [\"worker-1\"]}", "no Pod"),
        (
            b"{\"Pod\": {\"metadata\": {\"name\": 7}}, \"NodeNames\": []}",
            "not a v1 Pod",
        ),
        (b"{\"Pod\": {}}", "no candidate nodes"),
    ] {
        for path in ["/filter", "/prioritize"] {
            let (status, message) = extender.request("POST", path, body).unwrap();
            assert_eq!(
                status,
                400,
                "{path} {:?}: {message}",
                String::from_utf8_lossy(body)
            );
            assert!(
                message.contains(expected),
                "{path}: {message:?} lacks {expected:?}"
            );
        }
    }
    // Over the body limit: 413.
    let huge = json!({"Pod": pod("big", &[]), "NodeNames": vec!["x".repeat(100); 1000]});
    let (status, _) = extender
        .request("POST", "/filter", huge.to_string().as_bytes())
        .unwrap();
    assert_eq!(status, 413);

    // Ballast unreachable: locality is a preference, so every node passes and scores 0, in
    // both spellings, and the answer comes within the Ballast deadline (plus slack).
    for (form, args) in argument_forms(&pod("pod-a", &["data-a"])) {
        let started = Instant::now();
        let filtered = extender.post_json("/filter", &args).expect(form);
        let priorities = extender.post_json("/prioritize", &args).expect(form);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{form}: {:?}",
            started.elapsed()
        );
        assert_eq!(
            passed_nodes(&filtered).len(),
            WORKERS.len(),
            "{form}: {filtered}"
        );
        assert!(failed_nodes(&filtered).is_empty(), "{form}");
        assert_eq!(filtered["Error"], "");
        assert!(
            scores(&priorities).values().all(|score| *score == 0),
            "{priorities}"
        );
        assert_eq!(scores(&priorities).len(), WORKERS.len());
    }
    assert!(
        extender.log().contains("answering without locality"),
        "the degraded answer is logged:\n{}",
        extender.log()
    );
    let (status, body) = extender.request("GET", "/healthz", b"").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
}
