//! Fuzzes the storage node's persistent record decoders: the postcard values it stores in RocksDB
//! (`records::decode` of `Inode`, `ContainerState`, `VolumeRecord`, `BlockRef`, `DirentValue`, and
//! the readdir index row `transaction::CookieRow`) and the Raft log payload
//! (`postcard::from_bytes::<types::Entry>`, what the log storage decodes from the device log).
//!
//! Must hold, for any bytes and every type (`records.rs` promises "decoding never panics on bad
//! bytes; it returns a codec error"):
//! - decoding never panics and never aborts on an allocation sized from the input;
//! - a decoded value re-encodes to bytes that decode to an equal value, and re-encoding that
//!   value gives the same bytes again (encoding is deterministic).

#![no_main]

use std::fmt::Debug;

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

fuzz_target!(|data: &[u8]| {
    check_record::<Inode>(data, "inode");
    check_record::<ContainerState>(data, "container state");
    check_record::<VolumeRecord>(data, "volume record");
    check_record::<BlockRef>(data, "block reference");
    check_record::<DirentValue>(data, "directory entry");
    check_record::<CookieRow>(data, "cookie row");
    check_entry(data);
});
