//! Markdown rendered in segments that end where a top-level block begins, so that a text
//! growing by deltas re-renders only its last segment, whatever its length.
//!
//! The HTML of a text is the HTML of its segments, one after the other: a segment ends
//! at a top-level block that starts after a blank line, on a complete line, at least
//! [`SEGMENT_BYTES`] after the segment's start. Nothing a text gains later can change
//! how the blocks before such a point parse (markdown's blocks are decided line by line;
//! the lines that change an earlier line, a setext underline or a table's delimiter
//! row, cannot follow a blank line), with one exception: a link reference definition
//! changes links anywhere, so a text that defines one is one segment, rendered whole.
//! (What a delta showed as a definition may stop being one when more text comes; the
//! text is then cut again as if seen afresh.)
//!
//! Where segments start depends only on the text, not on the deltas it arrived in:
//! [`Segments::of`] a text and [`Segments::grow`] along its deltas agree, so a page
//! that loaded a snapshot and then follows the text's deltas splices each delta's
//! segments into the ones it has.

use std::ops::Range;

use pulldown_cmark::{Event, Parser};

use super::markdown;

/// How far past its start a segment may end. Each delta re-renders the last segment,
/// so this bounds a delta's cost (unless one block is longer: a huge code block is
/// rendered whole while it grows).
pub const SEGMENT_BYTES: usize = 2048;

/// Where a text's segments start.
#[derive(Clone, Debug)]
pub struct Segments {
    /// Byte offsets in the text, increasing; the first is 0.
    starts: Vec<usize>,
    /// The text defines a link reference: one segment, while it does.
    whole: bool,
    /// No cut can come before a blank line ending here or later: the lines before were
    /// looked at already. Saves parsing the last segment again for each delta while it
    /// gains no blank line (one long paragraph).
    quiet_from: usize,
    /// The last segment holds no "]:" (which every link definition has) before here, so
    /// only what came after needs looking at.
    no_links_before: usize,
}

/// Segments are the same where they start: `quiet_from` and `no_links_before` only save
/// work.
impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        self.starts == other.starts && self.whole == other.whole
    }
}

impl Eq for Segments {}

impl Segments {
    /// The segments of `text`.
    pub fn of(text: &str) -> Self {
        let mut segments = Self {
            starts: vec![0],
            whole: false,
            quiet_from: 0,
            no_links_before: 0,
        };
        segments.grow(text);
        segments
    }

    /// Follows `text`, which only grew since these segments were made from it: the
    /// index of the first segment whose HTML may have changed (the last one's, or an
    /// earlier one's when a segment ended).
    pub fn grow(&mut self, text: &str) -> usize {
        let changed = self.starts.len() - 1;
        if self.whole {
            // What looked like a definition may not be one any more ("[a]: b" gains a
            // line that makes it a paragraph): then cut as a fresh look does. The text is
            // rendered whole meanwhile anyway, so looking again costs about as much.
            if !(text.contains("]:") && defines_links(text)) {
                *self = Self::of(text);
            }
            return 0;
        }
        let last = self.last();
        // Every part of the text is in the last segment while it is checked here, so a
        // definition cannot hide in a segment that ended.
        if self.may_define_links(text) && defines_links(&text[last..]) {
            self.starts.truncate(1);
            self.whole = true;
            return 0;
        }
        while let Some(cut) = self.next_cut(text) {
            self.starts.push(cut);
        }
        changed
    }

    /// How many segments there are.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// The HTML of the segments from index `from` on.
    pub fn html(&self, text: &str, from: usize) -> Vec<String> {
        (from..self.starts.len())
            .map(|i| markdown::render(&text[self.range(text, i)]))
            .collect()
    }

    fn range(&self, text: &str, i: usize) -> Range<usize> {
        self.starts[i]..self.starts.get(i + 1).copied().unwrap_or(text.len())
    }

    fn last(&self) -> usize {
        *self.starts.last().expect("a text has a first segment")
    }

    /// Whether the last segment has a "]:", looking only at what is new.
    fn may_define_links(&mut self, text: &str) -> bool {
        // From one byte back: a "]" may have ended the text last time.
        let mut from = self.no_links_before.saturating_sub(1).max(self.last());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        if text[from..].contains("]:") {
            return true;
        }
        self.no_links_before = text.len();
        false
    }

