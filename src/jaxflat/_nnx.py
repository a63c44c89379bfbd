"""Everything jaxflat knows about Flax NNX, said through the shared registries.

* ``nnx.Variable`` and ``nnx.Pytree`` (so ``nnx.Module``) are mutable: one
  object found at several places is one tied node.
* An ``nnx.Variable`` has no trainable children, except an ``nnx.Param``,
  whose value is trainable. So BatchStat, RngState, Cache, ... are never
  parameters, and are not trainable children of their module.
* NNX's bookkeeping child (``PytreeState``) is hidden from users.
* An ``nnx.Variable`` is a wrapper: it stands for its value (``state``
  gives the value; ``modules`` and ``summary`` do not list it).
* A Flax Linen module instance holds no arrays (they live in the
  ``variables`` dict ``init`` returns): as a tree to flatten it is a
  ``TypeError`` pointing there, never a silent empty vector.

This is the only module that imports flax.
"""

from __future__ import annotations

from flax import linen, nnx

from ._predicates import _set_rule, refuse_root, register_mutable

# Instance checks of nnx.Variable look inside hijax variables (and tracers).
_HIJAX = getattr(nnx.variablelib, "HijaxVariable", None)
register_mutable(
    nnx.Variable, per_instance=(_HIJAX,) if isinstance(_HIJAX, type) else (), wrapper=True
)
register_mutable(nnx.Pytree, hidden=(nnx.pytreelib.PytreeState,))
_set_rule(nnx.Variable, ())
_set_rule(nnx.Param, None)  # every child: the value
refuse_root(
    linen.Module,
    "a Flax Linen module holds no arrays; its parameters are in the variables that "
    'init returns: destructure(variables["params"]) (variables = model.init(key, x))',
)
