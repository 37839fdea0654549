"""The resiliparse extractor (``extract.method: resiliparse``), beside trafilatura and inscriptis.

resiliparse's ``extract_plain_text`` (Bevendorff et al., the ChatNoir toolkit) walks a DOM parsed by
lexbor in C++ and, with ``main_content=True``, drops navigation, headers, footers, sidebars and the like
by element rules rather than by scoring text blocks as trafilatura does — many times faster, at some cost
in precision (``bench/README.md`` has the numbers on the repository's WARC). DCLM-Pool, and the
DCLM-Baseline built from it, were extracted this way.

Options as the DCLM-style pipelines pass them (``main_content=True, alt_texts=False``; NeMo Curator's
ResiliparseExtractor has the same defaults), links off (resiliparse's default: no URLs in the text),
list bullets and block formatting kept (its defaults: line structure is what the line-based filters
read). Runs in datatrove's extraction sandbox like the other extractors (one worker process, a page
killed after ``extract.timeoutSeconds``), see :class:`~lmforge_jobs.data.blocks.GuardedExtractor`.
"""

from __future__ import annotations

import re

from lmforge_jobs.data.blocks import GuardedExtractor

# The options DCLM-style extraction uses; main_content is the spec's (extract.mainContent).
RESILIPARSE_OPTIONS = {"alt_texts": False, "links": False, "list_bullets": True, "preserve_formatting": True}


class ResiliparseExtractor(GuardedExtractor):
    """Main-content text of an HTML page by resiliparse's rules (see the module docstring)."""

    name = "⛏ Resiliparse"
    library = "resiliparse"
    _requires_dependencies = ["resiliparse"]

    def __init__(self, main_content: bool = True, timeout: float = 1) -> None:
        super().__init__(timeout)
        self.main_content = main_content

    def extract(self, text: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        out = extract_plain_text(text, main_content=self.main_content, **RESILIPARSE_OPTIONS)
        return re.sub(r"\n{3,}", "\n\n", out).strip()


__all__ = ["RESILIPARSE_OPTIONS", "ResiliparseExtractor"]
