//! `SharedRegion`: memory that a FUSE driver shares with the storage node on its own host, so
//! the bytes of a read go from the node's buffer into the driver's memory instead of through
//! five copies (gRPC encoding, socket, tonic's frame gathering; `docs/architecture.md`).
//!
//! The driver creates the region (a sealed memfd), maps it, and hands the descriptor to the node
//! over a Unix socket (`SCM_RIGHTS`); the node maps the same pages. A read then names a slot of
//! the region; the node copies the read's blocks into it and answers with where the bytes are. A
//! write names a slot the driver filled; the node copies the bytes out once before it looks at
//! them.
//!
//! Owns: creating, sealing, mapping and unmapping the region, and passing its descriptor.
//! Must not depend on: gRPC, the node or the driver.
//! Invariants:
//! - A region is a whole number of 4 KiB pages, mapped shared, read-write, page aligned.
//! - A region is received only when its size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW`): the
//!   sender cannot truncate it under the receiver, which would turn the receiver's next access
//!   into SIGBUS. Its size must also be within the receiver's limit.
//! - The mapping lives as long as the value; callers that hand pointers into it to the kernel
//!   keep the value alive (an `Arc`) until the I/O completes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;

/// Size of the pages a region is made of, and of its alignment.
pub const SHARED_REGION_PAGE_BYTES: usize = 4096;

/// The header sent with the descriptor: a magic number and the region's size in bytes.
const ATTACH_MAGIC: u64 = 0x4241_4c4c_5348_4d31; // "BALLSHM1"
const ATTACH_HEADER_BYTES: usize = 16;

/// A mapped shared memory region. See the module documentation.
pub struct SharedRegion {
    pointer: NonNull<u8>,
    length_bytes: usize,
    file: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid at a fixed address for the value's lifetime;
// which bytes a thread may touch is the protocol's business (slots), as for any shared buffer.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&SharedRegion` hands out only raw pointers and copies.
unsafe impl Sync for SharedRegion {}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SharedRegion")
            .field("length_bytes", &self.length_bytes)
            .finish()
    }
}

fn last_error(what: &str) -> std::io::Error {
    let error = std::io::Error::last_os_error();
    std::io::Error::new(error.kind(), format!("{what}: {error}"))
}

