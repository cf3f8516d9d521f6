//! The filesystem state machine of one volume container: namespace (inodes, directories,
//! symlinks, hard links, orphans) and file data (4 KiB blocks, copy-on-write).
//!
//! Owns: the meaning of every [`FilesystemCommand`] and the read paths (lookup, getattr,
//! readdir, readlink, read, statfs) that serve from the applied state.
//! Must not depend on: Raft internals, gRPC. It sees only a [`Transaction`] and [`NodeStorage`].
//!
//! Invariants:
//! - Bytes of a file block beyond end-of-file are zero (truncate zeroes the tail of a partial
//!   block), so extending a file never exposes old data.
//! - Every referenced block has a CRC-32 in its `BlockRef`; reads verify it.
//! - `inode.block_count` and `state.used_block_count` equal the block rows that exist.
//! - A directory's `entry_count` equals its directory entries; `nlink` is 2 + subdirectories.

use ballast_common::validate_entry_name;
use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};

use crate::command::{
    AttributeChanges, CommandResponse, FilesystemCommand, FALLOCATE_KEEP_SIZE,
    FALLOCATE_PUNCH_HOLE, RENAME_EXCHANGE, RENAME_NOREPLACE,
};
use crate::error::{FsError, NodeError, NodeResult};
use crate::keys;
use crate::records::{decode, BlockRef, ContainerState, DirentValue, EntryKind, Inode, ROOT_INODE};
use crate::storage::NodeStorage;
use crate::transaction::{CookieRow, Transaction};

const BLOCK_SIZE: u64 = BLOCK_SIZE_BYTES as u64;
/// Largest file: 1 PiB.
pub const FILE_SIZE_BYTES_MAX: u64 = 1 << 50;
/// Longest symlink target, as Linux PATH_MAX.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4095;
/// Readdir cookies 1 and 2 are `.` and `..`; real entries start here.
pub const DIRECTORY_COOKIE_FIRST: u64 = 3;
/// Most orphans freed by one PurgeOrphans command (bounds the batch).
const ORPHANS_PER_PURGE_MAX: usize = 1024;
/// Most blocks one fallocate may span: 4 GiB. The holes become unwritten references in the
/// chunk rows of the command's one batch (about 1.3 KB per MiB), so this bounds that batch to
/// about 5.5 MB and the transaction's staged chunks to 4,096; the client crate sends larger
/// ranges in pieces (`FALLOCATE_BYTES_PER_REQUEST_MAX`).
pub const FALLOCATE_BLOCK_COUNT_MAX: u64 = 1 << 20;

/// Applies one filesystem command. `Err(NodeError::Fs(..))` is a deterministic command failure.
pub async fn apply(
    transaction: &mut Transaction<'_>,
    command: FilesystemCommand,
) -> NodeResult<CommandResponse> {
    match command {
        FilesystemCommand::Initialize {
            volume_id,
            quota_bytes,
            now_ns,
        } => initialize(transaction, volume_id, quota_bytes, now_ns),
        FilesystemCommand::Create {
            parent,
            name,
            kind,
            mode,
            uid,
            gid,
            symlink_target,
            exclusive,
            now_ns,
        } => create(
            transaction,
            parent,
            &name,
            kind,
            mode,
            uid,
            gid,
            symlink_target,
            exclusive,
            now_ns,
        ),
        FilesystemCommand::Link {
            inode,
            new_parent,
            new_name,
            now_ns,
        } => link(transaction, inode, new_parent, &new_name, now_ns),
        FilesystemCommand::Unlink {
            parent,
            name,
            directory,
            now_ns,
        } => unlink(transaction, parent, &name, directory, now_ns),
        FilesystemCommand::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
            now_ns,
        } => rename(
            transaction,
            parent,
            &name,
            new_parent,
            &new_name,
            flags,
            now_ns,
        ),
        FilesystemCommand::SetAttributes {
            inode,
            changes,
            now_ns,
        } => set_attributes(transaction, inode, changes, now_ns).await,
        FilesystemCommand::Write {
            inode,
            offset_bytes,
            data,
            now_ns,
            prewritten: _,
        } => write(transaction, inode, offset_bytes, &data, now_ns).await,
        FilesystemCommand::Fallocate {
            inode,
            offset_bytes,
            length_bytes,
            mode,
            now_ns,
        } => fallocate(transaction, inode, offset_bytes, length_bytes, mode, now_ns).await,
        FilesystemCommand::PurgeOrphans { inode } => purge_orphans(transaction, inode),
        FilesystemCommand::SetQuota { quota_bytes } => set_quota(transaction, quota_bytes),
    }
}

fn attributes(inode: u64, attributes: Inode) -> NodeResult<CommandResponse> {
    Ok(CommandResponse::Attributes { inode, attributes })
}

fn check_name(name: &str) -> NodeResult<()> {
    validate_entry_name(name).map_err(|error| match error {
        ballast_common::NameError::TooLong { .. } => {
            FsError::name_too_long(error.to_string()).into()
        }
        _ => FsError::invalid(error.to_string()).into(),
    })
}

fn initialize(
    transaction: &mut Transaction<'_>,
    volume_id: u64,
    quota_bytes: u64,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    if let Some(root) = transaction.inode(ROOT_INODE)? {
        return attributes(ROOT_INODE, root);
    }
    let root = Inode {
        kind: EntryKind::Directory,
        mode: 0o755,
        uid: 0,
        gid: 0,
        nlink: 2,
        size_bytes: 0,
        block_count: 0,
        atime_ns: now_ns,
        mtime_ns: now_ns,
        ctime_ns: now_ns,
        generation: 1,
        symlink_target: None,
        parent: ROOT_INODE,
        entry_count: 0,
        cookie_next: DIRECTORY_COOKIE_FIRST,
    };
    transaction.put_inode(ROOT_INODE, root.clone());
    transaction.state.inode_next = ROOT_INODE + 1;
    transaction.state.inode_count = 1;
    transaction.state.volume_id = volume_id;
    transaction.state.quota_bytes = quota_bytes;
    attributes(ROOT_INODE, root)
}

