"""fastibot's Triton kernels (installed as ``fastibot.kernels``) and how a run picks them."""
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(key: str, name: str, device_type: str, fallback: str) -> str:
    """``kernels.<key>``: ``auto`` is ``triton`` on CUDA when Triton imports, else ``fallback``;
    an explicit ``triton`` off CUDA needs the interpreter."""
    if name == "auto":
        if device_type != "cuda":
            return fallback
        try:
            import triton  # noqa: F401
        except ImportError:
            return fallback
        return "triton"
    if name == "triton" and device_type != "cuda" and not interpreting():
        raise RuntimeError(f"kernels.{key}=triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return name
