//! StorageClass parameters of the `csi.ballast.io` driver, parsed and validated.
//!
//! Owns: the parameter names and their rules, and the volume context a created volume carries.
//!
//! | parameter            | meaning                                  | default |
//! |----------------------|------------------------------------------|---------|
//! | `replication`        | replication factor (rf)                  | 1       |
//! | `replicationMinimum` | replicas a write needs                   | 1       |
//! | `nodeSelector`       | node labels for placement, `k=v,k2=v2`   | none    |
//!
//! Must not depend on: the services or the storage node.
//! Invariants:
//! - Keys under `csi.storage.k8s.io/` belong to the sidecars (PVC name, namespace, fs type,
//!   secrets) and are never placement parameters; any other unknown key is refused, so a typo
//!   in a StorageClass fails loudly instead of being silently dropped.
//! - The PVC and PV names that external-provisioner adds with `--extra-create-metadata`
//!   (`ballast_client::volume_labels::FROM_PROVISIONER`) become labels of the Ballast volume:
//!   the scheduler extender finds a pod's volumes by them. The other sidecar keys are ignored.
//! - `nodeSelector` is validated with Kubernetes label syntax, recorded in the volume context
//!   (visible on the PV) and passed to the storage cluster, which places the volume's replicas
//!   only on storage nodes carrying every label (too few such nodes: `RESOURCE_EXHAUSTED`).

use std::collections::HashMap;

use ballast_client::volume_labels;

use crate::CsiError;

pub const REPLICATION: &str = "replication";
pub const REPLICATION_MINIMUM: &str = "replicationMinimum";
pub const NODE_SELECTOR: &str = "nodeSelector";

/// Prefix of the parameters the Kubernetes sidecars add or reserve.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Highest replication factor accepted; more copies than this is a configuration mistake.
pub const REPLICATION_FACTOR_MAX: u32 = 7;

/// Longest label name or value (Kubernetes rule).
const LABEL_PART_LENGTH_MAX: usize = 63;
/// Longest label key prefix, a DNS subdomain (Kubernetes rule).
const LABEL_PREFIX_LENGTH_MAX: usize = 253;

/// Validated parameters of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParameters {
    pub replication_factor: u32,
    pub replication_minimum: u32,
    /// Label requirements in the order given, each `(key, value)`.
    pub node_selector: Vec<(String, String)>,
    /// Labels for the Ballast volume (PVC namespace and name, PV name), sorted by key.
    pub volume_labels: Vec<(String, String)>,
}

impl Default for VolumeParameters {
    fn default() -> Self {
        Self {
            replication_factor: 1,
            replication_minimum: 1,
            node_selector: Vec::new(),
            volume_labels: Vec::new(),
        }
    }
}

impl VolumeParameters {
    /// Parses StorageClass parameters.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, CsiError> {
        let mut result = Self::default();
        // Sorted so that the first error reported does not depend on hash order.
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort();
        for key in keys {
            let value = &parameters[key];
            match key.as_str() {
                REPLICATION => result.replication_factor = parse_count(key, value)?,
                REPLICATION_MINIMUM => result.replication_minimum = parse_count(key, value)?,
                NODE_SELECTOR => result.node_selector = parse_node_selector(value)?,
                _ if volume_labels::FROM_PROVISIONER.contains(&key.as_str()) => {
                    result.volume_labels.push((key.clone(), value.clone()));
                }
                _ if key.starts_with(SIDECAR_PREFIX) => {}
                _ => {
                    return Err(CsiError::InvalidArgument(format!(
                        "unknown StorageClass parameter {key:?}; known: {REPLICATION}, \
                         {REPLICATION_MINIMUM}, {NODE_SELECTOR}"
                    )))
                }
            }
        }
        if result.replication_minimum > result.replication_factor {
            return Err(CsiError::InvalidArgument(format!(
                "{REPLICATION_MINIMUM} {} exceeds {REPLICATION} {}",
                result.replication_minimum, result.replication_factor
            )));
        }
        Ok(result)
    }

    /// `nodeSelector` in canonical form (`k=v,k2=v2`), empty when there is none.
    pub fn node_selector_text(&self) -> String {
        self.node_selector
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The volume context returned by CreateVolume (and so stored on the PV).
    pub fn volume_context(&self) -> HashMap<String, String> {
        let mut context = HashMap::new();
        context.insert(REPLICATION.to_owned(), self.replication_factor.to_string());
        context.insert(
            REPLICATION_MINIMUM.to_owned(),
            self.replication_minimum.to_string(),
        );
        if !self.node_selector.is_empty() {
            context.insert(NODE_SELECTOR.to_owned(), self.node_selector_text());
        }
        context
    }
}

fn parse_count(key: &str, value: &str) -> Result<u32, CsiError> {
    let count: u32 = value.trim().parse().map_err(|_| {
        CsiError::InvalidArgument(format!("parameter {key}: {value:?} is not a whole number"))
    })?;
    if count == 0 || count > REPLICATION_FACTOR_MAX {
        return Err(CsiError::InvalidArgument(format!(
            "parameter {key}: {count} is outside 1..={REPLICATION_FACTOR_MAX}"
        )));
    }
    Ok(count)
}

