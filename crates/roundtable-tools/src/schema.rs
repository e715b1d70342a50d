//! A tool's arguments schema: checked once when the tool is built, then every call's
//! arguments are validated against it before anything runs.
//!
//! `jsonschema` is built without its resolvers: a `$ref` to another document is an
//! error at build time, never a fetch.

use serde_json::Value;

/// Most validation errors quoted in one refusal.
const MAX_REASONS: usize = 5;

/// A compiled object schema.
pub struct ArgumentSchema {
    validator: jsonschema::Validator,
    properties: Vec<String>,
}

impl std::fmt::Debug for ArgumentSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArgumentSchema").field("properties", &self.properties).finish_non_exhaustive()
    }
}

impl ArgumentSchema {
    /// Compiles `schema`, which must be a valid JSON Schema whose `type` is `object`.
    pub fn new(schema: &Value) -> Result<Self, String> {
        let Some(obj) = schema.as_object() else {
            return Err("must be a JSON Schema object (a table), with type = \"object\"".to_owned());
        };
        match obj.get("type") {
            Some(Value::String(t)) if t == "object" => {}
            Some(other) => return Err(format!("type must be \"object\", not {other}")),
            None => return Err("type must be \"object\" (it is missing)".to_owned()),
        }
        if let Err(e) = jsonschema::meta::validate(schema) {
            return Err(format!("not a valid JSON Schema: {e}"));
        }
        let validator = jsonschema::validator_for(schema).map_err(|e| format!("not a usable JSON Schema: {e}"))?;
        let properties = match obj.get("properties") {
            Some(Value::Object(p)) => p.keys().cloned().collect(),
            _ => Vec::new(),
        };
        Ok(ArgumentSchema { validator, properties })
    }

    /// The names declared under `properties`.
    pub fn properties(&self) -> &[String] {
        &self.properties
    }

    /// `Ok` when `arguments` match; otherwise why not, naming where.
    pub fn check(&self, arguments: &Value) -> Result<(), String> {
        let reasons: Vec<String> = self
            .validator
            .iter_errors(arguments)
            .take(MAX_REASONS)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() { e.to_string() } else { format!("{at}: {e}") }
            })
            .collect();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(format!("arguments do not match the tool's schema: {}", reasons.join("; ")))
        }
    }
}
