//! Fuzzes what the scheduler extender does first with an HTTP body:
//! `ballast_scheduler_extender::protocol::ExtenderArgs::parse`, then everything a handler does
//! with a parsed request before it asks Ballast (candidate names, the pod's claims, a filter
//! answer and its JSON encoding).
//!
//! Must hold, for any bytes:
//! - parsing never panics, and every refusal is `MalformedRequest` (an HTTP 400), never another
//!   error kind;
//! - a parsed request has candidates, each named once and none with an empty name from `Nodes`;
//! - a filter answer that rejects nothing keeps every candidate and encodes to JSON; one that
//!   rejects everything keeps none and gives every candidate a reason.

#![no_main]

use std::collections::BTreeSet;

use ballast_scheduler_extender::placement::claims_of;
use ballast_scheduler_extender::protocol::ExtenderArgs;
use ballast_scheduler_extender::ExtenderError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let args = match ExtenderArgs::parse(bytes) {
        Ok(args) => args,
        Err(ExtenderError::MalformedRequest(message)) => {
            assert!(!message.is_empty());
            return;
        }
        Err(other) => panic!("a parse error must be MalformedRequest, not {other:?}"),
    };
    assert!(args.nodes.is_some() || args.node_names.is_some());
    assert!(args
        .nodes
        .iter()
        .flat_map(|list| list.items.iter())
        .all(|node| node
            .metadata
            .name
            .as_deref()
            .is_some_and(|name| !name.is_empty())));
    let names = args.candidate_names();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "candidates are listed once each");
    let _ = claims_of(&args.pod);

    let everything = args.filter_result(|_| None);
    assert!(everything.failed_and_unresolvable_nodes.is_empty());
    let kept: BTreeSet<String> = everything
        .node_names
        .iter()
        .flatten()
        .cloned()
        .chain(
            everything
                .nodes
                .iter()
                .flat_map(|list| list.items.iter())
                .filter_map(|node| node.metadata.name.clone()),
        )
        .collect();
    assert_eq!(kept.len(), unique.len());
    serde_json::to_vec(&everything).expect("a filter answer encodes");

    let nothing = args.filter_result(|name| Some(format!("no {name}")));
    assert!(nothing.node_names.iter().flatten().next().is_none());
    assert!(nothing.nodes.iter().all(|list| list.items.is_empty()));
    assert_eq!(nothing.failed_and_unresolvable_nodes.len(), unique.len());
});
