"""MediaWiki markup to plain-text paragraphs, and the n-gram test for benchmark overlap.

Used to turn the Wikipedia dump the kit ships into router-tuning and held-out text: templates,
tables, references, tags and link markup are removed, list items and tail sections ("See also",
"References", ...) dropped, and paragraphs under ``MIN_PARAGRAPH_WORDS`` words discarded.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

MIN_PARAGRAPH_WORDS = 10
NGRAM = 13  # a shared 13-word passage counts as contamination (GPT-3's decontamination n)

# Sections at the end of articles that hold lists of links, not prose.
_TAIL_SECTIONS = {
    "see also", "references", "notes", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "gallery",
    "references and notes", "primary sources", "secondary sources",
}
_DROP_TAGS = ("math", "gallery", "timeline", "syntaxhighlight", "source", "pre", "score",
              "imagemap", "chem", "ce", "hiero", "graph", "mapframe", "code", "nowiki")
_LINK_DROP_NS = {"file", "image", "category", "media"}


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans, nested ones included (templates, tables)."""
    out, depth, pos = [], 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[pos:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
        # a stray close at depth 0 is kept as text and removed by the final cleanup
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (markers at line starts), nested ones included."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _link(inner: str) -> str:
    """Visible text of the wiki link ``[[inner]]``; files, categories, language links vanish."""
    target, _, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X|x]] is a visible link
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _LINK_DROP_NS:
            return ""
        if not label and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*|simple", prefix):
            return ""  # interlanguage link
    if label:
        label = label.split("|")[-1].strip()
    if not label and "|" in inner:  # pipe trick: [[Paris (band)|]] -> Paris
        label = re.sub(r"\s*\(.*?\)\s*$", "", target.split(":")[-1])
    return label or target.split("#")[0] or target.lstrip("#")


def _replace_links(text: str) -> str:
    """Replace ``[[...]]`` links innermost first (file captions hold links and brackets)."""
    out: list[str] = []
    opened: list[int] = []  # positions in ``out`` where an unclosed [[ began
    pos = 0
    for m in re.finditer(r"\[\[|\]\]", text):
        out.append(text[pos:m.start()])
        pos = m.end()
        if m.group() == "[[":
            opened.append(len(out))
        elif opened:
            start = opened.pop()
            inner = "".join(out[start:])
            del out[start:]
            out.append(_link(inner))
    out.append(text[pos:])
    return "".join(out)


def clean_wikitext(text: str) -> list[str]:
    """MediaWiki markup -> prose paragraphs (templates, tables, refs, files, lists removed)."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.S | re.I)
    for tag in _DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.S | re.I)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_tables(text)
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?|ftp):?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining html tags: keep their content
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs, current = [], []

    def flush():
        if current:
            para = " ".join(current)
            para = re.sub(r"\(\s*[,;:]?\s*\)", "", para)  # "( )" left by removed templates
            para = re.sub(r"[{}\[\]]{2,}|\|", " ", para)  # stray markup
            para = re.sub(r"\s+", " ", para)
            para = re.sub(r"\s+([,.;:!?)])", r"\1", para).replace("( ", "(").strip()
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                paragraphs.append(para)
            current.clear()

    for line in text.split("\n"):
        s = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", s)
        if heading:
            flush()
            if heading.group(2).lower() in _TAIL_SECTIONS:
                break
        elif not s or s[0] in "*#:;|!{}" or s.startswith("----"):
            flush()  # blank line, list item, table row, rule: not prose
        else:
            current.append(s)
    flush()
    return paragraphs


def iter_wiki_articles(path: Path) -> Iterator[dict[str, Any]]:
    """Main-namespace, non-redirect pages of a MediaWiki XML dump: id, title, wikitext."""
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            if el.findtext("{*}ns") == "0" and el.find("{*}redirect") is None:
                yield {
                    "article_id": int(el.findtext("{*}id")),
                    "title": el.findtext("{*}title"),
                    "wikitext": el.findtext("{*}revision/{*}text") or "",
                }
            el.clear()


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the unit of the n-gram contamination check."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(ws: list[str], n: int = NGRAM) -> Iterator[str]:
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i:i + n])
