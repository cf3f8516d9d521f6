//! `ballast-client`: the one way front ends (CLI, FUSE driver, CSI plugin) talk to a storage node.
//!
//! Owns: the gRPC channel, the local channel to a node on this host (`local`), per-call timeouts, the bounded retry policy, and the translation of
//! gRPC statuses into [`ClientError`] (and from there into a POSIX errno).
//! Must not depend on: any server crate (storage node, device, tables, streams); only
//! `ballast-proto` and `ballast-common`.
//! Invariants:
//! - [`BallastClient`] is cheap to clone; every clone shares one HTTP/2 connection.
//! - Every call is bounded in time (`request_timeout_ms` per attempt) and in attempts
//!   ([`RetryPolicy`]); side-effecting calls are repeated only when they provably never reached a
//!   node (see [`retry`]).
//! - Entry names are validated here before they are sent, so a bad name never costs a round trip.

pub mod error;
pub mod local;
pub mod retry;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

pub use ballast_common::Errno;
pub use ballast_proto::v1 as proto;
pub use error::ClientError;
pub use retry::{Idempotency, RetryPolicy};
/// gRPC status codes, as `ClientError::code` gives them.
pub use tonic::Code;

use proto::admin_client::AdminClient;
use proto::filesystem_client::FilesystemClient;

/// Volume labels with a meaning shared by several front ends: the CSI plugin records them when it
/// creates a volume for a PersistentVolumeClaim (external-provisioner's `--extra-create-metadata`
/// passes them as CreateVolume parameters under these same keys), and the scheduler extender
/// finds a pod's volumes by them.
pub mod volume_labels {
    /// Name of the PersistentVolumeClaim the volume was provisioned for.
    pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
    /// Namespace of that PersistentVolumeClaim.
    pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
    /// Name of the PersistentVolume (equal to the volume id the CSI plugin returns).
    pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";
    /// Every key above: the labels the CSI plugin copies from CreateVolume parameters.
    pub const FROM_PROVISIONER: [&str; 3] = [PVC_NAME, PVC_NAMESPACE, PV_NAME];
}

/// Largest gRPC message accepted or sent, both ways: a 1 MiB FUSE write plus headroom for large
/// reads and long directory pages.
pub const MESSAGE_SIZE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Inode number of the root directory of every volume.
pub const ROOT_INODE: u64 = 1;
/// Largest range one Fallocate request allocates (the node accepts up to 4 GiB); larger ranges
/// are sent in pieces.
pub const FALLOCATE_BYTES_PER_REQUEST_MAX: u64 = 1 << 30;

/// Tunables of a client. All durations are bounded so no call can hang forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Limit on establishing (or re-establishing) the TCP/Unix connection.
    pub connect_timeout_ms: u64,
    /// Limit on one attempt of one call, from sending to the complete answer.
    pub request_timeout_ms: u64,
    /// Retries of calls that failed with `Unavailable`.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            retry: RetryPolicy::default(),
        }
    }
}

/// Redirects to a container's leader followed by one call, at most.
pub const REDIRECT_COUNT_MAX: u32 = 4;
/// How long after a failed connection a redirect to that endpoint is taken for stale news.
const STALE_REDIRECT_WINDOW_MS: u64 = 2_000;
/// Endpoints a client remembers (seeds plus leaders it was redirected to).
const ENDPOINT_COUNT_MAX: usize = 64;

/// A client of a Ballast cluster, speaking both the Admin and the Filesystem services.
///
/// It starts from one or more seed endpoints and learns where each volume's leader is from the
/// nodes' redirects, so calls go straight to the leader; when a node stops answering it moves on
/// to the next endpoint it knows.
#[derive(Debug, Clone)]
pub struct BallastClient {
    routes: std::sync::Arc<Routes>,
    options: ClientOptions,
}

/// Where calls go: the channels to every known node, and the preferred node per volume.
#[derive(Debug)]
struct Routes {
    /// Known endpoints in the order they were learned; seeds first.
    endpoints: std::sync::Mutex<Vec<String>>,
    channels: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
    /// Volume name ("" for admin calls) → the endpoint that last served it.
    preferred: std::sync::Mutex<std::collections::HashMap<String, String>>,
    options: ClientOptions,
    /// This client's request-id session (see [`RequestTag`]).
    session: u64,
    sequence_next: std::sync::atomic::AtomicU64,
    /// Sequences of side-effecting calls still waiting for an answer.
    in_flight: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// When a connection to an endpoint last failed: a redirect there soon after is stale (the
    /// redirecting node has not noticed the leader died) and is not followed.
    unreachable_since: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// The request id of one side-effecting call: the node applies it at most once, however often
/// it is resent (after a lost answer, to a new leader), and answers repeats with the first
/// response. Dropping the tag ends the call, which lets the node forget its response.
struct RequestTag<'routes> {
    routes: &'routes Routes,
    sequence: u64,
}

