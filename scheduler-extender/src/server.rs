//! The HTTP service: `POST /filter`, `POST /prioritize`, `GET /healthz`.
//!
//! Owns: routing, the request body limit, the filter policy, and the degraded answers when
//! Ballast cannot be asked.
//! Must not depend on: storage-node internals; Ballast is reached only through
//! [`PlacementSource`].
//! Invariants:
//! - A malformed body is HTTP 400 with a plain-text message; a body over the limit is 413.
//! - Ballast trouble never fails a call (locality is a preference): filter passes every node
//!   and prioritize scores every node 0, with a warning in the log.
//! - Pods without Ballast volumes, and `filter` under the `prefer` policy, never cause a call
//!   to Ballast.
//! - Prioritize answers one entry per candidate node, in the candidates' order.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::placement::{claims_of, ClusterPlacement};
use crate::protocol::{ExtenderArgs, HostPriority};
use crate::source::PlacementSource;
use crate::ExtenderError;

/// What `filter` does with nodes that hold no replica of the pod's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FilterPolicy {
    /// Pass every node; locality comes only from the scores of `prioritize`.
    Prefer,
    /// Pass only nodes holding a replica of every Ballast volume of the pod.
    Require,
}

/// Shared state of the handlers.
#[derive(Debug)]
pub struct ExtenderState {
    pub source: PlacementSource,
    pub filter_policy: FilterPolicy,
}

/// The router, with `request_body_limit_bytes` on every request body.
pub fn router(state: Arc<ExtenderState>, request_body_limit_bytes: usize) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(request_body_limit_bytes))
        .with_state(state)
}

fn json_response<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {error}"),
        )
            .into_response(),
    }
}

fn error_response(error: &ExtenderError) -> Response {
    (error.status_code(), format!("{error}\n")).into_response()
}

/// The placement for a pod's request, or `None` (logged) when Ballast cannot be asked.
async fn placement_for(
    state: &ExtenderState,
    args: &ExtenderArgs,
) -> Option<Arc<ClusterPlacement>> {
    match state.source.placement().await {
        Ok(placement) => Some(placement),
        Err(error) => {
            tracing::warn!(pod = %args.pod_description(), %error,
                "no Ballast placement; answering without locality");
            None
        }
    }
}

async fn filter(State(state): State<Arc<ExtenderState>>, body: Bytes) -> Response {
    let args = match ExtenderArgs::parse(&body) {
        Ok(args) => args,
        Err(error) => return error_response(&error),
    };
    let claims = claims_of(&args.pod);
    if state.filter_policy == FilterPolicy::Prefer || claims.is_empty() {
        return json_response(&args.filter_result(|_| None));
    }
    let Some(placement) = placement_for(&state, &args).await else {
        return json_response(&args.filter_result(|_| None));
    };
    let volumes = placement.volumes_of(&claims);
    let result = args.filter_result(|node| placement.missing_replicas(&volumes, node));
    tracing::debug!(pod = %args.pod_description(), volumes = volumes.len(),
        rejected = result.failed_and_unresolvable_nodes.len(), "filter");
    json_response(&result)
}

async fn prioritize(State(state): State<Arc<ExtenderState>>, body: Bytes) -> Response {
    let args = match ExtenderArgs::parse(&body) {
        Ok(args) => args,
        Err(error) => return error_response(&error),
    };
    let names = args.candidate_names();
    let claims = claims_of(&args.pod);
    let placement = if claims.is_empty() {
        None
    } else {
        placement_for(&state, &args).await
    };
    let volumes = placement
        .as_ref()
        .map(|placement| placement.volumes_of(&claims))
        .unwrap_or_default();
    let priorities: Vec<HostPriority> = names
        .iter()
        .map(|name| HostPriority {
            host: (*name).to_owned(),
            score: placement
                .as_ref()
                .map_or(0, |placement| placement.score(&volumes, name)),
        })
        .collect();
    tracing::debug!(pod = %args.pod_description(), volumes = volumes.len(),
        ?priorities, "prioritize");
    json_response(&priorities)
}

async fn healthz() -> &'static str {
    "ok\n"
}