    /// Where the last segment ends, if the text already decides it.
    fn next_cut(&mut self, text: &str) -> Option<usize> {
        let from = self.last();
        let earliest = from + SEGMENT_BYTES;
        if text.len() <= earliest {
            return None;
        }
        // A cut follows a blank line, on a complete line: without a new one, none.
        // (In bytes: `earliest` need not fall on a character's boundary.)
        let look_at = self.quiet_from.max(earliest - 1);
        let line = text.as_bytes()[..look_at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(from, |n| n + 1)
            .max(from);
        if !blank_line_then_line(&text[line..]) {
            self.quiet_from = last_complete_line(text, line);
            return None;
        }
        // Parsing from `from` to the end of a line parses those lines as the whole text
        // does (see the module's note), so a window twice the segment's size usually
        // finds the cut without parsing the rest of a long text.
        let mut window = SEGMENT_BYTES * 2;
        loop {
            let end = line_end(text, from + window);
            if let Some(cut) = first_cut(&text[from..end], SEGMENT_BYTES) {
                return Some(from + cut);
            }
            if end == text.len() {
                // Only a line still to be completed can start a cut now.
                self.quiet_from = last_complete_line(text, line);
                return None;
            }
            window *= 2;
        }
    }
}

/// Whether `text` defines a link reference (`[label]: /url`).
fn defines_links(text: &str) -> bool {
    Parser::new_ext(text, markdown::OPTIONS)
        .reference_definitions()
        .iter()
        .next()
        .is_some()
}

/// Whether `text`, which starts at a line's start, has a blank line with a complete
/// line after it.
fn blank_line_then_line(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut line_start = 0;
    for (i, _) in text.match_indices('\n') {
        if bytes[line_start..i]
            .iter()
            .all(|&c| matches!(c, b' ' | b'\t' | b'\r'))
            && bytes[i + 1..].contains(&b'\n')
        {
            return true;
        }
        line_start = i + 1;
    }
    false
}

/// Where the last complete line of `text` starts (not before `floor`, a line start):
/// the one line that may still turn out to be a blank line before a cut.
fn last_complete_line(text: &str, floor: usize) -> usize {
    let Some(last) = text[floor..].rfind('\n') else {
        return floor;
    };
    text[floor..floor + last]
        .rfind('\n')
        .map_or(floor, |n| floor + n + 1)
}

/// The end of the line holding byte `at` (just after its newline), or the text's end.
fn line_end(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    text.as_bytes()[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |n| at + n + 1)
}

/// The first line start in `text`, at `earliest` or later, where a top-level block
/// starts after a blank line, on a line that is complete.
fn first_cut(text: &str, earliest: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (event, range) in Parser::new_ext(text, markdown::OPTIONS).into_offset_iter() {
        let starts_block = match event {
            Event::Start(_) => {
                depth += 1;
                depth == 1
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                false
            }
            Event::Rule => depth == 0,
            _ => false,
        };
        if !starts_block {
            continue;
        }
        let line = text[..range.start].rfind('\n').map_or(0, |n| n + 1);
        if line >= earliest
            && text[line..range.start].bytes().all(|b| b == b' ')
            && text[line..].contains('\n')
            && after_blank_line(&text[..line])
        {
            return Some(line);
        }
    }
    None
}

/// Whether `before` (text up to a line start) ends with a blank line.
fn after_blank_line(before: &str) -> bool {
    let Some(rest) = before.strip_suffix('\n') else {
        return false;
    };
    let previous = rest.rfind('\n').map_or(rest, |n| &rest[n + 1..]);
    previous.trim_matches([' ', '\t', '\r']).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Markdown that tests the cuts: paragraphs, lists (tight and loose, with
    /// continuations after blank lines), code (fenced, indented, unclosed), HTML blocks
    /// that blank lines do and do not end, tables, setext headings, block quotes and
    /// thematic breaks.
    fn corpus() -> Vec<String> {
        let blocks = [
            "A paragraph with *emphasis*, `code` and a [link](https://example.com).\n\n",
            "- one\n- two\n\n  continued in two\n\n- three\n\n",
            "1. first\n2. second\n\nAfter the list.\n\n",
            "```rust\nfn main() {\n\n    println!(\"hi\");\n}\n```\n\n",
            "    indented code\n\n    still code after a blank line\n\n",
            "<div>\nan html block\n</div>\n\n",
            "<!--\na comment\n\nover a blank line\n-->\n\n",
            "| a | b |\n|---|---|\n| 1 | 2 |\n\n",
            "Setext heading\n---\n\n",
            "> quoted\n> more\n\n> another quote\n\n",
            "***\n\n",
            "# Heading\n\nText right after it.\n",
            "- item\n\nparagraph that ends the list\n\n",
            // A table's delimiter row makes the line above it a header, even in a paragraph.
            "A paragraph line\na | b\n|---|---|\n| 1 | 2 |\n\n",
            "Then a line\n***\nand a break without blank lines\n- a list that interrupts\n\n",
        ];
        let mut texts = Vec::new();
        // Every block often enough to pass several segment lengths.
        let mut all = String::new();
        for round in 0..12 {
            for (i, block) in blocks.iter().enumerate() {
                all.push_str(block);
                if (round + i) % 5 == 0 {
                    all.push_str(&"plain words of prose ".repeat(40));
                    all.push_str("\n\n");
                }
            }
        }
        texts.push(all.clone());
        // An unclosed fence swallows the rest: no cut after it.
        texts.push(format!("{}```\nunclosed\n\n{}", &all[..3000], &all[3000..]));
        // A definition at the end changes a link near the start.
        texts.push(format!(
            "[early] link\n\n{all}[early]: https://example.com\n"
        ));
        // One long paragraph: nowhere to cut.
        texts.push("word ".repeat(2000));
        // Characters of two and three bytes, so segment bounds fall inside them.
        texts.push(format!(
            "{}\n\nafter\n\n{}\n",
            "ö".repeat(1500),
            "✓".repeat(900)
        ));
        texts.push(
            (0..300)
                .map(|n| format!("Größe {n}: ✓ {}\n\n", "wörter ".repeat(n % 7 + 3)))
                .collect(),
        );
        texts
    }

    fn joined(segments: &Segments, text: &str) -> String {
        segments.html(text, 0).concat()
    }

    #[test]
    fn segments_render_as_the_whole_text_does_at_every_length() {
        for text in corpus() {
            let mut end = 0;
            while end < text.len() {
                end = (end + 97).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let prefix = &text[..end];
                assert_eq!(
                    joined(&Segments::of(prefix), prefix),
                    markdown::render(prefix),
                    "at {end} of {:?}…",
                    &text[..40]
                );
            }
        }
    }

    #[test]
    fn growing_by_deltas_cuts_where_a_fresh_look_cuts_and_renders_the_same() {
        for text in corpus() {
            let mut segments = Segments::of("");
            let mut html = Vec::new();
            let mut end = 0;
            let mut step = 1;
            while end < text.len() {
                // Deltas of 1 to 40 bytes.
                step = step * 7 % 41 + 1;
                end = (end + step).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let prefix = &text[..end];
                let from = segments.grow(prefix);
                html.truncate(from);
                html.extend(segments.html(prefix, from));
                assert_eq!(segments, Segments::of(prefix), "at {end}");
                assert_eq!(html.concat(), markdown::render(prefix), "at {end}");
            }
        }
    }

    #[test]
    fn long_prose_is_cut_into_bounded_segments_and_definitions_keep_it_whole() {
        let texts = corpus();
        let segments = Segments::of(&texts[0]);
        assert!(segments.len() > 5, "{}", segments.len());
        for i in 0..segments.len() - 1 {
            let range = segments.range(&texts[0], i);
            // A segment is at most the bound plus the block that crosses it.
            assert!(range.len() < SEGMENT_BYTES * 3, "{range:?}");
        }
        assert_eq!(Segments::of(&texts[2]).len(), 1, "a definition: whole");
        assert_eq!(Segments::of(&texts[3]).len(), 1, "no block to cut at");
    }
}