impl RequestTag<'_> {
    /// `session:sequence:floor` in hex; the floor is the oldest call still in flight.
    fn metadata_value(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        let floor = self
            .routes
            .in_flight
            .lock()
            .expect("in-flight lock")
            .first()
            .copied()
            .unwrap_or(self.sequence)
            .min(self.sequence);
        format!("{:x}:{:x}:{:x}", self.routes.session, self.sequence, floor)
            .parse()
            .expect("hex digits and colons are valid metadata")
    }
}

impl Drop for RequestTag<'_> {
    fn drop(&mut self) {
        self.routes
            .in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&self.sequence);
    }
}

impl Routes {
    fn begin_request(&self) -> RequestTag<'_> {
        let sequence = self
            .sequence_next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .insert(sequence);
        RequestTag {
            routes: self,
            sequence,
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = BallastClient::endpoint(endpoint, &self.options)?.connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    fn preferred(&self, route: &str) -> String {
        if let Some(endpoint) = self.preferred.lock().expect("preferred lock").get(route) {
            return endpoint.clone();
        }
        self.endpoints.lock().expect("endpoints lock")[0].clone()
    }

    fn prefer(&self, route: &str, endpoint: &str) {
        let mut endpoints = self.endpoints.lock().expect("endpoints lock");
        if !endpoints.iter().any(|known| known == endpoint) && endpoints.len() < ENDPOINT_COUNT_MAX
        {
            endpoints.push(endpoint.to_owned());
        }
        drop(endpoints);
        let mut preferred = self.preferred.lock().expect("preferred lock");
        if preferred.get(route).map(String::as_str) != Some(endpoint) {
            preferred.insert(route.to_owned(), endpoint.to_owned());
        }
    }

    fn mark_unreachable(&self, endpoint: &str) {
        self.unreachable_since
            .lock()
            .expect("unreachable lock")
            .insert(endpoint.to_owned(), std::time::Instant::now());
    }

    /// Whether connecting to `endpoint` failed within the last [`STALE_REDIRECT_WINDOW_MS`].
    fn recently_unreachable(&self, endpoint: &str) -> bool {
        self.unreachable_since
            .lock()
            .expect("unreachable lock")
            .get(endpoint)
            .is_some_and(|since| {
                since.elapsed() < std::time::Duration::from_millis(STALE_REDIRECT_WINDOW_MS)
            })
    }

    /// The known endpoint after `endpoint` (wrapping), for moving past a node that is down.
    fn next_after(&self, endpoint: &str) -> String {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        let position = endpoints.iter().position(|known| known == endpoint);
        match position {
            Some(index) => endpoints[(index + 1) % endpoints.len()].clone(),
            None => endpoints[0].clone(),
        }
    }
}

/// Requests that belong to one volume are routed to that volume's leader.
pub trait Routed {
    /// The volume the request is about; "" for cluster-wide (admin) requests.
    fn route(&self) -> &str {
        ""
    }
}

macro_rules! routed_by_volume {
    ($($request:ident),* $(,)?) => {
        $(impl Routed for proto::$request {
            fn route(&self) -> &str {
                &self.volume
            }
        })*
    };
}

routed_by_volume!(
    LookupRequest,
    GetAttrRequest,
    SetAttrRequest,
    CreateRequest,
    LinkRequest,
    UnlinkRequest,
    RenameRequest,
    ReadDirRequest,
    ReadLinkRequest,
    ReadRequest,
    WriteRequest,
    FallocateRequest,
    FsyncRequest,
    StatFsRequest,
    PurgeOrphansRequest,
);

macro_rules! routed_cluster_wide {
    ($($request:ident),* $(,)?) => {
        $(impl Routed for proto::$request {})*
    };
}

routed_cluster_wide!(
    VolumeDigestRequest,
    CreateVolumeRequest,
    DeleteVolumeRequest,
    ListVolumesRequest,
    GetVolumeRequest,
    ResizeVolumeRequest,
    StatusRequest,
    ListNodesRequest,
    DrainNodeRequest,
    ScrubRequest,
    LeadVolumeRequest,
);

impl BallastClient {
    /// Connects to `endpoint` ("http://127.0.0.1:7400", or "unix:/path/to/socket"; several
    /// nodes of one cluster separated by commas) with default options.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_with_options(endpoint, ClientOptions::default()).await
    }

    /// Connects to `endpoint`, failing after `options.connect_timeout_ms` if the node does not
    /// answer. Later connection losses are repaired transparently on the next call.
    pub async fn connect_with_options(
        endpoints: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let client = Self::connect_lazy(endpoints, options)?;
        // Succeed if any seed answers; report the last failure otherwise.
        let seeds = client
            .routes
            .endpoints
            .lock()
            .expect("endpoints lock")
            .clone();
        let mut last_error = None;
        for seed in &seeds {
            let endpoint_config = Self::endpoint(seed, &options)?;
            match endpoint_config.connect().await {
                Ok(channel) => {
                    client
                        .routes
                        .channels
                        .lock()
                        .expect("channels lock")
                        .insert(seed.clone(), channel);
                    client.routes.prefer("", seed);
                    return Ok(client);
                }
                Err(source) => {
                    last_error = Some(ClientError::Transport {
                        endpoint: seed.clone(),
                        source,
                    })
                }
            }
        }
        Err(last_error.expect("at least one seed"))
    }