#[allow(clippy::too_many_arguments)]
fn create(
    transaction: &mut Transaction<'_>,
    parent: u64,
    name: &str,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    symlink_target: Option<String>,
    exclusive: bool,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    check_name(name)?;
    let mut directory = transaction.require_directory(parent)?;
    if let Some(existing) = transaction.dirent(parent, name)? {
        if exclusive || kind != EntryKind::File || existing.kind != EntryKind::File {
            return Err(FsError::exists(format!("{name:?} exists in directory {parent}")).into());
        }
        let inode = transaction.require_inode(existing.inode)?;
        return attributes(existing.inode, inode);
    }
    let size_bytes = match (kind, &symlink_target) {
        (EntryKind::Symlink, Some(target))
            if !target.is_empty() && target.len() <= SYMLINK_TARGET_BYTES_MAX =>
        {
            target.len() as u64
        }
        (EntryKind::Symlink, _) => {
            return Err(FsError::invalid("a symlink target must be 1 to 4095 bytes").into())
        }
        (EntryKind::Directory | EntryKind::File, _) => 0,
        (EntryKind::Table | EntryKind::Stream, _) => {
            return Err(FsError::not_supported("tables and streams are not served yet").into())
        }
    };
    let inode_number = transaction.state.inode_next;
    transaction.state.inode_next += 1;
    transaction.state.inode_count += 1;
    let is_directory = kind == EntryKind::Directory;
    let inode = Inode {
        kind,
        mode: mode & 0o7777,
        uid,
        gid,
        nlink: if is_directory { 2 } else { 1 },
        size_bytes,
        block_count: 0,
        atime_ns: now_ns,
        mtime_ns: now_ns,
        ctime_ns: now_ns,
        generation: 1,
        symlink_target: if kind == EntryKind::Symlink {
            symlink_target
        } else {
            None
        },
        parent,
        entry_count: 0,
        cookie_next: DIRECTORY_COOKIE_FIRST,
    };
    transaction.put_inode(inode_number, inode.clone());
    let cookie = directory.cookie_next;
    directory.cookie_next += 1;
    directory.entry_count += 1;
    if is_directory {
        directory.nlink += 1;
    }
    directory.mtime_ns = now_ns;
    directory.ctime_ns = now_ns;
    transaction.put_inode(parent, directory);
    transaction.put_dirent(
        parent,
        name,
        DirentValue {
            inode: inode_number,
            kind,
            cookie,
        },
    );
    attributes(inode_number, inode)
}

fn link(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    new_parent: u64,
    new_name: &str,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    check_name(new_name)?;
    let mut inode = transaction.require_inode(inode_number)?;
    if inode.kind == EntryKind::Directory {
        return Err(FsError::not_permitted("hard links to directories are not allowed").into());
    }
    if inode.nlink == 0 {
        return Err(FsError::not_found(format!("inode {inode_number} was unlinked")).into());
    }
    let mut directory = transaction.require_directory(new_parent)?;
    if transaction.dirent(new_parent, new_name)?.is_some() {
        return Err(
            FsError::exists(format!("{new_name:?} exists in directory {new_parent}")).into(),
        );
    }
    if inode.nlink >= u32::MAX - 1 {
        return Err(FsError::new(ballast_common::Errno::EMLINK, "too many links").into());
    }
    inode.nlink += 1;
    inode.ctime_ns = now_ns;
    let cookie = directory.cookie_next;
    directory.cookie_next += 1;
    directory.entry_count += 1;
    directory.mtime_ns = now_ns;
    directory.ctime_ns = now_ns;
    transaction.put_inode(new_parent, directory);
    transaction.put_dirent(
        new_parent,
        new_name,
        DirentValue {
            inode: inode_number,
            kind: inode.kind,
            cookie,
        },
    );
    transaction.put_inode(inode_number, inode.clone());
    attributes(inode_number, inode)
}

/// Drops one link to `inode_number` (not a directory). Returns whether it became an orphan.
fn drop_link(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    now_ns: i64,
) -> NodeResult<bool> {
    let mut inode = transaction.require_inode(inode_number)?;
    assert_ne!(
        inode.kind,
        EntryKind::Directory,
        "drop_link is for non-directories"
    );
    assert!(inode.nlink > 0, "a linked inode has nlink > 0");
    inode.nlink -= 1;
    inode.ctime_ns = now_ns;
    if inode.nlink > 0 {
        transaction.put_inode(inode_number, inode);
        return Ok(false);
    }
    if inode.kind == EntryKind::File {
        // Kept until its last open handle closes (unlink while open).
        transaction.put_inode(inode_number, inode);
        let key = keys::orphan(transaction.container_id, inode_number);
        transaction.batch().put(key, Vec::new());
        Ok(true)
    } else {
        transaction.delete_inode(inode_number);
        transaction.state.inode_count -= 1;
        Ok(false)
    }
}

/// Removes an empty directory inode whose entry is being removed.
fn drop_directory(transaction: &mut Transaction<'_>, inode_number: u64) -> NodeResult<()> {
    let directory = transaction.require_inode(inode_number)?;
    assert_eq!(directory.kind, EntryKind::Directory);
    assert_eq!(
        directory.entry_count, 0,
        "only empty directories are dropped"
    );
    transaction.delete_inode(inode_number);
    transaction.state.inode_count -= 1;
    Ok(())
}

