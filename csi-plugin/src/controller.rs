//! CSI Controller service: volumes as the external-provisioner and external-resizer see them.
//!
//! Owns: CreateVolume/DeleteVolume/ValidateVolumeCapabilities/ListVolumes/GetCapacity/
//! ControllerExpandVolume on top of the storage node's Admin API, and the advertised controller
//! capabilities (only what is really supported).
//! Must not depend on: the node service, mounts, or server internals (only `ballast-client`).
//! Invariants:
//! - Volume id = Ballast volume name = `names::volume_name_for(CSI name)`; capacity = quota,
//!   rounded up to whole 4 KiB blocks.
//! - CreateVolume is idempotent: an existing volume with a compatible size and the same
//!   replication is returned as is; an incompatible one is `ALREADY_EXISTS`.
//! - Topology: requirements are validated (only `topology.ballast.io/node` is known) but impose
//!   nothing, and no `accessible_topology` is returned: with one storage node reached over the
//!   network, every node with the plugin can mount every volume, and pinning a PV to the nodes
//!   listed at creation time would only keep it off nodes added later. When clustering lands,
//!   `preferred` becomes the placement hint and the replica nodes become the topology.
//! - Snapshots, clones, ControllerPublish, ControllerGetVolume and ControllerModifyVolume are
//!   not advertised and answer `UNIMPLEMENTED`.

use std::collections::HashMap;

use ballast_client::{proto, BallastClient};
use tonic::{Request, Response, Status};

use crate::csi::v1::controller_server::Controller;
use crate::csi::v1::controller_service_capability::{self, rpc};
use crate::csi::v1::list_volumes_response;
use crate::csi::v1::validate_volume_capabilities_response::Confirmed;
use crate::csi::v1::*;
use crate::names::volume_name_for;
use crate::operations::OperationLocks;
use crate::parameters::{self, VolumeParameters};
use crate::{capabilities, paging, CsiError, TOPOLOGY_NODE_KEY};

/// Size of a device data block: the unit of `StatusResponse.data_block_*_count` (the device
/// crate's `BLOCK_SIZE_BYTES`, which this crate must not depend on) and of quotas.
pub const DATA_BLOCK_SIZE_BYTES: u64 = 4096;

/// Capacity of a volume whose request names none.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 30;

/// The Controller service.
#[derive(Debug)]
pub struct ControllerService {
    client: BallastClient,
    locks: OperationLocks,
}

impl ControllerService {
    pub fn new(client: BallastClient) -> Self {
        Self {
            client,
            locks: OperationLocks::default(),
        }
    }
}

/// The quota for a capacity range, and the range's limit (0 = none).
fn quota_for(range: Option<&CapacityRange>, context: &str) -> Result<(u64, u64), CsiError> {
    let Some(range) = range else {
        return Ok((DEFAULT_CAPACITY_BYTES, 0));
    };
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: capacity_range must not be negative"
        )));
    }
    let (required_bytes, limit_bytes) = (range.required_bytes as u64, range.limit_bytes as u64);
    if limit_bytes > 0 && limit_bytes < required_bytes {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: limit_bytes {limit_bytes} is below required_bytes {required_bytes}"
        )));
    }
    let wanted_bytes = match (required_bytes, limit_bytes) {
        (0, 0) => DEFAULT_CAPACITY_BYTES,
        (0, limit) => DEFAULT_CAPACITY_BYTES.min(limit),
        (required, _) => required,
    };
    let quota_bytes = wanted_bytes
        .checked_next_multiple_of(DATA_BLOCK_SIZE_BYTES)
        .ok_or_else(|| CsiError::OutOfRange(format!("{context}: capacity is too large")))?;
    if limit_bytes > 0 && quota_bytes > limit_bytes {
        // Only when the limit is not a whole number of blocks and too close to `required`.
        let floor_bytes = limit_bytes / DATA_BLOCK_SIZE_BYTES * DATA_BLOCK_SIZE_BYTES;
        if floor_bytes < required_bytes || floor_bytes == 0 {
            return Err(CsiError::OutOfRange(format!(
                "{context}: no multiple of {DATA_BLOCK_SIZE_BYTES} bytes lies between \
                 required_bytes {required_bytes} and limit_bytes {limit_bytes}"
            )));
        }
        return Ok((floor_bytes, limit_bytes));
    }
    Ok((quota_bytes, limit_bytes))
}

