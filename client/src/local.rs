//! `LocalChannel`: `ReadShared` and `WriteShared` calls to the storage node on this host as
//! local frames (`ballast_common::local_frame`) on the Unix socket that keeps a FUSE driver's
//! shared region attached, instead of gRPC.
//!
//! Why: the bytes of those calls are already in shared memory, so what is left per request is
//! the round trip. Over HTTP/2 that was about 3 ms of a 7.7 ms cold read request at ten in
//! flight (`docs/benchmarks.md`), spent in hand-offs between runtime tasks and threads. Here
//! the asking task writes its frame to the socket itself, and one task on the same runtime
//! reads the answers and wakes the task that waits for each: a wake-up within the worker
//! thread that read the answer, not a hand-off to another thread (in a VM each such hand-off
//! costs tens of microseconds; a dedicated reader thread measured no better than gRPC).
//!
//! Owns: request ids, the requests waiting for answers, the answer reader task.
//! Must not depend on: the node (only the wire form in `ballast-common` and the messages in
//! `ballast-proto`).
//! Invariants:
//! - At most [`LOCAL_REQUESTS_IN_FLIGHT_MAX`] requests wait at once; a further one is refused
//!   (the driver's slot pools keep it far below that).
//! - Each request is answered at most once: its waiter leaves the map with its answer, with
//!   its own timeout, or when the channel closes.
//! - Any fault of the channel itself (a failed write, a broken or unexpected answer, a
//!   timeout, the node closing the socket) closes it for good, before the failing call
//!   returns. Every waiting and later call then fails with `Unavailable`, and the owner
//!   attaches anew. This is what makes a timeout safe: the node may still serve a request that
//!   timed out and write into its slot later, but once the channel is closed no request of
//!   this attachment can read a slot again.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_common::local_frame::{
    LocalFailure, LocalFrame, LocalFrameHeader, LocalFrameKind, LOCAL_FRAME_BODY_BYTES_MAX,
    LOCAL_FRAME_HEADER_BYTES,
};
use ballast_common::Errno;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;
use tonic::Code;

use crate::proto;
use crate::ClientError;

/// Requests waiting for answers at once, at most.
pub const LOCAL_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Longest a frame write may wait: frames are small and the node reads them at once, so a
/// full socket buffer means a node that stopped reading.
const FRAME_WRITE_TIMEOUT_MS: u64 = 1_000;
/// Bytes of answers read from the socket at once.
const ANSWER_READ_BUFFER_BYTES: usize = 64 << 10;

/// See the module documentation.
pub struct LocalChannel {
    /// The socket's sending half, for requests: whole frames at a time under the lock.
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// The same socket, to shut it down from synchronous code (`close`, drop).
    socket: UnixStream,
    waiting: Arc<Mutex<Waiting>>,
    request_timeout: Duration,
}

#[derive(Default)]
struct Waiting {
    closed: bool,
    next_request_id: u64,
    answers: HashMap<u64, oneshot::Sender<LocalFrame>>,
}

impl Waiting {
    /// Closes the channel: every waiter fails (its sender is dropped), and so does every later
    /// call.
    fn close(&mut self) {
        self.closed = true;
        self.answers.clear();
    }
}

fn unavailable(message: impl Into<String>) -> ClientError {
    ClientError::Status {
        code: Code::Unavailable,
        message: message.into(),
        errno: None,
    }
}

impl LocalChannel {
    /// Starts a channel on `stream`, an attach connection the node answered on (it said it
    /// serves local frames). Each call waits at most `request_timeout` for its answer. Runs
    /// inside a Tokio runtime (the answer reader is a task), and makes the socket
    /// non-blocking for every handle of it.
    pub fn start(stream: &UnixStream, request_timeout: Duration) -> std::io::Result<LocalChannel> {
        let socket = stream.try_clone()?;
        let asynchronous = stream.try_clone()?;
        asynchronous.set_nonblocking(true)?;
        let (reader, writer) = tokio::net::UnixStream::from_std(asynchronous)?.into_split();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let reader_socket = socket.try_clone()?;
        tokio::spawn(read_answers(
            tokio::io::BufReader::with_capacity(ANSWER_READ_BUFFER_BYTES, reader),
            reader_socket,
            waiting.clone(),
        ));
        Ok(LocalChannel {
            writer: tokio::sync::Mutex::new(writer),
            socket,
            waiting,
            request_timeout,
        })
    }

