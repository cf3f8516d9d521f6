//! RocksDB key layout of the node's state store. One concept: turning domain addresses into
//! byte keys whose lexicographic order is the order we iterate in.
//!
//! Every key starts with a one-byte table tag; container-scoped tables follow it with the
//! big-endian container id, so one container's rows are one contiguous range (a container can
//! be dropped with one range delete and later moved to another node as a unit).
//! All integers are big-endian so that byte order equals numeric order.

/// Per-container state machine header: applied log id, membership, counters.
pub const TAG_CONTAINER_STATE: u8 = b'S';
/// Inode records: container, inode.
pub const TAG_INODE: u8 = b'I';
/// Directory entries by name: container, parent inode, name bytes.
pub const TAG_DIRENT: u8 = b'D';
/// Directory entries by cookie (readdir order): container, parent inode, cookie.
pub const TAG_DIRENT_COOKIE: u8 = b'C';
/// The logical address of one file block: container, inode, file block index. Since the
/// chunk-row format (version 2) no row is stored under it; it names a block in scrub cursors,
/// snapshot streams and the block map's pages (`block_map.rs`). Stores of version 1 held one
/// row per block here, converted at start-up.
pub const TAG_BLOCK: u8 = b'B';
/// Chunk rows, the block map of files (`block_map.rs`): container, inode, chunk index (256
/// file blocks per chunk).
pub const TAG_CHUNK: u8 = b'F';
/// Node-wide singleton: the version of the state store's format.
pub const TAG_FORMAT_VERSION: u8 = b'M';
/// Orphan inodes (nlink 0, data kept until the last handle closes): container, inode.
pub const TAG_ORPHAN: u8 = b'O';
/// Volume records of the metadata container: volume name.
pub const TAG_VOLUME: u8 = b'V';
/// Node records of the metadata container (the cluster map): node id.
pub const TAG_NODE: u8 = b'N';
/// Container records of the metadata container (replicas of each container): container id.
pub const TAG_CONTAINER_RECORD: u8 = b'K';
/// Stored responses of tagged requests (exactly-once retries): container, session, sequence.
pub const TAG_SESSION: u8 = b'W';
/// Device block allocator bitmap groups: group index.
pub const TAG_ALLOCATOR_GROUP: u8 = b'A';
/// Raft vote of a container (written with the RocksDB WAL and synced).
pub const TAG_VOTE: u8 = b'R';
/// Raft committed log id of a container.
pub const TAG_COMMITTED: u8 = b'Q';
/// Raft last purged log id of a container (written with the WAL and synced).
pub const TAG_PURGED: u8 = b'U';
/// Last snapshot (checkpoint) metadata of a container.
pub const TAG_SNAPSHOT: u8 = b'P';
/// Node-wide singleton: where an interrupted background scrub pass goes on (`scrub.rs`).
pub const TAG_SCRUB_CURSOR: u8 = b'Z';

fn with_container(tag: u8, container_id: u64, extra_capacity: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + extra_capacity);
    key.push(tag);
    key.extend_from_slice(&container_id.to_be_bytes());
    key
}

/// Key of the node's scrub cursor.
pub fn scrub_cursor() -> Vec<u8> {
    vec![TAG_SCRUB_CURSOR]
}

/// Key of a container-scoped singleton (state, vote, committed, purged, snapshot).
pub fn container_singleton(tag: u8, container_id: u64) -> Vec<u8> {
    with_container(tag, container_id, 0)
}

pub fn inode(container_id: u64, inode: u64) -> Vec<u8> {
    let mut key = with_container(TAG_INODE, container_id, 8);
    key.extend_from_slice(&inode.to_be_bytes());
    key
}