/// Checks topology segments: only our key is known.
fn validate_topologies<'a>(
    topologies: impl IntoIterator<Item = &'a Topology>,
    context: &str,
) -> Result<(), CsiError> {
    for topology in topologies {
        for (key, value) in &topology.segments {
            if key != TOPOLOGY_NODE_KEY {
                return Err(CsiError::InvalidArgument(format!(
                    "{context}: unknown topology key {key:?}; this driver only reports \
                     {TOPOLOGY_NODE_KEY}"
                )));
            }
            parameters::validate_label_value(value).map_err(|reason| {
                CsiError::InvalidArgument(format!("{context}: topology value: {reason}"))
            })?;
        }
    }
    Ok(())
}

/// The CSI view of a Ballast volume.
fn csi_volume(volume: &proto::Volume, volume_context: HashMap<String, String>) -> Volume {
    Volume {
        capacity_bytes: i64::try_from(volume.quota_bytes).unwrap_or(i64::MAX),
        volume_id: volume.name.clone(),
        volume_context,
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

/// The context a volume reports when its StorageClass parameters are not at hand (ListVolumes):
/// what the storage node records.
fn recorded_context(volume: &proto::Volume) -> HashMap<String, String> {
    VolumeParameters {
        replication_factor: volume.replication_factor,
        replication_minimum: volume.replication_minimum,
        node_selector: Vec::new(),
        volume_labels: Vec::new(),
    }
    .volume_context()
}

/// Why an existing volume cannot be the answer to a CreateVolume, if it cannot.
fn incompatibility(
    volume: &proto::Volume,
    required_bytes: u64,
    limit_bytes: u64,
    volume_parameters: &VolumeParameters,
) -> Option<String> {
    if volume.quota_bytes < required_bytes || (limit_bytes > 0 && volume.quota_bytes > limit_bytes)
    {
        return Some(format!(
            "volume {} exists with capacity {} bytes, outside the requested range \
             [{required_bytes}, {}]",
            volume.name,
            volume.quota_bytes,
            if limit_bytes == 0 {
                "unlimited".to_owned()
            } else {
                limit_bytes.to_string()
            }
        ));
    }
    if volume.replication_factor != volume_parameters.replication_factor
        || volume.replication_minimum != volume_parameters.replication_minimum
    {
        return Some(format!(
            "volume {} exists with replication {}/{}, not {}/{}",
            volume.name,
            volume.replication_factor,
            volume.replication_minimum,
            volume_parameters.replication_factor,
            volume_parameters.replication_minimum
        ));
    }
    None
}

fn rpc_capability(kind: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

/// A volume id from a request: required, and a name that could exist.
fn volume_id_of<'a>(volume_id: &'a str, context: &str) -> Result<&'a str, CsiError> {
    if volume_id.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: volume_id is required"
        )));
    }
    Ok(volume_id)
}

/// Fetches a volume; `NOT_FOUND` when it does not exist (an id that is not even a valid name
/// cannot exist either).
async fn existing_volume(
    client: &BallastClient,
    volume_id: &str,
) -> Result<proto::Volume, CsiError> {
    if ballast_common::validate_volume_name(volume_id).is_err() {
        return Err(CsiError::NotFound(format!(
            "volume {volume_id:?} does not exist"
        )));
    }
    match client.get_volume(volume_id).await {
        Ok(volume) => Ok(volume),
        Err(error) if error.is_not_found() => Err(CsiError::NotFound(format!(
            "volume {volume_id:?} does not exist"
        ))),
        Err(error) => Err(error.into()),
    }
}

