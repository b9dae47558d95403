"""Stage two: fusion heads trained on cached encoder features (never on the encoders).

Reads only the cache (cache/); never imports extract/ or transformers. Entry points:
`load_feature_set`, `build_head` / `list_heads`, `StratifiedProtocol`, the head contract
(`fuse.head`: `Head`, and `BaseHead` + `register_head` for a head of your own),
`fuse.experiment.run_grid` (what `fuse` and `compare` run; `run_compare` takes their flags),
`fuse.predict.predict_run`, `fuse.report_html` (`fusebench report`).
Torch and LightGBM load when a head needs them, not on `import fuse`.
"""

from fusebench.fuse.features import FeatureMismatchError, FeatureSet, load_feature_set
from fusebench.fuse.head import BaseHead, Head
from fusebench.fuse.protocol import StratifiedProtocol
from fusebench.fuse.registry import (
    UnknownHeadError,
    build_head,
    get_head,
    list_heads,
    register_head,
)

__all__ = [
    "BaseHead",
    "FeatureMismatchError",
    "FeatureSet",
    "Head",
    "StratifiedProtocol",
    "UnknownHeadError",
    "build_head",
    "get_head",
    "list_heads",
    "load_feature_set",
    "register_head",
]
