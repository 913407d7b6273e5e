//! The JSON writer behind [`Payload::from_serialize`](crate::Payload::from_serialize): the
//! text `serde_json::to_string` writes, written straight into a `String`.
//!
//! Every stored event's payload is serialized on the dispatch path. `serde_json` writes
//! bytes, escaping strings byte by byte, and its bytes must be checked for UTF-8 again to
//! become a `str`. This writer checks eight bytes of a string at a time for characters to
//! escape and writes into a `String` (only whole `&str`s and ASCII go in, so there is
//! nothing to check); floats are formatted by `serde_json` itself. It writes exactly what `serde_json`'s
//! compact serializer writes, and hands back to `serde_json` whatever it does not write
//! itself: a map key that is not a string, the private structs of `serde_json` (`RawValue`,
//! an arbitrary-precision number), and any error (the caller serializes again with
//! `serde_json`, which reports its own error).

use std::fmt;

use serde::ser::{self, Serialize};

/// Why the writer stopped: the caller serializes with `serde_json` instead.
#[derive(Debug)]
pub(crate) struct Unsupported;

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("left to serde_json")
    }
}

impl std::error::Error for Unsupported {}

impl ser::Error for Unsupported {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Unsupported
    }
}

type Result<T = ()> = std::result::Result<T, Unsupported>;

/// Appends the compact JSON of `value` to `out`. On `Err`, `out` holds a partial text.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut String, value: &T) -> Result {
    value.serialize(Writer { out })
}

/// The names of `serde_json`'s private structs start with this: they serialize specially.
const PRIVATE: &str = "$serde_json::private::";

// The escape of each byte, as in `serde_json`: 0 for none, `u` for `\u00XX`.
const UU: u8 = b'u';
const __: u8 = 0;
static ESCAPE: [u8; 256] = {
    let mut table = [__; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = UU;
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// True when one of the eight bytes of `word` is below 0x20, a quote or a backslash.
#[inline]
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let is_quote = quote.wrapping_sub(ONES) & !quote;
    let is_backslash = backslash.wrapping_sub(ONES) & !backslash;
    (below_space | is_quote | is_backslash) & HIGH != 0
}

/// True when a byte of `bytes` needs an escape: eight bytes at a time, then byte by byte.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut found = false;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        found |= word_needs_escape(u64::from_le_bytes(word));
    }
    for &byte in chunks.remainder() {
        found |= ESCAPE[usize::from(byte)] != __;
    }
    found
}

/// Appends `value` as a JSON string.
#[inline(always)]
fn write_str(out: &mut String, value: &str) {
    if needs_escape(value.as_bytes()) {
        write_escaped(out, value);
    } else {
        out.reserve(value.len() + 2);
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
}

/// Appends `value`, which has a byte to escape, as a JSON string.
#[cold]
fn write_escaped(out: &mut String, value: &str) {
    out.reserve(value.len() + 8);
    out.push('"');
    let mut start = 0;
    for (i, &byte) in value.as_bytes().iter().enumerate() {
        let escape = ESCAPE[usize::from(byte)];
        if escape == __ {
            continue;
        }
        // `byte` is ASCII, so `i` is a character boundary.
        out.push_str(&value[start..i]);
        start = i + 1;
        if escape == UU {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        } else {
            out.push('\\');
            out.push(char::from(escape));
        }
    }
    out.push_str(&value[start..]);
    out.push('"');
}

/// Writes one value.
struct Writer<'a> {
    out: &'a mut String,
}

impl<'a> Writer<'a> {
    /// `{"variant":`, the start of an externally tagged enum variant with data.
    #[inline]
    fn begin_variant(&mut self, variant: &str) {
        self.out.push('{');
        write_str(self.out, variant);
        self.out.push(':');
    }

    fn integer(self, value: impl itoa::Integer) -> Result {
        self.out.push_str(itoa::Buffer::new().format(value));
        Ok(())
    }

