"""The named JANG profiles, as data.

A profile gives bits per *profile class*; every tensor role maps to one class
(see ``roles.PROFILE_CLASS``). The table is the published one: bits for
MLP / attention / embedding / output head.
"""

from dataclasses import dataclass

from .errors import UnknownProfileError


@dataclass(frozen=True)
class Profile:
    name: str
    mlp: int
    attention: int
    embed: int
    lm_head: int

    def bits_for(self, profile_class: str) -> int:
        return getattr(self, profile_class)


_TABLE = [
    # name       mlp attn embed head
    ("JANG_1L", 2, 8, 8, 8),
    ("JANG_2S", 2, 6, 4, 6),
    ("JANG_2M", 2, 8, 4, 8),
    ("JANG_2L", 2, 8, 6, 8),
    ("JANG_3S", 3, 4, 4, 6),
    ("JANG_3M", 3, 6, 4, 6),
    ("JANG_3L", 3, 8, 4, 8),
    ("JANG_4S", 4, 5, 4, 6),
    ("JANG_4M", 4, 6, 4, 6),
    ("JANG_4L", 4, 8, 4, 8),
    ("JANG_6M", 6, 8, 6, 8),
]

PROFILES = {name: Profile(name, *bits) for name, *bits in _TABLE}

# Budget profiles: JANG_<n>K is an average-bits budget equal to the size of MLX's
# uniform n-bit quantization with group 64 (n bits + 0.5 bit of fp16 scale and bias),
# so JANG_4K is the same size as mlx-lm's 4-bit.
BUDGETS = {f"JANG_{n}K": n + 0.5 for n in (2, 3, 4, 5, 6)}

# Bit widths MLX's affine quantization stores (there is no 7-bit).
MLX_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (128, 64, 32)


def get_profile(name) -> Profile:
    if isinstance(name, Profile):
        return name
    key = str(name).upper().replace("-", "_")
    if key not in PROFILES:
        raise UnknownProfileError(
            f"Unknown profile {name!r}. Valid profiles: {', '.join(PROFILES)}; "
            f"budget profiles: {', '.join(BUDGETS)}."
        )
    return PROFILES[key]
