//! Helpers of the hand-written `Deserialize` impls of the method and
//! function configs (errors that name the inner field).

use serde::de::{self, Deserialize, MapAccess};

/// Store the value of `field` read from `map` in `slot`, refusing a
/// repeated field.
pub(crate) fn read_field<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    field: &'static str,
) -> std::result::Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(field));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// Refuse `key` unless it is one of `fields` (the fields of the kind read
/// so far, or of every kind while none has been read).
pub(crate) fn check_key<E: de::Error>(
    key: &str,
    fields: &'static [&'static str],
) -> std::result::Result<(), E> {
    if fields.contains(&key) {
        Ok(())
    } else {
        Err(E::unknown_field(key, fields))
    }
}
