//! HTTP mapping of every failure, in one place.
//!
//! The SDK shows a failure's status and body to its user, so each answer says what was wrong and
//! where (`{"error": "...", "category": "user" | "server"}`). Two traps shape this file: a 400
//! with an empty body reads to the SDK as a proxy rejection and is retried as a connection error,
//! so every error has a body; and 408/409/429/5xx are retried for minutes, so input errors must
//! never be 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use whet_contract::ContractError;

/// Who is at fault, in Tinker's words (`RequestErrorCategory`, lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The request was wrong.
    User,
    /// The server failed.
    Server,
}

impl Category {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::User => "user",
            Category::Server => "server",
        }
    }
}

/// A failed request: an HTTP status and a message naming the field or resource at fault.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed; `field` names what is wrong.
    pub fn bad(field: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("{field}: {message}"),
        }
    }

    /// 401: no key, or one this server does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }

    /// 403: the key does not own the resource.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// 410: the session is over (the SDK's heartbeat stops on it).
    pub fn gone(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::GONE,
            message: message.into(),
        }
    }

    /// 500: the server failed (the SDK retries these).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// The category the status implies.
    pub fn category(&self) -> Category {
        if self.status.is_server_error() {
            Category::Server
        } else {
            Category::User
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        } else {
            tracing::info!(status = %self.status, "{}", self.message);
        }
        let body = json!({"error": self.message, "category": self.category().as_str()});
        (self.status, Json(body)).into_response()
    }
}

/// A contract error as the category of a failed future: input problems are the user's, the
/// rest the server's.
pub fn contract_category(e: &ContractError) -> Category {
    match e {
        ContractError::InvalidInput { .. } | ContractError::Unsupported(_) => Category::User,
        ContractError::Io { .. } | ContractError::Internal(_) => Category::Server,
    }
}

impl From<ContractError> for ApiError {
    fn from(e: ContractError) -> Self {
        match contract_category(&e) {
            Category::User => Self {
                status: StatusCode::BAD_REQUEST,
                message: e.to_string(),
            },
            Category::Server => Self::internal(e.to_string()),
        }
    }
}

impl From<whet_jobs::JobError> for ApiError {
    fn from(e: whet_jobs::JobError) -> Self {
        match e {
            whet_jobs::JobError::Invalid(m) => Self {
                status: StatusCode::BAD_REQUEST,
                message: m,
            },
            whet_jobs::JobError::NotFound(m) => Self::not_found(m),
            other => Self::internal(other.to_string()),
        }
    }
}
