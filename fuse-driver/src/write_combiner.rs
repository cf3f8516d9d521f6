//! `WriteCombiner`: joins the kernel's sequential page-cache writes of one file into larger node
//! writes while earlier ones are still in flight.
//!
//! Why: the kernel's writeback sends at most 1 MiB per WRITE request (its page limit per
//! request), and each becomes one Raft entry on the node. openraft 0.9's core appends one entry
//! at a time, waiting for each append, so a container takes about one entry per 1.5-2 ms
//! whatever the entry's size: measured 2026-12-05 under a 1 GiB sequential write, about 30
//! writes waited at the node, each about 50 ms in the proposal queue and 10 ms in its device
//! write. Four 1 MiB writes sent as one 4 MiB write cost the core one cycle instead of four.
//!
//! Owns: per inode, the end of the last write sent, how many node writes are in flight, and at
//! most one batch being gathered.
//! Must not depend on: FUSE or the network; callers say what arrives and what finished, and get
//! back what to send. Generic over the reply handle so it can be tested without a kernel.
//! Invariants:
//! - A write is held only while a node write of the same inode is in flight, so a held write is
//!   always sent by a [`WriteCombiner::finished`] call that must come (callers call it once per
//!   batch they sent, whatever the outcome). Nothing here waits on time.
//! - A batch is one contiguous byte range: each write joins it only at its end.
//! - A batch never exceeds [`COMBINED_WRITE_BYTES_MAX`]; a write that would overflow it sends the
//!   gathered batch and starts the next one.
//! - Only writes whose order does not matter among themselves are given here (the kernel's
//!   page-cache writeback: it never has two writes of the same page out at once); writes that
//!   need their own answer (durable or direct) are sent by the caller directly.

use std::collections::HashMap;

use bytes::BytesMut;

/// Largest write sent to the node: four of the kernel's 1 MiB writeback requests. Bounded so a
/// Raft message of `max_payload_entries` (16) entries stays within the node's 128 MiB limit.
pub const COMBINED_WRITE_BYTES_MAX: usize = 4 << 20;

/// Node writes of one inode in flight before further contiguous writes are gathered: with fewer,
/// every write goes at once, so a lone or slow writer waits for nothing.
pub const IN_FLIGHT_BEFORE_COMBINING: u32 = 2;

/// Where the bytes of a write are gathered: memory of the driver's own, or a slot of memory
/// shared with the node (`shared_memory.rs`), so they are copied once on their way to it.
pub trait GatherBuffer {
    /// Bytes gathered so far.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `data`; the buffer was made with room for everything it is given.
    fn extend_from_slice(&mut self, data: &[u8]);
}

impl GatherBuffer for BytesMut {
    fn len(&self) -> usize {
        BytesMut::len(self)
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        BytesMut::extend_from_slice(self, data)
    }
}

/// One write to send to the node: a contiguous range and the kernel requests it answers.
#[derive(Debug)]
pub struct CombinedWrite<Reply, Buffer = BytesMut> {
    pub inode: u64,
    pub offset_bytes: u64,
    pub data: Buffer,
    /// Each kernel request answered by this write, with its own length in bytes.
    pub parts: Vec<(Reply, u32)>,
}

impl<Reply, Buffer: GatherBuffer> CombinedWrite<Reply, Buffer> {
    /// An empty write at `offset_bytes`, gathering into `data`.
    fn new(inode: u64, offset_bytes: u64, data: Buffer) -> Self {
        assert!(data.is_empty(), "a write starts empty");
        CombinedWrite {
            inode,
            offset_bytes,
            data,
            parts: Vec::new(),
        }
    }

    /// One kernel write sent on its own, copied into `buffer` (the kernel reuses its own).
    pub fn alone(inode: u64, offset_bytes: u64, data: &[u8], reply: Reply, buffer: Buffer) -> Self {
        let mut write = CombinedWrite::new(inode, offset_bytes, buffer);
        write.push(data, reply);
        write
    }

    fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.data.len() as u64
    }

    fn push(&mut self, data: &[u8], reply: Reply) {
        self.data.extend_from_slice(data);
        self.parts.push((reply, data.len() as u32));
    }
}

#[derive(Debug)]
struct InodeStream<Reply, Buffer> {
    /// End of the last write given to the caller to send, or gathered.
    end_bytes: u64,
    in_flight: u32,
    gathering: Option<CombinedWrite<Reply, Buffer>>,
}

/// What the caller does with a write it offered.
#[derive(Debug)]
pub enum Admission<Reply, Buffer = BytesMut> {
    /// Send this now. It is either the offered write alone, or a full batch gathered before it
    /// (the offered write then starts the next batch).
    Send(CombinedWrite<Reply, Buffer>),
    /// The offered write was gathered; a later `finished` or `offer` hands it out.
    Held,
}

/// See the module documentation.
#[derive(Debug)]
pub struct WriteCombiner<Reply, Buffer = BytesMut> {
    streams: HashMap<u64, InodeStream<Reply, Buffer>>,
}