fn unlink(
    transaction: &mut Transaction<'_>,
    parent: u64,
    name: &str,
    directory_wanted: bool,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    check_name(name)?;
    let mut directory = transaction.require_directory(parent)?;
    let entry = transaction
        .dirent(parent, name)?
        .ok_or_else(|| FsError::not_found(format!("{name:?} not in directory {parent}")))?;
    let child = transaction.require_inode(entry.inode)?;
    let is_directory = child.kind == EntryKind::Directory;
    if directory_wanted && !is_directory {
        return Err(FsError::not_directory(format!("{name:?} is not a directory")).into());
    }
    if !directory_wanted && is_directory {
        return Err(FsError::is_directory(format!("{name:?} is a directory")).into());
    }
    if is_directory && child.entry_count > 0 {
        return Err(FsError::not_empty(format!("directory {name:?} is not empty")).into());
    }
    transaction.delete_dirent(parent, name, entry.cookie);
    directory.entry_count -= 1;
    directory.mtime_ns = now_ns;
    directory.ctime_ns = now_ns;
    let orphaned = if is_directory {
        directory.nlink -= 1;
        transaction.put_inode(parent, directory);
        drop_directory(transaction, entry.inode)?;
        false
    } else {
        transaction.put_inode(parent, directory);
        drop_link(transaction, entry.inode, now_ns)?
    };
    Ok(CommandResponse::Unlinked {
        inode: entry.inode,
        orphaned,
    })
}

/// True when `candidate` is `ancestor` or lies below it.
fn is_within(transaction: &mut Transaction<'_>, candidate: u64, ancestor: u64) -> NodeResult<bool> {
    let mut current = candidate;
    // Bounded walk: a directory tree deeper than this is treated as a loop (corruption).
    for _ in 0..65_536 {
        if current == ancestor {
            return Ok(true);
        }
        if current == ROOT_INODE {
            return Ok(false);
        }
        current = transaction.require_inode(current)?.parent;
    }
    Err(NodeError::InvalidState(format!(
        "directory loop above inode {candidate}"
    )))
}

fn rename(
    transaction: &mut Transaction<'_>,
    parent: u64,
    name: &str,
    new_parent: u64,
    new_name: &str,
    flags: u32,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    check_name(name)?;
    check_name(new_name)?;
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
        || flags == (RENAME_NOREPLACE | RENAME_EXCHANGE)
    {
        return Err(FsError::invalid(format!("unsupported rename flags {flags:#x}")).into());
    }
    transaction.require_directory(parent)?;
    transaction.require_directory(new_parent)?;
    let source = transaction
        .dirent(parent, name)?
        .ok_or_else(|| FsError::not_found(format!("{name:?} not in directory {parent}")))?;
    let target = transaction.dirent(new_parent, new_name)?;

    if flags & RENAME_EXCHANGE != 0 {
        let target = target.ok_or_else(|| {
            FsError::not_found(format!("{new_name:?} not in directory {new_parent}"))
        })?;
        return exchange(
            transaction,
            parent,
            name,
            source,
            new_parent,
            new_name,
            target,
            now_ns,
        );
    }
    if let Some(target) = &target {
        if target.inode == source.inode {
            return Ok(CommandResponse::Renamed {
                replaced_inode: 0,
                replaced_orphaned: false,
            });
        }
        if flags & RENAME_NOREPLACE != 0 {
            return Err(
                FsError::exists(format!("{new_name:?} exists in directory {new_parent}")).into(),
            );
        }
    }
    let source_is_directory = source.kind == EntryKind::Directory;
    if source_is_directory && is_within(transaction, new_parent, source.inode)? {
        return Err(FsError::invalid("cannot move a directory into itself").into());
    }
    let mut replaced_inode = 0;
    let mut replaced_orphaned = false;
    if let Some(target) = target {
        let target_inode = transaction.require_inode(target.inode)?;
        let target_is_directory = target_inode.kind == EntryKind::Directory;
        match (source_is_directory, target_is_directory) {
            (false, true) => {
                return Err(FsError::is_directory(format!("{new_name:?} is a directory")).into())
            }
            (true, false) => {
                return Err(
                    FsError::not_directory(format!("{new_name:?} is not a directory")).into(),
                )
            }
            (true, true) if target_inode.entry_count > 0 => {
                return Err(
                    FsError::not_empty(format!("directory {new_name:?} is not empty")).into(),
                )
            }
            _ => {}
        }
        transaction.delete_dirent(new_parent, new_name, target.cookie);
        let mut directory = transaction.require_inode(new_parent)?;
        directory.entry_count -= 1;
        if target_is_directory {
            directory.nlink -= 1;
            transaction.put_inode(new_parent, directory);
            drop_directory(transaction, target.inode)?;
        } else {
            transaction.put_inode(new_parent, directory);
            replaced_orphaned = drop_link(transaction, target.inode, now_ns)?;
        }
        replaced_inode = target.inode;
    }
    // Remove the source entry.
    transaction.delete_dirent(parent, name, source.cookie);
    let mut old_directory = transaction.require_inode(parent)?;
    old_directory.entry_count -= 1;
    if source_is_directory {
        old_directory.nlink -= 1;
    }
    old_directory.mtime_ns = now_ns;
    old_directory.ctime_ns = now_ns;
    transaction.put_inode(parent, old_directory);
    // Add it under the new name.
    let mut new_directory = transaction.require_inode(new_parent)?;
    let cookie = new_directory.cookie_next;
    new_directory.cookie_next += 1;
    new_directory.entry_count += 1;
    if source_is_directory {
        new_directory.nlink += 1;
    }
    new_directory.mtime_ns = now_ns;
    new_directory.ctime_ns = now_ns;
    transaction.put_inode(new_parent, new_directory);
    transaction.put_dirent(
        new_parent,
        new_name,
        DirentValue {
            inode: source.inode,
            kind: source.kind,
            cookie,
        },
    );
    let mut moved = transaction.require_inode(source.inode)?;
    moved.ctime_ns = now_ns;
    if source_is_directory {
        moved.parent = new_parent;
    }
    transaction.put_inode(source.inode, moved);
    Ok(CommandResponse::Renamed {
        replaced_inode,
        replaced_orphaned,
    })
}

