"""The figures the notebooks and `python -m eglib figures` show, as functions of result records."""

from eglib.plots.common import PROTOCOL_LABELS, PROTOCOLS, protocol_label, save_figure, use_style
from eglib.plots.gallery import attack_gallery, example_pairs, smooth_colour_images
from eglib.plots.rank import rank_curves, rank_ratio_bars
from eglib.plots.spectra import projection_tsne, separation_summary, singular_spectra
from eglib.plots.sweeps import metric_vs_param
from eglib.plots.tables import (
    adaptive_summary,
    defence_heatmaps,
    detection_heatmaps,
    formatted_table,
    metric_heatmap,
    protocol_heatmaps,
    trigger_rank_bars,
)
from eglib.plots.training import training_curves

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_LABELS",
    "protocol_label",
    "adaptive_summary",
    "attack_gallery",
    "defence_heatmaps",
    "detection_heatmaps",
    "example_pairs",
    "formatted_table",
    "metric_heatmap",
    "metric_vs_param",
    "projection_tsne",
    "protocol_heatmaps",
    "rank_curves",
    "rank_ratio_bars",
    "save_figure",
    "separation_summary",
    "singular_spectra",
    "smooth_colour_images",
    "training_curves",
    "trigger_rank_bars",
    "use_style",
]
