/* deeperfly docs: Plotly figures are drawn once the page is parsed, as wide as their column
   (deeperfly_docs_render.figure_html). Keep every figure exactly as wide as its column afterwards, whenever the
   column changes width (window resize, sidebar collapsed). */
window.addEventListener("load", () => {
  if (!window.Plotly || !window.ResizeObserver) return;
  const widths = new WeakMap();
  const ro = new ResizeObserver(entries => requestAnimationFrame(() => {
    for (const e of entries) {
      const div = e.target, w = Math.round(e.contentRect.width);
      if (!div._fullLayout || !w || widths.get(div) === w) continue;
      widths.set(div, w);
      if (div._fullLayout.width !== w) Plotly.Plots.resize(div);
    }
  }));
  document.querySelectorAll(".plotly-graph-div").forEach(div => ro.observe(div));
});