#[allow(clippy::too_many_arguments)]
fn exchange(
    transaction: &mut Transaction<'_>,
    parent: u64,
    name: &str,
    source: DirentValue,
    new_parent: u64,
    new_name: &str,
    target: DirentValue,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    if source.inode == target.inode {
        return Ok(CommandResponse::Renamed {
            replaced_inode: 0,
            replaced_orphaned: false,
        });
    }
    let source_is_directory = source.kind == EntryKind::Directory;
    let target_is_directory = target.kind == EntryKind::Directory;
    if parent != new_parent {
        if source_is_directory && is_within(transaction, new_parent, source.inode)? {
            return Err(FsError::invalid("cannot move a directory into itself").into());
        }
        if target_is_directory && is_within(transaction, parent, target.inode)? {
            return Err(FsError::invalid("cannot move a directory into itself").into());
        }
    }
    // Each slot keeps its cookie; only what it points at changes.
    transaction.put_dirent(
        parent,
        name,
        DirentValue {
            inode: target.inode,
            kind: target.kind,
            cookie: source.cookie,
        },
    );
    transaction.put_dirent(
        new_parent,
        new_name,
        DirentValue {
            inode: source.inode,
            kind: source.kind,
            cookie: target.cookie,
        },
    );
    if parent != new_parent && source_is_directory != target_is_directory {
        let (gains, loses) = if source_is_directory {
            (new_parent, parent)
        } else {
            (parent, new_parent)
        };
        let mut gaining = transaction.require_inode(gains)?;
        gaining.nlink += 1;
        transaction.put_inode(gains, gaining);
        let mut losing = transaction.require_inode(loses)?;
        losing.nlink -= 1;
        transaction.put_inode(loses, losing);
    }
    for (moved, destination, is_directory) in [
        (source.inode, new_parent, source_is_directory),
        (target.inode, parent, target_is_directory),
    ] {
        let mut inode = transaction.require_inode(moved)?;
        inode.ctime_ns = now_ns;
        if is_directory {
            inode.parent = destination;
        }
        transaction.put_inode(moved, inode);
    }
    for directory_number in [parent, new_parent] {
        let mut directory = transaction.require_inode(directory_number)?;
        directory.mtime_ns = now_ns;
        directory.ctime_ns = now_ns;
        transaction.put_inode(directory_number, directory);
    }
    Ok(CommandResponse::Renamed {
        replaced_inode: 0,
        replaced_orphaned: false,
    })
}

/// The block references of a read served on the runtime: from memory when every row is
/// there, else on this thread made a blocking one ([`tokio::task::block_in_place`]; the
/// runtime moves its other tasks to another thread meanwhile), so a read whose rows must come
/// from the state filesystem never holds up the requests that need no I/O. On a runtime of one
/// thread (unit tests) and outside a runtime the scan simply runs here.
fn block_references_for_read(
    storage: &NodeStorage,
    container_id: u64,
    inode: u64,
    first: u64,
    last: u64,
) -> NodeResult<Vec<(u64, BlockRef)>> {
    if let Some(references) =
        crate::block_map::references_in_memory(&storage.state, container_id, inode, first, last)?
    {
        return Ok(references);
    }
    let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    let scan = || crate::block_map::references(&storage.state, container_id, inode, first, last);
    if multi_thread {
        tokio::task::block_in_place(scan)
    } else {
        scan()
    }
}

/// Reads one referenced block (verified) into `destination`.
async fn read_block_into(
    transaction: &Transaction<'_>,
    reference: BlockRef,
    destination: &mut [u8],
    context: &str,
) -> NodeResult<()> {
    match transaction
        .storage
        .read_verified(&[reference], context)
        .await
    {
        Ok(bytes) => {
            destination.copy_from_slice(&bytes);
            Ok(())
        }
        // A corrupt block met while applying: the command fails with EIO instead of writing a
        // block built on wrong bytes.
        Err(NodeError::ChecksumMismatch(message)) => Err(FsError::io(message).into()),
        Err(other) => Err(other),
    }
}

/// What a ranged rewrite puts into the file.
#[derive(Clone, Copy)]
enum Fill<'data> {
    Data(&'data [u8]),
    Zeros(u64),
}

impl Fill<'_> {
    fn length_bytes(&self) -> u64 {
        match self {
            Fill::Data(data) => data.len() as u64,
            Fill::Zeros(length) => *length,
        }
    }
}

