//! Fuzzing harness for what the HTTP gateway reads from a request (the bearer
//! token, the ops query, where an event stream starts) and for the markdown
//! of agent text it renders into share pages, whole and in segments.

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use capsync_shared::limits::MAX_OPS_PAGE;

use super::api::{OpsQuery, ops_limit};
use super::auth::bearer;
use super::error::ApiError;
use super::events::{EventsQuery, start_after};
use super::markdown;
use super::markdown_segments::Segments;

/// What a fuzz input's first byte picks.
pub const PARTS: [&str; 3] = ["authorization", "ops-query", "events-start"];

/// One fuzz input: a byte choosing what is read, then its bytes:
/// - `authorization`: an `Authorization` header value;
/// - `ops-query`: the query string of `GET /api/shares/{share}/ops`;
/// - `events-start`: a `Last-Event-ID` header value, a newline, and the
///   query string of `GET /api/shares/{share}/events`.
pub fn http_request(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match usize::from(selector) % PARTS.len() {
        0 => authorization(rest),
        1 => ops_query(rest),
        _ => {
            let (last_event_id, query) = match rest.iter().position(|&b| b == b'\n') {
                Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
                None => (None, rest),
            };
            events_start(last_event_id, query);
        }
    }
}

/// The input that [`http_request`] reads as `part` with these bytes.
#[cfg(test)]
pub(crate) fn encode(part: &str, bytes: &[u8]) -> Vec<u8> {
    let index = PARTS
        .iter()
        .position(|p| *p == part)
        .unwrap_or_else(|| panic!("{part} is not one of PARTS"));
    let mut data = vec![index as u8];
    data.extend_from_slice(bytes);
    data
}

fn authorization(value: &[u8]) {
    // What the HTTP parser would not let through never reaches the handler.
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value.clone());
    let Some(token) = bearer(&headers) else {
        return;
    };
    let text = value
        .to_str()
        .expect("a token was read, so the value is text");
    let (scheme, rest) = text.split_once(' ').expect("a token follows a space");
    assert!(scheme.eq_ignore_ascii_case("bearer"), "scheme {scheme:?}");
    assert!(!token.is_empty() && token == token.trim() && rest.contains(token));
    crate::fuzzing::check_token(token);
}

/// The query as axum hands it to the handler, from a request for `path?query`.
fn query<T: serde::de::DeserializeOwned>(path: &str, query: &[u8]) -> Option<T> {
    let query = std::str::from_utf8(query).ok()?;
    let uri: Uri = format!("{path}?{query}").parse().ok()?;
    Query::<T>::try_from_uri(&uri).ok().map(|Query(q)| q)
}

fn ops_query(bytes: &[u8]) {
    let Some(parsed) = query::<OpsQuery>("/api/shares/sh_1/ops", bytes) else {
        return;
    };
    let limit = ops_limit(parsed.limit);
    assert!((1..=MAX_OPS_PAGE).contains(&limit), "limit {limit}");
    if parsed.limit != 0 {
        assert_eq!(limit, parsed.limit.min(MAX_OPS_PAGE));
    }
}

fn events_start(last_event_id: Option<&[u8]>, query_bytes: &[u8]) {
    let Some(parsed) = query::<EventsQuery>("/api/shares/sh_1/events", query_bytes) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Some(value) = last_event_id {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        headers.insert("last-event-id", value);
    }
    // A reconnect names its cursor; only an absent or blank header falls back to `?after=`.
    let named = headers.get("last-event-id").and_then(|value| {
        let text = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
        (!text.is_empty()).then_some(text)
    });
    match (start_after(&headers, &parsed), named) {
        (Ok(after), Some(id)) => assert_eq!(id.parse::<u64>().ok(), Some(after), "{id:?}"),
        (Ok(after), None) => assert_eq!(after, parsed.after.unwrap_or(0)),
        (Err(ApiError::BadRequest(_)), Some(id)) => {
            assert!(id.parse::<u64>().is_err(), "cursor {id:?} refused");
        }
        (Err(err), id) => panic!("Last-Event-ID {id:?} gave {err:?}"),
    }
}

/// HTML elements the renderer may produce, each with the attributes it may carry.
const ALLOWED_ELEMENTS: &[(&str, &[&str])] = &[
    ("a", &["href", "title"]),
    ("blockquote", &[]),
    ("br", &[]),
    ("code", &["class"]),
    ("del", &[]),
    ("em", &[]),
    ("h1", &[]),
    ("h2", &[]),
    ("h3", &[]),
    ("h4", &[]),
    ("h5", &[]),
    ("h6", &[]),
    ("hr", &[]),
    ("input", &["checked", "disabled", "type"]),
    ("li", &[]),
    ("ol", &["start"]),
    ("p", &[]),
    ("pre", &[]),
    ("strong", &[]),
    ("table", &[]),
    ("tbody", &[]),
    ("td", &["style"]),
    ("th", &["style"]),
    ("thead", &[]),
    ("tr", &[]),
    ("ul", &[]),
];

