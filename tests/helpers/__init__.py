"""Helpers shared by more than one test file, one copy each (tests never import from another test file).

* ``tests.helpers.ops``: per-op checking (``check_op``, ``in_common_dtype``, ``check_aot_eager_matches_eager``,
  ``NoLaunch``).
* ``tests.helpers.norms``: what the LayerNorm, RMSNorm and fused add+norm tests share (shapes, the forced
  column loop, PyTorch's norms as peers).
* ``tests.helpers.gpt``, ``tests.helpers.vit``: the model tests' tiny configs and batches.
* ``tests.helpers.models``: the Triton model and its float64 PyTorch twin with the same weights.

Checks a library user could want too (``assert_close``, ``random_tensor``, ``poison_``, ``poisoned_empty``)
live in ``triformer.testing``; pytest fixtures live in ``tests/conftest.py``. Import as
``from tests.helpers.ops import check_op`` (pytest's ``pythonpath = ["."]`` puts the repository root on
``sys.path``; ``tests`` itself stays a namespace package, so the test files keep their plain module names).
"""