/// Rewrites file bytes `offset..offset+fill.length` copy-on-write: partial edge blocks are
/// merged with their current content, every touched block gets a new device block, the old
/// blocks are freed (deferred). Returns the number of blocks written. When `only_existing` is
/// set, blocks with no reference (holes) are left alone (used to zero edges of punched ranges).
async fn rewrite_range(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    inode: &mut Inode,
    offset_bytes: u64,
    fill: Fill<'_>,
    only_existing: bool,
) -> NodeResult<()> {
    let length = fill.length_bytes();
    assert!(length > 0);
    let end = offset_bytes + length;
    let first = offset_bytes / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    let existing = transaction.block_references(inode_number, first, last)?;
    if only_existing && existing.is_empty() {
        return Ok(());
    }
    // With only_existing, the range must be within one block (edges of a punched hole).
    assert!(!only_existing || first == last);
    let block_count = last - first + 1;
    let new_blocks = block_count - existing.len() as u64;
    check_quota(transaction, new_blocks)?;
    let head_partial = offset_bytes % BLOCK_SIZE != 0;
    let tail_partial = end % BLOCK_SIZE != 0;
    if let Fill::Data(data) = fill {
        // A detached write: its log writer already put the data in blocks; install them.
        if !head_partial && !tail_partial {
            if let Some((device_blocks, checksums)) = transaction.use_detached(data) {
                assert_eq!(device_blocks.len() as u64, block_count);
                install_blocks(transaction, inode_number, first, &device_blocks, &checksums)?;
                for (_, reference) in &existing {
                    transaction.free_reference(reference);
                }
                inode.block_count += new_blocks;
                transaction.state.used_block_count += new_blocks;
                return Ok(());
            }
        }
    }
    let mut buffer = AlignedBuffer::new_zeroed((block_count * BLOCK_SIZE) as usize);
    for &(file_block, reference) in &existing {
        let needs_merge =
            (file_block == first && head_partial) || (file_block == last && tail_partial);
        if needs_merge {
            let position = ((file_block - first) * BLOCK_SIZE) as usize;
            read_block_into(
                transaction,
                reference,
                &mut buffer[position..position + BLOCK_SIZE_BYTES],
                &format!("inode {inode_number} block {file_block}"),
            )
            .await?;
        }
    }
    let start_in_buffer = (offset_bytes - first * BLOCK_SIZE) as usize;
    match fill {
        Fill::Data(data) => {
            buffer[start_in_buffer..start_in_buffer + data.len()].copy_from_slice(data)
        }
        Fill::Zeros(length) => buffer[start_in_buffer..start_in_buffer + length as usize].fill(0),
    }
    let checksums: Vec<u32> = buffer
        .chunks(BLOCK_SIZE_BYTES)
        .map(ballast_common::checksum)
        .collect();
    let device_blocks = transaction.storage.write_new_blocks(buffer).await?;
    transaction.record_allocated(&device_blocks);
    install_blocks(transaction, inode_number, first, &device_blocks, &checksums)?;
    for (_, reference) in &existing {
        transaction.free_reference(reference);
    }
    inode.block_count += new_blocks;
    transaction.state.used_block_count += new_blocks;
    Ok(())
}

/// Refuses `new_blocks` more blocks (written or unwritten) past the volume's quota.
fn check_quota(transaction: &Transaction<'_>, new_blocks: u64) -> NodeResult<()> {
    let quota = transaction.state.quota_bytes;
    if quota > 0 && (transaction.state.used_block_count + new_blocks) * BLOCK_SIZE > quota {
        return Err(FsError::no_space(format!(
            "volume quota of {quota} bytes reached ({} bytes used, {} more needed)",
            transaction.state.used_block_count * BLOCK_SIZE,
            new_blocks * BLOCK_SIZE
        ))
        .into());
    }
    Ok(())
}

/// Stages the references of file blocks `first..` pointing at `device_blocks`.
fn install_blocks(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    first: u64,
    device_blocks: &[u64],
    checksums: &[u32],
) -> NodeResult<()> {
    assert_eq!(device_blocks.len(), checksums.len());
    let changes = device_blocks.iter().zip(checksums).enumerate().map(
        |(position, (&device_block, &checksum))| {
            let reference = BlockRef {
                device_block,
                checksum,
            };
            (first + position as u64, Some(reference))
        },
    );
    transaction.set_block_references(inode_number, changes)
}

/// Drops the block references of file blocks `first..=last` (which must be whole blocks).
fn drop_blocks(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    inode: &mut Inode,
    first: u64,
    last: u64,
) -> NodeResult<()> {
    if first > last {
        return Ok(());
    }
    let existing = transaction.block_references(inode_number, first, last)?;
    transaction.set_block_references(
        inode_number,
        existing.iter().map(|(file_block, _)| (*file_block, None)),
    )?;
    for (_, reference) in &existing {
        transaction.free_reference(reference);
    }
    let count = existing.len() as u64;
    assert!(inode.block_count >= count && transaction.state.used_block_count >= count);
    inode.block_count -= count;
    transaction.state.used_block_count -= count;
    Ok(())
}

fn require_file(inode_number: u64, inode: &Inode) -> NodeResult<()> {
    match inode.kind {
        EntryKind::File => Ok(()),
        EntryKind::Directory => {
            Err(FsError::is_directory(format!("inode {inode_number} is a directory")).into())
        }
        _ => Err(FsError::invalid(format!("inode {inode_number} is not a regular file")).into()),
    }
}

async fn truncate(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    inode: &mut Inode,
    size_bytes: u64,
) -> NodeResult<()> {
    if size_bytes > FILE_SIZE_BYTES_MAX {
        return Err(FsError::file_too_big(format!(
            "{size_bytes} bytes exceeds the file size limit"
        ))
        .into());
    }
    if size_bytes < inode.size_bytes {
        let keep_blocks = size_bytes.div_ceil(BLOCK_SIZE);
        drop_blocks(transaction, inode_number, inode, keep_blocks, u64::MAX - 1)?;
        if size_bytes % BLOCK_SIZE != 0 {
            // Keep the invariant: bytes past end-of-file within the last block are zero.
            let zero_length = BLOCK_SIZE - size_bytes % BLOCK_SIZE;
            rewrite_range(
                transaction,
                inode_number,
                inode,
                size_bytes,
                Fill::Zeros(zero_length),
                true,
            )
            .await?;
        }
    }
    inode.size_bytes = size_bytes;
    Ok(())
}