pub fn dirent(container_id: u64, parent: u64, name: &str) -> Vec<u8> {
    let mut key = with_container(TAG_DIRENT, container_id, 8 + name.len());
    key.extend_from_slice(&parent.to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn dirent_cookie(container_id: u64, parent: u64, cookie: u64) -> Vec<u8> {
    let mut key = with_container(TAG_DIRENT_COOKIE, container_id, 16);
    key.extend_from_slice(&parent.to_be_bytes());
    key.extend_from_slice(&cookie.to_be_bytes());
    key
}

/// Prefix of every cookie row of one directory.
pub fn dirent_cookie_prefix(container_id: u64, parent: u64) -> Vec<u8> {
    let mut key = with_container(TAG_DIRENT_COOKIE, container_id, 8);
    key.extend_from_slice(&parent.to_be_bytes());
    key
}

pub fn block(container_id: u64, inode: u64, file_block: u64) -> Vec<u8> {
    let mut key = with_container(TAG_BLOCK, container_id, 16);
    key.extend_from_slice(&inode.to_be_bytes());
    key.extend_from_slice(&file_block.to_be_bytes());
    key
}

/// The file block index encoded in a block key.
pub fn block_key_file_block(key: &[u8]) -> u64 {
    assert_eq!(key.len(), 25, "block key has a fixed length");
    u64::from_be_bytes(key[17..25].try_into().expect("8 bytes"))
}

/// The inode encoded in a block key.
pub fn block_key_inode(key: &[u8]) -> u64 {
    assert_eq!(key.len(), 25, "block key has a fixed length");
    u64::from_be_bytes(key[9..17].try_into().expect("8 bytes"))
}

/// Key of the chunk row of `inode`'s chunk `chunk_index`.
pub fn chunk(container_id: u64, inode: u64, chunk_index: u64) -> Vec<u8> {
    let mut key = with_container(TAG_CHUNK, container_id, 16);
    key.extend_from_slice(&inode.to_be_bytes());
    key.extend_from_slice(&chunk_index.to_be_bytes());
    key
}

/// Prefix of every chunk row of one inode.
pub fn chunk_prefix(container_id: u64, inode: u64) -> Vec<u8> {
    let mut key = with_container(TAG_CHUNK, container_id, 8);
    key.extend_from_slice(&inode.to_be_bytes());
    key
}

/// The inode and chunk index encoded in a chunk key; `None` for a key of another length.
pub fn chunk_key_parts(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 25 || key[0] != TAG_CHUNK {
        return None;
    }
    let inode = u64::from_be_bytes(key[9..17].try_into().expect("8 bytes"));
    let chunk_index = u64::from_be_bytes(key[17..25].try_into().expect("8 bytes"));
    Some((inode, chunk_index))
}

/// Key of the node's state store format version.
pub fn format_version() -> Vec<u8> {
    vec![TAG_FORMAT_VERSION]
}

pub fn orphan(container_id: u64, inode: u64) -> Vec<u8> {
    let mut key = with_container(TAG_ORPHAN, container_id, 8);
    key.extend_from_slice(&inode.to_be_bytes());
    key
}

pub fn orphan_prefix(container_id: u64) -> Vec<u8> {
    with_container(TAG_ORPHAN, container_id, 0)
}

/// The inode encoded in an orphan key.
pub fn orphan_key_inode(key: &[u8]) -> u64 {
    assert_eq!(key.len(), 17, "orphan key has a fixed length");
    u64::from_be_bytes(key[9..17].try_into().expect("8 bytes"))
}

pub fn volume(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(TAG_VOLUME);
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn session(container_id: u64, session: u64, sequence: u64) -> Vec<u8> {
    let mut key = with_container(TAG_SESSION, container_id, 16);
    key.extend_from_slice(&session.to_be_bytes());
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

pub fn node(node_id: u64) -> Vec<u8> {
    let mut key = vec![TAG_NODE];
    key.extend_from_slice(&node_id.to_be_bytes());
    key
}

pub fn container_record(container_id: u64) -> Vec<u8> {
    let mut key = vec![TAG_CONTAINER_RECORD];
    key.extend_from_slice(&container_id.to_be_bytes());
    key
}

pub fn allocator_group(group_index: u64) -> Vec<u8> {
    let mut key = vec![TAG_ALLOCATOR_GROUP];
    key.extend_from_slice(&group_index.to_be_bytes());
    key
}

/// The group index encoded in an allocator group key.
pub fn allocator_group_index(key: &[u8]) -> u64 {
    assert_eq!(key.len(), 9, "allocator key has a fixed length");
    u64::from_be_bytes(key[1..9].try_into().expect("8 bytes"))
}

/// The exclusive upper bound of every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // An all-0xFF prefix has no finite bound; no key of ours looks like that.
    unreachable!("prefix {prefix:?} has no upper bound")
}

/// The first and one-past-last keys of all rows of one container in one table.
pub fn container_range(tag: u8, container_id: u64) -> (Vec<u8>, Vec<u8>) {
    let start = with_container(tag, container_id, 0);
    let end = prefix_end(&start);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_sort_numerically() {
        let mut keys: Vec<Vec<u8>> = [300u64, 2, 256, 1]
            .iter()
            .map(|&b| block(7, 42, b))
            .collect();
        keys.sort();
        let blocks: Vec<u64> = keys.iter().map(|k| block_key_file_block(k)).collect();
        assert_eq!(blocks, vec![1, 2, 256, 300]);
        assert_eq!(block_key_inode(&block(7, 42, 300)), 42);
        // Chunk keys likewise, and one inode's chunks sit under its prefix.
        let mut chunks: Vec<Vec<u8>> = [9u64, 1, 256].iter().map(|&c| chunk(7, 42, c)).collect();
        chunks.sort();
        let indexes: Vec<u64> = chunks
            .iter()
            .map(|k| chunk_key_parts(k).unwrap().1)
            .collect();
        assert_eq!(indexes, vec![1, 9, 256]);
        assert!(chunk(7, 42, u64::MAX) < prefix_end(&chunk_prefix(7, 42)));
        assert!(chunk(7, 43, 0) >= prefix_end(&chunk_prefix(7, 42)));
        assert_eq!(
            chunk_key_parts(&block(7, 42, 1)),
            None,
            "a block key is not a chunk key"
        );
    }

    #[test]
    fn container_ranges_do_not_overlap() {
        let (start, end) = container_range(TAG_INODE, 5);
        assert!(inode(5, 0) >= start && inode(5, u64::MAX) < end);
        assert!(inode(6, 0) >= end);
        assert!(inode(4, u64::MAX) < start);
    }

    #[test]
    fn orphan_and_allocator_keys_round_trip() {
        assert_eq!(orphan_key_inode(&orphan(3, 99)), 99);
        assert_eq!(allocator_group_index(&allocator_group(12)), 12);
    }
}
