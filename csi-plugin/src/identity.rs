//! CSI Identity service: who the plugin is, what it can do, and whether it is ready.
//!
//! Owns: the plugin capabilities advertised to the CO.
//! Must not depend on: the controller or node services.
//! Invariants:
//! - Capabilities are the same in every mode (the plugin *as a whole* offers the controller
//!   service; the CO talks to the controller instance for it).
//! - Probe never fails because the storage node is down: it answers `ready: false`, which tells
//!   the CO (and the livenessprobe sidecar) "healthy but not ready", so the plugin is not
//!   restarted in a loop while the storage node starts.

use ballast_client::BallastClient;
use tonic::{Request, Response, Status};

use crate::csi::v1::identity_server::Identity;
use crate::csi::v1::plugin_capability::{self, service, volume_expansion};
use crate::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::{DRIVER_NAME, VENDOR_VERSION};

/// The Identity service; `probe_client` has short timeouts and a single attempt.
#[derive(Debug, Clone)]
pub struct IdentityService {
    probe_client: BallastClient,
}

impl IdentityService {
    pub fn new(probe_client: BallastClient) -> Self {
        Self { probe_client }
    }
}

fn service_capability(kind: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: VENDOR_VERSION.to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service_capability(service::Type::ControllerService),
                service_capability(service::Type::VolumeAccessibilityConstraints),
                PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            // A quota change is visible in statfs of a mounted volume at once.
                            r#type: volume_expansion::Type::Online as i32,
                        },
                    )),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match self.probe_client.status().await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, "probe: storage node not reachable; reporting not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
