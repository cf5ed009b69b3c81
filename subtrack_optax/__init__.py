"""subtrack-optax: SubTrack++ (gradient subspace tracking) for JAX/Optax.

Example:
  >>> import optax, subtrack_optax as st
  >>> tx = optax.chain(optax.clip_by_global_norm(1.0), st.subtrack(rank=64),
  ...                  optax.scale_by_learning_rate(1e-3))
"""

from subtrack_optax._config import STATIC_ARGS as STATIC_ARGS
from subtrack_optax._config import SUBSPACE_UPDATES as SUBSPACE_UPDATES
from subtrack_optax._diagnostics import SubspaceDiagnostics as SubspaceDiagnostics
from subtrack_optax._diagnostics import subspace_diagnostics as subspace_diagnostics
from subtrack_optax._leaves import LeafInfo as LeafInfo
from subtrack_optax._leaves import LeafList as LeafList
from subtrack_optax._leaves import list_leaves as list_leaves
from subtrack_optax._partition_specs import partition_specs as partition_specs
from subtrack_optax._plans import SubTrackDimensionNumbers as SubTrackDimensionNumbers
from subtrack_optax._state import SubTrackState as SubTrackState
from subtrack_optax._tracking import grassmann_step as grassmann_step
from subtrack_optax._transform import subtrack as subtrack
from subtrack_optax._transform import subtrack_adamw as subtrack_adamw

__version__ = "0.1.0"

__all__ = [
    "LeafInfo",
    "LeafList",
    "SubTrackDimensionNumbers",
    "SubTrackState",
    "STATIC_ARGS",
    "SUBSPACE_UPDATES",
    "SubspaceDiagnostics",
    "grassmann_step",
    "list_leaves",
    "partition_specs",
    "subtrack",
    "subtrack_adamw",
    "subspace_diagnostics",
]
