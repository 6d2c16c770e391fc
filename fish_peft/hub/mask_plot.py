"""Where a mask landed: the fraction of each module's weights selected, and each module's share of the mask, by
transformer layer.

`mask_by_layer` groups parameter names by layer index (the number in `bert.encoder.layer.3.attention.self.query.weight`,
`transformer.h.3.mlp.c_fc.weight`, `model.layers.3.self_attn.q_proj.weight`) and by module kind (the name after that
number, e.g. `attention.self.query.weight`). Parameters outside the numbered layers get their own columns, named by
the first part of their name below the model's root (`embeddings`, `wte`, `embed_tokens`, `pooler`, `ln_f`, `norm`):
embedding-like ones to the left of the layers, the rest to the right. `plot_mask` draws that table as heatmaps;
`plot_masks` draws several methods' masks on shared colour scales.

matplotlib is imported only by `plot_mask`; it is not a dependency of the rest of fish-peft.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import in_modules

_EMBEDDING_LIKE = re.compile(r"emb|wte|wpe|shared", re.IGNORECASE)


@dataclass
class _Layout:
    """The data behind the plot: per (kind, column) cell the selected count and size, rows and columns in order."""

    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    num_left: int = 0  # non-layer columns drawn left of the layers
    num_right: int = 0  # non-layer columns drawn right of the layers
    selected: dict[tuple[str, str], int] = field(default_factory=dict)
    size: dict[tuple[str, str], int] = field(default_factory=dict)

    def fractions(self, of: str = "module") -> dict[str, dict[str, float]]:
        """Per cell, the selected entries over the cell's own entries (`of="module"`) or over all selected ones
        (`of="budget"`: where the mask's k went)."""
        if of not in ("module", "budget"):
            raise ValueError(f"of must be 'module' or 'budget', got {of!r}.")
        whole = max(self.num_selected, 1)
        return {
            row: {
                col: self.selected[row, col] / (self.size[row, col] if of == "module" else whole)
                for col in self.columns if (row, col) in self.size
            }
            for row in self.rows
        }

    @property
    def num_selected(self) -> int:
        return sum(self.selected.values())

    @property
    def num_entries(self) -> int:
        return sum(self.size.values())


def _split_layer(name: str) -> tuple[str, int, str] | None:
    """`a.b.3.c.weight` -> ("a.b", 3, "c.weight"): the first purely numeric component that is not the last one."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return None


def _common_prefix(seqs: Sequence[Sequence[str]]) -> list[str]:
    if not seqs:
        return []
    prefix = list(seqs[0])
    for seq in seqs[1:]:
        n = 0
        while n < min(len(prefix), len(seq)) and prefix[n] == seq[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _stack_labels(stacks: list[str], root: list[str]) -> dict[str, str]:
    """A short name per layer stack when a model has several (T5/BART: "encoder", "decoder"); "" when it has one."""
    if len(stacks) <= 1:
        return {stack: "" for stack in stacks}
    short = {stack: stack.split(".")[len(root) :] for stack in stacks}
    shorter = {stack: parts[:-1] or parts for stack, parts in short.items()}
    if len({".".join(p) for p in shorter.values()}) == len(stacks):
        short = shorter
    return {stack: ".".join(parts) or "(root)" for stack, parts in short.items()}


def _all_shapes(mask: FishMask, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """The masked parameters' shapes plus, from `shapes`, those the mask left out (shown as 0); not the head."""
    result: dict[str, tuple[int, ...]] = {}
    for name, shape in (shapes or {}).items():
        if in_modules(name, mask.modules_to_save):
            continue  # the head is trained in full, not part of the sparse diff
        result[name] = tuple(int(s) for s in shape)
    for name, shape in mask.shapes.items():
        if name in result and result[name] != shape:
            raise ValueError(f"mask_by_layer: `shapes` gives {result[name]} for '{name}' but the mask has {shape}.")
        result.setdefault(name, shape)
    return result


def _layout(mask: FishMask, shapes: Mapping[str, Sequence[int]] | None = None) -> _Layout:
    all_shapes = _all_shapes(mask, shapes)
    counts = mask.counts()

    split = {name: _split_layer(name) for name in all_shapes}
    stacks = list(dict.fromkeys(s[0] for s in split.values() if s is not None))
    root = _common_prefix([stack.split(".")[:-1] for stack in stacks])
    stack_label = _stack_labels(stacks, root)

    layout = _Layout()
    layer_rows: dict[str, None] = {}
    other_rows: dict[str, None] = {}
    layer_cols: dict[tuple[int, int], str] = {}
    left: dict[str, None] = {}
    right: dict[str, None] = {}
    for name, shape in all_shapes.items():
        parts = split[name]
        if parts is not None:
            stack, index, kind = parts
            label = f"{stack_label[stack]}.{index}" if stack_label[stack] else str(index)
            layer_cols[stacks.index(stack), index] = label
            layer_rows[kind] = None
        else:
            pieces = name.split(".")
            shared = len(_common_prefix([pieces, root]))  # `bert.embeddings.*` below `bert.encoder.layer`: strip `bert`
            pieces = pieces[min(shared, max(len(pieces) - 2, 0)) :]
            label, kind = (pieces[0], ".".join(pieces[1:])) if len(pieces) > 1 else (pieces[0], pieces[0])
            (left if _EMBEDDING_LIKE.search(label) else right)[label] = None
            other_rows[kind] = None
        cell = (kind, label)
        layout.selected[cell] = layout.selected.get(cell, 0) + counts.get(name, 0)
        layout.size[cell] = layout.size.get(cell, 0) + math.prod(shape)

    layout.rows = list(layer_rows) + [row for row in other_rows if row not in layer_rows]
    layout.columns = list(left) + [layer_cols[key] for key in sorted(layer_cols)] + list(right)
    layout.num_left, layout.num_right = len(left), len(right)
    return layout


def mask_by_layer(
    mask: FishMask, shapes: Mapping[str, Sequence[int]] | None = None, of: str = "module"
) -> dict[str, dict[str, float]]:
    """{module kind: {layer label: fraction of its entries selected}}, the data `plot_mask` draws; with
    `of="budget"`, each cell's share of the mask's selected entries instead (the cells sum to 1).

    Layer labels are the layer numbers as strings ("0", "1", ...; "encoder.0", "decoder.0" for a model with several
    layer stacks) and, for parameters outside the numbered layers, the first part of their name below the model's
    root ("embeddings", "pooler", "wte", "ln_f", "embed_tokens", "norm", ...). Rows and columns come in plot order
    (embedding-like columns, layers by number, other columns). A cell exists only where a parameter does.

    The mask only knows the shapes of parameters it selected entries from; pass `shapes` (e.g.
    `{n: tuple(p.shape) for n, p in base_model.named_parameters()}`, names as the mask spells them) to also show the
    parameters it left out, as 0. The mask's head (`mask.modules_to_save`, trained in full) is left out either way.
    """
    return _layout(mask, shapes).fractions(of)


def _colorbar_ticks(vmin: float, vmax: float) -> list[float]:
    """1-2-5 steps inside [vmin, vmax]; thinned to decades over a wide range, geometric over a narrow one."""
    ticks = [
        m * 10.0**e
        for e in range(math.floor(math.log10(vmin)), math.ceil(math.log10(vmax)) + 1)
        for m in (1, 2, 5)
        if vmin <= m * 10.0**e <= vmax
    ]
    if len(ticks) > 8:
        ticks = [t for t in ticks if math.isclose(t, 10.0 ** round(math.log10(t)))]
    if len(ticks) < 3:
        ticks = [vmin * (vmax / vmin) ** (i / 3) for i in range(4)]
    return ticks


def _percent(fraction: float) -> str:
    value = fraction * 100
    if value == 0:
        return "0"
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2g}"


