"Sphinx configuration for the deeperfly docs site (used by docs/build.py: `sphinx-build -c docs _proc _docs`)."
from pathlib import Path

import plotly

import deeperfly_nb

HERE = Path(__file__).resolve().parent

project = "deeperfly"
author = "deeperfly developers"
copyright = "deeperfly developers"
release = version = deeperfly_nb.__version__

extensions = ["myst_nb"]
exclude_patterns = ["_quarto.yml", "nbdev.yml", "sidebar.yml", ".doctrees", ".cache", "**/.ipynb_checkpoints",
                    "sphinx-warnings.txt", ".*.status.json", "jupyter_execute", "html"]
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

# Notebooks are executed by docs/build.py (nbdev's processing, as nbdev-test runs them); myst-nb only renders them.
nb_execution_mode = "off"
nb_render_markdown_format = "myst"  # show_doc output is markdown
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist", "html_image", "attrs_inline"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = "deeperfly"
html_favicon = str(HERE / "_static" / "favicon.svg")
html_static_path = [str(HERE / "_static"), str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js")]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
html_context = {"default_mode": "light"}
html_theme_options = {
    "navbar_align": "left",
    "show_nav_level": 1,
    "navigation_depth": 2,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "navigation_with_keys": False,
    "search_bar_text": "Search the docs…",
}
html_sidebars = {"index": []}


def _plotly_only_where_needed(app, pagename, templatename, context, doctree):
    "Load the site's single copy of plotly.js (before the figures' inline scripts) on pages that have a figure"
    if "Plotly.newPlot" in context.get("body", ""):
        app.add_js_file("plotly.min.js", priority=200)
        app.add_js_file("fit-figures.js", priority=201)  # figures as wide as their column (see the file)


# Math renders as plain text: Sphinx's default renderer would load MathJax from a CDN, and the site is offline.
def _visit_math(self, node):
    self.body.append(self.starttag(node, "code", "", CLASS="math"))
    self.body.append(self.encode(node.astext()))
    self.body.append("</code>")
    from docutils import nodes
    raise nodes.SkipNode


def _visit_displaymath(self, node):
    self.body.append(self.starttag(node, "pre", "", CLASS="math"))
    self.body.append(self.encode(node.astext()))
    self.body.append("</pre>\n")
    from docutils import nodes
    raise nodes.SkipNode


html_math_renderer = "plain"


def setup(app):
    app.add_html_math_renderer("plain", (_visit_math, None), (_visit_displaymath, None))
    app.connect("html-page-context", _plotly_only_where_needed)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
