"""Routing maps: which image patches each decision stage kept, deferred, or brought back.

`routing_map` draws one PNG, with Pillow only: the original image on the left, then one
panel per decision stage showing the image as the model saw it (cropped / resized to the
patch grid) with every patch cell marked

    active       kept at this stage (and not deferred before): green frame
    deferred     not selected at this stage (deleted, for FastV / PDrop): grey frame, dimmed
    re-entered   kept at this stage after having been deferred at an earlier one: orange frame

(the same counts as `results.stage_table`). `side_by_side` draws a reference row and an
artifact row with the patches whose selection differs crossed out in magenta, and
`maps_differ_markdown` embeds it in `parity --markdown` when decisions differ.

Visual token i sits at grid cell (i // W, i % W):
- LLaVA: the CLIP patch grid, row-major (24 x 24 for 576 tokens; tiny-llava 8 x 8), over the
  processor's centre crop of the image;
- Qwen2.5-VL: the merged grid (h/2 x w/2 for image_grid_thw (1, h, w)). The image processor
  flattens patches as (t, h/2, w/2, 2, 2) so each merged token is one 2 x 2 block in
  row-major order of the merged grid; the vision tower's window reordering is undone before
  the merger output, and mRoPE gives token i the grid position (i // W, i % W)
  (families/qwen2_5_vl.py, `_image_block`).

Each PNG also carries its layout as a text chunk ("reroute-routing-map", JSON: panel boxes,
cell size, colours, legend swatches) so tools and tests can find the panels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from PIL.PngImagePlugin import PngInfo

from .errors import UserError
from .families import get_family
from .files import check_folders_above, usual_mode

ACTIVE, DEFERRED, REENTERED = "active", "deferred", "re-entered"
STATES = (ACTIVE, DEFERRED, REENTERED)

COLORS: dict[str, tuple[int, int, int]] = {
    ACTIVE: (40, 170, 70),
    DEFERRED: (110, 110, 110),
    REENTERED: (255, 140, 0),
    "differs": (230, 0, 230),
    "crop": (30, 110, 255),
}
BACKGROUND = (255, 255, 255)
FRAME = (40, 40, 40)  # 1 px frame around every panel
LETTERBOX = (232, 232, 232)
TEXT = (0, 0, 0)
DIM_TO, DIM_ALPHA = (30, 30, 30), 0.7  # deferred cells: the image blended 70% towards dark grey

METADATA_KEY = "reroute-routing-map"
PANEL_PX = 320  # target size of the longer side of a panel
MARGIN = 12


# ---------------------------------------------------------------- grids


def grid_for(family_name: str, n_visual: int, image_grid_thw: Any = None, *, merge: int = 2) -> tuple[int, int]:
    """(H, W) of the visual-token grid: token i is cell (i // W, i % W), as the family lays
    its visual tokens out (`Family.map_grid`: LLaVA's square CLIP patch grid, 576 -> 24 x 24;
    Qwen2.5-VL's merged grid of `image_grid_thw`)."""
    n = int(n_visual)
    if n <= 0:
        raise UserError(f"no visual tokens to map (N = {n})")
    return get_family(family_name).map_grid(n, image_grid_thw, merge=merge)


def fit_for(family_name: str) -> str:
    """How the family's processor maps the image onto the patch grid (`Family.map_fit`):
    LLaVA's CLIP processor centre-crops a square ("crop"); Qwen2.5-VL resizes the whole image ("resize")."""
    return get_family(family_name).map_fit


# ---------------------------------------------------------------- states


@dataclass(frozen=True)
class StageMap:
    layer: int
    kept: frozenset[int]
    states: tuple[str, ...]  # per visual token: active / deferred / re-entered

    def count(self, state: str) -> int:
        return sum(s == state for s in self.states)


def stage_maps(result: Any) -> list[StageMap]:
    """Per decision stage, the state of every visual token (counts match `results.stage_table`)."""
    plan = result.plan
    n = int(plan.visual_tokens)
    out, deferred_before = [], set()
    for stage in plan.stages:
        kept = frozenset(int(i) for i in result.decisions.get(str(stage.layer), []))
        states = tuple(
            (REENTERED if i in deferred_before else ACTIVE) if i in kept else DEFERRED for i in range(n)
        )
        deferred_before |= set(range(n)) - kept
        out.append(StageMap(int(stage.layer), kept, states))
    return out


def _title(m: StageMap, deleted: bool) -> str:
    gone = "deleted" if deleted else "deferred"
    return f"layer {m.layer}: {m.count(ACTIVE) + m.count(REENTERED)} kept, {m.count(DEFERRED)} {gone}, " \
           f"{m.count(REENTERED)} re-entered"


# ---------------------------------------------------------------- images


Box = tuple[int, int, int, int]


def model_view(image: PIL.Image.Image, grid_hw: tuple[int, int], fit: str = "resize") -> tuple[PIL.Image.Image, Box]:
    """The part of `image` the patch grid covers, and its box in the original.

    "crop": the centred region of the grid's aspect (LLaVA's CLIP centre crop);
    "resize": the whole image (Qwen2.5-VL resizes to the grid, possibly changing aspect).
    """
    image = image.convert("RGB")
    w, h = image.size
    if fit == "resize":
        return image, (0, 0, w, h)
    if fit != "crop":
        raise ValueError(f"fit must be 'crop' or 'resize', got {fit!r}")
    gh, gw = grid_hw
    scale = min(w / gw, h / gh)
    cw, ch = max(1, round(gw * scale)), max(1, round(gh * scale))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    box = (x0, y0, x0 + cw, y0 + ch)
    return image.crop(box), box


def _font(size: int = 13) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable default font
    except TypeError:
        return PIL.ImageFont.load_default()


def _text_w(draw: PIL.ImageDraw.ImageDraw, text: str, font: Any) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _wrap(draw: PIL.ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap so a title fits over its panel."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_w(draw, f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


# ---------------------------------------------------------------- layout


@dataclass
class _Layout:
    grid: tuple[int, int]
    cell: int
    cols: int
    rows: int
    label_w: int
    title_h: int
    head_h: int
    line_h: int
    legend_h: int
    panel: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.panel = (self.grid[1] * self.cell, self.grid[0] * self.cell)

    @property
    def row_h(self) -> int:
        return self.title_h + self.panel[1] + MARGIN

    @property
    def size(self) -> tuple[int, int]:
        w = MARGIN + self.label_w + self.cols * (self.panel[0] + MARGIN)
        h = self.head_h + self.rows * self.row_h + self.legend_h + MARGIN
        return w, h

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x0 = MARGIN + self.label_w + col * (self.panel[0] + MARGIN)
        y0 = self.head_h + row * self.row_h + self.title_h
        return x0, y0, x0 + self.panel[0], y0 + self.panel[1]


def _cell_size(grid: tuple[int, int]) -> int:
    return max(4, math.ceil(PANEL_PX / max(grid)))


# ---------------------------------------------------------------- drawing


def _stage_panel(view: PIL.Image.Image, m: StageMap, grid: tuple[int, int], cell: int,
                 differs: frozenset[int] = frozenset()) -> PIL.Image.Image:
    gh, gw = grid
    size = (gw * cell, gh * cell)
    base = view.resize(size, PIL.Image.Resampling.BICUBIC)
    dim = PIL.Image.blend(base, PIL.Image.new("RGB", size, DIM_TO), DIM_ALPHA)
    mask = PIL.Image.new("L", (gw, gh), 0)
    mask.putdata([255 if s == DEFERRED else 0 for s in m.states])
    panel = PIL.Image.composite(dim, base, mask.resize(size, PIL.Image.Resampling.NEAREST))
    draw = PIL.ImageDraw.Draw(panel)
    b = max(1, cell // 10)
    for i, state in enumerate(m.states):
        r, c = divmod(i, gw)
        x0, y0 = c * cell, r * cell
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), outline=COLORS[state], width=b)
        if i in differs:
            lo, hi = b, cell - 1 - b
            draw.line((x0 + lo, y0 + lo, x0 + hi, y0 + hi), fill=COLORS["differs"], width=max(2, b))
            draw.line((x0 + hi, y0 + lo, x0 + lo, y0 + hi), fill=COLORS["differs"], width=max(2, b))
    return panel


def _original_panel(image: PIL.Image.Image, crop: Box, size: tuple[int, int]) -> PIL.Image.Image:
    """The whole image letterboxed into a panel, with the grid's region outlined when cropped."""
    image = image.convert("RGB")
    w, h = image.size
    scale = min(size[0] / w, size[1] / h)
    fw, fh = max(1, round(w * scale)), max(1, round(h * scale))
    panel = PIL.Image.new("RGB", size, LETTERBOX)
    ox, oy = (size[0] - fw) // 2, (size[1] - fh) // 2
    panel.paste(image.resize((fw, fh), PIL.Image.Resampling.BICUBIC), (ox, oy))
    if crop != (0, 0, w, h):
        draw = PIL.ImageDraw.Draw(panel)
        x0, y0, x1, y1 = (ox + round(crop[0] * scale), oy + round(crop[1] * scale),
                          ox + round(crop[2] * scale) - 1, oy + round(crop[3] * scale) - 1)
        draw.rectangle((x0, y0, x1, y1), outline=COLORS["crop"], width=2)
    return panel


def _render(image: PIL.Image.Image, rows: Sequence[tuple[str | None, Any]], grid_hw: tuple[int, int], path: Any,
            *, fit: str, title: str | None, differs: Sequence[frozenset[int]] | None = None) -> Path:
    grid = (int(grid_hw[0]), int(grid_hw[1]))
    maps = [stage_maps(result) for _, result in rows]
    for _, result in rows:
        n = int(result.plan.visual_tokens)
        if grid[0] * grid[1] != n:
            raise UserError(f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} cells but the trace has "
                            f"{n} visual tokens")
    n_stages = max((len(m) for m in maps), default=0)
    deleted = [not result.plan.recoverable for _, result in rows]
    view, crop = model_view(image, grid, fit)

    font = _font()
    scratch = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    line_h = scratch.textbbox((0, 0), "Ag", font=font)[3] + 5
    cell = _cell_size(grid)
    panel_w = grid[1] * cell
    cropped = crop != (0, 0, *image.size)
    first = "original image (blue: the patch grid's crop)" if cropped else "original image"
    titles = [[first if m else f"{first}; method {result.plan.method}: no routing decisions"]
              + [_title(s, deleted[r]) for s in m] for r, (m, (_, result)) in enumerate(zip(maps, rows))]
    wrapped = [[_wrap(scratch, t, font, panel_w) for t in row] for row in titles]
    title_h = max(len(lines) for row in wrapped for lines in row) * line_h + 4
    labels = [label for label, _ in rows]
    label_w = max((_text_w(scratch, lab, font) for lab in labels if lab), default=0)
    label_w = label_w + MARGIN if label_w else 0
    layout = _Layout(grid, cell, 1 + n_stages, len(rows), label_w, title_h, MARGIN, line_h, legend_h=0)
    head = _wrap(scratch, title, font, layout.size[0] - 2 * MARGIN) if title else []
    layout.head_h = MARGIN + (len(head) * line_h + 4 if head else 0)
    items = _legend_items(any(deleted), all(deleted), differs is not None, cropped) if n_stages else []
    placed = _legend_place(scratch, font, items, layout.size[0])
    layout.legend_h = (1 + max((p[3] for p in placed), default=-1)) * line_h

    canvas = PIL.Image.new("RGB", layout.size, BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    for k, line in enumerate(head):
        draw.text((MARGIN, MARGIN + k * line_h), line, fill=TEXT, font=font)
    panels_meta = []
    for r, (label, result) in enumerate(rows):
        if label:
            x0, y0, _, y1 = layout.box(r, 0)
            draw.text((MARGIN, (y0 + y1) // 2 - line_h // 2), label, fill=TEXT, font=font)
        for c in range(1 + len(maps[r])):
            box = layout.box(r, c)
            if c == 0:
                panel = _original_panel(image, crop, layout.panel)
                meta: dict[str, Any] = {"row": r, "kind": "image"}
            else:
                m = maps[r][c - 1]
                d = differs[c - 1] if differs is not None and c - 1 < len(differs) else frozenset()
                panel = _stage_panel(view, m, grid, cell, d)
                meta = {"row": r, "kind": "stage", "layer": m.layer, **{s: m.count(s) for s in STATES},
                        "differs": sorted(d)}
            canvas.paste(panel, box[:2])
            draw.rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), outline=FRAME, width=1)
            for k, line in enumerate(wrapped[r][c]):
                draw.text((box[0], box[1] - title_h + 2 + k * line_h), line, fill=TEXT, font=font)
            panels_meta.append({**meta, "label": label, "title": titles[r][c], "box": list(box)})

    legend = _legend(draw, font, placed, layout.size[1] - MARGIN - layout.legend_h, line_h)
    meta = {"grid": list(grid), "cell": cell, "fit": fit, "rows": labels, "stages": n_stages,
            "panels": panels_meta, "colors": {k: list(v) for k, v in COLORS.items()}, "legend": legend}
    return _save_png(canvas, path, meta)


def _legend_items(some_deleted: bool, all_deleted: bool, with_diff: bool, cropped: bool) -> list[tuple[str, str]]:
    gone = "deleted" if all_deleted else ("deferred / deleted" if some_deleted else "deferred")
    items = [(ACTIVE, "active (kept)"), (DEFERRED, f"{gone} (not selected)")]
    if not all_deleted:  # deleted tokens never come back
        items.append((REENTERED, "re-entered (kept again after a deferral)"))
    if with_diff:
        items.append(("differs", "selection differs between rows"))
    if cropped:
        items.append(("crop", "region the patch grid covers"))
    return items


SWATCH = 14


def _legend_place(draw: PIL.ImageDraw.ImageDraw, font: Any, items: list[tuple[str, str]],
                  width: int) -> list[tuple[str, str, int, int]]:
    """(name, text, x, line) for each swatch, wrapping onto new lines within `width`."""
    out, x, line = [], MARGIN, 0
    for name, text in items:
        w = SWATCH + 6 + _text_w(draw, text, font)
        if x + w > width - MARGIN and x > MARGIN:
            x, line = MARGIN, line + 1
        out.append((name, text, x, line))
        x += w + 2 * MARGIN
    return out


def _legend(draw: PIL.ImageDraw.ImageDraw, font: Any, placed: list[tuple[str, str, int, int]], top: int,
            line_h: int) -> dict[str, list[int]]:
    """Swatches along the bottom; returns each swatch's centre pixel by name."""
    out = {}
    for name, text, x, line in placed:
        y = top + line * line_h
        draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=COLORS[name], outline=FRAME)
        out[name] = [x + SWATCH // 2, y + SWATCH // 2]
        draw.text((x + SWATCH + 6, y), text, fill=TEXT, font=font)
    return out


def _save_png(canvas: PIL.Image.Image, path: Any, meta: dict[str, Any]) -> Path:
    """Whole file or nothing: a temp file in the same folder, then os.replace."""
    path = Path(path)
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta))
    check_folders_above(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write routing map {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            canvas.save(f, format="PNG", pnginfo=info)
        usual_mode(tmp)  # mkstemp's 0600 is for the temporary, not the map
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write routing map {path}: {e.strerror or e}") from None
        raise
    return path


# ---------------------------------------------------------------- public API


def routing_map(image: PIL.Image.Image, result: Any, grid_hw: tuple[int, int], path: Any, *,
                fit: str = "resize", title: str | None = None) -> Path:
    """Draw the routing map of one trace (`TraceResult`) over `image` into the PNG `path`.

    grid_hw: `grid_for(...)`. fit: `fit_for(family)` ("crop" for LLaVA's centre crop).
    title: a line above the panels; default names the method, N and the average budget.
    """
    if title is None:
        plan = result.plan
        title = f"{plan.method}: N={plan.visual_tokens} visual tokens, " \
                f"avg {plan.avg_visual_tokens:.2f} per layer over {plan.num_layers} layers"
    return _render(image, [(None, result)], grid_hw, path, fit=fit, title=title)


def map_for(image: PIL.Image.Image, result: Any, family_name: str, path: Any, *, image_grid_thw: Any = None,
            title: str | None = None) -> Path:
    """`routing_map` with the grid and fit worked out from the family (what `trace --map` needs)."""
    grid = grid_for(family_name, result.plan.visual_tokens, image_grid_thw)
    return routing_map(image, result, grid, path, fit=fit_for(family_name), title=title)


def selection_differs(ref: Any, got: Any) -> list[frozenset[int]]:
    """Per stage (the reference plan's order): visual tokens kept by exactly one of the two."""
    out = []
    for stage in ref.plan.stages:
        a = set(ref.decisions.get(str(stage.layer), []))
        b = set(got.decisions.get(str(stage.layer), []))
        out.append(frozenset(a ^ b))
    return out


def maps_differ(ref: Any, got: Any) -> bool:
    return any(selection_differs(ref, got))


def side_by_side(ref_result: Any, got_result: Any, image: PIL.Image.Image, grid: tuple[int, int], path: Any, *,
                 fit: str = "resize", labels: tuple[str, str] = ("reference", "artifact"),
                 title: str | None = None) -> Path:
    """Two rows (reference, artifact) x (original + one column per stage); patches whose
    selection differs between the rows are crossed out in magenta in both rows."""
    if title is None:
        d = selection_differs(ref_result, got_result)
        n = sum(bool(x) for x in d)
        title = f"routing maps: {labels[0]} vs {labels[1]}: " + (
            f"decisions differ at {n} of {len(d)} stages" if n else "decisions identical")
    return _render(image, [(labels[0], ref_result), (labels[1], got_result)], grid, path, fit=fit, title=title,
                   differs=selection_differs(ref_result, got_result))


def maps_differ_markdown(ref_result: Any, got_result: Any, image: PIL.Image.Image, grid: tuple[int, int],
                         png_path: Any, *, fit: str = "resize", link: str | None = None,
                         labels: tuple[str, str] = ("reference", "artifact")) -> str:
    """Markdown for `parity --markdown`: "" when every stage selected the same tokens;
    otherwise writes the side-by-side PNG to `png_path` and returns a section with a
    per-stage table of the differences and the image (`link`: how the markdown file
    refers to the PNG; default its file name, i.e. the PNG next to the markdown)."""
    d = selection_differs(ref_result, got_result)
    if not any(d):
        return ""
    side_by_side(ref_result, got_result, image, grid, png_path, fit=fit, labels=labels)
    ref_maps, got_maps = stage_maps(ref_result), stage_maps(got_result)
    got_by_layer = {m.layer: m for m in got_maps}
    lines = [
        f"### Routing maps: {labels[0]} vs {labels[1]}",
        "",
        f"Decisions differ at {sum(bool(x) for x in d)} of {len(d)} stages "
        f"(first: layer {next(m.layer for m, x in zip(ref_maps, d) if x)}). "
        "Patches selected by only one side are crossed out in magenta.",
        "",
        f"| layer | kept ({labels[0]}) | kept ({labels[1]}) | only {labels[0]} | only {labels[1]} |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m, x in zip(ref_maps, d):
        g = got_by_layer.get(m.layer)
        got_kept = g.kept if g else frozenset()
        lines.append(f"| {m.layer} | {len(m.kept)} | {len(got_kept)} | {len(m.kept - got_kept)} | "
                     f"{len(got_kept - m.kept)} |")
    lines += ["", f"![routing maps, {labels[0]} vs {labels[1]}]({link or Path(png_path).name})", ""]
    return "\n".join(lines)


def read_map_metadata(path: Any) -> dict[str, Any]:
    """The layout JSON a routing-map PNG carries (panel boxes, cell size, colours, legend)."""
    with PIL.Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