MEASURES = {
    "module": "selected (% of the module)",
    "budget": "share of the mask (% of k)",
}


def _values(layout: _Layout, of: str):
    """The layout's table of `of` measures as an array (NaN where no parameter is)."""
    import numpy as np

    data = layout.fractions(of)
    values = np.full((len(layout.rows), len(layout.columns)), np.nan)
    for i, row in enumerate(layout.rows):
        for j, col in enumerate(layout.columns):
            if col in data[row]:
                values[i, j] = data[row][col]
    return values


def _log_norm(tables):
    """One log colour scale over the positive values of all `tables`."""
    import numpy as np
    from matplotlib.colors import LogNorm

    positive = np.concatenate([t[t > 0] for t in tables]) if tables else np.array([])
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = float(positive.min()) if positive.size else vmax / 10
    return LogNorm(vmin=min(vmin, vmax / 10) if vmin >= vmax else vmin, vmax=vmax)


def _draw(fig, ax, layout: _Layout, values, norm, label: str) -> None:
    """One heatmap: rows module kinds, columns layers; grey where nothing was selected, blank where no parameter is."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows, cols = layout.rows, layout.columns
    if len(rows) and len(cols):
        zeros = np.where(values == 0, 1.0, np.nan)
        ax.imshow(zeros, cmap=ListedColormap(["#d0d0d0"]), aspect="auto", interpolation="nearest")
        image = ax.imshow(
            np.ma.masked_where(~(values > 0), values), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest"
        )
        cbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        cbar.set_label(label, fontsize=8)
        cbar.set_ticks(_colorbar_ticks(norm.vmin, norm.vmax))
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _percent(v)))
        cbar.ax.yaxis.set_minor_formatter(NullFormatter())
        if len(cols) <= 30 and len(rows) <= 40:
            fontsize = 6.5 if len(cols) <= 16 else 5.5
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    dark = v > 0 and norm(v) < 0.6
                    ax.text(j, i, _percent(v), ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
        for boundary in (layout.num_left, len(cols) - layout.num_right):
            if 0 < boundary < len(cols):
                ax.axvline(boundary - 0.5, color="black", linewidth=1.2)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=8)
    for tick in ax.get_xticklabels():
        tick.set_rotation(90 if len(tick.get_text()) > 3 else 0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("layer")
    ax.tick_params(length=0)


def _figure(layouts: list[_Layout], panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(len(layout.columns) for layout in layouts)
    rows = max(len(layout.rows) for layout in layouts)
    names = max((len(r) for layout in layouts for r in layout.rows), default=0)
    width = min(30.0, 3.5 + 0.42 * max(cols, 1) + 0.07 * names)
    height = min(60.0, panels * (1.9 + 0.3 * max(rows, 1)))
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _subtitle(mask: FishMask, layout: _Layout, shapes) -> str:
    k, entries = layout.num_selected, layout.num_entries
    density = k / entries if entries else 0.0
    of_what = "entries of the parameters shown" if shapes is not None else "entries of the masked parameters"
    subtitle = f"k = {k:,} of {entries:,} {of_what} ({density * 100:.3g} %)"
    total = mask.info.get("num_total_parameters")
    if total:
        subtitle += f"; {k / total * 100:.3g} % of all {total:,} parameters"
    if mask.modules_to_save:
        subtitle += f"\nhead trained in full, not shown: {', '.join(mask.modules_to_save)}"
    return subtitle


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_mask(
    mask: FishMask,
    path: str,
    title: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Write a PNG of `mask_by_layer(mask, shapes)` in two heatmaps, rows module kinds and columns layers, on log
    colour scales: the fraction of each module's weights selected, then each module's share of the mask's k entries
    (where the budget went). Parameters the mask left out (known only through `shapes`) are grey, cells without a
    parameter blank. The subtitle gives k and the density. The file is replaced atomically."""
    layout = _layout(mask, shapes)
    fig = _figure([layout], panels=2)
    if title is None:
        method = mask.info.get("method")
        keep = mask.info.get("keep_ratio")
        title = "Where the mask landed"
        if method:
            title += f" ({method}" + (f", keep ratio {keep:g})" if isinstance(keep, (int, float)) else ")")
    for panel, (of, label) in enumerate(MEASURES.items()):
        ax = fig.add_subplot(2, 1, panel + 1)
        values = _values(layout, of)
        _draw(fig, ax, layout, values, _log_norm([values]), label)
        ax.set_title(f"{title}\n{_subtitle(mask, layout, shapes)}" if panel == 0 else label, fontsize=9, loc="left")
    _save(fig, path)


def plot_masks(masks: Mapping[str, FishMask], path: str, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Several methods' masks in one PNG, a row of two heatmaps each (fraction of each module selected, share of
    k), every column on one colour scale across the methods, so their colours compare."""
    if not masks:
        raise ValueError("plot_masks needs at least one mask.")
    layouts = {name: _layout(mask, shapes) for name, mask in masks.items()}
    tables = {of: {name: _values(layout, of) for name, layout in layouts.items()} for of in MEASURES}
    norms = {of: _log_norm(list(tables[of].values())) for of in MEASURES}
    fig = _figure(list(layouts.values()), panels=len(masks))
    fig.set_figwidth(min(60.0, 2 * fig.get_figwidth()))
    for row, (name, layout) in enumerate(layouts.items()):
        for col, (of, label) in enumerate(MEASURES.items()):
            ax = fig.add_subplot(len(masks), 2, 2 * row + col + 1)
            _draw(fig, ax, layout, tables[of][name], norms[of], label)
            ax.set_title(f"{name}: {label}\n{_subtitle(masks[name], layout, shapes)}", fontsize=9, loc="left")
    _save(fig, path)