async fn set_attributes(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    changes: AttributeChanges,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    let mut inode = transaction.require_inode(inode_number)?;
    if let Some(size_bytes) = changes.size_bytes {
        require_file(inode_number, &inode)?;
        if size_bytes != inode.size_bytes {
            truncate(transaction, inode_number, &mut inode, size_bytes).await?;
        }
        // POSIX: a successful truncate updates mtime and ctime even when the size is unchanged.
        inode.mtime_ns = now_ns;
    }
    if let Some(mode) = changes.mode {
        inode.mode = mode & 0o7777;
    }
    if let Some(uid) = changes.uid {
        inode.uid = uid;
    }
    if let Some(gid) = changes.gid {
        inode.gid = gid;
    }
    if let Some(atime_ns) = changes.atime_ns {
        inode.atime_ns = atime_ns;
    }
    if let Some(mtime_ns) = changes.mtime_ns {
        inode.mtime_ns = mtime_ns;
    }
    inode.ctime_ns = now_ns;
    transaction.put_inode(inode_number, inode.clone());
    attributes(inode_number, inode)
}

async fn write(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    offset_bytes: u64,
    data: &[u8],
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    let mut inode = transaction.require_inode(inode_number)?;
    require_file(inode_number, &inode)?;
    let end = offset_bytes
        .checked_add(data.len() as u64)
        .filter(|&end| end <= FILE_SIZE_BYTES_MAX)
        .ok_or_else(|| FsError::file_too_big("write past the file size limit"))?;
    if !data.is_empty() {
        rewrite_range(
            transaction,
            inode_number,
            &mut inode,
            offset_bytes,
            Fill::Data(data),
            false,
        )
        .await?;
        inode.size_bytes = inode.size_bytes.max(end);
        inode.mtime_ns = now_ns;
        inode.ctime_ns = now_ns;
        transaction.put_inode(inode_number, inode.clone());
    }
    Ok(CommandResponse::Written {
        written_bytes: data.len() as u32,
        inode: inode_number,
        attributes: inode,
    })
}

async fn fallocate(
    transaction: &mut Transaction<'_>,
    inode_number: u64,
    offset_bytes: u64,
    length_bytes: u64,
    mode: u32,
    now_ns: i64,
) -> NodeResult<CommandResponse> {
    let mut inode = transaction.require_inode(inode_number)?;
    require_file(inode_number, &inode)?;
    if length_bytes == 0 {
        return Err(FsError::invalid("fallocate length must be positive").into());
    }
    let end = offset_bytes
        .checked_add(length_bytes)
        .filter(|&end| end <= FILE_SIZE_BYTES_MAX)
        .ok_or_else(|| FsError::file_too_big("fallocate past the file size limit"))?;
    let keep_size = mode & FALLOCATE_KEEP_SIZE != 0;
    if mode & !(FALLOCATE_KEEP_SIZE | FALLOCATE_PUNCH_HOLE) != 0 {
        return Err(
            FsError::not_supported(format!("fallocate mode {mode:#x} is not supported")).into(),
        );
    }
    if mode & FALLOCATE_PUNCH_HOLE != 0 {
        if !keep_size {
            return Err(FsError::not_supported("PUNCH_HOLE requires KEEP_SIZE").into());
        }
        let end = end.min(inode.size_bytes);
        if offset_bytes < end {
            let first_whole = offset_bytes.div_ceil(BLOCK_SIZE);
            let end_whole = end / BLOCK_SIZE; // exclusive
            if first_whole < end_whole {
                drop_blocks(
                    transaction,
                    inode_number,
                    &mut inode,
                    first_whole,
                    end_whole - 1,
                )?;
            }
            // Zero the partial edges that remain.
            let head_end = (first_whole * BLOCK_SIZE).min(end);
            if offset_bytes < head_end {
                rewrite_range(
                    transaction,
                    inode_number,
                    &mut inode,
                    offset_bytes,
                    Fill::Zeros(head_end - offset_bytes),
                    true,
                )
                .await?;
            }
            let tail_start = (end_whole * BLOCK_SIZE).max(head_end);
            if tail_start < end {
                rewrite_range(
                    transaction,
                    inode_number,
                    &mut inode,
                    tail_start,
                    Fill::Zeros(end - tail_start),
                    true,
                )
                .await?;
            }
        }
    } else {
        // Every hole block in the range gets an unwritten reference: it reads as zeros and
        // counts against the quota, and nothing is written to the device (writing zeros doubled
        // the device bytes of every file laid out with fallocate, as fio and InnoDB do).
        let first = offset_bytes / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        if last - first + 1 > FALLOCATE_BLOCK_COUNT_MAX {
            return Err(FsError::not_supported(format!(
                "fallocate of {length_bytes} bytes: at most {} bytes at once",
                FALLOCATE_BLOCK_COUNT_MAX * BLOCK_SIZE
            ))
            .into());
        }
        let existing: std::collections::BTreeSet<u64> = transaction
            .block_references(inode_number, first, last)?
            .into_iter()
            .map(|(file_block, _)| file_block)
            .collect();
        let new_blocks = (last - first + 1) - existing.len() as u64;
        check_quota(transaction, new_blocks)?;
        transaction.set_block_references(
            inode_number,
            (first..=last)
                .filter(|block| !existing.contains(block))
                .map(|block| (block, Some(BlockRef::unwritten()))),
        )?;
        inode.block_count += new_blocks;
        transaction.state.used_block_count += new_blocks;
        if !keep_size && end > inode.size_bytes {
            inode.size_bytes = end;
        }
    }
    inode.ctime_ns = now_ns;
    if !keep_size {
        inode.mtime_ns = now_ns;
    }
    transaction.put_inode(inode_number, inode.clone());
    attributes(inode_number, inode)
}

fn set_quota(transaction: &mut Transaction<'_>, quota_bytes: u64) -> NodeResult<CommandResponse> {
    let used_bytes = transaction.state.used_block_count * BLOCK_SIZE;
    if quota_bytes > 0 && quota_bytes < used_bytes {
        return Err(FsError::invalid(format!(
            "quota of {quota_bytes} bytes is below the {used_bytes} bytes in use"
        ))
        .into());
    }
    transaction.state.quota_bytes = quota_bytes;
    Ok(CommandResponse::Done)
}

