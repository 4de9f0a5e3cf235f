"""retrack: data unlearning for diffusion models (ReTrack and its baselines)."""

from retrack.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "unlearn", "sample", "evaluate"]


def __getattr__(name: str):
    # The public API imports torch and diffusers; load it lazily so `retrack --help` stays quick.
    if name in ("unlearn", "sample"):
        from retrack import api

        return getattr(api, name)
    if name == "evaluate":
        from retrack.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'retrack' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names must show up too (tab completion, help(), dir()).
    return sorted(set(globals()) | set(__all__))
