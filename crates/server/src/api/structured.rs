//! Structured outputs in requests: OpenAI's `response_format` (chat) and vLLM's
//! `structured_outputs` extension (chat and completions), resolved into one constraint.

use moeserve_core::grammar::ConstraintSpec;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    /// Accepted; the output always follows the schema exactly.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: exactly one of its fields.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StructuredOutputs {
    /// A JSON schema (an object, or a string holding one).
    #[schema(value_type = Option<Object>)]
    pub json: Option<Value>,
    /// A regular expression the whole output matches.
    pub regex: Option<String>,
    /// The output is exactly one of these strings.
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Any JSON object.
    pub json_object: Option<bool>,
}

/// The constraint a request asks for, and the parameter it came from (named in errors).
pub fn constraint_spec(
    response_format: Option<&ResponseFormat>,
    structured: Option<&StructuredOutputs>,
) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    match (response_format, structured) {
        (Some(_), Some(_)) => Err(ApiError::invalid_param(
            "structured_outputs",
            "response_format and structured_outputs cannot both be set",
        )),
        (Some(f), None) => from_response_format(f),
        (None, Some(s)) => from_structured_outputs(s),
        (None, None) => Ok(None),
    }
}

fn from_response_format(f: &ResponseFormat) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some((ConstraintSpec::JsonObject, "response_format"))),
        "json_schema" => {
            let param = "response_format.json_schema.schema";
            let Some(spec) = &f.json_schema else {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema",
                    "response_format of type json_schema needs json_schema",
                ));
            };
            let schema = spec
                .schema
                .clone()
                .ok_or_else(|| ApiError::invalid_param(param, "json_schema needs a schema"))?;
            Ok(Some((schema_spec(schema, param)?, param)))
        }
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!("unknown response_format type {other:?} (expected text, json_object or json_schema)"),
        )),
    }
}

fn from_structured_outputs(
    s: &StructuredOutputs,
) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    let mut found = Vec::new();
    if let Some(json) = &s.json {
        found.push((
            schema_spec(json.clone(), "structured_outputs.json")?,
            "structured_outputs.json",
        ));
    }
    if let Some(rx) = &s.regex {
        found.push((ConstraintSpec::Regex(rx.clone()), "structured_outputs.regex"));
    }
    if let Some(choice) = &s.choice {
        if choice.is_empty() {
            return Err(ApiError::invalid_param(
                "structured_outputs.choice",
                "choice must list at least one string",
            ));
        }
        found.push((
            ConstraintSpec::Choice(choice.clone()),
            "structured_outputs.choice",
        ));
    }
    if let Some(g) = &s.grammar {
        found.push((ConstraintSpec::Lark(g.clone()), "structured_outputs.grammar"));
    }
    if s.json_object == Some(true) {
        found.push((ConstraintSpec::JsonObject, "structured_outputs.json_object"));
    }
    match found.len() {
        0 => Err(ApiError::invalid_param(
            "structured_outputs",
            "structured_outputs needs one of json, regex, choice, grammar or json_object",
        )),
        1 => Ok(found.pop()),
        _ => Err(ApiError::invalid_param(
            "structured_outputs",
            "structured_outputs takes only one of json, regex, choice, grammar and json_object",
        )),
    }
}

/// A schema given as an object, a boolean, or a string holding either.
pub fn schema_spec(schema: Value, param: &str) -> Result<ConstraintSpec, ApiError> {
    let schema = match schema {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::invalid_param(param, format!("the schema is not valid JSON: {e}")))?,
        v => v,
    };
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(ConstraintSpec::JsonSchema(schema)),
        _ => Err(ApiError::invalid_param(param, "a JSON schema must be an object")),
    }
}
