//! `LocalFilesystem`: serves the `ReadShared` and `WriteShared` requests that a FUSE driver on
//! this host sends as local frames (`shared_regions`, `ballast_common::local_frame`), by
//! running the very gRPC handlers of [`FilesystemService`] on them.
//!
//! Owns: decoding a frame's body into its request message, and the answer frame's body (the
//! response message, or a `LocalFailure` with the status code, errno and message the gRPC call
//! would have carried).
//! Must not depend on: anything but the service it wraps; every decision stays there.
//! Invariant: a frame gets the same answer its gRPC call would get, so the driver treats both
//! the same way.

use std::future::Future;
use std::pin::Pin;

use ballast_common::local_frame::{LocalFailure, LocalFrameKind};
use ballast_proto::v1::filesystem_server::Filesystem;
use prost::Message;
use tonic::{Request, Status};

use super::filesystem::FilesystemService;
use crate::shared_regions::{LocalAnswer, LocalRequests};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct LocalFilesystem {
    service: FilesystemService,
}

impl LocalFilesystem {
    pub fn new(service: FilesystemService) -> LocalFilesystem {
        LocalFilesystem { service }
    }
}

impl LocalRequests for LocalFilesystem {
    fn serve(
        &self,
        kind: LocalFrameKind,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = LocalAnswer> + Send>> {
        let service = self.service.clone();
        Box::pin(async move {
            let answered = match kind {
                LocalFrameKind::ReadShared => match decode(&body) {
                    Ok(request) => service
                        .read_shared(Request::new(request))
                        .await
                        .map(|response| response.into_inner().encode_to_vec()),
                    Err(status) => Err(status),
                },
                LocalFrameKind::WriteShared => match decode(&body) {
                    Ok(request) => service
                        .write_shared(Request::new(request))
                        .await
                        .map(|response| response.into_inner().encode_to_vec()),
                    Err(status) => Err(status),
                },
                LocalFrameKind::Answer | LocalFrameKind::Failure => Err(Status::invalid_argument(
                    format!("a {kind:?} frame is not a request"),
                )),
            };
            match answered {
                Ok(body) => (LocalFrameKind::Answer, body),
                Err(status) => (LocalFrameKind::Failure, failure(&status).encode()),
            }
        })
    }
}

fn decode<Message: prost::Message + Default>(body: &[u8]) -> Result<Message, Status> {
    Message::decode(body)
        .map_err(|error| Status::invalid_argument(format!("a broken local request: {error}")))
}

/// The failure a status stands for, with the errno the service attached to it.
fn failure(status: &Status) -> LocalFailure {
    let errno = status
        .metadata()
        .get(ballast_proto::ERRNO_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|errno| *errno > 0)
        .unwrap_or(0);
    LocalFailure {
        code: status.code() as i32,
        errno,
        message: status.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FsError;

    #[test]
    fn a_failure_carries_the_status_code_errno_and_message() {
        let status =
            super::super::fs_status(FsError::new(ballast_common::Errno::ENOENT, "no inode 7"));
        let carried = failure(&status);
        assert_eq!(carried.code, tonic::Code::NotFound as i32);
        assert_eq!(carried.errno, ballast_common::Errno::ENOENT.0);
        assert!(
            carried.message.contains("no inode 7"),
            "{}",
            carried.message
        );
        let plain = failure(&Status::unavailable("later"));
        assert_eq!(
            (plain.code, plain.errno),
            (tonic::Code::Unavailable as i32, 0)
        );
    }
}