fn purge_orphans(transaction: &mut Transaction<'_>, inode: u64) -> NodeResult<CommandResponse> {
    let candidates: Vec<u64> = if inode == 0 {
        let prefix = keys::orphan_prefix(transaction.container_id);
        transaction
            .storage
            .state
            .scan_collect(&prefix, &keys::prefix_end(&prefix), ORPHANS_PER_PURGE_MAX)?
            .into_iter()
            .map(|(key, _)| keys::orphan_key_inode(&key))
            .collect()
    } else {
        vec![inode]
    };
    let mut purged_count = 0;
    for inode_number in candidates {
        let orphan_key = keys::orphan(transaction.container_id, inode_number);
        if transaction.storage.state.get_raw(&orphan_key)?.is_none() {
            continue; // Not an orphan (still linked, or already purged): nothing to do.
        }
        transaction.batch().delete(orphan_key);
        let Some(mut orphan) = transaction.inode(inode_number)? else {
            continue;
        };
        if orphan.nlink > 0 {
            continue; // Re-linked since; keep it.
        }
        drop_blocks(transaction, inode_number, &mut orphan, 0, u64::MAX - 1)?;
        transaction.delete_inode(inode_number);
        transaction.state.inode_count -= 1;
        purged_count += 1;
    }
    Ok(CommandResponse::Purged { purged_count })
}

// ------------------------------------------------------------------------------------------
// Read paths: served from the applied state, outside the log.
// ------------------------------------------------------------------------------------------

pub fn get_inode(storage: &NodeStorage, container_id: u64, inode: u64) -> NodeResult<Inode> {
    storage
        .state
        .get::<Inode>(&keys::inode(container_id, inode), "inode")?
        .ok_or_else(|| FsError::not_found(format!("inode {inode} does not exist")).into())
}

pub fn lookup(
    storage: &NodeStorage,
    container_id: u64,
    parent: u64,
    name: &str,
) -> NodeResult<(u64, Inode)> {
    check_name(name)?;
    let directory = get_inode(storage, container_id, parent)?;
    if directory.kind != EntryKind::Directory {
        return Err(FsError::not_directory(format!("inode {parent} is not a directory")).into());
    }
    let entry = storage
        .state
        .get::<DirentValue>(&keys::dirent(container_id, parent, name), "dirent")?
        .ok_or_else(|| FsError::not_found(format!("{name:?} not in directory {parent}")))?;
    Ok((entry.inode, get_inode(storage, container_id, entry.inode)?))
}

/// One directory listing page: entries after `cookie`, at most `entry_count_max`.
pub fn read_directory(
    storage: &NodeStorage,
    container_id: u64,
    inode: u64,
    cookie: u64,
    entry_count_max: usize,
) -> NodeResult<(Vec<(u64, CookieRow)>, bool)> {
    let directory = get_inode(storage, container_id, inode)?;
    if directory.kind != EntryKind::Directory {
        return Err(FsError::not_directory(format!("inode {inode} is not a directory")).into());
    }
    let entry_count_max = entry_count_max.clamp(1, 4096);
    let mut entries = Vec::new();
    if cookie < 1 {
        entries.push((
            1,
            CookieRow {
                name: ".".into(),
                inode,
                kind: EntryKind::Directory,
            },
        ));
    }
    if cookie < 2 {
        entries.push((
            2,
            CookieRow {
                name: "..".into(),
                inode: directory.parent,
                kind: EntryKind::Directory,
            },
        ));
    }
    let start = keys::dirent_cookie(container_id, inode, cookie.max(2) + 1);
    let end = keys::prefix_end(&keys::dirent_cookie_prefix(container_id, inode));
    let mut more = false;
    storage.state.scan(&start, &end, usize::MAX, |key, value| {
        if entries.len() >= entry_count_max {
            more = true;
            return Ok(false);
        }
        let entry_cookie =
            u64::from_be_bytes(key[17..25].try_into().expect("cookie key is 25 bytes"));
        entries.push((entry_cookie, decode::<CookieRow>(value, "readdir row")?));
        Ok(true)
    })?;
    Ok((entries, !more))
}

pub fn read_link(storage: &NodeStorage, container_id: u64, inode: u64) -> NodeResult<String> {
    let link = get_inode(storage, container_id, inode)?;
    link.symlink_target
        .filter(|_| link.kind == EntryKind::Symlink)
        .ok_or_else(|| FsError::invalid(format!("inode {inode} is not a symlink")).into())
}

/// Reads file bytes; holes read as zeros; short only at end of file. Every block is verified.
/// The bytes are a slice of one buffer that the device data is copied into once (no further
/// copy to trim the unaligned head).
pub async fn read(
    storage: &NodeStorage,
    container_id: u64,
    inode_number: u64,
    offset_bytes: u64,
    length_bytes: u32,
) -> NodeResult<bytes::Bytes> {
    let Some(plan) = plan_read(
        storage,
        container_id,
        inode_number,
        offset_bytes,
        length_bytes,
    )?
    else {
        return Ok(bytes::Bytes::new());
    };
    let blocks = storage
        .read_file_blocks(&plan.references, plan.first, plan.last, &plan.context)
        .await?;
    Ok(blocks.slice(plan.start_in_buffer..plan.start_in_buffer + plan.length))
}

/// What a read of a file range needs: its blocks, their references, and where the asked bytes
/// sit in a buffer of those blocks. `None` at or past the end of the file.
struct ReadPlan {
    first: u64,
    last: u64,
    references: Vec<(u64, BlockRef)>,
    context: String,
    start_in_buffer: usize,
    length: usize,
}