impl SharedRegion {
    /// A new zero-filled region of `length_bytes` (a positive multiple of 4 KiB), its size
    /// sealed.
    pub fn create(name: &str, length_bytes: usize) -> std::io::Result<SharedRegion> {
        check_length(length_bytes, usize::MAX)?;
        let name = std::ffi::CString::new(name)
            .map_err(|_| std::io::Error::other("region name contains a NUL byte"))?;
        // SAFETY: a valid NUL-terminated name and constant flags; the result is checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(last_error("memfd_create"));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(file.as_raw_fd(), length_bytes as libc::off_t) } < 0 {
            return Err(last_error("ftruncate of the shared region"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(last_error("sealing the shared region"));
        }
        SharedRegion::map(file, length_bytes)
    }

    /// Maps a region received from another process, refusing one whose size is not sealed or
    /// is over `length_bytes_max`.
    pub fn from_received(file: OwnedFd, length_bytes_max: usize) -> std::io::Result<SharedRegion> {
        // SAFETY: plain syscall on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(last_error("reading the shared region's seals"));
        }
        let required = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals & required != required {
            return Err(std::io::Error::other(
                "the shared region's size is not sealed; refusing to map it",
            ));
        }
        // SAFETY: `stat` is plain old data, filled by fstat before it is read.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `stat` through a pointer to a live local.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut stat) } < 0 {
            return Err(last_error("fstat of the shared region"));
        }
        let length_bytes = usize::try_from(stat.st_size)
            .map_err(|_| std::io::Error::other("negative shared region size"))?;
        check_length(length_bytes, length_bytes_max)?;
        SharedRegion::map(file, length_bytes)
    }

    fn map(file: OwnedFd, length_bytes: usize) -> std::io::Result<SharedRegion> {
        // SAFETY: a fresh shared mapping of a descriptor we own, at an address the kernel picks;
        // the result is checked before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(last_error("mapping the shared region"));
        }
        let pointer = NonNull::new(address.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(SharedRegion {
            pointer,
            length_bytes,
            file,
        })
    }

    #[allow(clippy::len_without_is_empty)] // never empty by construction
    pub fn len(&self) -> usize {
        self.length_bytes
    }

    /// The address of byte `offset_bytes`, when `length_bytes` bytes from there lie inside the
    /// region.
    pub fn pointer_at(&self, offset_bytes: usize, length_bytes: usize) -> Option<NonNull<u8>> {
        let end = offset_bytes.checked_add(length_bytes)?;
        if end > self.length_bytes {
            return None;
        }
        // SAFETY: `offset_bytes <= end <= length_bytes`, inside (or one past) the mapping.
        NonNull::new(unsafe { self.pointer.as_ptr().add(offset_bytes) })
    }

    /// Runs `use_bytes` on `length_bytes` of the region from `offset_bytes` (`None` when
    /// outside it), for a caller that owns that range by the slot protocol.
    pub fn with_bytes<T>(
        &self,
        offset_bytes: usize,
        length_bytes: usize,
        use_bytes: impl FnOnce(&[u8]) -> T,
    ) -> Option<T> {
        let pointer = self.pointer_at(offset_bytes, length_bytes)?;
        // SAFETY: inside the mapping (checked above), initialised (shared memory is zero
        // filled when created). The borrow ends with the call. The range is the caller's slot,
        // which the other process writes only before it answers for it.
        let bytes = unsafe { std::slice::from_raw_parts(pointer.as_ptr(), length_bytes) };
        Some(use_bytes(bytes))
    }

    /// Runs `fill` on `length_bytes` of the region from `offset_bytes` (`None` when outside it),
    /// for a caller that owns that range by the slot protocol and fills it for the other side.
    pub fn with_bytes_mut<T>(
        &self,
        offset_bytes: usize,
        length_bytes: usize,
        fill: impl FnOnce(&mut [u8]) -> T,
    ) -> Option<T> {
        let pointer = self.pointer_at(offset_bytes, length_bytes)?;
        // SAFETY: inside the mapping (checked above), initialised, mapped read-write. The
        // borrow ends with the call. The range is the caller's slot: in this process nobody
        // else uses it meanwhile, and the other process reads it only after it was asked to,
        // which happens after this call.
        let bytes = unsafe { std::slice::from_raw_parts_mut(pointer.as_ptr(), length_bytes) };
        Some(fill(bytes))
    }

    /// Sends the region's descriptor and size over `stream` and reads back the receiver's
    /// answer: the id it gives the region, and its own id (a node id), so the sender can check
    /// it attached to the node it meant.
    pub fn send(&self, stream: &mut UnixStream) -> std::io::Result<(u64, u64)> {
        let mut header = [0u8; ATTACH_HEADER_BYTES];
        header[..8].copy_from_slice(&ATTACH_MAGIC.to_le_bytes());
        header[8..].copy_from_slice(&(self.length_bytes as u64).to_le_bytes());
        send_with_descriptor(stream, &header, self.file.as_raw_fd())?;
        let mut answer = [0u8; 16];
        stream.read_exact(&mut answer)?;
        Ok((
            u64::from_le_bytes(answer[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(answer[8..].try_into().expect("8 bytes")),
        ))
    }

    /// Receives a region sent with [`SharedRegion::send`] (the header must match the
    /// descriptor's sealed size), mapping it. The caller answers with [`answer_id`].
    pub fn receive(
        stream: &mut UnixStream,
        length_bytes_max: usize,
    ) -> std::io::Result<SharedRegion> {
        let (header, file) = receive_with_descriptor(stream)?;
        let magic = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        if magic != ATTACH_MAGIC {
            return Err(std::io::Error::other("not a shared region attach message"));
        }
        let announced_bytes = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let region = SharedRegion::from_received(file, length_bytes_max)?;
        if region.length_bytes as u64 != announced_bytes {
            return Err(std::io::Error::other(format!(
                "shared region announced {announced_bytes} bytes, holds {}",
                region.length_bytes
            )));
        }
        Ok(region)
    }
}

/// The receiver's answer to an attach: the id the sender names the region by, and the
/// receiver's own id.
pub fn answer_id(stream: &mut UnixStream, id: u64, receiver_id: u64) -> std::io::Result<()> {
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&id.to_le_bytes());
    answer[8..].copy_from_slice(&receiver_id.to_le_bytes());
    stream.write_all(&answer)
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no pointer into it outlives the
        // value (lenders hold the value in an `Arc` while the kernel may use its memory).
        let result = unsafe { libc::munmap(self.pointer.as_ptr().cast(), self.length_bytes) };
        if result != 0 {
            // Leaks address space only; nothing else to do in a destructor.
            let error = std::io::Error::last_os_error();
            eprintln!("unmapping a shared region failed: {error}");
        }
    }
}

fn check_length(length_bytes: usize, length_bytes_max: usize) -> std::io::Result<()> {
    if length_bytes == 0
        || length_bytes % SHARED_REGION_PAGE_BYTES != 0
        || length_bytes > length_bytes_max
    {
        return Err(std::io::Error::other(format!(
            "a shared region must be a positive multiple of {SHARED_REGION_PAGE_BYTES} bytes \
             and at most {length_bytes_max}: {length_bytes}"
        )));
    }
    Ok(())
}

