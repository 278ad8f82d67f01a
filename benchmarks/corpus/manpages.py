"""A labelled retrieval corpus: about 80 Linux man pages (sections 7 and 5) with questions.

The documents are pages of the Linux man-pages project as Debian ships them in the
``manpages`` package (``/usr/share/man/man5``, ``/usr/share/man/man7``), rendered to plain
text on this machine with man-db, groff and ``col``; nothing is fetched from the network.
``PAGES`` fixes which pages, and ``manpages_questions.jsonl`` holds hand-written questions,
each naming the one page that answers it and a short verbatim phrase of that page that states
the answer: a retrieved chunk answers the question when ``normalize(chunk)`` contains
``normalize(phrase)``.

Rendering (one page)::

    MANWIDTH=10000 LC_ALL=C.UTF-8 man -l --no-hyphenation --no-justification -E UTF-8 PAGE.gz | col -bx

then box-drawing characters of tables become spaces, runs of spaces are collapsed, each line is stripped,
the header and footer lines removed and runs of blank lines made one. The width is so large that
every filled paragraph is one line; lines that follow each other without a blank line are
unfilled text (synopses, examples) or a tag and its paragraph. The text depends only on the
installed manpages, man-db and groff versions (Debian 12: manpages 6.03, man-db 2.11, groff
1.22.4) and is the same on every run.

``python -m benchmarks.corpus.manpages`` prints the corpus size and the problems that
``check()`` finds, and exits 1 if there are any.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
QUESTIONS = Path(__file__).resolve().parent / "manpages_questions.jsonl"
MANWIDTH = 10000
# A phrase found in more documents than this is too generic to tell retrieval apart.
MAX_PHRASE_DOCUMENTS = 3
MAX_QUESTIONS_PER_DOCUMENT = 3
PHRASE_WORDS = (3, 10)

# Chosen by hand from the manpages package (6.03): prose pages, none over 42k characters of text.
# Left out: character-set tables (ascii, iso_8859-*, koi8-*, cp125*, armscii-8, charsets), pages
# of a paragraph or two (intro, motd, shells, securetty, ...), pages that are mostly lists
# (posixoptions, standards, suffixes, operator), the pages about writing man pages (man,
# man-pages), the largest pages (proc.5, cgroups.7, capabilities.7, netlink.7, bpf-helpers.7,
# elf.5, cpuset.7), and, to keep the total near 550k characters, mid-size ones such as sched.7,
# keyrings.7, fanotify.7, user_namespaces.7, mount_namespaces.7, pthreads.7 and packet.7.
PAGES: tuple[str, ...] = (
    # section 5
    "acct.5",
    "charmap.5",
    "core.5",
    "filesystems.5",
    "gai.conf.5",
    "host.conf.5",
    "hosts.5",
    "hosts.equiv.5",
    "networks.5",
    "nss.5",
    "nsswitch.conf.5",
    "protocols.5",
    "repertoiremap.5",
    "resolv.conf.5",
    "rpc.5",
    "services.5",
    "slabinfo.5",
    "tmpfs.5",
    "ttytype.5",
    "utmp.5",
    # section 7
    "arp.7",
    "cgroup_namespaces.7",
    "complex.7",
    "credentials.7",
    "ddp.7",
    "environ.7",
    "epoll.7",
    "fifo.7",
    "futex.7",
    "glob.7",
    "hier.7",
    "hostname.7",
    "icmp.7",
    "inotify.7",
    "ip.7",
    "ipc_namespaces.7",
    "kernel_lockdown.7",
    "landlock.7",
    "libc.7",
    "mailaddr.7",
    "math_error.7",
    "mq_overview.7",
    "namespaces.7",
    "network_namespaces.7",
    "nptl.7",
    "numa.7",
    "path_resolution.7",
    "persistent-keyring.7",
    "pipe.7",
    "pkeys.7",
    "process-keyring.7",
    "pty.7",
    "queue.7",
    "random.7",
    "raw.7",
    "regex.7",
    "sem_overview.7",
    "session-keyring.7",
    "shm_overview.7",
    "sigevent.7",
    "signal-safety.7",
    "signal.7",
    "socket.7",
    "system_data_types.7",
    "sysvipc.7",
    "tcp.7",
    "termio.7",
    "thread-keyring.7",
    "time.7",
    "time_namespaces.7",
    "udp.7",
    "udplite.7",
    "units.7",
    "unix.7",
    "user-keyring.7",
    "utf-8.7",
    "uts_namespaces.7",
    "vsock.7",
    "x25.7",
    "xattr.7",
)

_BOX_DRAWING = {code: " " for code in range(0x2500, 0x2580)}
_SPACES = re.compile(r"[ \t\u00a0]+")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CorpusDocument:
    id: str  # "tcp.7"
    title: str  # "tcp(7)"
    text: str


@dataclass(frozen=True)
class LabelledQuestion:
    question: str
    document: str  # a CorpusDocument id
    phrase: str  # verbatim span of that document's text that states the answer


def normalize(text: str) -> str:
    """Lowercase and collapse all whitespace to single spaces (phrase matching uses this)."""
    return _WHITESPACE.sub(" ", text).strip().lower()


def _title(page_id: str) -> str:
    name, section = page_id.rsplit(".", 1)
    return f"{name}({section})"


def _source(page_id: str) -> Path:
    section = page_id.rsplit(".", 1)[1]
    return MAN_ROOT / f"man{section}" / f"{page_id}.gz"


def _require_tools() -> None:
    if not (MAN_ROOT / "man7" / "tcp.7.gz").exists():
        raise RuntimeError(
            f"The Linux man pages are not installed (no {MAN_ROOT / 'man7' / 'tcp.7.gz'}): "
            "install Debian's manpages package: apt-get install manpages"
        )
    for tool, package in (("man", "man-db"), ("groff", "groff-base"), ("col", "bsdextrautils")):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"`{tool}` is not installed: install Debian's {package} package: apt-get install {package}"
            )


def render(page_id: str) -> str:
    """One page as plain text: a paragraph per line, blank lines between blocks."""
    source = _source(page_id)
    if not source.exists():
        raise RuntimeError(
            f"{source} is missing: install Debian's manpages package (6.03 has every page of this corpus): "
            "apt-get install manpages"
        )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "MANWIDTH": str(MANWIDTH),
        "MANPAGER": "cat",
        "PAGER": "cat",
    }
    man = subprocess.run(
        ["man", "-l", "--no-hyphenation", "--no-justification", "-E", "UTF-8", str(source)],
        env=env, capture_output=True, check=False,
    )
    if man.returncode != 0 or not man.stdout:
        raise RuntimeError(f"man could not render {source}: {man.stderr.decode(errors='replace').strip()}")
    col = subprocess.run(["col", "-bx"], input=man.stdout, env=env, capture_output=True, check=False)
    if col.returncode != 0:
        raise RuntimeError(f"col -bx failed on {source}: {col.stderr.decode(errors='replace').strip()}")
    lines = [
        _SPACES.sub(" ", line.translate(_BOX_DRAWING)).strip()
        for line in col.stdout.decode("utf-8").splitlines()
    ]
    filled = [i for i, line in enumerate(lines) if line]
    title = _title(page_id).lower()
    head, foot = filled[0], filled[-1]
    if not lines[head].lower().startswith(title) or not lines[foot].lower().endswith(title):
        raise RuntimeError(
            f"unexpected header or footer in the rendering of {source}: {lines[head]!r} / {lines[foot]!r}"
        )
    blocks: list[str] = []
    for line in lines[head + 1 : foot]:
        if line or (blocks and blocks[-1]):
            blocks.append(line)
    while blocks and not blocks[-1]:
        blocks.pop()
    return "\n".join(blocks) + "\n"


@functools.cache
def _corpus() -> tuple[CorpusDocument, ...]:
    _require_tools()
    return tuple(CorpusDocument(id=page, title=_title(page), text=render(page)) for page in PAGES)


def build_corpus() -> list[CorpusDocument]:
    """The pages of ``PAGES`` rendered to text, in that order."""
    return list(_corpus())


def load_questions(path: Path = QUESTIONS) -> list[LabelledQuestion]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(LabelledQuestion(question=row["question"], document=row["document"], phrase=row["phrase"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a question object ({error})") from None
    return questions


def check(
    corpus: list[CorpusDocument] | None = None, questions: list[LabelledQuestion] | None = None
) -> list[str]:
    """Problems with the labels: unknown documents, phrases not in their document, generic phrases.

    Also a phrase outside 3-10 words, a document with more than three questions or none, and a
    question asked twice.
    """
    corpus = build_corpus() if corpus is None else corpus
    questions = load_questions() if questions is None else questions
    texts = {document.id: normalize(document.text) for document in corpus}
    problems = []
    seen = set()
    for question in questions:
        label = f"{question.document}: {question.question!r}"
        if question.question in seen:
            problems.append(f"{label}: asked twice")
        seen.add(question.question)
        if question.document not in texts:
            problems.append(f"{label}: no document {question.document!r} in the corpus")
            continue
        phrase = normalize(question.phrase)
        if not phrase:
            problems.append(f"{label}: empty phrase")
            continue
        words = len(phrase.split())
        if not PHRASE_WORDS[0] <= words <= PHRASE_WORDS[1]:
            low, high = PHRASE_WORDS
            problems.append(f"{label}: phrase {question.phrase!r} has {words} words (want {low}-{high})")
        if phrase not in texts[question.document]:
            problems.append(f"{label}: phrase {question.phrase!r} is not in {question.document}")
        holders = [document for document, text in texts.items() if phrase in text]
        if len(holders) > MAX_PHRASE_DOCUMENTS:
            problems.append(
                f"{label}: phrase {question.phrase!r} is too generic: it occurs in {len(holders)} documents"
            )
    counts: dict[str, int] = {}
    for question in questions:
        counts[question.document] = counts.get(question.document, 0) + 1
    for document, count in sorted(counts.items()):
        if count > MAX_QUESTIONS_PER_DOCUMENT and document in texts:
            problems.append(f"{document}: {count} questions (at most {MAX_QUESTIONS_PER_DOCUMENT})")
    unasked = sorted(set(texts) - set(counts))
    if unasked:
        problems.append(f"no question for {', '.join(unasked)}")
    return problems


def main() -> int:
    corpus = build_corpus()
    questions = load_questions()
    problems = check(corpus, questions)
    print(f"documents: {len(corpus)}")
    print(f"characters: {sum(len(document.text) for document in corpus)}")
    print(f"questions: {len(questions)}")
    print(f"problems: {len(problems)}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
