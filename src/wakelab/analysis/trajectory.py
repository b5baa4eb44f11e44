"""Trajectories: the new tokens moving among the base tokens, in a 2-D picture whose axes never change during a run.

The projection is fitted once, on the base rows (PCA of a seeded sample), and then applied unchanged to every
recorded step. Base rows do not train, so they stay put, and a new row that does not move stays put too: motion on
screen is motion in the model, not a re-fitted basis turning under the points. Tracked tokens get a trail and their
nearest base tokens (cosine, among all base rows) at each frame; the other new tokens are drawn as a density.

Three outputs from one :class:`Trajectory`:

- :func:`write_html`: one self-contained page (data, canvas drawing and step slider inline; nothing fetched), which
  MLflow's artifact viewer opens offline; hover shows a token's word and its neighbours at that step;
- :func:`write_gif`: an animated GIF for slides;
- :func:`frame_image`: one frame as an RGB array, for ``mlflow.log_image(..., key=..., step=...)`` so the run's
  image step slider scrubs through training.

The live plugin (``wakelab.plugins.trajectory``) and ``wakelab analyze --recording`` both build a Trajectory with
:class:`TrajectoryBuilder`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WakelabError
from .embeddings import top_k_cosine

__all__ = [
    "MAX_FRAMES",
    "Projection",
    "Trajectory",
    "TrajectoryBuilder",
    "cap_frames",
    "fit_projection",
    "frame_image",
    "read_words_file",
    "select_tokens",
    "token_text",
    "write_gif",
    "write_html",
]

#: More frames than this make the page slow to load and the slider useless; callers subsample to it and say how
#: to plot fewer.
MAX_FRAMES = 400
DENSITY_BINS = 40
GIF_MAX_FRAMES = 80
#: Rows projected per pass: the centred float32 copy is this many rows, not all of them.
PROJECT_ROWS = 8192


def token_text(tokenizer, token_id: int) -> str:
    """The token as a reader would write it (decoded, stripped), or the raw token when it does not decode alone."""
    if tokenizer is None:
        return str(int(token_id))
    try:
        text = tokenizer.decode([int(token_id)]).strip()
    except Exception:  # noqa: BLE001 - a token that does not decode alone: show the raw token
        text = "\ufffd"
    if not text or "\ufffd" in text:
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return text


# ----------------------------------------------------------------------------------------------------------------------
# The fixed projection


@dataclass(frozen=True)
class Projection:
    """A 2-D linear map fitted once on the base rows: ``(rows - mean) @ axes.T``."""

    mean: np.ndarray  # [d]
    axes: np.ndarray  # [2, d], orthonormal
    explained: tuple[float, float]  # share of the base rows' variance along each axis

    def __call__(self, rows) -> np.ndarray:
        """``[n, 2]`` positions, ``PROJECT_ROWS`` rows at a time (no centred copy of all the rows)."""
        out = np.empty((len(rows), 2), dtype=np.float32)
        for start in range(0, len(rows), PROJECT_ROWS):
            part = rows[start : start + PROJECT_ROWS]
            if isinstance(part, torch.Tensor):
                values = part.detach().float().cpu().numpy()
            else:
                values = np.asarray(part, np.float32)
            out[start : start + len(values)] = (values - self.mean) @ self.axes.T
        return out


def fit_projection(base_rows: torch.Tensor, *, max_rows: int = 20000, seed: int = 0) -> Projection:
    """PCA of (a seeded sample of at most ``max_rows``) base rows; the same rows and seed give the same basis."""
    rows = base_rows.detach()
    if rows.ndim != 2 or rows.shape[0] < 3:
        raise WakelabError(f"a trajectory projection needs at least 3 base rows, got shape {tuple(rows.shape)}")
    if rows.shape[0] > max_rows:  # sampled before the float32 copy: the copy is max_rows x d, whatever the vocabulary
        generator = torch.Generator().manual_seed(int(seed))
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows].sort().values.to(rows.device)]
    rows = rows.float().cpu()
    mean = rows.mean(0)
    centred = rows - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2].clone()
    # A sign convention, so that refitting on the same rows never mirrors the picture.
    for i in range(2):
        if axes[i][axes[i].abs().argmax()] < 0:
            axes[i] = -axes[i]
    variance = singular.square()
    share = (variance[:2] / variance.sum().clamp_min(1e-30)).tolist()
    return Projection(mean.numpy(), axes.numpy(), (float(share[0]), float(share[1])))


# ----------------------------------------------------------------------------------------------------------------------
# Which tokens to draw, which frames to keep


def read_words_file(path: str | Path) -> list[str]:
    """Words, one a line (or separated by spaces); ``#`` starts a comment."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WakelabError(f"cannot read the words file {path}: {exc}") from None
    words: list[str] = []
    for line in text.splitlines():
        words += line.split("#", 1)[0].split()
    return list(dict.fromkeys(words))


