//! A JSON Schema validator for the keywords monitor/event.schema.json uses
//! (draft 2020-12 meanings): `type` (a name or a list), `properties`,
//! `required`, `additionalProperties` (false or a schema), `enum`, `const`,
//! `items`, `minimum`, `minLength`, `$ref` to `#/$defs/NAME`, and the
//! annotations `$schema`, `$id`, `$defs`, `title`, `description`. Any
//! other keyword is an error, so that the schema cannot come to rely on one
//! that nothing checks.

use serde_json::Value;

const ANNOTATIONS: &[&str] = &["$schema", "$id", "$defs", "title", "description"];

/// Every violation of `schema` (the root, for `$ref`) by `value`, as
/// `path: what`; empty when it conforms.
pub fn violations(root: &Value, value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    check(root, root, value, "$", &mut found);
    found
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        other => panic!("schema: unknown type {other}"),
    }
}

fn check(root: &Value, schema: &Value, value: &Value, path: &str, found: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        panic!("schema at {path} is not an object");
    };
    for (keyword, rule) in schema {
        match keyword.as_str() {
            keyword if ANNOTATIONS.contains(&keyword) => {}
            "$ref" => {
                let name = rule
                    .as_str()
                    .and_then(|reference| reference.strip_prefix("#/$defs/"))
                    .unwrap_or_else(|| panic!("schema: unsupported $ref {rule}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "schema: no $defs/{name}");
                check(root, target, value, path, found);
            }
            "type" => {
                let names: Vec<&str> = match rule {
                    Value::String(name) => vec![name.as_str()],
                    Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
                    other => panic!("schema: bad type {other}"),
                };
                if !names.iter().any(|name| type_matches(name, value)) {
                    found.push(format!("{path}: {value} is not {}", names.join(" or ")));
                }
            }
            "enum" => {
                let allowed = rule.as_array().expect("enum is a list");
                if !allowed.contains(value) {
                    found.push(format!("{path}: {value} is not one of {rule}"));
                }
            }
            "const" => {
                if rule != value {
                    found.push(format!("{path}: {value} is not {rule}"));
                }
            }
            "minimum" => {
                let minimum = rule.as_f64().expect("minimum is a number");
                if value.as_f64().is_some_and(|number| number < minimum) {
                    found.push(format!("{path}: {value} is below {minimum}"));
                }
            }
            "minLength" => {
                let minimum = rule.as_u64().expect("minLength is a number") as usize;
                if value
                    .as_str()
                    .is_some_and(|text| text.chars().count() < minimum)
                {
                    found.push(format!("{path}: {value} is shorter than {minimum}"));
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in rule.as_array().expect("required is a list") {
                        let name = name.as_str().expect("required names are strings");
                        if !object.contains_key(name) {
                            found.push(format!("{path}: no {name}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(object) = value.as_object() {
                    for (name, property) in rule.as_object().expect("properties is an object") {
                        if let Some(field) = object.get(name) {
                            check(root, property, field, &format!("{path}.{name}"), found);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = schema.get("properties").and_then(Value::as_object);
                    for (name, field) in object {
                        if known.is_some_and(|known| known.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(false) => {
                                found.push(format!("{path}: {name} is not in the schema"));
                            }
                            Value::Bool(true) => {}
                            extra => check(root, extra, field, &format!("{path}.{name}"), found),
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (index, item) in items.iter().enumerate() {
                        check(root, rule, item, &format!("{path}[{index}]"), found);
                    }
                }
            }
            other => panic!("schema: keyword {other} at {path} is not checked by this validator"),
        }
    }
}
