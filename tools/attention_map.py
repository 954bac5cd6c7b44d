"""`./tinylm attention MODEL --text "..." [--out file.png] [--layers 0,2]`: a PNG grid of attention weights.

MODEL is an artifact folder, or an id (prefix) or name in the local store ($TINYLM_HOME/artifacts, default
~/.tinylm/artifacts). One panel per (layer, head): row t is where token t looks (keys on the x axis), both axes
labelled with the tokens. Long texts keep their last --max-tokens tokens, so the labels stay readable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from model.artifact import ArtifactError, ArtifactStore, load_artifact
from model.attention_maps import attention_maps
from model.tokenizers import Tokenizer
from tools.settings import Settings

__all__ = ["main", "png_size", "write_attention_png"]

CELL_IN = 0.11  # inches per token along each axis of a panel: room for a 6-point tick label
MIN_PANEL_IN = 2.0
MARGIN_IN = 0.8  # room for the title and the tick labels, around the grid
DPI = 100
LABEL_FONT_PT = 6
COLOR_GAMMA = 0.5  # square-root colour scale: the small weights stay visible beside the large ones
DEFAULT_MAX_TOKENS = 48


def png_size(n_layers: int, n_heads: int, n_tokens: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for n_layers rows and n_heads columns of n_tokens x n_tokens panels."""
    panel = max(MIN_PANEL_IN, n_tokens * CELL_IN)
    return round((n_heads * panel + MARGIN_IN) * DPI), round((n_layers * panel + MARGIN_IN) * DPI)


def _label(tokenizer: Tokenizer, token: int) -> str:
    """A token as a tick label: whitespace made visible."""
    text = tokenizer.decode([token])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"


def write_attention_png(
    maps: torch.Tensor, layers: Sequence[int], labels: Sequence[str], path: Path, title: str
) -> None:
    """maps (len(layers), n_head, T, T) -> a PNG grid of heatmaps at `path` (`png_size` pixels)."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    n_rows, n_heads, T, _ = maps.shape
    width, height = png_size(n_rows, n_heads, T)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_heads, squeeze=False)
    norm = PowerNorm(COLOR_GAMMA, vmin=0.0, vmax=1.0)
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[r][h]
            ax.imshow(maps[r, h].cpu().numpy(), cmap="viridis", norm=norm, interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            ax.set_xticks(range(T), labels if r == n_rows - 1 else [""] * T, rotation=90, fontsize=LABEL_FONT_PT)
            ax.set_yticks(range(T), labels if h == 0 else [""] * T, fontsize=LABEL_FONT_PT)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)


def _parse_layers(spec: str | None, n_layer: int) -> list[int]:
    if not spec:
        return list(range(n_layer))
    try:
        layers = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers in [0, {n_layer}), got {spec!r}") from None
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad or not layers:
        raise ValueError(f"--layers must be comma-separated integers in [0, {n_layer}), got {spec!r}")
    return layers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tinylm attention", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="artifact folder, or model id (prefix) or name in $TINYLM_HOME/artifacts")
    parser.add_argument("--text", required=True, help="the text whose attention to draw")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="PNG to write (default attention.png)")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="keep the last N tokens")
    args = parser.parse_args(argv)
    try:
        path = Path(args.model)
        if not path.is_dir():
            path = ArtifactStore(Settings.from_env().artifacts).resolve(args.model)
        artifact = load_artifact(path)
    except ArtifactError as err:
        print(f"tinylm attention: {err}", file=sys.stderr)
        return 1
    config = artifact.config
    try:
        layers = _parse_layers(args.layers, config.n_layer)
    except ValueError as err:
        parser.error(str(err))
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    ids = artifact.tokenizer.encode(args.text)[-min(args.max_tokens, config.block_size) :]
    if not ids:
        parser.error("--text encodes to no tokens")
    maps = attention_maps(artifact.model, torch.tensor(ids))[layers]  # (len(layers), H, T, T)
    labels = [_label(artifact.tokenizer, i) for i in ids]
    name = artifact.manifest.get("name") or artifact.manifest["id"]
    write_attention_png(maps, layers, labels, args.out, f"{name} ({artifact.manifest['id'][:12]}): {len(ids)} tokens")
    print(f"wrote {args.out} ({len(layers)} layers x {config.n_head} heads, {len(ids)} tokens)")
    return 0