impl<Reply, Buffer> Default for WriteCombiner<Reply, Buffer> {
    fn default() -> Self {
        WriteCombiner {
            streams: HashMap::new(),
        }
    }
}

impl<Reply, Buffer: GatherBuffer> WriteCombiner<Reply, Buffer> {
    /// A page-cache write of `data` at `offset_bytes` arrived for `inode`. The caller sends what
    /// comes back as `Send`, and calls [`Self::finished`] once that write is answered. When the
    /// write does not join a batch being gathered, it goes into a buffer from `new_buffer`,
    /// called once with the room needed: the write's length when it goes alone,
    /// [`COMBINED_WRITE_BYTES_MAX`] when it starts a batch.
    pub fn offer(
        &mut self,
        inode: u64,
        offset_bytes: u64,
        data: &[u8],
        reply: Reply,
        new_buffer: impl FnOnce(usize) -> Buffer,
    ) -> Admission<Reply, Buffer> {
        assert!(
            !data.is_empty() && data.len() <= COMBINED_WRITE_BYTES_MAX,
            "a write of {} bytes cannot be combined",
            data.len()
        );
        let end_bytes = offset_bytes + data.len() as u64;
        let stream = self.streams.entry(inode).or_insert(InodeStream {
            end_bytes,
            in_flight: 0,
            gathering: None,
        });
        let follows_gathering = stream
            .gathering
            .as_ref()
            .is_some_and(|gathering| gathering.end_bytes() == offset_bytes);
        let follows_last = stream.in_flight >= IN_FLIGHT_BEFORE_COMBINING
            && stream.gathering.is_none()
            && stream.end_bytes == offset_bytes;
        if follows_gathering {
            let gathering = stream.gathering.as_mut().expect("checked above");
            if gathering.data.len() + data.len() <= COMBINED_WRITE_BYTES_MAX {
                gathering.push(data, reply);
                stream.end_bytes = end_bytes;
                return Admission::Held;
            }
            // Full: send what was gathered, and gather on from this write.
            let mut next =
                CombinedWrite::new(inode, offset_bytes, new_buffer(COMBINED_WRITE_BYTES_MAX));
            next.push(data, reply);
            let full = stream.gathering.replace(next).expect("checked above");
            stream.end_bytes = end_bytes;
            stream.in_flight += 1;
            return Admission::Send(full);
        }
        if follows_last {
            let mut gathering =
                CombinedWrite::new(inode, offset_bytes, new_buffer(COMBINED_WRITE_BYTES_MAX));
            gathering.push(data, reply);
            stream.gathering = Some(gathering);
            stream.end_bytes = end_bytes;
            return Admission::Held;
        }
        // Not part of a sequential run, or too little in flight to be worth waiting for: send
        // it alone. A gathered batch elsewhere in the file stays held: it goes with the next
        // `finished`, which must come because something is in flight.
        let alone = CombinedWrite::alone(inode, offset_bytes, data, reply, new_buffer(data.len()));
        if stream.gathering.is_none() {
            stream.end_bytes = end_bytes;
        }
        stream.in_flight += 1;
        Admission::Send(alone)
    }

    /// A write of `inode` that `offer` or `finished` handed out was answered (successfully or
    /// not). Returns the gathered batch to send next, if any.
    pub fn finished(&mut self, inode: u64) -> Option<CombinedWrite<Reply, Buffer>> {
        let stream = self
            .streams
            .get_mut(&inode)
            .expect("finished is called only for writes handed out");
        assert!(
            stream.in_flight > 0,
            "inode {inode}: more finished than sent"
        );
        stream.in_flight -= 1;
        if let Some(gathering) = stream.gathering.take() {
            stream.in_flight += 1;
            return Some(gathering);
        }
        if stream.in_flight == 0 {
            self.streams.remove(&inode);
        }
        None
    }

