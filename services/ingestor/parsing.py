"""Turns uploaded file bytes (PDF, DOCX, Markdown, HTML, plain text) into plain-text sections
that keep where they came from: the PDF page, or the heading path above them.

Bytes in, structure out: nothing here touches the filesystem; `file_name` is only a label for
messages. Every failure to read a file as its format is a `ParseError` whose message a user can act on.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

log = logging.getLogger(__name__)

# pypdf logs a warning for every small defect it works around (odd xref offsets, bad fonts);
# they are noise for an upload service. An application that set the level itself keeps it.
if logging.getLogger("pypdf").level == logging.NOTSET:
    logging.getLogger("pypdf").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Section:
    text: str  # plain text of a block: paragraph(s) under one heading, or one PDF page
    page: int | None = None  # 1-based PDF page number; None for other formats
    heading: str | None = None  # nearest heading path above it, e.g. "Booking > Hotels"


@dataclass(frozen=True)
class ParsedDocument:
    format: str  # "pdf" | "docx" | "markdown" | "html" | "text"
    title: str | None
    sections: list[Section]


class ParseError(Exception):
    """The file cannot be read as its format; the message says why in words a user understands."""


SUPPORTED_CONTENT_TYPES: dict[str, str] = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/plain": "text",
}

_EXTENSIONS: dict[str, str] = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".txt": "text",
    ".text": "text",
}

HEADING_SEPARATOR = " > "


def display_name(file_name: str) -> str:
    """How messages name a file: quoted, or 'the file' when it has no name."""
    return repr(file_name) if file_name else "the file"


def detect_format(file_name: str, content_type: str) -> str:
    """The declared content type wins when it is one we know (parameters such as `; charset=`
    are ignored); otherwise the file name's extension decides."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in SUPPORTED_CONTENT_TYPES:
        return SUPPORTED_CONTENT_TYPES[mime]
    suffix = PurePosixPath(file_name.replace("\\", "/")).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    declared = f" (content type {content_type!r})" if content_type else ""
    raise ParseError(
        f"unsupported file type: {display_name(file_name)}{declared}; "
        "supported are PDF, Word (.docx), Markdown, HTML and plain text"
    )


def parse_document(data: bytes, file_name: str, content_type: str = "") -> ParsedDocument:
    fmt = detect_format(file_name, content_type)
    name = display_name(file_name)
    if not data:
        raise ParseError(f"{name} is empty")
    parser = _PARSERS[fmt]
    try:
        title, sections = parser(data, name)
    except (ParseError, MemoryError):  # running out of memory says nothing about the file's format
        raise
    except Exception as exc:  # a library failing in a way we did not foresee is still a bad file
        log.debug("parsing %s as %s failed", name, fmt, exc_info=True)
        raise ParseError(f"{name} could not be read as {_FORMAT_NAMES[fmt]}: {exc}") from exc
    if not sections:
        raise ParseError(f"{name} has no text")
    return ParsedDocument(format=fmt, title=title or None, sections=sections)


# ----------------------------------------------------------------------------- helpers

_WS = re.compile(r"\s+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _squash(text: str) -> str:
    """All runs of whitespace become one space."""
    return _WS.sub(" ", text).strip()


def _tidy_lines(text: str) -> str:
    """Keeps line structure, drops trailing spaces and runs of blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


class _SectionBuilder:
    """Collects text blocks under the current heading path; a new heading closes the section."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self._blocks: list[str] = []
        self._path: list[tuple[int, str]] = []

    def add_block(self, text: str) -> None:
        if text.strip():
            self._blocks.append(text.strip())

    def heading(self, level: int, text: str) -> None:
        self.flush()
        text = _squash(text)
        if not text:
            return
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, text))

    def flush(self) -> None:
        if self._blocks:
            path = HEADING_SEPARATOR.join(t for _, t in self._path) or None
            self.sections.append(Section(text="\n\n".join(self._blocks), heading=path))
            self._blocks = []