/// Parses `key=value[,key=value...]`; spaces around items are ignored, an empty text is no
/// selector, and a repeated key is refused.
pub fn parse_node_selector(text: &str) -> Result<Vec<(String, String)>, CsiError> {
    let mut selector: Vec<(String, String)> = Vec::new();
    if text.trim().is_empty() {
        return Ok(selector);
    }
    for item in text.split(',') {
        let item = item.trim();
        let Some((key, value)) = item.split_once('=') else {
            return Err(CsiError::InvalidArgument(format!(
                "{NODE_SELECTOR}: {item:?} is not of the form label=value"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        validate_label_key(key)
            .map_err(|reason| CsiError::InvalidArgument(format!("{NODE_SELECTOR}: {reason}")))?;
        validate_label_value(value)
            .map_err(|reason| CsiError::InvalidArgument(format!("{NODE_SELECTOR}: {reason}")))?;
        if selector.iter().any(|(existing, _)| existing == key) {
            return Err(CsiError::InvalidArgument(format!(
                "{NODE_SELECTOR}: label {key:?} appears twice"
            )));
        }
        selector.push((key.to_owned(), value.to_owned()));
    }
    Ok(selector)
}

/// A Kubernetes label key: `[prefix/]name`, prefix a DNS subdomain, name a label part.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid_prefix = !prefix.is_empty()
            && prefix.len() <= LABEL_PREFIX_LENGTH_MAX
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= LABEL_PART_LENGTH_MAX
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid_prefix {
            return Err(format!(
                "label key {key:?} has an invalid prefix (must be a DNS subdomain)"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label key {key:?} has an empty name"));
    }
    validate_label_value(name).map_err(|_| format!("label key {key:?} has an invalid name"))
}

/// A Kubernetes label value (also the rule for a label key's name part): empty, or at most 63
/// characters of `[A-Za-z0-9-_.]` starting and ending with a letter or digit.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let edges_alphanumeric = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    let characters_valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if value.len() > LABEL_PART_LENGTH_MAX || !edges_alphanumeric || !characters_valid {
        return Err(format!(
            "label value {value:?} must be at most {LABEL_PART_LENGTH_MAX} characters of \
             [A-Za-z0-9-_.], starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(
            VolumeParameters::parse(&HashMap::new()).unwrap(),
            VolumeParameters::default()
        );
        let parsed = VolumeParameters::parse(&parameters(&[
            ("replication", "3"),
            ("replicationMinimum", "2"),
            ("nodeSelector", "zone=a, gpu=true"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(parsed.replication_factor, 3);
        assert_eq!(parsed.replication_minimum, 2);
        assert_eq!(parsed.node_selector_text(), "zone=a,gpu=true");
        let context = parsed.volume_context();
        assert_eq!(context["replication"], "3");
        assert_eq!(context["nodeSelector"], "zone=a,gpu=true");
        assert_eq!(
            parsed.volume_labels,
            [("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned())]
        );
    }

    #[test]
    fn provisioner_metadata_becomes_volume_labels_not_errors() {
        // What external-provisioner --extra-create-metadata adds, plus a secret reference
        // (another sidecar key, ignored).
        let parsed = VolumeParameters::parse(&parameters(&[
            ("replication", "1"),
            ("csi.storage.k8s.io/pvc/namespace", "shop"),
            ("csi.storage.k8s.io/pvc/name", "data-mysql-0"),
            ("csi.storage.k8s.io/pv/name", "pvc-6f1c"),
            ("csi.storage.k8s.io/provisioner-secret-name", "secret"),
        ]))
        .unwrap();
        assert_eq!(
            parsed.volume_labels,
            [
                (
                    "csi.storage.k8s.io/pv/name".to_owned(),
                    "pvc-6f1c".to_owned()
                ),
                (
                    "csi.storage.k8s.io/pvc/name".to_owned(),
                    "data-mysql-0".to_owned()
                ),
                (
                    "csi.storage.k8s.io/pvc/namespace".to_owned(),
                    "shop".to_owned()
                ),
            ]
        );
        assert!(parsed.node_selector.is_empty());
        // They stay out of the volume context (the PV carries them already).
        assert!(!parsed
            .volume_context()
            .keys()
            .any(|key| key.starts_with("csi.storage.k8s.io/")));
    }

    #[test]
    fn malformed_parameters_are_refused() {
        for pairs in [
            &[("replication", "three")][..],
            &[("replication", "0")],
            &[("replication", "99")],
            &[("replication", "1"), ("replicationMinimum", "2")],
            &[("nodeSelector", "zone")],
            &[("nodeSelector", "zone=a,,gpu=true")],
            &[("nodeSelector", "zone=a,zone=b")],
            &[("nodeSelector", "-zone=a")],
            &[("nodeSelector", "zone=a b")],
            &[("nodeSelector", "Bad_Prefix.io/zone=a")],
            &[("replicaton", "1")],
        ] {
            assert!(
                matches!(
                    VolumeParameters::parse(&parameters(pairs)),
                    Err(CsiError::InvalidArgument(_))
                ),
                "{pairs:?} must be refused"
            );
        }
    }

    #[test]
    fn label_syntax() {
        assert!(validate_label_key("topology.ballast.io/node").is_ok());
        assert!(validate_label_key("kubernetes.io/hostname").is_ok());
        assert!(validate_label_key("gpu").is_ok());
        assert!(validate_label_key("/gpu").is_err());
        assert!(validate_label_key("example.com/").is_err());
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("node-1.example").is_ok());
        assert!(validate_label_value(&"a".repeat(64)).is_err());
        assert!(validate_label_value("a_").is_err());
    }
}
