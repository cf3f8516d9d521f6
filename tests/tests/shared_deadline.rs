//! Shared-memory requests and their deadlines, end to end against a real `ballast-node`: a
//! region attached over the node's local socket as the FUSE driver attaches one, and requests
//! sent over local frames and over gRPC.
//!
//! What must hold (`ballast_common::shared_deadline`):
//! - a `WriteShared` whose deadline has passed is refused with DeadlineExceeded, over local
//!   frames and over gRPC alike, and the file keeps its bytes: a driver that has given up on a
//!   write sends it again later, and the old one must never land after newer writes;
//! - the same write with its deadline ahead (or none, as an older driver sends) is written;
//! - a write whose deadline passes after its slot was copied, while the node is held up before
//!   proposing it (the failpoint `BALLAST_FAILPOINT_SHARED_WRITE_DELAY_MS`), is refused too;
//! - a `ReadShared` past its deadline is refused and leaves the slot alone; with its deadline
//!   ahead it fills the slot.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ballast_client::local::LocalChannel;
use ballast_client::{proto, BallastClient, Code};
use ballast_common::shared_deadline::{monotonic_now_ns, SharedDeadline};
use ballast_common::shared_region::SharedRegion;
use ballast_tests::{end_to_end_available, LocalNode};

const VOLUME: &str = "deadlines";
const ROOT_INODE: u64 = 1;
const SLOT_BYTES: usize = 1 << 20;
const WRITE_BYTES: usize = 16 << 10;

fn write_request(inode: u64, region_id: u64, deadline_ns: u64) -> proto::WriteSharedRequest {
    proto::WriteSharedRequest {
        volume: VOLUME.to_owned(),
        inode,
        offset_bytes: 0,
        region_id,
        slot_offset_bytes: 0,
        slot_bytes: SLOT_BYTES as u32,
        length_bytes: WRITE_BYTES as u32,
        durable: false,
        deadline_monotonic_ns: deadline_ns,
    }
}

fn read_request(inode: u64, region_id: u64, deadline_ns: u64) -> proto::ReadSharedRequest {
    proto::ReadSharedRequest {
        volume: VOLUME.to_owned(),
        inode,
        offset_bytes: 0,
        length_bytes: WRITE_BYTES as u32,
        region_id,
        // The second slot: the first holds the bytes of the writes.
        slot_offset_bytes: SLOT_BYTES as u64,
        slot_bytes: SLOT_BYTES as u32,
        deadline_monotonic_ns: deadline_ns,
    }
}

fn passed() -> u64 {
    SharedDeadline::at(monotonic_now_ns() - 1).to_wire()
}

fn ahead() -> u64 {
    SharedDeadline::after(Duration::from_secs(60)).to_wire()
}

fn assert_deadline_refused<T: std::fmt::Debug>(
    result: Result<T, ballast_client::ClientError>,
    what: &str,
) {
    let error = result.expect_err(what);
    assert_eq!(
        error.code(),
        Some(Code::DeadlineExceeded),
        "{what}: {error}"
    );
    assert!(
        error.to_string().contains("deadline passed"),
        "{what}: {error}"
    );
}

/// Whether the file's first `WRITE_BYTES` are all `byte`.
async fn file_holds(client: &BallastClient, inode: u64, byte: u8) -> bool {
    let bytes = client
        .read(VOLUME, inode, 0, WRITE_BYTES as u32)
        .await
        .unwrap();
    bytes.len() == WRITE_BYTES && bytes.iter().all(|&held| held == byte)
}

/// A file on `node`'s volume and a region attached to the node, as a driver attaches one.
struct Attached {
    endpoint: String,
    client: BallastClient,
    inode: u64,
    region: SharedRegion,
    region_id: u64,
    local: LocalChannel,
    _stream: UnixStream,
}

