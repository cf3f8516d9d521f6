//! The kube-scheduler extender wire protocol (`k8s.io/kube-scheduler/extender/v1`): parsing
//! `ExtenderArgs`, and the `ExtenderFilterResult` and `HostPriorityList` answers.
//!
//! Owns: field names and spellings, the candidate-node forms (`Nodes` as a v1 NodeList, or
//! `NodeNames`), and the answer shapes.
//! Must not depend on: Ballast (client, placement) or the HTTP server.
//! Invariants:
//! - Field names are matched case-insensitively, as Go's `encoding/json` does when
//!   kube-scheduler decodes: today's scheduler sends `Pod`, `Nodes`, `NodeNames` (struct
//!   fields without JSON tags); older ones sent `pod`, `nodes`, `nodenames`. A field given
//!   twice in two spellings is refused; `null` counts as absent; unknown fields are ignored.
//! - Every Kubernetes-shaped object is a `k8s-openapi` type (`Pod`, `Node`, `NodeList`).
//! - Anything that is not a well-formed ExtenderArgs is [`ExtenderError::MalformedRequest`],
//!   with a message naming the field; parsing never panics (fuzzed: `fuzz/fuzz_targets/
//!   extender_args.rs`).
//! - Answers use today's spellings (`NodeNames`, `FailedNodes`, `Host`, `Score`); Go decodes
//!   them case-insensitively, so old schedulers read them too. A filter answer carries the
//!   same candidate form(s) the request did.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::List;
use serde::Serialize;

use crate::ExtenderError;

/// A v1 NodeList, as the scheduler sends it when `nodeCacheCapable` is false.
pub type NodeList = List<Node>;

/// Highest score an extender may give (`MaxExtenderPriority`); the lowest is 0.
pub const SCORE_MAX: i64 = 10;

/// The arguments of a `filter` or `prioritize` call.
#[derive(Debug, Clone)]
pub struct ExtenderArgs {
    /// The pod being scheduled.
    pub pod: Pod,
    /// Candidate nodes as whole objects (`nodeCacheCapable: false`).
    pub nodes: Option<NodeList>,
    /// Candidate nodes by name (`nodeCacheCapable: true`).
    pub node_names: Option<Vec<String>>,
}

impl ExtenderArgs {
    /// Parses a request body.
    pub fn parse(body: &[u8]) -> Result<Self, ExtenderError> {
        let document: serde_json::Value = serde_json::from_slice(body).map_err(|error| {
            ExtenderError::MalformedRequest(format!("the body is not JSON: {error}"))
        })?;
        let serde_json::Value::Object(fields) = document else {
            return Err(ExtenderError::MalformedRequest(
                "the body must be a JSON object with the fields Pod and Nodes or NodeNames"
                    .to_owned(),
            ));
        };
        let mut pod: Option<(String, serde_json::Value)> = None;
        let mut nodes: Option<(String, serde_json::Value)> = None;
        let mut node_names: Option<(String, serde_json::Value)> = None;
        for (key, value) in fields {
            let slot = match key.to_ascii_lowercase().as_str() {
                "pod" => &mut pod,
                "nodes" => &mut nodes,
                "nodenames" => &mut node_names,
                _ => continue,
            };
            if value.is_null() {
                continue;
            }
            if let Some((first, _)) = slot {
                return Err(ExtenderError::MalformedRequest(format!(
                    "fields {first:?} and {key:?} are the same field in two spellings"
                )));
            }
            *slot = Some((key, value));
        }

        let Some((pod_key, pod_value)) = pod else {
            return Err(ExtenderError::MalformedRequest(
                "no Pod (or pod) field".to_owned(),
            ));
        };
        let pod: Pod = serde_json::from_value(pod_value).map_err(|error| {
            ExtenderError::MalformedRequest(format!("field {pod_key}: not a v1 Pod: {error}"))
        })?;

        let nodes = match nodes {
            None => None,
            Some((key, value)) => {
                let list: NodeList = serde_json::from_value(value).map_err(|error| {
                    ExtenderError::MalformedRequest(format!(
                        "field {key}: not a v1 NodeList: {error}"
                    ))
                })?;
                if let Some(index) = list
                    .items
                    .iter()
                    .position(|node| node.metadata.name.as_deref().unwrap_or("").is_empty())
                {
                    return Err(ExtenderError::MalformedRequest(format!(
                        "field {key}: items[{index}] has no metadata.name"
                    )));
                }
                Some(list)
            }
        };
        let node_names = match node_names {
            None => None,
            Some((key, value)) => Some(serde_json::from_value::<Vec<String>>(value).map_err(
                |error| {
                    ExtenderError::MalformedRequest(format!(
                        "field {key}: not a list of node names: {error}"
                    ))
                },
            )?),
        };
        if nodes.is_none() && node_names.is_none() {
            return Err(ExtenderError::MalformedRequest(
                "no candidate nodes: neither Nodes (nodes) nor NodeNames (nodenames) is given"
                    .to_owned(),
            ));
        }
        Ok(Self {
            pod,
            nodes,
            node_names,
        })
    }

