//! The share page: one static HTML file with its script and stylesheet, built
//! into the binary. The page reads its token from the URL fragment, so the
//! same bytes serve every share and the server never sees the token in a URL.
//!
//! The script is written as three files (helpers and parts, tool views, the
//! page's state and connection) and served as one: joined here at compile time
//! inside a single strict-mode function, so they share their top-level names
//! and leak none to the page.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const PAGE_HTML: &str = include_str!("assets/page.html");
const PAGE_JS: &str = concat!(
    "\"use strict\";\n(() => {\n",
    include_str!("assets/render.js"),
    include_str!("assets/tools.js"),
    include_str!("assets/page.js"),
    "})();\n",
);
const PAGE_CSS: &str = include_str!("assets/page.css");

/// What the page may load: its own script, style and API, and images only
/// from `data:` URLs: attachments embedded in the session, of which the page
/// shows small PNG, JPEG, GIF and WebP ones. Not from elsewhere (a remote
/// image would tell a third party who reads the share), nor from this server,
/// which serves none. It also forbids inline script, so even markup that
/// slipped into a message could not run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// `GET /s/{share}`: the page (for any share id: whether one exists is for the API to say).
pub async fn share_page() -> Response {
    asset(PAGE_HTML, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(PAGE_JS, "text/javascript; charset=utf-8")
}

pub async fn stylesheet() -> Response {
    asset(PAGE_CSS, "text/css; charset=utf-8")
}

/// `GET /`: what this port is, for someone who opens it by hand.
pub async fn index() -> Response {
    asset(
        "capsync: open a share link (http://host:port/s/<share>#<viewer token>) to watch a session.\n",
        "text/plain; charset=utf-8",
    )
}

pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        "not found\n",
    )
        .into_response()
}
