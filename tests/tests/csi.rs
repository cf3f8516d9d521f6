//! The project's CSI conformance suite: a real `ballast-csi` plugin on a unix socket, a real
//! `ballast-node`, real FUSE and bind mounts, driven the way kubelet and the external-provisioner
//! drive a CSI driver. Each test can fail: it checks data through the mounts, the mount table,
//! the spec's error codes and the daemons' processes, not just that calls return.

mod csi_support;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ballast_csi_plugin::csi::v1::volume_capability::access_mode::Mode;
use ballast_tests::mariadb::{self, MariaDb};
use ballast_tests::{end_to_end_available, wait_until, LocalNode};
use csi_support::*;
use tonic::Code;

const DEVICE_SIZE_BYTES: u64 = 2 << 30;
const MIB: i64 = 1 << 20;

/// Field order matters: the plugin (and its mounts) go before the storage node.
struct Fixture {
    plugin: CsiPlugin,
    csi: CsiClient,
    node: LocalNode,
}

fn setup(device_size_bytes: u64) -> Option<Fixture> {
    if !end_to_end_available() || !plugin_available() {
        return None;
    }
    // Labelled like a GPU node in zone a: StorageClass node selectors are placement rules now.
    let labels = ["--label", "zone=a", "--label", "gpu=true"];
    let node = LocalNode::start_member(
        device_size_bytes,
        1,
        labels.iter().map(|label| label.to_string()).collect(),
    )
    .expect("start node");
    let plugin = CsiPlugin::start(&node).expect("start plugin");
    let csi = plugin.client().expect("client");
    Some(Fixture { plugin, csi, node })
}

fn write_file(path: &Path, contents: &[u8]) {
    let mut file = File::create(path).unwrap();
    file.write_all(contents).unwrap();
    file.sync_all().unwrap();
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|index| (index as u8).wrapping_mul(131).wrapping_add(seed))
        .collect()
}

fn is_ballast_mount_of(path: &Path, volume: &str) -> bool {
    mount_at(path).is_some_and(|(source, _)| source == format!("ballast:{volume}"))
}

fn statvfs_total_bytes(path: &Path) -> u64 {
    let path_c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed statvfs is a valid value of a plain C struct.
    let mut buffer: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a writable statvfs.
    let result = unsafe { libc::statvfs(path_c.as_ptr(), &mut buffer) };
    assert_eq!(result, 0, "statvfs {}", path.display());
    buffer.f_blocks * buffer.f_frsize
}

#[test]
fn identity_capabilities_topology_and_probe() {
    let Some(mut fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let csi = &fixture.csi;
    let info = csi
        .run(csi.identity().get_plugin_info(GetPluginInfoRequest {}))
        .unwrap();
    assert_eq!(info.name, "csi.ballast.io");
    assert!(!info.vendor_version.is_empty());

    use plugin_capability::{service, volume_expansion, Type};
    let capabilities = csi
        .run(
            csi.identity()
                .get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
        )
        .unwrap()
        .capabilities;
    let services: Vec<i32> = capabilities
        .iter()
        .filter_map(|capability| match &capability.r#type {
            Some(Type::Service(service)) => Some(service.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)));
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(capabilities.iter().any(|capability| matches!(
        &capability.r#type,
        Some(Type::VolumeExpansion(expansion))
            if expansion.r#type == volume_expansion::Type::Online as i32
    )));

    let controller_rpcs: Vec<i32> = csi
        .run(
            csi.controller()
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {}),
        )
        .unwrap()
        .capabilities
        .iter()
        .filter_map(|capability| {
            let Some(controller_service_capability::Type::Rpc(rpc)) = &capability.r#type else {
                return None;
            };
            Some(rpc.r#type)
        })
        .collect();
    use controller_service_capability::rpc::Type as ControllerRpc;
    let mut expected = vec![
        ControllerRpc::CreateDeleteVolume as i32,
        ControllerRpc::ListVolumes as i32,
        ControllerRpc::GetCapacity as i32,
        ControllerRpc::ExpandVolume as i32,
        ControllerRpc::SingleNodeMultiWriter as i32,
    ];
    let mut advertised = controller_rpcs.clone();
    expected.sort();
    advertised.sort();
    assert_eq!(advertised, expected, "only what is supported is advertised");

    let node_rpcs: Vec<i32> = csi
        .run(
            csi.node()
                .node_get_capabilities(NodeGetCapabilitiesRequest {}),
        )
        .unwrap()
        .capabilities
        .iter()
        .filter_map(|capability| {
            let Some(node_service_capability::Type::Rpc(rpc)) = &capability.r#type else {
                return None;
            };
            Some(rpc.r#type)
        })
        .collect();
    use node_service_capability::rpc::Type as NodeRpc;
    for rpc in [
        NodeRpc::StageUnstageVolume,
        NodeRpc::GetVolumeStats,
        NodeRpc::VolumeCondition,
        NodeRpc::ExpandVolume,
    ] {
        assert!(node_rpcs.contains(&(rpc as i32)), "{rpc:?} advertised");
    }

    let node_info = csi
        .run(csi.node().node_get_info(NodeGetInfoRequest {}))
        .unwrap();
    assert_eq!(node_info.node_id, NODE_ID);
    assert!(node_info.max_volumes_per_node > 0);
    assert_eq!(
        node_info.accessible_topology.unwrap().segments["topology.ballast.io/node"],
        NODE_ID
    );

    let probe = csi.run(csi.identity().probe(ProbeRequest {})).unwrap();
    assert_eq!(probe.ready, Some(true));
    // With the storage node gone the plugin is healthy but not ready.
    fixture.node.kill_node();
    let probe = fixture
        .csi
        .run(fixture.csi.identity().probe(ProbeRequest {}))
        .unwrap();
    assert_eq!(probe.ready, Some(false));
    fixture.node.restart_node().unwrap();
    let csi = &fixture.csi;
    wait_until("probe ready again", Duration::from_secs(30), || {
        csi.run(csi.identity().probe(ProbeRequest {}))
            .is_ok_and(|probe| probe.ready == Some(true))
    })
    .unwrap();
}

