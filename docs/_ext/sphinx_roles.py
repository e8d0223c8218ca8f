"""A griffe extension for the docs build: render fsrdzv's Sphinx-flavoured docstrings as clean Markdown.

fsrdzv's docstrings use reST roles (``:class:`Store```, ``:func:`~fsrdzv.open_store```), ``::`` literal-block
markers and ``.. code-block::`` directives. mkdocstrings parses the ``:param:``/``:raises:`` fields itself but
leaves the rest as Markdown, where roles would show up as ``:class:Store``. This extension rewrites them before
rendering: a role becomes a code span, ``::`` becomes ``:`` (the indented block that follows is already a Markdown
code block), and a ``.. code-block::`` line is dropped for the same reason. Only the docs build uses it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^[ \t]*\.\. code-block::.*\n", re.MULTILINE)
_LITERAL_MARK = re.compile(r"::[ \t]*$", re.MULTILINE)


def clean(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(1).strip()}`", text)
    text = _DIRECTIVE.sub("", text)
    return _LITERAL_MARK.sub(":", text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