    /// True once the channel closed (see the module documentation).
    pub fn is_closed(&self) -> bool {
        self.lock_waiting().closed
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes the channel and the socket: the node sees the end of the stream and detaches
    /// the region; the answer reader thread ends.
    pub fn close(&self) {
        self.lock_waiting().close();
        // Fails only for a socket already shut down, which is the goal.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// `Filesystem.ReadShared`, as a local frame.
    pub async fn read_shared(
        &self,
        request: proto::ReadSharedRequest,
    ) -> Result<proto::ReadSharedResponse, ClientError> {
        self.call(LocalFrameKind::ReadShared, request).await
    }

    /// `Filesystem.WriteShared`, as a local frame.
    pub async fn write_shared(
        &self,
        request: proto::WriteSharedRequest,
    ) -> Result<proto::WriteResponse, ClientError> {
        self.call(LocalFrameKind::WriteShared, request).await
    }

    async fn call<Request: Message, Response: Message + Default>(
        &self,
        kind: LocalFrameKind,
        request: Request,
    ) -> Result<Response, ClientError> {
        let body = request.encode_to_vec();
        if body.len() > LOCAL_FRAME_BODY_BYTES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "a {}-byte request does not fit a local frame",
                body.len()
            )));
        }
        let (sender, receiver) = oneshot::channel();
        let request_id = {
            let mut waiting = self.lock_waiting();
            if waiting.closed {
                return Err(unavailable("the local channel to the node is closed"));
            }
            if waiting.answers.len() >= LOCAL_REQUESTS_IN_FLIGHT_MAX {
                return Err(unavailable(format!(
                    "{LOCAL_REQUESTS_IN_FLIGHT_MAX} local requests are in flight"
                )));
            }
            let request_id = waiting.next_request_id;
            waiting.next_request_id += 1;
            waiting.answers.insert(request_id, sender);
            request_id
        };
        let frame = LocalFrame {
            kind,
            request_id,
            body,
        }
        .encode();
        let written = tokio::time::timeout(Duration::from_millis(FRAME_WRITE_TIMEOUT_MS), async {
            self.writer.lock().await.write_all(&frame).await
        })
        .await;
        let failure = match written {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_elapsed) => Some(format!("not sent within {FRAME_WRITE_TIMEOUT_MS} ms")),
        };
        if let Some(failure) = failure {
            self.close();
            return Err(unavailable(format!(
                "sending a local request to the node: {failure}"
            )));
        }
        let answer = match tokio::time::timeout(self.request_timeout, receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_closed)) => {
                return Err(unavailable("the local channel to the node closed"));
            }
            Err(_elapsed) => {
                // The node may still answer, and write into the slot; see the module
                // documentation for why closing makes that harmless.
                self.close();
                return Err(ClientError::Status {
                    code: Code::DeadlineExceeded,
                    message: format!(
                        "no local answer within {} ms",
                        self.request_timeout.as_millis()
                    ),
                    errno: None,
                });
            }
        };
        match answer.kind {
            LocalFrameKind::Answer => Response::decode(answer.body.as_slice()).map_err(|error| {
                self.close();
                unavailable(format!("a broken local answer: {error}"))
            }),
            LocalFrameKind::Failure => {
                let failure = LocalFailure::decode(&answer.body).map_err(|error| {
                    self.close();
                    unavailable(format!("a broken local failure: {error}"))
                })?;
                Err(ClientError::Status {
                    code: Code::from_i32(failure.code),
                    message: failure.message,
                    errno: (failure.errno > 0).then_some(Errno(failure.errno)),
                })
            }
            LocalFrameKind::ReadShared | LocalFrameKind::WriteShared => {
                unreachable!("the reader passes on answers only")
            }
        }
    }
}

