//! Fuzzes the storage node's persistent record decoders: the postcard values it stores in RocksDB
//! (`records::decode` of `Inode`, `ContainerState`, `VolumeRecord`, `BlockRef`, `DirentValue`, and
//! the readdir index row `transaction::CookieRow`), the planned chunk row
//! (`chunk_row::ChunkRow::decode`, which also checks the row's invariants) and the Raft log
//! payload (`postcard::from_bytes::<types::Entry>`, what the log storage decodes from the device
//! log).
//!
//! Must hold, for any bytes and every type (`records.rs` promises "decoding never panics on bad
//! bytes; it returns a codec error"):
//! - decoding never panics and never aborts on an allocation sized from the input;
//! - a decoded value re-encodes to bytes that decode to an equal value, and re-encoding that
//!   value gives the same bytes again (encoding is deterministic);
//! - an accepted chunk row passes its own invariant check, and its dense view builds the same
//!   row again (one encoding per set of references).

#![no_main]

use std::fmt::Debug;

use ballast_storage_node::chunk_row::ChunkRow;
use ballast_storage_node::records::{
    self, BlockRef, ContainerState, DirentValue, Inode, VolumeRecord,
};
use ballast_storage_node::transaction::CookieRow;
use ballast_storage_node::types::Entry;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

/// A state-store value, through the node's own `records::decode` / `records::encode`.
fn check_record<T>(bytes: &[u8], what: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = records::decode::<T>(bytes, what) else {
        return;
    };
    let encoded = records::encode(&value);
    let again: T = records::decode(&encoded, what)
        .unwrap_or_else(|error| panic!("re-encoded {what} does not decode: {error}"));
    assert_eq!(again, value, "decode(encode({what})) != {what}");
    assert_eq!(
        records::encode(&again),
        encoded,
        "{what} encoding is not deterministic"
    );
}

/// A Raft log entry, as the log storage decodes payloads read from the device log.
fn check_entry(bytes: &[u8]) {
    let Ok(entry) = postcard::from_bytes::<Entry>(bytes) else {
        return;
    };
    let encoded = postcard::to_allocvec(&entry).expect("an entry encodes");
    let again: Entry = postcard::from_bytes(&encoded).expect("a re-encoded entry decodes");
    assert_eq!(again, entry, "decode(encode(entry)) != entry");
    assert_eq!(
        postcard::to_allocvec(&again).expect("an entry encodes"),
        encoded,
        "entry encoding is not deterministic"
    );
}

/// A chunk row, through its own checked decoder.
fn check_chunk_row(bytes: &[u8]) {
    let Ok(row) = ChunkRow::decode(bytes) else {
        return;
    };
    assert!(
        row.check().is_ok(),
        "an accepted chunk row breaks an invariant"
    );
    let encoded = row.encode();
    let again = ChunkRow::decode(&encoded).expect("a re-encoded chunk row decodes");
    assert_eq!(again, row, "decode(encode(chunk row)) != chunk row");
    assert_eq!(
        again.encode(),
        encoded,
        "chunk row encoding is not deterministic"
    );
    assert_eq!(
        ChunkRow::from_dense(&row.to_dense()),
        Some(row),
        "a chunk row is not the one its references build"
    );
}

fuzz_target!(|data: &[u8]| {
    check_record::<Inode>(data, "inode");
    check_record::<ContainerState>(data, "container state");
    check_record::<VolumeRecord>(data, "volume record");
    check_record::<BlockRef>(data, "block reference");
    check_record::<DirentValue>(data, "directory entry");
    check_record::<CookieRow>(data, "cookie row");
    check_chunk_row(data);
    check_entry(data);
});
