//! The extender's view of the Ballast cluster: one listing of volumes and nodes, fetched with a
//! deadline and cached for a short time.
//!
//! Owns: the calls to Ballast (`ListVolumes`, `ListNodes` through `ballast-client`), their
//! deadline, and the cache.
//! Must not depend on: storage-node internals (only `ballast-client`), the HTTP server.
//! Invariants:
//! - At most one listing is in flight: concurrent requests during a refresh wait for it
//!   instead of sending their own (a scheduling burst costs one pair of calls per TTL).
//! - Every fetch ends within `timeout` (client retries included), so a handler answers well
//!   inside kube-scheduler's `httpTimeout`.
//! - A failed fetch is cached for the TTL too: while Ballast is down, requests are answered at
//!   once from the failure instead of each waiting out the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_client::{BallastClient, ClientOptions, RetryPolicy};

use crate::placement::ClusterPlacement;
use crate::ExtenderError;

/// A cached listing and when it was fetched.
#[derive(Debug)]
struct CachedListing {
    fetched_at: Instant,
    result: Result<Arc<ClusterPlacement>, String>,
}

/// Where [`ClusterPlacement`]s come from.
#[derive(Debug)]
pub struct PlacementSource {
    client: BallastClient,
    node_name_label: String,
    cache_ttl: Duration,
    timeout: Duration,
    cached: tokio::sync::Mutex<Option<CachedListing>>,
}

impl PlacementSource {
    /// A source reading `endpoints` (comma-separated, as `ballast-client` takes them); no
    /// connection is made before the first request.
    pub fn new(
        endpoints: &str,
        node_name_label: &str,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, ExtenderError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if timeout_ms == 0 {
            return Err(ExtenderError::Configuration(
                "the Ballast timeout must be at least 1 ms".to_owned(),
            ));
        }
        // A short leash: the outer deadline bounds the whole fetch anyway, and the client's
        // retries must fit inside it.
        let options = ClientOptions {
            connect_timeout_ms: timeout_ms,
            request_timeout_ms: timeout_ms,
            retry: RetryPolicy {
                attempt_count_max: 3,
                backoff_initial_ms: 50,
                backoff_max_ms: 200,
                failover_window_ms: timeout_ms,
            },
        };
        let client = BallastClient::connect_lazy(endpoints, options)
            .map_err(|error| ExtenderError::Configuration(error.to_string()))?;
        Ok(Self {
            client,
            node_name_label: node_name_label.to_owned(),
            cache_ttl,
            timeout,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The current placement: cached if younger than the TTL, otherwise fetched now.
    pub async fn placement(&self) -> Result<Arc<ClusterPlacement>, ExtenderError> {
        let mut cached = self.cached.lock().await;
        if let Some(listing) = cached.as_ref() {
            if listing.fetched_at.elapsed() < self.cache_ttl {
                return listing
                    .result
                    .clone()
                    .map_err(ExtenderError::BallastUnavailable);
            }
        }
        let result = self.fetch().await;
        *cached = Some(CachedListing {
            fetched_at: Instant::now(),
            result: result.as_ref().map(Arc::clone).map_err(ToString::to_string),
        });
        result
    }

    async fn fetch(&self) -> Result<Arc<ClusterPlacement>, ExtenderError> {
        let listing =
            async { tokio::try_join!(self.client.list_volumes(), self.client.list_nodes()) };
        match tokio::time::timeout(self.timeout, listing).await {
            Err(_) => Err(ExtenderError::BallastTimeout {
                timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            Ok(Err(error)) => Err(ExtenderError::BallastUnavailable(error.to_string())),
            Ok(Ok((volumes, nodes))) => Ok(Arc::new(ClusterPlacement::from_listing(
                &volumes,
                &nodes,
                &self.node_name_label,
            ))),
        }
    }
}
