//! Which CSI volume capabilities Ballast supports, and what a supported one asks of a mount.
//!
//! Owns: the access-mode and access-type rules shared by the controller (CreateVolume,
//! ValidateVolumeCapabilities) and the node (NodeStage/NodePublish).
//! Must not depend on: the services or any I/O.
//! Invariants:
//! - Only the mount access type is supported (a FUSE file system); block access is refused.
//! - Supported access modes: SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER,
//!   SINGLE_NODE_MULTI_WRITER, MULTI_NODE_MULTI_WRITER (RWX), and the read-only modes
//!   SINGLE_NODE_READER_ONLY and MULTI_NODE_READER_ONLY (published read-only). Refused:
//!   MULTI_NODE_SINGLE_WRITER, because nothing here could keep the other nodes read-only.
//! - Mount flags are applied to the bind mount at the target path; only flags that a bind mount
//!   can honour are accepted, anything else is refused instead of silently ignored.

use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::volume_capability::AccessType;
use crate::csi::v1::VolumeCapability;
use crate::CsiError;

/// File-system types accepted in a mount capability: unspecified, or Ballast's own.
pub const FS_TYPES_ACCEPTED: [&str; 3] = ["", "ballast", "fuse.ballast"];

/// Mount flags a bind mount of the staged volume can apply, as written in StorageClass
/// `mountOptions`.
/// `suid` and `dev` are not among them: every publish of a FUSE volume is `nosuid,nodev`.
pub const MOUNT_FLAGS_ACCEPTED: [&str; 9] = [
    "ro",
    "rw",
    "nosuid",
    "nodev",
    "noexec",
    "exec",
    "noatime",
    "relatime",
    "nodiratime",
];

/// What a validated capability asks of the mount at the target path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountRequest {
    /// The access mode only allows reading (the `readonly` field of a publish call adds to this).
    pub read_only: bool,
    /// Mount flags, all from [`MOUNT_FLAGS_ACCEPTED`], in the order given.
    pub mount_flags: Vec<String>,
}

/// Checks one capability; `context` names the call for the error message.
pub fn validate(capability: &VolumeCapability, context: &str) -> Result<MountRequest, CsiError> {
    let mount = match &capability.access_type {
        Some(AccessType::Mount(mount)) => mount,
        Some(AccessType::Block(_)) => {
            return Err(CsiError::InvalidArgument(format!(
                "{context}: block access is not supported; Ballast volumes are file systems \
                 (use volumeMode: Filesystem)"
            )))
        }
        None => {
            return Err(CsiError::InvalidArgument(format!(
                "{context}: volume capability has no access type (mount or block)"
            )))
        }
    };
    if !FS_TYPES_ACCEPTED.contains(&mount.fs_type.as_str()) {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: fs_type {:?} is not supported; Ballast volumes are FUSE file systems \
             (leave fsType empty)",
            mount.fs_type
        )));
    }
    if !mount.volume_mount_group.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)"
        )));
    }
    for flag in &mount.mount_flags {
        if !MOUNT_FLAGS_ACCEPTED.contains(&flag.as_str()) {
            return Err(CsiError::InvalidArgument(format!(
                "{context}: mount flag {flag:?} is not supported; accepted: {}",
                MOUNT_FLAGS_ACCEPTED.join(", ")
            )));
        }
    }
    let Some(access_mode) = &capability.access_mode else {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: volume capability has no access mode"
        )));
    };
    let read_only_mode = match Mode::try_from(access_mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::MultiNodeMultiWriter,
        ) => false,
        Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) => true,
        Ok(Mode::MultiNodeSingleWriter) => {
            return Err(CsiError::InvalidArgument(format!(
                "{context}: access mode MULTI_NODE_SINGLE_WRITER is not supported"
            )))
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Err(CsiError::InvalidArgument(format!(
                "{context}: access mode {} is unknown",
                access_mode.mode
            )))
        }
    };
    Ok(MountRequest {
        read_only: read_only_mode || mount.mount_flags.iter().any(|flag| flag == "ro"),
        mount_flags: mount.mount_flags.clone(),
    })
}

/// Checks a non-empty list of capabilities (CreateVolume and ValidateVolumeCapabilities).
pub fn validate_all(capabilities: &[VolumeCapability], context: &str) -> Result<(), CsiError> {
    if capabilities.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: volume_capabilities is required"
        )));
    }
    for capability in capabilities {
        validate(capability, context)?;
    }
    Ok(())
}

/// The capability of a node call, which is required there.
pub fn require(
    capability: Option<&VolumeCapability>,
    context: &str,
) -> Result<MountRequest, CsiError> {
    let capability = capability.ok_or_else(|| {
        CsiError::InvalidArgument(format!("{context}: volume_capability is required"))
    })?;
    validate(capability, context)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    pub fn mount_capability(mode: Mode, mount_flags: &[&str]) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: mount_flags.iter().map(|flag| flag.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn supported_modes() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let request = validate(&mount_capability(mode, &[]), "test").unwrap();
            assert!(!request.read_only, "{mode:?}");
        }
        for mode in [Mode::SingleNodeReaderOnly, Mode::MultiNodeReaderOnly] {
            assert!(
                validate(&mount_capability(mode, &[]), "test")
                    .unwrap()
                    .read_only
            );
        }
        let with_ro = validate(&mount_capability(Mode::SingleNodeWriter, &["ro"]), "t").unwrap();
        assert!(with_ro.read_only);
    }

    #[test]
    fn unsupported_capabilities_are_invalid_arguments() {
        let block = VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        let mut ext4 = mount_capability(Mode::SingleNodeWriter, &[]);
        if let Some(AccessType::Mount(mount)) = &mut ext4.access_type {
            mount.fs_type = "ext4".into();
        }
        let unknown_mode = VolumeCapability {
            access_mode: Some(AccessMode { mode: 42 }),
            ..mount_capability(Mode::SingleNodeWriter, &[])
        };
        let no_mode = VolumeCapability {
            access_mode: None,
            ..mount_capability(Mode::SingleNodeWriter, &[])
        };
        for capability in [
            block,
            ext4,
            unknown_mode,
            no_mode,
            mount_capability(Mode::MultiNodeSingleWriter, &[]),
            mount_capability(Mode::Unknown, &[]),
            mount_capability(Mode::SingleNodeWriter, &["sync,remount"]),
        ] {
            assert!(
                matches!(
                    validate(&capability, "test"),
                    Err(CsiError::InvalidArgument(_))
                ),
                "{capability:?}"
            );
        }
        assert!(validate_all(&[], "test").is_err());
        assert!(require(None, "test").is_err());
    }
}