    /// The candidate node names, each once, in the order given (`NodeNames` first, then the
    /// names of `Nodes` not listed there).
    pub fn candidate_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        let listed = self.node_names.iter().flatten().map(String::as_str);
        let objects = self
            .nodes
            .iter()
            .flat_map(|list| list.items.iter())
            .filter_map(|node| node.metadata.name.as_deref());
        for name in listed.chain(objects) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// `namespace/name` of the pod, for logs.
    pub fn pod_description(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.name.as_deref().unwrap_or("")
        )
    }

    /// The filter answer that keeps the nodes for which `failure` is `None` and rejects the
    /// others with its message, in the candidate form(s) of this request.
    pub fn filter_result(&self, failure: impl Fn(&str) -> Option<String>) -> ExtenderFilterResult {
        let mut failed_and_unresolvable_nodes = BTreeMap::new();
        let mut passes = |name: &str| match failure(name) {
            None => true,
            Some(reason) => {
                failed_and_unresolvable_nodes.insert(name.to_owned(), reason);
                false
            }
        };
        let node_names = self.node_names.as_ref().map(|names| {
            names
                .iter()
                .filter(|name| passes(name))
                .cloned()
                .collect::<Vec<_>>()
        });
        let nodes = self.nodes.as_ref().map(|list| NodeList {
            items: list
                .items
                .iter()
                .filter(|node| passes(node.metadata.name.as_deref().unwrap_or("")))
                .cloned()
                .collect(),
            metadata: list.metadata.clone(),
        });
        ExtenderFilterResult {
            nodes,
            node_names,
            failed_nodes: BTreeMap::new(),
            failed_and_unresolvable_nodes,
            error: String::new(),
        }
    }
}

/// The answer to `filter`.
#[derive(Debug, Clone, Serialize)]
pub struct ExtenderFilterResult {
    /// The nodes that pass, when the request sent `Nodes`.
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// The nodes that pass, when the request sent `NodeNames`.
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    /// Rejected nodes that preemption might make fit. The extender never uses it: evicting
    /// pods does not move data.
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Rejected nodes that preemption cannot help, with the reason.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// Empty: the extender degrades instead of failing a call.
    #[serde(rename = "Error")]
    pub error: String,
}