/// One fuzz input: agent text, rendered as the share page renders text parts.
/// Whatever the text, the HTML holds only the elements and attributes above,
/// and every link has no scheme or one of `http`, `https`, `mailto`.
pub fn markdown(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let html = markdown::render(text);
    segments_join_to(text, &html);
    let mut rest = html.as_str();
    while let Some(open) = rest.find('<') {
        let close = rest[open..]
            .find('>')
            .unwrap_or_else(|| panic!("unclosed tag in {html:?}"));
        check_tag(&rest[open + 1..open + close], &html);
        rest = &rest[open + close + 1..];
    }
}

/// The text's segments, made at once and grown by deltas (of sizes the text's own bytes
/// pick), are the same and join to `html`, its whole rendering.
fn segments_join_to(text: &str, html: &str) {
    let whole = Segments::of(text);
    assert_eq!(whole.html(text, 0).concat(), html, "segments of {text:?}");
    let mut grown = Segments::of("");
    let mut sent: Vec<String> = Vec::new();
    let mut end = 0;
    while end < text.len() {
        end = (end + usize::from(text.as_bytes()[end] % 64) + 1).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let from = grown.grow(&text[..end]);
        assert!(
            from <= sent.len(),
            "segment {from} of {} in {text:?}",
            sent.len()
        );
        sent.truncate(from);
        sent.extend(grown.html(&text[..end], from));
    }
    assert_eq!(grown, whole, "segments grown by deltas of {text:?}");
    assert_eq!(sent.concat(), html, "segments sent for deltas of {text:?}");
}

/// Checks the inside of one tag (between `<` and `>`).
fn check_tag(tag: &str, html: &str) {
    let tag = tag.strip_prefix('/').unwrap_or(tag);
    let tag = tag.strip_suffix('/').unwrap_or(tag);
    let (name, mut attributes) = tag.split_once(' ').unwrap_or((tag, ""));
    let Some((_, allowed)) = ALLOWED_ELEMENTS.iter().find(|(n, _)| *n == name) else {
        panic!("element <{name}> in {html:?}");
    };
    while !attributes.trim().is_empty() {
        let (attribute, after) = attributes
            .trim_start()
            .split_once("=\"")
            .unwrap_or_else(|| panic!("attribute without a quoted value in <{tag}> of {html:?}"));
        let (value, after) = after
            .split_once('"')
            .unwrap_or_else(|| panic!("unterminated attribute in <{tag}> of {html:?}"));
        assert!(
            allowed.contains(&attribute),
            "attribute {attribute} on <{name}> in {html:?}"
        );
        if attribute == "href" {
            let href = value.replace("&amp;", "&").replace("&#x27;", "'");
            assert!(is_harmless_link(&href), "link {href:?} in {html:?}");
        }
        attributes = after;
    }
}

/// Whether a browser would follow `href` with no scheme or a harmless one: the
/// scheme of the URL standard (a letter, then letters, digits, `+`, `-`, `.`,
/// then `:`), after the leading controls and spaces and every tab and newline
/// that browsers drop.
fn is_harmless_link(href: &str) -> bool {
    let cleaned: String = href
        .trim_start_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let scheme_len = cleaned
        .char_indices()
        .find(|(i, c)| {
            !(c.is_ascii_alphabetic() || (*i > 0 && (c.is_ascii_digit() || "+-.".contains(*c))))
        })
        .map(|(i, _)| i);
    match scheme_len {
        Some(len) if len > 0 && cleaned[len..].starts_with(':') => matches!(
            cleaned[..len].to_ascii_lowercase().as_str(),
            "http" | "https" | "mailto"
        ),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `markdown`: the scheme check looked at the first 16
    /// characters only, so a link with a longer scheme was kept, although
    /// only `http`, `https`, `mailto` and relative links are.
    #[test]
    fn a_link_with_a_long_scheme_is_not_kept() {
        let scheme = "javascriptjavascript";
        let html = markdown::render(&format!("[j]({scheme}:alert(1)) <{scheme}:x>"));
        assert!(!html.contains("href"), "{html}");
        markdown(format!("[j]({scheme}:alert(1))").as_bytes());
    }

    /// Found by `http_request`: a `Last-Event-ID` with bytes beyond ASCII was
    /// ignored, and the stream started from `?after=` instead of refusing it
    /// like any other header that is no cursor.
    #[test]
    fn a_last_event_id_beyond_ascii_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_bytes(b"1\xff7").unwrap());
        let query = EventsQuery { after: Some(3) };
        assert!(matches!(
            start_after(&headers, &query),
            Err(ApiError::BadRequest(_))
        ));
        http_request(&encode("events-start", b"1\xff7\nafter=3"));
    }
}