def select_tokens(
    spec: str,
    words: Sequence[str],
    *,
    max_tokens: int,
    seed: int = 0,
    movement: Sequence[float] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[int]:
    """Positions (into ``words``) of the tokens to draw with labels and trails.

    ``spec``: ``auto`` (all when at most ``max_tokens``, else the top movers when ``movement`` is known, else a
    seeded sample), ``all``, ``sample:K``, ``top:K`` (largest ``movement``), or a path to a words file (words not
    in ``words`` are reported through ``warn`` and the rest are used).
    """
    count = len(words)
    text = str(spec).strip()
    if text in ("auto", "all"):
        if text == "all" or count <= max_tokens:
            return list(range(count))
        text = f"top:{max_tokens}" if movement is not None else f"sample:{max_tokens}"
    for kind in ("sample", "top"):
        if text.startswith(f"{kind}:"):
            k = text.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise WakelabError(f"trajectory tokens '{text}': K must be a whole number >= 1 ({kind}:20)")
            k = min(int(k), count)
            if kind == "top":
                if movement is None:
                    raise WakelabError(
                        f"trajectory tokens '{text}': the top movers are known only once training is over; use "
                        "sample:K or a words file live, or top:K with `wakelab analyze --recording`"
                    )
                order = np.argsort(-np.asarray(movement, dtype=np.float64), kind="stable")
                return sorted(int(i) for i in order[:k])
            generator = torch.Generator().manual_seed(int(seed))
            return sorted(torch.randperm(count, generator=generator)[:k].tolist())
    path = Path(text).expanduser()
    if not path.is_file():
        raise WakelabError(f"trajectory tokens '{text}' is not auto, all, sample:K, top:K or an existing words file")
    wanted = read_words_file(path)
    where = {w: i for i, w in enumerate(words)}
    missing = [w for w in wanted if w not in where]
    picked = [where[w] for w in wanted if w in where]
    if not picked:
        raise WakelabError(
            f"words file {path}: none of its {len(wanted)} words is a new token of this run; list words of the lexicon"
        )
    if missing and warn is not None:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warn(f"words file {path}: {len(missing)} of {len(wanted)} words are not new tokens of this run and are left "
             f"out: {shown}")  # fmt: skip
    return picked


def cap_frames(steps: Sequence[int], max_frames: int = MAX_FRAMES, how: str = "") -> tuple[list[int], str | None]:
    """Positions of at most ``max_frames`` evenly spread steps (first and last kept), and a message when capped."""
    count = len(steps)
    if count <= max_frames:
        return list(range(count)), None
    keep = sorted({int(round(i)) for i in np.linspace(0, count - 1, max_frames)})
    message = (f"{count} steps are more frames than a browser page can take; plotting {len(keep)} evenly spread "
               f"ones. To plot fewer, {how or 'record or capture fewer steps'}")  # fmt: skip
    return keep, message


# ----------------------------------------------------------------------------------------------------------------------
# Building a trajectory frame by frame


@dataclass
class Trajectory:
    """Everything a picture needs: per frame the tracked tokens' positions and neighbours, and the backdrop."""

    steps: list[int]
    words: list[str]  # tracked tokens
    token_ids: list[int]
    xy: np.ndarray  # [frames, tracked, 2]
    neighbours: list[list[list[str]]]  # [frames][tracked][k] nearest base tokens
    base_xy: np.ndarray  # [sampled base rows, 2]
    base_words: list[str]
    density: list[np.ndarray] = field(default_factory=list)  # per frame [bins, bins] counts of the untracked new rows
    extent: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)  # x0, x1, y0, y1 (fixed once per run)
    explained: tuple[float, float] = (0.0, 0.0)
    title: str = "new tokens among the base tokens"
    untracked: int = 0

    def __len__(self) -> int:
        return len(self.steps)