def _decode_text(data: bytes, name: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise ParseError(f"{name} is not valid UTF-16 text") from exc
    if b"\x00" in data:
        raise ParseError(f"{name} looks binary, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f")
    if controls > max(8, len(text) // 20):
        raise ParseError(f"{name} looks binary, not text")
    return text


# ----------------------------------------------------------------------------- plain text


def _parse_text(data: bytes, name: str) -> tuple[str | None, list[Section]]:
    text = _tidy_lines(_decode_text(data, name))
    return None, [Section(text)] if text else []


# ----------------------------------------------------------------------------- Markdown

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)


def _inline_text(token) -> str:  # token: markdown_it.token.Token of type "inline"
    parts: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "image":
            parts.append(child.content)  # the alt text
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        # link_open/close, em/strong/s open/close, html_inline: markup only, dropped
    return "".join(parts).strip()


def _parse_markdown(data: bytes, name: str) -> tuple[str | None, list[Section]]:
    from markdown_it import MarkdownIt

    text = _FRONT_MATTER.sub("", _decode_text(data, name).replace("\r\n", "\n"), count=1)
    tokens = MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(text)
    builder = _SectionBuilder()
    title: str | None = None
    heading_level: int | None = None
    list_marker: str | None = None  # marker for the first paragraph of the current list item
    row: list[str] | None = None

    for token in tokens:
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1:])
        elif kind == "heading_close":
            heading_level = None
        elif kind == "list_item_open":
            list_marker = f"{token.info}." if token.info else "-"
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close":
            if row is not None:
                builder.add_block(" | ".join(cell for cell in row if cell))
            row = None
        elif kind == "inline":
            content = _inline_text(token)
            if heading_level is not None:
                builder.heading(heading_level, content)
                if title is None and heading_level == 1 and content:
                    title = _squash(content)
            elif row is not None:
                row.append(_squash(content))
            elif content:
                if list_marker:
                    content = f"{list_marker} {content}"
                    list_marker = None
                builder.add_block(content)
        elif kind in ("fence", "code_block"):
            builder.add_block(token.content.rstrip("\n"))
        elif kind == "html_block":
            from bs4 import BeautifulSoup

            builder.add_block(_squash(BeautifulSoup(token.content, "html.parser").get_text(" ")))
    builder.flush()
    return title, builder.sections


# ----------------------------------------------------------------------------- HTML

_DROPPED_TAGS = {"script", "style", "nav", "footer", "head", "noscript", "template", "iframe", "svg", "canvas"}
_HEADING_TAGS = {f"h{n}": n for n in range(1, 7)}
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "form", "header", "hr", "html", "li", "main", "ol",
    "p", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "ul",
}  # fmt: skip


def _parse_html(data: bytes, name: str) -> tuple[str | None, list[Section]]:
    from bs4 import BeautifulSoup
    from bs4.element import NavigableString, PreformattedString, Tag

    if b"\x00" in data and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ParseError(f"{name} looks binary, not HTML")
    try:
        markup: str | bytes = _decode_text(data, name) if _is_utf8(data) else data
    except ParseError as exc:
        raise ParseError(str(exc).replace("not text", "not HTML")) from exc
    # bytes that are not UTF-8 go to BeautifulSoup as they are, so that a <meta charset> is honoured
    soup = BeautifulSoup(markup, "html.parser")

    title: str | None = None
    if soup.title is not None:
        title = _squash(soup.title.get_text(" ")) or None
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()

    builder = _SectionBuilder()
    inline: list[str] = []

    def flush_inline() -> None:
        builder.add_block(_squash("".join(inline)))
        inline.clear()

    def walk(node: Tag) -> None:
        nonlocal title
        for child in node.children:
            if isinstance(child, NavigableString):
                if not isinstance(child, PreformattedString):  # comments, doctype, CDATA
                    inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            tag = child.name.lower()
            if tag in _HEADING_TAGS:
                flush_inline()
                text = _squash(child.get_text(" "))
                builder.heading(_HEADING_TAGS[tag], text)
                if title is None and tag == "h1" and text:
                    title = text
            elif tag == "tr":
                flush_inline()
                cells = [_squash(c.get_text(" ")) for c in child.find_all(["td", "th"], recursive=False)]
                builder.add_block(" | ".join(c for c in cells if c))
            elif tag == "pre":
                flush_inline()
                builder.add_block(_tidy_lines(child.get_text()))
            elif tag == "br":
                inline.append(" ")
            elif tag == "li":
                flush_inline()
                inline.append("- ")
                walk(child)
                if _squash("".join(inline)) == "-":
                    inline.clear()  # an item holding only a nested list
                flush_inline()
            elif tag in _BLOCK_TAGS:
                flush_inline()
                walk(child)
                flush_inline()
            else:
                walk(child)

    walk(soup)
    flush_inline()
    builder.flush()
    return title, builder.sections


def _is_utf8(data: bytes) -> bool:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True  # UTF-16 with a BOM: _decode_text handles it
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ----------------------------------------------------------------------------- PDF


_PLACEHOLDER_TITLES = {"untitled", "untitled document", "title"}