async fn attach_with_file(node: &LocalNode) -> Attached {
    let endpoint = node.endpoint();
    let client = BallastClient::connect(&endpoint).await.unwrap();
    let status = client.status().await.unwrap();
    assert!(status.local_frames, "the node serves local frames");
    let file = client
        .create(proto::CreateRequest {
            volume: VOLUME.to_owned(),
            parent: ROOT_INODE,
            name: "file".to_owned(),
            kind: proto::EntryKind::File as i32,
            mode: 0o644,
            exclusive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = UnixStream::connect(&status.local_socket_path).unwrap();
    let region = SharedRegion::create("ballast-test", 2 * SLOT_BYTES).unwrap();
    let (region_id, _node_id) = region.send(&mut stream).unwrap();
    let local = LocalChannel::start(&stream, Duration::from_secs(30)).unwrap();
    Attached {
        endpoint,
        client,
        inode: file.inode,
        region,
        region_id,
        local,
        _stream: stream,
    }
}

#[test]
fn shared_requests_past_their_deadline_are_refused_and_change_nothing() {
    if !end_to_end_available() {
        return;
    }
    let node = LocalNode::start(1 << 30).unwrap();
    node.create_volume(VOLUME, "256M").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let Attached {
            endpoint,
            client,
            inode,
            region,
            region_id,
            local,
            _stream,
        } = attach_with_file(&node).await;
        client
            .write(VOLUME, inode, 0, vec![b'a'; WRITE_BYTES].into(), false)
            .await
            .unwrap();
        region
            .with_bytes_mut(0, WRITE_BYTES, |bytes| bytes.fill(b'b'))
            .unwrap();

        // Past the deadline: refused both ways, and the file keeps its bytes.
        assert_deadline_refused(
            local
                .write_shared(write_request(inode, region_id, passed()))
                .await,
            "a late write as a local frame",
        );
        assert_deadline_refused(
            client
                .write_shared_at(&endpoint, write_request(inode, region_id, passed()))
                .await,
            "a late write over gRPC",
        );
        assert!(
            file_holds(&client, inode, b'a').await,
            "a refused write changed the file"
        );

        // In time: written.
        local
            .write_shared(write_request(inode, region_id, ahead()))
            .await
            .unwrap();
        assert!(file_holds(&client, inode, b'b').await);
        region
            .with_bytes_mut(0, WRITE_BYTES, |bytes| bytes.fill(b'c'))
            .unwrap();
        client
            .write_shared_at(&endpoint, write_request(inode, region_id, ahead()))
            .await
            .unwrap();
        assert!(file_holds(&client, inode, b'c').await);
        // No deadline at all (a driver from before deadlines): written.
        region
            .with_bytes_mut(0, WRITE_BYTES, |bytes| bytes.fill(b'd'))
            .unwrap();
        local
            .write_shared(write_request(inode, region_id, 0))
            .await
            .unwrap();
        assert!(file_holds(&client, inode, b'd').await);

        // Reads: a late one leaves the slot alone, one in time fills it.
        let slot_bytes = || {
            region
                .with_bytes(SLOT_BYTES, WRITE_BYTES, |bytes| bytes.to_vec())
                .unwrap()
        };
        assert_deadline_refused(
            local
                .read_shared(read_request(inode, region_id, passed()))
                .await,
            "a late read as a local frame",
        );
        assert_deadline_refused(
            client
                .read_shared_at(&endpoint, read_request(inode, region_id, passed()))
                .await,
            "a late read over gRPC",
        );
        assert!(
            slot_bytes().iter().all(|&byte| byte == 0),
            "the slot was written"
        );
        let answer = local
            .read_shared(read_request(inode, region_id, ahead()))
            .await
            .unwrap();
        assert_eq!(answer.length_bytes as usize, WRITE_BYTES);
        let read = region
            .with_bytes(
                SLOT_BYTES + answer.data_offset_bytes as usize,
                WRITE_BYTES,
                |bytes| bytes.to_vec(),
            )
            .unwrap();
        assert!(read.iter().all(|&byte| byte == b'd'));
    });
}

#[test]
fn a_write_whose_deadline_passes_before_it_is_proposed_is_refused() {
    if !end_to_end_available() {
        return;
    }
    let mut node = LocalNode::start(1 << 30).unwrap();
    node.environment.push((
        "BALLAST_FAILPOINT_SHARED_WRITE_DELAY_MS".to_owned(),
        "1500".to_owned(),
    ));
    node.stop_node().unwrap();
    node.restart_node().unwrap();
    node.create_volume(VOLUME, "256M").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let Attached {
            client,
            inode,
            region,
            region_id,
            local,
            ..
        } = attach_with_file(&node).await;
        region
            .with_bytes_mut(0, WRITE_BYTES, |bytes| bytes.fill(b'e'))
            .unwrap();
        // Ahead when the slot is copied, passed once the node has waited 1.5 s.
        let deadline = SharedDeadline::after(Duration::from_millis(500)).to_wire();
        assert_deadline_refused(
            local
                .write_shared(write_request(inode, region_id, deadline))
                .await,
            "a write held up past its deadline",
        );
        let attributes = client.get_attr(VOLUME, inode).await.unwrap();
        assert_eq!(attributes.size_bytes, 0, "the refused write was applied");
        // With time enough, the same write goes through the same delay.
        local
            .write_shared(write_request(inode, region_id, ahead()))
            .await
            .unwrap();
        assert!(file_holds(&client, inode, b'e').await);
    });
}
