//! Tools in chat requests: `tools`, `tool_choice` and `parallel_tool_calls`, checked and
//! resolved into the functions offered and how the answer may use them.

use moeserve_core::tools::{CallMode, FunctionSpec};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolDef {
    /// `function` (the only kind).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionDef>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionDef {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A JSON schema of the arguments object (none: no arguments).
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// Accepted; a required call's arguments always follow the schema exactly.
    pub strict: Option<bool>,
}

/// How the answer may use the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are not offered to the model.
    None,
    /// The model decides.
    Auto,
    /// At least one call, of any offered function.
    Required,
    /// One call of this function.
    Named(String),
}

/// The request's tools, resolved.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub functions: Vec<FunctionSpec>,
    pub choice: ToolChoice,
    /// More than one call may be made in one answer.
    pub parallel: bool,
}

impl ToolPlan {
    /// Whether the answer is read for calls.
    pub fn offers_tools(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The functions calls may name, and whether the answer must call.
    pub fn call_constraint(&self) -> Option<(Vec<FunctionSpec>, CallMode)> {
        match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto => Some((self.functions.clone(), CallMode::Auto)),
            ToolChoice::Required => Some((self.functions.clone(), CallMode::Required)),
            ToolChoice::Named(n) => Some((
                self.functions.iter().filter(|f| &f.name == n).cloned().collect(),
                CallMode::Required,
            )),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools were
/// offered.
pub fn tool_plan(
    tools: Option<&[ToolDef]>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let Some(tools) = tools else {
        if tool_choice.is_some() {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "tool_choice is only allowed when tools are specified",
            ));
        }
        return Ok(None);
    };
    if tools.is_empty() {
        return Err(ApiError::invalid_param(
            "tools",
            "tools must list at least one tool",
        ));
    }
    let mut functions: Vec<FunctionSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if let Some(kind) = t.kind.as_deref().filter(|k| *k != "function") {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].type"),
                format!("unknown tool type {kind:?} (only function)"),
            ));
        }
        let Some(f) = &t.function else {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function"),
                "a tool needs a function",
            ));
        };
        let name = f.name.as_deref().unwrap_or("");
        if !valid_name(name) {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function.name"),
                format!("a function needs a name of 1 to 64 letters, digits, '_', '-' or '.', got {name:?}"),
            ));
        }
        if functions.iter().any(|g| g.name == name) {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function.name"),
                format!("the function {name:?} is listed twice"),
            ));
        }
        let parameters = match &f.parameters {
            None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(o)) => {
                if o.get("type").is_some_and(|t| t != "object") {
                    return Err(ApiError::invalid_param(
                        &format!("tools[{i}].function.parameters"),
                        "parameters must be a JSON schema of an object",
                    ));
                }
                p.clone()
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON schema (an object)",
                ))
            }
        };
        functions.push(FunctionSpec {
            name: name.to_string(),
            description: f.description.clone(),
            parameters,
        });
    }
    let bad_choice = |m: String| ApiError::invalid_param("tool_choice", m);
    let choice = match tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad_choice(format!(
                    "unknown tool_choice {other:?} (none, auto, required or a function)"
                )))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad_choice("tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\": ..}}".into()))?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(bad_choice(format!(
                    "tool_choice names {name:?}, which is not in tools"
                )));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(_) => return Err(bad_choice("tool_choice must be a string or an object".into())),
    };
    let parallel = parallel.unwrap_or(true) && !matches!(choice, ToolChoice::Named(_));
    Ok(Some(ToolPlan {
        functions,
        choice,
        parallel,
    }))
}