fn plan_read(
    storage: &NodeStorage,
    container_id: u64,
    inode_number: u64,
    offset_bytes: u64,
    length_bytes: u32,
) -> NodeResult<Option<ReadPlan>> {
    let inode = get_inode(storage, container_id, inode_number)?;
    require_file(inode_number, &inode)?;
    let end = offset_bytes
        .saturating_add(length_bytes as u64)
        .min(inode.size_bytes);
    if offset_bytes >= end {
        return Ok(None);
    }
    let first = offset_bytes / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    let references = block_references_for_read(storage, container_id, inode_number, first, last)?;
    Ok(Some(ReadPlan {
        first,
        last,
        references,
        context: format!("container {container_id} inode {inode_number} blocks {first}..={last}"),
        start_in_buffer: (offset_bytes - first * BLOCK_SIZE) as usize,
        length: (end - offset_bytes) as usize,
    }))
}

/// Reads file bytes into a slot of a region shared with a driver (`shared_regions.rs`), as
/// [`read`] does into a buffer of its own; returns where in the slot the bytes start and how
/// many there are (0 at or past the end of the file). Fails with `InvalidArgument`, having
/// written nothing, when the blocks do not fit in the slot.
///
/// The device reads each piece of up to [`SHARED_READ_PIECE_BLOCKS`] blocks (1 MiB) into a
/// pooled buffer on a huge page, all pieces in flight at once (at most
/// `storage::STAGED_READ_PIECES_MAX` in the whole node); the blocks are checked against their
/// checksums there, and then copied into the slot. So a piece is one segment for the device,
/// and the slot only ever receives verified bytes.
///
/// Why not read straight into the slot (as from 2026-12-06, second session, to the seventh):
/// the slot's 4 KiB pages are scattered (shared memory gets no huge pages on this kernel,
/// `shmem_enabled` never), and this VM's virtio disk serves a request of many segments slower
/// than one of the same bytes in one segment. fio `O_DIRECT` 512 KiB at 10 in flight, three
/// rounds each, alternating (2026-12-06, seventh session): 1,385-1,468 MB/s from 4 KiB pages,
/// 4.0 ms per request, against 2,322-2,376 MB/s from huge pages, 1.8 ms. A 1 GiB cold read
/// through the mount, alternating, 8 rounds: 1,046-1,851 MB/s staged against 967-1,657 in
/// place, staged faster in every round; node CPU per GiB about the same (-0.02 to +0.06 s per
/// round: the copy). `benches/hand/cold-read-ab.sh`, `docs/benchmarks.md`.
pub async fn read_shared(
    storage: &NodeStorage,
    container_id: u64,
    inode_number: u64,
    offset_bytes: u64,
    length_bytes: u32,
    slot: crate::shared_regions::Slot,
) -> NodeResult<(usize, usize)> {
    let Some(plan) = plan_read(
        storage,
        container_id,
        inode_number,
        offset_bytes,
        length_bytes,
    )?
    else {
        return Ok((0, 0));
    };
    let blocks_bytes = (plan.last - plan.first + 1) as usize * BLOCK_SIZE as usize;
    let piece_bytes = SHARED_READ_PIECE_BLOCKS as usize * BLOCK_SIZE as usize;
    // Refused (nothing lent, nothing written) when the blocks do not fit the slot.
    let targets = slot.lend_pieces(blocks_bytes, piece_bytes)?;
    let context = plan.context.as_str();
    let pieces = pieces_of(plan.first, plan.last, SHARED_READ_PIECE_BLOCKS)
        .zip(targets)
        .map(|((first, last), mut target)| {
            let references = references_between(&plan.references, first, last);
            async move {
                // Bounds the node's staging memory across all reads (`STAGED_READ_PIECES_MAX`).
                let _permit = storage.staged_read_piece().await;
                let staged = storage.buffer_for_whole_read(target.len());
                let staged = storage
                    .read_file_blocks_into(references, first, last, staged, context)
                    .await?;
                // Lengths match: both are the piece's blocks.
                target.copy_from_slice(&staged);
                storage.give_back_buffer(staged);
                // Dropping the target only releases its hold on the region.
                Ok::<(), NodeError>(())
            }
        });
    // Every piece is awaited, also after one failed: a piece still in flight would go on
    // writing into the slot after the failure was answered, when the driver may already have
    // given the slot to another read.
    let results = futures::future::join_all(pieces).await;
    results.into_iter().collect::<NodeResult<Vec<()>>>()?;
    Ok((plan.start_in_buffer, plan.length))
}

/// Blocks per device request of a read into a shared slot (see [`read_shared`]): a pooled
/// buffer's worth.
pub const SHARED_READ_PIECE_BLOCKS: u64 = crate::storage::BLOCKS_PER_REQUEST_MAX;

/// Blocks `first..=last` cut into consecutive ranges of at most `piece_blocks`.
pub(crate) fn pieces_of(
    first: u64,
    last: u64,
    piece_blocks: u64,
) -> impl Iterator<Item = (u64, u64)> {
    assert!(first <= last && piece_blocks > 0);
    (first..=last)
        .step_by(piece_blocks as usize)
        .map(move |piece_first| {
            let piece_last = piece_first.saturating_add(piece_blocks - 1).min(last);
            (piece_first, piece_last)
        })
}

/// The references (sorted by file block) of file blocks `first..=last`.
fn references_between(references: &[(u64, BlockRef)], first: u64, last: u64) -> &[(u64, BlockRef)] {
    let start = references.partition_point(|(file_block, _)| *file_block < first);
    let end = references.partition_point(|(file_block, _)| *file_block <= last);
    &references[start..end]
}

/// The container's state header (quota, usage, inode counts).
pub fn container_state(storage: &NodeStorage, container_id: u64) -> NodeResult<ContainerState> {
    container_state_from(&storage.state, container_id)
}

pub fn container_state_from(
    state: &crate::state_store::StateStore,
    container_id: u64,
) -> NodeResult<ContainerState> {
    Ok(state
        .get::<ContainerState>(
            &keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id),
            "container state",
        )?
        .unwrap_or_default())
}
