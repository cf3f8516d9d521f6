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

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP port that accepts connections (the kernel completes the handshake) but never
    /// answers: a hung Ballast node.
    fn silent_endpoint() -> (std::net::TcpListener, String) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        (listener, endpoint)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_cluster_costs_one_deadline_per_ttl() {
        let (_listener, endpoint) = silent_endpoint();
        let timeout = Duration::from_millis(300);
        let source = Arc::new(
            PlacementSource::new(
                &endpoint,
                "kubernetes.io/hostname",
                Duration::from_secs(60),
                timeout,
            )
            .unwrap(),
        );
        // Four concurrent calls during the first listing are all answered within about one
        // deadline (they wait for the one listing in flight, not each for its own in turn).
        let started = Instant::now();
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let source = Arc::clone(&source);
                tokio::spawn(async move { source.placement().await })
            })
            .collect();
        for call in calls {
            let result = call.await.unwrap();
            assert!(
                matches!(
                    result,
                    Err(ExtenderError::BallastTimeout { .. } | ExtenderError::BallastUnavailable(_))
                ),
                "{result:?}"
            );
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= timeout,
            "answered before the deadline: {elapsed:?}"
        );
        assert!(
            elapsed < timeout * 3,
            "concurrent calls each waited for a listing: {elapsed:?}"
        );
        // Within the TTL the failure is answered from the cache, at once.
        let started = Instant::now();
        assert!(source.placement().await.is_err());
        assert!(started.elapsed() < timeout / 3, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_zero_ttl_lists_every_time_and_bad_settings_are_refused() {
        let (_listener, endpoint) = silent_endpoint();
        let timeout = Duration::from_millis(100);
        let source =
            PlacementSource::new(&endpoint, "kubernetes.io/hostname", Duration::ZERO, timeout)
                .unwrap();
        for _ in 0..2 {
            let started = Instant::now();
            assert!(source.placement().await.is_err());
            assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        }
        assert!(matches!(
            PlacementSource::new(&endpoint, "k", Duration::ZERO, Duration::ZERO),
            Err(ExtenderError::Configuration(_))
        ));
        assert!(matches!(
            PlacementSource::new("ftp://nowhere", "k", Duration::ZERO, timeout),
            Err(ExtenderError::Configuration(_))
        ));
    }
}
