//! [`Payload`]: an event's JSON as text, shared rather than copied.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::json;

/// An event's payload: one JSON value, kept as its text.
///
/// Stores hand the text over as they read it and the framework writes it as it serialized
/// it, so nothing builds a [`serde_json::Value`] tree on the way: decoding deserializes the
/// domain event straight from the text. Cloning is a reference count.
///
/// The text is one valid JSON value: every public constructor checks it or produces it.
/// The one exception is a damaged row of a store (a hand edit left a payload that is not
/// JSON): a store reading its global stream keeps that text as stored, so the row still
/// becomes an event, and decoding it fails with [`DecodeError::MalformedPayload`]
/// (`deserialize`, `to_value` and `Serialize` return the parser's error, never panic): a
/// poison event for the projection that meets it, as `docs/adr/0005-projections.md` describes.
///
/// Two payloads are equal when their JSON values are, whatever the spacing or key order
/// (PostgreSQL's `jsonb` rewrites both); two damaged payloads are equal when their texts are.
///
/// [`DecodeError::MalformedPayload`]: crate::DecodeError::MalformedPayload
///
/// ```
/// use cqrs::Payload;
/// use serde_json::json;
///
/// let payload = Payload::from_json(r#"{"Deposited": {"amount": 5}}"#)?;
/// assert_eq!(payload, json!({ "Deposited": { "amount": 5 } }));
/// assert_eq!(payload.to_value()?["Deposited"]["amount"], 5);
/// assert!(Payload::from_json("{not json").is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone)]
pub struct Payload(Arc<str>);

thread_local! {
    /// The buffer `Payload::from_serialize` writes into, so that serializing costs one
    /// allocation (the shared text) however the writer grows its output.
    static BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Payload {
    /// The payload whose JSON text is `json`.
    ///
    /// # Errors
    /// The parser's error when `json` is not exactly one JSON value.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<IgnoredAny>(json)?;
        Ok(Payload(Arc::from(json)))
    }

    /// The payload a store read, kept as it is stored, unchecked.
    ///
    /// For store readers of the global stream (`read_all`) and for test hooks that simulate
    /// a damaged row: a text that is not JSON makes the event fail to decode with
    /// [`DecodeError::MalformedPayload`](crate::DecodeError::MalformedPayload), a poison
    /// event, rather than failing the whole read. Application code builds payloads with
    /// [`from_json`](Self::from_json), [`from_serialize`](Self::from_serialize) or
    /// [`from_value`](Self::from_value).
    ///
    /// ```
    /// let damaged = cqrs::Payload::from_stored_unchecked("{\"n\": 3, oops");
    /// assert!(damaged.to_value().is_err());
    /// assert!(serde_json::to_string(&damaged).is_err());
    /// ```
    #[doc(hidden)]
    pub fn from_stored_unchecked(text: &str) -> Self {
        Payload(Arc::from(text))
    }

    /// True when the text is one JSON value (always, except for a damaged row a store read
    /// with [`from_stored_unchecked`](Self::from_stored_unchecked)).
    pub fn is_valid_json(&self) -> bool {
        serde_json::from_str::<IgnoredAny>(&self.0).is_ok()
    }

    /// A payload whose text a database already checked is JSON (a `jsonb` column).
    #[cfg(feature = "postgres")]
    pub(crate) fn from_checked(json: &str) -> Self {
        Payload(Arc::from(json))
    }

    /// The payload of a value's serde form.
    ///
    /// # Errors
    /// The serializer's error, e.g. for a map with non-string keys.
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        BUFFER.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                let payload = match json::write(&mut buffer, value) {
                    Ok(()) => Ok(Payload(Arc::from(buffer.as_str()))),
                    // What the writer leaves to serde_json (or an error, which serde_json
                    // reports in its own terms).
                    Err(json::Unsupported) => Self::from_serde_json(value),
                };
                // Keep the buffer for the next event, unless one payload made it large.
                if buffer.capacity() > 64 * 1024 {
                    *buffer = String::new();
                }
                payload
            }
            // A `Serialize` impl that serializes a payload itself: use a buffer of its own.
            Err(_) => Self::from_serde_json(value),
        })
    }

    fn from_serde_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Payload(Arc::from(serde_json::to_string(value)?)))
    }

    /// The payload of a JSON value.
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serializes: its map keys are strings.
        Payload(Arc::from(value.to_string()))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Deserializes the payload into `T`.
    ///
    /// # Errors
    /// The deserializer's error when the JSON does not have `T`'s shape.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The payload as a [`serde_json::Value`] tree, for code that inspects JSON generically
    /// (upcast steps, tooling).
    ///
    /// # Errors
    /// Only for JSON nested deeper than `serde_json` parses (128 levels).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::from_value(&value)
    }
}

