//! What a stream holds at its end: the newest message a relay published there, found by its
//! position header. The relay and the projection compare it with their checkpoints.

use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, RawMessage};
use async_nats::jetstream::{self, message::StreamMessage};
use serde::Deserialize;

use crate::error::CQRSError;

use super::codec::{position_header, HEADER_POSITION};
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
    jetstream: &jetstream::Context,
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
    let Some(newest) = newest_message(jetstream, stream, config, &state).await? else {
        // Removed since the state was read.
        return Ok(end);
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
                 carries a {HEADER_POSITION} header: another publisher writes to the relay's \
                 subjects",
                config.stream_name(),
                end.last_sequence,
            )));
        }
        sequence -= 1;
        message = match stream.get_raw_message(sequence).await {
            Ok(message) => Some(message),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(error) => return Err(broker(error)),
        };
    }
}

/// The newest message the stream holds. Its last sequence may be a deleted message's: then
/// a binary search over "the first message at or after a sequence" finds the newest one in
/// a few requests, however many were deleted.
async fn newest_message(
    jetstream: &jetstream::Context,
    stream: &stream::Stream,
    config: &NatsStreamConfig,
    state: &stream::State,
) -> Result<Option<StreamMessage>, CQRSError> {
    match stream.get_raw_message(state.last_sequence).await {
        Ok(message) => return Ok(Some(message)),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {}
        Err(error) => return Err(broker(error)),
    }
    let Some(mut found) = first_from(jetstream, config, state.first_sequence).await? else {
        return Ok(None);
    };
    let mut high = state.last_sequence.saturating_sub(1);
    while found.sequence < high {
        let middle = found.sequence + 1 + (high - found.sequence - 1) / 2;
        match first_from(jetstream, config, middle).await? {
            Some(message) if message.sequence >= middle => found = message,
            _ => high = middle - 1,
        }
    }
    Ok(Some(found))
}

/// The answer to a message request.
#[derive(Deserialize)]
struct Got {
    message: RawMessage,
}

/// The stream's first message at or after `sequence`, if any.
async fn first_from(
    jetstream: &jetstream::Context,
    config: &NatsStreamConfig,
    sequence: u64,
) -> Result<Option<StreamMessage>, CQRSError> {
    let request = serde_json::json!({ "seq": sequence, "next_by_subj": config.subjects() });
    let response: Response<Got> = jetstream
        .request(format!("STREAM.MSG.GET.{}", config.stream_name()), &request)
        .await
        .map_err(broker)?;
    match response {
        Response::Ok(got) => StreamMessage::try_from(got.message)
            .map(Some)
            .map_err(broker),
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND => {
            Ok(None)
        }
        Response::Err { error } => Err(broker(error)),
    }
}