    /// A float as `serde_json` writes it (its shortest-representation algorithm has
    /// changed between releases; `null` when not finite), through a buffer on the stack.
    fn float<F: Serialize>(self, value: F) -> Result {
        const LENGTH: usize = 40;
        let mut buffer = [0u8; LENGTH];
        let written = {
            let mut rest = &mut buffer[..];
            serde_json::to_writer(&mut rest, &value).map_err(|_| Unsupported)?;
            LENGTH - rest.len()
        };
        let text = std::str::from_utf8(&buffer[..written]).map_err(|_| Unsupported)?;
        self.out.push_str(text);
        Ok(())
    }
}

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, value: bool) -> Result {
        self.out.push_str(if value { "true" } else { "false" });
        Ok(())
    }

    fn serialize_i8(self, value: i8) -> Result {
        self.integer(value)
    }

    fn serialize_i16(self, value: i16) -> Result {
        self.integer(value)
    }

    fn serialize_i32(self, value: i32) -> Result {
        self.integer(value)
    }

    fn serialize_i64(self, value: i64) -> Result {
        self.integer(value)
    }

    fn serialize_i128(self, value: i128) -> Result {
        self.integer(value)
    }

    fn serialize_u8(self, value: u8) -> Result {
        self.integer(value)
    }

    fn serialize_u16(self, value: u16) -> Result {
        self.integer(value)
    }

    fn serialize_u32(self, value: u32) -> Result {
        self.integer(value)
    }

    fn serialize_u64(self, value: u64) -> Result {
        self.integer(value)
    }

    fn serialize_u128(self, value: u128) -> Result {
        self.integer(value)
    }

    fn serialize_f32(self, value: f32) -> Result {
        self.float(value)
    }

    fn serialize_f64(self, value: f64) -> Result {
        self.float(value)
    }

    fn serialize_char(self, value: char) -> Result {
        write_str(self.out, value.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, value: &str) -> Result {
        write_str(self.out, value);
        Ok(())
    }

    fn serialize_bytes(self, value: &[u8]) -> Result {
        self.out.push('[');
        for (i, byte) in value.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(itoa::Buffer::new().format(*byte));
        }
        self.out.push(']');
        Ok(())
    }

    fn serialize_none(self) -> Result {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result {
        self.out.push_str("null");
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result {
        write_str(self.out, variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result {
        if name.starts_with(PRIVATE) {
            return Err(Unsupported);
        }
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        self.begin_variant(variant);
        value.serialize(Writer {
            out: &mut *self.out,
        })?;
        self.out.push('}');
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a>> {
        self.out.push('[');
        Ok(Compound::new(self.out, false))
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Compound<'a>> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>> {
        self.begin_variant(variant);
        self.out.push('[');
        Ok(Compound::new(self.out, true))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a>> {
        self.out.push('{');
        Ok(Compound::new(self.out, false))
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Compound<'a>> {
        if name.starts_with(PRIVATE) {
            return Err(Unsupported);
        }
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        mut self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>> {
        self.begin_variant(variant);
        self.out.push('{');
        Ok(Compound::new(self.out, true))
    }
}

/// An array or object being written: its elements or entries, separated by commas.
pub(crate) struct Compound<'a> {
    out: &'a mut String,
    first: bool,
    /// Whether it is the data of an enum variant, whose object closes after it.
    in_variant: bool,
}

impl<'a> Compound<'a> {
    fn new(out: &'a mut String, in_variant: bool) -> Self {
        Compound {
            out,
            first: true,
            in_variant,
        }
    }

    #[inline]
    fn separate(&mut self) {
        if self.first {
            self.first = false;
        } else {
            self.out.push(',');
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.separate();
        value.serialize(Writer {
            out: &mut *self.out,
        })
    }

    #[inline]
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result {
        self.separate();
        write_str(self.out, key);
        self.out.push(':');
        value.serialize(Writer {
            out: &mut *self.out,
        })
    }

    fn close(self, bracket: char) -> Result {
        self.out.push(bracket);
        if self.in_variant {
            self.out.push('}');
        }
        Ok(())
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close(']')
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close(']')
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close(']')
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.element(value)
    }

    fn end(self) -> Result {
        self.close(']')
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result {
        self.separate();
        key.serialize(KeyWriter {
            out: &mut *self.out,
        })?;
        self.out.push(':');
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        value.serialize(Writer {
            out: &mut *self.out,
        })
    }

    fn end(self) -> Result {
        self.close('}')
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        self.field(key, value)
    }

    fn end(self) -> Result {
        self.close('}')
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = Unsupported;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        self.field(key, value)
    }

    fn end(self) -> Result {
        self.close('}')
    }
}

/// Writes a map key: a string, or a unit variant or newtype around one. Every other key is
/// left to `serde_json` (which quotes numbers and booleans, and refuses the rest).
struct KeyWriter<'a> {
    out: &'a mut String,
}

impl ser::Serializer for KeyWriter<'_> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = ser::Impossible<(), Unsupported>;
    type SerializeTuple = ser::Impossible<(), Unsupported>;
    type SerializeTupleStruct = ser::Impossible<(), Unsupported>;
    type SerializeTupleVariant = ser::Impossible<(), Unsupported>;
    type SerializeMap = ser::Impossible<(), Unsupported>;
    type SerializeStruct = ser::Impossible<(), Unsupported>;
    type SerializeStructVariant = ser::Impossible<(), Unsupported>;

    fn serialize_str(self, value: &str) -> Result {
        write_str(self.out, value);
        Ok(())
    }

    fn serialize_char(self, value: char) -> Result {
        write_str(self.out, value.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result {
        write_str(self.out, variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result {
        if name.starts_with(PRIVATE) {
            return Err(Unsupported);
        }
        value.serialize(self)
    }

    fn serialize_bool(self, _value: bool) -> Result {
        Err(Unsupported)
    }

    fn serialize_i8(self, _value: i8) -> Result {
        Err(Unsupported)
    }

    fn serialize_i16(self, _value: i16) -> Result {
        Err(Unsupported)
    }

    fn serialize_i32(self, _value: i32) -> Result {
        Err(Unsupported)
    }

    fn serialize_i64(self, _value: i64) -> Result {
        Err(Unsupported)
    }

    fn serialize_i128(self, _value: i128) -> Result {
        Err(Unsupported)
    }

    fn serialize_u8(self, _value: u8) -> Result {
        Err(Unsupported)
    }

    fn serialize_u16(self, _value: u16) -> Result {
        Err(Unsupported)
    }

    fn serialize_u32(self, _value: u32) -> Result {
        Err(Unsupported)
    }

    fn serialize_u64(self, _value: u64) -> Result {
        Err(Unsupported)
    }

    fn serialize_u128(self, _value: u128) -> Result {
        Err(Unsupported)
    }

    fn serialize_f32(self, _value: f32) -> Result {
        Err(Unsupported)
    }

    fn serialize_f64(self, _value: f64) -> Result {
        Err(Unsupported)
    }

    fn serialize_bytes(self, _value: &[u8]) -> Result {
        Err(Unsupported)
    }

    fn serialize_none(self) -> Result {
        Err(Unsupported)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result {
        Err(Unsupported)
    }

    fn serialize_unit(self) -> Result {
        Err(Unsupported)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        Err(Unsupported)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result {
        Err(Unsupported)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(Unsupported)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple> {
        Err(Unsupported)
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(Unsupported)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(Unsupported)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap> {
        Err(Unsupported)
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct> {
        Err(Unsupported)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Serialize;
    use serde_json::json;

    use super::{write, Unsupported};

    fn ours<T: Serialize + ?Sized>(value: &T) -> Result<String, Unsupported> {
        let mut out = String::new();
        write(&mut out, value).map(|()| out)
    }

    /// Writes `value` with both writers and requires the same text.
    fn same<T: Serialize + ?Sized>(value: &T) {
        let expected = serde_json::to_string(value).unwrap();
        assert_eq!(ours(value).unwrap(), expected);
    }

    #[derive(Serialize)]
    enum Shapes {
        Unit,
        Newtype(u8),
        Tuple(i32, String),
        Struct { a: Option<u8>, b: Vec<bool> },
        Empty {},
        EmptyTuple(),
    }

    #[derive(Serialize)]
    struct Everything {
        flag: bool,
        small: i8,
        big: i128,
        huge: u128,
        min: i64,
        float: f64,
        tiny: f32,
        nan: f64,
        infinite: f32,
        letter: char,
        text: String,
        #[serde(with = "serde_bytes_like")]
        bytes: Vec<u8>,
        unit: (),
        pair: (u8, &'static str),
        nothing: Option<u32>,
        shapes: Vec<Shapes>,
        map: BTreeMap<String, i32>,
        char_keys: BTreeMap<char, u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        #[serde(flatten)]
        flattened: BTreeMap<String, u8>,
    }

    mod serde_bytes_like {
        pub(super) fn serialize<S: serde::Serializer>(
            bytes: &[u8],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(bytes)
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let everything = Everything {
            flag: true,
            small: -8,
            big: i128::MIN,
            huge: u128::MAX,
            min: i64::MIN,
            float: -1.5e-300,
            tiny: 0.1,
            nan: f64::NAN,
            infinite: f32::NEG_INFINITY,
            letter: '"',
            text: "ünïcödé \u{1F600} and \u{7f}".to_owned(),
            bytes: vec![0, 7, 255],
            unit: (),
            pair: (3, "x"),
            nothing: None,
            shapes: vec![
                Shapes::Unit,
                Shapes::Newtype(1),
                Shapes::Tuple(-2, "t".into()),
                Shapes::Struct {
                    a: Some(4),
                    b: vec![true, false],
                },
                Shapes::Struct { a: None, b: vec![] },
                Shapes::Empty {},
                Shapes::EmptyTuple(),
            ],
            map: BTreeMap::from([("k\n".to_owned(), 1), (String::new(), 2)]),
            char_keys: BTreeMap::from([('a', 1), ('\\', 2)]),
            skipped: None,
            flattened: BTreeMap::from([("extra".to_owned(), 9)]),
        };
        same(&everything);
        same(&json!({ "a": [1, -2, 3.25, null, true, "s", {}], "b": {}, "c": [] }));
        same(&HashMap::<String, ()>::new());
        same(&Vec::<u8>::new());
        same(&1.0f64);
        same(&f64::MAX);
        same(&f32::MIN_POSITIVE);
        same(&-0.0f64);
    }

    #[test]
    fn escapes_every_byte_as_serde_json_does() {
        let all: String = (0u8..=0x7f).map(char::from).collect();
        same(&all);
        // Every position of an escape relative to the eight-byte words.
        for length in 0..20 {
            for at in 0..length {
                for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', ' ', '\u{7f}', 'é'] {
                    let text: String = (0..length)
                        .map(|i| if i == at { special } else { 'x' })
                        .collect();
                    same(&text);
                }
            }
        }
        // Bytes above 0x7f that the word check must not take for escapes.
        same("\u{a0}\u{a2}\u{dc}\u{ff}\u{100}\u{2028}\u{ffff}\u{10ffff}abcdefgh");
    }

    #[test]
    fn leaves_to_serde_json_what_it_does_not_write() {
        assert!(ours(&BTreeMap::from([(1, 2)])).is_err());
        assert!(ours(&BTreeMap::from([(true, 2)])).is_err());
        let raw = serde_json::value::RawValue::from_string("[1, 2]".to_owned()).unwrap();
        assert!(ours(&raw).is_err());
        assert!(ours(&json!({ "raw": raw })).is_ok());
    }
}