impl From<&Value> for Payload {
    fn from(value: &Value) -> Self {
        Payload::from_value(value)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || self.0 == other.0
            || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().is_ok_and(|value| value == *other)
    }
}

impl PartialEq<Payload> for Value {
    fn eq(&self, other: &Payload) -> bool {
        other == self
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Payload").field(&&*self.0).finish()
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Serializes as [`serde_json::value::RawValue`] does: with `serde_json`, the JSON value
/// itself, its text copied as it is; with another format, a one-field struct holding the
/// text. The text is parsed once more on the way (serde_json only lends a `RawValue` it
/// checked itself), so a damaged payload (see [`Payload`]) is the serializer's error, never
/// invalid output.
impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Deserializes any JSON value (from `serde_json` or a [`serde_json::Value`]).
impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Payload(Arc::from(raw.get())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equality_is_by_json_value_not_by_text() {
        let a = Payload::from_json(r#"{"a":1,"b":[true,null]}"#).unwrap();
        let b = Payload::from_json(r#"{ "b": [true, null], "a": 1 }"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Payload::from_json(r#"{"a":2,"b":[true,null]}"#).unwrap());
        assert_eq!(a, json!({ "a": 1, "b": [true, null] }));
    }

    #[test]
    fn rejects_what_is_not_one_json_value() {
        for bad in ["", "{", "1 2", "{\"a\":}", "nul"] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serializes_as_embedded_json_and_round_trips() {
        let payload = Payload::from_serialize(&json!({ "x": [1, 2] })).unwrap();
        let wrapped = serde_json::to_string(&json!({ "p": payload.to_value().unwrap() })).unwrap();
        assert_eq!(serde_json::to_string(&payload).unwrap(), r#"{"x":[1,2]}"#);
        #[derive(Deserialize)]
        struct Wrapper {
            p: Payload,
        }
        let back: Wrapper = serde_json::from_str(&wrapped).unwrap();
        assert_eq!(back.p, payload);
        let from_value: Payload = serde_json::from_value(json!({ "x": [1, 2] })).unwrap();
        assert_eq!(from_value, payload);
    }

    #[test]
    fn a_damaged_payload_is_an_error_everywhere_it_is_read_never_a_panic() {
        let damaged = Payload::from_stored_unchecked("{\"n\": 3, oops");
        assert!(!damaged.is_valid_json());
        assert!(Payload::from_json("{}").unwrap().is_valid_json());
        assert!(damaged.to_value().is_err());
        assert!(damaged.deserialize::<Value>().is_err());
        assert!(serde_json::to_string(&damaged).is_err());
        assert!(serde_json::to_value(&damaged).is_err());
        assert_eq!(damaged.as_str(), "{\"n\": 3, oops");
        assert_eq!(damaged, Payload::from_stored_unchecked("{\"n\": 3, oops"));
        assert_ne!(damaged, Payload::from_stored_unchecked("{\"n\": 4, oops"));
        assert_ne!(damaged, json!(null));
    }

    #[test]
    fn from_serialize_reports_what_json_cannot_hold() {
        let mut map = std::collections::BTreeMap::new();
        map.insert((1, 2), 3);
        assert!(Payload::from_serialize(&map).is_err());
        // The failed call leaves the shared buffer usable.
        assert_eq!(Payload::from_serialize(&7).unwrap().as_str(), "7");
    }
}
