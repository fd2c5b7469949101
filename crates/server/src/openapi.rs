//! The OpenAPI document, generated from the request and response types and the routes'
//! annotations (never kept by hand), served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{anthropic, openai_responses, requests, responses, tokenize};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "moeserve",
        description = "An OpenAI-compatible inference server for Mixture-of-Experts language models. \
            Errors come in OpenAI's shape (`ErrorResponse`) with the status named on each route.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::chat::chat_completions,
        routes::completions::completions,
        routes::responses::create,
        routes::responses::compact,
        routes::responses::retrieve,
        routes::responses::delete,
        routes::messages::messages,
        routes::messages::count_tokens,
        routes::tokenize::tokenize,
        routes::tokenize::detokenize,
        routes::models::list,
        routes::models::retrieve,
        routes::health::health,
        routes::health::ready,
        routes::health::metrics,
        routes::openapi::openapi,
    ),
    components(schemas(
        requests::ChatCompletionRequest,
        requests::CompletionRequest,
        requests::ChatMessage,
        requests::MessageContent,
        requests::ContentPart,
        requests::StopSpec,
        requests::StreamOptions,
        requests::PromptSpec,
        responses::ChatCompletion,
        responses::ChatCompletionChunk,
        responses::Completion,
        responses::CompletionChunk,
        responses::ModelList,
        responses::ModelCard,
        responses::Health,
        responses::HealthProgress,
        responses::Ready,
        responses::ErrorResponse,
        openai_responses::ResponsesRequest,
        openai_responses::ResponseObject,
        openai_responses::ResponseStreamEvent,
        openai_responses::DeletedResponse,
        openai_responses::CompactRequest,
        openai_responses::CompactResponse,
        tokenize::TokenizeRequest,
        tokenize::TokenizeResponse,
        tokenize::DetokenizeRequest,
        tokenize::DetokenizeResponse,
        anthropic::MessagesRequest,
        anthropic::CountTokensRequest,
        anthropic::Message,
        anthropic::StreamEvent,
        anthropic::TokenCount,
        anthropic::AnthropicError,
    )),
    modifiers(&ApiKey),
    tags(
        (name = "generation", description = "Chat and text completions, streamed or not."),
        (name = "responses", description = "OpenAI's Responses API, with responses stored in memory for `previous_response_id`."),
        (name = "anthropic", description = "Anthropic's Messages API (errors in Anthropic's shape; `x-api-key` is accepted as the key)."),
        (name = "tokenizer", description = "vLLM's tokenize and detokenize."),
        (name = "models", description = "The served model."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    )
)]
pub struct ApiDoc;

/// The bearer scheme the `api_key` security requirement names (enforced only when the
/// server has API keys).
struct ApiKey;

impl Modify for ApiKey {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validators and code generators reject a document in which two operations share
    /// an id (`retrieve` was both `/v1/models/{id}` and `/v1/responses/{id}`).
    #[test]
    fn operation_ids_are_unique() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut ids = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                ids.push(id.to_string());
            }
        }
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate operation ids among {ids:?}");
        assert!(n > 10);
    }
}
