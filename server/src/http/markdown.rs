//! Markdown of agent text parts to HTML, treating the text as untrusted.
//!
//! Agents write whatever a model produced, and a model can be talked into
//! producing `<script>`. So raw HTML is never passed through: inline HTML
//! becomes escaped text and an HTML block becomes a code block showing its
//! source. Links keep only `http`, `https`, `mailto` and relative targets;
//! images become plain links (the page loads nothing from elsewhere). The
//! page's Content-Security-Policy is a second line of defence, not the first.

use pulldown_cmark::{CodeBlockKind, CowStr, Event, LinkType, Options, Parser, Tag, TagEnd};

/// The markdown agents' text is read as: CommonMark with tables, strikethrough and task lists.
pub const OPTIONS: Options = Options::ENABLE_TABLES
    .union(Options::ENABLE_STRIKETHROUGH)
    .union(Options::ENABLE_TASKLISTS);

/// Renders `text` (markdown as [`OPTIONS`] reads it) to safe HTML.
pub fn render(text: &str) -> String {
    let options = OPTIONS;
    // For each open link or image: whether its start was kept, so its end matches.
    let mut links_kept: Vec<bool> = Vec::new();
    let events = Parser::new_ext(text, options).filter_map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Some(Event::Text(raw)),
        Event::Start(Tag::HtmlBlock) => Some(Event::Start(Tag::CodeBlock(CodeBlockKind::Indented))),
        Event::End(TagEnd::HtmlBlock) => Some(Event::End(TagEnd::CodeBlock)),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        })
        | Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            let keep = is_safe_url(&dest_url);
            links_kept.push(keep);
            keep.then_some(Event::Start(Tag::Link {
                // An autolink's text is its address; any other type renders the same.
                link_type: if link_type == LinkType::Email {
                    LinkType::Email
                } else {
                    LinkType::Inline
                },
                dest_url,
                title,
                id,
            }))
        }
        Event::End(TagEnd::Link) | Event::End(TagEnd::Image) => links_kept
            .pop()
            .unwrap_or(false)
            .then_some(Event::End(TagEnd::Link)),
        other => Some(other),
    });
    let mut html = String::with_capacity(text.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

/// Whether a link target is harmless: no scheme (relative, `#anchor`) or one
/// of `http`, `https`, `mailto`. Browsers ignore tabs, newlines and leading
/// control characters and spaces in a scheme, so they are removed before looking.
fn is_safe_url(url: &CowStr<'_>) -> bool {
    let cleaned = url
        .trim_start_matches(|c: char| c.is_ascii_control() || c == ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'));
    // However long: a scheme has no length limit in browsers.
    let mut scheme = String::new();
    for c in cleaned {
        if c.is_ascii_alphanumeric() || "+-.".contains(c) {
            scheme.push(c.to_ascii_lowercase());
        } else {
            return c != ':'
                || scheme.is_empty()
                || matches!(scheme.as_str(), "http" | "https" | "mailto");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_common_markdown() {
        let html = render(
            "# Title\n\nSome **bold** and `code`.\n\n```rust\nfn main() {}\n```\n\n- a\n- b\n",
        );
        assert!(html.contains("<h1>Title</h1>"), "{html}");
        assert!(html.contains("<strong>bold</strong>"));
        assert!(html.contains("<code>code</code>"));
        assert!(html.contains("<pre><code class=\"language-rust\">fn main() {}"));
        assert!(html.contains("<li>a</li>"));
    }

    #[test]
    fn raw_html_is_shown_not_run() {
        let html = render(
            "hi <script>alert(1)</script> <img src=x onerror=alert(2)>\n\n<div onclick=\"x()\">block</div>\n",
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<div"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        // An HTML block shows as code: its source, escaped.
        assert!(
            html.contains("<pre><code>&lt;div onclick=\"x()\"&gt;block&lt;/div&gt;"),
            "{html}"
        );
    }

    #[test]
    fn only_harmless_links_survive() {
        let html = render(
            "[ok](https://example.com/a?b=1) [rel](docs/x.md) [bad](javascript:alert(1)) \
             [bad2](<JaVa\tScRiPt:alert(1)>) [data](data:text/html,x) <mailto:a@b.c>",
        );
        assert!(
            html.contains("<a href=\"https://example.com/a?b=1\">ok</a>"),
            "{html}"
        );
        assert!(html.contains("<a href=\"docs/x.md\">rel</a>"), "{html}");
        assert!(!html.to_lowercase().contains("javascript"), "{html}");
        assert!(!html.contains("data:"), "{html}");
        assert!(html.contains("bad") && !html.contains(">bad</a>"), "{html}");
        assert!(html.contains("mailto:a@b.c"), "{html}");
        for url in [
            " \tjava\nscript:x",
            "\u{1}javascript:x",
            "vbscript:x",
            "data:x",
        ] {
            assert!(!is_safe_url(&url.into()), "{url:?}");
        }
        for url in [
            "http://a",
            "HTTPS://a",
            "/x",
            "#top",
            "x.md",
            "a/b:c",
            "?q=1:2",
        ] {
            assert!(is_safe_url(&url.into()), "{url:?}");
        }
    }

    #[test]
    fn images_become_links_or_text() {
        let html = render("![diagram](https://example.com/d.png) ![x](javascript:alert(1))");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("<a href=\"https://example.com/d.png\">diagram</a>"),
            "{html}"
        );
        assert!(!html.contains("javascript"), "{html}");
    }
}
