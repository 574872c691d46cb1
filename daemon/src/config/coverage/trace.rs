//! A serde `Deserializer` that feeds a type one made-up value of every shape it asks for and
//! records the path of every field it reaches: the CRD mirror's own list of fields, so the
//! coverage table cannot fall behind it.

use std::{cell::RefCell, collections::BTreeSet, fmt};

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

/// Every field path of `T`, as `block.field`, `list[].field` and `map.*.field`.
pub fn fields<T: de::DeserializeOwned>() -> BTreeSet<String> {
    let seen = RefCell::new(BTreeSet::new());
    T::deserialize(Tracer {
        path: String::new(),
        seen: &seen,
        depth: 0,
    })
    .unwrap_or_else(|e| panic!("tracing the CRD mirror: {e}"));
    seen.into_inner()
}

/// The deepest nesting followed (the mirror has no recursive types; this is a guard).
const MAX_DEPTH: usize = 16;

struct Tracer<'a> {
    path: String,
    seen: &'a RefCell<BTreeSet<String>>,
    depth: usize,
}

#[derive(Debug)]
pub struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

impl<'a> Tracer<'a> {
    fn child(&self, suffix: &str) -> Tracer<'a> {
        Tracer {
            path: format!("{}{suffix}", self.path),
            seen: self.seen,
            depth: self.depth + 1,
        }
    }

    /// Records the current path as a leaf (a value with no fields of its own).
    fn leaf(&self) {
        if !self.path.is_empty() {
            self.seen.borrow_mut().insert(self.path.clone());
        }
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($($value:expr)?)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
            self.leaf();
            v.$visit($($value)?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    leaf! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(0),
        deserialize_i16 => visit_i16(0),
        deserialize_i32 => visit_i32(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u8(0),
        deserialize_u16 => visit_u16(0),
        deserialize_u32 => visit_u32(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f32(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_char => visit_char('x'),
        deserialize_str => visit_str("x"),
        deserialize_string => visit_str("x"),
        deserialize_bytes => visit_bytes(b"x"),
        deserialize_byte_buf => visit_bytes(b"x"),
        deserialize_unit => visit_unit(),
        deserialize_identifier => visit_str("x"),
        deserialize_ignored_any => visit_unit(),
        // Opaque blocks (`serde_yaml::Value`) and untagged enums: a string satisfies both.
        deserialize_any => visit_str("x"),
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        v.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.leaf();
        v.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, TraceError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        v.visit_seq(One {
            next: Some(self.child("[]")),
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, TraceError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, TraceError> {
        v.visit_map(Fields {
            keys: vec![("x", self.child(".*"))].into_iter(),
            value: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, TraceError> {
        if self.depth > MAX_DEPTH {
            return Err(TraceError(format!("{} nests too deep", self.path)));
        }
        let dot = if self.path.is_empty() { "" } else { "." };
        let keys: Vec<_> = fields
            .iter()
            .map(|f| (*f, self.child(&format!("{dot}{f}"))))
            .collect();
        v.visit_map(Fields {
            keys: keys.into_iter(),
            value: None,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, TraceError> {
        self.leaf();
        // The first variant stands for them all: unit variants are values, not fields.
        v.visit_enum(variants[0].into_deserializer())
    }
}

/// A sequence of one element.
struct One<'a> {
    next: Option<Tracer<'a>>,
}

impl<'de> de::SeqAccess<'de> for One<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        self.next.take().map(|t| seed.deserialize(t)).transpose()
    }
}

/// A struct's (or map's) keys, each with the tracer for its value.
struct Fields<'a> {
    keys: std::vec::IntoIter<(&'static str, Tracer<'a>)>,
    value: Option<Tracer<'a>>,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        let Some((key, tracer)) = self.keys.next() else {
            return Ok(None);
        };
        self.value = Some(tracer);
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, TraceError> {
        let tracer = self
            .value
            .take()
            .ok_or_else(|| TraceError("value before key".into()))?;
        seed.deserialize(tracer)
    }
}