impl Drop for LocalChannel {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads the next frame from `reader`: `None` when the stream ends cleanly between frames.
pub async fn read_frame(
    reader: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<LocalFrame>> {
    let mut header = [0u8; LOCAL_FRAME_HEADER_BYTES];
    let first = reader.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut header[first..]).await?;
    let LocalFrameHeader {
        kind,
        request_id,
        body_length_bytes,
    } = LocalFrameHeader::decode(&header)?;
    let mut body = vec![0u8; body_length_bytes];
    reader.read_exact(&mut body).await?;
    Ok(Some(LocalFrame {
        kind,
        request_id,
        body,
    }))
}

/// The answer reader task: hands each answer to its waiter, until the stream ends or breaks
/// (then the channel closes).
async fn read_answers(
    mut reader: impl AsyncRead + Unpin,
    socket: UnixStream,
    waiting: Arc<Mutex<Waiting>>,
) {
    let lock = || {
        waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    // Bounded by the connection: each pass reads one frame, and the loop ends with the stream.
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(error) => {
                if !lock().closed {
                    tracing::warn!(%error, "the local channel to the node broke");
                }
                break;
            }
        };
        if frame.kind.is_request() {
            tracing::warn!(kind = ?frame.kind, "the node sent a request on the local channel");
            break;
        }
        let mut waiting = lock();
        match waiting.answers.remove(&frame.request_id) {
            // The waiter may have given up meanwhile; then the channel is closing anyway.
            Some(sender) => drop(sender.send(frame)),
            None if waiting.closed => break,
            None => {
                tracing::warn!(
                    request_id = frame.request_id,
                    "the node answered a request nobody waits for"
                );
                break;
            }
        }
    }
    lock().close();
    // Fails only for a socket already shut down.
    let _ = socket.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A node stand-in on the other end of a socket pair: answers each request with what
    /// `answer` makes of it (`None`: no answer), until the stream ends.
    fn fake_node(
        mut stream: UnixStream,
        answer: impl Fn(&LocalFrame) -> Option<Vec<u8>> + Send + 'static,
    ) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut served = 0;
            while let Ok(Some(frame)) = LocalFrame::read_from(&mut stream) {
                served += 1;
                if let Some(bytes) = answer(&frame) {
                    if stream.write_all(&bytes).is_err() {
                        break;
                    }
                }
            }
            served
        })
    }

    fn read_request(offset_bytes: u64) -> proto::ReadSharedRequest {
        proto::ReadSharedRequest {
            volume: "v".to_owned(),
            inode: 2,
            offset_bytes,
            length_bytes: 4096,
            region_id: 1,
            slot_offset_bytes: 0,
            slot_bytes: 8192,
            deadline_monotonic_ns: 0,
        }
    }

    #[tokio::test]
    async fn answers_reach_their_own_requests_in_any_order() {
        let (driver, node_end) = UnixStream::pair().unwrap();
        // Answers each read with its offset as the data offset, so a mix-up shows; odd
        // offsets fail with an errno.
        let node = fake_node(node_end, |frame| {
            let request = proto::ReadSharedRequest::decode(frame.body.as_slice()).unwrap();
            let (kind, body) = if request.offset_bytes % 2 == 1 {
                let failure = LocalFailure {
                    code: Code::DataLoss as i32,
                    errno: Errno::EIO.0,
                    message: format!("bad block at {}", request.offset_bytes),
                };
                (LocalFrameKind::Failure, failure.encode())
            } else {
                let response = proto::ReadSharedResponse {
                    data_offset_bytes: request.offset_bytes as u32,
                    length_bytes: 7,
                };
                (LocalFrameKind::Answer, response.encode_to_vec())
            };
            Some(
                LocalFrame {
                    kind,
                    request_id: frame.request_id,
                    body,
                }
                .encode(),
            )
        });
        let channel = Arc::new(LocalChannel::start(&driver, Duration::from_secs(10)).unwrap());
        let calls = (0..64u64).map(|offset| {
            let channel = channel.clone();
            tokio::spawn(async move { (offset, channel.read_shared(read_request(offset)).await) })
        });
        for call in calls {
            let (offset, result) = call.await.unwrap();
            if offset % 2 == 1 {
                let error = result.unwrap_err();
                assert_eq!(error.code(), Some(Code::DataLoss));
                assert_eq!(error.errno(), Errno::EIO);
                assert!(error
                    .to_string()
                    .contains(&format!("bad block at {offset}")));
            } else {
                assert_eq!(result.unwrap().data_offset_bytes as u64, offset);
            }
        }
        assert!(!channel.is_closed());
        drop(channel);
        assert_eq!(node.join().unwrap(), 64, "the node saw every request once");
    }

    #[tokio::test]
    async fn a_timeout_closes_the_channel_for_every_later_call() {
        let (driver, node_end) = UnixStream::pair().unwrap();
        let node = fake_node(node_end, |_| None);
        let channel = LocalChannel::start(&driver, Duration::from_millis(50)).unwrap();
        let error = channel.read_shared(read_request(0)).await.unwrap_err();
        assert_eq!(error.code(), Some(Code::DeadlineExceeded));
        assert!(channel.is_closed());
        let error = channel.read_shared(read_request(0)).await.unwrap_err();
        assert_eq!(error.code(), Some(Code::Unavailable));
        assert_eq!(node.join().unwrap(), 1, "the second call was sent");
    }

    #[tokio::test]
    async fn a_node_that_goes_away_or_breaks_the_protocol_fails_the_waiting_calls() {
        // The node reads one request and closes the socket without answering.
        let (driver, node_end) = UnixStream::pair().unwrap();
        let node = std::thread::spawn(move || {
            let mut stream = node_end;
            LocalFrame::read_from(&mut stream).unwrap().unwrap();
        });
        let channel = LocalChannel::start(&driver, Duration::from_secs(10)).unwrap();
        let error = channel.read_shared(read_request(0)).await.unwrap_err();
        assert_eq!(error.code(), Some(Code::Unavailable));
        assert!(channel.is_closed());
        node.join().unwrap();

        // Answers that are not answers: a request kind, an unknown request id, garbage bytes,
        // an undecodable response, a broken failure.
        let broken: [fn(&LocalFrame) -> Vec<u8>; 5] = [
            |frame| {
                LocalFrame {
                    kind: LocalFrameKind::ReadShared,
                    request_id: frame.request_id,
                    body: Vec::new(),
                }
                .encode()
            },
            |frame| {
                LocalFrame {
                    kind: LocalFrameKind::Answer,
                    request_id: frame.request_id + 1,
                    body: Vec::new(),
                }
                .encode()
            },
            |_| vec![0xFF; 40],
            |frame| {
                LocalFrame {
                    kind: LocalFrameKind::Answer,
                    request_id: frame.request_id,
                    body: vec![0xFF; 9],
                }
                .encode()
            },
            |frame| {
                LocalFrame {
                    kind: LocalFrameKind::Failure,
                    request_id: frame.request_id,
                    body: vec![1, 2, 3],
                }
                .encode()
            },
        ];
        for (index, make) in broken.into_iter().enumerate() {
            let (driver, node_end) = UnixStream::pair().unwrap();
            let node = fake_node(node_end, move |frame| Some(make(frame)));
            let channel = LocalChannel::start(&driver, Duration::from_secs(10)).unwrap();
            let error = channel.read_shared(read_request(0)).await.unwrap_err();
            assert_eq!(
                error.code(),
                Some(Code::Unavailable),
                "case {index}: {error}"
            );
            // Bounded: the reader closes the channel right after it refuses the answer.
            for _ in 0..500 {
                if channel.is_closed() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(channel.is_closed(), "case {index} left the channel open");
            drop(channel);
            node.join().unwrap();
        }
    }

    #[tokio::test]
    async fn a_request_too_large_for_a_frame_is_refused_before_it_is_sent() {
        let (driver, node_end) = UnixStream::pair().unwrap();
        let node = fake_node(node_end, |_| None);
        let channel = LocalChannel::start(&driver, Duration::from_secs(10)).unwrap();
        let mut request = read_request(0);
        request.volume = "v".repeat(LOCAL_FRAME_BODY_BYTES_MAX);
        let error = channel.read_shared(request).await.unwrap_err();
        assert!(matches!(error, ClientError::InvalidArgument(_)), "{error}");
        assert!(!channel.is_closed());
        drop(channel);
        assert_eq!(node.join().unwrap(), 0, "the request was sent");
    }
}