class TrajectoryBuilder:
    """Collects frames: give it the base rows once, then each step's rows of the new tokens."""

    def __init__(
        self,
        base_rows: torch.Tensor,
        base_words: Sequence[str] | Callable[[int], str],
        *,
        tracked: Sequence[int],
        tracked_words: Sequence[str],
        backdrop: int = 2000,
        neighbours: int = 5,
        seed: int = 0,
        title: str = "new tokens among the base tokens",
    ):
        # Kept as given (a view of the model's weights costs nothing): the projection samples it, and the nearest
        # base tokens are found a chunk at a time (top_k_cosine), so no copy of all base rows is ever made.
        base = base_rows.detach()
        self.projection = fit_projection(base, seed=seed)
        generator = torch.Generator().manual_seed(int(seed) + 1)
        sample = torch.randperm(base.shape[0], generator=generator)[: min(backdrop, base.shape[0])].sort().values
        self._word = base_words if callable(base_words) else (lambda i, w=base_words: w[i])
        self.base_xy = self.projection(base[sample.to(base.device)])
        self.base_words = [self._word(int(i)) for i in sample]
        self._base = base
        self.k = int(neighbours)
        self.tracked = list(tracked)
        self.tracked_words = list(tracked_words)
        self.title = title
        self.steps: list[int] = []
        self.xy: list[np.ndarray] = []
        self.neighbours: list[list[list[str]]] = []
        self.density: list[np.ndarray] = []
        self.untracked = 0
        self.extent: tuple[float, float, float, float] | None = None
        self.all_words: list[str] = list(tracked_words)  # every new token's text (the per-token table's rows)
        self.new_ids: list[int] = list(tracked)

    def nearest(self, rows: torch.Tensor) -> list[list[str]]:
        """The ``k`` nearest base tokens (cosine) of each row: a chunked top-k, memory O(chunk x d) per call."""
        if self.k <= 0 or rows.shape[0] == 0:
            return [[] for _ in range(rows.shape[0])]
        _, top = top_k_cosine(rows.detach(), self._base, self.k)
        return [[self._word(i) for i in row] for row in top.tolist()]

    def add(self, step: int, new_rows: torch.Tensor) -> np.ndarray:
        """One frame from the rows of ALL new tokens at ``step`` (the untracked ones make the density)."""
        new_rows = new_rows.detach().float().cpu()
        xy_all = self.projection(new_rows)
        xy = xy_all[self.tracked]
        if self.extent is None:  # fixed on the first frame: later frames share the axes
            points = np.concatenate([self.base_xy, xy_all])
            lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
            pad = (hi - lo) * 0.25 + 1e-6
            self.extent = (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))
        rest = np.ones(len(xy_all), dtype=bool)
        rest[self.tracked] = False
        self.untracked = int(rest.sum())
        if self.untracked:
            x0, x1, y0, y1 = self.extent
            grid, _, _ = np.histogram2d(xy_all[rest, 0], xy_all[rest, 1], bins=DENSITY_BINS, range=[[x0, x1], [y0, y1]])
            self.density.append(grid.astype(np.int32))
        self.steps.append(int(step))
        self.xy.append(xy)
        self.neighbours.append(self.nearest(new_rows[self.tracked]))
        return xy

    def result(self) -> Trajectory:
        return Trajectory(
            steps=list(self.steps),
            words=self.tracked_words,
            token_ids=list(self.tracked),
            xy=np.stack(self.xy) if self.xy else np.zeros((0, len(self.tracked), 2), np.float32),
            neighbours=self.neighbours,
            base_xy=self.base_xy,
            base_words=self.base_words,
            density=self.density,
            extent=self.extent or (0.0, 1.0, 0.0, 1.0),
            explained=self.projection.explained,
            title=self.title,
            untracked=self.untracked,
        )


