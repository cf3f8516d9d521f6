//! Shared vocabulary of Ballast: names, errno values, checksums, and the clock and randomness
//! traits that core logic depends on (so it can run deterministically in tests).
//!
//! Owns: small value types used by both the server side and the client side.
//! Must not depend on: any other Ballast crate, any async runtime, any I/O.
//! Invariants: everything here is pure and deterministic given its inputs, except `allocator`
//! (one process-setup call, glibc `mallopt`, that the data-path binaries make at start) and
//! `shared_region` (the memory a FUSE driver shares with its node, and the Unix-socket handover
//! of its descriptor: both sides need the same wire form, and neither may depend on the other),
//! `local_frame` (the requests and answers on that socket, for the same reason), and
//! `shared_deadline` (the host's monotonic clock, which both read to agree on a request's
//! deadline).

pub mod allocator;
pub mod checksum;
pub mod clock;
pub mod errno;
pub mod local_frame;
pub mod name;
pub mod random;
pub mod shared_deadline;
pub mod shared_region;

pub use checksum::checksum;
pub use clock::{Clock, ManualClock, SystemClock};
pub use errno::Errno;
pub use name::{validate_entry_name, validate_volume_name, NameError};
pub use random::{Random, SplitMix64};