/// The control buffer for one descriptor, aligned as `cmsghdr` requires.
#[repr(C)]
union DescriptorControl {
    header: libc::cmsghdr,
    bytes: [u8; 64],
}

fn send_with_descriptor(
    stream: &UnixStream,
    header: &[u8; ATTACH_HEADER_BYTES],
    descriptor: i32,
) -> std::io::Result<()> {
    let sent = send_message(stream, header, &[descriptor])?;
    if sent != header.len() {
        return Err(std::io::Error::other(
            "short send of the shared region header",
        ));
    }
    Ok(())
}

/// Descriptors one message may carry: their control message must fit [`DescriptorControl`].
const MESSAGE_DESCRIPTORS_MAX: usize = 4;

/// Sends `bytes` with `descriptors` (none, or up to [`MESSAGE_DESCRIPTORS_MAX`]) in one message;
/// answers how many bytes went.
fn send_message(stream: &UnixStream, bytes: &[u8], descriptors: &[i32]) -> std::io::Result<usize> {
    assert!(descriptors.len() <= MESSAGE_DESCRIPTORS_MAX);
    let mut io_vector = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = DescriptorControl { bytes: [0u8; 64] };
    let descriptors_bytes = std::mem::size_of_val(descriptors) as u32;
    // SAFETY: `message` is plain old data, every pointer field set below to live locals.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut io_vector;
    message.msg_iovlen = 1;
    if !descriptors.is_empty() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let control_length = unsafe { libc::CMSG_SPACE(descriptors_bytes) } as usize;
        assert!(control_length <= 64);
        message.msg_control = (&mut control as *mut DescriptorControl).cast();
        message.msg_controllen = control_length as _;
        // SAFETY: the control buffer is large enough for one header and the descriptors
        // (asserted), so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
        unsafe {
            let control_header = libc::CMSG_FIRSTHDR(&message);
            (*control_header).cmsg_level = libc::SOL_SOCKET;
            (*control_header).cmsg_type = libc::SCM_RIGHTS;
            (*control_header).cmsg_len = libc::CMSG_LEN(descriptors_bytes) as _;
            let data = libc::CMSG_DATA(control_header).cast::<i32>();
            for (index, descriptor) in descriptors.iter().enumerate() {
                std::ptr::write_unaligned(data.add(index), *descriptor);
            }
        }
    }
    // SAFETY: `message` points at live locals for the duration of the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(last_error("sending the shared region"));
    }
    Ok(sent as usize)
}

/// Raw attach messages for the fuzz target (`fuzz/fuzz_targets/shared_attach.rs`): any bytes
/// with any few descriptors, as a hostile or broken sender would send them. No behaviour of
/// its own.
#[doc(hidden)]
pub mod fuzzing {
    use std::os::unix::net::UnixStream;

    pub const ATTACH_MAGIC: u64 = super::ATTACH_MAGIC;
    pub const MESSAGE_DESCRIPTORS_MAX: usize = super::MESSAGE_DESCRIPTORS_MAX;

    pub fn send_message(
        stream: &UnixStream,
        bytes: &[u8],
        descriptors: &[i32],
    ) -> std::io::Result<usize> {
        super::send_message(stream, bytes, descriptors)
    }
}

