//! Test support: a real `NodeStorage` on a temporary device file and RocksDB directory, so
//! state machine tests exercise the same I/O paths as production (io_uring, O_DIRECT, RocksDB).

use std::path::Path;
use std::sync::Arc;

use ballast_device::{Device, EngineOptions, FormatOptions};

use crate::command::{Command, CommandResponse, FilesystemCommand};
use crate::error::{NodeError, NodeResult};
use crate::snapshot_spool::SpoolDirectory;
use crate::state_machine::ContainerStateMachine;
use crate::state_store::StateStore;
use crate::storage::NodeStorage;
use crate::types::Entry;

pub struct TestStorage {
    pub directory: tempfile::TempDir,
    pub device: Device,
    pub storage: Arc<NodeStorage>,
    pub index: u64,
}

impl TestStorage {
    pub fn new(device_size_bytes: u64) -> Self {
        let directory = tempfile::tempdir().expect("temporary directory");
        let device_path = directory.path().join("device.img");
        std::fs::File::create(&device_path)
            .unwrap()
            .set_len(device_size_bytes)
            .unwrap();
        Device::format(
            &device_path,
            &FormatOptions {
                node_id: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let (device, storage) = open(directory.path());
        Self {
            directory,
            device,
            storage,
            index: 0,
        }
    }

    /// A storage of 256 MiB with `container_id` initialised as a file container.
    pub async fn initialized(container_id: u64, quota_bytes: u64) -> Self {
        let mut storage = Self::new(256 << 20);
        storage
            .apply(
                container_id,
                FilesystemCommand::Initialize {
                    volume_id: 1,
                    quota_bytes,
                    now_ns: 1,
                },
            )
            .await
            .expect("initialize the container");
        storage
    }

    /// Creates an empty regular file `name` in the root directory; returns its inode.
    pub async fn create_file(&mut self, container_id: u64, name: &str) -> u64 {
        let command = FilesystemCommand::Create {
            parent: crate::records::ROOT_INODE,
            name: name.into(),
            kind: crate::records::EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            symlink_target: None,
            exclusive: true,
            now_ns: 2,
        };
        match self.apply(container_id, command).await {
            Ok(CommandResponse::Attributes { inode, .. }) => inode,
            other => panic!("create {name}: unexpected {other:?}"),
        }
    }

    /// Applies one command through the container state machine's own apply, with a fresh log
    /// id. A command's deterministic failure comes back as `Err(NodeError::Fs(..))`, like a
    /// proposal's.
    pub async fn apply(
        &mut self,
        container_id: u64,
        command: FilesystemCommand,
    ) -> NodeResult<CommandResponse> {
        self.index += 1;
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), self.index),
            payload: openraft::EntryPayload::Normal(Command::Filesystem(command)),
        };
        let state_machine = ContainerStateMachine::new(container_id, Arc::clone(&self.storage));
        match state_machine.apply_entry(entry).await? {
            CommandResponse::Failed(error) => Err(NodeError::Fs(error)),
            response => Ok(response),
        }
    }
}

pub fn open(directory: &Path) -> (Device, Arc<NodeStorage>) {
    let device = Device::open(&directory.join("device.img"), EngineOptions::default()).unwrap();
    let state = StateStore::open(&directory.join("rocksdb")).unwrap();
    let block_count = device.superblock().data_block_count;
    let spool = SpoolDirectory::open(&directory.join("spool")).unwrap();
    let storage =
        Arc::new(NodeStorage::open(state, device.block_store(), block_count, spool).unwrap());
    (device, storage)
}
