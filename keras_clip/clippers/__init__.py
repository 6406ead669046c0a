"""Clippers: clip rules with their config and state layout."""

from keras.saving import deserialize_keras_object
from keras.saving import serialize_keras_object

from keras_clip.clippers.adaptive import AdaGC
from keras_clip.clippers.adaptive import AutoClip
from keras_clip.clippers.adaptive import ZClip
from keras_clip.clippers.base import Clipper
from keras_clip.clippers.fixed import AdaptiveGradClip
from keras_clip.clippers.fixed import GlobalNormClip
from keras_clip.clippers.fixed import NormClip
from keras_clip.clippers.fixed import ValueClip

ALIASES = {
    "value": ValueClip,
    "norm": NormClip,
    "global_norm": GlobalNormClip,
    "agc": AdaptiveGradClip,
    "autoclip": AutoClip,
    "zclip": ZClip,
    "adagc": AdaGC,
}


def register_alias(name, cls):
    ALIASES[name] = cls


def serialize(clipper):
    return None if clipper is None else serialize_keras_object(clipper)


def get(identifier):
    """Returns a clipper from a `Clipper`, a string alias or a config dict.

    Strings: `"value"`, `"norm"`, `"global_norm"`, `"agc"` (and the adaptive
    clippers' names) give the clipper with its defaults. A dict is either a
    Keras serialization (`{"class_name": ..., "config": ...}`, where
    `class_name` may also be one of the strings) or `None`.
    """
    if identifier is None or isinstance(identifier, Clipper):
        return identifier
    if isinstance(identifier, str):
        if identifier not in ALIASES:
            names = ", ".join(f'"{n}"' for n in ALIASES)
            raise ValueError(
                f"Unknown clipper. Expected a `keras_clip` clipper or one of "
                f"{names}. Received: clipper={identifier!r}"
            )
        return ALIASES[identifier]()
    if isinstance(identifier, dict):
        name = identifier.get("class_name")
        if name in ALIASES:
            return ALIASES[name].from_config(identifier.get("config") or {})
        try:
            obj = deserialize_keras_object(identifier)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Could not build a clipper from this config ({err}). "
                f"Received: clipper={identifier!r}"
            ) from None
        if isinstance(obj, Clipper):
            return obj
        raise ValueError(
            f"The config does not describe a clipper. Received: clipper={identifier!r}"
        )
    raise TypeError(
        "`clipper` must be a `keras_clip` clipper, a string or a config dict. "
        f"Received: clipper={identifier!r}"
    )


__all__ = [
    "AdaGC",
    "AdaptiveGradClip",
    "AutoClip",
    "ZClip",
    "Clipper",
    "GlobalNormClip",
    "NormClip",
    "ValueClip",
    "get",
    "serialize",
]
