//! JSON schema of the model, and the serde/schemars helpers that keep it structural for
//! Kubernetes: networks are plain strings (ipnet's own schema is a `oneOf`), and documented
//! unit enums are a string `enum` (schemars would emit a `oneOf` of documented constants).
//! The operator later turns this schema into the CRDs' OpenAPI schema.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

use crate::config::Config;

/// The JSON schema (draft 2020-12) of a whole [`Config`], with every field's documentation as
/// its `description`.
pub fn json_schema() -> Value {
    schemars::schema_for!(Config).to_value()
}

/// Schema stand-in for an [`IpNet`] field: a string in CIDR notation.
pub(crate) struct IpNetString;

impl JsonSchema for IpNetString {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("IpNet")
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An IPv4 or IPv6 network in CIDR notation (\"10.0.0.0/8\", \"fd00::/8\"), or a single address.",
        })
    }
}

/// One network of a list: CIDR, or a bare address meaning that single host.
struct NetEntry(IpNet);

impl<'de> Deserialize<'de> for NetEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NetVisitor;

        impl de::Visitor<'_> for NetVisitor {
            type Value = NetEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a network such as \"10.0.0.0/8\" or an address such as \"192.0.2.1\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NetEntry, E> {
                let v = v.trim();
                v.parse::<IpNet>()
                    .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                    .map(NetEntry)
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid network {v:?}: expected CIDR notation such as \"10.0.0.0/8\" \
                             or \"fd00::/8\", or a single address such as \"192.0.2.1\""
                        ))
                    })
            }
        }

        deserializer.deserialize_str(NetVisitor)
    }
}

/// Reads a list of networks, accepting bare addresses as single-host networks; errors point at
/// the offending list index.
pub(crate) fn deserialize_ip_nets<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<IpNet>, D::Error> {
    let entries = Vec::<NetEntry>::deserialize(deserializer)?;
    Ok(entries.into_iter().map(|NetEntry(net)| net).collect())
}

/// Reads an optional section whose mere presence matters (a plugin kind): a key written
/// without a value (`- headers:`) means "set, with defaults" rather than "unset".
pub(crate) fn present_or_default<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

/// Schema transform for unit enums: replaces the `oneOf` of documented constants that schemars
/// emits with `type: string` + `enum`, and appends each variant's documentation to the
/// description, so the schema stays structural.
pub(crate) fn plain_string_enum(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let Some(Value::Array(variants)) = object.get("oneOf") else {
        return;
    };
    let mut values = Vec::new();
    let mut lines = Vec::new();
    for variant in variants {
        let value = variant.get("const").or_else(|| match variant.get("enum") {
            Some(Value::Array(single)) if single.len() == 1 => single.first(),
            _ => None,
        });
        let Some(value) = value else {
            return; // not a plain unit variant: leave the schema alone
        };
        if let (Some(name), Some(doc)) = (value.as_str(), variant.get("description")) {
            lines.push(format!("- `{name}`: {}", doc.as_str().unwrap_or_default()));
        }
        values.push(value.clone());
    }
    object.remove("oneOf");
    object.insert("type".to_owned(), Value::from("string"));
    object.insert("enum".to_owned(), Value::Array(values));
    if !lines.is_empty() {
        let head = object
            .get("description")
            .and_then(Value::as_str)
            .map(|d| format!("{d}\n\n"))
            .unwrap_or_default();
        object.insert(
            "description".to_owned(),
            Value::from(head + &lines.join("\n")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::ListenerSpec;

    /// Every `oneOf`/`anyOf` in `value`, with its JSON pointer.
    fn alternatives<'a>(value: &'a Value, at: String, out: &mut Vec<(String, &'a Vec<Value>)>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    if let ("oneOf" | "anyOf", Value::Array(list)) = (key.as_str(), child) {
                        out.push((format!("{at}/{key}"), list));
                    }
                    alternatives(child, format!("{at}/{key}"), out);
                }
            }
            Value::Array(list) => {
                for (i, child) in list.iter().enumerate() {
                    alternatives(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    /// An alternative that only expresses `Option<T>`: `[T, {"type": "null"}]`.
    fn is_nullability(list: &[Value]) -> bool {
        list.len() == 2
            && list
                .iter()
                .any(|v| v == &serde_json::json!({"type": "null"}))
    }

    /// Finding (schemars 1.2, draft 2020-12): the only `anyOf`s left in the listener schema are
    /// `Option<Struct>` fields (`tls`, `auth`, plugin kinds) rendered as
    /// `anyOf: [{$ref}, {type: null}]`; `Option<String>` becomes `type: ["string", "null"]`.
    /// Without our helpers there would be real `oneOf`s: ipnet's schema for `IpNet`, and
    /// schemars' rendering of unit enums whose variants have doc comments.
    #[test]
    fn listener_schema_is_structural_apart_from_nullability() {
        let schema = schemars::schema_for!(ListenerSpec).to_value();
        let mut found = Vec::new();
        alternatives(&schema, String::new(), &mut found);
        for (at, list) in &found {
            assert!(is_nullability(list), "{at} is a real alternative: {list:?}");
        }
        assert!(!found.is_empty(), "expected Option nullability anyOfs");
        let mode = &schema["$defs"]["ListenerMode"];
        assert_eq!(mode["type"], "string");
        assert_eq!(mode["enum"], serde_json::json!(["mx", "submission"]));
        let relay = &schema["properties"]["relayNetworks"]["items"];
        assert_eq!(relay["type"], "string");
    }

    #[test]
    fn config_schema_documents_fields_and_patterns() {
        let schema = json_schema();
        let listener = &schema["$defs"]["ListenerSpec"];
        assert_eq!(listener["additionalProperties"], false);
        let address = listener["properties"]["address"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(address.contains("127.0.0.1:2525"), "{address}");
        let size = &schema["$defs"]["Limits"]["properties"]["maxMessageSize"];
        assert_eq!(size["type"], "string");
        assert!(size["pattern"].as_str().is_some_and(|p| p.contains("MiB")));
        assert_eq!(size["default"], "25MiB");
        let mut found = Vec::new();
        alternatives(&schema, String::new(), &mut found);
        for (at, list) in &found {
            assert!(is_nullability(list), "{at} is a real alternative: {list:?}");
        }
    }
}
