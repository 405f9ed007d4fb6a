"""Renders math to MathML at build time, so pages need no MathJax (nor any network).

Sphinx's default HTML math renderer loads MathJax from a CDN in the reader's browser. This
renderer converts the LaTeX of ``$...$`` and ``$$...$$`` to MathML with docutils' own
converter (``docutils.utils.math.latex2mathml``), which every current browser displays
natively. LaTeX the converter does not know is a build warning (an error under ``-W``).
"""

from __future__ import annotations

from docutils import nodes
from docutils.utils.math import latex2mathml
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)


def _to_mathml(translator, node: nodes.Element, latex: str, block: bool) -> str:
  try:
    return latex2mathml.tex2mathml(latex, as_block=block)
  except Exception as e:  # pylint: disable=broad-except  (the converter raises several types)
    logger.warning("cannot convert this LaTeX to MathML (%s): %s", e, latex, location=node,
                   type="mathml")
    return f"<code>{translator.encode(latex)}</code>"


def visit_math(translator, node: nodes.math) -> None:
  translator.body.append(translator.starttag(node, "span", "", CLASS="math notranslate"))
  translator.body.append(_to_mathml(translator, node, node.astext(), block=False))
  translator.body.append("</span>")
  raise nodes.SkipNode


def visit_displaymath(translator, node: nodes.math_block) -> None:
  translator.body.append(translator.starttag(node, "div", CLASS="math notranslate"))
  if node.get("number"):
    number = get_node_equation_number(translator, node)
    translator.body.append(f'<span class="eqno">({number})')
    translator.add_permalink_ref(node, "Link to this equation")
    translator.body.append("</span>")
  translator.body.append(_to_mathml(translator, node, node.astext(), block=True))
  translator.body.append("</div>\n")
  raise nodes.SkipNode


def setup(app):
  app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None),
                             block_renderers=(visit_displaymath, None))
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