#[test]
fn rwo_lifecycle_with_idempotent_repeats() {
    let Some(fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let (csi, plugin) = (&fixture.csi, &fixture.plugin);
    let name = "pvc-0d6c2a4e-5f1b-4c3d-9e8f-7a6b5c4d3e2f";
    let mode = Mode::SingleNodeWriter;

    // CreateVolume, twice: the same volume.
    let volume = csi.create_volume(name, 64 * MIB, mode, &[]).unwrap();
    assert_eq!(volume.volume_id, name, "PV names map to themselves");
    assert_eq!(volume.capacity_bytes, 64 * MIB);
    assert_eq!(volume.volume_context["replication"], "1");
    let again = csi.create_volume(name, 64 * MIB, mode, &[]).unwrap();
    assert_eq!(again, volume);
    let listed = fixture.node.cli(&["volume", "list"]).unwrap();
    assert!(listed.contains(name), "the Ballast volume exists: {listed}");

    // NodeStage, twice: one FUSE mount, one daemon.
    let staging = plugin.path("staging/pv1");
    csi.stage(name, &staging, mode).unwrap();
    assert!(is_ballast_mount_of(&staging, name));
    let daemons = fuse_daemons_under(&plugin.root);
    assert_eq!(daemons.len(), 1, "one ballast-fuse daemon");
    csi.stage(name, &staging, mode).unwrap();
    assert_eq!(
        fuse_daemons_under(&plugin.root),
        daemons,
        "repeat starts nothing"
    );

    // NodePublish, twice; write through the target path.
    let target = plugin.path("pods/pod-a/volumes/pv1/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert!(is_ballast_mount_of(&target, name));
    let data = pattern(3 * 1024 * 1024 + 17, 7);
    write_file(&target.join("data.bin"), &data);
    fs::create_dir(target.join("dir")).unwrap();
    assert_eq!(fs::read(staging.join("data.bin")).unwrap(), data);

    // NodeUnpublish, twice: the target is gone, the staging mount stays.
    csi.unpublish(name, &target).unwrap();
    assert!(mount_at(&target).is_none());
    assert!(!target.exists(), "the plugin removes the target it created");
    csi.unpublish(name, &target).unwrap();
    assert!(is_ballast_mount_of(&staging, name));

    // Unstage, twice: the daemon exits and the mount is gone.
    csi.unstage(name, &staging).unwrap();
    assert!(mount_at(&staging).is_none());
    wait_until("the FUSE daemon to exit", Duration::from_secs(30), || {
        daemons.iter().all(|&pid| !process_alive(pid))
    })
    .unwrap();
    csi.unstage(name, &staging).unwrap();

    // Stage and publish again at a new pod's path: the data survived the remount.
    csi.stage(name, &staging, mode).unwrap();
    let target_b = plugin.path("pods/pod-b/volumes/pv1/mount");
    fs::create_dir_all(target_b.parent().unwrap()).unwrap();
    csi.publish(name, &staging, &target_b, mode, false).unwrap();
    assert_eq!(fs::read(target_b.join("data.bin")).unwrap(), data);
    assert!(target_b.join("dir").is_dir());
    csi.unpublish(name, &target_b).unwrap();
    csi.unstage(name, &staging).unwrap();

    // DeleteVolume, twice.
    csi.delete_volume(name).unwrap();
    csi.delete_volume(name).unwrap();
    let listed = fixture.node.cli(&["volume", "list"]).unwrap();
    assert!(!listed.contains(name), "the volume is gone: {listed}");
    assert!(mountpoints_under(&plugin.root).is_empty());
}

#[test]
fn rwx_two_targets_share_data_and_read_only_publish_refuses_writes() {
    let Some(fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let (csi, plugin) = (&fixture.csi, &fixture.plugin);
    let name = "pvc-shared";
    let mode = Mode::MultiNodeMultiWriter;
    // As external-provisioner sends it: StorageClass parameters plus its own keys, and the
    // topology of the node chosen for the first consumer.
    let volume = csi
        .run(
            csi.controller().create_volume(CreateVolumeRequest {
                name: name.to_owned(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 64 * MIB,
                }),
                volume_capabilities: vec![mount_capability(mode)],
                parameters: [
                    ("replication", "1"),
                    ("replicationMinimum", "1"),
                    ("nodeSelector", "zone=a,gpu=true"),
                    ("csi.storage.k8s.io/pvc/name", "shared"),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
                accessibility_requirements: Some(TopologyRequirement {
                    requisite: vec![Topology {
                        segments: [("topology.ballast.io/node".to_owned(), NODE_ID.to_owned())]
                            .into(),
                    }],
                    preferred: vec![Topology {
                        segments: [("topology.ballast.io/node".to_owned(), NODE_ID.to_owned())]
                            .into(),
                    }],
                }),
                ..Default::default()
            }),
        )
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(volume.capacity_bytes, 32 * MIB);
    assert_eq!(volume.volume_context["nodeSelector"], "zone=a,gpu=true");
    assert!(
        volume.accessible_topology.is_empty(),
        "reachable from every node over the network: no node affinity"
    );
    let staging = plugin.path("staging/shared");
    csi.stage(name, &staging, mode).unwrap();
    let writer_a = plugin.path("pods/a/mount");
    let writer_b = plugin.path("pods/b/mount");
    for target in [&writer_a, &writer_b] {
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        csi.publish(name, &staging, target, mode, false).unwrap();
    }

    // Written through one pod's path, read through the other's, and the other way round.
    write_file(&writer_a.join("from-a"), b"hello from a");
    assert_eq!(fs::read(writer_b.join("from-a")).unwrap(), b"hello from a");
    write_file(&writer_b.join("from-b"), b"hello from b");
    assert_eq!(fs::read(writer_a.join("from-b")).unwrap(), b"hello from b");
    // Appends from both interleave in one file.
    for (index, target) in [&writer_a, &writer_b, &writer_a].into_iter().enumerate() {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(target.join("log"))
            .unwrap();
        writeln!(file, "line {index}").unwrap();
        file.sync_all().unwrap();
    }
    assert_eq!(
        fs::read_to_string(writer_b.join("log")).unwrap(),
        "line 0\nline 1\nline 2\n"
    );

    // A read-only publish (readonly=true, as for a PVC mounted readOnly) refuses writes.
    let reader = plugin.path("pods/c/mount");
    fs::create_dir_all(reader.parent().unwrap()).unwrap();
    csi.publish(name, &staging, &reader, mode, true).unwrap();
    csi.publish(name, &staging, &reader, mode, true).unwrap();
    assert!(mount_at(&reader).unwrap().1.split(',').any(|o| o == "ro"));
    assert_eq!(fs::read(reader.join("from-a")).unwrap(), b"hello from a");
    let error = File::create(reader.join("nope")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    // The same target with incompatible options: ALREADY_EXISTS.
    expect_code(
        csi.publish(name, &staging, &reader, mode, false),
        Code::AlreadyExists,
        "publish read-write over a read-only publish",
    );
    // A reader-only access mode publishes read-only even without readonly=true.
    let reader_mode = plugin.path("pods/d/mount");
    fs::create_dir_all(reader_mode.parent().unwrap()).unwrap();
    csi.publish(
        name,
        &staging,
        &reader_mode,
        Mode::MultiNodeReaderOnly,
        false,
    )
    .unwrap();
    let error = File::create(reader_mode.join("nope")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");

    // Unstage while published is refused; after unpublishing everything it works.
    expect_code(
        csi.unstage(name, &staging),
        Code::FailedPrecondition,
        "unstage while published",
    );
    for target in [&writer_a, &writer_b, &reader, &reader_mode] {
        csi.unpublish(name, target).unwrap();
        assert!(mount_at(target).is_none());
    }
    csi.unstage(name, &staging).unwrap();
    csi.delete_volume(name).unwrap();
    assert!(mountpoints_under(&plugin.root).is_empty());
}

#[test]
fn invalid_requests_get_the_spec_error_codes() {
    let Some(fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let (csi, plugin) = (&fixture.csi, &fixture.plugin);
    let mode = Mode::SingleNodeWriter;
    let capability = mount_capability(mode);
    let block_capability = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    };
    let unknown_mode_capability = VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: 99 }),
        ..capability.clone()
    };
    let create = |name: &str, capabilities: Vec<VolumeCapability>| CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: capabilities,
        ..Default::default()
    };

    // --- Controller ---
    let mut controller = csi.controller();
    for (request, code, what) in [
        (
            create("", vec![capability.clone()]),
            Code::InvalidArgument,
            "missing name",
        ),
        (
            create("pvc-x", vec![]),
            Code::InvalidArgument,
            "missing capabilities",
        ),
        (
            create("pvc-x", vec![block_capability.clone()]),
            Code::InvalidArgument,
            "block access",
        ),
        (
            create("pvc-x", vec![unknown_mode_capability.clone()]),
            Code::InvalidArgument,
            "unknown access mode",
        ),
        (
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Snapshot(
                        volume_content_source::SnapshotSource {
                            snapshot_id: "s".into(),
                        },
                    )),
                }),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::InvalidArgument,
            "content source",
        ),
        (
            CreateVolumeRequest {
                parameters: [("replicaton".to_owned(), "1".to_owned())].into(),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::InvalidArgument,
            "unknown parameter",
        ),
        (
            CreateVolumeRequest {
                parameters: [("nodeSelector".to_owned(), "zone".to_owned())].into(),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::InvalidArgument,
            "malformed nodeSelector",
        ),
        (
            CreateVolumeRequest {
                capacity_range: Some(CapacityRange {
                    required_bytes: 10 * MIB,
                    limit_bytes: MIB,
                }),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::InvalidArgument,
            "limit below required",
        ),
        (
            // Valid syntax, but no storage node carries the label: nowhere to place it.
            CreateVolumeRequest {
                parameters: [("nodeSelector".to_owned(), "gpu=false".to_owned())].into(),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::ResourceExhausted,
            "a node selector no storage node matches",
        ),
        (
            // Valid syntax, but a one-node cluster cannot place 3 replicas: the storage
            // cluster's refusal is passed on with its code.
            CreateVolumeRequest {
                parameters: [("replication".to_owned(), "3".to_owned())].into(),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::ResourceExhausted,
            "replication the storage cluster cannot provide",
        ),
        (
            CreateVolumeRequest {
                accessibility_requirements: Some(TopologyRequirement {
                    requisite: vec![Topology {
                        segments: [("topology.kubernetes.io/zone".to_owned(), "a".to_owned())]
                            .into(),
                    }],
                    preferred: vec![],
                }),
                ..create("pvc-x", vec![capability.clone()])
            },
            Code::InvalidArgument,
            "topology key this driver does not report",
        ),
    ] {
        expect_code(csi.run(controller.create_volume(request)), code, what);
    }
    // Nothing was created by the refused calls.
    assert!(!fixture
        .node
        .cli(&["volume", "list"])
        .unwrap()
        .contains("pvc-x"));

    // An existing name with an incompatible size, or other replication.
    csi.create_volume("pvc-sized", 16 * MIB, mode, &[]).unwrap();
    expect_code(
        csi.create_volume("pvc-sized", 32 * MIB, mode, &[]),
        Code::AlreadyExists,
        "existing name, larger size",
    );
    expect_code(
        csi.run(controller.create_volume(CreateVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: MIB,
                limit_bytes: 8 * MIB,
            }),
            ..create("pvc-sized", vec![capability.clone()])
        })),
        Code::AlreadyExists,
        "existing name, limit below its size",
    );
    // A smaller requirement within range is compatible: the existing volume is returned.
    let existing = csi.create_volume("pvc-sized", 8 * MIB, mode, &[]).unwrap();
    assert_eq!(existing.capacity_bytes, 16 * MIB);

    expect_code(
        csi.delete_volume(""),
        Code::InvalidArgument,
        "DeleteVolume without id",
    );
    csi.delete_volume("pvc-never-existed").unwrap();
    csi.delete_volume("Not A Valid Name").unwrap();

    let validate =
        |volume_id: &str, capabilities: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
            volume_id: volume_id.to_owned(),
            volume_capabilities: capabilities,
            ..Default::default()
        };
    expect_code(
        csi.run(controller.validate_volume_capabilities(validate("", vec![capability.clone()]))),
        Code::InvalidArgument,
        "Validate without id",
    );
    expect_code(
        csi.run(controller.validate_volume_capabilities(validate("pvc-sized", vec![]))),
        Code::InvalidArgument,
        "Validate without capabilities",
    );
    expect_code(
        csi.run(
            controller
                .validate_volume_capabilities(validate("pvc-unknown", vec![capability.clone()])),
        ),
        Code::NotFound,
        "Validate unknown volume",
    );
    let confirmed = csi
        .run(
            controller
                .validate_volume_capabilities(validate("pvc-sized", vec![capability.clone()])),
        )
        .unwrap();
    assert!(confirmed.confirmed.is_some(), "{confirmed:?}");
    let refused = csi
        .run(
            controller.validate_volume_capabilities(validate(
                "pvc-sized",
                vec![block_capability.clone()],
            )),
        )
        .unwrap();
    assert!(refused.confirmed.is_none() && !refused.message.is_empty());

    expect_code(
        csi.run(controller.list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: "invalid-token".into(),
        })),
        Code::Aborted,
        "ListVolumes with a bad token",
    );
    expect_code(
        csi.run(controller.list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })),
        Code::InvalidArgument,
        "ListVolumes with negative max_entries",
    );

    let expand = |volume_id: &str, range: Option<CapacityRange>| ControllerExpandVolumeRequest {
        volume_id: volume_id.to_owned(),
        capacity_range: range,
        ..Default::default()
    };
    let range = Some(CapacityRange {
        required_bytes: 64 * MIB,
        limit_bytes: 0,
    });
    expect_code(
        csi.run(controller.controller_expand_volume(expand("", range))),
        Code::InvalidArgument,
        "expand without id",
    );
    expect_code(
        csi.run(controller.controller_expand_volume(expand("pvc-sized", None))),
        Code::InvalidArgument,
        "expand without range",
    );
    expect_code(
        csi.run(controller.controller_expand_volume(expand("pvc-unknown", range))),
        Code::NotFound,
        "expand unknown volume",
    );
    expect_code(
        csi.run(controller.create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-sized".into(),
            name: "snap".into(),
            ..Default::default()
        })),
        Code::Unimplemented,
        "snapshots",
    );
    expect_code(
        csi.run(controller.controller_publish_volume(ControllerPublishVolumeRequest::default())),
        Code::Unimplemented,
        "ControllerPublishVolume",
    );

    // --- Node ---
    let staging = plugin.path("staging/sized");
    let target = plugin.path("pods/p/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    let stage = |volume_id: &str, staging_path: &Path, capability: Option<VolumeCapability>| {
        NodeStageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging_path.display().to_string(),
            volume_capability: capability,
            ..Default::default()
        }
    };
    let mut node = csi.node();
    for (request, code, what) in [
        (
            stage("", &staging, Some(capability.clone())),
            Code::InvalidArgument,
            "stage without id",
        ),
        (
            stage("pvc-sized", Path::new(""), Some(capability.clone())),
            Code::InvalidArgument,
            "stage without path",
        ),
        (
            stage("pvc-sized", Path::new("relative"), Some(capability.clone())),
            Code::InvalidArgument,
            "stage with relative path",
        ),
        (
            stage("pvc-sized", &staging, None),
            Code::InvalidArgument,
            "stage without capability",
        ),
        (
            stage("pvc-sized", &staging, Some(block_capability.clone())),
            Code::InvalidArgument,
            "stage block",
        ),
        (
            stage("pvc-unknown", &staging, Some(capability.clone())),
            Code::NotFound,
            "stage unknown volume",
        ),
    ] {
        expect_code(csi.run(node.node_stage_volume(request)), code, what);
    }
    assert!(
        mountpoints_under(&plugin.root).is_empty(),
        "refused stages mount nothing"
    );

    expect_code(
        csi.publish("pvc-sized", &staging, &target, mode, false),
        Code::FailedPrecondition,
        "publish before stage",
    );
    expect_code(
        csi.publish("pvc-unknown", &staging, &target, mode, false),
        Code::NotFound,
        "publish unknown volume",
    );
    csi.stage("pvc-sized", &staging, mode).unwrap();
    expect_code(
        csi.publish("pvc-sized", &staging, Path::new(""), mode, false),
        Code::InvalidArgument,
        "publish without target path",
    );
    expect_code(
        csi.publish("", &staging, &target, mode, false),
        Code::InvalidArgument,
        "publish without volume id",
    );
    expect_code(
        csi.publish("pvc-sized", Path::new(""), &target, mode, false),
        Code::InvalidArgument,
        "publish without staging path",
    );
    expect_code(
        csi.run(node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-sized".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: None,
            ..Default::default()
        })),
        Code::InvalidArgument,
        "publish without capability",
    );
    expect_code(
        csi.unpublish("pvc-sized", Path::new("")),
        Code::InvalidArgument,
        "unpublish without target path",
    );
    expect_code(
        csi.unpublish("", &target),
        Code::InvalidArgument,
        "unpublish without volume id",
    );
    expect_code(
        csi.unstage("pvc-sized", Path::new("")),
        Code::InvalidArgument,
        "unstage without staging path",
    );
    expect_code(
        csi.volume_stats("pvc-sized", &target),
        Code::NotFound,
        "stats of a path where the volume is not mounted",
    );
    expect_code(
        csi.volume_stats("", &staging),
        Code::InvalidArgument,
        "stats without volume id",
    );
    expect_code(
        csi.volume_stats("pvc-sized", Path::new("")),
        Code::InvalidArgument,
        "stats without path",
    );
    expect_code(
        csi.run(node.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-other".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })),
        Code::NotFound,
        "node expand of a volume not mounted there",
    );
    // Another volume cannot be staged over a staging path in use.
    csi.create_volume("pvc-second", 16 * MIB, mode, &[])
        .unwrap();
    expect_code(
        csi.stage("pvc-second", &staging, mode),
        Code::AlreadyExists,
        "stage a different volume at an occupied staging path",
    );
    csi.unstage("pvc-sized", &staging).unwrap();
    assert!(mountpoints_under(&plugin.root).is_empty());
}

