"""hybridvl: linear-complexity vision-language models built by swapping a Transformer VLM's attention for other
token mixers.

The subpackages are :mod:`hybridvl.mixers` (sequence mixers, their ops, states and the layout grammar),
:mod:`hybridvl.models` (the hybrid VLM, conversion, save/load, generation), :mod:`hybridvl.vision` (the vision
tower and media) and :mod:`hybridvl.lit` (Lightning stages, data, ablations, the ``hybridvl`` command). In a
checkout they are the top-level folders ``mixers/``, ``models/``, ``vision/`` and ``lit/``, installed under these
names (``package-dir`` in ``pyproject.toml``), so a project's own ``models`` package never collides with them.

.. code-block:: python

    import hybridvl

    hybridvl.parse_layout("S,D,D,D x2")          # ['S', 'D', 'D', 'D', 'S', 'D', 'D', 'D']
    mixer = hybridvl.build_mixer("D", 256)      # a Gated DeltaNet layer of width 256

Importing it registers :class:`HybridConfig` and :class:`HybridVLM` (``model_type: hybridvl``) with transformers'
``AutoConfig``, ``AutoModel`` and ``AutoModelForImageTextToText``.
"""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from hybridvl.mixers import build_mixer, parse_layout, register_mixer
from hybridvl.models.config import MODEL_TYPE, HybridConfig
from hybridvl.models.hybrid import HybridVLM

# transformers' Auto classes know model_type "hybridvl" from here on
AutoConfig.register(MODEL_TYPE, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridVLM, exist_ok=True)
AutoModelForImageTextToText.register(HybridConfig, HybridVLM, exist_ok=True)

try:
    __version__ = version("hybridvl")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["HybridConfig", "HybridVLM", "__version__", "build_mixer", "parse_layout", "register_mixer"]