def _parse_pdf(data: bytes, name: str) -> tuple[str | None, list[Section]]:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, PyPdfError

    if b"%PDF-" not in data[:1024]:
        raise ParseError(f"{name} is not a PDF file (no PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except DependencyError as exc:
                raise ParseError(
                    f"{name} is encrypted with AES, which this server cannot decrypt; "
                    "save it without encryption and upload it again"
                ) from exc
            if opened == PasswordType.NOT_DECRYPTED:
                raise ParseError(f"{name} is password-protected; remove the password and upload it again")
        pages = list(reader.pages)
    except ParseError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as exc:
        raise ParseError(f"{name} is not a readable PDF (damaged or truncated?): {exc}") from exc
    if not pages:
        raise ParseError(f"{name} has no pages")

    sections: list[Section] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except MemoryError:
            raise
        except Exception:  # one broken page should not lose the others
            log.warning("could not extract text from page %d of %s", number, name, exc_info=True)
            continue
        text = _tidy_lines(text)
        if text:
            sections.append(Section(text=text, page=number))
    if not sections:
        raise ParseError(f"{name} has no extractable text (scanned PDF?)")

    title: str | None = None
    try:
        if reader.metadata is not None and reader.metadata.title:
            title = _squash(str(reader.metadata.title)) or None
        if title is not None and title.lower() in _PLACEHOLDER_TITLES:
            title = None
    except Exception:  # broken metadata is no reason to reject readable pages
        title = None
    return title, sections


# ----------------------------------------------------------------------------- DOCX


def _parse_docx(data: bytes, name: str) -> tuple[str | None, list[Section]]:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise ParseError(f"{name} is an old Word (.doc) file; save it as .docx and upload it again")
    if not data.startswith(b"PK"):
        raise ParseError(f"{name} is not a Word (.docx) document")
    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ParseError(f"{name} is not a readable Word (.docx) document (damaged zip archive)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # a zip without Word parts, broken XML, ...
        log.debug("python-docx could not open %s", name, exc_info=True)
        raise ParseError(f"{name} is not a readable Word (.docx) document (no Word content found)") from exc

    title = _squash(document.core_properties.title or "") or None
    styles = _DocxStyles(document)
    builder = _SectionBuilder()
    for item in document.iter_inner_content():
        if isinstance(item, Paragraph):
            text = item.text
            level = styles.heading_level(item)
            if level is None:
                builder.add_block(_tidy_lines(text))
            else:
                builder.heading(level, text)
                if title is None and level == 0:
                    title = _squash(text) or None
        elif isinstance(item, Table):
            for line in _docx_table_rows(item):
                builder.add_block(line)
    builder.flush()
    return title, builder.sections


class _DocxStyles:
    """Paragraph style names by style id, looked up once per document.

    python-docx's `Paragraph.style` finds the default style by scanning every style, for each
    paragraph without a style of its own: 3 ms a paragraph, 35 s for a 20,000-paragraph file."""

    def __init__(self, document) -> None:  # document: docx.document.Document
        from docx.enum.style import WD_STYLE_TYPE

        self.names: dict[str, str] = {}
        self.default = ""
        try:
            for style in document.styles:
                if style.type != WD_STYLE_TYPE.PARAGRAPH:
                    continue
                self.names[style.style_id] = style.name or ""
                if style.element.default:
                    self.default = style.name or ""
        except MemoryError:
            raise
        except Exception:  # broken styles: no headings, but the text is still read
            log.debug("could not read the styles of a Word document", exc_info=True)

    def heading_level(self, paragraph) -> int | None:  # paragraph: docx.text.paragraph.Paragraph
        style_id = paragraph._p.style  # the w:pStyle value; None means the default style
        style = self.names.get(style_id, self.default) if style_id else self.default
        if style == "Title":
            return 0
        match = re.fullmatch(r"Heading (\d)", style)
        return int(match.group(1)) if match else None


def _docx_table_rows(table) -> Iterable[str]:
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = _squash(cell.text)
            if text and (not cells or cells[-1] != text):  # merged cells repeat their text
                cells.append(text)
        if cells:
            yield " | ".join(cells)


_PARSERS = {
    "pdf": _parse_pdf,
    "docx": _parse_docx,
    "markdown": _parse_markdown,
    "html": _parse_html,
    "text": _parse_text,
}

_FORMAT_NAMES = {"pdf": "a PDF", "docx": "a Word document", "markdown": "Markdown", "html": "HTML", "text": "text"}
