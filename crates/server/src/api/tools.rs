//! Tools in requests, resolved into the functions offered and how the answer may use
//! them ([`ToolPlan`]): chat's `tools` / `tool_choice` / `parallel_tool_calls` here, and
//! the builders the Responses and Messages conversions share ([`Functions`],
//! [`ToolPlan::new`]), so a name, a schema or a grammar is checked the same way on every
//! API.

use moeserve_core::tools::{CallMode, CustomInput, FreeForm, FunctionSpec};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// One entry of chat's `tools`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolDef {
    /// `function` (the default) or `custom`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionDef>,
    /// A custom tool: free-form text input, optionally following a grammar.
    pub custom: Option<CustomDef>,
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

/// Chat's custom tool: `{"name", "description", "format": {"type": "text"} |
/// {"type": "grammar", "grammar": {"syntax": "lark" | "regex", "definition"}}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CustomDef {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub format: Option<Value>,
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

impl ToolChoice {
    /// A choice given as a string (`none`, `auto`, `required`); `field` names it in errors.
    pub fn from_mode(mode: &str, field: &str) -> Result<Self, ApiError> {
        match mode {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(ApiError::invalid_param(
                field,
                format!("unknown {field} {other:?} (none, auto, required or a tool)"),
            )),
        }
    }
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
    /// `functions` used as `choice` says; `parallel` (default true) does not apply to a
    /// named function (one call). A named function must be offered: `field` names the
    /// choice in errors.
    pub fn new(
        functions: Vec<FunctionSpec>,
        choice: ToolChoice,
        parallel: Option<bool>,
        field: &str,
    ) -> Result<Self, ApiError> {
        if let ToolChoice::Named(name) = &choice {
            if !functions.iter().any(|f| &f.name == name) {
                return Err(ApiError::invalid_param(
                    field,
                    format!("{field} names {name:?}, which is not in tools"),
                ));
            }
        }
        let parallel = parallel.unwrap_or(true) && !matches!(choice, ToolChoice::Named(_));
        Ok(ToolPlan {
            functions,
            choice,
            parallel,
        })
    }

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

/// The functions a request offers, checked as they are added: names valid and unique,
/// parameters a schema of an object, custom grammars usable.
#[derive(Debug, Default)]
pub struct Functions {
    pub list: Vec<FunctionSpec>,
}

impl Functions {
    fn check_name(&self, name: Option<&str>, field: &str) -> Result<String, ApiError> {
        let name = name.unwrap_or("");
        if !valid_name(name) {
            return Err(ApiError::invalid_param(
                field,
                format!("a tool needs a name of 1 to 64 letters, digits, '_', '-' or '.', got {name:?}"),
            ));
        }
        if self.list.iter().any(|g| g.name == name) {
            return Err(ApiError::invalid_param(
                field,
                format!("the tool {name:?} is listed twice"),
            ));
        }
        Ok(name.to_string())
    }

    /// A function tool; `at` is where it is in the request (errors point inside it at
    /// `name_field` and `parameters_field`).
    pub fn function(
        &mut self,
        name: Option<&str>,
        description: Option<&str>,
        parameters: Option<&Value>,
        name_field: &str,
        parameters_field: &str,
    ) -> Result<(), ApiError> {
        let name = self.check_name(name, name_field)?;
        let parameters = match parameters {
            None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(o)) => {
                if o.get("type").is_some_and(|t| t != "object") {
                    return Err(ApiError::invalid_param(
                        parameters_field,
                        "parameters must be a JSON schema of an object",
                    ));
                }
                p.clone()
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    parameters_field,
                    "parameters must be a JSON schema (an object)",
                ))
            }
        };
        self.list.push(FunctionSpec {
            name,
            description: description.map(String::from),
            parameters,
            custom: None,
        });
        Ok(())
    }

    /// A custom tool: its `format` in the Responses shape (`{"type": "grammar",
    /// "syntax", "definition"}`) or chat's (`{"type": "grammar", "grammar": {..}}`),
    /// or text.
    pub fn custom(
        &mut self,
        name: Option<&str>,
        description: Option<&str>,
        format: Option<&Value>,
        at: &str,
    ) -> Result<(), ApiError> {
        let name = self.check_name(name, &format!("{at}.name"))?;
        let field = format!("{at}.format");
        let form = free_form(format, &field)?;
        let custom = CustomInput::new(form)
            .map_err(|e| ApiError::invalid_param(&field, format!("the grammar cannot be used: {e}")))?;
        self.list.push(FunctionSpec {
            name,
            description: description.map(String::from),
            parameters: CustomInput::parameters(),
            custom: Some(custom),
        });
        Ok(())
    }
}

/// A custom tool's input format.
fn free_form(format: Option<&Value>, field: &str) -> Result<FreeForm, ApiError> {
    let Some(f) = format.filter(|f| !f.is_null()) else {
        return Ok(FreeForm::Text);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(FreeForm::Text),
        Some("grammar") => {
            let g = f.get("grammar").unwrap_or(f);
            let definition = g.get("definition").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_param(
                    &format!("{field}.definition"),
                    "a grammar format needs its definition",
                )
            })?;
            match g.get("syntax").and_then(Value::as_str) {
                Some("lark") => Ok(FreeForm::Lark(definition.to_string())),
                Some("regex") => Ok(FreeForm::Regex(definition.to_string())),
                other => Err(ApiError::invalid_param(
                    &format!("{field}.syntax"),
                    format!(
                        "a grammar's syntax is lark or regex, got {}",
                        other.unwrap_or("none")
                    ),
                )),
            }
        }
        other => Err(ApiError::invalid_param(
            &format!("{field}.type"),
            format!(
                "a custom tool's format is text or grammar, got {}",
                other.unwrap_or("none")
            ),
        )),
    }
}

/// Checks chat's `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools
/// were offered.
pub fn tool_plan(
    tools: Option<&[ToolDef]>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let Some(tools) = tools else {
        if tool_choice.is_some_and(|c| !c.is_null()) {
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
    let mut functions = Functions::default();
    for (i, t) in tools.iter().enumerate() {
        match t.kind.as_deref().unwrap_or("function") {
            "function" => {
                let Some(f) = &t.function else {
                    return Err(ApiError::invalid_param(
                        &format!("tools[{i}].function"),
                        "a tool needs a function",
                    ));
                };
                functions.function(
                    f.name.as_deref(),
                    f.description.as_deref(),
                    f.parameters.as_ref(),
                    &format!("tools[{i}].function.name"),
                    &format!("tools[{i}].function.parameters"),
                )?;
            }
            "custom" => {
                let Some(c) = &t.custom else {
                    return Err(ApiError::invalid_param(
                        &format!("tools[{i}].custom"),
                        "a custom tool needs custom",
                    ));
                };
                functions.custom(
                    c.name.as_deref(),
                    c.description.as_deref(),
                    c.format.as_ref(),
                    &format!("tools[{i}].custom"),
                )?;
            }
            kind => {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].type"),
                    format!("unknown tool type {kind:?} (function or custom)"),
                ))
            }
        }
    }
    let bad_choice = |m: String| ApiError::invalid_param("tool_choice", m);
    let choice = match tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => ToolChoice::from_mode(s, "tool_choice")?,
        Some(v @ Value::Object(_)) => {
            let name = v
                .pointer("/function/name")
                .or_else(|| v.pointer("/custom/name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad_choice("tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\": ..}}".into()))?;
            ToolChoice::Named(name.to_string())
        }
        Some(_) => return Err(bad_choice("tool_choice must be a string or an object".into())),
    };
    ToolPlan::new(functions.list, choice, parallel, "tool_choice").map(Some)
}
