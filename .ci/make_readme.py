"""Write README.md from nbs/index.ipynb (nbdev's own `nbdev-readme` needs Quarto, which these machines lack).

Markdown cells are copied; code cells become fenced blocks; cells marked `#| hide` are skipped and nbdev
directives are dropped. `--check` exits 1 when README.md is out of date.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def render() -> str:
    nb = json.loads((root / "nbs" / "index.ipynb").read_text())
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        lines = src.splitlines()
        if any(l.strip() in ("#| hide", "#|hide") for l in lines): continue
        body = "\n".join(l for l in lines if not l.lstrip().startswith("#|")).strip()
        if not body: continue
        if cell["cell_type"] == "markdown": parts.append(body)
        elif cell["cell_type"] == "code":
            lang = "bash" if body.startswith("!") or body.startswith("%%bash") else "python"
            body = "\n".join(l[1:] if l.startswith("!") else l for l in body.splitlines() if l.strip() != "%%bash")
            parts.append(f"```{lang}\n{body}\n```")
    return "<!-- generated from nbs/index.ipynb by .ci/make_readme.py: edit the notebook -->\n\n" + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    text, readme = render(), root / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python .ci/make_readme.py`")
        print("README.md is up to date")
    else:
        readme.write_text(text); print(f"wrote {readme}")