def subset(traj: Trajectory, frames: Sequence[int]) -> Trajectory:
    """The same trajectory on chosen frames only (for a frame cap)."""
    frames = list(frames)
    return Trajectory(
        steps=[traj.steps[i] for i in frames],
        words=traj.words,
        token_ids=traj.token_ids,
        xy=traj.xy[frames],
        neighbours=[traj.neighbours[i] for i in frames],
        base_xy=traj.base_xy,
        base_words=traj.base_words,
        density=[traj.density[i] for i in frames] if traj.density else [],
        extent=traj.extent,
        explained=traj.explained,
        title=traj.title,
        untracked=traj.untracked,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Pictures


LABELS_MAX = 40  # more tracked tokens than this: labels on hover (HTML) or none (frames, GIF)


def _frame_figure(traj: Trajectory, index: int, size: float = 6.0, dpi: int = 80):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x0, x1, y0, y1 = traj.extent
    if traj.density:
        grid = traj.density[index]
        if grid.any():
            ax.imshow(np.ma.masked_equal(grid.T, 0), origin="lower", extent=(x0, x1, y0, y1), cmap="Blues", alpha=0.6,
                      aspect="auto", interpolation="nearest")  # fmt: skip
    ax.scatter(traj.base_xy[:, 0], traj.base_xy[:, 1], s=2, c="#bbbbbb", linewidths=0, label="base tokens (sample)")
    trail = traj.xy[: index + 1]  # [frames so far, tracked, 2]
    if index > 0:
        segments = np.transpose(trail, (1, 0, 2))
        ax.add_collection(LineCollection(segments, colors="#d95f02", linewidths=0.8, alpha=0.5))
    now = traj.xy[index]
    ax.scatter(now[:, 0], now[:, 1], s=14, c="#d95f02", linewidths=0, label="new tokens (tracked)")
    if len(traj.words) <= LABELS_MAX:
        for (x, y), word in zip(now, traj.words, strict=True):
            ax.annotate(word, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(f"PC 1 of the base rows ({traj.explained[0]:.1%} of their variance)")
    ax.set_ylabel(f"PC 2 ({traj.explained[1]:.1%})")
    more = f"; {traj.untracked} more as density" if traj.untracked else ""
    ax.set_title(f"{traj.title}: step {traj.steps[index]}{more}", fontsize=9)
    return fig


def frame_image(traj: Trajectory, index: int, size: float = 6.0, dpi: int = 80) -> np.ndarray:
    """Frame ``index`` as an RGB ``uint8`` array (for ``mlflow.log_image``)."""
    fig = _frame_figure(traj, index, size, dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_gif(traj: Trajectory, path: str | Path, *, max_frames: int = GIF_MAX_FRAMES, ms_per_frame: int = 150) -> Path:
    """An animated GIF of the trajectory (at most ``max_frames`` evenly spread frames, the last held longer)."""
    from PIL import Image

    if len(traj) == 0:
        raise WakelabError("a trajectory with no frames cannot be drawn")
    frames, _ = cap_frames(traj.steps, max_frames)
    images = [Image.fromarray(frame_image(traj, i, size=5.0, dpi=80)).convert("P", palette=Image.ADAPTIVE)
              for i in frames]  # fmt: skip
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 8]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path


_QUANT = 10000  # positions are stored as integers on a 0..10000 grid of the extent: a third of the page's size


def html_data(traj: Trajectory) -> dict[str, Any]:
    """The page's data, compact: quantised positions, neighbours as indices into one word list."""
    x0, x1, y0, y1 = traj.extent

    def quant(xy: np.ndarray) -> list[int]:
        qx = np.clip((xy[..., 0] - x0) / (x1 - x0), -0.5, 1.5) * _QUANT
        qy = np.clip((xy[..., 1] - y0) / (y1 - y0), -0.5, 1.5) * _QUANT
        return np.stack([qx, qy], -1).round().astype(np.int64).reshape(-1).tolist()

    vocab: dict[str, int] = {}
    neighbours = []
    for frame in traj.neighbours:
        flat = []
        for row in frame:
            flat.append([vocab.setdefault(w, len(vocab)) for w in row])
        neighbours.append(flat)
    return {
        "title": traj.title,
        "steps": traj.steps,
        "words": traj.words,
        "xy": [quant(traj.xy[i]) for i in range(len(traj))],
        "nb": neighbours,
        "vocab": list(vocab),
        "base": quant(traj.base_xy),
        "baseWords": traj.base_words,
        "density": [d.T.reshape(-1).tolist() for d in traj.density],
        "bins": DENSITY_BINS,
        "untracked": traj.untracked,
        "explained": [round(v, 4) for v in traj.explained],
        "labelsMax": LABELS_MAX,
    }


def write_html(traj: Trajectory, path: str | Path) -> Path:
    """One self-contained HTML page: the data and the drawing code inline, no network resource."""
    if len(traj) == 0:
        raise WakelabError("a trajectory with no frames cannot be drawn")
    data = json.dumps(html_data(traj), separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", _escape(traj.title)).replace("__DATA__", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:12px;color:#222}
#wrap{position:relative;display:inline-block}
canvas{border:1px solid #ddd;background:#fff}
#tip{position:absolute;pointer-events:none;background:rgba(255,255,255,.95);border:1px solid #999;padding:4px 6px;
display:none;white-space:nowrap;font-size:12px}
#bar{margin:8px 0;display:flex;gap:10px;align-items:center}
#slider{width:560px}
.muted{color:#777}
</style></head><body>
<div><b>__TITLE__</b> <span class="muted" id="sub"></span></div>
<div id="bar"><button id="play">play</button><input id="slider" type="range" min="0" value="0">
<span>step <b id="step"></b></span></div>
<div id="wrap"><canvas id="c" width="760" height="640"></canvas><div id="tip"></div></div>
<div class="muted">Axes: the first two principal components of the base rows, fitted once for the run (a row that
does not move stays put). Grey: base tokens (a sample). Orange: tracked new tokens with their trails. Blue squares:
the other new tokens' density. Hover a point for its word and nearest base tokens at this step.</div>
<script id="data" type="application/json">__DATA__</script>
<script>
(function(){
const D=JSON.parse(document.getElementById('data').textContent);
const C=document.getElementById('c'),X=C.getContext('2d'),S=document.getElementById('slider');
const tip=document.getElementById('tip'),W=C.width,H=C.height,Q=10000,M=30;
const F=D.steps.length,T=D.words.length;
S.max=F-1;S.value=F-1;
document.getElementById('sub').textContent=T+' tracked tokens'+(D.untracked?', '+D.untracked+' more as density':'')+
 ', '+F+' frames; PC1 '+(100*D.explained[0]).toFixed(1)+'%, PC2 '+(100*D.explained[1]).toFixed(1)+'% of base variance';
const px=q=>M+q/Q*(W-2*M),py=q=>H-M-q/Q*(H-2*M);
function draw(f){
 X.clearRect(0,0,W,H);
 if(D.density.length){const g=D.density[f],b=D.bins,cw=(W-2*M)/b,ch=(H-2*M)/b;let mx=1;for(const v of g)if(v>mx)mx=v;
  for(let j=0;j<b;j++)for(let i=0;i<b;i++){const v=g[j*b+i];if(!v)continue;
   X.fillStyle='rgba(49,130,189,'+(0.15+0.6*v/mx)+')';X.fillRect(M+i*cw,H-M-(j+1)*ch,cw,ch);}}
 X.fillStyle='#c8c8c8';const B=D.base;for(let i=0;i<B.length;i+=2){X.fillRect(px(B[i])-1,py(B[i+1])-1,2,2);}
 X.strokeStyle='rgba(217,95,2,.45)';X.lineWidth=1;
 for(let t=0;t<T;t++){X.beginPath();for(let k=0;k<=f;k++){const a=D.xy[k];const x=px(a[2*t]),y=py(a[2*t+1]);
  if(k)X.lineTo(x,y);else X.moveTo(x,y);}X.stroke();}
 const a=D.xy[f];X.fillStyle='#d95f02';X.font='11px system-ui,sans-serif';
 for(let t=0;t<T;t++){const x=px(a[2*t]),y=py(a[2*t+1]);X.beginPath();X.arc(x,y,3.5,0,7);X.fill();
  if(T<=D.labelsMax){X.fillStyle='#333';X.fillText(D.words[t],x+5,y-4);X.fillStyle='#d95f02';}}
 document.getElementById('step').textContent=D.steps[f]+' ('+(f+1)+'/'+F+')';
}
function hover(ev){
 const r=C.getBoundingClientRect(),mx=ev.clientX-r.left,my=ev.clientY-r.top,f=+S.value,a=D.xy[f];
 let best=-1,bd=100;
 for(let t=0;t<T;t++){const dx=px(a[2*t])-mx,dy=py(a[2*t+1])-my,d=dx*dx+dy*dy;if(d<bd){bd=d;best=t;}}
 if(best>=0){const nb=(D.nb[f][best]||[]).map(i=>D.vocab[i]).join(', ');
  tip.innerHTML='';const b=document.createElement('b');b.textContent=D.words[best];tip.appendChild(b);
  tip.appendChild(document.createTextNode(' at step '+D.steps[f]));tip.appendChild(document.createElement('br'));
  tip.appendChild(document.createTextNode('nearest base tokens: '+nb));}
 else{let bb=-1,bd2=36;const B=D.base;for(let i=0;i<B.length;i+=2){const dx=px(B[i])-mx,dy=py(B[i+1])-my,d=dx*dx+dy*dy;
  if(d<bd2){bd2=d;bb=i/2;}}
  if(bb<0){tip.style.display='none';return;}tip.textContent='base token: '+D.baseWords[bb];}
 tip.style.display='block';tip.style.left=(mx+12)+'px';tip.style.top=(my+8)+'px';
}
let timer=null;
document.getElementById('play').onclick=function(){
 if(timer){clearInterval(timer);timer=null;this.textContent='play';return;}
 this.textContent='pause';if(+S.value>=F-1)S.value=0;
 timer=setInterval(()=>{const v=+S.value+1;if(v>=F){clearInterval(timer);timer=null;
  document.getElementById('play').textContent='play';return;}S.value=v;draw(v);},120);};
S.oninput=()=>draw(+S.value);C.onmousemove=hover;C.onmouseleave=()=>{tip.style.display='none';};
draw(F-1);
})();
</script></body></html>
"""


def describe(traj: Trajectory) -> dict[str, Any]:
    """A short JSON description: what was drawn and how the picture's axes were made."""
    return {
        "frames": len(traj),
        "steps": [traj.steps[0], traj.steps[-1]] if len(traj) else [],
        "tracked": len(traj.words),
        "untracked_as_density": traj.untracked,
        "backdrop_base_rows": int(len(traj.base_xy)),
        "projection": "PCA of the base rows, fitted once",
        "explained_variance": list(traj.explained),
        "extent": list(traj.extent),
        "finite": bool(np.isfinite(traj.xy).all()) if traj.xy.size else True,
        "max_move": float(np.abs(traj.xy - traj.xy[:1]).max()) if traj.xy.size else math.nan,
    }