    /// Builds a client without contacting any node; connections are made on the first call.
    /// Useful where the node may start later than the caller.
    pub fn connect_lazy(endpoints: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let seeds: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(str::to_owned)
            .collect();
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no storage node endpoint given".to_owned(),
            ));
        }
        for seed in &seeds {
            Self::endpoint(seed, &options)?;
        }
        Ok(Self {
            routes: std::sync::Arc::new(Routes {
                endpoints: std::sync::Mutex::new(seeds),
                channels: std::sync::Mutex::new(std::collections::HashMap::new()),
                preferred: std::sync::Mutex::new(std::collections::HashMap::new()),
                options,
                session: new_session(),
                sequence_next: std::sync::atomic::AtomicU64::new(1),
                in_flight: std::sync::Mutex::new(std::collections::BTreeSet::new()),
                unreachable_since: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
            options,
        })
    }

    fn endpoint(endpoint: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
        if !(endpoint.starts_with("http://")
            || endpoint.starts_with("https://")
            || endpoint.starts_with("unix:"))
        {
            return Err(ClientError::InvalidArgument(format!(
                "endpoint {endpoint:?} must start with http://, https:// or unix:"
            )));
        }
        let endpoint_config = Endpoint::from_shared(endpoint.to_owned()).map_err(|error| {
            ClientError::InvalidArgument(format!("invalid endpoint {endpoint:?}: {error}"))
        })?;
        Ok(endpoint_config
            .connect_timeout(Duration::from_millis(options.connect_timeout_ms))
            .tcp_nodelay(true)
            .initial_stream_window_size(ballast_proto::HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(ballast_proto::HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(ballast_proto::HTTP2_FRAME_BYTES_MAX)
            // Detect a dead node on an idle connection instead of waiting for a request timeout.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20)))
    }

    /// The options this client was built with.
    pub fn options(&self) -> ClientOptions {
        self.options
    }

    /// Every endpoint this client knows: its seeds and the leaders it was redirected to.
    pub fn known_endpoints(&self) -> Vec<String> {
        self.routes
            .endpoints
            .lock()
            .expect("endpoints lock")
            .clone()
    }

    /// Runs one unary call with the per-attempt timeout, leader redirects and the bounded retry
    /// policy.
    ///
    /// - A node that does not lead the volume's container answers with the leader's address and
    ///   a promise that it applied nothing; the call goes there at once (at most
    ///   [`REDIRECT_COUNT_MAX`] times) and the leader is remembered for the volume.
    /// - "No leader yet" also applied nothing, so any call waits and retries.
    /// - A node that cannot be connected to is skipped for the next known endpoint.
    /// - Otherwise [`retry::should_retry`] decides, and sleeps follow [`RetryPolicy`].
    async fn call<Request, Response, Attempt, AttemptFuture>(
        &self,
        method: &'static str,
        idempotency: Idempotency,
        request: Request,
        mut attempt: Attempt,
    ) -> Result<Response, ClientError>
    where
        Request: Clone + Routed,
        Attempt: FnMut(Channel, tonic::Request<Request>) -> AttemptFuture,
        AttemptFuture: Future<Output = Result<tonic::Response<Response>, tonic::Status>>,
    {
        let request_timeout = Duration::from_millis(self.options.request_timeout_ms);
        let attempt_count_max = self.options.retry.attempt_count_max.max(1);
        let route = request.route().to_owned();
        // Side effects on a volume carry a request id, which makes every resend safe.
        let tag = (idempotency == Idempotency::SideEffecting && !route.is_empty())
            .then(|| self.routes.begin_request());
        let idempotency = if tag.is_some() {
            Idempotency::Idempotent
        } else {
            idempotency
        };
        let mut endpoint = self.routes.preferred(&route);
        let started = std::time::Instant::now();
        let mut attempt_index = 0;
        let mut redirect_count = 0;
        loop {
            let channel = self.routes.channel(&endpoint)?;
            let mut grpc_request = tonic::Request::new(request.clone());
            // Also tell the node, so it can abandon work nobody waits for.
            grpc_request.set_timeout(request_timeout);
            if let Some(tag) = &tag {
                grpc_request
                    .metadata_mut()
                    .insert(ballast_proto::REQUEST_ID_METADATA_KEY, tag.metadata_value());
            }
            let status =
                match tokio::time::timeout(request_timeout, attempt(channel, grpc_request)).await {
                    Ok(Ok(response)) => {
                        self.routes.prefer(&route, &endpoint);
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) => retry::normalize_timeout(status),
                    Err(_elapsed) => tonic::Status::deadline_exceeded(format!(
                        "{method}: no answer within {} ms",
                        self.options.request_timeout_ms
                    )),
                };
            if let Some(leader) = retry::leader_address(&status) {
                if redirect_count < REDIRECT_COUNT_MAX
                    && leader != endpoint
                    && !self.routes.recently_unreachable(&leader)
                {
                    redirect_count += 1;
                    tracing::debug!(method, from = %endpoint, to = %leader, "following the leader");
                    self.routes.prefer(&route, &leader);
                    endpoint = leader;
                    continue;
                }
            }
            attempt_index += 1;
            let failover = retry::is_failover(&status);
            let in_failover_window = failover
                && started.elapsed() < Duration::from_millis(self.options.retry.failover_window_ms);
            if (attempt_index >= attempt_count_max && !in_failover_window)
                || !retry::should_retry(&status, idempotency)
            {
                if status.code() != tonic::Code::NotFound {
                    tracing::debug!(method, attempt_index, %status, "call failed");
                }
                return Err(ClientError::from_status(&status));
            }
            if retry::never_sent(&status) || status.code() == tonic::Code::DeadlineExceeded {
                self.routes.mark_unreachable(&endpoint);
                // That node is down or hung: try the next one we know (it redirects if needed).
                endpoint = self.routes.next_after(&endpoint);
                redirect_count = 0;
            }
            let mut backoff = self.options.retry.backoff(attempt_index - 1);
            if failover {
                backoff = backoff.min(Duration::from_millis(retry::FAILOVER_BACKOFF_MS_MAX));
            }
            tracing::warn!(method, attempt_index, backoff_ms = backoff.as_millis() as u64, %status,
                "node unavailable; retrying");
            tokio::time::sleep(backoff).await;
        }
    }

    /// One attempt of a unary call on `endpoint`: no redirects, no retries.
    async fn call_once<Request, Response, Attempt, AttemptFuture>(
        &self,
        method: &'static str,
        endpoint: &str,
        request: Request,
        attempt: Attempt,
    ) -> Result<Response, ClientError>
    where
        Attempt: FnOnce(Channel, tonic::Request<Request>) -> AttemptFuture,
        AttemptFuture: Future<Output = Result<tonic::Response<Response>, tonic::Status>>,
    {
        let channel = self.routes.channel(endpoint)?;
        let request_timeout = Duration::from_millis(self.options.request_timeout_ms);
        let mut grpc_request = tonic::Request::new(request);
        grpc_request.set_timeout(request_timeout);
        match tokio::time::timeout(request_timeout, attempt(channel, grpc_request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ClientError::from_status(&retry::normalize_timeout(status))),
            Err(_elapsed) => Err(ClientError::from_status(&tonic::Status::deadline_exceeded(
                format!(
                    "{method}: no answer within {} ms",
                    self.options.request_timeout_ms
                ),
            ))),
        }
    }

    /// The first endpoint this client was given: for a FUSE driver, the node on its own host.
    pub fn first_endpoint(&self) -> String {
        self.routes.endpoints.lock().expect("endpoints lock")[0].clone()
    }

    /// `Admin.Status` of the node at `endpoint`, one attempt.
    pub async fn status_at(&self, endpoint: &str) -> Result<proto::StatusResponse, ClientError> {
        self.call_once(
            "Status",
            endpoint,
            proto::StatusRequest {},
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.status(request).await }
            },
        )
        .await
    }

    /// `Filesystem.ReadShared` on the node at `endpoint` (the one the region is attached to),
    /// one attempt and never redirected: on any error, read with [`BallastClient::read`].
    pub async fn read_shared_at(
        &self,
        endpoint: &str,
        request: proto::ReadSharedRequest,
    ) -> Result<proto::ReadSharedResponse, ClientError> {
        self.call_once("ReadShared", endpoint, request, |channel, request| {
            let mut client = filesystem_client(channel);
            async move { client.read_shared(request).await }
        })
        .await
    }

    /// `Filesystem.WriteShared` on the node at `endpoint` (the one the region is attached to),
    /// one attempt and never redirected: on any error, write with [`BallastClient::write`]
    /// (writing the same bytes at the same offset again is harmless).
    pub async fn write_shared_at(
        &self,
        endpoint: &str,
        request: proto::WriteSharedRequest,
    ) -> Result<proto::WriteResponse, ClientError> {
        self.call_once("WriteShared", endpoint, request, |channel, request| {
            let mut client = filesystem_client(channel);
            async move { client.write_shared(request).await }
        })
        .await
    }

    // ---------------------------------------------------------------------------------------
    // Admin service.
    // ---------------------------------------------------------------------------------------

    /// Creates a volume. `quota_bytes` 0 means no quota (as the node defines it).
    pub async fn create_volume(
        &self,
        name: &str,
        quota_bytes: u64,
        replication_factor: u32,
        replication_minimum: u32,
    ) -> Result<proto::Volume, ClientError> {
        self.create_volume_placed(
            name,
            quota_bytes,
            replication_factor,
            replication_minimum,
            std::collections::BTreeMap::new(),
        )
        .await
    }

    /// Creates a volume whose replicas go only to nodes carrying every label of `node_selector`.
    pub async fn create_volume_placed(
        &self,
        name: &str,
        quota_bytes: u64,
        replication_factor: u32,
        replication_minimum: u32,
        node_selector: std::collections::BTreeMap<String, String>,
    ) -> Result<proto::Volume, ClientError> {
        self.create_volume_with(proto::CreateVolumeRequest {
            name: name.to_owned(),
            quota_bytes,
            replication_factor,
            replication_minimum,
            node_selector: node_selector.into_iter().collect(),
            labels: Default::default(),
        })
        .await
    }

    /// Creates a volume from a full request (placement selector and volume labels included).
    pub async fn create_volume_with(
        &self,
        request: proto::CreateVolumeRequest,
    ) -> Result<proto::Volume, ClientError> {
        ballast_common::validate_volume_name(&request.name)?;
        // 0 asks the cluster for its default (3, or every node of a smaller cluster).
        if request.replication_factor != 0
            && request.replication_minimum > request.replication_factor
        {
            return Err(ClientError::InvalidArgument(format!(
                "replication minimum {} exceeds replication factor {}",
                request.replication_minimum, request.replication_factor
            )));
        }
        self.call(
            "CreateVolume",
            Idempotency::SideEffecting,
            request,
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.create_volume(request).await }
            },
        )
        .await
    }

    /// Sets a volume's quota. Shrinking below the bytes in use is refused (`InvalidArgument`).
    /// Safe to repeat: the same quota twice is the same result.
    pub async fn resize_volume(
        &self,
        name: &str,
        quota_bytes: u64,
    ) -> Result<proto::Volume, ClientError> {
        ballast_common::validate_volume_name(name)?;
        let request = proto::ResizeVolumeRequest {
            name: name.to_owned(),
            quota_bytes,
        };
        self.call(
            "ResizeVolume",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.resize_volume(request).await }
            },
        )
        .await
    }

    /// Deletes a volume and everything in it.
    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        let request = proto::DeleteVolumeRequest {
            name: name.to_owned(),
        };
        self.call(
            "DeleteVolume",
            Idempotency::SideEffecting,
            request,
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.delete_volume(request).await }
            },
        )
        .await
        .map(|_| ())
    }

    /// Lists every volume of the node.
    pub async fn list_volumes(&self) -> Result<Vec<proto::Volume>, ClientError> {
        self.call(
            "ListVolumes",
            Idempotency::Idempotent,
            proto::ListVolumesRequest {},
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.list_volumes(request).await }
            },
        )
        .await
        .map(|response| response.volumes)
    }

    /// Describes one volume; NotFound (errno ENOENT) if it does not exist.
    pub async fn get_volume(&self, name: &str) -> Result<proto::Volume, ClientError> {
        let request = proto::GetVolumeRequest {
            name: name.to_owned(),
        };
        self.call(
            "GetVolume",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.get_volume(request).await }
            },
        )
        .await
    }

    /// A checksum of the answering node's replica of `name` and the index it is at. Not routed
    /// to the leader: the point is to ask each replica.
    pub async fn volume_digest(
        &self,
        name: &str,
    ) -> Result<proto::VolumeDigestResponse, ClientError> {
        self.call(
            "VolumeDigest",
            Idempotency::Idempotent,
            proto::VolumeDigestRequest {
                name: name.to_owned(),
            },
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.volume_digest(request).await }
            },
        )
        .await
    }

    /// The cluster's nodes, as the answering node's copy of the cluster map records them.
    pub async fn list_nodes(&self) -> Result<Vec<proto::NodeInfo>, ClientError> {
        self.cluster_nodes().await.map(|response| response.nodes)
    }

    /// The cluster's nodes and replication health, from the metadata leader when there is one.
    pub async fn cluster_nodes(&self) -> Result<proto::ListNodesResponse, ClientError> {
        self.call(
            "ListNodes",
            Idempotency::Idempotent,
            proto::ListNodesRequest {},
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.list_nodes(request).await }
            },
        )
        .await
    }

    /// Marks a node draining (`true`: its replicas move to other nodes) or active again.
    pub async fn drain_node(&self, node_id: u64, draining: bool) -> Result<(), ClientError> {
        self.call(
            "DrainNode",
            Idempotency::Idempotent,
            proto::DrainNodeRequest { node_id, draining },
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.drain_node(request).await }
            },
        )
        .await
        .map(|_| ())
    }

    /// Makes the answering node (give one node's address) lead the volume's replicated group;
    /// it takes over once the group is quiet, waiting at most `timeout_ms` (0: the node's
    /// default). Idempotent: a node that leads already answers at once.
    pub async fn lead_volume(
        &self,
        name: &str,
        timeout_ms: u64,
    ) -> Result<proto::LeadVolumeResponse, ClientError> {
        self.call(
            "LeadVolume",
            Idempotency::Idempotent,
            proto::LeadVolumeRequest {
                name: name.to_owned(),
                timeout_ms,
            },
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.lead_volume(request).await }
            },
        )
        .await
    }

    /// Runs a scrub pass on the answering node (the first endpoint that answers: give one
    /// node's address to scrub that node) and waits for its result. `rate_bytes_per_second` 0
    /// uses the node's configured pace. A pass over a large device takes long: connect with a
    /// `request_timeout_ms` to match.
    pub async fn scrub(&self, rate_bytes_per_second: u64) -> Result<proto::ScrubPass, ClientError> {
        self.call(
            "Scrub",
            Idempotency::Idempotent,
            proto::ScrubRequest {
                rate_bytes_per_second,
            },
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.scrub(request).await }
            },
        )
        .await
        .map(|response| response.pass.unwrap_or_default())
    }

    /// The node's identity, device usage and replicated containers.
    pub async fn status(&self) -> Result<proto::StatusResponse, ClientError> {
        self.call(
            "Status",
            Idempotency::Idempotent,
            proto::StatusRequest {},
            |channel, request| {
                let mut client = admin_client(channel);
                async move { client.status(request).await }
            },
        )
        .await
    }

    // ---------------------------------------------------------------------------------------
    // Filesystem service.
    // ---------------------------------------------------------------------------------------

    /// Finds `name` in directory `parent`.
    pub async fn lookup(
        &self,
        volume: &str,
        parent: u64,
        name: &str,
    ) -> Result<proto::Attr, ClientError> {
        ballast_common::validate_entry_name(name)?;
        let request = proto::LookupRequest {
            volume: volume.to_owned(),
            parent,
            name: name.to_owned(),
        };
        let response = self
            .call(
                "Lookup",
                Idempotency::Idempotent,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.lookup(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "EntryResponse.attr",
        })
    }

    /// Attributes of `inode`.
    pub async fn get_attr(&self, volume: &str, inode: u64) -> Result<proto::Attr, ClientError> {
        let request = proto::GetAttrRequest {
            volume: volume.to_owned(),
            inode,
        };
        let response = self
            .call(
                "GetAttr",
                Idempotency::Idempotent,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.get_attr(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "AttrResponse.attr",
        })
    }

    /// Changes the attributes set in `request` (mode, owner, size, times); returns the result.
    pub async fn set_attr(
        &self,
        request: proto::SetAttrRequest,
    ) -> Result<proto::Attr, ClientError> {
        if let Some(mode) = request.mode {
            if mode & !0o7777 != 0 {
                return Err(ClientError::InvalidArgument(format!(
                    "mode {mode:#o} has bits outside the permission bits 07777"
                )));
            }
        }
        let response = self
            .call(
                "SetAttr",
                Idempotency::Idempotent,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.set_attr(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "AttrResponse.attr",
        })
    }

    /// Creates a file, directory or symlink as described by `request`; returns its attributes.
    pub async fn create(&self, request: proto::CreateRequest) -> Result<proto::Attr, ClientError> {
        ballast_common::validate_entry_name(&request.name)?;
        if request.mode & !0o7777 != 0 {
            return Err(ClientError::InvalidArgument(format!(
                "mode {:#o} has bits outside the permission bits 07777",
                request.mode
            )));
        }
        let is_symlink = request.kind == proto::EntryKind::Symlink as i32;
        if is_symlink == request.symlink_target.is_empty() {
            return Err(ClientError::InvalidArgument(
                "a symlink target is required for symlinks and only for them".to_owned(),
            ));
        }
        let response = self
            .call(
                "Create",
                Idempotency::SideEffecting,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.create(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "EntryResponse.attr",
        })
    }

    /// Adds a hard link `new_parent/new_name` to `inode`; returns the inode's new attributes.
    pub async fn link(
        &self,
        volume: &str,
        inode: u64,
        new_parent: u64,
        new_name: &str,
    ) -> Result<proto::Attr, ClientError> {
        ballast_common::validate_entry_name(new_name)?;
        let request = proto::LinkRequest {
            volume: volume.to_owned(),
            inode,
            new_parent,
            new_name: new_name.to_owned(),
        };
        let response = self
            .call(
                "Link",
                Idempotency::SideEffecting,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.link(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "EntryResponse.attr",
        })
    }

    /// Removes `parent/name` (`directory`: rmdir semantics). The response says whether the inode
    /// became an orphan that must be purged once its last open handle closes.
    pub async fn unlink(
        &self,
        volume: &str,
        parent: u64,
        name: &str,
        directory: bool,
    ) -> Result<proto::UnlinkResponse, ClientError> {
        ballast_common::validate_entry_name(name)?;
        let request = proto::UnlinkRequest {
            volume: volume.to_owned(),
            parent,
            name: name.to_owned(),
            directory,
        };
        self.call(
            "Unlink",
            Idempotency::SideEffecting,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.unlink(request).await }
            },
        )
        .await
    }

    /// Renames `parent/name` to `new_parent/new_name`. `flags` are Linux `renameat2` flags
    /// (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2).
    pub async fn rename(
        &self,
        volume: &str,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        flags: u32,
    ) -> Result<proto::RenameResponse, ClientError> {
        ballast_common::validate_entry_name(name)?;
        ballast_common::validate_entry_name(new_name)?;
        let request = proto::RenameRequest {
            volume: volume.to_owned(),
            parent,
            name: name.to_owned(),
            new_parent,
            new_name: new_name.to_owned(),
            flags,
        };
        self.call(
            "Rename",
            Idempotency::SideEffecting,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.rename(request).await }
            },
        )
        .await
    }

    /// Up to `entry_count_max` entries of directory `inode` after `cookie` (0: from the start).
    pub async fn read_dir(
        &self,
        volume: &str,
        inode: u64,
        cookie: u64,
        entry_count_max: u32,
    ) -> Result<proto::ReadDirResponse, ClientError> {
        let request = proto::ReadDirRequest {
            volume: volume.to_owned(),
            inode,
            cookie,
            entry_count_max,
        };
        self.call(
            "ReadDir",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.read_dir(request).await }
            },
        )
        .await
    }

    /// The target of symlink `inode`.
    pub async fn read_link(&self, volume: &str, inode: u64) -> Result<String, ClientError> {
        let request = proto::ReadLinkRequest {
            volume: volume.to_owned(),
            inode,
        };
        self.call(
            "ReadLink",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.read_link(request).await }
            },
        )
        .await
        .map(|response| response.target)
    }

    /// Up to `length_bytes` bytes of `inode` from `offset_bytes`; shorter only at end of file.
    pub async fn read(
        &self,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        length_bytes: u32,
    ) -> Result<Bytes, ClientError> {
        let request = proto::ReadRequest {
            volume: volume.to_owned(),
            inode,
            offset_bytes,
            length_bytes,
        };
        self.call(
            "Read",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.read(request).await }
            },
        )
        .await
        .map(|response| response.data)
    }

    /// Writes `data` at `offset_bytes` of `inode`. Not retried once sent: a concurrent write to
    /// the same range could land between the two attempts and be overwritten by the repeat.
    /// Writes `data` at `offset_bytes`. With `durable`, the node answers only once the write is
    /// durable (its answer's `durable` says whether it was: a node that predates the field
    /// answers `false`).
    pub async fn write(
        &self,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        data: Bytes,
        durable: bool,
    ) -> Result<proto::WriteResponse, ClientError> {
        if data.len() > MESSAGE_SIZE_BYTES_MAX - 4096 {
            return Err(ClientError::InvalidArgument(format!(
                "write of {} bytes exceeds the message limit",
                data.len()
            )));
        }
        let request = proto::WriteRequest {
            volume: volume.to_owned(),
            inode,
            offset_bytes,
            data,
            durable,
        };
        self.call(
            "Write",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.write(request).await }
            },
        )
        .await
    }

    /// Allocates (or with PUNCH_HOLE = 2, deallocates) a range; `mode` carries Linux
    /// FALLOC_FL_* bits (KEEP_SIZE = 1). An allocation is sent in pieces of at most
    /// [`FALLOCATE_BYTES_PER_REQUEST_MAX`], in order: each piece is one state-machine command
    /// whose batch grows with its length. Every piece but the last keeps the size, so the file
    /// grows only when the whole range is allocated: the kernel, which keeps the size of a
    /// failed fallocate, and the node agree. A failure part-way leaves the earlier pieces
    /// allocated past the end of the file, as Linux allows for fallocate.
    pub async fn fallocate(
        &self,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        length_bytes: u64,
        mode: u32,
    ) -> Result<proto::Attr, ClientError> {
        const KEEP_SIZE: u32 = 1;
        const PUNCH_HOLE: u32 = 2;
        let end = offset_bytes.saturating_add(length_bytes);
        let piece = |piece_offset: u64, piece_end: u64, piece_mode: u32| proto::FallocateRequest {
            volume: volume.to_owned(),
            inode,
            offset_bytes: piece_offset,
            length_bytes: piece_end - piece_offset,
            mode: piece_mode,
        };
        if mode & PUNCH_HOLE != 0 || length_bytes <= FALLOCATE_BYTES_PER_REQUEST_MAX {
            return self.fallocate_once(piece(offset_bytes, end, mode)).await;
        }
        let mut piece_offset = offset_bytes;
        loop {
            let piece_end = end.min(piece_offset.saturating_add(FALLOCATE_BYTES_PER_REQUEST_MAX));
            let piece_mode = if piece_end == end {
                mode
            } else {
                mode | KEEP_SIZE
            };
            let attr = self
                .fallocate_once(piece(piece_offset, piece_end, piece_mode))
                .await?;
            if piece_end == end {
                return Ok(attr);
            }
            piece_offset = piece_end;
        }
    }

    async fn fallocate_once(
        &self,
        request: proto::FallocateRequest,
    ) -> Result<proto::Attr, ClientError> {
        let response = self
            .call(
                "Fallocate",
                Idempotency::Idempotent,
                request,
                |channel, request| {
                    let mut client = filesystem_client(channel);
                    async move { client.fallocate(request).await }
                },
            )
            .await?;
        response.attr.ok_or(ClientError::MissingField {
            field: "AttrResponse.attr",
        })
    }

    /// Makes everything written to `inode` durable (`data_only`: as fdatasync).
    pub async fn fsync(
        &self,
        volume: &str,
        inode: u64,
        data_only: bool,
    ) -> Result<(), ClientError> {
        let request = proto::FsyncRequest {
            volume: volume.to_owned(),
            inode,
            data_only,
        };
        self.call(
            "Fsync",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.fsync(request).await }
            },
        )
        .await
        .map(|_| ())
    }

    /// Capacity and usage of a volume.
    pub async fn stat_fs(&self, volume: &str) -> Result<proto::StatFsResponse, ClientError> {
        let request = proto::StatFsRequest {
            volume: volume.to_owned(),
        };
        self.call(
            "StatFs",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.stat_fs(request).await }
            },
        )
        .await
    }

    /// Frees orphan `inode` (nlink 0, no open handle), or with `inode` 0 every orphan of the
    /// volume; returns how many were freed. Idempotent: an orphan already freed is not counted.
    pub async fn purge_orphans(&self, volume: &str, inode: u64) -> Result<u64, ClientError> {
        let request = proto::PurgeOrphansRequest {
            volume: volume.to_owned(),
            inode,
        };
        self.call(
            "PurgeOrphans",
            Idempotency::Idempotent,
            request,
            |channel, request| {
                let mut client = filesystem_client(channel);
                async move { client.purge_orphans(request).await }
            },
        )
        .await
        .map(|response| response.purged_count)
    }
}