fn receive_with_descriptor(
    stream: &UnixStream,
) -> std::io::Result<([u8; ATTACH_HEADER_BYTES], OwnedFd)> {
    let mut header = [0u8; ATTACH_HEADER_BYTES];
    let mut io_vector = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    let mut control = DescriptorControl { bytes: [0u8; 64] };
    // SAFETY: `message` is plain old data, every pointer field set below to live locals.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut io_vector;
    message.msg_iovlen = 1;
    message.msg_control = (&mut control as *mut DescriptorControl).cast();
    message.msg_controllen = 64;
    // SAFETY: `message` points at live locals for the duration of the call; descriptors
    // received are closed on exec.
    let received =
        unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(last_error("receiving the shared region"));
    }
    // Every descriptor that arrived is taken over first, so none leaks whatever follows.
    let mut descriptors = Vec::new();
    // SAFETY: the kernel filled `message` and the control buffer; the CMSG_* walk stays inside
    // `msg_controllen` bytes of it.
    unsafe {
        let mut control_header = libc::CMSG_FIRSTHDR(&message);
        while !control_header.is_null() {
            if (*control_header).cmsg_level == libc::SOL_SOCKET
                && (*control_header).cmsg_type == libc::SCM_RIGHTS
            {
                let data = libc::CMSG_DATA(control_header);
                let data_bytes =
                    (*control_header).cmsg_len as usize - (data as usize - control_header as usize);
                for index in 0..data_bytes / std::mem::size_of::<i32>() {
                    let raw = std::ptr::read_unaligned(data.cast::<i32>().add(index));
                    descriptors.push(OwnedFd::from_raw_fd(raw));
                }
            }
            control_header = libc::CMSG_NXTHDR(&message, control_header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("descriptors were cut off"));
    }
    if received as usize != header.len() {
        return Err(std::io::Error::other("short shared region header"));
    }
    if descriptors.len() != 1 {
        return Err(std::io::Error::other(format!(
            "expected one descriptor with the shared region, got {}",
            descriptors.len()
        )));
    }
    Ok((header, descriptors.pop().expect("one descriptor")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_sent_over_a_socket_shares_its_pages() {
        let region = SharedRegion::create("test", 4 * SHARED_REGION_PAGE_BYTES).unwrap();
        let (mut driver, mut node) = UnixStream::pair().unwrap();
        let receiver = std::thread::spawn(move || {
            let received = SharedRegion::receive(&mut node, 1 << 20).unwrap();
            let pointer = received.pointer_at(4096, 4096).unwrap();
            // SAFETY: one page inside the mapping, used by nobody else in this test.
            unsafe { std::ptr::write_bytes(pointer.as_ptr(), 0xAB, 4096) };
            answer_id(&mut node, 77, 3).unwrap();
            received
        });
        assert_eq!(region.send(&mut driver).unwrap(), (77, 3));
        let received = receiver.join().unwrap();
        assert_eq!(received.len(), region.len());
        let copy = |offset, length| region.with_bytes(offset, length, |bytes| bytes.to_vec());
        assert_eq!(copy(4096, 4096).unwrap(), vec![0xAB; 4096]);
        assert_eq!(copy(0, 4096).unwrap(), vec![0; 4096]);
        assert!(copy(3 * 4096, 4097).is_none(), "outside the region");
        assert_eq!(
            region.with_bytes(4096, 2, |bytes| bytes.to_vec()).unwrap(),
            vec![0xAB; 2]
        );
    }

    #[test]
    fn a_message_with_no_descriptor_or_two_is_refused() {
        let first = SharedRegion::create("first", SHARED_REGION_PAGE_BYTES).unwrap();
        let second = SharedRegion::create("second", SHARED_REGION_PAGE_BYTES).unwrap();
        let mut header = [0u8; ATTACH_HEADER_BYTES];
        header[..8].copy_from_slice(&ATTACH_MAGIC.to_le_bytes());
        header[8..].copy_from_slice(&(SHARED_REGION_PAGE_BYTES as u64).to_le_bytes());
        let both = [first.file.as_raw_fd(), second.file.as_raw_fd()];
        for descriptors in [&both[..0], &both[..]] {
            let (sender, mut receiver) = UnixStream::pair().unwrap();
            assert_eq!(
                send_message(&sender, &header, descriptors).unwrap(),
                header.len()
            );
            let error = SharedRegion::receive(&mut receiver, 1 << 20).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains(&format!("got {}", descriptors.len())),
                "{error}"
            );
        }
    }

    #[test]
    fn an_unsealed_or_oversized_region_is_refused() {
        // An unsealed memfd: its sender could shrink it under the receiver.
        let name = std::ffi::CString::new("unsealed").unwrap();
        // SAFETY: a valid name and constant flags; checked below.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our descriptor.
        assert_eq!(unsafe { libc::ftruncate(file.as_raw_fd(), 8192) }, 0);
        let error = SharedRegion::from_received(file, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("not sealed"), "{error}");

        let region = SharedRegion::create("big", 64 * SHARED_REGION_PAGE_BYTES).unwrap();
        let (mut driver, mut node) = UnixStream::pair().unwrap();
        let receiver =
            std::thread::spawn(move || SharedRegion::receive(&mut node, 4096).map(|_| ()));
        let header_sent = std::thread::spawn(move || {
            let mut header = [0u8; ATTACH_HEADER_BYTES];
            header[..8].copy_from_slice(&ATTACH_MAGIC.to_le_bytes());
            header[8..].copy_from_slice(&(region.len() as u64).to_le_bytes());
            send_with_descriptor(&driver, &header, region.file.as_raw_fd()).unwrap();
            driver.flush().unwrap();
        });
        header_sent.join().unwrap();
        let error = receiver.join().unwrap().unwrap_err();
        assert!(error.to_string().contains("at most 4096"), "{error}");
        assert!(SharedRegion::create("odd", 100).is_err());
    }
}
