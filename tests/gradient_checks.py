"""Comparing a module's gradients with those of an independent reference."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_gradients_close(got, want):
  """Each leaf of `got` equals `want`'s to float32 rounding.

  Rounding is relative to the largest gradients of the leaf and of the whole tree
  (a leaf whose exact gradient is 0, e.g. a bias that a softmax cancels, comes out
  at ~1e-5 of the largest).
  """
  assert jax.tree.structure(got) == jax.tree.structure(want)
  overall = max(float(jnp.abs(e).max()) for e in jax.tree.leaves(want))
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    atol = 2e-4 * float(jnp.abs(e).max()) + 1e-6 * overall
    np.testing.assert_allclose(g, e, atol=atol, rtol=1e-3,
                               err_msg=jax.tree_util.keystr(path))