#[test]
fn list_volumes_pages_through_everything_and_capacity_is_reported() {
    let Some(fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let csi = &fixture.csi;
    let mut names: Vec<String> = (0..7).map(|index| format!("pvc-list-{index}")).collect();
    for name in &names {
        csi.create_volume(name, 8 * MIB, Mode::SingleNodeWriter, &[])
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = csi
            .run(csi.controller().list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            }))
            .unwrap();
        assert!(page.entries.len() <= 3);
        for entry in &page.entries {
            let volume = entry.volume.as_ref().unwrap();
            assert_eq!(volume.capacity_bytes, 8 * MIB);
            seen.push(volume.volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    names.sort();
    assert_eq!(seen, names, "every volume exactly once, in order");

    let capacity = csi
        .run(csi.controller().get_capacity(GetCapacityRequest {
            volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter)],
            ..Default::default()
        }))
        .unwrap();
    assert!(capacity.available_capacity > 0);
    assert!(capacity.available_capacity as u64 <= DEVICE_SIZE_BYTES);
    let maximum = capacity.maximum_volume_size.unwrap();
    assert!(maximum >= capacity.available_capacity && maximum as u64 <= DEVICE_SIZE_BYTES);
    // Capabilities it cannot serve: no capacity for them.
    let block = csi
        .run(csi.controller().get_capacity(GetCapacityRequest {
            volume_capabilities: vec![VolumeCapability {
                access_type: Some(volume_capability::AccessType::Block(
                    volume_capability::BlockVolume {},
                )),
                ..mount_capability(Mode::SingleNodeWriter)
            }],
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(block.available_capacity, 0);
}

#[test]
fn expansion_stats_and_condition_of_a_dead_daemon() {
    let Some(fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let (csi, plugin) = (&fixture.csi, &fixture.plugin);
    let name = "pvc-grow";
    let mode = Mode::SingleNodeWriter;
    csi.create_volume(name, 64 * MIB, mode, &[]).unwrap();
    let staging = plugin.path("staging/grow");
    let target = plugin.path("pods/p/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();

    // Stats: bytes and inodes from the mount, condition normal.
    let data = pattern(8 * 1024 * 1024, 3);
    write_file(&target.join("eight-mib"), &data);
    let stats = csi.volume_stats(name, &target).unwrap();
    let (total, used, available) = usage_of(&stats, volume_usage::Unit::Bytes);
    assert_eq!(total, 64 * MIB);
    assert!(used >= 8 * MIB, "used {used}");
    assert!(available <= total - 8 * MIB, "available {available}");
    let (inodes_total, inodes_used, _) = usage_of(&stats, volume_usage::Unit::Inodes);
    assert!(
        inodes_total > 0 && inodes_used >= 2,
        "{inodes_total} {inodes_used}"
    );
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    assert!(csi.volume_stats(name, &staging).is_ok(), "staging path too");

    // ControllerExpandVolume: the quota grows and every mount sees it at once.
    let expand = |required_bytes| {
        csi.run(
            csi.controller()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: name.into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(mount_capability(mode)),
                    ..Default::default()
                }),
        )
    };
    let expanded = expand(128 * MIB).unwrap();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    assert!(!expanded.node_expansion_required);
    assert_eq!(statvfs_total_bytes(&target), 128 << 20);
    assert_eq!(statvfs_total_bytes(&staging), 128 << 20);
    let stats = csi.volume_stats(name, &target).unwrap();
    assert_eq!(usage_of(&stats, volume_usage::Unit::Bytes).0, 128 * MIB);
    // Repeated, and a smaller request: no shrink, the current size is reported.
    assert_eq!(expand(128 * MIB).unwrap().capacity_bytes, 128 * MIB);
    assert_eq!(expand(100 * MIB).unwrap().capacity_bytes, 128 * MIB);
    let node_expanded = csi
        .run(csi.node().node_expand_volume(NodeExpandVolumeRequest {
            volume_id: name.into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(node_expanded.capacity_bytes, 128 * MIB);
    // More data than the old quota now fits.
    write_file(&target.join("more"), &pattern(70 * 1024 * 1024, 9));

    // The FUSE daemon dies: the condition turns abnormal; a repeated stage replaces the dead
    // mount and a repeated publish replaces the stale bind; the data is all there.
    let daemons = fuse_daemons_under(&plugin.root);
    assert_eq!(daemons.len(), 1);
    // SAFETY: kill(2) on the ballast-fuse pid serving this test's staging path.
    unsafe { libc::kill(daemons[0], libc::SIGKILL) };
    wait_until("the daemon to die", Duration::from_secs(10), || {
        !process_alive(daemons[0])
    })
    .unwrap();
    let stats = csi.volume_stats(name, &target).unwrap();
    let condition = stats.volume_condition.unwrap();
    assert!(condition.abnormal, "dead daemon is abnormal");
    assert!(
        condition.message.contains("FUSE connection"),
        "{}",
        condition.message
    );
    assert!(stats.usage.is_empty());

    csi.stage(name, &staging, mode).unwrap();
    assert!(
        !csi.volume_stats(name, &staging)
            .unwrap()
            .volume_condition
            .unwrap()
            .abnormal
    );
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert!(
        !csi.volume_stats(name, &target)
            .unwrap()
            .volume_condition
            .unwrap()
            .abnormal
    );
    assert_eq!(fs::read(target.join("eight-mib")).unwrap(), data);

    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert!(mountpoints_under(&plugin.root).is_empty());
    wait_until("no daemon left", Duration::from_secs(30), || {
        fuse_daemons_under(&plugin.root)
            .into_iter()
            .all(|pid| !process_alive(pid))
    })
    .unwrap();
    csi.delete_volume(name).unwrap();
}

/// What kubelet does for a MariaDB pod: stage, publish at the pod's volume path, and the
/// container runs mysqld with its datadir there. Then the pod moves (unpublish, unstage, stage,
/// publish elsewhere) and the rows are still there.
#[test]
fn mariadb_runs_on_a_published_volume() {
    if !mariadb::available() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "mariadb-server is not installed (scripts/install-prerequisites.sh installs it)"
            );
        }
        eprintln!("SKIPPED: mariadb-server not installed");
        return;
    }
    let Some(fixture) = setup(4 << 30) else {
        return;
    };
    let (csi, plugin) = (&fixture.csi, &fixture.plugin);
    let name = "pvc-mariadb";
    let mode = Mode::SingleNodeWriter;
    csi.create_volume(name, 2048 * MIB, mode, &[]).unwrap();
    let staging = plugin.path("staging/mariadb");
    let target = plugin.path("pods/mariadb-0/volumes/data/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();

    let run_directory = plugin.path("mariadb-run");
    fs::create_dir_all(&run_directory).unwrap();
    let mut database = MariaDb::install(&target.join("mysql"), &run_directory).unwrap();
    database.start().unwrap();
    database
        .query(
            "CREATE DATABASE shop; \
             CREATE TABLE shop.orders (id BIGINT PRIMARY KEY, item VARCHAR(64)) ENGINE=InnoDB",
        )
        .unwrap();
    for batch in 0..20 {
        let values: Vec<String> = (0..50)
            .map(|index| {
                let id = batch * 50 + index;
                format!("({id}, 'item-{id}')")
            })
            .collect();
        database
            .query(&format!(
                "BEGIN; INSERT INTO shop.orders VALUES {}; COMMIT",
                values.join(",")
            ))
            .unwrap();
    }
    let count = database
        .query("SELECT COUNT(*), SUM(id) FROM shop.orders")
        .unwrap();
    assert_eq!(count.trim(), format!("1000\t{}", (0..1000).sum::<u64>()));
    assert!(
        target.join("mysql/shop/orders.ibd").exists(),
        "InnoDB files live on the published volume"
    );
    let stats = csi.volume_stats(name, &target).unwrap();
    assert!(usage_of(&stats, volume_usage::Unit::Bytes).1 > 10 * MIB);
    // A clean shutdown, as when the pod is deleted (the answer is lost with the connection).
    let _ = database.query("SHUTDOWN");
    let socket = database.socket.clone();
    wait_until("mariadbd to shut down", Duration::from_secs(120), || {
        !socket.exists()
    })
    .unwrap();
    database.kill();

    // The pod is rescheduled: everything torn down and set up at a new pod path.
    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    csi.stage(name, &staging, mode).unwrap();
    let target_b = plugin.path("pods/mariadb-0-new/volumes/data/mount");
    fs::create_dir_all(target_b.parent().unwrap()).unwrap();
    csi.publish(name, &staging, &target_b, mode, false).unwrap();
    let mut database = MariaDb::existing(&target_b.join("mysql"), &run_directory);
    database.start().unwrap();
    let count = database
        .query("SELECT COUNT(*), SUM(id) FROM shop.orders")
        .unwrap();
    assert_eq!(count.trim(), format!("1000\t{}", (0..1000).sum::<u64>()));
    let check = database.query("CHECK TABLE shop.orders").unwrap();
    assert!(check.trim_end().ends_with("OK"), "CHECK TABLE: {check}");
    database.kill();
    csi.unpublish(name, &target_b).unwrap();
    csi.unstage(name, &staging).unwrap();
    csi.delete_volume(name).unwrap();
}

/// Appends numbered lines with an fsync after each, until `stop` exists (bounded in count);
/// exits non-zero on the first error. Prints how many lines it wrote.
#[test]
fn plugin_restart_does_not_break_a_writing_pod() {
    let Some(mut fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let name = "pvc-restart";
    let mode = Mode::SingleNodeWriter;
    let staging = fixture.plugin.path("staging/restart");
    let target = fixture.plugin.path("pods/writer/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    {
        let csi = &fixture.csi;
        csi.create_volume(name, 256 * MIB, mode, &[]).unwrap();
        csi.stage(name, &staging, mode).unwrap();
        csi.publish(name, &staging, &target, mode, false).unwrap();
    }
    let daemons = fuse_daemons_under(&fixture.plugin.root);
    assert_eq!(daemons.len(), 1);

    let mut writer = Writer::start(&target, fixture.plugin.path("stop-writer"));
    writer.wait_for_more("the writer to start", 50);

    // kill -9 of the plugin: the pod's writes continue while no plugin runs at all.
    fixture.plugin.kill();
    let lines_at_kill = writer.lines();
    writer.wait_for_more("writes without a plugin", 100);
    assert!(
        process_alive(daemons[0]),
        "the FUSE daemon outlived the plugin"
    );
    assert!(is_ballast_mount_of(&target, name));

    // Restart; kubelet repeats stage and publish for running pods: both are no-ops.
    fixture.plugin.restart().unwrap();
    // A new connection, as kubelet redials the socket after the plugin re-registers.
    fixture.csi = fixture.plugin.client().unwrap();
    let csi = &fixture.csi;
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert_eq!(
        fuse_daemons_under(&fixture.plugin.root),
        daemons,
        "the same daemon serves; nothing was remounted"
    );
    let condition = csi
        .volume_stats(name, &target)
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    expect_code(
        csi.publish(name, &staging, &target, mode, true),
        Code::AlreadyExists,
        "the recovered record still knows the publish was read-write",
    );
    let lines_after_restart = writer.lines();
    writer.wait_for_more("writes after the restart", 100);

    // The writer stops cleanly: it never saw an error, and every line is there in order.
    let written = writer.finish();
    eprintln!(
        "writer: {written} fsync'd appends, {lines_at_kill} before the plugin was killed, \
         {lines_after_restart} by the time it was back"
    );

    // The restarted plugin tears down what its predecessor set up, daemon included.
    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert!(mountpoints_under(&fixture.plugin.root).is_empty());
    wait_until(
        "the inherited daemon to exit",
        Duration::from_secs(30),
        || !process_alive(daemons[0]),
    )
    .unwrap();
    csi.delete_volume(name).unwrap();
}

/// With `ballast-csi-mounter` owning the daemons (run on the host, as processes): `kill -9` of
/// both the plugin and the mounter leaves the pod writing; the restarted mounter re-adopts the
/// running daemon from its record, the plugin's repeats are no-ops, and unstage stops the adopted
/// daemon through the mounter.
#[test]
fn mounter_kill_re_adopts_running_daemons() {
    if !end_to_end_available() || !plugin_available() {
        return;
    }
    let node = LocalNode::start(DEVICE_SIZE_BYTES).expect("start node");
    let mut plugin = CsiPlugin::start_with_mounter(&node).expect("start plugin and mounter");
    let mut csi = plugin.client().unwrap();
    let name = "pvc-adopted";
    let mode = Mode::SingleNodeWriter;
    let staging = plugin.path("staging/adopted");
    let target = plugin.path("pods/writer/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    csi.create_volume(name, 64 * MIB, mode, &[]).unwrap();
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    let daemons = fuse_daemons_under(&plugin.root);
    assert_eq!(daemons.len(), 1);
    let mounter_pid = |plugin: &CsiPlugin| {
        let listing = plugin.mounter.as_ref().unwrap().list().unwrap();
        assert_eq!(listing.as_array().map(Vec::len), Some(1), "{listing}");
        (
            listing[0]["daemon"]["pid"].as_i64().unwrap() as i32,
            listing[0]["running"].as_bool().unwrap(),
            listing[0]["mounted"].as_bool().unwrap(),
        )
    };
    assert_eq!(mounter_pid(&plugin), (daemons[0], true, true));

    let mut writer = Writer::start(&target, plugin.path("stop-writer"));
    writer.wait_for_more("the writer to start", 50);

    plugin.kill();
    plugin.mounter.as_mut().unwrap().kill();
    writer.wait_for_more("writes with neither plugin nor mounter", 100);
    assert!(process_alive(daemons[0]), "the daemon outlived its mounter");

    plugin.mounter.as_mut().unwrap().restart().unwrap();
    plugin.restart().unwrap();
    csi = plugin.client().unwrap();
    let mounter_log = fs::read_to_string(&plugin.mounter.as_ref().unwrap().log_path).unwrap();
    assert!(
        mounter_log.contains("re-adopted a running FUSE daemon"),
        "{mounter_log}"
    );
    assert_eq!(mounter_pid(&plugin), (daemons[0], true, true));
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert_eq!(
        fuse_daemons_under(&plugin.root),
        daemons,
        "nothing was remounted"
    );
    writer.wait_for_more("writes after the restarts", 100);

    writer.finish();

    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert!(mountpoints_under(&plugin.root).is_empty());
    wait_until(
        "the adopted daemon to exit",
        Duration::from_secs(30),
        || !process_alive(daemons[0]),
    )
    .unwrap();
    let listing = plugin.mounter.as_ref().unwrap().list().unwrap();
    assert_eq!(listing, serde_json::json!([]));
    csi.delete_volume(name).unwrap();
}

/// The state file is only a record: with it gone (or torn), a restarted plugin still recognises
/// live mounts through the mount table, answers repeats, and tears everything down.
#[test]
fn lost_node_state_is_recovered_from_the_mount_table() {
    let Some(mut fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let name = "pvc-amnesia";
    let mode = Mode::SingleNodeMultiWriter;
    let staging = fixture.plugin.path("staging/amnesia");
    let target = fixture.plugin.path("pods/p/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fixture
        .csi
        .create_volume(name, 16 * MIB, mode, &[])
        .unwrap();
    fixture.csi.stage(name, &staging, mode).unwrap();
    fixture
        .csi
        .publish(name, &staging, &target, mode, false)
        .unwrap();
    write_file(&target.join("kept"), b"still here");
    let daemons = fuse_daemons_under(&fixture.plugin.root);

    fixture.plugin.kill();
    let state_file = fixture.plugin.state_directory.join("node-state.json");
    assert!(state_file.exists());
    fs::write(&state_file, b"{ torn").unwrap();
    fixture.plugin.restart().unwrap();
    fixture.csi = fixture.plugin.client().unwrap();
    let csi = &fixture.csi;

    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert_eq!(fuse_daemons_under(&fixture.plugin.root), daemons);
    assert_eq!(fs::read(target.join("kept")).unwrap(), b"still here");
    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert!(mountpoints_under(&fixture.plugin.root).is_empty());
    // Its pid was lost with the record; the daemon ends on its own once its mount is gone.
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        daemons.iter().all(|&pid| !process_alive(pid))
    })
    .unwrap();
    let set_aside = fs::read_dir(&fixture.plugin.state_directory)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .any(|entry| entry.file_name().to_string_lossy().contains("unreadable"));
    assert!(set_aside, "the torn state file is kept for inspection");
    csi.delete_volume(name).unwrap();
}

/// SIGTERM (a clean stop) ends serving and removes the socket, but never the pods' mounts.
#[test]
fn sigterm_stops_serving_but_keeps_mounts() {
    let Some(mut fixture) = setup(DEVICE_SIZE_BYTES) else {
        return;
    };
    let name = "pvc-sigterm";
    let mode = Mode::SingleNodeWriter;
    let staging = fixture.plugin.path("staging/sigterm");
    let target = fixture.plugin.path("pods/p/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fixture
        .csi
        .create_volume(name, 16 * MIB, mode, &[])
        .unwrap();
    fixture.csi.stage(name, &staging, mode).unwrap();
    fixture
        .csi
        .publish(name, &staging, &target, mode, false)
        .unwrap();

    let status = fixture.plugin.terminate().unwrap();
    assert!(status.success(), "clean exit: {status}");
    assert!(!fixture.plugin.socket.exists(), "the socket is removed");
    assert!(is_ballast_mount_of(&target, name));
    write_file(
        &target.join("after-stop"),
        b"written with no plugin running",
    );

    fixture.plugin.restart().unwrap();
    fixture.csi = fixture.plugin.client().unwrap();
    let csi = &fixture.csi;
    assert_eq!(
        fs::read(target.join("after-stop")).unwrap(),
        b"written with no plugin running"
    );
    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert!(mountpoints_under(&fixture.plugin.root).is_empty());
    csi.delete_volume(name).unwrap();
}