impl ControllerService {
    async fn create(&self, request: CreateVolumeRequest) -> Result<CreateVolumeResponse, CsiError> {
        const CONTEXT: &str = "CreateVolume";
        let name = volume_name_for(&request.name)?;
        capabilities::validate_all(&request.volume_capabilities, CONTEXT)?;
        if request.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(format!(
                "{CONTEXT}: volume_content_source is not supported: Ballast volumes have no \
                 snapshots or clones yet (CREATE_DELETE_SNAPSHOT and CLONE_VOLUME are not \
                 advertised)"
            )));
        }
        if !request.mutable_parameters.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "{CONTEXT}: mutable_parameters are not supported (MODIFY_VOLUME is not advertised)"
            )));
        }
        let volume_parameters = VolumeParameters::parse(&request.parameters)?;
        if let Some(requirements) = &request.accessibility_requirements {
            validate_topologies(
                requirements.requisite.iter().chain(&requirements.preferred),
                CONTEXT,
            )?;
        }
        let (quota_bytes, limit_bytes) = quota_for(request.capacity_range.as_ref(), CONTEXT)?;
        let required_bytes = request
            .capacity_range
            .as_ref()
            .map(|range| range.required_bytes.max(0) as u64)
            .unwrap_or(0);
        let _guard = self.locks.begin(&name)?;

        let existing = match self.client.get_volume(&name).await {
            Ok(volume) => Some(volume),
            Err(error) if error.is_not_found() => None,
            Err(error) => return Err(error.into()),
        };
        let volume = match existing {
            Some(volume) => volume,
            None => match self
                .client
                .create_volume_with(proto::CreateVolumeRequest {
                    name: name.clone(),
                    quota_bytes,
                    replication_factor: volume_parameters.replication_factor,
                    replication_minimum: volume_parameters.replication_minimum,
                    // Replicas go only to storage nodes carrying these labels.
                    node_selector: volume_parameters.node_selector.iter().cloned().collect(),
                    // The claim's namespace and name: how the scheduler extender finds a
                    // pod's volumes.
                    labels: volume_parameters.volume_labels.iter().cloned().collect(),
                })
                .await
            {
                Ok(volume) => {
                    tracing::info!(volume = %name, quota_bytes, csi_name = %request.name,
                        "volume created");
                    volume
                }
                // Created meanwhile by another controller replica: judge what is there.
                Err(error) if error.code() == Some(tonic::Code::AlreadyExists) => {
                    self.client.get_volume(&name).await?
                }
                Err(error) => return Err(error.into()),
            },
        };
        if let Some(reason) =
            incompatibility(&volume, required_bytes, limit_bytes, &volume_parameters)
        {
            return Err(CsiError::AlreadyExists(format!("{CONTEXT}: {reason}")));
        }
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(&volume, volume_parameters.volume_context())),
        })
    }

    async fn delete(&self, request: DeleteVolumeRequest) -> Result<(), CsiError> {
        let volume_id = volume_id_of(&request.volume_id, "DeleteVolume")?;
        if ballast_common::validate_volume_name(volume_id).is_err() {
            return Ok(()); // Cannot exist, so it is deleted already.
        }
        let _guard = self.locks.begin(volume_id)?;
        match self.client.delete_volume(volume_id).await {
            Ok(()) => {
                tracing::info!(volume = %volume_id, "volume deleted");
                Ok(())
            }
            Err(error) if error.is_not_found() => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn validate(
        &self,
        request: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, CsiError> {
        const CONTEXT: &str = "ValidateVolumeCapabilities";
        let volume_id = volume_id_of(&request.volume_id, CONTEXT)?;
        if request.volume_capabilities.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "{CONTEXT}: volume_capabilities is required"
            )));
        }
        existing_volume(&self.client, volume_id).await?;
        let verdict = capabilities::validate_all(&request.volume_capabilities, CONTEXT)
            .and_then(|()| VolumeParameters::parse(&request.parameters).map(|_| ()))
            .and_then(|()| {
                if request.mutable_parameters.is_empty() {
                    Ok(())
                } else {
                    Err(CsiError::InvalidArgument(
                        "mutable_parameters are not supported".to_owned(),
                    ))
                }
            });
        Ok(match verdict {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: request.volume_context,
                    volume_capabilities: request.volume_capabilities,
                    parameters: request.parameters,
                    mutable_parameters: request.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(error) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: error.to_string(),
            },
        })
    }

    async fn list(&self, request: ListVolumesRequest) -> Result<ListVolumesResponse, CsiError> {
        // Validate paging before the round trip, so a bad token fails fast.
        if request.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!(
                "ListVolumes: max_entries {} is negative",
                request.max_entries
            )));
        }
        paging::decode_token(&request.starting_token)?;
        let volumes = self.client.list_volumes().await?;
        let (page, next_token) = paging::page(
            volumes,
            |volume| volume.name.as_str(),
            request.max_entries,
            &request.starting_token,
        )?;
        Ok(ListVolumesResponse {
            entries: page
                .iter()
                .map(|volume| list_volumes_response::Entry {
                    volume: Some(csi_volume(volume, recorded_context(volume))),
                    status: None,
                })
                .collect(),
            next_token,
        })
    }

    async fn capacity(&self, request: GetCapacityRequest) -> Result<GetCapacityResponse, CsiError> {
        const CONTEXT: &str = "GetCapacity";
        VolumeParameters::parse(&request.parameters)?;
        validate_topologies(request.accessible_topology.as_ref(), CONTEXT)?;
        if !request.volume_capabilities.is_empty()
            && capabilities::validate_all(&request.volume_capabilities, CONTEXT).is_err()
        {
            // The spec: capacity for volumes we cannot create with these capabilities is 0.
            return Ok(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: None,
            });
        }
        let status = self.client.status().await?;
        let to_bytes = |blocks: u64| {
            i64::try_from(blocks.saturating_mul(DATA_BLOCK_SIZE_BYTES)).unwrap_or(i64::MAX)
        };
        Ok(GetCapacityResponse {
            available_capacity: to_bytes(status.data_block_free_count),
            // Quotas are not reservations, so one volume may be as large as the device.
            maximum_volume_size: Some(to_bytes(status.data_block_count)),
            minimum_volume_size: None,
        })
    }

    async fn expand(
        &self,
        request: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        const CONTEXT: &str = "ControllerExpandVolume";
        let volume_id = volume_id_of(&request.volume_id, CONTEXT)?;
        let Some(range) = request.capacity_range.as_ref() else {
            return Err(CsiError::InvalidArgument(format!(
                "{CONTEXT}: capacity_range is required"
            )));
        };
        if let Some(capability) = &request.volume_capability {
            capabilities::validate(capability, CONTEXT)?;
        }
        let (quota_bytes, _limit_bytes) = quota_for(Some(range), CONTEXT)?;
        let _guard = self.locks.begin(volume_id)?;
        let volume = existing_volume(&self.client, volume_id).await?;
        let capacity_bytes = if volume.quota_bytes >= quota_bytes {
            volume.quota_bytes // Already that large: expansion never shrinks.
        } else {
            let resized = self.client.resize_volume(volume_id, quota_bytes).await?;
            tracing::info!(volume = %volume_id, from_bytes = volume.quota_bytes,
                to_bytes = resized.quota_bytes, "volume expanded");
            resized.quota_bytes
        };
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(capacity_bytes).unwrap_or(i64::MAX),
            // FUSE statfs reports the quota, so the new size is visible on every mount at once.
            node_expansion_required: false,
        })
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(
        CsiError::Unimplemented(format!("{what} is not supported by {}", crate::DRIVER_NAME))
            .into(),
    )
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.delete(request.into_inner()).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume (no attach step; PUBLISH_UNPUBLISH_VOLUME)")
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume (no attach step; PUBLISH_UNPUBLISH_VOLUME)")
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(request.into_inner()).await?))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(self.capacity(request.into_inner()).await?))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                rpc::Type::CreateDeleteVolume,
                rpc::Type::ListVolumes,
                rpc::Type::GetCapacity,
                rpc::Type::ExpandVolume,
                rpc::Type::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc_capability)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        unimplemented("CreateSnapshot (volumes have no snapshots yet)")
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        unimplemented("DeleteSnapshot (volumes have no snapshots yet)")
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        unimplemented("ListSnapshots (volumes have no snapshots yet)")
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume (GET_VOLUME)")
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume (MODIFY_VOLUME)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required_bytes: i64, limit_bytes: i64) -> CapacityRange {
        CapacityRange {
            required_bytes,
            limit_bytes,
        }
    }

    #[test]
    fn quotas_from_capacity_ranges() {
        assert_eq!(quota_for(None, "t").unwrap(), (DEFAULT_CAPACITY_BYTES, 0));
        assert_eq!(
            quota_for(Some(&range(0, 0)), "t").unwrap(),
            (DEFAULT_CAPACITY_BYTES, 0)
        );
        assert_eq!(
            quota_for(Some(&range(10 << 20, 0)), "t").unwrap(),
            (10 << 20, 0)
        );
        // Rounded up to whole blocks.
        assert_eq!(quota_for(Some(&range(4097, 0)), "t").unwrap(), (8192, 0));
        // Limit only: the default, capped by the limit.
        assert_eq!(
            quota_for(Some(&range(0, 1 << 20)), "t").unwrap(),
            (1 << 20, 1 << 20)
        );
        // Rounding up would pass the limit: round down if that still satisfies required.
        assert_eq!(
            quota_for(Some(&range(5000, 10_000)), "t").unwrap(),
            (8192, 10_000)
        );
        assert!(matches!(
            quota_for(Some(&range(4097, 5000)), "t"),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            quota_for(Some(&range(-1, 0)), "t"),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            quota_for(Some(&range(10, 5)), "t"),
            Err(CsiError::InvalidArgument(_))
        ));
    }

    #[test]
    fn existing_volumes_are_judged_by_size_and_replication() {
        let volume = proto::Volume {
            name: "pvc-1".into(),
            quota_bytes: 10 << 20,
            replication_factor: 1,
            replication_minimum: 1,
            ..Default::default()
        };
        let defaults = VolumeParameters::default();
        assert!(incompatibility(&volume, 10 << 20, 0, &defaults).is_none());
        assert!(incompatibility(&volume, 1 << 20, 20 << 20, &defaults).is_none());
        assert!(incompatibility(&volume, 20 << 20, 0, &defaults).is_some());
        assert!(incompatibility(&volume, 0, 1 << 20, &defaults).is_some());
        let replicated = VolumeParameters {
            replication_factor: 3,
            replication_minimum: 2,
            node_selector: Vec::new(),
            volume_labels: Vec::new(),
        };
        assert!(incompatibility(&volume, 10 << 20, 0, &replicated).is_some());
    }

    #[test]
    fn only_the_driver_topology_key_is_accepted() {
        let ours = Topology {
            segments: [(TOPOLOGY_NODE_KEY.to_owned(), "node-1".to_owned())].into(),
        };
        let foreign = Topology {
            segments: [("topology.kubernetes.io/zone".to_owned(), "a".to_owned())].into(),
        };
        assert!(validate_topologies([&ours], "t").is_ok());
        assert!(matches!(
            validate_topologies([&ours, &foreign], "t"),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
