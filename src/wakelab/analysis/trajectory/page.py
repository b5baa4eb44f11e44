"""The trajectory as one self-contained HTML page, and several runs' trajectories side by side on one page.

Everything is inline (the data as JSON, the drawing code from ``page.js``, no network resource), so
MLflow's artifact viewer opens the page offline. What a reader gets:

- labels only for the words that matter (a chosen list, the words with a meaning word, the top movers), placed so
  that none overlaps another; every other word on hover, with its nearest base tokens;
- zoom (wheel) and pan (drag), "fit new tokens" (the default view) and "fit all";
- fading trails and a dashed arrow from each word's first position to its current one;
- with constituents: each meaning word as a marked base point with a thin line to its word, a chart of each word's
  cosine distance to its meaning word under the picture, and one line saying how many moved closer and how many
  away, all on the one step slider;
- a choice of the fixed projections (:mod:`.projection`) the run fitted, each stating the variance it keeps.

:func:`write_compare_html` puts several runs in one shared projection (the base-rows PCA: one base model and seed
give every run the same basis) under one slider and one camera; the sweep's ``comparison.html`` embeds it.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import WakelabError
from .frames import DENSITY_BINS, Trajectory

__all__ = ["LABEL_MAX", "PAGE_CSS", "page_data", "panels_script", "write_compare_html", "write_html"]

LABEL_MAX = 20  # labels tried per frame, most worth labelling first; the ones that would overlap are left to hover
_QUANT = 10000  # positions are stored as integers on a 0..10000 grid of each view's extent


def _quant(xy: np.ndarray, extent) -> list:
    x0, x1, y0, y1 = extent
    qx = np.clip((xy[..., 0] - x0) / (x1 - x0), -0.5, 1.5) * _QUANT
    qy = np.clip((xy[..., 1] - y0) / (y1 - y0), -0.5, 1.5) * _QUANT
    flat = np.stack([qx, qy], -1).reshape(-1)
    return [None if np.isnan(v) else int(round(float(v))) for v in flat]


def _sparse(grid: np.ndarray) -> list[int]:
    flat = grid.T.reshape(-1)
    cells = np.flatnonzero(flat)
    return np.stack([cells, flat[cells]], 1).reshape(-1).astype(int).tolist()


def page_data(traj: Trajectory, *, label_max: int = LABEL_MAX, extent=None, views: list[str] | None = None,
              ) -> dict[str, Any]:  # fmt: skip
    """The page's data, compact: quantised positions, neighbours as indices into one word list, sparse densities.

    ``extent`` (one for every view) and ``views`` (names) are for the side-by-side page, whose runs share them.
    """
    vocab: dict[str, int] = {}
    neighbours = [[[vocab.setdefault(w, len(vocab)) for w in row] for row in frame] for frame in traj.neighbours]
    shown = [v for v in traj.views if views is None or v.name in views]
    dist = None
    if traj.distance is not None and np.any(~np.isnan(traj.distance)):
        dist = [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in traj.distance]
    return {
        "title": traj.title,
        "steps": traj.steps,
        "words": traj.words,
        "nb": neighbours,
        "vocab": list(vocab),
        "baseWords": traj.base_words,
        "bins": DENSITY_BINS,
        "untracked": traj.untracked,
        "labelOrder": traj.label_order,
        "labelMax": label_max,
        "meaning": (traj.meaning_words or None) if dist is not None else None,
        "dist": dist,
        "notes": traj.notes,
        "views": [
            {
                "name": v.name,
                "fitted": v.projection.fitted_on,
                "explained": [round(float(e), 4) for e in v.explained],
                "fingerprint": v.projection.fingerprint(),
                "extent": list(extent or v.extent),
                "xy": [_quant(v.xy[i], extent or v.extent) for i in range(len(traj))],
                "base": _quant(v.base_xy, extent or v.extent),
                "mxy": _quant(v.meaning_xy, extent or v.extent),
                "dens": [_sparse(d) for d in v.density] if extent is None else [],
            }
            for v in shown
        ],
    }


def panels_script() -> str:
    """The drawing code (``WL.Panel``, ``WL.Camera``, ``WL.Slider``), to inline in a page."""
    return resources.files("wakelab.analysis.trajectory").joinpath("page.js").read_text(encoding="utf-8")


PAGE_CSS = """
body{font:13px system-ui,sans-serif;margin:12px;color:#222}
.wrap{position:relative;overflow:hidden;border:1px solid #ddd;background:#fff}
.wrap canvas{position:absolute;left:0;top:0;cursor:grab}
.labels{position:absolute;left:0;top:0;pointer-events:none}
.lbl{position:absolute;font:12px system-ui,sans-serif;line-height:15px;height:15px;white-space:nowrap;color:#333;
text-shadow:0 0 2px #fff,0 0 2px #fff}
.lbl.meaning{color:#1b9e77;font-style:italic}
.tip{position:absolute;pointer-events:none;background:rgba(255,255,255,.95);border:1px solid #999;padding:4px 6px;
display:none;white-space:nowrap;font-size:12px;z-index:2}
.bar{margin:8px 0;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.slider{width:560px}
.summary{margin:6px 0 2px;font-weight:600}
.chart{display:block;border:1px solid #eee;margin-top:2px}
.caption{font-weight:600;margin:4px 0}
.muted{color:#777;max-width:900px}
.note{color:#8a4b00}
.panels{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
"""


def _variance_line(view: dict) -> str:
    a, b = view["explained"]
    return f"{view['name']}: {100 * a:.1f}% + {100 * b:.1f}% of the variance of {view['fitted']}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>__CSS__</style></head><body>
<div><b>__TITLE__</b> <span class="muted" id="sub"></span></div>
<div class="bar"><button id="play">play</button><input id="slider" class="slider" type="range" min="0" value="0">
<span>step <b id="step"></b></span>
<label>projection <select id="proj"></select></label>
<button id="fit">fit new tokens</button><button id="all">fit all</button></div>
__NOTES__
<div id="panel"></div>
<div class="muted" id="variance"></div>
<div class="muted">Axes: a projection fitted once for the run, so a row that does not move stays put. Grey: base
tokens (a sample). Orange: tracked new tokens, with fading trails and a dashed arrow from where each started. Green
diamonds: meaning words (from the constituents file), each tied to its word by a dotted line. Blue squares: the other
new tokens' density. Labels go to the words worth naming first and never overlap; hover any point for its word and
nearest base tokens. Wheel: zoom; drag: pan. The chart under the picture: each word's cosine distance to its meaning
word (green: closer than at the start, red: farther).</div>
<script id="data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
<script>
(function(){
const D=JSON.parse(document.getElementById('data').textContent);
const P=new WL.Panel(document.getElementById('panel'),D,{});
const sel=document.getElementById('proj');
D.views.forEach((v,i)=>{const o=document.createElement('option');o.value=i;o.textContent=v.name+' ('+
 (100*(v.explained[0]+v.explained[1])).toFixed(1)+'% kept)';sel.appendChild(o);});
sel.onchange=()=>{P.v=+sel.value;P.fit(false);};
document.getElementById('variance').textContent='Variance kept: '+D.views.map(v=>v.name+': '+
 (100*v.explained[0]).toFixed(1)+'% + '+(100*v.explained[1]).toFixed(1)+'% of the variance of '+v.fitted)
 .join('; ')+'.';
document.getElementById('fit').onclick=()=>P.fit(false);document.getElementById('all').onclick=()=>P.fit(true);
document.getElementById('sub').textContent=D.words.length+' tracked tokens'+(D.untracked?', '+D.untracked+
 ' more as density':'')+', '+D.steps.length+' frames';
P.fit(false);
window.WLP=[P];window.WLS=WL.Slider([P],document.getElementById('slider'),document.getElementById('step'),
 document.getElementById('play'));
})();
</script></body></html>
"""


def _inline(data: Any) -> str:
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def _escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def write_html(traj: Trajectory, path: str | Path, *, label_max: int = LABEL_MAX) -> Path:
    """One self-contained HTML page: the data and the drawing code inline, no network resource."""
    if len(traj) == 0:
        raise WakelabError("a trajectory with no frames cannot be drawn")
    notes = "".join(f'<div class="note">{_escape(n)}</div>' for n in traj.notes)
    page = (_PAGE.replace("__CSS__", PAGE_CSS).replace("__TITLE__", _escape(traj.title))
            .replace("__NOTES__", notes).replace("__SCRIPT__", panels_script())
            .replace("__DATA__", _inline(page_data(traj, label_max=label_max))))  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_COMPARE = """<div class="bar"><button id="play">play</button><input id="slider" class="slider" type="range" min="0"
value="0"><span>step <b id="step"></b></span><button id="fit">fit new tokens</button><button id="all">fit all</button>
</div>
<div class="panels" id="panels"></div>
<div class="muted" id="variance"></div>
<script id="runs" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
<script>
(function(){
const R=JSON.parse(document.getElementById('runs').textContent),cam=new WL.Camera();
const root=document.getElementById('panels');
const panels=R.map(r=>new WL.Panel(root,r.data,{camera:cam,width:__W__,height:__H__,chartHeight:130,caption:r.label}));
const union=all=>{let b=[1e9,-1e9,1e9,-1e9];for(const p of panels){const c=p.bounds(all);b=[Math.min(b[0],c[0]),
 Math.max(b[1],c[1]),Math.min(b[2],c[2]),Math.max(b[3],c[3])];}return b;};
const fit=all=>cam.fit(union(all),__W__,__H__);
document.getElementById('fit').onclick=()=>fit(false);document.getElementById('all').onclick=()=>fit(true);
const v=R[0].data.views[0];document.getElementById('variance').textContent='One shared projection: PCA of '+v.fitted+
 ', fitted once ('+(100*v.explained[0]).toFixed(1)+'% + '+(100*v.explained[1]).toFixed(1)+'% of their variance); '+
 'the same base model and seed give every run this basis. Wheel: zoom; drag: pan (all panels together).';
fit(false);
window.WLP=panels;window.WLS=WL.Slider(panels,document.getElementById('slider'),document.getElementById('step'),
 document.getElementById('play'));
})();
</script>"""


def compare_fragment(runs: list[tuple[str, Trajectory]], *, width: int = 560, height: int = 460) -> str:
    """The side-by-side trajectories (HTML to put in a page with :data:`PAGE_CSS`): every run's base-rows view in
    one shared extent, one slider, one camera. The caller checks that the runs share the projection."""
    views = [traj.view("base") for _, traj in runs]
    x0 = min(v.extent[0] for v in views)
    x1 = max(v.extent[1] for v in views)
    y0 = min(v.extent[2] for v in views)
    y1 = max(v.extent[3] for v in views)
    data = [{"label": label, "data": page_data(traj, extent=(x0, x1, y0, y1), views=["base"], label_max=12)}
            for label, traj in runs]  # fmt: skip
    return (_COMPARE.replace("__DATA__", _inline(data)).replace("__SCRIPT__", panels_script())
            .replace("__W__", str(width)).replace("__H__", str(height)))  # fmt: skip


def write_compare_html(runs: list[tuple[str, Trajectory]], path: str | Path, title: str = "trajectories") -> Path:
    """A page of :func:`compare_fragment` alone (the sweep's comparison page embeds the fragment itself)."""
    head = f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_escape(title)}</title>"
    body = f"<h3>{_escape(title)}</h3>{compare_fragment(runs)}"
    page = f"{head}<style>{PAGE_CSS}</style></head><body>{body}</body></html>\n"
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