    /// Inodes with writes in flight or gathered (bounded by the kernel's requests in flight).
    #[cfg(test)]
    fn stream_count(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn parts(write: &CombinedWrite<u32>) -> Vec<u32> {
        write.parts.iter().map(|(reply, _)| *reply).collect()
    }

    fn sent(admission: Admission<u32>) -> CombinedWrite<u32> {
        match admission {
            Admission::Send(write) => write,
            Admission::Held => panic!("expected a write to send"),
        }
    }

    #[test]
    fn writes_go_alone_until_enough_are_in_flight() {
        let mut combiner = WriteCombiner::default();
        let data = vec![7u8; MIB];
        let first = sent(combiner.offer(1, 0, &data, 0, BytesMut::with_capacity));
        let second = sent(combiner.offer(1, MIB as u64, &data, 1, BytesMut::with_capacity));
        assert_eq!((first.offset_bytes, parts(&first)), (0, vec![0]));
        assert_eq!((second.offset_bytes, parts(&second)), (MIB as u64, vec![1]));
        // A lone writer is never held: each write finishes before the next arrives.
        assert!(combiner.finished(1).is_none());
        assert!(combiner.finished(1).is_none());
        assert_eq!(combiner.stream_count(), 0);
        let third = sent(combiner.offer(1, 2 * MIB as u64, &data, 2, BytesMut::with_capacity));
        assert_eq!(parts(&third), vec![2]);
    }

    #[test]
    fn sequential_writes_behind_those_in_flight_are_sent_as_one() {
        let mut combiner = WriteCombiner::default();
        let mut offset = 0u64;
        let mut next = |combiner: &mut WriteCombiner<u32>, reply: u32| {
            let data: Vec<u8> = (0..MIB).map(|index| (index as u32 ^ reply) as u8).collect();
            let admission = combiner.offer(9, offset, &data, reply, BytesMut::with_capacity);
            offset += MIB as u64;
            admission
        };
        sent(next(&mut combiner, 0));
        sent(next(&mut combiner, 1));
        for reply in 2..6 {
            assert!(matches!(next(&mut combiner, reply), Admission::Held));
        }
        // The fifth held write would overflow the batch: the four gathered go now.
        let full = sent(next(&mut combiner, 6));
        assert_eq!(parts(&full), vec![2, 3, 4, 5]);
        assert_eq!(full.offset_bytes, 2 * MIB as u64);
        assert_eq!(full.data.len(), COMBINED_WRITE_BYTES_MAX);
        // The data is each write's bytes, in order.
        for (index, reply) in (2u32..6).enumerate() {
            let piece = &full.data[index * MIB..(index + 1) * MIB];
            assert!(piece
                .iter()
                .enumerate()
                .all(|(byte, &value)| value == (byte as u32 ^ reply) as u8));
        }
        assert!(full.parts.iter().all(|&(_, length)| length == MIB as u32));
        // Each finished write hands out what was gathered behind it, then nothing.
        let rest = combiner.finished(9).expect("write 6 was gathered");
        assert_eq!((rest.offset_bytes, parts(&rest)), (6 * MIB as u64, vec![6]));
        assert!(combiner.finished(9).is_none());
        assert!(combiner.finished(9).is_none());
        assert!(combiner.finished(9).is_none());
        assert_eq!(combiner.stream_count(), 0);
    }

    #[test]
    fn writes_out_of_sequence_are_never_held() {
        let mut combiner = WriteCombiner::default();
        let data = vec![1u8; 4096];
        sent(combiner.offer(3, 0, &data, 0, BytesMut::with_capacity));
        sent(combiner.offer(3, 4096, &data, 1, BytesMut::with_capacity));
        assert!(matches!(
            combiner.offer(3, 8192, &data, 2, BytesMut::with_capacity),
            Admission::Held
        ));
        // Elsewhere in the file, or another file: sent at once, the batch stays gathered.
        assert_eq!(
            parts(&sent(combiner.offer(
                3,
                1 << 30,
                &data,
                3,
                BytesMut::with_capacity
            ))),
            vec![3]
        );
        assert_eq!(
            parts(&sent(combiner.offer(
                4,
                8192,
                &data,
                4,
                BytesMut::with_capacity
            ))),
            vec![4]
        );
        // The batch still grows at its own end.
        assert!(matches!(
            combiner.offer(3, 12288, &data, 5, BytesMut::with_capacity),
            Admission::Held
        ));
        let batch = combiner.finished(3).expect("gathered");
        assert_eq!((batch.offset_bytes, parts(&batch)), (8192, vec![2, 5]));
        assert_eq!(batch.data.len(), 8192);
    }

    #[test]
    fn a_held_write_always_has_a_write_in_flight_to_release_it() {
        // Random offers and completions: whenever a batch is gathered, some write of its inode
        // is in flight, and when everything has finished nothing is left held.
        use ballast_common::random::{Random, SplitMix64};
        let mut random = SplitMix64::new(0x5eed);
        let mut combiner = WriteCombiner::default();
        let mut in_flight: Vec<CombinedWrite<u32>> = Vec::new();
        let mut answered = Vec::new();
        let mut offered = 0u32;
        for _ in 0..10_000 {
            if random.below(3) > 0 && offered < 5_000 {
                let inode = random.below(3);
                let offset = random.below(64) * 4096;
                let length = (1 + random.below(256)) as usize * 4096;
                if let Admission::Send(write) = combiner.offer(
                    inode,
                    offset,
                    &vec![0u8; length],
                    offered,
                    BytesMut::with_capacity,
                ) {
                    in_flight.push(write);
                }
                offered += 1;
            } else if !in_flight.is_empty() {
                let index = random.below(in_flight.len() as u64) as usize;
                let write = in_flight.swap_remove(index);
                answered.extend(parts(&write));
                if let Some(next) = combiner.finished(write.inode) {
                    in_flight.push(next);
                }
            }
            for (inode, stream) in &combiner.streams {
                if stream.gathering.is_some() {
                    assert!(
                        stream.in_flight > 0,
                        "inode {inode} holds writes with none in flight"
                    );
                }
            }
        }
        while let Some(write) = in_flight.pop() {
            answered.extend(parts(&write));
            if let Some(next) = combiner.finished(write.inode) {
                in_flight.push(next);
            }
        }
        assert_eq!(combiner.stream_count(), 0);
        answered.sort_unstable();
        assert_eq!(answered, (0..offered).collect::<Vec<_>>());
    }
}
