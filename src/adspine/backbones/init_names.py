"""The initialization vocabulary, stated once (no torch): what ``init`` strings mean, how they parse and display.

``imagenet`` / ``imagenet:TAG`` load pretrained weights; ``random`` keeps the framework's default init;
``kaiming_normal`` / ``xavier_uniform`` / ``orthogonal`` re-initialise with a seeded scheme; ``file:PATH`` loads a
local state dict. The study spec, the backbones and the report all read these names from here.
"""

from __future__ import annotations

#: named random re-initialisation schemes (applied over the framework default with ``init_seed``)
RANDOM_SCHEMES = ("kaiming_normal", "xavier_uniform", "orthogonal")
#: inits whose result depends on ``init_seed``
SEEDED_INITS = ("random", *RANDOM_SCHEMES)
#: every accepted form, as shown to users
INIT_CHOICES = ("imagenet", "imagenet:<TAG>", "random", *RANDOM_SCHEMES, "file:PATH")
#: kinds that load trained weights (ImageNet tags and local files)
PRETRAINED_KINDS = ("imagenet", "file")


class InitError(ValueError):
    """A bad initialization request; the message is one line naming the offending value or file."""


class OfflineWeightsError(InitError):
    """Pretrained weights are neither cached nor installed, and cannot be downloaded here (offline)."""


def parse_init(init: str) -> tuple[str, str | None]:
    """Split ``init`` into (kind, argument): ``("imagenet", TAG | None)``, ``("random", None)``, ``(scheme, None)``
    or ``("file", PATH)``; anything else raises ``InitError`` listing the valid forms."""
    if not isinstance(init, str) or not init:
        raise InitError(f"init must be a non-empty string, got {init!r}; valid: {', '.join(INIT_CHOICES)}")
    kind, _, arg = init.partition(":")
    if kind == "imagenet":
        return kind, arg or None
    if kind == "file" and arg:
        return kind, arg
    if not arg and kind in SEEDED_INITS:
        return kind, None
    raise InitError(f"unknown init {init!r}; valid: {', '.join(INIT_CHOICES)}")


def is_pretrained(init: str) -> bool:
    """True for ImageNet tags and local files, False for random inits (raises ``InitError`` on a bad string)."""
    return parse_init(init)[0] in PRETRAINED_KINDS


def init_label(init: str) -> str:
    """Short display label: ``ImageNet``, ``ImageNet TAG``, ``random``, the scheme name, or ``file``."""
    kind, arg = parse_init(init)
    if kind == "imagenet":
        return "ImageNet" if arg is None else f"ImageNet {arg}"
    return kind
