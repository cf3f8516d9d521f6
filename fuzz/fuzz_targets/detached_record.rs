//! Fuzzes `ballast_storage_node::detached::DetachedRecord::decode`, which every retained log
//! record read from the device (at start-up and on read-back) passes through.
//!
//! Must hold, for any bytes and index: decoding never panics; an accepted record names the
//! index it was read at, covers exactly one block per checksum with non-empty extents, stays
//! within the block limit, and re-encodes to bytes that decode to the same record.

#![no_main]

use ballast_storage_node::detached::{DetachedRecord, DETACHED_BLOCKS_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&index, bytes)) = input.split_first() else {
        return;
    };
    let index = u64::from(index % 4);
    if let Ok(record) = DetachedRecord::decode(bytes, index) {
        assert_eq!(record.entry.log_id.index, index);
        let blocks = record.device_blocks();
        assert_eq!(blocks.len(), record.checksums.len());
        assert!(!blocks.is_empty() && blocks.len() <= DETACHED_BLOCKS_MAX);
        assert!(record.extents().iter().all(|extent| extent.block_count > 0));
        let again = DetachedRecord::decode(&record.encode(), index).expect("re-encoded record");
        assert_eq!(again, record);
    }
});
