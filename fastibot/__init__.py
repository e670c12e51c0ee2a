"""fastibot: fast iBOT pretraining for Vision Transformers."""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _alias_source_folders() -> None:
    """Run from an uninstalled source checkout: serve the top-level kernels/ and
    configs/ folders as fastibot.kernels and fastibot.configs, as an install does."""
    root = _Path(__file__).resolve().parent.parent
    for sub in ("kernels", "configs"):
        name = f"{__name__}.{sub}"
        init = root / sub / "__init__.py"
        if name in _sys.modules or not init.is_file() or _util.find_spec(name) is not None:
            continue
        spec = _util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module
        spec.loader.exec_module(module)
        globals()[sub] = module


_alias_source_folders()