/// One entry of the answer to `prioritize` (a `HostPriorityList` is a JSON array of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    /// 0..=[`SCORE_MAX`].
    #[serde(rename = "Score")]
    pub score: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as kube-scheduler serialises it (no apiVersion/kind: informer objects carry none).
    fn pod_json() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "mysql-0", "namespace": "shop", "uid": "1b4e28ba",
                         "creationTimestamp": null},
            "spec": {
                "containers": [{"name": "mysql", "image": "mariadb:11", "resources": {}}],
                "volumes": [
                    {"name": "data", "persistentVolumeClaim": {"claimName": "data-mysql-0"}},
                    {"name": "config", "configMap": {"name": "mysql"}}
                ]
            },
            "status": {"phase": "Pending"}
        })
    }

    fn node_json(name: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"capacity": {"cpu": "4"}}
        })
    }

    #[test]
    fn todays_spelling_with_node_names() {
        let body = serde_json::json!({
            "Pod": pod_json(),
            "Nodes": null,
            "NodeNames": ["worker-1", "worker-2"]
        });
        let args = ExtenderArgs::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(args.pod.metadata.name.as_deref(), Some("mysql-0"));
        assert!(args.nodes.is_none());
        assert_eq!(args.candidate_names(), ["worker-1", "worker-2"]);
        assert_eq!(args.pod_description(), "shop/mysql-0");
    }

    #[test]
    fn old_spelling_with_a_node_list() {
        let body = serde_json::json!({
            "pod": pod_json(),
            "nodes": {"metadata": {}, "items": [node_json("a"), node_json("b")]}
        });
        let args = ExtenderArgs::parse(body.to_string().as_bytes()).unwrap();
        assert!(args.node_names.is_none());
        assert_eq!(args.candidate_names(), ["a", "b"]);
        // A NodeList with apiVersion and kind (as a client may send it) parses too.
        let body = serde_json::json!({
            "Pod": pod_json(),
            "Nodes": {"apiVersion": "v1", "kind": "NodeList", "items": [node_json("c")]}
        });
        let args = ExtenderArgs::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(args.candidate_names(), ["c"]);
    }

    #[test]
    fn field_names_are_case_insensitive_like_go() {
        let body = serde_json::json!({"POD": pod_json(), "nodeNames": ["x"], "Extra": 1});
        let args = ExtenderArgs::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(args.candidate_names(), ["x"]);
    }

    #[test]
    fn malformed_bodies_are_refused_with_the_field_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "not JSON"),
            (b"[]".to_vec(), "JSON object"),
            (br#"{"NodeNames": ["a"]}"#.to_vec(), "no Pod"),
            (
                serde_json::json!({"Pod": pod_json()})
                    .to_string()
                    .into_bytes(),
                "no candidate nodes",
            ),
            (
                serde_json::json!({"Pod": 5, "NodeNames": []})
                    .to_string()
                    .into_bytes(),
                "field Pod",
            ),
            (
                serde_json::json!({"Pod": {"kind": "Node"}, "NodeNames": []})
                    .to_string()
                    .into_bytes(),
                "not a v1 Pod",
            ),
            (
                serde_json::json!({"Pod": pod_json(), "nodenames": "a"})
                    .to_string()
                    .into_bytes(),
                "field nodenames",
            ),
            (
                serde_json::json!({"Pod": pod_json(), "Nodes": {"items": [{"metadata": {}}]}})
                    .to_string()
                    .into_bytes(),
                "items[0] has no metadata.name",
            ),
            (
                serde_json::json!({"Pod": pod_json(), "pod": pod_json(), "NodeNames": []})
                    .to_string()
                    .into_bytes(),
                "two spellings",
            ),
        ];
        for (body, expected) in cases {
            match ExtenderArgs::parse(&body) {
                Err(ExtenderError::MalformedRequest(message)) => assert!(
                    message.contains(expected),
                    "{:?}: {message:?} lacks {expected:?}",
                    String::from_utf8_lossy(&body)
                ),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&body)),
            }
        }
    }

    #[test]
    fn filter_answers_in_the_form_asked() {
        let body = serde_json::json!({
            "Pod": pod_json(),
            "Nodes": {"items": [node_json("a"), node_json("b")]},
            "NodeNames": ["a", "b"]
        });
        let args = ExtenderArgs::parse(body.to_string().as_bytes()).unwrap();
        let result = args.filter_result(|name| (name == "b").then(|| "no data".to_owned()));
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["NodeNames"], serde_json::json!(["a"]));
        assert_eq!(json["Nodes"]["items"][0]["metadata"]["name"], "a");
        assert_eq!(json["Nodes"]["items"].as_array().unwrap().len(), 1);
        assert_eq!(
            json["FailedAndUnresolvableNodes"],
            serde_json::json!({"b": "no data"})
        );
        assert_eq!(json["FailedNodes"], serde_json::json!({}));
        assert_eq!(json["Error"], "");

        let names_only = ExtenderArgs::parse(
            serde_json::json!({"Pod": pod_json(), "NodeNames": ["a"]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let json = serde_json::to_value(names_only.filter_result(|_| None)).unwrap();
        assert!(json.get("Nodes").is_none());
        assert_eq!(json["NodeNames"], serde_json::json!(["a"]));
    }
}
