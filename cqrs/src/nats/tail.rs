//! What a stream holds at its end: the newest message a relay published there, found by its
//! position header. The relay and the projection compare it with their checkpoints.

use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};

use crate::error::CQRSError;

use super::codec::position_header;
use super::{broker, NatsStreamConfig};

/// How many messages without a position (another publisher's, or deleted ones) the search
/// looks past, from the newest one back, before it gives up.
const MAX_PASSED: u64 = 1024;

/// The end of a stream, as the server holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StreamEnd {
    /// The global position of the newest event the stream holds; 0 when it holds none.
    pub(super) position: i64,
    /// The stream's last sequence, which a publish expecting the stream's end names: the
    /// sequence of a deleted newest message stays the last one.
    pub(super) last_sequence: u64,
}

/// Reads the end of `stream`: its last sequence, and the position of the newest message
/// that carries one (messages of other publishers are passed over).
///
/// # Errors
/// [`CQRSError::PersistenceError`] when the server cannot be asked or the stream cannot be
/// read, or when none of the newest 1024 messages carries a position.
pub(super) async fn stream_end(
    stream: &mut stream::Stream,
    config: &NatsStreamConfig,
) -> Result<StreamEnd, CQRSError> {
    let state = stream.info().await.map_err(broker)?.state.clone();
    let mut end = StreamEnd {
        position: 0,
        last_sequence: state.last_sequence,
    };
    if state.messages == 0 {
        return Ok(end);
    }
    let newest = match stream
        .get_last_raw_message_by_subject(&config.subjects())
        .await
    {
        Ok(message) => message,
        // Removed since the state was read.
        Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => {
            return Ok(end)
        }
        Err(error) => return Err(broker(error)),
    };
    end.last_sequence = end.last_sequence.max(newest.sequence);
    let mut sequence = newest.sequence;
    let mut message = Some(newest);
    let mut passed = 0;
    loop {
        if let Some(position) = message
            .as_ref()
            .and_then(|message| position_header(&message.headers))
        {
            end.position = position;
            return Ok(end);
        }
        if sequence <= state.first_sequence {
            // No message of the stream came from a relay.
            return Ok(end);
        }
        passed += 1;
        if passed > MAX_PASSED {
            return Err(CQRSError::persistence(format!(
                "none of the newest {MAX_PASSED} messages of stream {} before sequence {} \
                 carries a {} header: another publisher writes to the relay's subjects",
                config.stream_name(),
                end.last_sequence,
                super::codec::HEADER_POSITION,
            )));
        }
        sequence -= 1;
        message = match stream.get_raw_message(sequence).await {
            Ok(message) => Some(message),
            Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => None,
            Err(error) => return Err(broker(error)),
        };
    }
}
