//! [`Payload`] as a `jsonb` parameter and column, without building a JSON tree.
//!
//! `jsonb`'s binary form is a version byte (1) followed by the JSON text, so a payload is
//! sent and read as text. PostgreSQL checks what it stores, so a `json` or `jsonb` column
//! read back is valid JSON.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::types::Json;
use sqlx::{Decode, Encode, Postgres, Type};

use crate::payload::Payload;

/// The only `jsonb` binary format version there is.
const JSONB_VERSION: u8 = 1;

impl Type<Postgres> for Payload {
    fn type_info() -> PgTypeInfo {
        <Json<()> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Json<()> as Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for Payload {
    fn array_type_info() -> PgTypeInfo {
        <Json<()> as PgHasArrayType>::array_type_info()
    }
}

impl Encode<'_, Postgres> for Payload {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.push(JSONB_VERSION);
        buf.extend_from_slice(self.as_str().as_bytes());
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Postgres> for Payload {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let binary_jsonb = value.format() == PgValueFormat::Binary
            && *sqlx::ValueRef::type_info(&value) == <Json<()> as Type<Postgres>>::type_info();
        let mut bytes = value.as_bytes()?;
        if binary_jsonb {
            match bytes.split_first() {
                Some((&JSONB_VERSION, rest)) => bytes = rest,
                Some((version, _)) => {
                    return Err(format!("unsupported jsonb format version {version}").into())
                }
                None => return Err("an empty jsonb value".into()),
            }
        }
        Ok(Payload::from_checked(std::str::from_utf8(bytes)?))
    }
}
