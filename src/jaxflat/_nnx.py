"""Everything jaxflat knows about Flax NNX, said through the shared registries.

* ``nnx.Variable`` and ``nnx.Pytree`` (so ``nnx.Module``) are mutable: one
  object found at several places is one tied node.
* An ``nnx.Variable`` has no trainable children, except an ``nnx.Param``,
  whose value is trainable. So BatchStat, RngState, Cache, ... are never
  parameters, and are not trainable children of their module.
* NNX's bookkeeping child (``PytreeState``) is hidden from users.
"""

from __future__ import annotations

from flax import nnx

from ._predicates import _set_rule, register_mutable

# Instance checks of nnx.Variable look inside hijax variables (and tracers).
_HIJAX = getattr(nnx.variablelib, "HijaxVariable", None)
register_mutable(nnx.Variable, per_instance=(_HIJAX,) if isinstance(_HIJAX, type) else ())
register_mutable(nnx.Pytree, hidden=(nnx.pytreelib.PytreeState,))
_set_rule(nnx.Variable, ())
_set_rule(nnx.Param, None)  # every child: the value


def is_variable(x: object) -> bool:
    """An ``nnx.Variable``: a wrapper whose state is its value."""
    return isinstance(x, nnx.Variable)