/// A session id unlikely to repeat across processes and restarts: the clock, the process id and
/// a per-process counter, mixed.
fn new_session() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    let mut value = now_ns
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // SplitMix64 finaliser: spreads the bits.
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

fn admin_client(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel)
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX)
}

fn filesystem_client(channel: Channel) -> FilesystemClient<Channel> {
    FilesystemClient::new(channel)
        .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_validated() {
        let options = ClientOptions::default();
        assert!(matches!(
            BallastClient::connect_lazy("127.0.0.1:7400", options),
            Err(ClientError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn lazy_clients_accept_tcp_and_unix_endpoints() {
        let options = ClientOptions::default();
        assert!(BallastClient::connect_lazy("http://127.0.0.1:7400", options).is_ok());
        assert!(BallastClient::connect_lazy("unix:/tmp/ballast.sock", options).is_ok());
    }

    #[tokio::test]
    async fn invalid_names_fail_before_sending() {
        let client =
            BallastClient::connect_lazy("http://127.0.0.1:1", ClientOptions::default()).unwrap();
        let error = client.lookup("demo", ROOT_INODE, "a/b").await.unwrap_err();
        assert_eq!(error.errno(), Errno::EINVAL);
        let error = client.create_volume("Bad_Name", 0, 1, 1).await.unwrap_err();
        assert!(matches!(error, ClientError::InvalidName(_)));
    }

    #[tokio::test]
    async fn refused_connections_are_retried_then_reported_as_eio() {
        // Port 1 on loopback: nothing listens there, so every attempt is refused quickly.
        let options = ClientOptions {
            connect_timeout_ms: 500,
            request_timeout_ms: 2_000,
            retry: RetryPolicy {
                attempt_count_max: 3,
                backoff_initial_ms: 1,
                backoff_max_ms: 2,
                failover_window_ms: 0,
            },
        };
        let client = BallastClient::connect_lazy("http://127.0.0.1:1", options).unwrap();
        let error = client
            .write("demo", 2, 0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error}");
        assert_eq!(error.errno(), Errno::EIO);
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    #[tokio::test]
    async fn refused_connection_is_recognised_as_never_sent() {
        // Guards the retry policy against tonic changing how it reports connect failures.
        let client =
            BallastClient::connect_lazy("http://127.0.0.1:1", ClientOptions::default()).unwrap();
        let status = filesystem_client(client.routes.channel("http://127.0.0.1:1").unwrap())
            .get_attr(proto::GetAttrRequest {
                volume: "demo".to_owned(),
                inode: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(retry::never_sent(&status), "{status:?}");
    }
}
