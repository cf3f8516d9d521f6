//! Fuzzes `ballast_common::shared_region::SharedRegion::receive`, the storage node's side of a
//! FUSE driver attaching memory over the node's local socket: the message (header bytes and
//! descriptors) comes from another process, which may be broken or hostile.
//!
//! Each input describes one message: its header bytes (0-32 of them, optionally with the real
//! magic and a region size written over them), and up to four descriptors, each a memfd of a
//! chosen size (a whole number of pages or not), sealed fully, partly or not at all, or a
//! descriptor that is no memfd (a pipe), and the receiver's size limit.
//!
//! Must hold, for any message:
//! - receiving never panics;
//! - an accepted region is exactly what a well-formed attach describes: one descriptor, a
//!   header whose first 16 bytes hold the magic and the region's size, the size sealed against shrinking and
//!   growing, a positive whole number of pages within the limit; its bytes are the memfd's
//!   (zero), and the sender's writes through its own mapping show in it;
//! - no descriptor leaks, accepted or not: the process holds as many descriptors afterwards as
//!   before (each received one is closed on refusal, and the region's with the region).

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use ballast_common::shared_region::fuzzing::{send_message, ATTACH_MAGIC, MESSAGE_DESCRIPTORS_MAX};
use ballast_common::shared_region::{SharedRegion, SHARED_REGION_PAGE_BYTES};
use libfuzzer_sys::fuzz_target;

const HEADER_BYTES: usize = 16;

/// Open descriptors of this process.
fn descriptor_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// How one descriptor of the message is made, from one byte of input and a size byte.
struct DescriptorPlan {
    kind: u8,
    size_pages: usize,
    odd_bytes: usize,
}

impl DescriptorPlan {
    fn make(&self) -> OwnedFd {
        if self.kind % 5 == 4 {
            // Not a memfd at all: the read end of a pipe (no seals to read).
            let mut pipe = [0i32; 2];
            // SAFETY: `pipe` has room for the two descriptors the call writes.
            assert_eq!(
                unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
                0
            );
            // SAFETY: fresh descriptors we own; the write end is closed at once.
            unsafe {
                libc::close(pipe[1]);
                return OwnedFd::from_raw_fd(pipe[0]);
            }
        }
        let name = c"fuzz";
        // SAFETY: a valid name and constant flags; checked below.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        let size_bytes = self.size_pages * SHARED_REGION_PAGE_BYTES + self.odd_bytes;
        // SAFETY: plain syscall on our descriptor.
        assert_eq!(
            unsafe { libc::ftruncate(file.as_raw_fd(), size_bytes as libc::off_t) },
            0
        );
        let seals = match self.kind % 5 {
            0 => libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            1 => libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            2 => libc::F_SEAL_SHRINK,
            _ => 0,
        };
        if seals != 0 {
            // SAFETY: plain syscall on our descriptor.
            assert_eq!(
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                0
            );
        }
        file
    }

    fn well_formed(&self) -> bool {
        matches!(self.kind % 5, 0 | 1) && self.size_pages > 0 && self.odd_bytes == 0
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, header_length, limit_pages, descriptor_count_byte, rest @ ..] = data else {
        return;
    };
    let header_length = *header_length as usize % 33;
    let limit_bytes = (*limit_pages as usize % 9) * SHARED_REGION_PAGE_BYTES;
    let descriptor_wanted = *descriptor_count_byte as usize % (MESSAGE_DESCRIPTORS_MAX + 1);
    let Some((plan_bytes, header_source)) = rest.split_at_checked(descriptor_wanted * 3) else {
        return;
    };
    let plans: Vec<DescriptorPlan> = plan_bytes
        .chunks(3)
        .map(|plan| DescriptorPlan {
            kind: plan[0],
            size_pages: plan[1] as usize % 9,
            odd_bytes: if plan[2] % 4 == 0 {
                plan[2] as usize
            } else {
                0
            },
        })
        .collect();

    let mut header = vec![0u8; header_length];
    let copied = header_source.len().min(header_length);
    header[..copied].copy_from_slice(&header_source[..copied]);
    if flags & 1 != 0 && header_length >= 8 {
        header[..8].copy_from_slice(&ATTACH_MAGIC.to_le_bytes());
    }
    if flags & 2 != 0 && header_length >= HEADER_BYTES {
        let announced = plans.first().map_or(0, |plan| {
            (plan.size_pages * SHARED_REGION_PAGE_BYTES + plan.odd_bytes) as u64
        });
        header[8..16].copy_from_slice(&announced.to_le_bytes());
    }

    let descriptors_before = descriptor_count();
    {
        let (sender, mut receiver) = UnixStream::pair().expect("socket pair");
        let files: Vec<OwnedFd> = plans.iter().map(DescriptorPlan::make).collect();
        let raw: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
        // A zero-byte message with no descriptor is no message at all to the receiver; the
        // shutdown below then makes its read see the end of the stream.
        let _ = send_message(&sender, &header, &raw);
        sender
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let received = SharedRegion::receive(&mut receiver, limit_bytes);
        if let Ok(region) = received {
            let magic = header
                .get(..8)
                .map(|bytes| u64::from_le_bytes(bytes.try_into().unwrap()));
            let announced = header
                .get(8..16)
                .map(|bytes| u64::from_le_bytes(bytes.try_into().unwrap()));
            // A stream socket: the receiver takes the first 16 bytes as the header; more, sent
            // in the same message, stay unread in the socket.
            assert!(header.len() >= HEADER_BYTES, "accepted a short header");
            assert_eq!(magic, Some(ATTACH_MAGIC), "accepted without the magic");
            assert_eq!(plans.len(), 1, "accepted {} descriptors", plans.len());
            assert!(
                plans[0].well_formed(),
                "accepted a region that is not sealed pages"
            );
            assert_eq!(
                announced,
                Some(region.len() as u64),
                "size differs from the header"
            );
            assert!(region.len() > 0 && region.len() <= limit_bytes);
            assert_eq!(region.len() % SHARED_REGION_PAGE_BYTES, 0);
            assert!(region
                .with_bytes(0, region.len(), |bytes| bytes.iter().all(|&byte| byte == 0))
                .expect("the whole region"));
            // The sender's pages are the receiver's: write through the memfd, read through
            // the region.
            let last = region.len() - 1;
            // SAFETY: plain syscall on the sender's descriptor, one byte inside its size.
            let written = unsafe {
                libc::pwrite(
                    files[0].as_raw_fd(),
                    [0x5a_u8].as_ptr().cast(),
                    1,
                    last as i64,
                )
            };
            assert_eq!(written, 1);
            assert_eq!(region.with_bytes(last, 1, |bytes| bytes[0]), Some(0x5a));
            assert!(region.with_bytes(last, 2, |_| ()).is_none(), "past the end");
        }
    }
    assert_eq!(
        descriptor_count(),
        descriptors_before,
        "a descriptor leaked (flags {flags}, {} descriptors)",
        plans.len()
    );
});
