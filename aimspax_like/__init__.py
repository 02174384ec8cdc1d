"""aimspax_like: parallel active learning of MACE force fields.

Kept import-light on purpose: label workers import ``aimspax_like.reference`` and must never
pay for torch or MACE.
"""

__version__ = "0.1.0"
